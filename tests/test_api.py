"""The OpenAI-compatible sampler and embedder: against a fault-injecting stub, and the real llama.cpp server."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qprobe.cache import Cache
from qprobe.embedders.openai_api import OpenAIEmbedder, item_text
from qprobe.errors import QProbeError
from qprobe.samplers.base import row_seed
from qprobe.samplers.openai_api import OpenAISampler
from qprobe.testing.servers import TRANSIENT, StubServer, completion_for, embedding_for, token_logprobs_for

FAST = dict(timeout=1.0, max_retries=6, backoff=0.01)  # stall faults hold 2.5 s, past the 1 s timeout
PROMPTS = [
    {"prompt_id": 1, "prompt": "Write a function that adds two numbers."},
    {"prompt_id": 2, "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse a list."}]},
    {"prompt_id": 3, "prompt": "Return the maximum of a list."},
    {"prompt_id": 4, "prompt": "Count vowels in a string."},
]

MANY = [{"prompt_id": 10 + i, "prompt": f"Task {i}: write a function."} for i in range(12)]


def sampler(stub, **kw):
    return OpenAISampler(stub.url, "stub-model", **{**FAST, **kw})


def embedder(stub, **kw):
    return OpenAIEmbedder(stub.url, "stub-model", **{**FAST, **kw})


def items(n=40):
    return [(r["prompt"], f"completion {i}") for i, r in zip(range(n), PROMPTS * n)]


# ------------------------------------------------------------------ sampling against the stub
@pytest.mark.parametrize("n_per_request, faults", [(None, TRANSIENT), (1, TRANSIENT + ("fewer_choices",))])
@pytest.mark.slow  # seconds per case: the full lane
def test_sampling_with_faults_matches_fault_free_run(n_per_request, faults):
    with StubServer() as clean:
        want = sampler(clean, n_per_request=n_per_request, mode="completions").sample(
            PROMPTS + MANY, k=3, seed=5, progress=False)
        assert 1 <= clean.max_inflight <= 4  # the default concurrency bounds requests in flight
    with StubServer(fault_rate=0.3, faults=faults) as flaky:
        s = sampler(flaky, n_per_request=n_per_request, mode="completions")
        got = s.sample(PROMPTS + MANY, k=3, seed=5, progress=False)
    assert got == want
    assert sum(flaky.counts[f] for f in faults) >= 3, flaky.counts  # faults really happened
    assert s.n_requests == flaky.counts["chat"] + flaky.counts["completions"]
    if n_per_request == 1:  # one request per row: the row's own seed decides its completion
        for row in got:
            assert row["completion"] == completion_for(row["prompt"], row_seed(5, row["prompt_id"], row["sample"]), 0)
    assert {r["finish_reason"] for r in got} <= {"stop", "length"}


def test_chat_and_completions_endpoints():
    with StubServer() as stub:
        s_chat = sampler(stub)
        s_chat.sample(PROMPTS[:1], k=2, progress=False)
        assert (stub.counts["chat"], stub.counts["completions"]) == (1, 0)  # one request with n=2
        s_comp = sampler(stub, mode="completions")
        s_comp.sample(PROMPTS[:2], k=2, progress=False)  # the chat-message prompt still goes to chat
        assert (stub.counts["chat"], stub.counts["completions"]) == (2, 1)
    assert s_chat.identity() != s_comp.identity()
    assert "api_key" not in str(OpenAISampler("http://x/v1", "m", api_key="sk-secret").identity())


@pytest.mark.parametrize("mode", ["chat", "completions"])
def test_sampled_token_logprobs_are_kept(mode):
    with StubServer() as stub:
        rows = sampler(stub, mode=mode).sample(PROMPTS[:1], k=3, progress=False)
        plain = sampler(stub, mode=mode, logprobs=False).sample(PROMPTS[:1], k=3, seed=9, progress=False)
    for r in rows:
        assert r["token_logprobs"] == token_logprobs_for(r["completion"])
        assert r["n_tokens"] == len(r["token_logprobs"]) > 0
    assert all("token_logprobs" not in r for r in plain)


def test_server_that_rejects_logprobs_is_asked_again_without():
    with StubServer(reject_logprobs=True) as stub:
        s = sampler(stub)
        rows = s.sample(PROMPTS[:2], k=2, progress=False)
        assert len(rows) == 4 and all("token_logprobs" not in r for r in rows)
        assert stub.counts["logprobs_rejected"] >= 1 and not s.logprobs


@pytest.mark.parametrize("how", ["ignore_n", "fewer_choices"])
def test_top_up_when_server_returns_fewer_choices(how):
    stub_kw = {"ignore_n": True} if how == "ignore_n" else {"fault_rate": 1.0, "faults": ("fewer_choices",)}
    with StubServer(**stub_kw) as stub:
        rows = sampler(stub, mode="completions").sample(PROMPTS, k=4, seed=1, progress=False)
    assert len(rows) == 16
    for pid in (1, 2, 3, 4):
        mine = [r for r in rows if r["prompt_id"] == pid]
        assert [r["sample"] for r in mine] == [0, 1, 2, 3]
        assert len({r["completion"] for r in mine}) == 4  # top-ups carry new seeds: no repeats
    if how == "ignore_n":
        assert stub.counts["chat"] + stub.counts["completions"] == 16  # one completion per request


def test_warm_cache_makes_no_requests(tmp_path):
    cache = Cache(tmp_path)
    with StubServer() as stub:
        first = sampler(stub).sample(PROMPTS, k=2, cache=cache, progress=False)
        feats = embedder(stub).embed(items(10), cache=cache, progress=False)
        before = sum(stub.counts.values())
        s, e = sampler(stub), embedder(stub)
        assert s.sample(PROMPTS, k=2, cache=cache, progress=False) == first
        np.testing.assert_array_equal(e.embed(items(10), cache=cache, progress=False), feats)
        assert (s.n_requests, e.n_requests) == (0, 0)
        assert sum(stub.counts.values()) == before


def test_server_down_for_good_keeps_finished_results(tmp_path):
    cache = Cache(tmp_path)
    with StubServer(die_after=5) as stub:
        s = sampler(stub, n_per_request=1, concurrency=2)
        t0 = time.monotonic()
        with pytest.raises(QProbeError, match=f"^cannot reach API at {stub.url}: .*gave up after 7 attempts"):
            s.sample(PROMPTS, k=3, seed=0, cache=cache, progress=False)
        assert time.monotonic() - t0 < 10
    assert len(cache) == 5  # every answer the server sent before dying was cached
    with StubServer() as back:  # a rerun asks only for what is missing
        s2 = OpenAISampler(back.url, "stub-model", n_per_request=1, **FAST)
        s2.api_base = stub.url.rstrip("/")  # same identity as the dead server's, so the cache applies
        rows = s2.sample(PROMPTS, k=3, seed=0, cache=cache, progress=False)
    assert len(rows) == 12 and back.counts["ok"] == 7


def test_non_retryable_error_is_immediate():
    with StubServer() as stub:
        s = OpenAISampler(stub.url, "no-such-model", **FAST)
        with pytest.raises(QProbeError, match="HTTP 404.*not found"):
            s.sample(PROMPTS[:1], k=1, progress=False)
        assert s.n_requests == 1


def test_retry_after_is_honoured():
    with StubServer(fault_rate=1.0, faults=("429",), retry_after="0.6", max_consecutive_faults=1) as stub:
        s = sampler(stub)
        t0 = time.monotonic()
        s.sample(PROMPTS[:1], k=1, progress=False)
        assert time.monotonic() - t0 >= 0.6
        assert (stub.counts["429"], s.n_requests) == (1, 2)


# ------------------------------------------------------------------ embedding against the stub
@pytest.mark.parametrize("token_level", [False, True])
@pytest.mark.slow  # seconds per case: the full lane
def test_embedding_with_faults_matches_fault_free_run(token_level):
    its = items(40)
    with StubServer(token_level=token_level) as clean:
        want = embedder(clean, batch_size=4).embed(its, progress=False)
    with StubServer(fault_rate=0.3, token_level=token_level, faults=TRANSIENT + ("fewer_embeddings",)) as flaky:
        e = embedder(flaky, batch_size=4, concurrency=3)
        got = e.embed(its, progress=False)
    np.testing.assert_array_equal(got, want)
    assert flaky.counts["fewer_embeddings"] + sum(flaky.counts[f] for f in TRANSIENT) >= 3, flaky.counts
    expect = np.stack([embedding_for(item_text(p, c), token_level=token_level) for p, c in its])
    np.testing.assert_allclose(got, expect, rtol=1e-6)
    assert got.shape == (40, 8) and e.n_requests == flaky.counts["embeddings"]


def test_embedding_pooling_and_batching():
    its = items(6)
    with StubServer(token_level=True) as stub:
        last = embedder(stub, pooling="last", batch_size=64, max_chars_per_batch=100).embed(its, progress=False)
        assert stub.counts["embeddings"] > 1  # the character limit split the batch
    expect = np.stack([embedding_for(item_text(p, c), token_level=True, pooling="last") for p, c in its])
    np.testing.assert_allclose(last, expect, rtol=1e-6)
    assert item_text([{"role": "user", "content": "hi"}], "yo") == "user: hi\nassistant: yo"
    with pytest.raises(QProbeError, match="pooling"):
        OpenAIEmbedder("http://x/v1", "m", pooling="max")


def test_embedding_short_response_and_dead_server():
    with StubServer(fault_rate=1.0, faults=("fewer_embeddings",), max_consecutive_faults=99) as stub:
        with pytest.raises(QProbeError, match="1 embeddings for 2 inputs.*gave up after 3 attempts"):
            embedder(stub, max_retries=2).embed(items(2), progress=False)
    with pytest.raises(QProbeError, match=f"^cannot reach API at {stub.url}"):
        embedder(stub, max_retries=1).embed(items(2), progress=False)


@pytest.mark.subprocess
def test_import_qprobe_does_not_import_openai():
    code = ("import sys, qprobe, qprobe.samplers.openai_api, qprobe.embedders.openai_api, qprobe.apiclient; "
            "sys.exit('openai' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


# ------------------------------------------------------------------ the real llama.cpp server


@pytest.mark.server
@pytest.mark.parametrize("mode", ["chat", "completions"])
def test_llama_sampling_n3(llama, mode):
    rows = [{"prompt_id": 1, "prompt": "def add(a, b):"},
            {"prompt_id": 2, "prompt": [{"role": "user", "content": "Name a colour."}]}]
    s = OpenAISampler(llama, "smollm2", mode=mode, max_new_tokens=8, timeout=60)
    out = s.sample(rows, k=3, seed=0, progress=False)
    assert [(r["prompt_id"], r["sample"]) for r in out] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert all(isinstance(r["completion"], str) and r["finish_reason"] in ("stop", "length") for r in out)
    assert s.n_requests in (2, 6)  # 2 if the server honoured n; llama.cpp ignores it: 6, topped up
    for pid in (1, 2):  # each top-up carries its own seed, which llama.cpp honours
        assert len({r["completion"] for r in out if r["prompt_id"] == pid}) >= 2


@pytest.mark.server
def test_llama_embeddings_pooled(llama):
    its = [("def add(a, b):", " return a + b"), ("def add(a, b):", " return a - b"),
           ([{"role": "user", "content": "Name a colour."}], "Blue.")]
    e = OpenAIEmbedder(llama, "smollm2", timeout=60)
    X = e.embed(its, progress=False)
    assert X.shape == (3, 576) and np.isfinite(X).all()
    assert not np.allclose(X[0], X[1]) and not np.allclose(X[0], X[2])
    X_last = OpenAIEmbedder(llama, "smollm2", pooling="last").embed(its[:1], progress=False)
    assert X_last.shape == (1, 576) and not np.allclose(X_last[0], X[0])

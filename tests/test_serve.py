"""`qprobe serve` driven by the official openai client (sync and async).

Fast: the choice maths; the HTTP behaviour (errors, auth, limits, streaming,
cancellation) over a stub backend whose candidates and features are known; the
real upstream path against the in-repo stub server (its /v1/embeddings is the
probe's extractor); the real local path on a tiny random model.
Slow: the embedded default SmolLM2 (features captured while sampling, checked
against a separate forward pass) and llama.cpp's server as upstream.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from qprobe.probe import QProbe  # noqa: E402
from qprobe.serve import BackgroundServer, ServeConfig, build, create_app  # noqa: E402
from qprobe.serve.backends import Backend, Candidate  # noqa: E402
from qprobe.serve.protocol import pieces  # noqa: E402
from qprobe.serve.rerank import choose  # noqa: E402
from qprobe.select import kl_to_base, softmax_weights  # noqa: E402
from qprobe.testing.servers import StubServer, embedding_for  # noqa: E402

DIM = 8
KEY = "sk-test-token"


def fit_probe(dim: int, embedder: dict | None = None, seed: int = 0) -> QProbe:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((64, dim)).astype(np.float32)
    y = X @ rng.standard_normal(dim) + 0.1 * rng.standard_normal(64)
    probe = QProbe("mse", beta=0.5, alpha=1.0).fit(X, y)
    probe.embedder_ = embedder
    return probe


def client(url, key=KEY, **kw):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, **kw)


# ------------------------------------------------------------------ the choice
def test_choose_top_n_at_beta_zero_and_kl():
    q = np.array([0.3, 2.0, -1.0, 2.0, 1.5])
    c = choose(q, 3, 0.0, np.random.default_rng(0))
    assert c.indices.tolist() == [1, 3, 4]  # ties go to the lower index
    assert c.kl == pytest.approx(np.log(5))
    c = choose(q, 1, 1.0, np.random.default_rng(0))
    w = np.exp(q) / np.exp(q).sum()
    np.testing.assert_allclose(c.weights, w)
    assert c.kl == pytest.approx(float(np.sum(w * np.log(5 * w))))


def test_choose_first_draw_follows_softmax_and_draws_are_distinct():
    q = np.array([0.0, 1.0, 2.0, 0.5])
    rng = np.random.default_rng(1)
    w = softmax_weights(q, np.zeros(4), 0.7)
    firsts = np.zeros(4)
    for _ in range(4000):
        idx = choose(q, 3, 0.7, rng).indices
        assert len(set(idx.tolist())) == 3
        firsts[idx[0]] += 1
    np.testing.assert_allclose(firsts / firsts.sum(), w, atol=0.03)
    assert kl_to_base(w, np.zeros(4))[0] == pytest.approx(choose(q, 1, 0.7, rng).kl)


def test_stream_pieces_join_back():
    for text in ["", "a", "  lead and trail  ", "def f():\n    return 1\n\n", "x" * 50]:
        assert "".join(pieces(text)) == text


# ------------------------------------------------------------------ HTTP behaviour over a stub backend
class StubBackend(Backend):
    """Candidate i of a prompt is "cand-i: <prompt>" with feature vector FEATS[i]; can be held."""

    features = "stub"

    def __init__(self, feats):
        self.feats = feats
        self.hold = None  # threading.Event: draw waits for it
        self.cancelled = 0
        self.draws = []

    def check_prompt(self, prompt, max_tokens):
        return 2

    async def draw(self, d):
        self.draws.append(d)
        try:
            while self.hold is not None and not self.hold.is_set():
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        text = d.prompt if isinstance(d.prompt, str) else d.prompt[-1]["content"]
        return [Candidate(f"cand-{i}: {text}", "stop", self.feats[i], 3) for i in range(len(d.seeds))]


@pytest.fixture(scope="module")
def stub_app():
    feats = np.random.default_rng(3).standard_normal((32, DIM)).astype(np.float32)
    probe = fit_probe(DIM)
    backend = StubBackend(feats)
    config = ServeConfig(model_id="qp", k=4, beta=0.0, max_k=8, max_tokens=64, max_queue=2,
                         max_request_bytes=4000, max_prompt_chars=500, api_key=KEY)
    with BackgroundServer(create_app(backend, probe, config)) as srv:
        yield srv.url, backend, probe, feats


def test_chat_sync_returns_argmax_and_says_why(stub_app):
    url, backend, probe, feats = stub_app
    r = client(url).chat.completions.create(model="qp", messages=[{"role": "user", "content": "hi"}],
                                            presence_penalty=0.5, extra_body={"k": 6, "beta": 0})
    q = probe.predict(feats[:6])
    best = int(np.argmax(q))
    assert r.choices[0].message.content == f"cand-{best}: hi" and r.choices[0].finish_reason == "stop"
    info = r.model_extra["qprobe"]
    assert info["k"] == 6 and info["beta"] == 0 and info["chosen"] == [best]
    np.testing.assert_allclose([c["q"] for c in info["candidates"]], q, rtol=1e-6)
    assert [c["weight"] for c in info["candidates"]] == [float(i == best) for i in range(6)]
    assert info["kl"] == pytest.approx(np.log(6))
    assert r.usage.completion_tokens == 18  # all six candidates were generated
    assert "text" not in info["candidates"][0]
    assert info["ignored_params"] == ["presence_penalty"]  # a local backend says what it did not use


def test_completions_n_best_softmax_weights_and_candidates(stub_app):
    url, _, probe, feats = stub_app
    r = client(url).completions.create(model="qp", prompt="p", n=3, extra_body={"k": 5, "beta": 0, "candidates": True})
    q = probe.predict(feats[:5])
    top = np.argsort(-q)[:3].tolist()
    assert [c.text for c in r.choices] == [f"cand-{i}: p" for i in top]
    assert [c.index for c in r.choices] == [0, 1, 2]
    info = r.model_extra["qprobe"]
    assert info["chosen"] == top and info["candidates"][2]["text"] == "cand-2: p"
    r = client(url).completions.create(model="qp", prompt="p", extra_body={"k": 5, "beta": 0.3}, seed=7)
    w = softmax_weights(q, np.zeros(5), 0.3)
    info = r.model_extra["qprobe"]
    np.testing.assert_allclose([c["weight"] for c in info["candidates"]], w, rtol=1e-6)
    assert info["kl"] == pytest.approx(float(kl_to_base(w, np.zeros(5))[0]))
    again = client(url).completions.create(model="qp", prompt="p", extra_body={"k": 5, "beta": 0.3}, seed=7)
    assert again.model_extra["qprobe"]["chosen"] == info["chosen"]  # a seed makes the draw repeatable


def test_async_client_concurrent_and_streaming(stub_app):
    url, _, probe, feats = stub_app

    async def main():
        c = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0)
        whole = await c.chat.completions.create(model="qp", messages=[{"role": "user", "content": "a b c d e f g"}])
        stream = await c.chat.completions.create(model="qp", messages=[{"role": "user", "content": "a b c d e f g"}],
                                                 stream=True, extra_body={"beta": 0})
        parts, extras = [], []
        async for chunk in stream:
            extras.append((chunk.model_extra or {}).get("qprobe"))
            for ch in chunk.choices:
                parts.append(ch.delta.content or "")
        comps = await asyncio.gather(*[c.completions.create(model="qp", prompt=f"x{i}", max_tokens=4)
                                       for i in range(2)])
        await c.close()
        return whole, parts, extras, comps

    whole, parts, extras, comps = asyncio.run(main())
    assert "".join(parts) == whole.choices[0].message.content  # beta 0 by server default: same choice
    assert len([p for p in parts if p]) >= 2  # sent as several chunks
    assert extras[0]["chosen"] == whole.model_extra["qprobe"]["chosen"] and extras[1:] == [None] * (len(extras) - 1)
    assert [r.choices[0].text.split(": ")[1] for r in comps] == ["x0", "x1"]


def test_sync_streaming_completions_with_usage(stub_app):
    url = stub_app[0]
    chunks = list(client(url).completions.create(model="qp", prompt="one two three four five six", stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.endswith(": one two three four five six") and chunks[-1].usage.completion_tokens == 12


def test_models_and_auth(stub_app):
    url = stub_app[0]
    assert [m.id for m in client(url).models.list()] == ["qp"]
    for bad in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError) as e:
            client(url, key=bad or "x").models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    import httpx2 as httpx

    r = httpx.post(url + "/chat/completions", json={"model": "qp", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(model="nope"), 404, "model"),
    (dict(n=5), 400, "n"),  # n > k (4)
    (dict(extra_body={"k": 9}), 400, "k"),  # over max_k
    (dict(temperature=3), 400, "temperature"),
    (dict(max_tokens=65), 400, "max_tokens"),
    (dict(extra_body={"beta": -1}), 400, "beta"),
    (dict(messages=[]), 400, "messages"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "messages.0.content"),
    (dict(messages=[{"role": "user", "content": "y" * 501}]), 413, None),  # over max_prompt_chars
    (dict(messages=[{"role": "user", "content": "y" * 5000}]), 413, None),  # over max_request_bytes
])
def test_error_bodies(stub_app, kwargs, status, param):
    url = stub_app[0]
    args = {"model": "qp", "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        client(url).chat.completions.create(**args)
    assert e.value.status_code == status
    body = e.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert body["param"] == param


def test_raw_http_errors(stub_app):
    import httpx2 as httpx

    url, h = stub_app[0], {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/completions", content=b"{not json", headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/completions", json=[1, 2], headers=h)
    assert r.status_code == 400
    r = httpx.get(url + "/nothing", headers=h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.post(url + "/completions", json={"model": "qp", "prompt": ["a", "b"]}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def _raw_post(url: str, path: str, payload: dict) -> socket.socket:
    """Send one request on a raw socket and leave it waiting (closing the socket is a client disconnect)."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    body = json.dumps(payload).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /v1{path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def _wait_for(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_queue_full_then_disconnect_frees_the_slot(stub_app):
    url, backend, _, _ = stub_app
    backend.hold = threading.Event()
    before, n_draws = backend.cancelled, len(backend.draws)
    socks = []
    try:
        socks = [_raw_post(url, "/completions", {"model": "qp", "prompt": "held"}) for _ in range(2)]
        assert _wait_for(lambda: len(backend.draws) == n_draws + 2)  # both admitted (max_queue 2) and held
        with pytest.raises(openai.APIStatusError) as e:
            client(url, timeout=60).completions.create(model="qp", prompt="third")
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
        for sock in socks:
            sock.close()  # the clients go away
        assert _wait_for(lambda: backend.cancelled == before + 2)  # ... and their draws are cancelled
    finally:
        backend.hold.set()
        backend.hold = None
        for sock in socks:
            sock.close()
    r = client(url, timeout=60).completions.create(model="qp", prompt="after")  # the slots are free again
    assert r.choices[0].text.endswith(": after")


def test_cli_binds_loopback_by_default_and_errors_are_one_line(tmp_path):
    from click.testing import CliRunner

    from qprobe.cli import cli

    out = CliRunner().invoke(cli, ["serve", "--help"]).output
    assert "[default: 127.0.0.1]" in out and "--api-key-file" in out
    r = CliRunner().invoke(cli, ["serve", "--probe", str(tmp_path)])
    assert r.exit_code == 1
    assert r.output.strip() == f"Error: {tmp_path} is not a probe directory (needs config.json and probe.safetensors)"
    r = CliRunner().invoke(cli, ["serve", "--probe", str(tmp_path), "--api-base", "http://127.0.0.1:9/v1"])
    assert r.exit_code == 1 and r.output.strip() == "Error: --api-base needs --api-model"


# ------------------------------------------------------------------ the real upstream path, against the stub server
@pytest.fixture()
def upstream(tmp_path):
    with StubServer(ignore_n=True) as stub:
        ident = {"kind": "api", "api_base": stub.url.rstrip("/"), "model": "stub-model", "pooling": "mean"}
        probe = fit_probe(DIM, ident)
        probe.save(tmp_path / "probe")
        yield stub, tmp_path / "probe", probe


def test_upstream_rerank_topup_passthrough(upstream):
    stub, probe_dir, probe = upstream
    app = build(probe_dir, api_base=stub.url, api_model="stub-model", k=4, beta=0.0, server_api_key=KEY,
                max_retries=0)
    from qprobe.embedders.openai_api import item_text

    with BackgroundServer(app) as srv:
        msgs = [{"role": "user", "content": "Add two numbers."}]
        r = client(srv.url).chat.completions.create(model="stub-model", messages=msgs, max_tokens=32, seed=3,
                                                    presence_penalty=0.5, extra_body={"candidates": True})
        info = r.model_extra["qprobe"]
        texts = [c["text"] for c in info["candidates"]]
        assert len(set(texts)) == 4  # llama.cpp-like stub ignores n: topped up with new seeds
        X = np.stack([embedding_for(item_text(msgs, t)) for t in texts])
        q = probe.predict(X)
        np.testing.assert_allclose([c["q"] for c in info["candidates"]], q, rtol=1e-5)
        assert r.choices[0].message.content == texts[int(np.argmax(q))]
        sent = [b for b in stub.bodies if "messages" in b]
        assert len(sent) == 4 and all(b["presence_penalty"] == 0.5 and b["max_tokens"] == 32 for b in sent)
        assert info["features"] == "extractor" and "ignored_params" not in info
        c = client(srv.url).completions.create(model="stub-model", prompt="def f():", n=2, extra_body={"k": 3})
        assert len(c.choices) == 2 and c.choices[0].text != c.choices[1].text
        assert [b for b in stub.bodies if "prompt" in b][-1]["prompt"] == "def f():"


def test_upstream_unreachable_is_502_and_stall_is_504(upstream, tmp_path):
    stub, probe_dir, _ = upstream
    app = build(probe_dir, api_base=stub.url, api_model="stub-model", max_retries=0, request_timeout=0.5)
    with BackgroundServer(app) as srv:
        stub.faults, stub.fault_rate, stub.stall_s = ("stall",), 1.0, 2.0
        with pytest.raises(openai.APIStatusError) as e:
            client(srv.url).completions.create(model="stub-model", prompt="x")
        assert e.value.status_code == 504 and e.value.body["code"] == "upstream_timeout"
        stub.kill()
        with pytest.raises(openai.APIStatusError) as e:
            client(srv.url).completions.create(model="stub-model", prompt="x")
        assert e.value.status_code == 502 and "cannot reach" in e.value.body["message"]


# ------------------------------------------------------------------ the real local path
def _real_local_checks(url, model_name, probe, local_model):
    """Sync + async clients against a local backend.

    The candidates and their Q match the sampler run directly with the server's seeds and
    settings (each row draws from its own seeded generator, whatever the batching), with
    features captured in that pass.
    """
    from qprobe.samplers.base import SampleJob, row_seed
    from qprobe.samplers.hf import HFSampler

    msgs = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    r = client(url).chat.completions.create(model=model_name, messages=msgs, max_tokens=12, seed=1,
                                            extra_body={"k": 3, "beta": 0, "candidates": True})
    info = r.model_extra["qprobe"]
    assert info["features"] == "sampling pass" and len(info["candidates"]) == 3
    chosen = info["chosen"][0]
    assert r.choices[0].message.content == info["candidates"][chosen]["text"]
    direct = HFSampler(local_model, temperature=0.8, top_p=0.95, max_new_tokens=12, capture=[(-1, "last")],
                       dtype=probe.embedder_.get("dtype"))  # serve computes in the probe's features' dtype
    res = dict(direct.sample_stream([SampleJob(msgs, i, row_seed(1, "serve", i)) for i in range(3)]))
    assert [c["text"] for c in info["candidates"]] == [res[i].completion for i in range(3)]
    X = np.stack([res[i].features[0].vector for i in range(3)])
    np.testing.assert_allclose([c["q"] for c in info["candidates"]], probe.predict(X), rtol=1e-4, atol=1e-4)
    assert chosen == int(np.argmax(probe.predict(X)))
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens >= 3

    async def many():
        c = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0)
        out = await asyncio.gather(*[c.completions.create(model=model_name, prompt=f"{i} + {i} =", max_tokens=6,
                                                          extra_body={"k": 2}) for i in range(4)])
        await c.close()
        return out

    t0 = time.monotonic()
    outs = asyncio.run(many())
    assert all(len(o.choices) == 1 and o.model_extra["qprobe"]["k"] == 2 for o in outs)
    return time.monotonic() - t0


def test_local_tiny_model_batches_concurrent_requests(tiny_model_dir, tmp_path):
    from qprobe.embedders.hf import hf_identity

    probe = fit_probe(64, hf_identity(tiny_model_dir, 2, "last", "float32"))
    probe.save(tmp_path / "probe")
    app = build(tmp_path / "probe", model=tiny_model_dir, served_model_name="tiny", server_api_key=KEY,
                max_tokens=16)
    backend = app.state.backend
    with BackgroundServer(app) as srv:
        _real_local_checks(srv.url, "tiny", probe, tiny_model_dir)
        assert backend.n_batches < 5  # 1 + 4 requests, the 4 concurrent ones shared batches
        with pytest.raises(openai.APIStatusError) as e:  # the tiny model's context is 512 tokens
            client(srv.url).completions.create(model="tiny", prompt="word " * 600, max_tokens=4)
        assert e.value.status_code == 413 and e.value.body["code"] == "context_length_exceeded"


@pytest.mark.slow
def test_local_smollm2_sync_async(tmp_path, smollm):
    from qprobe.embedders.hf import hf_identity

    probe = fit_probe(576, hf_identity("smollm2-135m", 30, "last", "float32"))
    probe.save(tmp_path / "probe")
    with BackgroundServer(build(tmp_path / "probe", server_api_key=KEY, max_tokens=16)) as srv:
        _real_local_checks(srv.url, "smollm2-135m", probe, "smollm2-135m")


# ------------------------------------------------------------------ llama.cpp's server as upstream


@pytest.mark.slow
@pytest.mark.server
def test_llama_upstream(llama, tmp_path):
    ident = {"kind": "api", "api_base": llama, "model": "smollm2", "pooling": "mean"}
    probe = fit_probe(576, ident)
    probe.save(tmp_path / "probe")
    from qprobe.embedders.openai_api import OpenAIEmbedder

    app = build(tmp_path / "probe", api_base=llama, api_model="smollm2", k=3, beta=0.0, server_api_key=KEY)
    with BackgroundServer(app) as srv:
        msgs = [{"role": "user", "content": "Name a colour."}]
        r = client(srv.url).chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, seed=0,
                                                    extra_body={"candidates": True})
        info = r.model_extra["qprobe"]
        texts = [c["text"] for c in info["candidates"]]
        assert len(texts) == 3 and len(set(texts)) >= 2  # llama-cpp-python ignores n: topped up
        X = OpenAIEmbedder(llama, "smollm2").embed([(msgs, t) for t in texts], progress=False)
        np.testing.assert_allclose([c["q"] for c in info["candidates"]], probe.predict(X), rtol=1e-4, atol=1e-4)
        assert r.choices[0].message.content == texts[info["chosen"][0]]

        async def go():
            c = openai.AsyncOpenAI(base_url=srv.url, api_key=KEY, max_retries=0)
            out = await c.completions.create(model="smollm2", prompt="def add(a, b):", max_tokens=8, stream=True)
            text = "".join([ch.choices[0].text async for ch in out if ch.choices])
            await c.close()
            return text

        assert isinstance(asyncio.run(go()), str)

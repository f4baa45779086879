"""`qprobe sample` and `qprobe embed` against the real vLLM CPU build (scripts/vllm_server.sh).

Marked `vllm` and `slow`: they need `scripts/vllm_server.sh install` (its own venv, a
few GB) and start two vLLM servers, several minutes on 2 cores. Without the venv
they skip, or fail when QPROBE_REQUIRE_VLLM=1. Each server gets
QPROBE_VLLM_START_TIMEOUT seconds (default 900) to answer. Run them with

    bash scripts/vllm_server.sh install
    QPROBE_REQUIRE_VLLM=1 python -m pytest -q -m vllm tests/test_vllm.py
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qprobe.testing.servers import vllm_server, vllm_unavailable

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.server, pytest.mark.vllm]

PROMPTS = [
    {"prompt_id": "add", "prompt": "Write a Python function add(a, b) that returns a + b."},
    {"prompt_id": "colour", "prompt": [{"role": "user", "content": "Name a colour."}]},
]


def _need_vllm():
    reason = vllm_unavailable()
    if reason:
        if os.environ.get("QPROBE_REQUIRE_VLLM"):
            pytest.fail(reason)
        pytest.skip(reason)


def _serve(kind, tmp_path_factory):
    _need_vllm()
    log = tmp_path_factory.mktemp(f"vllm-{kind}") / "server.log"
    with vllm_server(kind, log) as base:
        yield base, log


@pytest.fixture(scope="module")
def vllm_generate(tmp_path_factory):
    yield from _serve("generate", tmp_path_factory)


@pytest.fixture(scope="module")
def vllm_pool(tmp_path_factory):
    yield from _serve("pool", tmp_path_factory)


def qprobe(*args, cwd):
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def n_posts(log: Path, path: str) -> int:
    """Requests the server answered on `path`, from its access log."""
    return len(re.findall(rf'"POST {re.escape(path)} HTTP/1\.1" 200', log.read_text(errors="replace")))


def test_sample_uses_n_and_keeps_logprobs(vllm_generate, tmp_path):
    base, log = vllm_generate
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    before = n_posts(log, "/v1/chat/completions")
    qprobe("sample", "prompts.jsonl", "-o", "out.jsonl", "-k", 4, "--max-new-tokens", 16, "--api-base", base,
           "--api-model", "smollm2", "--no-cache", cwd=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["prompt_id"], r["sample"]) for r in rows] == [(p["prompt_id"], s) for p in PROMPTS for s in range(4)]
    # one request per prompt with n = 4: no top-up
    assert n_posts(log, "/v1/chat/completions") - before == len(PROMPTS)
    for r in rows:
        assert r["finish_reason"] in ("stop", "length")
        lps = r["token_logprobs"]
        assert r["n_tokens"] == len(lps) >= 1 and all(v <= 0 for v in lps)
        if r["finish_reason"] == "length":
            assert len(lps) == 16
    for p in PROMPTS:  # the seed of each request gives its n choices different draws
        assert len({r["completion"] for r in rows if r["prompt_id"] == p["prompt_id"]}) >= 2


def test_embed_last_token_unnormalised(vllm_pool, tmp_path):
    base, log = vllm_pool
    rows = [{"prompt_id": i, "sample": 0, "prompt": "def add(a, b):", "completion": c}
            for i, c in enumerate([" return a + b", " return a - b", " pass"])]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    qprobe("embed", "rows.jsonl", "-o", "f.npy", "--api-base", base, "--api-model", "smollm2", "--no-cache",
           cwd=tmp_path)
    X = np.load(tmp_path / "f.npy")
    meta = json.loads((tmp_path / "f.npy.json").read_text())
    assert X.shape == (3, 576) and np.isfinite(X).all()
    norms = np.linalg.norm(X, axis=1)
    assert not np.allclose(norms, 1.0, atol=1e-3), norms  # the pooler's L2 normalisation is off
    assert not np.allclose(X[0], X[1])
    assert meta["extractor"]["kind"] == "api" and meta["extractor"]["model"] == "smollm2"
    text = log.read_text(errors="replace")
    assert "LAST" in text and n_posts(log, "/v1/embeddings") >= 1

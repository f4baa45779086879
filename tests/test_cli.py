"""The `qprobe` command line, every command, through click's runner and as a real subprocess.

Models: the tiny random local Llama (`tiny_model_dir`) and the stub OpenAI-compatible
server; never the real default model. Every user error must give one line,
"Error: ...", exit status 1 and no traceback (`one_error_line`).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
from qprobe.testing.runner import cli_env, one_error_line, run_cli  # noqa: E402
from qprobe.testing.servers import StubServer, completion_for, embedding_for  # noqa: E402

from qprobe.cli import cli  # noqa: E402
from qprobe.embedders.base import item_text  # noqa: E402
from qprobe.io import load_features, read_jsonl, save_features, write_jsonl  # noqa: E402
from qprobe.samplers.base import row_seed  # noqa: E402

MBPP = ROOT / "data" / "mbpp" / "mbpp.jsonl"
PROMPTS = [{"prompt_id": "a", "prompt": "def add(a, b):"},
           {"prompt_id": "b", "prompt": [{"role": "user", "content": "Reverse a list."}]}]


def invoke(*args, ok=True):
    """Run the CLI in this process; check the exit status (0, or 1 with one error line)."""
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    if ok:
        assert r.exit_code == 0, r.output
    else:
        assert r.exit_code == 1, r.output
        assert one_error_line(r.stderr), r.stderr
    return r


def error(*args) -> str:
    return one_error_line(invoke(*args, ok=False).stderr)


def jsonl(path, rows) -> Path:
    write_jsonl(path, rows)
    return Path(path)


@pytest.fixture(scope="module")
def stub():
    with StubServer() as s:
        yield s


@pytest.fixture
def prompts_file(tmp_path):
    return jsonl(tmp_path / "prompts.jsonl", PROMPTS)


def synthetic(tmp_path, n_prompts=12, k=4, dim=6, extractor=None, seed=0):
    """Rewarded rows and aligned features where feature 0 predicts the reward."""
    rng = np.random.default_rng(seed)
    rows, X = [], rng.standard_normal((n_prompts * k, dim))
    for i in range(n_prompts * k):
        p, s = divmod(i, k)
        rows.append({"prompt_id": f"t{p}", "prompt": f"task {p}", "sample": s, "completion": f"c{s}",
                     "reward": float(X[i, 0] > 0)})
    if k == 2:  # pref: exactly one good row per pair
        for p in range(n_prompts):
            good = int(X[2 * p + 1, 0] > X[2 * p, 0])
            rows[2 * p]["reward"], rows[2 * p + 1]["reward"] = float(good == 0), float(good == 1)
    write_jsonl(tmp_path / "rows.jsonl", rows)
    save_features(tmp_path / "X.npy", X, rows, extractor or {"kind": "hf", "model": "m", "layer": 3, "pooling": "last"})
    return tmp_path / "rows.jsonl", tmp_path / "X.npy"


# ------------------------------------------------------------------ prompts
def test_prompts_mbpp_limit_and_split(tmp_path):
    r = invoke("prompts", "mbpp", MBPP, "-o", tmp_path / "p.jsonl", "--limit", 5)
    rows = read_jsonl(tmp_path / "p.jsonl")
    assert len(rows) == 5 and "wrote 5 prompts" in r.stderr
    assert rows[0]["prompt_id"] == "mbpp-1" and rows[0]["test_list"] and isinstance(rows[0]["prompt"], list)
    invoke("prompts", "mbpp", MBPP, "-o", tmp_path / "t.jsonl", "--split", "test", "--limit", 3)
    assert {r["split"] for r in read_jsonl(tmp_path / "t.jsonl")} == {"test"}


@pytest.mark.subprocess
def test_subprocess_python_cli_prompts_and_qprobe_script_sample(tmp_path, stub):
    """Both entry points as real processes: `python cli.py` and the installed `qprobe`."""
    p = run_cli(["prompts", "mbpp", MBPP, "-o", tmp_path / "p.jsonl", "--limit", 2], tmp_path)
    assert p.returncode == 0 and "wrote 2 prompts" in p.stderr, p.stderr
    exe = Path(sys.executable).with_name("qprobe")
    s = subprocess.run([str(exe), "sample", tmp_path / "p.jsonl", "-o", tmp_path / "c.jsonl", "--api-base", stub.url,
                        "--api-model", "stub-model", "-k", "2", "--no-cache"], cwd=tmp_path, env=cli_env(),
                       capture_output=True, text=True, timeout=120)
    assert s.returncode == 0, s.stderr
    rows = read_jsonl(tmp_path / "c.jsonl")
    assert [(r["prompt_id"], r["sample"]) for r in rows] == [("mbpp-1", 0), ("mbpp-1", 1), ("mbpp-2", 0), ("mbpp-2", 1)]


# ------------------------------------------------------------------ sample
def test_sample_local_tiny_model_and_cache(tmp_path, prompts_file, tiny_model_dir):
    args = ["sample", prompts_file, "-o", tmp_path / "c.jsonl", "--model", tiny_model_dir, "-k", 2,
            "--max-new-tokens", 5, "--seed", 3, "--cache-dir", tmp_path / "cache"]
    invoke(*args)
    rows = read_jsonl(tmp_path / "c.jsonl")
    assert [(r["prompt_id"], r["sample"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert all(isinstance(r["completion"], str) and r["finish_reason"] in ("stop", "length") for r in rows)
    first = (tmp_path / "c.jsonl").read_bytes()
    invoke(*args)  # all cached now: same bytes
    assert (tmp_path / "c.jsonl").read_bytes() == first


def test_sample_api_stub(tmp_path, prompts_file, stub):
    before = stub.counts["chat"]
    invoke("sample", prompts_file, "-o", tmp_path / "c.jsonl", "--api-base", stub.url, "--api-model", "stub-model",
           "-k", 3, "--seed", 7, "--no-cache")
    rows = read_jsonl(tmp_path / "c.jsonl")
    assert len(rows) == 6 and stub.counts["chat"] - before == 2  # one request with n=3 per prompt
    msgs = [{"role": "user", "content": "def add(a, b):"}]
    assert [r["completion"] for r in rows[:3]] == [completion_for(msgs, row_seed(7, "a", 0), i) for i in range(3)]


def test_sample_api_flag_errors(tmp_path, prompts_file):
    out = ["-o", tmp_path / "c.jsonl"]
    assert "--api-base needs --api-model" in error("sample", prompts_file, *out, "--api-base", "http://x/v1")
    assert "not both" in error("sample", prompts_file, *out, "--api-base", "http://x/v1", "--model", "m")
    assert "--code-block works with local models only" in error(
        "sample", prompts_file, *out, "--api-base", "http://x/v1", "--api-model", "m", "--code-block")


# ------------------------------------------------------------------ reward
MBPP_ROWS = [
    {"prompt_id": 11, "prompt": "Write add.", "sample": 0,
     "completion": "```python\ndef add(a, b):\n    return a + b\n```",
     "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_setup_code": "", "reference": "3"},
    {"prompt_id": 11, "prompt": "Write add.", "sample": 1, "completion": "def add(a, b):\n    return a - b\n",
     "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_setup_code": "", "reference": "x"},
]


def test_reward_code_pass_and_fail_then_match(tmp_path):
    src = jsonl(tmp_path / "c.jsonl", MBPP_ROWS)
    r = invoke("reward", src, "-o", tmp_path / "r.jsonl", "--kind", "code", "--workers", 1,
               "--cache-dir", tmp_path / "cache")
    rows = read_jsonl(tmp_path / "r.jsonl")
    assert [x["reward"] for x in rows] == [1.0, 0.0] and "mean reward 0.500" in r.stderr
    assert rows[0]["reward_reason"] == "passed" and "AssertionError" in rows[1]["reward_reason"]
    write_jsonl(src, [dict(MBPP_ROWS[0], completion=" 3 "), MBPP_ROWS[1]])
    invoke("reward", src, "-o", tmp_path / "m.jsonl", "--kind", "match", "--cache-dir", tmp_path / "cache")
    assert [x["reward"] for x in read_jsonl(tmp_path / "m.jsonl")] == [1.0, 0.0]
    assert "unknown reward kind" in error("reward", src, "-o", tmp_path / "x.jsonl", "--kind", "nope")


# ------------------------------------------------------------------ embed
def test_embed_tiny_model(tmp_path, tiny_model_dir):
    src = jsonl(tmp_path / "c.jsonl", MBPP_ROWS)
    invoke("embed", src, "-o", tmp_path / "X.npy", "--model", tiny_model_dir, "--layer", 1, "--pooling", "mean",
           "--no-cache")
    X, meta = load_features(tmp_path / "X.npy", read_jsonl(src))
    assert X.shape == (2, 64) and np.isfinite(X).all()
    from qprobe.hfmodel import default_dtype

    assert meta["extractor"] == {"kind": "hf", "model": tiny_model_dir, "layer": 1, "pooling": "mean",
                                 "dtype": default_dtype("cpu")}  # the compute dtype is part of the identity


def test_embed_api_stub_safetensors(tmp_path, stub):
    src = jsonl(tmp_path / "c.jsonl", MBPP_ROWS)
    invoke("embed", src, "-o", tmp_path / "X.safetensors", "--api-base", stub.url, "--api-model", "stub-model",
           "--no-cache")
    X, meta = load_features(tmp_path / "X.safetensors", read_jsonl(src))
    want = np.stack([embedding_for(item_text(r["prompt"], r["completion"]), pooling="last") for r in MBPP_ROWS])
    np.testing.assert_array_equal(X, want)
    assert meta["extractor"]["kind"] == "api" and meta["extractor"]["model"] == "stub-model"


# ------------------------------------------------------------------ train / rerank / eval
@pytest.mark.parametrize("objective", ["mse", "ce", "pg", "pref"])
def test_train_each_objective_then_rerank_and_eval(tmp_path, objective):
    rows, X = synthetic(tmp_path, k=2 if objective == "pref" else 4)
    r = invoke("train", rows, X, "-o", tmp_path / "probe", "--objective", objective, "--epochs", 20, "--seed", 1)
    assert f"trained a {objective} probe on" in r.stderr
    cfg = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert cfg["objective"] == objective and cfg["embedder"]["layer"] == 3 and cfg["n_features"] == 6
    invoke("rerank", rows, X, "--probe", tmp_path / "probe", "-o", tmp_path / "chosen.jsonl", "--beta", 0)
    chosen = read_jsonl(tmp_path / "chosen.jsonl")
    assert [c["prompt_id"] for c in chosen] == [f"t{p}" for p in range(12)] and all("q" in c for c in chosen)
    rep = json.loads(invoke("eval", rows, X, "--probe", tmp_path / "probe", "--json").stdout)
    assert {"n_prompts", "k", "base_reward", "probe_reward", "oracle_reward", "kl", "bon_kl_bound"} <= set(rep)
    from qprobe.select import selection_report  # --json reports every key of the selection report

    assert set(selection_report([0.0, 1.0], [0.0, 1.0], [0, 0], beta=0.1)) | {"argmax_kl", "bok_reward_at_probe_kl", "bok_kl_capped", "baselines"} == set(rep)
    assert rep["n_prompts"] == 12 and rep["k"] == (2 if objective == "pref" else 4)
    assert rep["base_reward"] <= rep["oracle_reward"] and rep["kl"] >= 0
    # feature 0 decides the reward, so the argmax choice beats the mean of k
    assert rep["argmax_reward"] > rep["base_reward"]
    table = invoke("eval", rows, X, "--probe", tmp_path / "probe").stdout
    assert "best-of-k oracle" in table


def test_eval_first_k_and_where(tmp_path):
    rows, X = synthetic(tmp_path)
    invoke("train", rows, X, "-o", tmp_path / "probe", "--objective", "mse")
    rep = json.loads(invoke("eval", rows, X, "--probe", tmp_path / "probe", "-k", 2, "--json").stdout)
    assert rep["k"] == 2
    rep = json.loads(invoke("eval", rows, X, "--probe", tmp_path / "probe", "--where", "prompt_id=t0,t1",
                            "--json").stdout)
    assert rep["n_prompts"] == 2
    assert "no rows match --where" in error("eval", rows, X, "--probe", tmp_path / "probe", "--where", "prompt_id=zz")


@pytest.mark.subprocess
def test_subprocess_train_rerank_eval(tmp_path):
    rows, X = synthetic(tmp_path)
    probe = tmp_path / "probe"
    for args in (["train", rows, X, "-o", probe, "--objective", "mse"],
                 ["rerank", rows, X, "--probe", probe, "-o", tmp_path / "chosen.jsonl", "--seed", 0]):
        p = run_cli(args, tmp_path)
        assert p.returncode == 0, p.stderr
    assert len(read_jsonl(tmp_path / "chosen.jsonl")) == 12
    p = run_cli(["eval", rows, X, "--probe", probe, "--json"], tmp_path)
    assert p.returncode == 0 and json.loads(p.stdout)["n_prompts"] == 12, p.stderr


# ------------------------------------------------------------------ user errors: one line, exit 1
def test_user_errors_in_process(tmp_path):
    rows, X = synthetic(tmp_path)
    invoke("train", rows, X, "-o", tmp_path / "probe")
    assert error("train", tmp_path / "nope.jsonl", X, "-o", tmp_path / "p") == \
        f"Error: {tmp_path / 'nope.jsonl'}: no such file"
    lines = rows.read_text().splitlines(keepends=True)
    (tmp_path / "bad.jsonl").write_text("".join(lines[:3]) + "{oops\n" + "".join(lines[4:]))
    assert "bad.jsonl:4: malformed JSON" in error("train", tmp_path / "bad.jsonl", X, "-o", tmp_path / "p")
    write_jsonl(tmp_path / "nr.jsonl", [{k: v for k, v in r.items() if k != "reward"} for r in read_jsonl(rows)])
    assert "nr.jsonl: row 1 has no 'reward' field (run `qprobe reward` first)" in error(
        "train", tmp_path / "nr.jsonl", X, "-o", tmp_path / "p")
    write_jsonl(tmp_path / "rev.jsonl", read_jsonl(rows)[::-1])
    assert "X.npy: features were computed for other rows" in error("train", tmp_path / "rev.jsonl", X, "-o",
                                                                    tmp_path / "p")
    other = tmp_path / "other"
    other.mkdir()
    _, X2 = synthetic(other, extractor={"kind": "hf", "model": "another-model", "layer": 3, "pooling": "last"})
    assert "features come from model='another-model' but the probe was trained on model='m'" in error(
        "rerank", rows, X2, "--probe", tmp_path / "probe", "-o", tmp_path / "c.jsonl")


@pytest.mark.subprocess
def test_user_errors_as_subprocess(tmp_path):
    """The same one-line contract in a real process (no click runner in between)."""
    rows, X = synthetic(tmp_path)
    (tmp_path / "trunc.jsonl").write_text(rows.read_text()[:-20])
    cases = [(["train", tmp_path / "missing.jsonl", X, "-o", tmp_path / "p"], "missing.jsonl: no such file"),
             (["train", tmp_path / "trunc.jsonl", X, "-o", tmp_path / "p"], "trunc.jsonl:48: truncated JSON")]
    for args, expect in cases:
        p = run_cli(args, tmp_path)
        line = one_error_line(p.stderr)
        assert p.returncode == 1 and line and expect in line, p.stderr


@pytest.mark.subprocess
def test_unknown_model_is_one_line_and_does_not_hang(tmp_path, prompts_file):
    assert error("embed", jsonl(tmp_path / "rows.jsonl", MBPP_ROWS), "-o", tmp_path / "X.npy", "--model",
                 "/nonexistent", "--no-cache").startswith("Error: --model /nonexistent: no such folder or file")
    t0 = time.monotonic()  # a hub id not in the local cache: HF_HUB_OFFLINE=1 (cli_env) fails it at once
    model = "bogus-org/no-such-model-xyz"
    p = run_cli(["sample", prompts_file, "-o", tmp_path / "c.jsonl", "--model", model, "-k", 1, "--no-cache"],
                tmp_path, timeout=120)
    line = one_error_line(p.stderr)
    assert p.returncode == 1 and line and line.startswith(f"Error: cannot load model '{model}'"), p.stderr
    assert time.monotonic() - t0 < 90


@pytest.mark.subprocess
def test_unreachable_api_is_one_line_and_quick(tmp_path, prompts_file):
    t0 = time.monotonic()
    p = run_cli(["sample", prompts_file, "-o", tmp_path / "c.jsonl", "--api-base", "http://127.0.0.1:9/v1",
                 "--api-model", "m", "--max-retries", 1, "--no-cache"], tmp_path, timeout=120)
    line = one_error_line(p.stderr)
    assert p.returncode == 1 and line, p.stderr
    assert line.startswith("Error: cannot reach API at http://127.0.0.1:9/v1") and "gave up after 2 attempts" in line
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "c.jsonl").exists()
    t0 = time.monotonic()  # in process, no retries: at once
    assert "cannot reach API" in error("embed", jsonl(tmp_path / "rows.jsonl", MBPP_ROWS), "-o", tmp_path / "X.npy",
                                       "--api-base", "http://127.0.0.1:9/v1", "--api-model", "m", "--max-retries", 0,
                                       "--no-cache")
    assert time.monotonic() - t0 < 10

"""Hostile inputs, round 2 (issue 16): each defect found there, pinned by a test that failed before its fix.

No model is loaded: rows, features and a ridge probe are made here in a second.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qprobe.cli import cli
from qprobe.errors import QProbeError
from qprobe.io import load_features, read_jsonl, save_features, write_jsonl

IDENT = {"kind": "hf", "model": "m", "layer": 1, "pooling": "last"}


def rows_of(n_prompts=6, k=4):
    return [{"prompt_id": f"p{p}", "prompt": f"Task {p}", "sample": s, "completion": f"answer {p}.{s}",
             "reward": float((p + s) % 2), "reference": f"answer {p}.0"}
            for p in range(n_prompts) for s in range(k)]


def invoke(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


_PROGRESS = re.compile(r"^\s*$|^[\w .-]+:\s*\d+%\|")  # a tqdm bar: progress, not a message


def one_line(r) -> str:
    """The single 'Error: ...' line of a refused command (exit 1 or a usage error, exit 2)."""
    lines = [ln for ln in re.split(r"[\r\n]", r.stderr) if not _PROGRESS.match(ln)]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert r.exit_code in (1, 2) and "Traceback" not in r.stderr and len(errors) == 1, r.stderr
    if r.exit_code == 1:
        assert len(lines) == 1, r.stderr
    return errors[0]


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted([path] if path.is_file() else path.rglob("*")):
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture()
def work(tmp_path):
    rows = rows_of()
    write_jsonl(tmp_path / "rows.jsonl", rows)
    X = np.random.default_rng(0).standard_normal((len(rows), 5))
    save_features(tmp_path / "X.npy", X, rows, IDENT)
    r = invoke("train", tmp_path / "rows.jsonl", tmp_path / "X.npy", "-o", tmp_path / "P", "--objective", "mse")
    assert r.exit_code == 0, r.stderr
    return tmp_path


def rerank(work, out, *extra):
    return invoke("rerank", work / "rows.jsonl", work / "X.npy", "--probe", work / "P", "-o", out, *extra)


# ------------------------------------------------------------------ 2. an output that is an input
@pytest.mark.parametrize("target", ["rows.jsonl", "X.npy", "X.npy.json", "P/config.json", "P/probe.safetensors",
                                    "hardlink", "symlink"])
def test_an_output_that_is_an_input_is_refused(work, target):
    if target == "hardlink":
        os.link(work / "rows.jsonl", work / "hardlink")
    if target == "symlink":
        os.symlink(work / "X.npy", work / "symlink")
    before = {p: digest(work / p) for p in ("rows.jsonl", "X.npy", "X.npy.json", "P")}
    line = one_line(rerank(work, work / target))
    assert "would overwrite the input" in line and target in line
    assert before == {p: digest(work / p) for p in before}


def test_train_and_reward_and_embed_refuse_their_inputs(work):
    before = {p: digest(work / p) for p in ("rows.jsonl", "X.npy", "X.npy.json", "P")}
    assert "would overwrite" in one_line(invoke("reward", work / "rows.jsonl", "-o", work / "rows.jsonl",
                                                "--kind", "match", "--no-cache"))
    assert "would overwrite" in one_line(invoke("train", work / "rows.jsonl", work / "X.npy", "-o", work))
    assert "would overwrite" in one_line(invoke("embed", work / "rows.jsonl", "-o", work / "rows.jsonl",
                                                "--api-base", "http://127.0.0.1:9/v1", "--api-model", "m"))
    assert before == {p: digest(work / p) for p in before}


# ------------------------------------------------------------------ 3. special files are written through
def test_dev_null_and_a_symlink_to_it_stay_devices(work):
    assert rerank(work, "/dev/null").exit_code == 0
    os.symlink("/dev/null", work / "null-link")
    assert rerank(work, work / "null-link").exit_code == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and (work / "null-link").is_symlink()


def test_a_fifo_is_written_through(work):
    fifo = work / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    assert rerank(work, fifo).exit_code == 0
    reader.join(10)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert len(got[0].decode().splitlines()) == 6  # one chosen row per prompt


def test_a_symlink_to_a_file_keeps_the_link_and_replaces_the_target(work):
    (work / "real.jsonl").write_text("old\n")
    os.symlink(work / "real.jsonl", work / "link.jsonl")
    assert rerank(work, work / "link.jsonl").exit_code == 0
    assert (work / "link.jsonl").is_symlink() and len(read_jsonl(work / "real.jsonl")) == 6
    os.symlink(work / "absent.jsonl", work / "dangling.jsonl")
    assert "does not exist" in one_line(rerank(work, work / "dangling.jsonl"))


def test_features_onto_a_device_and_outputs_onto_a_socket_are_refused(work, tmp_path):
    import socket

    rows = rows_of()
    with pytest.raises(QProbeError, match="regular file"):
        save_features("/dev/null", np.zeros((len(rows), 2)), rows, IDENT)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(work / "sock"))
    try:
        assert "special file" in one_line(rerank(work, work / "sock"))
    finally:
        s.close()


# ------------------------------------------------------------------ 4. limits at the flag; sandbox failures
@pytest.mark.parametrize("value", ["inf", "nan", "1e308", "0", "-1", "3601"])
def test_absurd_timeouts_are_refused_at_the_flag(work, value):
    line = one_line(invoke("reward", work / "rows.jsonl", "-o", work / "o.jsonl", "--kind", "code",
                           "--timeout", value))
    assert "--timeout" in line


@pytest.mark.parametrize("flag,value", [("--beta", "nan"), ("--beta", "inf"), ("--alpha", "nan"), ("--lr", "inf")])
def test_non_finite_numbers_are_refused_at_the_flag(work, flag, value):
    assert flag in one_line(invoke("train", work / "rows.jsonl", work / "X.npy", "-o", work / "Q", flag, value))


def test_run_python_refuses_an_absurd_timeout():
    from qprobe.rewards.sandbox import run_python

    for t in (1e308, math.inf, math.nan, 0, -1):
        with pytest.raises(QProbeError, match="timeout"):
            run_python("pass", timeout=t)


def test_a_sandbox_failure_is_an_error_and_is_not_cached(tmp_path, monkeypatch):
    """A boot that cannot set its limits says so; reward raises and caches nothing (not a 0 for the program)."""
    from qprobe.cache import Cache
    from qprobe.pipeline import reward_file
    from qprobe.rewards import _isolation as iso
    from qprobe.rewards.sandbox import sandbox_backend

    sandbox_backend()  # choose (and cache) the backend with the real boot first
    good = iso.rlimits
    monkeypatch.setattr(iso, "rlimits", lambda *a: good(*a) + [["RLIMIT_NO_SUCH_THING", 1, 1]])
    rows = [{"prompt_id": "a", "prompt": "p", "sample": 0, "completion": "x = 1", "tests": "assert x == 1"}]
    write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(QProbeError, match="sandbox failed before the program ran"):
        reward_file(tmp_path / "c.jsonl", tmp_path / "o.jsonl", "code", cache=Cache(tmp_path / "cache"),
                    workers=1, progress=False)
    assert len(Cache(tmp_path / "cache")) == 0 and not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------ 5. features without their sidecar
def test_a_bare_npy_is_refused_unless_vouched_for(work):
    X, _ = load_features(work / "X.npy")
    np.save(work / "bare.npy", X[::-1])  # rows reversed, no sidecar: would silently mislead
    line = one_line(invoke("eval", work / "rows.jsonl", work / "bare.npy", "--probe", work / "P"))
    assert "bare.npy" in line and "--features-unchecked" in line
    r = invoke("eval", work / "rows.jsonl", work / "bare.npy", "--probe", work / "P", "--features-unchecked")
    assert r.exit_code == 0, r.stderr
    for cmd in ("train", "rerank", "eval"):
        assert "--features-unchecked" in invoke(cmd, "--help").stdout


# ------------------------------------------------------------------ 6. regex reward with a time limit
def test_a_catastrophic_regex_times_out_instead_of_hanging(tmp_path):
    rows = [{"prompt_id": "a", "prompt": "p", "sample": 0, "completion": "a" * 40, "reference": "(a|aa)+b"},
            {"prompt_id": "a", "prompt": "p", "sample": 1, "completion": "ab", "reference": "(a|aa)+b"}]
    write_jsonl(tmp_path / "c.jsonl", rows)
    t0 = time.monotonic()
    r = invoke("reward", tmp_path / "c.jsonl", "-o", tmp_path / "o.jsonl", "--kind", "regex", "--timeout", "0.5",
               "--no-cache")
    assert r.exit_code == 0, r.stderr
    assert time.monotonic() - t0 < 30
    out = read_jsonl(tmp_path / "o.jsonl")
    assert [(o["reward"], o["reward_reason"]) for o in out] == [(0.0, "timeout"), (1.0, "match")]


# ------------------------------------------------------------------ 7. two saves into one folder
def test_concurrent_probe_saves_all_succeed_and_leave_nothing_behind(work):
    from qprobe.probe import QProbe

    probe = QProbe.load(work / "P")
    errors = []

    def save(n):
        for _ in range(n):
            try:
                probe.save(work / "out" / "probe")
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

    threads = [threading.Thread(target=save, args=(8,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert os.listdir(work / "out") == ["probe"]
    QProbe.load(work / "out" / "probe")


def test_a_symlinked_probe_folder_stays_a_link(work):
    from qprobe.probe import QProbe

    (work / "real").mkdir()
    os.symlink(work / "real", work / "link")
    probe = QProbe.load(work / "P")
    probe.save(work / "link")
    probe.save(work / "link")
    assert (work / "link").is_symlink() and sorted(os.listdir(work / "real")) == ["config.json", "probe.safetensors"]
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []
    QProbe.load(work / "link")


# ------------------------------------------------------------------ 8. .gz outputs are gzip
def test_a_gz_output_is_gzip_and_reads_back(work):
    r = invoke("reward", work / "rows.jsonl", "-o", work / "out.jsonl.gz", "--kind", "match", "--no-cache")
    assert r.exit_code == 0, r.stderr
    with gzip.open(work / "out.jsonl.gz", "rt") as f:
        assert len(f.read().splitlines()) == 24
    assert len(read_jsonl(work / "out.jsonl.gz")) == 24


# ------------------------------------------------------------------ 9. malformed inputs: one line each
def _malformed(d: Path) -> list[tuple[str, list, str]]:
    """(what, CLI args, text the error line must contain)."""
    good = rows_of()

    def jl(name, rows=None, text=None):
        p = d / name
        if text is not None:
            p.write_text(text, encoding="utf-8")
        else:
            p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return p

    def with_row0(**kw):
        return [dict(good[0], **kw)] + good[1:]

    X = np.random.default_rng(0).standard_normal((24, 5))
    np.save(d / "str.npy", X.astype(str))
    np.save(d / "rec.npy", np.zeros((24, 2), dtype=[("a", "f4"), ("b", "i4")]))
    side_list = d / "Xl.npy"
    save_features(side_list, X, good, IDENT)
    (d / "Xl.npy.json").write_text("[1, 2]")
    side_deep = d / "Xd.npy"
    save_features(side_deep, X, good, IDENT)
    (d / "Xd.npy.json").write_text("[" * 100000 + "]" * 100000)
    side_digest = d / "Xg.npy"
    save_features(side_digest, X, good, IDENT)
    meta = json.loads((d / "Xg.npy.json").read_text())
    (d / "Xg.npy.json").write_text(json.dumps(dict(meta, rows_digest=["x"])))
    cfg = json.loads((d / "P" / "config.json").read_text())

    def probe_with(name, text):
        import shutil

        q = d / name
        shutil.copytree(d / "P", q)
        (q / "config.json").write_text(text)
        return q

    deep_cfg = probe_with("Pdeep", '{"format": ' + "[" * 100000 + "]" * 100000 + "}")
    list_cfg = probe_with("Plist", json.dumps([cfg]))
    params_cfg = probe_with("Pparams", json.dumps(dict(cfg, params=[1, 2])))
    (d / "cache-bad").mkdir()
    (d / "cache-bad" / "cache.sqlite").write_bytes(b"this is not an sqlite database" * 100)
    (d / "raises.py").write_text("def reward(row):\n    raise RuntimeError('oops')\n"
                                 "def huge(row):\n    return 10 ** 400\n"
                                 "def nan(row):\n    return float('nan')\n")
    (d / "afile").write_text("x")
    ev = ["eval", None, d / "X.npy", "--probe", d / "P"]

    def eval_rows(p):
        return [a if a is not None else p for a in ev]

    return [
        ("prompt_id is a list", eval_rows(jl("id-list.jsonl", with_row0(prompt_id=[1, 2]))), "row 1: 'prompt_id'"),
        ("prompt_id is null", eval_rows(jl("id-null.jsonl", with_row0(prompt_id=None))), "row 1: 'prompt_id'"),
        ("prompt_id is a float", eval_rows(jl("id-float.jsonl", with_row0(prompt_id=1.5))), "row 1: 'prompt_id'"),
        ("sample is a string", eval_rows(jl("s-str.jsonl", with_row0(sample="0"))), "row 1: 'sample'"),
        ("sample is negative", eval_rows(jl("s-neg.jsonl", with_row0(sample=-1))), "row 1: 'sample'"),
        ("sample is a huge int", eval_rows(jl("s-huge.jsonl", with_row0(sample=10**30))), "row 1: 'sample'"),
        ("sample is true", eval_rows(jl("s-bool.jsonl", with_row0(sample=True))), "row 1: 'sample'"),
        ("a 5000-digit integer", eval_rows(jl("digits.jsonl", text=json.dumps(good[0])[:-1] + ', "n": '
                                              + "9" * 5000 + "}\n")), "digits.jsonl:1:"),
        ("deeply nested JSON", eval_rows(jl("deep.jsonl", text='{"a": ' + "[" * 100000 + "]" * 100000 + "}\n")),
         "deep.jsonl:1: JSON nested too deeply"),
        ("a lone surrogate", eval_rows(jl("surr.jsonl", text=json.dumps(good[0])[:-1] + ', "x": "\\ud800"}\n')),
         "surr.jsonl:1: field 'x'"),
        ("reward is a huge int", eval_rows(jl("r-huge.jsonl", with_row0(reward=10**400))), "row 1: reward"),
        ("features of strings", ["eval", d / "rows.jsonl", d / "str.npy", "--probe", d / "P"], "must be numbers"),
        ("features of a structured dtype", ["eval", d / "rows.jsonl", d / "rec.npy", "--probe", d / "P"],
         "must be numbers"),
        ("sidecar is a list", ["eval", d / "rows.jsonl", side_list, "--probe", d / "P"], "Xl.npy.json: expected"),
        ("sidecar nested deeply", ["eval", d / "rows.jsonl", side_deep, "--probe", d / "P"], "Xd.npy.json:"),
        ("sidecar digest of the wrong type", ["eval", d / "rows.jsonl", side_digest, "--probe", d / "P"],
         "'rows_digest' must be str"),
        ("probe config nested deeply", ["eval", d / "rows.jsonl", d / "X.npy", "--probe", deep_cfg], "config.json"),
        ("probe config is a list", ["eval", d / "rows.jsonl", d / "X.npy", "--probe", list_cfg], "config.json"),
        ("probe params not an object", ["eval", d / "rows.jsonl", d / "X.npy", "--probe", params_cfg],
         "'params' must be dict"),
        ("--seed -1", ["train", d / "rows.jsonl", d / "X.npy", "-o", d / "Q", "--seed", "-1"], "--seed"),
        ("--seed 2**64", ["rerank", d / "rows.jsonl", d / "X.npy", "--probe", d / "P", "-o", d / "o.jsonl",
                          "--seed", str(2**64)], "--seed"),
        ("output on a full disk", ["reward", d / "rows.jsonl", "-o", "/dev/full", "--kind", "match", "--no-cache"],
         "/dev/full: cannot write"),
        ("output under a file", ["reward", d / "rows.jsonl", "-o", d / "afile" / "o.jsonl", "--kind", "match",
                                 "--no-cache"], "cannot write"),
        ("output name too long", ["reward", d / "rows.jsonl", "-o", d / ("x" * 300), "--kind", "match", "--no-cache"],
         "cannot write"),
        ("output on a read-only file system", ["reward", d / "rows.jsonl", "-o", "/proc/version", "--kind", "match",
                                               "--no-cache"], "/proc/version: cannot write"),
        ("probe onto a read-only file system", ["train", d / "rows.jsonl", d / "X.npy", "-o", "/proc/qprobe-probe",
                                                "--objective", "mse"], "/proc/qprobe-probe"),
        ("a corrupt cache file", ["reward", d / "rows.jsonl", "-o", d / "o.jsonl", "--kind", "match",
                                  "--cache-dir", d / "cache-bad"], "cache.sqlite: cache unusable"),
        ("a reward function that raises", ["reward", d / "rows.jsonl", "-o", d / "o.jsonl", "--kind",
                                           f"python:{d / 'raises.py'}:reward", "--no-cache"],
         "raised RuntimeError for row prompt_id="),
        ("a reward function returning 10**400", ["reward", d / "rows.jsonl", "-o", d / "o.jsonl", "--kind",
                                                 f"python:{d / 'raises.py'}:huge", "--no-cache"], "returned 1000"),
        ("a reward function returning nan", ["reward", d / "rows.jsonl", "-o", d / "o.jsonl", "--kind",
                                             f"python:{d / 'raises.py'}:nan", "--no-cache"], "returned nan"),
    ]


def test_malformed_inputs_end_in_one_line(work):
    failures = []
    for what, args, expect in _malformed(work):
        try:
            r = invoke(*args)
            line = one_line(r)
            if expect not in line:
                failures.append((what, line))
        except (AssertionError, Exception) as e:  # noqa: BLE001 - every case reported at once
            failures.append((what, repr(e)[:300]))
    assert not failures, "\n".join(map(str, failures))


# ------------------------------------------------------------------ questionable, decided
def test_outputs_respect_the_umask_and_keep_an_existing_mode(work):
    old = os.umask(0o027)
    try:
        assert rerank(work, work / "new.jsonl").exit_code == 0
        assert stat.S_IMODE(os.stat(work / "new.jsonl").st_mode) == 0o640
        (work / "old.jsonl").write_text("x\n")
        os.chmod(work / "old.jsonl", 0o604)
        assert rerank(work, work / "old.jsonl").exit_code == 0
        assert stat.S_IMODE(os.stat(work / "old.jsonl").st_mode) == 0o604
        assert invoke("train", work / "rows.jsonl", work / "X.npy", "-o", work / "Q", "--objective", "mse").exit_code == 0
        assert stat.S_IMODE(os.stat(work / "Q").st_mode) == 0o750
    finally:
        os.umask(old)


def test_where_compares_numbers_as_numbers_and_missing_fields_never_match(work):
    r = invoke("eval", work / "rows.jsonl", work / "X.npy", "--probe", work / "P", "--where", "reward=1", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["base_reward"] == 1.0  # stored as 1.0: matched by reward=1
    rows = rows_of()
    for r_ in rows[:4]:
        r_["split"] = "test"
    write_jsonl(work / "split.jsonl", rows)
    save_features(work / "S.npy", np.random.default_rng(0).standard_normal((24, 5)), rows, IDENT)
    line = one_line(invoke("eval", work / "split.jsonl", work / "S.npy", "--probe", work / "P", "--where", "split=None"))
    assert "no rows match" in line
    assert "has a field 'splt'" in one_line(invoke("eval", work / "split.jsonl", work / "S.npy", "--probe", work / "P",
                                                   "--where", "splt=test"))

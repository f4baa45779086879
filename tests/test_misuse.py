"""Misused commands: outputs that name an input, special files, absurd limits, features without a
sidecar, malformed inputs, concurrent saves, forged rewards. Each is refused with one line (or handled
as documented) and no input is destroyed.

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
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qprobe.cli import cli
from qprobe.errors import QProbeError
from qprobe.io import load_features, read_jsonl, save_features, write_jsonl
from qprobe.testing.misuse import (TOY_EXTRACTOR, forged_rewards, misuse_rows, misuse_setup, private_device,
                                   run_misuse_cases)

IDENT = TOY_EXTRACTOR
rows_of = misuse_rows


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
    """rows.jsonl, X.npy (+ sidecar) and a ridge probe P/."""
    misuse_setup(tmp_path)
    return tmp_path


def rerank(work, out, *extra):
    return invoke("rerank", work / "rows.jsonl", work / "X.npy", "--probe", work / "P", "-o", out, *extra)


# ------------------------------------------------------------------ an output that is an input
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


# ------------------------------------------------------------------ special files are written through
def test_a_null_device_and_a_symlink_to_it_stay_devices(work):
    null = private_device(work / "null", 3)  # never the system's /dev/null: a regression would replace it
    if null is None:
        pytest.skip("cannot make a device node here")
    assert rerank(work, null).exit_code == 0
    os.symlink(null, work / "null-link")
    assert rerank(work, work / "null-link").exit_code == 0
    assert stat.S_ISCHR(os.lstat(null).st_mode) and (work / "null-link").is_symlink()


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
    null = private_device(work / "null", 3)
    if null is not None:
        with pytest.raises(QProbeError, match="regular file"):
            save_features(null, np.zeros((len(rows), 2)), rows, IDENT)
        assert stat.S_ISCHR(os.lstat(null).st_mode) and not (work / "null.json").exists()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(work / "sock"))
    try:
        assert "special file" in one_line(rerank(work, work / "sock"))
    finally:
        s.close()


# ------------------------------------------------------------------ limits at the flag; sandbox failures
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
                    workers=1, progress=False, timeout=120)  # a loaded machine must not turn it into "timeout"
    assert len(Cache(tmp_path / "cache")) == 0 and not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------ features without their sidecar
def test_a_bare_npy_is_refused_unless_vouched_for(work):
    X, _ = load_features(work / "X.npy")
    np.save(work / "bare.npy", X[::-1])  # rows reversed, no sidecar: would silently mislead
    line = one_line(invoke("eval", work / "rows.jsonl", work / "bare.npy", "--probe", work / "P"))
    assert "bare.npy" in line and "--features-unchecked" in line
    r = invoke("eval", work / "rows.jsonl", work / "bare.npy", "--probe", work / "P", "--features-unchecked")
    assert r.exit_code == 0, r.stderr
    for cmd in ("train", "rerank", "eval"):
        assert "--features-unchecked" in invoke(cmd, "--help").stdout


# ------------------------------------------------------------------ regex reward with a time limit
def test_a_catastrophic_regex_times_out_instead_of_hanging(tmp_path):
    rows = [{"prompt_id": "a", "prompt": "p", "sample": 0, "completion": "a" * 40, "reference": "(a|aa)+b"},
            {"prompt_id": "a", "prompt": "p", "sample": 1, "completion": "ab", "reference": "(a|aa)+b"}]
    write_jsonl(tmp_path / "c.jsonl", rows)
    r = invoke("reward", tmp_path / "c.jsonl", "-o", tmp_path / "o.jsonl", "--kind", "regex", "--timeout", "0.5",
               "--no-cache")
    assert r.exit_code == 0, r.stderr  # it returns at all: before, it never did
    out = read_jsonl(tmp_path / "o.jsonl")
    assert [(o["reward"], o["reward_reason"]) for o in out] == [(0.0, "timeout"), (1.0, "match")]


# ------------------------------------------------------------------ two saves into one folder
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


# ------------------------------------------------------------------ .gz outputs are gzip
def test_a_gz_output_is_gzip_and_reads_back(work):
    r = invoke("reward", work / "rows.jsonl", "-o", work / "out.jsonl.gz", "--kind", "match", "--no-cache")
    assert r.exit_code == 0, r.stderr
    with gzip.open(work / "out.jsonl.gz", "rt") as f:
        assert len(f.read().splitlines()) == 24
    assert len(read_jsonl(work / "out.jsonl.gz")) == 24


# ------------------------------------------------------------------ malformed inputs: one line each
def test_every_misuse_case_is_refused_with_one_line_and_no_input_is_destroyed(tmp_path):
    """The fault report's misuse cases (ids, huge ints, deep JSON, surrogates, bad sidecars and probe
    configs, string/structured features, bad seeds, full/read-only/impossible outputs, a corrupt cache,
    a raising or absurd user reward, plus the classes above), as `experiments/fault_report.py` counts them."""
    res = run_misuse_cases(tmp_path / "misuse", forgeries=False)
    bad = [(e["what"], e["line"]) for e in res["entries"] if not e["ok"]]
    assert not bad, "\n".join(map(str, bad))
    assert sum(e["class"] == "malformed" for e in res["entries"]) >= 20
    assert res["destroyed"] == [] and res["inputs_watched"] > 30


@pytest.mark.slow
def test_no_forgery_scores_a_reward():
    """Completions that try to print the token or exit early without passing: none scores 1.0."""
    res = forged_rewards(timeout=30)
    assert not [f["what"] for f in res if f["forged"] and not f["known_limit"]]
    assert not [f for f in res if not f["known_limit"] and f["reason"] == "timeout"]  # a real outcome each


# ------------------------------------------------------------------ file modes and --where matching
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

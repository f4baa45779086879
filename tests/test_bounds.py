"""Values without bounds and tracebacks where one line belongs (issue 24): the CLI's numbers, the loop's
state file, a guide probe's layer and pooling, the server's key file, and a cache file that is not qprobe's.

No model is loaded, except the tiny random model for the guide's layer check (slow lane).
"""
from __future__ import annotations

import json
import os
import sqlite3
import stat

import click
import numpy as np
import pytest
from click.testing import CliRunner

from qprobe.cli import Finite, cli
from qprobe.errors import QProbeError
from qprobe.loop import argmax_pass1, run_loop


def run(*args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


def one_line_error(r) -> str:
    assert r.exit_code in (1, 2) and "Traceback" not in r.output, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


# ------------------------------------------------------------------ every float flag is finite
def _params():
    for name, cmd in cli.commands.items():
        for sub in (cmd.commands.values() if isinstance(cmd, click.Group) else [cmd]):
            for p in sub.params:
                yield f"{name} {sub.name} {p.opts[-1]}", p


def test_every_float_option_refuses_nan_and_inf():
    loose = [where for where, p in _params() if isinstance(p.type, click.FloatRange) and not isinstance(p.type, Finite)
             or p.type is click.FLOAT]
    assert loose == []


@pytest.mark.parametrize("args", [
    ["serve", "--probe", "P", "--beta", "nan"], ["serve", "--probe", "P", "--beta", "inf"],
    ["serve", "--probe", "P", "--temperature", "nan"], ["serve", "--probe", "P", "--top-p", "nan"],
    ["serve", "--probe", "P", "--request-timeout", "inf"], ["serve", "--probe", "P", "--deadline", "nan"],
    ["loop", "r", "f", "--state", "s", "--rounds", "1", "--label-budget", "1", "--explore", "nan"],
    ["loop", "r", "f", "--state", "s", "--rounds", "1", "--label-budget", "1", "--seed", "-5"],
    ["sample", "p", "-o", "o", "--branch", "99999999999999999999"],
    ["sample", "p", "-o", "o", "--branch", "65"],
])
def test_flags_out_of_range_are_one_line_usage_errors(args):
    r = run(*args)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "Invalid value" in one_line_error(r)


def test_guide_branch_is_bounded_in_the_library_too():
    from qprobe.samplers.guide import MAX_BRANCH, Guide

    with pytest.raises(QProbeError, match="--branch"):
        Guide(_prefix_probe(8, "m", 1, "last"), "m", branch=MAX_BRANCH + 1)


# ------------------------------------------------------------------ the loop's state file
def _pool(n_prompts=12, k=4, d=5):
    rs = np.random.default_rng(0)
    X = rs.normal(size=(n_prompts * k, d))
    y = (X[:, 0] > 0.5).astype(float)
    g = np.repeat(np.arange(n_prompts), k)
    return X, y, g, g < n_prompts // 2


def _loop(path, rounds=1):
    X, y, g, pool = _pool()
    return run_loop(X, g, pool, lambda q: {"pass1": argmax_pass1(q[~pool], y[~pool], g[~pool])}, lambda i: y[i],
                    path, rounds, 3, rule="greedy")


@pytest.mark.parametrize("edit, says", [
    (lambda s: [s], "not a loop state"),
    (lambda s: {"header": s["header"]}, "not a loop state"),
    (lambda s: {**s, "rounds": [{k: v for k, v in s["rounds"][0].items() if k != "rewards"}]}, "missing rewards"),
    (lambda s: _round(s, rewards=[1.0]), "rewards must be 3 finite numbers"),
    (lambda s: _round(s, rows=[-1, 0, 1]), "row -1 is out of range"),
    (lambda s: _round(s, rows=[0, 1, 10**6]), "out of range"),
    (lambda s: _round(s, rows=["0", 1, 2]), "list of row numbers"),
    (lambda s: _round(s, rows=[0, 1, 47]), "row 47 is not in the pool"),  # a held-out row
    (lambda s: _round(s, rows=[0, 0, 1]), "labelled twice"),
    (lambda s: _round(s, labels=99), "labels 99"),
    (lambda s: _round(s, pass1="x"), "pass1 must be a finite number"),
])
def test_a_malformed_state_is_one_line_not_a_traceback(tmp_path, edit, says):
    path = tmp_path / "state.json"
    _loop(path)
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(QProbeError, match=says):
        _loop(path, 2)


def _round(s, **change):
    return {**s, "rounds": [{**s["rounds"][0], **change}]}


def test_a_deeply_nested_state_is_one_line(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(QProbeError, match="unreadable loop state"):
        _loop(path)


def test_a_valid_state_still_resumes(tmp_path):
    path = tmp_path / "state.json"
    first = _loop(path, 1)
    assert _loop(path, 2)[:1] == json.loads(json.dumps(first))


# ------------------------------------------------------------------ a guide probe's layer and pooling
def _prefix_probe(d, model, layer, pooling):
    from qprobe.probe import QProbe

    rng = np.random.default_rng(0)
    p = QProbe("mse", standardize=False).fit(rng.normal(size=(4, d)), rng.normal(size=4))
    p.embedder_, p.prefix_ = {"kind": "hf", "model": model, "layer": layer, "pooling": pooling}, True
    return p


def test_a_guide_with_pooling_max_is_refused_before_any_model_loads():
    from qprobe.samplers.guide import Guide

    with pytest.raises(QProbeError, match="pooling 'max'"):
        Guide(_prefix_probe(8, "m", 1, "max"), "m")


@pytest.mark.slow  # loads the tiny random model
def test_a_guide_layer_the_model_lacks_is_one_line(tiny_model_dir):
    from qprobe.samplers.base import SampleJob
    from qprobe.samplers.hf import HFSampler

    # refused when the guide's embedder is rebuilt, before any sampling, naming the layer
    with pytest.raises(QProbeError, match="layer 999") as e:
        s = HFSampler(tiny_model_dir, max_new_tokens=4, guide=_prefix_probe(64, tiny_model_dir, 999, "last"))
        list(s.sample_stream([SampleJob("hi", 0, 0)]))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ the server's key file
def test_a_key_file_that_is_not_utf8_is_one_line(tmp_path):
    key = tmp_path / "key"
    key.write_bytes(b"\xff\xfe\x00secret")
    assert "not UTF-8" in one_line_error(run("serve", "--probe", tmp_path / "none", "--api-key-file", key))


def test_a_world_readable_key_file_is_warned_about(tmp_path):
    key = tmp_path / "key"
    key.write_text("sk-serve\n")
    os.chmod(key, 0o644)
    r = run("serve", "--probe", tmp_path / "none", "--api-key-file", key)
    assert "can be read by every user" in r.stderr
    os.chmod(key, stat.S_IRUSR | stat.S_IWUSR)
    assert "can be read" not in run("serve", "--probe", tmp_path / "none", "--api-key-file", key).stderr


# ------------------------------------------------------------------ a cache file that is not qprobe's
def _foreign(path, table="notes", rows=(("a",), ("b",))):
    c = sqlite3.connect(path)
    c.execute(f"CREATE TABLE {table} (x TEXT)")
    c.executemany(f"INSERT INTO {table} VALUES (?)", rows)
    c.commit()
    c.close()


@pytest.mark.parametrize("table", ["notes", "kv"])
@pytest.mark.parametrize("command", [["size"], ["clear", "-y"]])
def test_a_foreign_sqlite_file_is_refused_and_left_as_it_was(tmp_path, table, command):
    _foreign(tmp_path / "cache.sqlite", table)
    before = (tmp_path / "cache.sqlite").read_bytes()
    line = one_line_error(run("cache", *command, "--cache-dir", tmp_path))
    assert "not a qprobe cache" in line
    assert (tmp_path / "cache.sqlite").read_bytes() == before and not (tmp_path / "cache.sqlite-wal").exists()


def test_a_symlink_to_a_foreign_file_is_refused(tmp_path):
    _foreign(tmp_path / "other.db")
    (tmp_path / "c").mkdir()
    os.symlink(tmp_path / "other.db", tmp_path / "c" / "cache.sqlite")
    assert "not a qprobe cache" in one_line_error(run("cache", "size", "--cache-dir", tmp_path / "c"))


def test_a_corrupt_cache_is_one_line(tmp_path):
    (tmp_path / "cache.sqlite").write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    assert "cache unusable" in one_line_error(run("cache", "size", "--cache-dir", tmp_path))


def test_qprobe_caches_old_and_new_are_accepted(tmp_path):
    from qprobe.cache import APPLICATION_ID, Cache

    c = sqlite3.connect(tmp_path / "cache.sqlite")  # a cache written before the mark
    c.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, kind TEXT, v BLOB)")
    c.execute("INSERT INTO kv VALUES ('a', 'json', '1')")
    c.commit()
    c.close()
    cache = Cache(tmp_path)
    assert cache.get_json(["a"]) == {"a": 1}
    assert cache._conn().execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    r = run("cache", "size", "--cache-dir", tmp_path)
    assert r.exit_code == 0 and "1 completions/rewards" in r.output

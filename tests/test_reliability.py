"""Reliability: kill -9 and resume, a faulty or dead server, hostile inputs, a shared cache.

The scenarios live in `qprobe/testing/` (experiments/fault_report.py prints their figures);
here each is run at a smaller size and its figures are asserted. The slow ones
start several CLI processes each and are marked `slow` (CI still runs them).

What counts as a finished call: a completion, embedding or reward whose result
reached the cache. An answer the server sent to a process killed before it could
cache it is not finished, and is asked for again (`redone`); a result that was in
the cache at the kill must never be asked for again (`repeated` == 0), and the
rerun must ask for exactly the missing ones (`extra_rerun` == 0).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from qprobe.cache import Cache
from qprobe.embedders.base import Embedder
from qprobe.errors import QProbeError
from qprobe.pipeline import reward_file
from qprobe.samplers.base import Sampler
from qprobe.testing.bad_files import empty_completions, hostile_inputs
from qprobe.testing.inputs import completion_rows, write_jsonl
from qprobe.testing.resume import kill_and_resume
from qprobe.testing.server_faults import concurrent_embeds, dead_server, faulty_server


# ------------------------------------------------------------------ kill -9 at several points, rerun
@pytest.mark.subprocess
@pytest.mark.parametrize("command", ["sample", "reward", "embed"])
def test_kill_9_then_rerun_gives_the_uninterrupted_output(tmp_path, command):
    r = kill_and_resume(command, tmp_path, n_rows=200, kill_at=(0.3, 0.8))
    assert r["final_rc"] == 0, r
    assert r["interrupted"] >= 1, r  # at least one kill landed mid-run
    assert r["identical"] and r["lost"] == 0 and r["duplicated"] == 0, r
    assert r["repeated"] == 0 and r["extra_rerun"] == 0, r  # no finished call was made again
    assert r["recovered"] == r["cached_at_kill"][-1] > 0, r
    if command == "reward":  # rewards are cached per chunk of rows: a kill loses less than one chunk
        import inspect

        from qprobe.pipeline import reward_file

        chunk = inspect.signature(reward_file).parameters["chunk"].default
        assert all(n % chunk == 0 for n in r["cached_at_kill"]) and r["redone"] < chunk * len(r["cached_at_kill"]), r


# ------------------------------------------------------------------ a faulty server
@pytest.mark.subprocess
@pytest.mark.parametrize("command", ["sample", "embed"])
def test_thirty_percent_faults_still_give_the_right_output(tmp_path, command):
    r = faulty_server(command, tmp_path, n_rows=80, rate=0.3)
    assert r["rc"] == 0 and r["correct"], r
    assert r["faults"] >= 5, r  # faults really happened
    assert r["requests"] > r["faults"]


@pytest.mark.subprocess
@pytest.mark.parametrize("command", ["sample", "embed"])
def test_server_down_for_good_one_error_work_kept_then_resume(tmp_path, command):
    r = dead_server(command, tmp_path, n_rows=40, die_after=6)
    assert r["rc"] == 1 and r["error"], r["stderr_tail"]  # one line, no traceback
    assert r["error"].startswith("Error: cannot reach API at http://127.0.0.1:") and "rerun to resume" in r["error"]
    assert r["wall_s"] < 30, r  # --max-retries 2
    per_answer = 1 if command == "sample" else 4  # k = 1 / --batch-size 4
    assert r["cached"] == 6 * per_answer and f"[{r['cached']} of 40 " in r["error"], r
    assert r["no_partial_output"], r  # outputs are written whole or not at all
    assert r["rerun_rc"] == 0 and r["rerun_asked"] == r["rerun_missing"] == 40 - r["cached"], r
    assert r["identical"] and r["lost"] == 0 and r["duplicated"] == 0, r


# ------------------------------------------------------------------ two runs sharing one cache
@pytest.mark.subprocess
def test_two_embeds_sharing_one_cache_directory(tmp_path):
    r = concurrent_embeds(tmp_path, n_rows=120)
    assert r["rc"] == [0, 0] and r["both_correct"] and not r["errors"], r
    assert r["cache_entries"] == r["distinct_inputs"], r
    assert r["distinct_inputs"] <= r["served"] <= sum(r["rows"]), r  # the overlap is embedded at most twice


def test_threads_sharing_one_cache_file(tmp_path):
    """Four writers and readers on one cache folder, each with its own `Cache` (as separate processes have)."""
    errors = []

    def work(t):
        try:
            c = Cache(tmp_path)
            for i in range(40):
                c.put_vectors({f"{t}-{i}": np.full(3, i, dtype=np.float32)})
                assert f"{t}-{i}" in c.get_vectors([f"{t}-{i}"])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(Cache(tmp_path)) == 160


# ------------------------------------------------------------------ hostile or broken input
def test_hostile_inputs_are_refused_with_one_line(tmp_path, tiny_model_dir):
    results = hostile_inputs(tmp_path, tiny_model_dir)
    bad = [(h["what"], h["line"]) for h in results if not h["ok"]]
    assert not bad, bad
    assert sum(h["expected"] == "refused" for h in results) >= 25
    assert not (tmp_path / "PWNED").exists()


def test_empty_completions_are_samples_not_errors(tmp_path, tiny_model_dir):
    """An empty completion is legitimate (the model may stop at once): each step gives a defined answer.

    code reward: 0.0, with the sandbox's reason (the tests cannot pass: nothing is
    defined); match: 1.0 against an empty reference; embedders: a finite vector
    (the API embeds the prompt text; the local model takes its last prompt token).
    """
    res = {r["step"]: r for r in empty_completions(tmp_path, tiny_model_dir)}
    assert res["reward code"]["rc"] == 0 and res["reward code"]["reward"] == 0.0
    assert res["reward code"]["reason"] and res["reward code"]["reason"] != "passed"  # today "failed: NameError ..."
    assert res["reward match"]["rc"] == 0 and res["reward match"]["reward"] == 1.0
    for step in ("embed api", "embed local"):
        assert res[step]["rc"] == 0 and res[step]["finite"] and res[step]["distinct"], res[step]


# ------------------------------------------------------------------ the machinery behind resume
class _Flaky(Embedder):
    """Batch `fail_at` raises; the others return their index as the feature."""

    concurrency = 3
    batch_size = 6

    def __init__(self, fail_at=None):
        self.fail_at, self.calls = fail_at, []

    def identity(self):
        return {"kind": "test"}

    def embed_batch(self, items):
        self.calls.append(len(items))
        if self.fail_at is not None and items[0][1] == self.fail_at:
            raise QProbeError("boom")
        return np.array([[float(c)] for _, c in items])


def test_concurrent_embed_batches_are_cached_one_by_one(tmp_path):
    items = [("p", f"{i:03d}") for i in range(30)]
    cache = Cache(tmp_path)
    with pytest.raises(QProbeError, match=r"^boom \[\d+ of 30 rows are cached; rerun to resume\]$"):
        _Flaky(fail_at="012").embed(items, cache=cache, progress=False)
    kept = len(cache)
    assert 0 < kept < 30 and kept % 2 == 0  # batches of 6 // 3 = 2 rows, each cached as it came back
    e = _Flaky()
    X = e.embed(items, cache=cache, progress=False)
    assert X[:, 0].tolist() == [float(i) for i in range(30)]
    assert sum(e.calls) == 30 - kept and set(e.calls) == {2}  # only the missing rows, in requests of 2


class _Grouped(Sampler):
    """Yields each prompt's results as one group, like one API request with n = k."""

    def identity(self):
        return {"kind": "test"}

    def sample_stream(self, jobs):
        by_prompt = {}
        for i, j in enumerate(jobs):
            by_prompt.setdefault(j.prompt, []).append(i)
        for p, idx in by_prompt.items():
            if p == "die":
                raise QProbeError("server gone")
            yield [(i, {"completion": f"{p}-{jobs[i].sample}", "finish_reason": "stop"}) for i in idx]


def test_sampler_caches_a_group_of_results_at_once(tmp_path):
    cache = Cache(tmp_path)
    rows = [{"prompt_id": 1, "prompt": "a"}, {"prompt_id": 2, "prompt": "die"}]
    with pytest.raises(QProbeError, match=r"^server gone \[3 of 6 completions are cached; rerun to resume\]$"):
        _Grouped().sample(rows, k=3, cache=cache, progress=False)
    assert len(cache) == 3
    out = _Grouped().sample(rows[:1], k=3, cache=cache, progress=False)
    assert [r["completion"] for r in out] == ["a-0", "a-1", "a-2"]


def test_reward_cache_works_from_an_empty_cache(tmp_path):
    """Regression: `cache or Cache.null()` dropped an empty (falsy) cache, so rewards were never cached."""
    src = tmp_path / "rows.jsonl"
    write_jsonl(src, completion_rows(10))
    cache = Cache(tmp_path / "cache")
    reward_file(src, tmp_path / "out.jsonl", "match:prompt_id", cache=cache, progress=False)
    assert len(cache) == 10 and bool(Cache.null())

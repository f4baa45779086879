"""The one cached, resumable map behind `sample`, `embed` and `reward` (qprobe/cachedmap.py)."""
import numpy as np
import pytest

from qprobe.cache import Cache
from qprobe.cachedmap import cached_map
from qprobe.errors import QProbeError
from qprobe.samplers.base import Sample


def squares(calls, fail_at=None, group=2):
    def compute(pending):
        calls.append(list(pending))
        for s in range(0, len(pending), group):
            part = pending[s : s + group]
            if fail_at is not None and fail_at in part:
                raise QProbeError("backend down")
            yield [(i, {"sq": i * i}) for i in part]
    return compute


def test_computes_each_missing_distinct_key_once_and_returns_all(tmp_path):
    keys = ["a", "b", "a", "c", "b"]
    calls = []
    found, n = cached_map(keys, squares(calls), Cache(tmp_path), progress=False)
    assert calls == [[0, 1, 3]] and n == 3  # the duplicates of a and b are not computed
    assert [found[k]["sq"] for k in keys] == [0, 1, 0, 9, 1]
    calls.clear()
    found2, n2 = cached_map(keys, squares(calls), Cache(tmp_path), progress=False)
    assert calls == [] and n2 == 0 and found2 == found  # all from the cache: the producer is not called


def test_failure_keeps_finished_groups_and_a_rerun_resumes(tmp_path):
    keys = [f"k{i}" for i in range(6)]
    calls = []
    with pytest.raises(QProbeError, match=r"backend down \[2 of 6 rows are cached; rerun to resume\]"):
        cached_map(keys, squares(calls, fail_at=3), Cache(tmp_path), progress=False)
    calls.clear()
    found, n = cached_map(keys, squares(calls), Cache(tmp_path), progress=False)
    assert calls == [[2, 3, 4, 5]] and n == 4  # the first group (0, 1) was committed before the failure
    assert [found[k]["sq"] for k in keys] == [0, 1, 4, 9, 16, 25]


def test_without_a_cache_the_error_is_unchanged():
    with pytest.raises(QProbeError, match=r"^backend down$"):
        cached_map(["a", "b", "c"], squares([], fail_at=0), None, progress=False)


def test_vectors_and_order(tmp_path):
    keys = ["x", "yyy", "zz"]
    seen = []

    def compute(pending):
        seen.extend(pending)
        yield [(i, np.full(2, float(i), np.float32)) for i in pending]

    found, _ = cached_map(keys, compute, Cache(tmp_path), vectors=True, progress=False, order=lambda i: len(keys[i]))
    assert seen == [0, 2, 1]  # shortest first
    assert np.array_equal(Cache(tmp_path).get_vectors({"zz"})["zz"], [2.0, 2.0])


def test_a_producer_that_skips_an_item_is_a_clear_error():
    def compute(pending):
        yield [(pending[0], 1)]

    with pytest.raises(RuntimeError, match="no value for 1 of its items"):
        cached_map(["a", "b"], compute, None, progress=False, desc="sample")


def test_plugin_dict_results_become_samples():
    s = Sample.of({"completion": "x", "finish_reason": "stop", "n_tokens": 1})
    assert s.row() == {"completion": "x", "finish_reason": "stop", "n_tokens": 1}
    with pytest.raises(QProbeError, match="without a 'completion'"):
        Sample.of({"text": "x"})

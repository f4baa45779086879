"""qprobe.pool: results as they finish; the first error stops new calls and is raised after running ones."""
from __future__ import annotations

import threading
import time

import pytest

from qprobe.pool import Stopped, TaskPool, map_unordered


def test_map_unordered_returns_every_result():
    assert sorted(map_unordered(lambda x: x * x, ((i, i) for i in range(20)), 4)) == [(i, i * i) for i in range(20)]
    assert list(map_unordered(lambda x: -x, [("a", 1), ("b", 2)], 1)) == [("a", -1), ("b", -2)]


def test_first_error_cancels_the_rest_and_running_calls_are_still_yielded():
    started, release = [], threading.Event()

    def call(i):
        started.append(i)
        if i == 0:
            raise ValueError("row 0 is bad")
        if i == 1:  # running when 0 fails: it finishes and its result is yielded
            release.wait(2)
            return i
        return i

    got = []
    with pytest.raises(ValueError, match="row 0 is bad"):
        with TaskPool(2) as pool:
            for i in range(50):
                pool.submit(i, call, i)
            for tag, result in pool.results():
                got.append(tag)
                release.set()
            assert pool.stop.is_set()
    assert len(started) < 50  # calls queued behind the failure never ran
    assert 1 in got


def test_a_stopped_sibling_does_not_hide_the_real_error():
    def call(args):
        i, stop = args
        if i == 0:
            time.sleep(0.05)
            raise RuntimeError("server gone")
        stop.wait(5)
        raise Stopped("gave up")

    with pytest.raises(RuntimeError, match="server gone"):
        with TaskPool(3) as pool:
            for i in range(3):
                pool.submit(i, call, (i, pool.stop))
            list(pool.results())

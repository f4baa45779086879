"""The one thread pool: run calls on a few threads, yield results as they finish, cancel on the first error.

Used by every step that works on several things at once: API requests (samplers and
embedders over HTTP), embedding batches of a backend with ``concurrency`` > 1, and
reward programs. It is `concurrent.futures` plus the one policy they all need:

- the first failure sets `stop` (calls that poll it, like API retry loops, give up at
  once), cancels calls not yet started, and is raised after the calls already running
  have finished and their results have been yielded, so work finished before the
  failure still reaches the caller's cache;
- leaving the ``with`` block early (an exception in the caller, Ctrl-C) releases the
  threads without waiting for calls that have not started.

It does not retry, cache or print.
"""
from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterable, Iterator


class Stopped(Exception):
    """Raised by a call that gave up because `TaskPool.stop` was set (a sibling failed first)."""


class TaskPool:
    """Run calls on `workers` threads and yield (tag, result) as each finishes.

    Use as a context manager::

        with TaskPool(4) as pool:
            for tag, x in items:
                pool.submit(tag, fn, x)
            for tag, result in pool.results():
                ...
    """

    def __init__(self, workers: int, name: str = "qprobe"):
        self.stop = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix=name)
        self._futures: dict = {}  # future -> caller's tag
        self._errors: list[BaseException] = []

    def submit(self, tag: Any, fn: Callable, *args: Any) -> None:
        """Queue ``fn(*args)``; its result comes back from `results` paired with `tag` (nothing after a failure)."""
        if not self.stop.is_set():
            self._futures[self._executor.submit(fn, *args)] = tag

    def results(self) -> Iterator[tuple[Any, Any]]:
        """Yield (tag, result) as calls finish, including calls submitted meanwhile; then raise the first error."""
        while self._futures:
            done, _ = wait(list(self._futures), return_when=FIRST_COMPLETED)
            for fut in done:
                tag = self._futures.pop(fut)
                if fut.cancelled():
                    continue
                err = fut.exception()
                if err is None:
                    yield tag, fut.result()
                    continue
                self._errors.append(err)
                if not self.stop.is_set():
                    self.stop.set()
                    for other in self._futures:
                        other.cancel()
        real = [e for e in self._errors if not isinstance(e, Stopped)]
        if real:
            raise real[0]
        if self._errors:  # pragma: no cover - a Stopped implies a real error first
            raise self._errors[0]

    def __enter__(self) -> "TaskPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self._executor.shutdown(wait=False, cancel_futures=True)


def map_unordered(fn: Callable, items: Iterable[tuple[Any, Any]], workers: int,
                  name: str = "qprobe") -> Iterator[tuple[Any, Any]]:
    """``(tag, fn(x))`` for every ``(tag, x)``, `workers` at a time, as each finishes (see `TaskPool`).

    With one worker the calls run in this thread, in order.
    """
    if workers <= 1:
        for tag, x in items:
            yield tag, fn(x)
        return
    with TaskPool(workers, name) as pool:
        for tag, x in items:
            pool.submit(tag, fn, x)
        yield from pool.results()

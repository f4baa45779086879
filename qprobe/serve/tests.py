"""The tests a `serve` request may carry, run in the sandbox against each candidate before the probe chooses.

A request names them as ``tests`` (the openai client sends
``extra_body={"tests": [...]}``): a list of assert statements, or one string of
Python run after the candidate's code. `check_tests` bounds their count and
size (400 otherwise); `run_tests` runs each candidate's program through
`qprobe.rewards.code.code_reward`, so the sandbox, its time limit, its process
limit and its anti-forgery token apply unchanged, on at most `workers` threads
per request. A candidate's outcome is ``{"passed": bool, "reason": str}``.

Not here: how outcomes steer the choice (`rerank.choose_preferring`).
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from qprobe.serve.protocol import ServeError


def check_tests(tests, max_tests: int, max_chars: int) -> list[str] | str | None:
    """The request's tests, checked: None, a list of at most `max_tests` strings, or one string."""
    if tests is None:
        return None
    if isinstance(tests, str):
        items = [tests]
    elif isinstance(tests, list) and all(isinstance(t, str) for t in tests):
        items = tests
        if len(tests) > max_tests:
            raise ServeError(400, f"tests has {len(tests)} entries; this server takes at most {max_tests}",
                             param="tests")
    else:
        raise ServeError(400, "tests must be a list of strings (assert statements) or a string of code",
                         param="tests")
    size = sum(len(t) for t in items)
    if size > max_chars:
        raise ServeError(413, f"tests have {size} characters; this server takes at most {max_chars}",
                         code="tests_too_large", param="tests")
    return tests


def _one(text: str, tests, timeout: float) -> dict:
    from qprobe.errors import QProbeError
    from qprobe.rewards.code import code_reward

    try:
        reward, reason = code_reward({"completion": text, "request_tests": tests}, timeout,
                                     tests_field="request_tests")
    except QProbeError as e:  # e.g. no working sandbox: the candidate is not counted as passing
        return {"passed": False, "reason": f"not run: {e}"}
    return {"passed": reward == 1.0, "reason": reason}


async def run_tests(texts: list[str], tests, timeout: float, workers: int) -> list[dict]:
    """Each candidate's outcome on `tests`, in candidate order (at most `workers` programs at once).

    A cancelled request (client gone, deadline) stops starting programs; the ones
    running end at their own `timeout`.
    """
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(texts))), thread_name_prefix="qprobe-serve-tests")
    try:
        futures = [loop.run_in_executor(pool, _one, t, tests, timeout) for t in texts]
        return list(await asyncio.gather(*futures))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)

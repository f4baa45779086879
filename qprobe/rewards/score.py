"""Pick a reward by name and score many rows in parallel.

``kind`` names, as used by the CLI and :func:`get_reward_fn`:

``code``            run completion + tests in the sandbox (see ``code.py``)
``match``           exact match against ``row["reference"]``
``match:FIELD``     exact match against ``row[FIELD]``
``regex``           ``row["reference"]`` must fullmatch the completion
``regex:FIELD``     the same with ``row[FIELD]``
``python:MOD:FN``   a user's function ``FN(row)`` from module ``MOD`` (or a
                    ``path/file.py``), returning a float or (float, reason)

It does not read or write files; rows come in as dicts and rewards go out as
a list aligned with them.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Iterable

from qprobe.errors import QProbeError
from qprobe.rewards.code import code_reward
from qprobe.rewards.sandbox import sandbox_backend
from qprobe.rewards.simple import RewardFn, load_python_reward, match_reward, regex_reward

KINDS = ("code", "match", "match:FIELD", "regex", "regex:FIELD", "python:MODULE:FN")


def get_reward_fn(kind: str, *, timeout: float = 3.0) -> RewardFn:
    """The reward function named by ``kind``.

    Parameters
    ----------
    kind : str
        One of ``code``, ``match[:FIELD]``, ``regex[:FIELD]``,
        ``python:MODULE:FN``.
    timeout : float
        Seconds per program (``code``) or per match (``regex``).

    Returns
    -------
    callable
        ``row -> (reward: float, reason: str)``.

    Raises
    ------
    QProbeError
        Unknown kind, or a ``python:`` module that cannot be imported.
    """
    name, _, arg = kind.partition(":")
    if name == "code" and not arg:
        return functools.partial(code_reward, timeout=timeout)
    if name == "match":
        return functools.partial(match_reward, field=arg) if arg else match_reward
    if name == "regex":
        return functools.partial(regex_reward, field=arg or "reference", timeout=timeout)
    if name == "python" and arg:
        return load_python_reward(arg)
    raise QProbeError(f"unknown reward kind {kind!r}; expected one of {', '.join(KINDS)}")


def score_rows(rows: Iterable[dict], kind: str, workers: int | None = None,
               timeout: float = 3.0, progress: bool = True) -> list[tuple[float, str]]:
    """Reward every row, several at a time.

    Parameters
    ----------
    rows : iterable of dict
        Completion rows (``completion`` plus whatever ``kind`` needs).
    kind : str
        See :func:`get_reward_fn`.
    workers : int or None
        Rows scored at once (threads; ``code`` runs each in its own sandboxed
        process). None: ``os.cpu_count()``. 1: in this thread.
    timeout : float
        Seconds per program (``code``) or per match (``regex``).
    progress : bool
        Show a tqdm bar on stderr.

    Returns
    -------
    list of (float, str)
        ``(reward, reason)`` per row, in input order.

    Raises
    ------
    QProbeError
        Bad kind, or a row the reward cannot score (it names the row); the
        first such error stops the batch.
    """
    from tqdm.auto import tqdm  # imported here: keep `import qprobe` light

    rows = list(rows)
    fn = get_reward_fn(kind, timeout=timeout)
    if kind == "code":
        sandbox_backend()  # fail fast (and probe once) before starting threads
    workers = max(1, workers or os.cpu_count() or 1)
    results: list[tuple[float, str] | None] = [None] * len(rows)
    with tqdm(total=len(rows), desc=f"reward {kind}", unit="row", disable=not progress) as bar:
        if workers == 1 or len(rows) <= 1:
            for i, row in enumerate(rows):
                results[i] = fn(row)
                bar.update()
            return results
        with ThreadPoolExecutor(max_workers=min(workers, len(rows))) as pool:
            index = {pool.submit(fn, row): i for i, row in enumerate(rows)}  # future -> row index
            pending = set(index)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    if fut.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise fut.exception()
                    results[index[fut]] = fut.result()
                    bar.update()
    return results

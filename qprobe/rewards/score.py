"""Pick a reward by name and score many rows in parallel.

``kind`` names, as used by the CLI and :func:`get_reward_fn`:

``code``            run completion + tests in the sandbox (see ``code.py``)
``match``           exact match against ``row["reference"]``
``match:FIELD``     exact match against ``row[FIELD]``
``regex``           ``row["reference"]`` must fullmatch the completion
``regex:FIELD``     the same with ``row[FIELD]``
``python:MOD:FN``   a user's function ``FN(row)`` from module ``MOD`` (or a
                    ``path/file.py``), returning a float or (float, reason)

Kinds are found through the ``qprobe.rewards`` entry-point group (see
``qprobe.registry``): a plugin adds ``NAME = module:factory``, called as
``factory(arg, timeout=...)`` and returning ``row -> (float, str)``.

It does not read or write files; rows come in as dicts and rewards go out as
a list aligned with them.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

from qprobe.errors import QProbeError
from qprobe.pool import map_unordered
from qprobe.registry import REWARDS, available, distribution, load

RewardFn = Callable[[dict], "tuple[float, str]"]
# bump when a built-in reward can change for the same row (cached scores of older versions are not reused)
REWARDS_VERSION = 2
KINDS = ("code", "match", "match:FIELD", "regex", "regex:FIELD", "python:MODULE:FN")  # the built-ins


def _check_kind(kind: str) -> tuple[str, str]:
    name, _, arg = kind.partition(":")
    if name not in available(REWARDS):
        names = sorted(set(available(REWARDS)) - {"code", "match", "regex", "python"})
        raise QProbeError(f"unknown reward kind {kind!r}; expected one of {', '.join(KINDS + tuple(names))}")
    return name, arg


def reward_identity(kind: str, *, timeout: float = 3.0) -> dict:
    """Everything besides the row that decides a reward's score: the reward half of its cache key.

    Every kind records itself (name and argument), ``timeout`` and `REWARDS_VERSION`. A kind
    from a plugin also records the version of the distribution that registers it
    (``"qprobe-toy==0.1.0"``), so upgrading the plugin retires its cached scores. A factory
    may add its own part through an ``identity(arg, *, timeout)`` attribute: ``python:``
    adds a hash of its module's source file, so editing the function retires them too.

    Parameters
    ----------
    kind, timeout
        As for :func:`get_reward_fn`.

    Returns
    -------
    dict
        JSON-able; equal dicts mean a cached score may be reused.
    """
    name, arg = _check_kind(kind)
    identity = {"reward": kind, "timeout": timeout, "version": REWARDS_VERSION}
    dist = distribution(REWARDS, name)
    if dist is not None:
        identity["plugin"] = dist
    own = getattr(load(REWARDS, name), "identity", None)
    if callable(own):
        identity.update(own(arg, timeout=timeout))
    return identity


def get_reward_fn(kind: str, *, timeout: float = 3.0) -> RewardFn:
    """The reward function named by ``kind``.

    Parameters
    ----------
    kind : str
        ``NAME`` or ``NAME:ARG``, NAME registered in the ``qprobe.rewards`` entry-point
        group: built-ins ``code``, ``match[:FIELD]``, ``regex[:FIELD]``,
        ``python:MODULE:FN``, or a plugin's.
    timeout : float
        Seconds per program (``code``) or per match (``regex``); passed to every factory.

    Returns
    -------
    callable
        ``row -> (reward: float, reason: str)``.

    Raises
    ------
    QProbeError
        Unknown kind, or a ``python:`` module that cannot be imported.
    """
    name, arg = _check_kind(kind)
    fn = load(REWARDS, name)(arg, timeout=timeout)
    if not callable(fn):
        raise QProbeError(f"reward kind {name!r}: its factory returned {type(fn).__name__}, not a function")
    return fn


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
    fn = get_reward_fn(kind, timeout=timeout)  # `code` checks its sandbox here, before any thread starts
    workers = max(1, min(workers or os.cpu_count() or 1, len(rows)))
    results: list[tuple[float, str] | None] = [None] * len(rows)
    with tqdm(total=len(rows), desc=f"reward {kind}", unit="row", disable=not progress) as bar:
        # the first row that cannot be scored stops the batch (qprobe.pool: no new row starts)
        for i, result in map_unordered(fn, enumerate(rows), workers, "qprobe-reward"):
            results[i] = result
            bar.update()
    return results

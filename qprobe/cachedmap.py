"""The one cached, resumable map: `sample`, `embed` and `reward` all run through `cached_map`.

Each step has items with a cache key (the producer's identity + the exact input) and a way
to compute values for a list of missing items. This module does the rest, once:

- looks every key up first and computes each missing distinct key once (duplicates share it);
- commits each group of results the producer hands back in one cache transaction as soon as
  it arrives, so a run killed at any moment keeps everything finished and resumes there;
- shows one progress bar that starts at the cached count;
- on a `QProbeError` from the producer, adds how many items are cached and that a rerun
  resumes, then raises it (groups finished before the error are already committed).

The producer decides batching and concurrency (one model batch, one API request with n > 1,
a chunk of reward programs on the one pool in `qprobe.pool`); it never sees the cache.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from tqdm.auto import tqdm

from qprobe.cache import Cache, NullCache
from qprobe.errors import QProbeError

Group = Sequence[tuple[int, Any]]  # (item index, value) pairs committed together


def cached_map(
    keys: Sequence[str],
    compute: Callable[[list[int]], Iterable[Group]],
    cache: Cache | None = None,
    *,
    vectors: bool = False,
    desc: str = "",
    unit: str = "row",
    progress: bool = True,
    order: Callable[[int], Any] | None = None,
    leave: bool = True,
) -> tuple[dict[str, Any], int]:
    """Values for every key, computing only those missing from `cache`.

    keys
        One cache key per item; equal keys are computed once.
    compute(pending)
        Gets the item indices to compute (one per missing distinct key, sorted by `order`
        when given) and yields groups of ``(item index, value)`` as they finish, in any order.
    vectors
        Values are float32 vectors (`Cache.put_vectors`) rather than JSON.

    Returns ``({key: value} for every key, number of items computed in this call)``.
    """
    cache = cache if cache is not None else NullCache()
    get, put = (cache.get_vectors, cache.put_vectors) if vectors else (cache.get_json, cache.put_json)
    found = get(set(keys))
    first: dict[str, int] = {}  # missing key -> first item needing it
    need: dict[str, int] = {}  # missing key -> items waiting for it (for the progress bar)
    for i, key in enumerate(keys):
        if key not in found:
            first.setdefault(key, i)
            need[key] = need.get(key, 0) + 1
    pending = sorted(first.values(), key=order) if order else list(first.values())
    n_cached = len(keys) - sum(need.values())
    computed = 0
    with tqdm(total=len(keys), initial=n_cached, desc=desc, unit=unit, disable=not progress, leave=leave) as bar:
        try:
            for group in compute(pending) if pending else ():
                new = {keys[i]: value for i, value in group}
                put(new)
                found.update(new)
                computed += len(new)
                n = sum(need.pop(k, 0) for k in new)
                n_cached += n
                bar.update(n)
        except QProbeError as e:
            if n_cached and not isinstance(cache, NullCache):
                raise QProbeError(f"{e} [{n_cached} of {len(keys)} {unit}s are cached; rerun to resume]") from None
            raise
    missing = [k for k in keys if k not in found]
    if missing:  # a producer bug, not a user error: say so rather than KeyError later
        raise RuntimeError(f"{desc}: the producer returned no value for {len(set(missing))} of its items")
    return found, computed


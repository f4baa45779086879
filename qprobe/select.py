"""Choose one completion per prompt from probe scores, and measure the choice.

Each prompt (a *group*) has k candidate rows scored by a probe, ``q``. This
module turns the scores into selection weights ``softmax(q / beta)`` within
each group (one-hot argmax at ``beta = 0``), draws or takes the chosen row, and
reports the diagnostics the paper cares about: expected reward of the choice,
KL divergence from uniformly picking one of the k samples (the base policy),
the best-of-k KL bound and the effective sample size.

Everything here is pure numpy on in-memory arrays: no torch, no files, no
printing. Groups are any hashable labels (ints, strings); a group's rows need
not be contiguous. Results per group are returned in the order in which the
groups first appear in ``groups``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from qprobe.errors import QProbeError


class GroupIndex(NamedTuple):
    """Rows sorted by group, computed once and reused by every function here.

    Attributes
    ----------
    labels : ndarray of shape (n_groups,)
        Group labels in order of first appearance.
    codes : ndarray of shape (n_rows,)
        Group number (0 .. n_groups-1, first-appearance order) of each row.
    order : ndarray of shape (n_rows,)
        Row indices sorted by group; within a group by row index.
    starts : ndarray of shape (n_groups,)
        Position in ``order`` where each group begins.
    sizes : ndarray of shape (n_groups,)
        Number of rows in each group.
    """

    labels: np.ndarray
    codes: np.ndarray
    order: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray


def group_index(groups) -> GroupIndex:
    """Index rows by group label.

    Parameters
    ----------
    groups : array-like of shape (n_rows,)
        Any hashable labels; rows of a group need not be contiguous.

    Returns
    -------
    GroupIndex
    """
    try:
        g = np.asarray(groups)
    except ValueError:  # e.g. tuples of different lengths
        g = None
    if (g is None or g.ndim != 1) and not isinstance(groups, np.ndarray) and hasattr(groups, "__len__"):
        g = np.fromiter(groups, dtype=object, count=len(groups))  # tuple labels stay whole
    if g.ndim != 1:
        raise QProbeError(f"groups must be 1-D with one label per row, got shape {g.shape}")
    if g.size == 0:
        raise QProbeError("groups is empty: need at least one row")
    try:
        uniq, first, inverse = np.unique(g, return_index=True, return_inverse=True)
    except TypeError:  # mixed label types numpy cannot sort: factorise in python
        seen: dict = {}  # label -> group number
        inverse = np.fromiter((seen.setdefault(x, len(seen)) for x in g.tolist()), dtype=np.int64, count=g.size)
        uniq = np.empty(len(seen), dtype=object)
        uniq[:] = list(seen)
        first = np.full(len(seen), g.size, dtype=np.int64)
        np.minimum.at(first, inverse, np.arange(g.size))
    # renumber groups by first appearance
    by_first = np.argsort(first, kind="stable")
    rank = np.empty_like(by_first)
    rank[by_first] = np.arange(by_first.size)
    codes = rank[inverse.reshape(-1)]
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes, minlength=by_first.size)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    return GroupIndex(uniq[by_first], codes, order, starts, sizes)


def _as_gi(groups, n_rows: int) -> GroupIndex:
    gi = groups if isinstance(groups, GroupIndex) else group_index(groups)
    if gi.codes.shape[0] != n_rows:
        raise QProbeError(f"groups has {gi.codes.shape[0]} labels but there are {n_rows} rows")
    return gi


def _check_q(q, name: str = "q") -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 1:
        raise QProbeError(f"{name} must be 1-D with one value per row, got shape {q.shape}")
    if not np.isfinite(q).all():
        raise QProbeError(f"{name} contains NaN or infinite values")
    return q


def _check_beta(beta) -> float:
    beta = float(beta)
    if not beta >= 0:  # also catches NaN
        raise QProbeError(f"beta must be >= 0, got {beta}")
    return beta


def _check_candidates(candidates, gi: GroupIndex) -> np.ndarray | None:
    if candidates is None:
        return None
    m = np.asarray(candidates, dtype=bool).reshape(-1)
    if m.shape[0] != gi.codes.shape[0]:
        raise QProbeError(f"candidates has {m.shape[0]} values but there are {gi.codes.shape[0]} rows")
    if not (np.add.reduceat(m[gi.order].astype(np.int64), gi.starts) > 0).all():
        raise QProbeError("candidates leaves a group with no row (a cascade keeps at least one per group)")
    return m


def softmax_weights(q, groups, beta: float, candidates=None) -> np.ndarray:
    """Selection weights ``softmax(q / beta)`` within each group.

    Parameters
    ----------
    q : array-like of shape (n_rows,)
        Probe scores.
    groups : array-like of shape (n_rows,) or GroupIndex
        Prompt label of each row.
    beta : float
        Temperature, >= 0. ``0`` gives a one-hot argmax (ties go to the lowest
        row index); ``inf`` gives uniform weights.
    candidates : array-like of bool, shape (n_rows,), optional
        Rows that may be chosen (a cascade, :func:`qprobe.signals.cascade_mask`); the
        others get weight 0. Every group needs at least one. Default: all rows.

    Returns
    -------
    weights : ndarray of shape (n_rows,)
        Non-negative; the weights of each group sum to 1.
    """
    q = _check_q(q)
    beta = _check_beta(beta)
    gi = _as_gi(groups, q.shape[0])
    mask = _check_candidates(candidates, gi)
    if mask is not None:
        q = np.where(mask, q, -np.inf)  # exp(-inf) = 0; never a group's max (each group has a candidate)
    qs = q[gi.order]
    gmax = np.maximum.reduceat(qs, gi.starts)
    rep = np.repeat(np.arange(gi.sizes.size), gi.sizes)  # sorted position -> group number
    if beta == 0:
        pos = np.arange(qs.size)
        # first position (= lowest row index, order is stable) holding the group max
        cand = np.where(qs == gmax[rep], pos, qs.size)
        ws = np.zeros(qs.size)
        ws[np.minimum.reduceat(cand, gi.starts)] = 1.0
    else:
        with np.errstate(invalid="ignore"):  # -inf / inf (a non-candidate at beta = inf): weight 0 below
            e = np.exp((qs - gmax[rep]) / beta)  # max term is exp(0) = 1: no overflow, sum >= 1
        e = np.where(np.isneginf(qs), 0.0, e)
        ws = e / np.add.reduceat(e, gi.starts)[rep]
    w = np.empty_like(ws)
    w[gi.order] = ws
    return w


def select_indices(q, groups, beta: float, random_state=None, return_labels: bool = False, candidates=None):
    """One chosen row per group: drawn from ``softmax(q / beta)``, or argmax at 0.

    Parameters
    ----------
    q : array-like of shape (n_rows,)
        Probe scores.
    groups : array-like of shape (n_rows,) or GroupIndex
        Prompt label of each row.
    beta : float
        Temperature, >= 0; ``0`` takes the argmax (ties to the lowest row index).
    random_state : None, int or numpy.random.Generator / RandomState
        Source of the draws when ``beta > 0``.
    return_labels : bool, default False
        Also return the group labels the indices belong to.
    candidates : array-like of bool, shape (n_rows,), optional
        Rows that may be chosen (see :func:`softmax_weights`).

    Returns
    -------
    indices : ndarray of int64, shape (n_groups,)
        Row index chosen in each group, groups in order of first appearance.
    labels : ndarray of shape (n_groups,)
        Only if ``return_labels``: ``labels[j]`` is the group of ``indices[j]``.
    """
    q = _check_q(q)
    gi = _as_gi(groups, q.shape[0])
    w = softmax_weights(q, gi, beta, candidates)
    ws = w[gi.order]
    if float(beta) == 0:
        pos = np.flatnonzero(ws)  # exactly one per group, in group order
    else:
        rng = _rng(random_state)
        u = rng.random(gi.sizes.size)
        cw = np.cumsum(ws)
        before = cw[gi.starts] - ws[gi.starts]  # cumulative weight before each group
        pos = np.searchsorted(cw, before + u, side="right")
        pos = np.clip(pos, gi.starts, gi.starts + gi.sizes - 1)  # guard rounding at group ends
    idx = gi.order[pos].astype(np.int64)
    return (idx, gi.labels) if return_labels else idx


def draw_index(q, beta: float, random_state=None) -> int:
    """One row of a single group drawn from ``softmax(q / beta)``; the argmax at ``beta = 0``.

    Drawn as `select_indices` draws for one group: inverse CDF with one uniform from
    ``random_state``. It works on the log-weights ``(q - max q) / beta``, so a tiny beta does
    not overflow (the others' weights underflow to 0: the argmax); ``inf`` draws uniformly.
    One row, or ``beta = 0``, takes no draw (the generator is left as it was; ties go to the
    lowest index).

    Parameters
    ----------
    q : array-like of shape (k,)
        Scores of one group's rows.
    beta : float
        Temperature, >= 0.
    random_state : None, int or numpy.random.Generator / RandomState

    Returns
    -------
    index : int
    """
    q = _check_q(q)
    beta = _check_beta(beta)
    if q.size == 0:
        raise QProbeError("q is empty: need at least one row")
    if q.size == 1:
        return 0
    if beta == 0:
        return int(np.argmax(q))
    w = np.exp((q - q.max()) / beta)  # the largest is exp(0) = 1: the sum is >= 1
    cdf = np.cumsum(w / w.sum())
    return int(min(np.searchsorted(cdf, _rng(random_state).random() * cdf[-1], side="right"), q.size - 1))


def _rng(random_state):
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, np.random.RandomState):
        return np.random.default_rng(random_state.randint(2**31))
    return np.random.default_rng(random_state)


def _per_group_sum(values: np.ndarray, gi: GroupIndex) -> np.ndarray:
    return np.add.reduceat(values[gi.order], gi.starts)


def kl_to_base(weights, groups) -> np.ndarray:
    """KL divergence of each group's selection weights from the uniform base.

    ``KL_g = sum_i w_i log(k_g w_i)``, with ``0 log 0 = 0``: 0 for uniform
    weights, ``log k_g`` for a one-hot choice.

    Parameters
    ----------
    weights : array-like of shape (n_rows,)
        Selection weights summing to 1 within each group.
    groups : array-like of shape (n_rows,) or GroupIndex

    Returns
    -------
    kl : ndarray of shape (n_groups,)
        Groups in order of first appearance.
    """
    w = _check_q(weights, "weights")
    gi = _as_gi(groups, w.shape[0])
    k = gi.sizes[gi.codes].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(w > 0, w * np.log(k * w), 0.0)
    return np.maximum(_per_group_sum(terms, gi), 0.0)  # clip -1e-17 rounding


def bon_kl_bound(k) -> float | np.ndarray:
    """Upper bound on KL(best-of-k || base): ``log k - (k - 1) / k``."""
    k = np.asarray(k, dtype=np.float64)
    out = np.log(k) - (k - 1) / k
    return float(out) if out.ndim == 0 else out


def effective_sample_size(weights, groups) -> np.ndarray:
    """Effective number of candidates ``1 / sum_i w_i^2`` in each group.

    1 for a one-hot choice, k for uniform weights.

    Returns
    -------
    ess : ndarray of shape (n_groups,)
    """
    w = _check_q(weights, "weights")
    gi = _as_gi(groups, w.shape[0])
    return 1.0 / _per_group_sum(w * w, gi)


def best_of_n_curve(rewards, groups, k_max: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expected best-of-n reward and its KL bound for n = 1 .. k_max, from each group's samples.

    For a group of k rewards sorted ascending, r_(1) <= ... <= r_(k), the expected maximum of n
    of them drawn without replacement is ``sum_i C(i-1, n-1) / C(k, n) r_(i)`` (the unbiased
    pass@n estimator of Chen et al. 2021 for 0/1 rewards); it is averaged over groups. The KL of
    best-of-n to the base is at most ``log n - (n-1)/n`` (:func:`bon_kl_bound`).

    Parameters
    ----------
    rewards : array-like of shape (n_rows,)
    groups : array-like of shape (n_rows,) or GroupIndex
    k_max : int, optional
        Largest n; default the smallest group size (every group must have at least k_max rows).

    Returns
    -------
    n : ndarray of shape (k_max,)
    reward : ndarray of shape (k_max,)
        Mean over groups of the expected best-of-n reward (non-decreasing in n).
    kl : ndarray of shape (k_max,)
        ``log n - (n-1)/n``.
    """
    from scipy.special import gammaln

    r = _check_q(rewards, "rewards")
    gi = _as_gi(groups, r.shape[0])
    k_max = int(gi.sizes.min()) if k_max is None else int(k_max)
    if not 1 <= k_max <= gi.sizes.min():
        raise QProbeError(f"k_max must be between 1 and the smallest group size ({gi.sizes.min()}), got {k_max}")
    n = np.arange(1, k_max + 1)
    total = np.zeros(k_max)
    lc = lambda a, b: gammaln(a + 1) - gammaln(b + 1) - gammaln(a - b + 1)  # noqa: E731  log C(a, b)
    for size in np.unique(gi.sizes):  # groups of one size share the weights
        gs = np.flatnonzero(gi.sizes == size)
        rs = np.sort(np.stack([r[gi.order[gi.starts[g] : gi.starts[g] + size]] for g in gs]), axis=1)
        i = np.arange(1, size + 1)[:, None]  # rank, 1-based
        with np.errstate(invalid="ignore"):
            w = np.where(i >= n[None, :], np.exp(lc(i - 1, np.minimum(n[None, :] - 1, i - 1)) - lc(size, n[None, :])), 0.0)
        total += (rs @ w).sum(axis=0)
    return n, total / gi.sizes.size, np.asarray(bon_kl_bound(n), dtype=np.float64)


def bon_reward_at_kl(kl: float, n, reward, kl_curve) -> float:
    """Best-of-n reward at a given KL, linearly interpolated on the (KL bound, reward) curve.

    Below KL 0 it is the base reward; beyond the curve's largest KL it is the best-of-k_max
    reward (what best-of-n reaches within the k samples drawn: a lower bound there).
    """
    return float(np.interp(float(kl), np.asarray(kl_curve), np.asarray(reward)))


def selection_report(q, rewards, groups, beta: float, candidates=None) -> dict:
    """Rewards and diagnostics of choosing one row per group by ``softmax(q / beta)``.

    All rewards are analytic expectations, not a random draw, and are averaged
    over groups (each prompt counts once, whatever its number of rows).

    Parameters
    ----------
    q : array-like of shape (n_rows,)
        Probe scores.
    rewards : array-like of shape (n_rows,)
        Reward of each row.
    groups : array-like of shape (n_rows,) or GroupIndex
    beta : float
        Selection temperature, >= 0.
    candidates : array-like of bool, shape (n_rows,), optional
        Rows the probe may choose (a cascade); base, oracle and the KL's base stay all k rows.

    Returns
    -------
    dict with keys
        ``n_prompts``, ``n_rows``; ``k`` (mean group size, an int when all
        groups have the same size); ``beta``; ``base_reward`` (mean over groups
        of the group's mean reward: picking a sample uniformly);
        ``probe_reward`` (mean over groups of ``sum_i w_i r_i``);
        ``argmax_reward`` (reward of the argmax row, ties to the lowest row);
        ``oracle_reward`` (best-of-k: the group's best reward);
        ``kl`` (mean KL to the base), ``bon_kl_bound`` (mean over groups of
        ``log k - (k-1)/k``), ``ess`` (mean effective sample size), and
        ``gap_closed`` ((probe - base) / (oracle - base), NaN if oracle == base).
    """
    q = _check_q(q)
    r = _check_q(rewards, "rewards")
    if r.shape != q.shape:
        raise QProbeError(f"rewards has {r.shape[0]} values but q has {q.shape[0]}")
    beta = _check_beta(beta)
    gi = _as_gi(groups, q.shape[0])
    w = softmax_weights(q, gi, beta, candidates)
    w0 = w if beta == 0 else softmax_weights(q, gi, 0.0, candidates)
    n = gi.sizes.astype(np.float64)
    base = float(np.mean(_per_group_sum(r, gi) / n))
    probe = float(np.mean(_per_group_sum(w * r, gi)))
    oracle = float(np.mean(np.maximum.reduceat(r[gi.order], gi.starts)))
    k = int(gi.sizes[0]) if (gi.sizes == gi.sizes[0]).all() else float(n.mean())
    return {
        "n_prompts": int(gi.sizes.size),
        "n_rows": int(q.shape[0]),
        "k": k,
        "beta": beta,
        "base_reward": base,
        "probe_reward": probe,
        "argmax_reward": float(np.mean(_per_group_sum(w0 * r, gi))),
        "oracle_reward": oracle,
        "kl": float(np.mean(kl_to_base(w, gi))),
        "bon_kl_bound": float(np.mean(bon_kl_bound(n))),
        "ess": float(np.mean(effective_sample_size(w, gi))),
        "gap_closed": (probe - base) / (oracle - base) if oracle > base else float("nan"),
    }


def top_n_draw(q, n: int, beta: float, random_state=None) -> np.ndarray:
    """Draw `n` distinct rows of one group by softmax(q / beta), without replacement (top n at beta 0).

    The Gumbel-top-n trick on the log-weights ``q / beta``: the argsort of
    ``q / beta + Gumbel noise`` is sequential sampling without replacement from
    softmax(q / beta), so the first row is distributed exactly as
    `select_indices` draws it. It works in log space: at a small beta the weights
    of all but one row underflow to 0, yet the order of the rest still follows q
    (a draw on ``log(weights)`` would order them by index).

    Parameters
    ----------
    q : array-like of shape (k,)
        Scores of one group's rows.
    n : int
        Rows to return, 1 <= n <= k.
    beta : float
        Temperature >= 0; 0 takes the n highest q (ties to the lowest index), inf draws uniformly.
    random_state : None, int or numpy.random.Generator
        Source of the draw when beta > 0.

    Returns
    -------
    indices : ndarray of int64, shape (n,)
        Row indices in draw order.
    """
    q = _check_q(q)
    beta = _check_beta(beta)
    k = q.shape[0]
    if not 1 <= n <= k:
        raise QProbeError(f"n must be in 1..{k}, got {n}")
    if beta == 0:
        order = np.lexsort((np.arange(k), -q))  # q descending, ties to the lowest index
    else:
        logits = np.zeros(k) if np.isinf(beta) else (q - q.max()) / beta  # finite: q is checked finite
        order = np.argsort(-(logits + _rng(random_state).gumbel(size=k)), kind="stable")
    return order[:n].astype(np.int64)

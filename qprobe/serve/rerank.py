"""Choose `n` of a request's k candidates by softmax(Q / beta), and say how far that is from the base sampler.

Pure numpy: the weights, the KL and the draw of n distinct candidates come from
`qprobe.select` (`top_n_draw`: Gumbel-top-n on the log-weights, so the first
choice is distributed exactly as `select_indices` draws it, and small betas
keep the order of Q). At beta 0 the choices are the n highest Q, ties to the
lowest index.

`choose_preferring` adds the cascade: the probe chooses among the candidates
at the maximum of a signal (those that pass the request's tests, or the mask
`qprobe.serve.inputs.choice_mask` made with the probe's own cascade); where
none passes, all stay candidates. That rule is `qprobe.signals.cascade_mask`,
the one `QProbe.select` and `qprobe rerank` use. No HTTP, no model here.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from qprobe.select import kl_to_base, softmax_weights, top_n_draw
from qprobe.signals import cascade_mask


class Choice(NamedTuple):
    """Which candidates were returned and why.

    indices : ndarray of int64, shape (n,)
        Candidate index (0..k-1) of each returned choice, in choice order.
    weights : ndarray of shape (k,)
        Selection weight of every candidate: softmax(Q / beta) over the
        candidates the choice was made among, 0 outside them.
    kl : float
        KL of the selection policy to a uniform pick among the k (the base
        sampler): sum_i w_i log(k w_i); log k at beta 0, 0 at beta = inf.
    """

    indices: np.ndarray
    weights: np.ndarray
    kl: float


def choose(q, n: int, beta: float, rng: np.random.Generator) -> Choice:
    """Pick `n` distinct candidates out of k by softmax(q / beta) (top n at beta 0).

    Parameters
    ----------
    q : array-like of shape (k,)
        Probe score of each candidate.
    n : int
        Choices to return, 1 <= n <= k.
    beta : float
        Temperature >= 0.
    rng : numpy.random.Generator
        Source of the draw when beta > 0.
    """
    return choose_preferring(q, n, beta, rng, None)


def choose_preferring(q, n: int, beta: float, rng: np.random.Generator, prefer=None) -> Choice:
    """`choose` among the preferred candidates first; the rest only fill what they cannot.

    Parameters
    ----------
    q, n, beta, rng
        As for `choose`.
    prefer : array-like of shape (k,), optional
        A cascade's values (bool or numbers, e.g. 1 = passed the request's tests):
        the candidates at their maximum are chosen among (`qprobe.signals.cascade_mask`;
        all of them when none is preferred). None: all candidates. Fewer preferred
        than n: all of them, in probe order, then the rest by the probe.
    """
    q = np.asarray(q, dtype=np.float64)
    k = q.shape[0]
    if not 1 <= n <= k:
        raise ValueError(f"n must be in 1..{k}, got {n}")
    if prefer is None:
        mask = np.ones(k, dtype=bool)
    else:
        prefer = np.asarray(prefer, dtype=np.float64).reshape(-1)
        if prefer.shape[0] != k:
            raise ValueError(f"prefer has {prefer.shape[0]} values but there are {k} candidates")
        mask = cascade_mask(prefer, np.zeros(k, dtype=np.int64))
    first, rest = np.flatnonzero(mask), np.flatnonzero(~mask)
    w = np.zeros(k)
    w[first] = softmax_weights(q[first], np.zeros(first.size, dtype=np.int64), beta)
    kl = float(kl_to_base(w, np.zeros(k, dtype=np.int64))[0])
    picked = first[top_n_draw(q[first], min(n, first.size), beta, rng)]
    if picked.size < n:
        picked = np.concatenate([picked, rest[top_n_draw(q[rest], n - picked.size, beta, rng)]])
    return Choice(picked.astype(np.int64), w, kl)

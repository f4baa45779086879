"""Choose `n` of a request's k candidates by softmax(Q / beta), and say how far that is from the base sampler.

Pure numpy: the weights and the KL come from `qprobe.select`; the draw of n
distinct candidates uses the Gumbel-top-n trick, which is sequential sampling
without replacement from softmax(Q / beta) (so the first choice is distributed
exactly as `select_indices` draws it). At beta 0 the choices are the n highest
Q, ties to the lowest index. No HTTP, no model here.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from qprobe.select import kl_to_base, softmax_weights


class Choice(NamedTuple):
    """Which candidates were returned and why.

    indices : ndarray of int64, shape (n,)
        Candidate index (0..k-1) of each returned choice, in choice order.
    weights : ndarray of shape (k,)
        Selection weight softmax(Q / beta) of every candidate.
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
    q = np.asarray(q, dtype=np.float64)
    k = q.shape[0]
    if not 1 <= n <= k:
        raise ValueError(f"n must be in 1..{k}, got {n}")
    groups = np.zeros(k, dtype=np.int64)
    w = softmax_weights(q, groups, beta)
    kl = float(kl_to_base(w, groups)[0])
    if beta == 0:
        order = np.lexsort((np.arange(k), -q))  # Q descending, ties to the lowest index
    else:
        # argsort of log w + Gumbel noise = sampling without replacement in proportion to w
        with np.errstate(divide="ignore"):
            keys = np.log(w) + rng.gumbel(size=k)
        order = np.argsort(-keys, kind="stable")
    return Choice(order[:n].astype(np.int64), w, kl)

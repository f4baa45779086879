"""The policies a user would compare a probe against, on the same rows, with paired intervals.

Every policy picks one of each prompt's k rows; its score per prompt is the *expected*
reward of its choice (ties and uniform draws averaged analytically, never sampled):

``base``                   uniform over the k rows (mean of k)
``likelihood``             argmax of the summed token log-probability
``filter:F``               uniform among the rows at the prompt's maximum of field F
                           (those that pass the shown tests, all rows where none does)
``filter:F + likelihood``  the likelihood's argmax among those rows
``probe``                  the probe's choice (its own cascade included)
``best-of-k``              the best reward among the k rows (an oracle, not a policy)

``paired_bootstrap`` resamples prompts, so two policies' differences are judged on the
same prompts. Pure numpy; no files, no printing.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from qprobe.select import _per_group_sum, _as_gi, softmax_weights
from qprobe.signals import cascade_mask

N_BOOT = 2000


def per_prompt_reward(scores, rewards, groups, beta: float = 0.0, candidates=None) -> np.ndarray:
    """Expected reward of choosing by ``softmax(scores / beta)`` (argmax at 0, ties split evenly)
    in each group, optionally among ``candidates`` only.

    Returns
    -------
    ndarray of shape (n_groups,)
        Groups in order of first appearance.
    """
    r = np.asarray(rewards, dtype=np.float64)
    gi = _as_gi(groups, r.shape[0])
    s = np.asarray(scores, dtype=np.float64)
    if float(beta) == 0:  # split ties evenly (select_indices takes the lowest index; the expectation is fairer)
        s = np.where(candidates if candidates is not None else True, s, -np.inf)
        gmax = np.maximum.reduceat(s[gi.order], gi.starts)
        top = (s == gmax[gi.codes]).astype(np.float64)
        w = top / _per_group_sum(top, gi)[gi.codes]
    else:
        w = softmax_weights(s, gi, beta, candidates)
    return _per_group_sum(w * r, gi)


def paired_bootstrap(a, b, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of ``a - b`` over prompts and its percentile bootstrap interval, prompts resampled.

    Parameters
    ----------
    a, b : array-like of shape (n_prompts,)
        Per-prompt scores of two policies on the same prompts.

    Returns
    -------
    dict with ``diff``, ``lo``, ``hi``.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi)}


def policies(rewards, groups, *, logprob=None, filters: Mapping[str, np.ndarray] | None = None,
             probe_q=None, probe_beta: float = 0.0, probe_candidates=None) -> dict[str, np.ndarray]:
    """Per-prompt expected reward of every policy the inputs allow (see the module docstring).

    Parameters
    ----------
    rewards, groups : array-like of shape (n_rows,)
    logprob : array-like of shape (n_rows,), optional
        Summed token log-probability of each row (enables ``likelihood``).
    filters : mapping of name -> array-like of shape (n_rows,), optional
        Signals to use as filters (e.g. ``{"shown": ...}``).
    probe_q : array-like of shape (n_rows,), optional
        Probe scores (enables ``probe``), chosen at ``probe_beta`` among ``probe_candidates``.

    Returns
    -------
    dict of policy name -> ndarray of shape (n_groups,)
    """
    r = np.asarray(rewards, dtype=np.float64)
    gi = _as_gi(groups, r.shape[0])
    zeros = np.zeros_like(r)
    out = {"base": per_prompt_reward(zeros, r, gi)}
    if logprob is not None:
        out["likelihood"] = per_prompt_reward(logprob, r, gi)
    for name, values in (filters or {}).items():
        m = cascade_mask(values, gi)
        out[f"filter:{name}"] = per_prompt_reward(zeros, r, gi, candidates=m)
        if logprob is not None:
            out[f"filter:{name} + likelihood"] = per_prompt_reward(logprob, r, gi, candidates=m)
    if probe_q is not None:
        out["probe"] = per_prompt_reward(probe_q, r, gi, probe_beta, probe_candidates)
    out["best-of-k"] = np.maximum.reduceat(r[gi.order], gi.starts)
    return out


def compare(per_prompt: Mapping[str, np.ndarray], n_boot: int = N_BOOT, seed: int = 0) -> list[dict]:
    """Each policy's mean and its paired interval against the best of the *other* policies.

    ``best-of-k`` is reported but never serves as the reference (no one can run it).

    Returns
    -------
    list of dict with ``policy``, ``reward``, ``vs`` (the best other policy), ``diff``, ``lo``, ``hi``
    (``vs`` and the interval are None for ``best-of-k`` and when there is no other policy).
    """
    means = {k: float(np.mean(v)) for k, v in per_prompt.items()}
    runnable = [k for k in per_prompt if k != "best-of-k"]
    rows = []
    for name, v in per_prompt.items():
        others = [k for k in runnable if k != name]
        row = {"policy": name, "reward": means[name], "vs": None, "diff": None, "lo": None, "hi": None}
        if name != "best-of-k" and others:
            ref = max(others, key=lambda k: means[k])
            row.update(vs=ref, **paired_bootstrap(v, per_prompt[ref], n_boot, seed))
        rows.append(row)
    return rows

"""Reward transforms applied before training a probe (InfAlign, Balashankar et al. 2024).

For best-of-N at inference, InfAlign's target is not the raw reward r(x, y) but its
*calibration* under the base policy, then a transformation suited to the inference
procedure:

    calibrated:       C(x, y) = P_{z ~ pi_ref(.|x)}[r(x, z) < r(x, y)] + 1/2 P[r(x, z) = r(x, y)]
    calibrated-exp:T  R(x, y) = (exp(T * C(x, y)) - 1) / (exp(T) - 1)

C is the reward's (mid-)rank among the base model's samples for the same prompt, estimated
here from the other sampled rows of that prompt (leave-one-out, so a row is not compared with
itself). It lies in [0, 1]; with 0/1 rewards a pass on a prompt where nothing else passes gets
1 and a pass on a prompt where everything passes gets 1/2, so the probe learns what is rare for
the base model, not what is easy. The exponential is InfAlign's transform for best-of-N win rate
(exp(T C)); it is rescaled affinely to [0, 1] here so that the same targets suit ce (soft labels)
as well as mse and pg, which an affine map leaves unchanged up to scale.

Pure numpy on arrays; reading rows and choosing a transform from a flag is the caller's job.
"""
from __future__ import annotations

import numpy as np

from qprobe.errors import QProbeError
from qprobe.select import group_index

TRANSFORMS = ("none", "calibrated", "calibrated-exp:T")


def calibrate(rewards, groups, reference=None) -> np.ndarray:
    """Leave-one-out mid-rank of each reward among its group's reference rows.

    Parameters
    ----------
    rewards : array-like of shape (n_rows,)
    groups : array-like of shape (n_rows,)
        Prompt label of each row.
    reference : array-like of bool, shape (n_rows,), optional
        Rows that are samples of the base policy (default: all). Other rows (e.g.
        demonstrations) are calibrated against them but do not count for anyone.

    Returns
    -------
    c : ndarray of shape (n_rows,), in [0, 1]
        ``(#{z: r_z < r} + 0.5 #{z: r_z = r}) / #z`` over the group's reference rows z other
        than the row itself; 0.5 where a row has no other reference row.
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    ref = np.ones(r.shape, bool) if reference is None else np.asarray(reference, bool).reshape(-1)
    if ref.shape != r.shape:
        raise QProbeError(f"reference has {ref.shape[0]} values but there are {r.shape[0]} rewards")
    gi = group_index(groups)
    if gi.codes.shape[0] != r.shape[0]:
        raise QProbeError(f"groups has {gi.codes.shape[0]} labels but there are {r.shape[0]} rewards")
    out = np.full(r.shape, 0.5)
    for g in range(gi.sizes.size):  # one small sort per prompt (k rows): vectorising buys little
        rows = gi.order[gi.starts[g] : gi.starts[g] + gi.sizes[g]]
        base = np.sort(r[rows[ref[rows]]])
        less = np.searchsorted(base, r[rows], side="left")
        equal = np.searchsorted(base, r[rows], side="right") - less
        self_ref = ref[rows]
        equal = equal - self_ref  # leave the row itself out
        n = base.size - self_ref
        with np.errstate(invalid="ignore", divide="ignore"):
            out[rows] = np.where(n > 0, (less + 0.5 * equal) / np.maximum(n, 1), 0.5)
    return out


def parse_transform(spec: str) -> tuple[str, float | None]:
    """``"none"``, ``"calibrated"`` or ``"calibrated-exp:T"`` (T > 0) -> (name, T or None)."""
    spec = str(spec).strip()
    if spec in ("none", "calibrated"):
        return spec, None
    name, _, t = spec.partition(":")
    if name == "calibrated-exp":
        try:
            T = float(t)
        except ValueError:
            T = float("nan")
        if T > 0 and np.isfinite(T):
            return name, T
    raise QProbeError(f"reward transform {spec!r}: expected none, calibrated or calibrated-exp:T with T > 0")


def transform_rewards(spec: str, rewards, groups, reference=None) -> np.ndarray:
    """Training targets for a reward transform (see the module docstring for the formulas).

    Parameters
    ----------
    spec : str
        ``none``, ``calibrated`` or ``calibrated-exp:T``.
    rewards, groups, reference : as for :func:`calibrate`.

    Returns
    -------
    targets : ndarray of shape (n_rows,); the rewards unchanged for ``none``.
    """
    name, T = parse_transform(spec)
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if name == "none":
        return r.copy()
    c = calibrate(r, groups, reference)
    if name == "calibrated":
        return c
    return np.expm1(T * c) / np.expm1(T)

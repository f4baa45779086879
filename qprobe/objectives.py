"""Loss functions for training Q-probes: pure torch, one vectorised call per batch.

Each loss maps probe scores ``q`` of shape (n_rows,) and per-row targets to a
scalar to *minimise*. Grouped losses (policy gradient, preference) take an
integer id per row naming its chunk or pair, and use scatter/segment ops, so a
batch holding many chunks is one call with no Python loop.

This module does not build models, batch data, shuffle chunks or touch numpy:
the torch training loop that calls these losses is :func:`qprobe._train._fit_torch`,
and the estimator that picks it is :class:`qprobe.probe.QProbe`. Linear ridge and
logistic regression (objectives ``mse`` and ``ce`` without a hidden layer) are
solved in closed form / by L-BFGS in :mod:`qprobe._train`; the ``mse`` and ``ce``
losses here are the same objectives for torch (MLP) heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mse(q: torch.Tensor, r: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error ``mean((q - r)^2)``; q, r of shape (n_rows,); with ``weight``, the weighted mean."""
    if weight is None:
        return torch.mean((q - r) ** 2)
    return torch.sum(weight * (q - r) ** 2) / weight.sum()


def ce(q: torch.Tensor, r: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits ``q`` and targets ``r`` in [0, 1], mean (weighted mean) over rows."""
    if weight is None:
        return F.binary_cross_entropy_with_logits(q, r.to(q.dtype))
    per = F.binary_cross_entropy_with_logits(q, r.to(q.dtype), reduction="none")
    return torch.sum(weight * per) / weight.sum()


def segment_softmax(q: torch.Tensor, segment: torch.Tensor, n_segments: int | None = None) -> torch.Tensor:
    """Softmax of ``q`` within each segment.

    Parameters
    ----------
    q : Tensor of shape (n_rows,)
    segment : LongTensor of shape (n_rows,)
        Segment id of each row, in ``0 .. n_segments-1``; rows need not be contiguous.
    n_segments : int, optional
        Defaults to ``segment.max() + 1``.

    Returns
    -------
    w : Tensor of shape (n_rows,)
        Weights summing to 1 within each segment.
    """
    n = int(segment.max()) + 1 if n_segments is None else n_segments
    # the shift only stabilises exp; softmax is shift-invariant, so no gradient through it
    m = torch.full((n,), float("-inf"), dtype=q.dtype, device=q.device)
    m = m.scatter_reduce(0, segment, q.detach(), reduce="amax", include_self=True)
    e = torch.exp(q - m[segment])
    s = torch.zeros(n, dtype=q.dtype, device=q.device).index_add(0, segment, e)
    return e / s[segment]


def pg_loss(
    q: torch.Tensor,
    r: torch.Tensor,
    chunk_index: torch.Tensor,
    beta: float = 1.0,
    baseline: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Policy-gradient loss of the Q-probe paper, negated for minimisation.

    ``loss = -mean_c sum_{i in c} softmax(q / beta)_i (r_i - baseline)``, the
    softmax taken within each chunk c (in the paper: k rows of one prompt).
    A constant baseline leaves the gradient unchanged (weights sum to 1); it
    only shifts the loss value.

    Parameters
    ----------
    q : Tensor of shape (n_rows,)
        Probe scores.
    r : Tensor of shape (n_rows,)
        Rewards.
    chunk_index : LongTensor of shape (n_rows,)
        Chunk id of each row; ids need not be contiguous or dense, and the
        mean is over the chunks that occur.
    beta : float, default 1.0
        Softmax temperature, > 0.
    baseline : float or Tensor of shape () or (n_rows,), default 0.0

    Returns
    -------
    loss : Tensor of shape ()
    """
    if not beta > 0:
        raise ValueError(f"pg_loss needs beta > 0, got {beta}")
    n = int(chunk_index.max()) + 1
    w = segment_softmax(q / beta, chunk_index, n)
    per_chunk = torch.zeros(n, dtype=q.dtype, device=q.device).index_add(0, chunk_index, w * (r.to(q.dtype) - baseline))
    present = torch.bincount(chunk_index, minlength=n) > 0
    return -per_chunk[present].mean()


def pref_loss(q: torch.Tensor, pair_index: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logistic (Bradley-Terry) loss on the Q difference within each pair.

    ``loss = mean_p log(1 + exp(-(q_preferred - q_other)))``.

    Parameters
    ----------
    q : Tensor of shape (n_rows,)
        Probe scores.
    pair_index : LongTensor of shape (n_rows,)
        Pair id of each row; every pair id occurs exactly twice.
    y : Tensor of shape (n_rows,)
        1 for the preferred row of its pair, 0 for the other (validated by the caller).

    Returns
    -------
    loss : Tensor of shape ()
    """
    n = int(pair_index.max()) + 1
    sign = 2 * y.to(q.dtype) - 1  # +1 preferred, -1 other
    diff = torch.zeros(n, dtype=q.dtype, device=q.device).index_add(0, pair_index, sign * q)
    present = torch.bincount(pair_index, minlength=n) > 0
    return F.softplus(-diff[present]).mean()

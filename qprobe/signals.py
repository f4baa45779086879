"""Signals: numeric row fields used beside the hidden-state features, as probe inputs or as a filter.

A *signal* is a number per completion row that a user already has before choosing:
the outcome of the tests the prompt shows (``shown``, written by ``qprobe reward
--kind code:shown_tests --into shown``), the model's own likelihood, the length.
Three are derived from the rows' ``token_logprobs`` (written by ``qprobe sample``)
when the row has no field of that name:

``logprob_sum``   summed token log-probability (likelihood reranking's score)
``logprob_mean``  mean token log-probability (0 for an empty completion, like the sum)
``n_tokens``      number of completion tokens

Any other name is read from the row's field of that name (a number or a bool).

A probe trained with signals records their names (``QProbe(signals=...)``): its input
is ``[features | signal columns]``, and ``rerank``/``eval``/``serve`` refuse rows that lack
one. A *cascade* on a signal keeps, for each prompt, only the rows at that prompt's
maximum of it (``cascade_mask``): the candidates that pass the shown tests, or all rows
when none does. The probe then chooses among those.

Pure functions over rows and arrays; no files, no printing.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from qprobe.errors import QProbeError

DERIVED = ("logprob_sum", "logprob_mean", "n_tokens")  # computed from token_logprobs when absent


def check_names(names, what: str = "signals") -> tuple[str, ...]:
    """Signal names as a tuple of distinct non-empty strings (one-line error otherwise)."""
    if names is None:
        return ()
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    names = tuple(names)
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise QProbeError(f"{what} must be distinct field names, got {list(names)!r}")
    return names


def _derived(row: dict, name: str):
    lp = row.get("token_logprobs")
    if name == "n_tokens" and lp is None:
        return None
    if not isinstance(lp, list):
        return None
    if name == "n_tokens":
        return len(lp)
    if not lp:  # an empty completion: log p of no tokens is 0 (sum), and so is its mean by convention
        return 0.0
    total = math.fsum(float(v) for v in lp)
    return total if name == "logprob_sum" else total / len(lp)


def signal_value(row: dict, name: str):
    """The row's value of signal `name` (a float), or None when it has none."""
    value = row.get(name)
    if value is None and name in DERIVED:
        value = _derived(row, name)
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def signal_columns(rows: Sequence[dict], names: Sequence[str], path="rows") -> np.ndarray:
    """The signals of every row as columns.

    Parameters
    ----------
    rows : sequence of dict
    names : sequence of str
        Field names; ``logprob_sum``, ``logprob_mean`` and ``n_tokens`` are derived from
        ``token_logprobs`` when the row has no such field.
    path : str
        Named in errors (the rows file).

    Returns
    -------
    S : ndarray of shape (n_rows, len(names)), float64

    Raises
    ------
    QProbeError
        One line naming the first row without a finite value for a signal.
    """
    names = check_names(names)
    S = np.empty((len(rows), len(names)))
    for j, name in enumerate(names):
        for i, row in enumerate(rows):
            v = signal_value(row, name)
            if v is None:
                hint = (" (derived from token_logprobs, which it lacks)" if name in DERIVED else
                        " (e.g. `qprobe reward --kind code:shown_tests --into shown`)" if name == "shown" else "")
                raise QProbeError(f"{path}: row {i + 1} has no finite number in field {name!r}{hint}")
            S[i, j] = v
    return S


def with_signals(X: np.ndarray, rows: Sequence[dict], names: Sequence[str], path="rows") -> np.ndarray:
    """``[X | signal_columns(rows, names)]`` in X's float dtype; X itself when there are no signals."""
    names = check_names(names)
    if not names:
        return X
    S = signal_columns(rows, names, path)
    dtype = X.dtype if np.issubdtype(X.dtype, np.floating) else np.float64
    return np.hstack([np.asarray(X, dtype=dtype), S.astype(dtype)])


def cascade_mask(values, groups) -> np.ndarray:
    """Rows at their group's maximum of `values`: the candidates a cascade keeps.

    Parameters
    ----------
    values : array-like of shape (n_rows,)
        The cascade's signal (e.g. 1 = passes the shown tests).
    groups : array-like of shape (n_rows,)

    Returns
    -------
    mask : ndarray of bool, shape (n_rows,)
        True on every row tied at its group's maximum: all passing rows when one passes,
        all rows of a group where none does (the filter never leaves a prompt empty).
    """
    from qprobe.select import group_index

    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(v).all():
        raise QProbeError("cascade values contain NaN or infinite values")
    gi = groups if hasattr(groups, "codes") else group_index(groups)
    if gi.codes.shape[0] != v.shape[0]:
        raise QProbeError(f"groups has {gi.codes.shape[0]} labels but there are {v.shape[0]} cascade values")
    gmax = np.maximum.reduceat(v[gi.order], gi.starts)
    return v >= gmax[gi.codes]

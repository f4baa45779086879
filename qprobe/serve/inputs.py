"""What the probe reads for each of a request's candidates, and which candidates it may choose.

A probe trained with signals (``QProbe(signals=...)``, :mod:`qprobe.signals`)
reads ``[features | signal columns]``. `serve` can give it these signals:

``shown``                               the candidate's outcome on the request's ``tests`` (1 pass, 0 fail)
``logprob_sum``, ``logprob_mean``,      from the candidate's token log-probs (the local model always
``n_tokens``                            keeps them; an upstream server is asked for them)

Each candidate becomes a row shaped like a ``qprobe sample`` row
(``token_logprobs``, ``n_tokens``, ``shown``) and `qprobe.signals.signal_columns`
reads it, so a signal means the same in `serve` as in `train`. A probe that
needs any other signal is refused when the server is built (`check_probe`); a
request without tests for a probe that needs ``shown`` is a 400 (`check_request`).

Which candidates the probe chooses among (`choice_mask`): those that pass the
request's tests (all when none does), then the probe's own cascade among them
(`QProbe.candidates`). `rerank.choose_preferring` applies the mask through
`qprobe.signals.cascade_mask`, the one cascade rule.

Pure numpy over candidates; no HTTP, no model.
"""
from __future__ import annotations

import numpy as np

from qprobe.errors import QProbeError
from qprobe.serve.protocol import ServeError
from qprobe.signals import DERIVED, cascade_mask, signal_columns

FROM_TESTS = "shown"  # the signal the request's tests give
PROVIDED = (FROM_TESTS, *DERIVED)


def needs_logprobs(probe) -> bool:
    """Whether the probe reads a signal made from the candidates' token log-probs."""
    return any(s in DERIVED for s in probe.signals or ())


def check_probe(probe, backend=None) -> None:
    """Refuse, in one line, a probe whose signals this server cannot give it (over `backend`, when given).

    Raises
    ------
    QProbeError
        A signal other than ``shown``/``logprob_sum``/``logprob_mean``/``n_tokens``, or a
        log-prob signal over a backend whose candidates carry no token log-probs.
    """
    signals = tuple(probe.signals or ())
    other = [s for s in signals if s not in PROVIDED]
    if other:
        raise QProbeError(f"the probe uses signal {other[0]!r}, which serve cannot provide (it provides "
                          f"{', '.join(PROVIDED)}: shown from the request's tests, the rest from token log-probs)")
    if backend is not None and needs_logprobs(probe) and not backend.token_logprobs:
        name = next(s for s in signals if s in DERIVED)
        raise QProbeError(f"the probe uses signal {name!r}, but this backend's candidates carry no token log-probs")


def check_request(probe, tests) -> None:
    """A 400 naming the missing signal when the probe needs ``shown`` and the request has no tests."""
    if FROM_TESTS in (probe.signals or ()) and tests is None:
        raise ServeError(400, f"this server's probe uses the signal {FROM_TESTS!r} (each candidate's outcome on "
                              "the request's tests): send tests, e.g. extra_body={\"tests\": [\"assert ...\"]}",
                         code="missing_signal", param="tests")


def probe_inputs(probe, features: np.ndarray, cands, outcomes) -> np.ndarray:
    """``[features | the probe's signal columns]`` for a request's k candidates.

    Parameters
    ----------
    features : ndarray of shape (k, n_features)
    cands : list of Candidate
        Their ``token_logprobs`` and ``n_tokens`` give the log-prob signals.
    outcomes : list of dict or None
        The request's test outcomes (``{"passed": bool, ...}``), in candidate order.

    Returns
    -------
    X : ndarray of shape (k, n_features + len(probe.signals)), float32

    Raises
    ------
    ServeError
        502 when a candidate lacks the token log-probs a signal needs (an upstream that
        does not return them).
    """
    signals = tuple(probe.signals or ())
    if not signals:
        return features
    if needs_logprobs(probe) and any(c.token_logprobs is None for c in cands):
        name = next(s for s in signals if s in DERIVED)
        raise ServeError(502, f"the candidates came without token log-probs, which the probe's signal {name!r} "
                              "needs (the upstream does not return logprobs)", code="missing_logprobs")
    rows = []
    for i, c in enumerate(cands):
        row = {"token_logprobs": c.token_logprobs, "n_tokens": c.n_tokens}
        if outcomes is not None:
            row[FROM_TESTS] = bool(outcomes[i]["passed"])
        rows.append(row)
    try:
        S = signal_columns(rows, signals, path="candidates")
    except QProbeError as e:
        raise ServeError(500, f"the probe's signals cannot be read: {e}") from None
    return np.hstack([features, S.astype(features.dtype)])


def choice_mask(probe, X: np.ndarray, outcomes) -> np.ndarray:
    """The candidates the probe chooses among: those passing the request's tests, then the probe's cascade.

    Parameters
    ----------
    X : ndarray of shape (k, n_features_in)
        The probe's inputs (`probe_inputs`).
    outcomes : list of dict or None

    Returns
    -------
    mask : ndarray of bool, shape (k,)
        Never empty: where no candidate passes, all stay; the probe's cascade keeps
        at least one of those.
    """
    k = X.shape[0]
    groups = np.zeros(k, dtype=np.int64)  # one request: one group
    keep = (np.ones(k, dtype=bool) if outcomes is None
            else cascade_mask([bool(o["passed"]) for o in outcomes], groups))
    if probe.cascade is None:
        return keep
    idx = np.flatnonzero(keep)
    mask = np.zeros(k, dtype=bool)
    mask[idx] = probe.candidates(X[idx], groups[idx])
    return mask

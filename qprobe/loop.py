"""A label-budgeted online loop with exploration (XPO, Xie et al. 2024), over a pool of samples.

Rewards are often the expensive part (a judge, a person, a slow test suite). Each round the loop
asks the reward of only ``budget`` unlabelled rows, chosen by an exploration rule, retrains the
probe on every label so far, and records held-out pass@1 against the labels spent:

- ``optimism``: the probe's score plus ``c`` times its uncertainty. For the ridge probe (``mse``)
  the uncertainty is the bonus ``sqrt(z^T A^-1 z)``, ``A = Z^T Z + alpha I`` the ridge's own
  (standardised, centred) Gram matrix over the labelled rows, as in LinUCB; for the other
  objectives it is the standard deviation of a bootstrap ensemble of probes.
- ``greedy``: the probe's favourites (highest score).
- ``uniform``: a uniform draw.

Round 0 has no probe, so every rule draws uniformly there. A round's draws use the generator
``default_rng([seed, round])``, so a resumed run makes the same choices as an uninterrupted one.

Here the pool is fixed (rows sampled beforehand, k per prompt, e.g. by ``qprobe sample``): a round
"samples" by revealing labels, not by calling the model. The pure parts (bonus, choice, one round)
are functions on arrays; :func:`run_loop` adds the state file that commits each round atomically
before the next begins, and takes the reward as a callable, so it never touches a model or sandbox.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np

from qprobe.errors import QProbeError

RULES = ("optimism", "greedy", "uniform")
STATE_FORMAT = "qprobe-loop v1"


def ridge_bonus(X_labelled, X_candidates, alpha: float, scale=None) -> np.ndarray:
    """Optimism bonus ``sqrt(z^T A^-1 z)`` of each candidate under a ridge fit on the labelled rows.

    ``A = Z^T Z + alpha I`` with ``Z = (X_labelled - mu) / scale`` (mu: the labelled rows' mean),
    the matrix :class:`~qprobe.probe.QProbe` (``objective="mse"``) solves; candidates are mapped
    the same way, ``z = (x - mu) / scale``.

    Parameters
    ----------
    X_labelled : ndarray of shape (n_labelled, n_features)
    X_candidates : ndarray of shape (n_candidates, n_features)
    alpha : float, > 0
    scale : ndarray of shape (n_features,), optional
        Feature scale (the probe's ``scale_``); default 1.

    Returns
    -------
    bonus : ndarray of shape (n_candidates,)
    """
    from qprobe._train import _gram

    X_labelled = np.asarray(X_labelled)
    d = X_labelled.shape[1]
    scale = np.ones(d) if scale is None else np.asarray(scale, dtype=np.float64)
    if not alpha > 0:
        raise QProbeError(f"the ridge bonus needs alpha > 0, got {alpha}")
    G, _, mu, _ = _gram(X_labelled, None, scale)
    G[np.diag_indices_from(G)] += alpha
    Z = (np.asarray(X_candidates, dtype=np.float64) - mu) / scale
    L = np.linalg.cholesky(G)
    V = np.linalg.solve(L, Z.T)  # L^-1 z: |L^-1 z|^2 = z^T A^-1 z
    return np.sqrt(np.einsum("ij,ij->j", V, V))


def fit_scores(X, y, groups, labelled, objective, probe_params, seed, ensemble=0, candidates=None):
    """(q, bonus) for every row from probes fit on the labelled rows.

    ``candidates`` (bool mask): rows that need a bonus (default all; others get 0). No bonus
    is computed when ``ensemble`` is 0 (the probe is only evaluated).

    ``bonus`` is the ridge bonus for linear ``mse``, else the standard deviation over
    ``ensemble`` probes fit on bootstrap resamples of the labelled prompts (None if ensemble
    is 0). Where the labels cannot train a probe (one class for ``ce``, no prompt with two
    labels for ``pg``), ``q`` is 0 everywhere.
    """
    from qprobe.probe import QProbe

    def fit(idx, rs):
        yi, gi = y[idx], groups[idx]
        if objective == "pg":  # pg learns within a prompt: keep prompts with at least two labels
            _, inv, cnt = np.unique(gi, return_inverse=True, return_counts=True)
            idx, yi, gi = idx[cnt[inv] >= 2], yi[cnt[inv] >= 2], gi[cnt[inv] >= 2]
        if idx.size < 2 or (objective == "ce" and np.ptp(yi) == 0):
            return np.zeros(len(y)), None
        p = QProbe(objective=objective, random_state=rs, **probe_params).fit(X[idx], yi, groups=gi)
        return p.predict(X), p

    lab = np.flatnonzero(labelled)
    q, probe = fit(lab, seed)
    bonus = None
    if objective == "mse" and probe_params.get("hidden") is None and ensemble:
        scale = probe.scale_ if probe is not None else None
        if lab.size:
            cand = np.ones(len(y), bool) if candidates is None else np.asarray(candidates, bool)
            bonus = np.zeros(len(y))
            bonus[cand] = ridge_bonus(X[lab], X[cand], float(probe_params.get("alpha", 1.0)), scale)
    elif ensemble:
        rng = np.random.default_rng([seed, 7])
        prompts = np.unique(groups[lab])
        members = []
        for m in range(ensemble):  # resample whole prompts: pg needs its groups intact
            pick = rng.choice(prompts, size=prompts.size, replace=True)
            idx = np.concatenate([lab[groups[lab] == p] for p in pick])
            members.append(fit(idx, seed + 1 + m)[0])
        bonus = np.std(members, axis=0)
    return q, bonus


def choose(rule: str, q, bonus, candidates, budget: int, rng, c: float = 1.0) -> np.ndarray:
    """Indices of the ``budget`` candidates to label next (fewer if fewer remain).

    ``optimism``: the largest ``q + c * bonus``; ``greedy``: the largest ``q``; ``uniform``: a
    uniform draw. Ties among scores are broken at random (``rng``), so an untrained probe (q = 0)
    draws uniformly.
    """
    if rule not in RULES:
        raise QProbeError(f"exploration rule must be one of {', '.join(RULES)}, got {rule!r}")
    cand = np.flatnonzero(candidates)
    n = min(int(budget), cand.size)
    tie = rng.random(cand.size)
    if rule == "uniform" or q is None:
        return np.sort(cand[np.argsort(tie)[:n]])
    score = np.asarray(q, dtype=np.float64)[cand]
    if rule == "optimism" and bonus is not None:
        score = score + float(c) * np.asarray(bonus, dtype=np.float64)[cand]
    return np.sort(cand[np.lexsort((tie, -score))[:n]])


def argmax_pass1(q, rewards, groups) -> float:
    """Held-out pass@1 of the argmax choice, ties split evenly (a constant probe scores the base rate)."""
    from qprobe.select import group_index

    q, r = np.asarray(q, np.float64), np.asarray(rewards, np.float64)
    gi = group_index(groups)
    top = np.maximum.reduceat(q[gi.order], gi.starts)[gi.codes]
    best = np.isclose(q, top, rtol=0, atol=1e-12 * max(1.0, np.abs(q).max()))
    n_best = np.bincount(gi.codes, weights=best)
    return float(np.mean(np.bincount(gi.codes, weights=best * r) / n_best))


def run_loop(X, groups, pool, evaluate: Callable, oracle: Callable, state_path, rounds: int, budget: int,
             rule: str = "optimism", objective: str = "mse", probe_params=None, seed: int = 0, c: float = 0.1,
             ensemble: int = 5, config: dict | None = None, on_round: Callable | None = None) -> list[dict]:
    """Run (or resume) the loop; return one record per round.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    groups : ndarray of shape (n_rows,)
        Prompt label of each row.
    pool : ndarray of bool, shape (n_rows,)
        Rows whose reward may be asked for.
    evaluate : callable q -> dict
        Held-out report of the probe scores ``q`` (all rows), e.g. ``{"pass1": ...}``.
    oracle : callable indices -> rewards
        The expensive reward, asked once per chosen row.
    state_path : path
        JSON state: a header (format, rule, budget, seed, ``config``) and the committed rounds
        (rows labelled, their rewards, the report). Written atomically after each round; a run
        with the same settings resumes after the last committed round, one with other settings
        is refused.
    rounds, budget : int
        Number of rounds, labels per round.
    on_round : callable record -> None, optional
        Called after each round is committed (progress printing).
    """
    from qprobe.io import atomic_path

    if rule not in RULES:
        raise QProbeError(f"--rule must be one of {', '.join(RULES)}, got {rule!r}")
    if int(rounds) < 1 or int(budget) < 1:
        raise QProbeError("--rounds and --label-budget must be at least 1")
    probe_params = dict(probe_params or {})
    groups = np.asarray(groups)
    header = {"format": STATE_FORMAT, "rule": rule, "budget": int(budget), "seed": int(seed), "c": float(c),
              "objective": objective, "probe": probe_params, "ensemble": int(ensemble), "n_rows": int(len(groups)),
              "config": config or {}}
    state_path = Path(state_path)
    done: list[dict] = []
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise QProbeError(f"{state_path}: unreadable loop state ({str(e)[:80] or type(e).__name__}); "
                              "move it away to start over") from None
        if not isinstance(state, dict) or not isinstance(state.get("rounds"), list):
            raise QProbeError(f"{state_path}: not a loop state (expected an object with header and rounds); "
                              "move it away to start over")
        if state.get("header") != json.loads(json.dumps(header)):
            raise QProbeError(f"{state_path}: a loop with other settings; use another --state or the same settings")
        done = check_rounds(state["rounds"], pool, set(evaluate(np.zeros(len(groups)))), state_path)
    labelled = np.zeros(len(groups), dtype=bool)
    y = np.zeros(len(groups))
    for rec in done:
        labelled[rec["rows"]] = True
        y[rec["rows"]] = rec["rewards"]
    for r in range(len(done), int(rounds)):
        rng = np.random.default_rng([int(seed), r])
        q = bonus = None
        if labelled.any():
            q, bonus = fit_scores(X, y, groups, labelled, objective, probe_params, int(seed),
                                  ensemble if rule == "optimism" else 0, candidates=pool & ~labelled)
        pick = choose(rule, q, bonus, pool & ~labelled, budget, rng, c)
        if pick.size == 0:
            break
        got = np.asarray(oracle(pick), dtype=np.float64)
        if got.shape != pick.shape or not np.isfinite(got).all():
            raise QProbeError(f"the reward returned {got.shape} values for {pick.size} rows, or a non-finite one")
        labelled[pick], y[pick] = True, got
        q_new, _ = fit_scores(X, y, groups, labelled, objective, probe_params, int(seed), 0)
        rec = {"round": r, "rows": pick.tolist(), "rewards": got.tolist(), "labels": int(labelled.sum()),
               "positives": int((y[labelled] > 0).sum()), **evaluate(q_new)}
        done.append(rec)
        with atomic_path(state_path) as tmp:  # the round is committed before the next begins
            tmp.write_text(json.dumps({"header": header, "rounds": done}), encoding="utf-8")
        if on_round:
            on_round(rec)
    return done


def check_rounds(rounds: list, pool: np.ndarray, report_keys: set, where) -> list[dict]:
    """The committed rounds of a state file, checked as a schema; a QProbeError naming the round otherwise.

    Each round is ``{"round": i, "rows": [...], "rewards": [...], "labels": n, "positives": m, <report>}``:
    rows are distinct indices of pool rows (never a held-out row, never negative), labelled once
    across rounds; rewards are finite numbers, one per row; labels counts the rows so far.
    """
    labelled = np.zeros(len(pool), dtype=bool)
    need = {"round", "rows", "rewards", "labels", "positives"} | set(report_keys)
    for i, rec in enumerate(rounds):
        at = f"{where}: round {i}"
        if not isinstance(rec, dict) or not need <= set(rec):
            missing = sorted(need - set(rec)) if isinstance(rec, dict) else None
            raise QProbeError(f"{at}: expected an object with {', '.join(sorted(need))}"
                              + (f" (missing {', '.join(missing)})" if missing else ""))
        rows, rewards = rec["rows"], rec["rewards"]
        if rec["round"] != i or isinstance(rec["round"], bool):
            raise QProbeError(f"{at}: records round {rec['round']!r}")
        if not isinstance(rows, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
            raise QProbeError(f"{at}: rows must be a list of row numbers")
        bad = [r for r in rows if not 0 <= r < len(pool)]
        if bad:
            raise QProbeError(f"{at}: row {bad[0]} is out of range 0..{len(pool) - 1}")
        outside = [r for r in rows if not pool[r]]
        if outside:
            raise QProbeError(f"{at}: row {outside[0]} is not in the pool (a held-out row's label would train "
                              "the probe on the test set)")
        idx = np.asarray(rows, dtype=np.int64)
        if len(set(rows)) != len(rows) or labelled[idx].any():
            raise QProbeError(f"{at}: a row is labelled twice")
        if not isinstance(rewards, list) or len(rewards) != len(rows) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in rewards):
            raise QProbeError(f"{at}: rewards must be {len(rows)} finite numbers, one per row")
        labelled[idx] = True
        if rec["labels"] != int(labelled.sum()):
            raise QProbeError(f"{at}: labels {rec['labels']!r}, but the rounds so far label {int(labelled.sum())} rows")
        for key in ("positives", *sorted(report_keys)):
            v = rec[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise QProbeError(f"{at}: {key} must be a finite number")
    return rounds


def labels_to_reach(records: list[dict], target: float, key: str = "pass1") -> int | None:
    """Labels spent at the first round whose ``key`` reaches ``target`` (None if none does)."""
    for rec in records:
        if rec[key] >= target:
            return int(rec["labels"])
    return None

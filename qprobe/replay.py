"""The probe's gain on a committed benchmark set, with the rewards of the choices checked again now.

A benchmark set is a folder laid out like ``data/mbpp-qwen2.5-coder-0.5b/`` in a checkout:
``shards/<chunk>.rows.jsonl.gz`` (completion rows), ``shards/<chunk>.feats.npz`` (features of the same
rows, same order) and ``rewards.jsonl.gz`` (reward per ``(prompt_id, sample)``; greedy rows marked).
:func:`replay` trains a probe on the set's train+validation prompts (objective and penalty chosen by
cross-validation over prompts, as ``qprobe train --tune``), picks one completion per test prompt, and runs
the picked completions, and the base sampler's first sample of each prompt, in the sandbox again, so the
reported pass rates are measured now rather than read from the file.

It does not sample or embed: the set's completions and features were made once (see its PROVENANCE.md).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from qprobe.errors import QProbeError


def load_set(folder: str | Path, feature: str) -> tuple[list[dict], np.ndarray]:
    """Sampled rows (greedy rows left out) with their stored reward, and their `feature` matrix."""
    folder = Path(folder)
    names = sorted(p.name[: -len(".rows.jsonl.gz")] for p in (folder / "shards").glob("*.rows.jsonl.gz"))
    names = [n for n in names if not n.startswith("greedy-")]
    rewards_file = folder / "rewards.jsonl.gz"
    if not names or not rewards_file.exists():
        raise QProbeError(f"{folder}: not a benchmark set (needs shards/*.rows.jsonl.gz and rewards.jsonl.gz)")
    with gzip.open(rewards_file, "rt", encoding="utf-8") as f:
        stored = {(r["prompt_id"], r["sample"]): r for r in map(json.loads, f) if not r.get("greedy")}
    rows, feats = [], []
    for name in names:
        with gzip.open(folder / "shards" / f"{name}.rows.jsonl.gz", "rt", encoding="utf-8") as f:
            part = [json.loads(line) for line in f]
        with np.load(folder / "shards" / f"{name}.feats.npz") as z:
            if feature not in z.files:
                raise QProbeError(f"{folder}/shards/{name}.feats.npz: no feature {feature!r} (has {', '.join(z.files)})")
            X = z[feature]
        if len(X) != len(part):
            raise QProbeError(f"{folder}/shards/{name}: {len(part)} rows but {len(X)} feature rows")
        for r in part:
            key = (r["prompt_id"], r["sample"])
            if key not in stored:
                raise QProbeError(f"{folder}/rewards.jsonl.gz: no reward for {key}")
            r["reward"] = float(stored[key]["reward"])
        rows += part
        feats.append(X.astype(np.float32))
    return rows, np.concatenate(feats)


def replay(folder: str | Path, feature: str, objectives=("mse", "ce", "pg"), folds: int = 5, k: int = 8,
           recheck: bool = True, workers: int | None = None, echo=print) -> dict:
    """Train on train+validation, choose on test, and (optionally) rerun the chosen and the base samples.

    Returns a dict with the test prompts' base pass@1 (mean of k, stored), the probe's pass@1 at its CV
    beta (stored), best-of-k, and with ``recheck`` the pass rates measured now in the sandbox of the
    probe's argmax choice and of each prompt's sample 0 (a draw from the base sampler).
    """
    from qprobe.pipeline import group_ids
    from qprobe.probe import QProbe
    from qprobe.select import selection_report
    from qprobe.tune import tune

    rows, X = load_set(folder, feature)
    split = np.array([r.get("split") for r in rows])
    y = np.array([r["reward"] for r in rows])
    g = group_ids(rows)
    tr, te = np.isin(split, ["train", "validation"]), split == "test"
    if not tr.any() or not te.any():
        raise QProbeError(f"{folder}: needs rows of split train/validation and test")
    echo(f"  {int(tr.sum())} training rows ({len(np.unique(g[tr]))} prompts), "
         f"{len(np.unique(g[te]))} test prompts x {k}; feature {feature}")
    # objective, penalty and beta by cross-validation over training prompts only (never on test)
    tuned = {obj: tune(X[tr], y[tr], g[tr], obj, folds=folds, random_state=0, k=k) for obj in objectives}
    best = max(tuned, key=lambda o: tuned[o].cv_reward)
    t = tuned[best]
    echo(f"  cross-validation chose {best} ({t.params}, beta {t.beta}); CV pass@1 "
         + ", ".join(f"{o} {tuned[o].cv_reward:.3f}" for o in objectives))
    q = QProbe(best, beta=t.beta, k=k, random_state=0, **t.params).fit(X[tr], y[tr], groups=g[tr]).predict(X[te])
    rep = selection_report(q, y[te], g[te], t.beta)
    out = {"objective": best, "beta": t.beta, "n_test_prompts": int(len(np.unique(g[te]))),
           "base_pass1": rep["base_reward"], "probe_pass1": rep["probe_reward"], "kl": rep["kl"],
           "oracle_pass1": rep["oracle_reward"]}
    if recheck:
        from qprobe.rewards import score_rows

        te_idx = np.flatnonzero(te)
        best_of: dict = {}  # prompt -> (q, row index) of its highest-Q sample (first on ties)
        for i, qi in zip(te_idx, q):
            p = rows[i]["prompt_id"]
            if p not in best_of or qi > best_of[p][0]:
                best_of[p] = (qi, i)
        chosen = [rows[i] for _, i in best_of.values()]
        first = [rows[i] for i in te_idx if rows[i]["sample"] == 0]
        echo(f"  running {len(chosen)} probe-chosen and {len(first)} base completions in the sandbox again")
        got = score_rows(chosen + first, "code", workers=workers, timeout=3.0)
        r = np.array([v for v, _ in got])
        out.update(rechecked_probe_pass1=float(r[: len(chosen)].mean()),
                   rechecked_base_pass1=float(r[len(chosen):].mean()),
                   rechecked_agree=float(np.mean([v == c["reward"] for v, c in zip(r, chosen + first)])))
    return out

"""Committed benchmark sets: read them, choose a probe by cross-validation, and compare it with the
policies a practitioner would otherwise use, in two settings.

A benchmark set is a folder laid out like ``data/mbpp-qwen2.5-coder-0.5b/`` in a checkout:

    shards/<chunk>.rows.jsonl.gz   completion rows (``greedy-*`` chunks: one T = 0 sample per test prompt)
    shards/<chunk>.feats.npz       float16 features of a few extractors, same rows, same order
    rewards.jsonl.gz               ``reward`` per (prompt_id, sample[, greedy])
    shown.jsonl.gz                 optional: ``shown`` per (prompt_id, sample[, greedy]), the outcome of
                                   the tests the prompt shows (``experiments/mbpp_shown.py``)

The two settings (:func:`compare_settings`):

* **A, nothing runs at inference** (the paper's): likelihood reranking against the probe, whose
  extractor (with or without the log-prob signals) and objective are chosen by cross-validation
  over training prompts.
* **B, the shown tests run at inference**: the shown-test filter, the filter then likelihood, the
  cascade (the filter, then a probe trained on the rows it keeps), and the probe with the shown
  outcome among its input signals.

Every policy's score is its expected pass@1 per test prompt; each gets a paired bootstrap interval
against the best policy without a probe in its setting. :func:`replay` is `qprobe demo`'s part 2.
It does not sample or embed: a set's completions and features were made once (its PROVENANCE.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qprobe.errors import QProbeError
from qprobe.io import iter_jsonl

LOGPROB_SIGNALS = ("logprob_sum", "logprob_mean")  # the likelihood statistics a probe may take as inputs
DATA = Path(__file__).resolve().parents[1] / "data"  # a checkout's committed sets (absent from a wheel)
# how the committed sets were sampled (experiments/mbpp_sample.py; experiments/guided.py samples the same way)
SAMPLING = dict(temperature=0.8, top_p=0.95, max_new_tokens=300, code_block=True)
# model alias -> its committed set in a checkout
SETS = {
    "smollm2-135m": DATA / "mbpp",
    "qwen2.5-coder-0.5b": DATA / "mbpp-qwen2.5-coder-0.5b",
    "humaneval-qwen2.5-coder-0.5b": DATA / "humaneval-qwen2.5-coder-0.5b",  # the MBPP table's transfer row
}


# --------------------------------------------------------------------------- reading
def is_greedy(row: dict) -> bool:
    """Greedy chunks hold one T = 0 completion per test prompt, with the same (prompt_id, sample) keys."""
    return str(row.get("chunk", "")).startswith("greedy-")


def _key(row: dict, greedy: bool) -> tuple:
    return row["prompt_id"], int(row["sample"]), greedy


def read_set(folder: str | Path, features=None, with_rewards: bool = True, skip_unscored: bool = False,
             echo=None) -> tuple[list[dict], dict[str, np.ndarray]]:
    """All rows of a set (each with its ``chunk``), their stored ``reward`` and, where the set has
    ``shown.jsonl.gz``, ``shown``; and its features, float32, one matrix per extractor.

    Parameters
    ----------
    folder : str or Path
    features : sequence of str or None
        Extractors to load (None: every one the shards hold).
    with_rewards : bool
        Attach the stored rewards; a row without one is an error, or with ``skip_unscored`` left out.
    echo : callable or None
        Told about rows left out.

    Raises
    ------
    QProbeError
        The folder is not a set, a feature is missing, a shard's rows and features differ in length.
    """
    folder = Path(folder)
    shards = folder / "shards"
    names = sorted(p.name[: -len(".rows.jsonl.gz")] for p in shards.glob("*.rows.jsonl.gz"))
    rewards_file = folder / "rewards.jsonl.gz"
    if not names or (with_rewards and not rewards_file.exists()):
        raise QProbeError(f"{folder}: not a benchmark set (needs shards/*.rows.jsonl.gz and rewards.jsonl.gz)")
    rows: list[dict] = []
    feats: dict[str, list] = {}
    for name in names:
        part = [{**r, "chunk": name} for r in iter_jsonl(shards / f"{name}.rows.jsonl.gz")]
        with np.load(shards / f"{name}.feats.npz") as z:
            for key in (features if features is not None else z.files):
                if key not in z.files:
                    raise QProbeError(f"{shards}/{name}.feats.npz: no feature {key!r} (has {', '.join(z.files)})")
                if len(z[key]) != len(part):
                    raise QProbeError(f"{shards}/{name}: {len(part)} rows but {len(z[key])} feature rows")
                feats.setdefault(key, []).append(z[key])
        rows += part
    out = {k: np.concatenate(v).astype(np.float32) for k, v in feats.items()}
    if not with_rewards:
        return rows, out
    stored = {_key(r, bool(r.get("greedy"))): r for r in iter_jsonl(rewards_file)}
    shown_file = folder / "shown.jsonl.gz"
    shown = {_key(r, bool(r.get("greedy"))): r for r in iter_jsonl(shown_file)} if shown_file.exists() else None
    keep = np.array([_key(r, is_greedy(r)) in stored for r in rows])
    if not keep.all():
        if not skip_unscored:
            first = rows[int(np.argmin(keep))]
            raise QProbeError(f"{rewards_file}: no reward for {_key(first, is_greedy(first))} "
                              f"({int((~keep).sum())} rows unscored)")
        if echo:
            echo(f"left out {int((~keep).sum())} rows without a reward yet")
        rows = [r for r, k in zip(rows, keep) if k]
        out = {k: v[keep] for k, v in out.items()}
    for r in rows:
        key = _key(r, is_greedy(r))
        r["reward"], r["reward_reason"] = float(stored[key]["reward"]), stored[key].get("reward_reason", "")
        if shown is not None and key in shown:
            r["shown"] = float(shown[key]["shown"])
    return rows, out


def load(kind: str | None = None, model: str = "smollm2-135m", with_rewards: bool = True,
         skip_unscored: bool = False, echo=None) -> tuple[list[dict], dict[str, np.ndarray]]:
    """:func:`read_set` of a committed set (``SETS[model]``), only chunks of `kind` (test, train, greedy)."""
    if model not in SETS:
        raise QProbeError(f"unknown benchmark set {model!r}; expected one of {', '.join(SETS)}")
    rows, feats = read_set(SETS[model], with_rewards=with_rewards, skip_unscored=skip_unscored, echo=echo)
    if kind is None:
        return rows, feats
    keep = np.array([r["chunk"].startswith(kind + "-") for r in rows])
    return [r for r, k in zip(rows, keep) if k], {k: v[keep] for k, v in feats.items()}


def load_set(folder: str | Path, feature: str) -> tuple[list[dict], np.ndarray]:
    """Sampled rows (greedy rows left out) with their stored reward, and their `feature` matrix."""
    rows, feats = read_set(folder, features=[feature])
    keep = np.array([not is_greedy(r) for r in rows])
    return [r for r, k in zip(rows, keep) if k], feats[feature][keep]


# --------------------------------------------------------------------------- choosing a probe
@dataclass
class Choice:
    """A probe configuration chosen by cross-validation over training prompts (never on test)."""

    features: str  # the key of the chosen input (an extractor, maybe "+logp")
    objective: str
    params: dict  # the chosen penalty (alpha or epochs) and fixed parameters (signals, cascade, k)
    beta: float
    cv_reward: float
    cv: dict = field(default_factory=dict)  # "features/objective" -> CV expected reward


def choose_probe(inputs: dict, y, groups, objectives=("ce",), folds: int = 5, seed: int = 0, echo=None,
                 **fixed) -> Choice:
    """Tune every (input, objective) pair by cross-validation over prompts (:func:`qprobe.tune.tune`)
    and keep the one of best held-out expected reward.

    Parameters
    ----------
    inputs : dict of name -> (X, params)
        Candidate inputs: a feature matrix (signal columns last) and the QProbe parameters that go
        with it (``signals``, ``cascade``).
    y, groups : array-like of shape (n_rows,)
    **fixed
        QProbe parameters shared by all (``k``, ...).
    """
    from qprobe.tune import tune

    best, cv = None, {}
    for name, (X, params) in inputs.items():
        for obj in objectives:
            t = tune(X, y, groups, obj, folds=folds, random_state=seed, **fixed, **params)
            cv[f"{name}/{obj}"] = t.cv_reward
            if echo:
                echo(f"  CV {name:<28} {obj:<4} {t.cv_reward:.3f}")
            if best is None or t.cv_reward > best.cv_reward:
                best = Choice(name, obj, {**fixed, **params, **t.params}, t.beta, t.cv_reward)
    best.cv = cv
    return best


def fit_choice(choice: Choice, X, y, groups, seed: int = 0):
    """The chosen probe fitted on all of ``X``."""
    from qprobe.probe import QProbe

    return QProbe(objective=choice.objective, beta=choice.beta, random_state=seed, **choice.params).fit(
        X, y, groups=groups)


# --------------------------------------------------------------------------- the two settings
def candidate_inputs(rows: list[dict], feats: dict, signals=(), cascade=None, with_logprobs: bool = True) -> dict:
    """``{name: (X, params)}`` for :func:`choose_probe`: each extractor, and each with the log-prob
    statistics appended (``+logp``) when the rows carry ``token_logprobs``; plus ``signals`` (and the
    ``cascade``) on every one."""
    from qprobe.signals import with_signals

    has_lp = with_logprobs and all(isinstance(r.get("token_logprobs"), list) for r in rows)
    out = {}
    for key, X in feats.items():
        for extra in ((), LOGPROB_SIGNALS) if has_lp else ((),):
            sig = tuple(signals) + extra
            name = key + ("+logp" if extra else "")
            out[name] = (with_signals(X, rows, sig), {"signals": sig, "cascade": cascade} if sig else {})
    return out


def _subset(inputs: dict, idx) -> dict:
    return {k: (X[idx], p) for k, (X, p) in inputs.items()}


def compare_settings(rows: list[dict], feats: dict, train, test, objectives=("ce",), folds: int = 5,
                     seed: int = 0, k: int = 8, echo=None) -> dict:
    """Every policy of settings A and B on the test rows, the probes chosen on the training rows.

    Parameters
    ----------
    rows, feats : from :func:`read_set` (sampled rows only)
    train, test : boolean masks over rows

    Returns
    -------
    dict with ``per_prompt`` (policy -> per-test-prompt expected reward), ``choices`` (setting ->
    :class:`Choice`), ``table`` (setting -> :func:`qprobe.compare.compare` rows against the best
    policy without a probe in that setting), ``n_prompts_mixed_after_filter``, ``shown_precision``
    (the share of test rows passing the shown test that pass the hidden ones),
    ``hidden_passers_failing_shown`` (test rows that pass the hidden tests but not the shown one) and ``q`` (policy ->
    test scores of each probe).
    """
    from qprobe.compare import paired_bootstrap, per_prompt_reward, policies
    from qprobe.pipeline import group_ids
    from qprobe.signals import cascade_mask, signal_columns

    y = np.array([r["reward"] for r in rows], dtype=float)
    g = group_ids(rows)
    tr, te = np.flatnonzero(train), np.flatnonzero(test)
    has_lp = all(isinstance(r.get("token_logprobs"), list) for r in rows)
    lp = signal_columns(rows, ["logprob_sum"])[:, 0] if has_lp else None
    has_shown = all("shown" in r for r in rows)
    shown = np.array([r["shown"] for r in rows], dtype=float) if has_shown else None
    per = policies(y[te], g[te], logprob=None if lp is None else lp[te],
                   filters={"shown": shown[te]} if has_shown else None)
    choices, q, probes = {}, {}, {}
    settings = {"A": {"signals": (), "cascade": None}}
    if has_shown:
        settings["B: cascade"] = {"signals": ("shown",), "cascade": "shown"}
        settings["B: signals"] = {"signals": ("shown",), "cascade": None}
    names = {"A": "probe", "B: cascade": "cascade probe", "B: signals": "probe with signals"}
    for setting, kw in settings.items():
        inputs = candidate_inputs(rows, feats, **kw)
        if setting != "A":  # B reuses the input A chose (its extractor, with or without log-probs)
            inputs = {choices["A"].features: inputs[choices["A"].features]}
        if echo:
            echo(f"{setting}: choosing the probe's input and objective by {folds}-fold CV on training prompts")
        choice = choose_probe(_subset(inputs, tr), y[tr], g[tr], objectives, folds, seed, echo, k=k)
        X = inputs[choice.features][0]
        probe = fit_choice(choice, X[tr], y[tr], g[tr], seed)
        qt = probe.predict(X[te])
        cand = probe.candidates(X[te], g[te])
        per[names[setting]] = per_prompt_reward(qt, y[te], g[te], 0.0, cand)
        choices[setting], q[names[setting]], probes[names[setting]] = choice, qt, probe
    # the reference of each setting: its best policy without a probe
    ref_a = "likelihood" if "likelihood" in per else "base"
    ref_b = max((p for p in per if p.startswith("filter:")), key=lambda p: per[p].mean(), default=None)
    table = {}
    for setting, policies_in, ref in (("A", ["base", "likelihood", "probe"], ref_a),
                                      ("B", ["filter:shown", "filter:shown + likelihood", "cascade probe",
                                             "probe with signals"], ref_b)):
        if ref is None:
            continue
        table[setting] = [
            {"policy": p, "reward": float(per[p].mean()), "vs": ref,
             **(paired_bootstrap(per[p], per[ref]) if p != ref else {"diff": 0.0, "lo": 0.0, "hi": 0.0})}
            for p in policies_in if p in per]
    mixed = precision = missed = None
    if has_shown:  # test prompts whose shown-test passers differ in their hidden outcome
        m = cascade_mask(shown[te], g[te]) & (shown[te] > 0)
        gte = g[te]
        mixed = sum(1 for p in np.unique(gte) if len(set(y[te][(gte == p) & m])) > 1)
        passed = shown[te] > 0
        precision = float((y[te][passed] >= 1).mean()) if passed.any() else None  # P(hidden pass | shown pass)
        missed = int(((y[te] >= 1) & ~passed).sum())  # rows passing the hidden tests but failing the shown one
    return {"per_prompt": per, "choices": choices, "table": table, "n_prompts_mixed_after_filter": mixed, "q": q,
            "probes": probes, "oracle": float(per["best-of-k"].mean()), "shown_precision": precision,
            "hidden_passers_failing_shown": missed}


def transfer(result: dict, rows: list[dict], feats: dict) -> dict:
    """The probes of :func:`compare_settings` applied, unchanged, to another set's rows (HumanEval),
    beside that set's own baselines; per-prompt expected rewards, and the same two tables."""
    from qprobe.compare import paired_bootstrap, per_prompt_reward, policies
    from qprobe.pipeline import group_ids
    from qprobe.signals import signal_columns

    y = np.array([r["reward"] for r in rows], dtype=float)
    g = group_ids(rows)
    has_lp = all(isinstance(r.get("token_logprobs"), list) for r in rows)
    has_shown = all("shown" in r for r in rows)
    per = policies(y, g, logprob=signal_columns(rows, ["logprob_sum"])[:, 0] if has_lp else None,
                   filters={"shown": np.array([r["shown"] for r in rows])} if has_shown else None)
    for name, probe in result["probes"].items():
        setting = {"probe": "A", "cascade probe": "B: cascade", "probe with signals": "B: signals"}[name]
        if probe.signals and "shown" in probe.signals and not has_shown:
            continue
        base = result["choices"][setting].features.split("+")[0]
        X = candidate_inputs(rows, {base: feats[base]}, signals=tuple(s for s in probe.signals
                                                                        if s not in LOGPROB_SIGNALS),
                             cascade=probe.cascade, with_logprobs="+logp" in result["choices"][setting].features)
        X = X[result["choices"][setting].features][0]
        per[name] = per_prompt_reward(probe.predict(X), y, g, 0.0, probe.candidates(X, g))
    table = {}
    ref_a = "likelihood" if "likelihood" in per else "base"
    for setting, names, ref in (("A", ["base", "likelihood", "probe"], ref_a),
                                ("B", ["filter:shown", "filter:shown + likelihood", "cascade probe",
                                       "probe with signals"],
                                max((p for p in per if p.startswith("filter:")), key=lambda p: per[p].mean(),
                                    default=None))):
        if ref is None:
            continue
        table[setting] = [{"policy": p, "reward": float(per[p].mean()), "vs": ref,
                           **(paired_bootstrap(per[p], per[ref]) if p != ref else {"diff": 0.0, "lo": 0.0, "hi": 0.0})}
                          for p in names if p in per]
    return {"per_prompt": per, "table": table, "oracle": float(per["best-of-k"].mean())}


# --------------------------------------------------------------------------- `qprobe demo`, part 2
def _pick(scores, groups, candidates=None) -> np.ndarray:
    """Row index of each group's highest score among its candidates (first on ties)."""
    from qprobe.select import select_indices

    return select_indices(np.asarray(scores, dtype=float), groups, 0.0, candidates=candidates)


def replay(folder: str | Path, feature: str, objectives=("mse", "ce", "pg"), folds: int = 5, k: int = 8,
           recheck: bool = True, workers: int | None = None, echo=print, seed: int = 0) -> dict:
    """Train on train+validation, choose on test, and (optionally) run every policy's choices again.

    Policies (each one completion per test prompt): the base sampler (each prompt's sample 0), the
    likelihood (max summed token log-prob, where rows carry them), the probe (objective, penalty and
    beta by cross-validation on training prompts, on `feature`); and where the set has ``shown``: the
    shown-test filter (a uniform draw among the passers, seeded), the filter then likelihood, and the cascade (the filter, then a
    probe on `feature` + the log-prob statistics chosen the same way). Stored pass@1 is the expected
    value over each policy's ties and draws; with ``recheck`` the chosen completions run in the
    sandbox again and ``rechecked_<policy>`` is the pass rate measured now.
    """
    from qprobe.pipeline import group_ids
    from qprobe.select import selection_report
    from qprobe.signals import cascade_mask, signal_columns

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
    t = choose_probe({feature: (X[tr], {})}, y[tr], g[tr], objectives, folds, seed, k=k)
    echo(f"  cross-validation chose {t.objective} ({ {p: v for p, v in t.params.items() if p != 'k'} }, "
         f"beta {t.beta}); CV pass@1 " + ", ".join(f"{o.split('/')[1]} {v:.3f}" for o, v in t.cv.items()))
    best = t.objective
    q = fit_choice(t, X[tr], y[tr], g[tr], seed).predict(X[te])
    rep = selection_report(q, y[te], g[te], t.beta)
    out = {"objective": best, "beta": t.beta, "n_test_prompts": int(len(np.unique(g[te]))),
           "base_pass1": rep["base_reward"], "probe_pass1": rep["probe_reward"], "kl": rep["kl"],
           "oracle_pass1": rep["oracle_reward"]}
    te_idx = np.flatnonzero(te)
    rte, yte, gte = [rows[i] for i in te_idx], y[te], g[te]
    picks = {"base": np.array([i for i, r in enumerate(rte) if int(r["sample"]) == 0]), "probe": _pick(q, gte)}
    if all(isinstance(r.get("token_logprobs"), list) for r in rte):
        lp = signal_columns(rte, ["logprob_sum"])[:, 0]
        picks["likelihood"] = _pick(lp, gte)
        out["likelihood_pass1"] = float(np.mean(yte[picks["likelihood"]]))
    if all("shown" in r for r in rows):
        shown = np.array([r["shown"] for r in rows], dtype=float)
        from qprobe.compare import per_prompt_reward

        m = cascade_mask(shown[te], gte)
        out["shown_filter_pass1"] = float(per_prompt_reward(np.zeros(len(yte)), yte, gte, candidates=m).mean())
        draw = np.random.default_rng(seed).random(len(yte))  # a uniform draw among the passers
        picks["shown filter"] = _pick(draw, gte, m)
        if "likelihood" in picks:
            picks["shown filter + likelihood"] = _pick(lp, gte, m)
            out["shown_filter_logprob_pass1"] = float(np.mean(yte[picks["shown filter + likelihood"]]))
        inputs = candidate_inputs(rows, {feature: X}, signals=("shown",), cascade="shown")
        choice = choose_probe(_subset(inputs, np.flatnonzero(tr)), y[tr], g[tr], ("ce",), folds, seed, k=k)
        Xc = inputs[choice.features][0]
        probe = fit_choice(choice, Xc[tr], y[tr], g[tr], seed)
        qc = probe.predict(Xc[te])
        picks["cascade probe"] = _pick(qc, gte, probe.candidates(Xc[te], gte))
        out["cascade_probe_pass1"] = float(np.mean(yte[picks["cascade probe"]]))
        out["cascade_features"] = choice.features
        echo(f"  cascade: the shown-test filter, then a ce probe on {choice.features} (CV pass@1 "
             f"{choice.cv_reward:.3f})")
    out["picked_pass1"] = {p: float(np.mean(yte[idx])) for p, idx in picks.items()}
    if recheck:
        from qprobe.rewards import score_rows

        unique = sorted({int(i) for idx in picks.values() for i in idx})
        echo(f"  running the {len(unique)} distinct completions the {len(picks)} policies chose in the sandbox again")
        got = dict(zip(unique, (v for v, _ in score_rows([rte[i] for i in unique], "code", workers=workers,
                                                          timeout=3.0))))
        out["rechecked"] = {p: float(np.mean([got[int(i)] for i in idx])) for p, idx in picks.items()}
        out["rechecked_agree"] = float(np.mean([got[i] == yte[i] for i in unique]))
        out["rechecked_probe_pass1"] = out["rechecked"]["probe"]
        out["rechecked_base_pass1"] = out["rechecked"]["base"]
    return out

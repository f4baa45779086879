"""File-level steps of the pipeline: read rows, check them, call the library, write rows.

    prompts --sample--> completions --reward--> rewarded --embed--> features
    rewarded + features --train--> probe;  + probe --rerank / eval--> chosen rows / report

The CLI is a thin layer over these functions; they raise `QProbeError` with one
line naming the file, row or flag at fault, and write every output atomically.
Long steps go through the on-disk cache, so a killed run resumes.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from qprobe.cache import Cache, make_key
from qprobe.cachedmap import cached_map
from qprobe.errors import QProbeError
from qprobe.io import (
    check_features_output,
    check_outputs,
    check_unique_keys,
    finite_or_error,
    load_features,
    read_jsonl,
    require_fields,
    save_features,
    write_jsonl,
)


# --------------------------------------------------------------------------- row checks
def read_prompts(path) -> list[dict]:
    rows = read_jsonl(path)
    if not rows:
        raise QProbeError(f"{path}: no rows")
    require_fields(rows, ["prompt_id", "prompt"], path)
    check_unique_keys(rows, path, keys=("prompt_id",))
    for i, r in enumerate(rows, 1):
        p = r["prompt"]
        ok = isinstance(p, str) or (
            isinstance(p, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in p)
        )
        if not ok:
            raise QProbeError(f"{path}: row {i}: 'prompt' must be a string or a list of {{role, content}} messages")
    return rows


def read_completions(path, need_reward: bool = False) -> list[dict]:
    rows = read_jsonl(path)
    if not rows:
        raise QProbeError(f"{path}: no rows")
    require_fields(rows, ["prompt_id", "prompt", "sample", "completion"], path)
    check_unique_keys(rows, path)
    for i, r in enumerate(rows, 1):
        if not isinstance(r["completion"], str):
            raise QProbeError(f"{path}: row {i}: 'completion' must be a string")
    if need_reward:
        require_fields(rows, ["reward"], path, hint="run `qprobe reward` first")
        for i, r in enumerate(rows, 1):
            r["reward"] = finite_or_error(r["reward"], f"{path}: row {i}")
    return rows


def _where_matches(value: Any, allowed: set[str]) -> bool:
    """Does a row's field value equal one of the --where values?

    Strings compare as written; numbers compare as numbers (``reward=1`` matches a
    stored 1 or 1.0); ``true``/``false``/``null`` match JSON true/false/null.
    """
    if value is None:
        return "null" in allowed
    if isinstance(value, bool):
        return ("true" if value else "false") in allowed
    if isinstance(value, (int, float)):
        for a in allowed:
            try:
                if float(a) == value:
                    return True
            except ValueError:
                continue
        return False
    return isinstance(value, str) and value in allowed


def select_rows(rows: list[dict], where: Sequence[str] | None, path: Any = "rows") -> np.ndarray:
    """Indices of rows matching every `FIELD=V1,V2` filter (see `_where_matches`).

    A row without FIELD matches nothing; a FIELD that no row has is an error (a typo).
    """
    keep = np.ones(len(rows), dtype=bool)
    for cond in where or ():
        if "=" not in cond:
            raise QProbeError(f"--where {cond!r}: expected FIELD=VALUE[,VALUE...]")
        field, values = cond.split("=", 1)
        if not any(field in r for r in rows):
            raise QProbeError(f"--where {cond!r}: no row of {path} has a field {field!r}")
        allowed = set(values.split(","))
        keep &= np.array([field in r and _where_matches(r[field], allowed) for r in rows])
    if not keep.any():
        raise QProbeError(f"{path}: no rows match --where {' '.join(where or [])}")
    return np.flatnonzero(keep)


def group_ids(rows: Sequence[dict]) -> np.ndarray:
    """Integer group label per row from its prompt_id (JSON-encoded so 1 and "1" differ)."""
    labels: dict[str, int] = {}
    return np.array([labels.setdefault(json.dumps(r["prompt_id"]), len(labels)) for r in rows])


# --------------------------------------------------------------------------- steps
def sample_file(src, dst, sampler, k: int, seed: int = 0, cache: Cache | None = None, progress=True) -> list[dict]:
    check_outputs([dst], [src])
    rows = read_prompts(src)
    if k < 1:
        raise QProbeError("-k must be at least 1")
    out = sampler.sample(rows, k=k, seed=seed, cache=cache, progress=progress)
    write_jsonl(dst, out)
    return out


def reward_file(src, dst, kind: str, cache: Cache | None = None, workers=None, timeout: float = 3.0,
                progress=True, chunk: int = 16, into: str = "reward") -> list[dict]:
    """Score every row into the field `into` (its reason into `<into>_reason`); other fields are
    kept, so a signal (``--kind code:shown_tests --into shown``) sits beside the reward.
    Results are cached in chunks, so a killed run resumes."""
    from qprobe.rewards import reward_identity, score_rows

    if not into.isidentifier():
        raise QProbeError(f"--into {into!r}: expected a field name (letters, digits, _)")
    check_outputs([dst], [src])
    rows = read_completions(src)
    identity = reward_identity(kind, timeout=timeout)  # an edited python: reward or upgraded plugin: a new key
    scored = {"reward", "reward_reason", into, f"{into}_reason"}  # outputs, not inputs, of the reward
    keys = [make_key(identity, {k: v for k, v in r.items() if k not in scored}) for r in rows]

    def compute(pending: list[int]):
        for s in range(0, len(pending), chunk):  # a chunk of programs on the pool, cached together
            idx = pending[s : s + chunk]
            scores = score_rows([rows[i] for i in idx], kind, workers=workers, timeout=timeout, progress=False)
            yield [(i, [float(r), str(why)]) for i, (r, why) in zip(idx, scores)]

    done, _ = cached_map(keys, compute, cache, desc="reward", unit="row", progress=progress)
    out = []
    for r, key in zip(rows, keys):
        reward, reason = done[key]
        out.append({**r, into: reward, f"{into}_reason": reason})
    write_jsonl(dst, out)
    return out


def prefix_rows(rows: list[dict], path: Any = "rows") -> list[dict]:
    """One row per kept prefix of each completion, in order: the row with `completion` cut to
    the prefix and `prefix` (its length in characters), from `prefix_chars` written by
    `qprobe sample --prefix-every`. A prefix row keeps its completion's `reward`."""
    require_fields(rows, ["prefix_chars"], path, hint="sample with --prefix-every N|line and --capture")
    out = []
    for i, r in enumerate(rows, 1):
        pc, n = r["prefix_chars"], len(r["completion"])
        if not (isinstance(pc, list) and pc and all(isinstance(c, int) and 0 <= c <= n for c in pc)
                and pc == sorted(set(pc))):
            raise QProbeError(f"{path}: row {i}: 'prefix_chars' must be increasing character counts within "
                              f"the completion ({n} characters)")
        out += [{**r, "completion": r["completion"][:c], "prefix": c} for c in pc]
    return out


def embed_file(src, dst, embedder, cache: Cache | None = None, batch_size=None, progress=True,
               prefix: bool = False) -> np.ndarray:
    """Features of every row, or with `prefix` of every kept prefix of every row (`prefix_rows`)."""
    from pathlib import Path

    check_outputs([dst, Path(str(dst) + ".json")], [src])
    check_features_output(dst)  # before any model call
    rows = read_completions(src)
    if prefix:
        rows = prefix_rows(rows, src)
    X = embedder.embed([(r["prompt"], r["completion"]) for r in rows], cache=cache, batch_size=batch_size,
                       progress=progress)
    save_features(dst, X, rows, embedder.identity())
    return X


def take_rows(X: np.ndarray, idx) -> np.ndarray:
    """``X[idx]``, but X itself when idx is every row in order.

    X may be a memory map of a file larger than RAM: fancy indexing would copy it
    whole, so the common case (no ``--where``) keeps the map.
    """
    idx = np.asarray(idx, dtype=np.int64)
    if idx.shape[0] == X.shape[0] and np.array_equal(idx, np.arange(X.shape[0])):
        return X
    return X[idx]


def load_rows_features(rows_path, features_path, need_reward=True, where=None, features_unchecked=False,
                       prefix=False):
    rows = read_completions(rows_path, need_reward=need_reward)
    if prefix:
        rows = prefix_rows(rows, rows_path)
    X, meta = load_features(features_path, rows, unchecked=features_unchecked)
    idx = select_rows(rows, where, rows_path)
    rows = [rows[i] for i in idx]
    return rows, take_rows(X, idx), meta


def train_file(rows_path, features_path, out_dir, where=None, tune_folds=None, features_unchecked=False,
               prefix=False, demos=None, demo_weight=None, demo_template="{demo}", reward_transform="none", cache=None,
               signals=(), cascade=None, demos_api_key=None, **probe_params):
    """Fit and save a probe; with ``tune_folds``, regularisation and beta come from cross-validation.

    With ``prefix``, a value probe: one training row per kept prefix (features from
    `embed --prefix`), labelled with its completion's final reward; the file records it.
    ``demos``: a field of the rows or a JSONL file of demonstrations (:mod:`qprobe.demos`), embedded
    with the features' own extractor and added with weight ``demo_weight`` (None: chosen by the
    cross-validation among ``tune.DEMO_WEIGHTS`` when tuning, else 1). ``reward_transform``: the
    training targets (:mod:`qprobe.transforms`); beta is still chosen on the raw reward.
    ``signals``: row fields appended to the features as probe inputs, ``cascade``: the one the probe
    filters by (:mod:`qprobe.signals`); both are recorded in the probe file.

    The recipe (targets, demonstrations, tuning, weights) is :func:`qprobe.fit.fit_probe`; this
    function reads, embeds the demonstrations, calls it and saves.

    Returns (probe, number of rows, TuneResult or None, info dict: ``n_demos``, ``demo_weight``).
    """
    from qprobe.fit import fit_probe
    from qprobe.transforms import parse_transform

    check_outputs([out_dir], [rows_path, features_path])
    from qprobe.signals import check_names, with_signals

    rows, X, meta = load_rows_features(rows_path, features_path, where=where, features_unchecked=features_unchecked,
                                       prefix=prefix)
    signals = check_names(signals, "--signal")
    if cascade is not None and cascade not in signals:
        signals = signals + (cascade,)  # the cascade's field is recorded with the signals
    if signals and (demos or prefix):
        raise QProbeError("--signal/--cascade do not combine with --demos or --prefix (those rows have no signals)")
    X = with_signals(X, rows, signals, rows_path)
    if signals:
        probe_params = {**probe_params, "signals": signals, "cascade": cascade}
    parse_transform(reward_transform)  # flag errors before any demonstration is embedded
    objective = probe_params.get("objective", "pg")
    if objective == "pref" and (demos or reward_transform != "none"):
        raise QProbeError("--demos and --reward-transform work with objectives mse, ce and pg, not pref")
    y = np.array([r["reward"] for r in rows])
    groups = group_ids(rows)
    demo_arrays = None
    if demos:
        from qprobe.demos import demo_items, embedder_from_identity

        items = demo_items(rows, demos, demo_template, rows_path)
        label = {json.dumps(r["prompt_id"]): g for r, g in zip(rows, groups)}  # prompt -> group label
        gd = np.array([label[json.dumps(pid)] for pid, _, _ in items])
        emb = embedder_from_identity(meta.get("extractor"), demos_api_key)
        Xd = emb.embed([(p, c) for _, p, c in items], cache=cache, desc="demonstrations").astype(X.dtype)
        demo_arrays = (Xd, gd)
    random_state = probe_params.pop("random_state", None)
    probe, tuned, info = fit_probe(X, y, groups, demos=demo_arrays, demo_weight=demo_weight, transform=reward_transform,
                                   tune_folds=tune_folds, random_state=random_state, progress=True, **probe_params)
    probe.save(out_dir, embedder=meta.get("extractor"), prefix=prefix)
    return probe, len(rows), tuned, info


def _load_probe_for(probe_dir, X, meta, features_path):
    from qprobe.probe import QProbe

    probe = QProbe.load(probe_dir)
    try:
        probe.check_features(X.shape[1] + len(probe.signals or ()), meta.get("extractor"))
    except QProbeError as e:  # name both files: which features, which probe
        raise QProbeError(f"{features_path} does not fit the probe in {probe_dir}: {e}") from None
    return probe


def _probe_inputs(probe, rows, X, rows_path):
    """X with the probe's recorded signals appended; one line naming the row that lacks one."""
    from qprobe.signals import with_signals

    try:
        return with_signals(X, rows, probe.signals, rows_path)
    except QProbeError as e:
        raise QProbeError(f"{e} (the probe uses signals {list(probe.signals)})") from None


def rerank_file(rows_path, features_path, probe_dir, dst, beta=None, seed=None, where=None,
                features_unchecked=False) -> list[dict]:
    check_outputs([dst], [rows_path, features_path, probe_dir])
    rows = read_completions(rows_path)
    X, meta = load_features(features_path, rows, unchecked=features_unchecked)
    idx = select_rows(rows, where, rows_path)
    rows, X = [rows[i] for i in idx], take_rows(X, idx)
    probe = _load_probe_for(probe_dir, X, meta, features_path)
    from qprobe.select import select_indices

    X = _probe_inputs(probe, rows, X, rows_path)
    g = group_ids(rows)
    q = probe.predict(X)  # one pass over X (probe.select would make a second)
    chosen = select_indices(q, g, probe.beta if beta is None else beta, seed, candidates=probe.candidates(X, g))
    out = [{**rows[i], "q": float(q[i])} for i in chosen]
    write_jsonl(dst, out)
    return out


def eval_file(rows_path, features_path, probe_dir, k=None, beta=None, where=None, features_unchecked=False,
              filters=()) -> dict:
    """The selection report on held-out rows: base, probe (at beta and argmax), oracle, KL, ESS,
    and the baselines a user would compare the probe against (:mod:`qprobe.compare`).

    ``bok_reward_at_probe_kl``: the reward best-of-n reaches at the probe's KL, interpolated on
    the curve of best-of-n (n = 1 .. k, from the same samples) against its KL bound; when the
    probe's KL is beyond best-of-k's, it is best-of-k's reward (``bok_kl_capped`` is then true).
    ``baselines``: likelihood reranking (when every row has ``token_logprobs``), each field of
    ``filters`` (and the probe's cascade) used as a filter, alone and then with likelihood, and the
    probe at argmax; each with its paired 95% bootstrap interval over prompts against the best of
    the others.
    """
    from qprobe.compare import compare, policies
    from qprobe.select import best_of_n_curve, bon_reward_at_kl, selection_report
    from qprobe.signals import check_names, signal_columns, signal_value

    rows, X, meta = load_rows_features(rows_path, features_path, where=where, features_unchecked=features_unchecked)
    if k is not None:
        keep = [i for i, r in enumerate(rows) if int(r["sample"]) < k]
        rows, X = [rows[i] for i in keep], take_rows(X, keep)
    probe = _load_probe_for(probe_dir, X, meta, features_path)
    X = _probe_inputs(probe, rows, X, rows_path)
    b = probe.beta if beta is None else beta
    q = probe.predict(X)
    y = np.array([r["reward"] for r in rows])
    g = group_ids(rows)
    cand = probe.candidates(X, g)
    rep = selection_report(q, y, g, beta=b, candidates=cand)  # every key of the selection report, plus:
    rep0 = selection_report(q, y, g, beta=0.0, candidates=cand)
    n, bon, bon_kl = best_of_n_curve(y, g)
    rep.update(beta=float(b), argmax_reward=float(rep0["probe_reward"]), argmax_kl=float(rep0["kl"]),
               bok_reward_at_probe_kl=bon_reward_at_kl(rep["kl"], n, bon, bon_kl),
               bok_kl_capped=bool(rep["kl"] > bon_kl[-1]))
    names = check_names(filters, "--filter")
    if probe.cascade is not None and probe.cascade not in names:
        names += (probe.cascade,)
    fcols = signal_columns(rows, names, rows_path)
    lp = None
    if all(isinstance(r.get("token_logprobs"), list) for r in rows):
        lp = np.array([signal_value(r, "logprob_sum") for r in rows])
    per = policies(y, g, logprob=lp, filters={nm: fcols[:, j] for j, nm in enumerate(names)},
                   probe_q=q, probe_candidates=cand)
    rep["baselines"] = compare(per)
    # plain floats for JSON; NaN (gap_closed when no prompt has a better sample) becomes null
    return {key: None if isinstance(v, float) and v != v else v for key, v in rep.items()}


def loop_file(rows_path, features_path, state_path, rounds, budget, rule="optimism", objective="mse", pool=None,
              held_out=None, kind="stored", timeout=3.0, seed=0, c=1.0, ensemble=5, probe_params=None,
              on_round=None) -> list[dict]:
    """The label-budgeted loop (:func:`qprobe.loop.run_loop`) over a rows file and its features.

    ``pool`` / ``held_out``: ``--where``-style filters for the rows whose reward may be asked for
    and the rows pass@1 is reported on (these need a stored ``reward``; they are never asked for).
    ``kind``: ``stored`` reads the asked rows' ``reward`` field (a simulated labeller); any
    ``qprobe reward`` kind computes it.
    """
    from qprobe.loop import argmax_pass1, run_loop

    rows = read_completions(rows_path)
    X, meta = load_features(features_path, rows)
    pool_mask = np.zeros(len(rows), bool)
    pool_mask[select_rows(rows, pool, rows_path)] = True
    ev = select_rows(rows, held_out, rows_path) if held_out else np.flatnonzero(~pool_mask)
    ev = ev[~pool_mask[ev]]
    if ev.size == 0:
        raise QProbeError("no held-out rows: give --held-out FIELD=V rows outside the --pool")
    for i in ev:
        if "reward" not in rows[i]:
            raise QProbeError(f"{rows_path}: row {i + 1}: held-out rows need a 'reward' (run `qprobe reward` on them)")
    y_ev = np.array([finite_or_error(rows[i]["reward"], f"{rows_path}: row {i + 1}") for i in ev])
    groups = group_ids(rows)

    def oracle(idx):
        if kind == "stored":
            missing = [int(i) + 1 for i in idx if "reward" not in rows[i]]
            if missing:
                raise QProbeError(f"{rows_path}: row {missing[0]}: no 'reward' for --kind stored")
            return [finite_or_error(rows[i]["reward"], f"{rows_path}: row {i + 1}") for i in idx]
        from qprobe.rewards import score_rows

        return [r for r, _ in score_rows([rows[i] for i in idx], kind, timeout=timeout, progress=False)]

    def evaluate(q):
        return {"pass1": argmax_pass1(q[ev], y_ev, groups[ev])}

    config = {"rows": str(rows_path), "n_pool": int(pool_mask.sum()), "n_held_out": int(ev.size), "kind": kind,
              "extractor": meta.get("extractor")}
    return run_loop(X, groups, pool_mask, evaluate, oracle, state_path, rounds, budget, rule=rule,
                    objective=objective, probe_params=probe_params, seed=seed, c=c, ensemble=ensemble,
                    config=config, on_round=on_round)

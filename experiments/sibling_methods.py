"""The README's table for the sibling papers' ideas, measured on the committed MBPP data.

    python experiments/sibling_methods.py [--model smollm2-135m] [--seeds 3] [--no-demos] [--json]

One table, three parts, all on MBPP test (500 prompts, k = 8), probes trained on train+validation:

1. Demonstrations (Tiapkin et al.): MBPP's reference solution (`code` in data/mbpp/mbpp.jsonl) of
   each training prompt, written as the model writes its answers (an opened ```python block), is
   embedded with the same extractor as the samples and added as a reward-1 row of its prompt, with a
   weight chosen by 5-fold cross-validation (0 = no demonstrations is on the grid). The features need
   one forward pass of the model per demonstration; they are cached in .qprobe-cache/.
2. Reward transforms (InfAlign, Balashankar et al.): each objective trained on `none`,
   `calibrated` and `calibrated-exp:T` targets (see qprobe/transforms.py).
3. The label-budgeted loop (XPO, Xie et al.): labels spent until held-out pass@1 first reaches a
   target, for the rules optimism, greedy and uniform (qprobe/loop.py); the reward oracle is the
   stored reward, so nothing is sampled.

Conventions of experiments/mbpp_table.py: penalty then beta by `tune()` over prompt folds, test
pass@1 from `selection_report` at the CV beta; mean ± std over seeds. `--json`: last line is one
JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from qprobe.benchmark import SETS as DATASETS, is_greedy, load  # noqa: E402

from qprobe import QProbe, fit_probe  # noqa: E402
from qprobe.pipeline import group_ids  # noqa: E402
from qprobe.select import selection_report  # noqa: E402

K = 8
# model alias -> (feature key of the default extractor in the shards, HF layer that makes it)
FEATURES = {"smollm2-135m": ("L30_last", -1), "qwen2.5-coder-0.5b": ("L24_last", -1)}
DEMO_TEMPLATE = "```python\n{code}\n"  # sampled completions open a block and stop when it closes (fence dropped)


def demo_texts(rows):
    """{prompt_id: (prompt, demonstration completion)} for the prompts in rows, from mbpp.jsonl's `code`."""
    code = {}
    with open(ROOT / "data" / "mbpp" / "mbpp.jsonl", encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)
            code[t["task_id"]] = t["code"].replace("\r\n", "\n").strip()
    out = {}
    for r in rows:
        if r["prompt_id"] not in out:
            out[r["prompt_id"]] = (r["prompt"], DEMO_TEMPLATE.format(code=code[r["task_id"]]))
    return out


def demo_features(model, items, check_rows=None, check_X=None):
    """Features of the demonstrations with the model's default extractor, cached in .qprobe-cache/.

    With check_rows/check_X, first embeds a few sampled rows the same way and checks they match the
    features captured during sampling (float16), so demonstrations and samples share one extractor.
    """
    from qprobe.cache import Cache
    from qprobe.embedders.hf import HFEmbedder

    emb = HFEmbedder(model=model, layer=FEATURES[model][1], pooling="last", batch_size=8)
    cache = Cache(ROOT / ".qprobe-cache")
    if check_rows is not None:
        got = emb.embed([(r["prompt"], r["completion"]) for r in check_rows], cache=cache, progress=False)
        err = np.abs(got - check_X).max() / np.abs(check_X).max()
        print(f"extractor check on {len(check_rows)} sampled rows: max relative difference {err:.2e}",
              file=sys.stderr)
        if err > 2e-2:
            raise SystemExit(f"demonstration features would not match the samples' (difference {err:.2e})")
    return emb.embed(items, cache=cache, desc="demonstration features")


OBJECTIVES = ["mse", "ce", "pg"]
TRANSFORMS = ["calibrated", "calibrated-exp:5"]
LOOP_RULES = [("optimism", 1.0), ("optimism", 0.1), ("greedy", 0.0), ("uniform", 0.0)]
# the ridge penalty CV chose on all of train (experiments/mbpp_table.py), fixed in the loop
LOOP_ALPHA = {"smollm2-135m": 1e4, "qwen2.5-coder-0.5b": 1e3}
LOOP_BUDGET = 50
LOOP_ROUNDS = 20  # 1,000 labels of the 3,712: where the rules differ


def per_prompt(q, y, g, beta):
    """Expected reward of the softmax(q/beta) choice, per prompt (prompts in np.unique order)."""
    from qprobe.select import softmax_weights

    w = softmax_weights(q, g, beta)
    _, inv = np.unique(g, return_inverse=True)
    return np.bincount(inv, weights=w * y)


def diff_ci(a, b, n=2000, seed=0):
    """95% paired bootstrap interval over prompts of mean(a - b)."""
    d = np.asarray(a) - np.asarray(b)
    draws = np.random.default_rng(seed).integers(0, d.size, size=(n, d.size))
    lo, hi = np.percentile(d[draws].mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def run_variant(obj, X, y, g, te, tr, seeds, transform="none", demos=None, grid=None):
    """Tune on train (CV), fit, report test pass@1 per seed; returns runs and seed 0's per-prompt rewards.

    The recipe (transform, demonstrations, tuning, weights; pg: a prompt's demonstration joins its
    chunk of k + 1) is the library's `fit_probe`, the one `qprobe train` runs.
    """
    from qprobe.select import best_of_n_curve, bon_reward_at_kl

    Xtr, ytr, gtr = X[tr], y[tr], g[tr]
    n_, bon, bon_kl = best_of_n_curve(y[te], g[te])
    runs = []
    for seed in range(seeds):
        probe, t, _ = fit_probe(Xtr, ytr, gtr, demos=demos, transform=transform, tune_folds=5, grid=grid,
                                random_state=seed, objective=obj, k=K)
        q = probe.predict(X[te])
        rep = selection_report(q, y[te], g[te], t.beta)
        runs.append({"pass1": rep["probe_reward"], "kl": rep["kl"], "ess": rep["ess"], "beta": t.beta,
                     "params": t.params, "demo_weight": t.demo_weight, "cv_pass1": t.cv_reward,
                     "bok_at_kl": bon_reward_at_kl(rep["kl"], n_, bon, bon_kl),
                     "per_prompt": per_prompt(q, y[te], g[te], t.beta)})
    return runs


def summarise(runs, base_runs=None):
    out = {key: [float(np.mean([r[key] for r in runs])), float(np.std([r[key] for r in runs]))]
           for key in ("pass1", "kl", "ess", "bok_at_kl", "cv_pass1")}
    out["betas"] = [r["beta"] for r in runs]
    out["params"] = [r["params"] for r in runs]
    out["demo_weights"] = [r["demo_weight"] for r in runs]
    if base_runs is not None:  # seed 0, paired over test prompts
        out["diff_ci95"] = diff_ci(runs[0]["per_prompt"], base_runs[0]["per_prompt"])
    return out


def loop_part(X, y, g, tr, te, seeds, rounds, alpha):
    from qprobe.loop import argmax_pass1, labels_to_reach, run_loop
    import tempfile

    full = QProbe("mse", alpha=alpha).fit(X[tr], y[tr]).predict(X[te])
    base = float(selection_report(np.zeros(te.sum()), y[te], g[te], 0.0)["base_reward"])
    full_p = argmax_pass1(full, y[te], g[te])
    targets = {"90%": base + 0.9 * (full_p - base), "100%": full_p}
    out = {"base": base, "full_labels": int(tr.sum()), "full_pass1": full_p, "targets": targets,
           "budget": LOOP_BUDGET, "alpha": alpha, "rules": {}}

    def evaluate(q):
        return {"pass1": argmax_pass1(q[te], y[te], g[te])}

    with tempfile.TemporaryDirectory() as tmp:
        for rule, c in LOOP_RULES:
            name = f"{rule} (c = {c:g})" if rule == "optimism" else rule
            per_seed = []
            for seed in range(seeds):
                recs = run_loop(X, g, tr, evaluate, lambda i: y[i], Path(tmp) / f"{rule}-{c}-{seed}.json", rounds,
                                LOOP_BUDGET, rule=rule, objective="mse", probe_params={"alpha": alpha},
                                seed=seed, c=c)
                per_seed.append({"reach": {t: labels_to_reach(recs, v) for t, v in targets.items()},
                                 "positives_500": next(r["positives"] for r in recs if r["labels"] >= 500),
                                 "mean_pass1": float(np.mean([r["pass1"] for r in recs])),
                                 "curve": [(r["labels"], r["pass1"], r["positives"]) for r in recs]})
            curves = np.array([[p for _, p, _ in s["curve"]] for s in per_seed])
            out["rules"][name] = {
                "reach": {t: [s["reach"][t] for s in per_seed] for t in targets},
                "positives_500": [s["positives_500"] for s in per_seed],
                "mean_pass1": [s["mean_pass1"] for s in per_seed],
                "mean_curve": [(per_seed[0]["curve"][i][0], float(curves[:, i].mean()),
                                float(np.mean([s["curve"][i][2] for s in per_seed]))) for i in range(curves.shape[1])],
            }
            print(f"loop {name}: labels to reach {out['rules'][name]['reach']}", file=sys.stderr, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(DATASETS))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--loop-seeds", type=int, default=3)
    ap.add_argument("--parts", default="baseline,demos,transforms,loop",
                    help="comma-separated parts to (re)compute; the others are kept from --out")
    ap.add_argument("--no-demos", action="store_true", help="skip part 1 (needs the model's forward pass)")
    ap.add_argument("--demos-only", action="store_true", help="only compute (and cache) the demonstration features")
    ap.add_argument("--out", default=None, help="results JSON, updated part by part "
                    "[default: experiments/results/sibling_methods_MODEL.json]")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    ap.add_argument("--pg-epochs", type=int, default=None,
                    help="fix pg's epochs instead of cross-validating them (beta is still chosen by CV): "
                         "533, mbpp_table.py's CV choice on all of train, saves 3/4 of pg's fits on 2 cores")
    ap.add_argument("--table-only", nargs="*", default=None, metavar="JSON",
                    help="merge these results files (later ones win per objective) and print the table")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.table_only is not None:
        res = merge([json.loads(Path(f).read_text()) for f in args.table_only])
        print_table(res)
        if args.json:
            print(json.dumps(res))
        return
    objectives = args.objectives.split(",")
    grids = {"pg": [{"epochs": args.pg_epochs}]} if args.pg_epochs else {}
    t0 = time.time()
    rows, feats = load(skip_unscored=True, model=args.model)
    samp = np.array([not is_greedy(r) for r in rows])
    split = np.array([r["split"] for r in rows])
    tr = samp & np.isin(split, ["train", "validation"])
    te = samp & (split == "test")
    key = FEATURES[args.model][0]
    X = feats[key]
    y = np.array([r["reward"] for r in rows], dtype=float)
    g = group_ids(rows)
    train_rows = [r for r, m in zip(rows, tr) if m]
    if args.demos_only:
        d = demo_texts(train_rows)
        check = np.flatnonzero(tr)[:4]
        Xd = demo_features(args.model, list(d.values()), [rows[i] for i in check], X[check])
        print(f"{Xd.shape[0]} demonstration features of width {Xd.shape[1]}, {time.time() - t0:.0f} s", file=sys.stderr)
        return
    out_path = Path(args.out or ROOT / "experiments" / "results" / f"sibling_methods_{args.model}.json")
    res = json.loads(out_path.read_text()) if out_path.exists() else {}
    res.update(model=args.model, features=key, k=K, n_train_prompts=int(len(np.unique(g[tr]))),
               n_test_prompts=int(len(np.unique(g[te]))), train_positives=int(y[tr].sum()), seeds=args.seeds,
               base_pass1=float(y[te].mean()), oracle_pass8=float(selection_report(
                   np.zeros(te.sum()), y[te], g[te], 0)["oracle_reward"]))
    parts = set(args.parts.split(","))
    res["command"] = "python experiments/sibling_methods.py " + " ".join(sys.argv[1:])
    if args.pg_epochs and "pg" in objectives:
        res["pg_epochs_fixed"] = args.pg_epochs
    if args.no_demos:
        parts.discard("demos")
    base_runs = {}
    need_base = parts & {"baseline", "demos", "transforms"}
    for obj in objectives if need_base else []:
        base_runs[obj] = run_variant(obj, X, y, g, te, tr, args.seeds, grid=grids.get(obj))
        res.setdefault("baseline", {})[obj] = summarise(base_runs[obj])
        print(f"baseline {obj}: {res['baseline'][obj]['pass1']}", file=sys.stderr, flush=True)
        write(out_path, res)
    if "demos" in parts:
        d = demo_texts(train_rows)
        Xd = demo_features(args.model, list(d.values()))
        label = {}
        for r, gg in zip(rows, g):
            label.setdefault(r["prompt_id"], gg)
        gd = np.array([label[pid] for pid in d])
        res["n_demos"] = len(d)
        for obj in objectives:
            runs = run_variant(obj, X, y, g, te, tr, args.seeds, demos=(Xd, gd), grid=grids.get(obj))
            res.setdefault("demos", {})[obj] = summarise(runs, base_runs[obj])
            print(f"demos {obj}: {res['demos'][obj]['pass1']} weights {res['demos'][obj]['demo_weights']}",
                  file=sys.stderr, flush=True)
        write(out_path, res)
    if "transforms" in parts:
        for tf in TRANSFORMS:
            for obj in objectives:
                runs = run_variant(obj, X, y, g, te, tr, args.seeds, transform=tf, grid=grids.get(obj))
                res.setdefault("transforms", {}).setdefault(tf, {})[obj] = summarise(runs, base_runs[obj])
                print(f"{tf} {obj}: {res['transforms'][tf][obj]['pass1']}", file=sys.stderr, flush=True)
        write(out_path, res)
    if "loop" in parts:
        res["loop"] = loop_part(X, y, g, tr, te, args.loop_seeds, LOOP_ROUNDS, LOOP_ALPHA[args.model])
    res["seconds_last_run"] = round(time.time() - t0)
    write(out_path, res)
    print_table(res)
    if args.json:
        print(json.dumps(res))


def merge(results):
    """One results dict from several runs (e.g. mse/ce in one process, pg or the loop in another)."""
    out = {}
    for r in results:
        for key, v in r.items():
            if key in ("baseline", "demos"):
                out.setdefault(key, {}).update(v)
            elif key == "transforms":
                for tf, per in v.items():
                    out.setdefault(key, {}).setdefault(tf, {}).update(per)
            elif key in ("seeds", "command"):
                out.setdefault(key + "s_by_run", []).append(v)
                out[key] = v
            else:
                out[key] = v
    return out


def write(path, res):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")


def fmt(s):
    return f"{s['pass1'][0]:.3f} ± {s['pass1'][1]:.3f}"


def print_table(res):
    """The README table (markdown) on stdout."""
    objs = [o for o in OBJECTIVES if o in res.get("baseline", {})] or OBJECTIVES
    print(f"\nMBPP test pass@1, {res['model']} ({res['features']}), {res['n_test_prompts']} prompts, k = {res['k']}; "
          f"probes trained on {res['n_train_prompts']} prompts ({res['train_positives']} passing rows); "
          f"base {res['base_pass1']:.3f}, best-of-8 {res['oracle_pass8']:.3f}; mean ± std over seeds "
          f"({res.get('seedss_by_run', [res.get('seeds')])} by run)\n")
    print("| idea | variant | " + " | ".join(objs) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in objs) + " |")
    b = res.get("baseline", {})
    if b:
        print("| baseline | raw reward, CV-tuned (as mbpp_table.py) | " + " | ".join(fmt(b[o]) for o in objs) + " |")
        print("| 4. KL view | baseline: KL / ESS / best-of-n at that KL | " + " | ".join(
            f"{b[o]['kl'][0]:.2f} / {b[o]['ess'][0]:.2f} / {b[o]['bok_at_kl'][0]:.3f}" for o in objs) + " |")

    def cell(s):
        if s is None:
            return "not finished"
        lo, hi = s.get("diff_ci95", (float("nan"), float("nan")))
        return f"{fmt(s)} (Δ [{lo:+.3f}, {hi:+.3f}])"

    if "demos" in res:
        d = res["demos"]
        ws = {o: sorted({w for w in d[o]["demo_weights"]}) for o in objs if o in d}
        print(f"| 1. demonstrations | + {res.get('n_demos')} reference solutions, weight by CV from 0, 1, 3, 10 "
              f"(chosen: {'; '.join(f'{o} {ws[o]}' for o in ws)}) | " + " | ".join(cell(d.get(o)) for o in objs) + " |")
    for tf, per in res.get("transforms", {}).items():
        print(f"| 2. reward transform | {tf} | " + " | ".join(cell(per.get(o)) for o in objs) + " |")
    lp = res.get("loop")
    if lp:
        t = lp["targets"]
        for name, r in lp["rules"].items():
            reach = []
            for key in t:
                v = [x for x in r["reach"][key]]
                got = [x for x in v if x is not None]
                reach.append(f"{np.median(got):.0f}" + (f" ({len(got)}/{len(v)} seeds)" if len(got) < len(v) else "")
                             if got else "never")
            print(f"| 3. loop, {lp['budget']} labels a round | {name}: labels to pass@1 ≥ {t['90%']:.3f} / ≥ "
                  f"{t['100%']:.3f}; passes found in the first 500 labels; mean pass@1 over rounds | "
                  f"{reach[0]} / {reach[1]}; {np.mean(r['positives_500']):.0f}; {np.mean(r['mean_pass1']):.3f} | | |")
        print(f"\nloop: ridge probe (alpha {lp['alpha']:g}), argmax on test, {lp['budget']} labels a round up to "
              f"{lp['budget'] * LOOP_ROUNDS}; targets are 90% / 100% of the way from base ({lp['base']:.3f}) to the probe "
              f"on all {lp['full_labels']} labels ({lp['full_pass1']:.3f}); median over seeds.")
    print("Δ: 95% paired bootstrap interval over test prompts of the change against the baseline (seed 0). "
          "Best-of-n at the probe's KL is capped at best-of-8 when the probe's KL exceeds log 8 - 7/8 = 1.20.")


if __name__ == "__main__":
    main()

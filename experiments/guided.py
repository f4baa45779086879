"""Probe-guided decoding against reranking at equal compute, on MBPP test prompts.

    python experiments/guided.py [--model smollm2-135m] [--limit 24] [--train-rows 600] [--json]

1. A prefix value probe: committed train+validation samples of the model (data/<model>/), a
   subset of --train-rows (passing rows, at most half of them, then failing rows), cut every --every tokens;
   each prefix's features (last layer, last token) come from one causal forward pass over the
   whole completion (a prefix's state equals the state at that position of the whole), labelled
   with the completion's reward; ridge (mse), penalty by 5-fold cross-validation over prompts.
2. A final-state probe on all committed train samples (the same extractor, mse, penalty by CV).
3. On the first --limit MBPP test prompts: guided decoding (`HFSampler(guide=...)`, one
   completion per prompt) at B = 2, 4 and two chunk sizes; plain sampling and best-of-k with
   the final-state probe from the committed k = 8 test samples (same settings and seeds).
   Tokens: decode positions per prompt (all branches counted; prompt prefill not counted).

Resumable: completions go through the qprobe cache (--cache). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from qprobe import benchmark  # noqa: E402
from qprobe.benchmark import SAMPLING as SETTINGS  # noqa: E402

from qprobe.cache import Cache  # noqa: E402


def prefix_features(model, rows, every, device=None, dtype=None):
    """(X, y, groups): last-layer states at every `every`-th completion token and at its end, per row."""
    import torch

    from qprobe.hfmodel import completion_ids, load_model, prompt_ids
    from qprobe.samplers.guide import prefix_points

    m, tok = load_model(model, device, dtype)
    X, y, g = [], [], []
    from tqdm.auto import tqdm

    with torch.inference_mode():
        for r in tqdm(rows, desc="prefix features", unit="row"):
            p, c = prompt_ids(tok, r["prompt"]), completion_ids(tok, r["completion"])
            hs = m.get_decoder()(input_ids=torch.tensor([p + c], device=m.device)).last_hidden_state[0]  # after the final norm
            for t in prefix_points(tok, c, every):
                X.append(hs[len(p) + t - 1].float().cpu().numpy())
                y.append(r["reward"])
                g.append(r["prompt_id"])
    return np.array(X), np.array(y, dtype=float), np.array(g)


def fit(X, y, groups):
    from qprobe import QProbe, tune

    t = tune(X, y, groups, "mse", folds=5, random_state=0)
    return QProbe("mse", **t.params).fit(X, y)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(benchmark.SETS))
    ap.add_argument("--limit", type=int, default=24, help="first N MBPP test prompts")
    ap.add_argument("--train-rows", type=int, default=600, help="train rows cut into prefixes for the value probe")
    ap.add_argument("--every", type=int, default=16, help="prefix spacing (tokens) for the value probe")
    ap.add_argument("--chunks", default="16,48", help="guided chunk sizes (tokens)")
    ap.add_argument("--branches", default="2,4")
    ap.add_argument("--beta", type=float, default=0.0, help="guided choice temperature (0 = argmax)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--cache", default=str(ROOT / ".qprobe-cache"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    import torch

    from qprobe.embedders.hf import HFEmbedder
    from qprobe.rewards import score_rows
    from qprobe.samplers.hf import HFSampler

    torch.set_num_threads(a.threads)
    t0 = time.time()
    layer = 30 if a.model == "smollm2-135m" else 24  # hidden_states index of the last layer
    feat = f"L{layer}_last"
    train, tf = benchmark.load("train", model=a.model)
    train = [r for r in train if not benchmark.is_greedy(r)]
    groups = np.array([r["prompt_id"] for r in train])
    y = np.array([r["reward"] for r in train])
    final = fit(tf[feat], y, groups)
    # the value probe's training subset: passing rows (at most half of it), then failing rows, spread over prompts
    rng = np.random.default_rng(0)
    pos = [r for r in train if r["reward"] > 0]
    if len(pos) > a.train_rows // 2:
        pos = [pos[i] for i in sorted(rng.permutation(len(pos))[: a.train_rows // 2])]
    neg = [train[i] for i in rng.permutation(len(train)) if train[i]["reward"] <= 0][: max(0, a.train_rows - len(pos))]
    saved = Path(a.cache) / f"guided-prefix-{a.model}-{a.train_rows}-{a.every}.npz"  # reruns skip the forward passes
    if saved.exists():
        with np.load(saved) as z:
            Xp, yp, gp = z["X"], z["y"], z["g"]
    else:
        Xp, yp, gp = prefix_features(a.model, pos + neg, a.every, a.device, a.dtype)
        saved.parent.mkdir(parents=True, exist_ok=True)
        np.savez(saved, X=Xp, y=yp, g=gp)
    value = fit(Xp, yp, gp)
    value.embedder_, value.prefix_ = HFEmbedder(a.model, -1, "last", device=a.device, dtype=a.dtype).identity(), True
    t_probe = time.time() - t0

    test, xf = benchmark.load("test", model=a.model)
    keep = [i for i, r in enumerate(test) if not benchmark.is_greedy(r)]
    test, Xt = [test[i] for i in keep], xf[feat][keep]
    pids = list(dict.fromkeys(r["prompt_id"] for r in test))[: a.limit]
    by_pid = {p: [i for i, r in enumerate(test) if r["prompt_id"] == p] for p in pids}  # prompt -> its k rows
    prompts = [{k: v for k, v in test[by_pid[p][0]].items()
                if k not in ("sample", "completion", "finish_reason", "n_tokens", "token_logprobs", "reward",
                             "reward_reason", "chunk")} for p in pids]
    if any("n_tokens" not in test[i] for p in pids for i in by_pid[p]):  # older sets: count with the tokenizer
        from qprobe.hfmodel import completion_ids, load_model

        tok = load_model(a.model, a.device, a.dtype)[1]
        for p in pids:
            for i in by_pid[p]:
                test[i].setdefault("n_tokens", len(completion_ids(tok, test[i]["completion"])))
    tok_per_sample = np.mean([test[i]["n_tokens"] for p in pids for i in by_pid[p]])
    q = final.predict(Xt)

    def best_of(k):  # pass@1 of the final-state probe's argmax among the first k samples; tokens per prompt
        acc, toks = [], []
        for p in pids:
            rows = sorted(by_pid[p], key=lambda i: test[i]["sample"])[:k]
            acc.append(test[max(rows, key=lambda i: q[i])]["reward"])
            toks.append(sum(test[i]["n_tokens"] for i in rows))
        return float(np.mean(acc)), float(np.mean(toks))

    table = [{"policy": "plain sampling (mean of the 8 committed samples)",
              "pass@1": float(np.mean([test[i]["reward"] for p in pids for i in by_pid[p]])),
              "tokens": float(tok_per_sample)}]
    for k in (2, 4, 8):
        acc, toks = best_of(k)
        table.append({"policy": f"best-of-{k}, final-state probe", "pass@1": acc, "tokens": toks})
    cache = Cache(a.cache)
    for chunk in map(int, a.chunks.split(",")):
        for B in map(int, a.branches.split(",")):
            s = HFSampler(a.model, batch_size=a.batch_size, device=a.device, dtype=a.dtype, guide=value, chunk=chunk, branch=B, beta=a.beta,
                          **SETTINGS)
            ts = time.time()
            out = s.sample(prompts, k=1, seed=0, cache=cache, progress=False)
            rewards = [r for r, _ in score_rows(out, "code", timeout=3.0, progress=False)]
            toks = float(np.mean([r["n_generated"] for r in out]))
            kk = int(min(8, max(1, round(toks / tok_per_sample))))
            table.append({"policy": f"guided, chunk {chunk}, B = {B}, beta {a.beta:g}", "pass@1": float(np.mean(rewards)),
                          "tokens": toks, "best_of_k_same_tokens": [kk, best_of(kk)[0]],
                          "seconds": round(time.time() - ts)})
            print(f"  {table[-1]}", file=sys.stderr, flush=True)
    rep = {"model": a.model, "test_prompts": len(pids), "value_probe_rows": len(pos) + len(neg),
           "value_probe_positives": len(pos), "prefixes": len(yp), "probe_seconds": round(t_probe),
           "total_seconds": round(time.time() - t0), "table": table}
    if a.json:
        print(json.dumps(rep, indent=1))
    print(f"\n{a.model}, first {len(pids)} MBPP test prompts; value probe on {len(yp)} prefixes of "
          f"{len(pos) + len(neg)} train rows ({len(pos)} passing); 2 CPU cores, no GPU\n")
    print("| policy | pass@1 | tokens / prompt | best-of-k at the same tokens (k: pass@1) |\n| --- | --- | --- | --- |")
    for r in table:
        same = f"{r['best_of_k_same_tokens'][0]}: {r['best_of_k_same_tokens'][1]:.3f}" if "best_of_k_same_tokens" in r else ""
        print(f"| {r['policy']} | {r['pass@1']:.3f} | {r['tokens']:.0f} | {same} |")
    return rep


if __name__ == "__main__":
    main()

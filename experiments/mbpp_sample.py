"""Sample the MBPP benchmark data of the README's table: resumable, committed as it goes.

    python experiments/mbpp_sample.py [--model qwen2.5-coder-0.5b] [--commit] [--limit-chunks N] [--worker I/N]

Draws k=8 completions (T 0.8, top-p 0.95, 300 new tokens, stop when the code block
closes) from SmolLM2-135M-Instruct (or Qwen2.5-Coder-0.5B-Instruct in bfloat16,
which also keeps each sampled token's log-probability) for MBPP train+validation (464 prompts) and
test (500), plus one greedy completion per test prompt, and keeps the features of
three extractors taken during the same sampling pass. Work is cut into chunks of
prompts (test and train chunks interleaved, so a partial run is still usable);
each finished chunk is written to data/mbpp/shards/ (and committed with
--commit), and a rerun skips finished chunks. Rewards are added later by
`qprobe reward`; experiments/mbpp_build.py assembles the shards.
"""
from __future__ import annotations

import argparse
import os
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from qprobe.cache import Cache  # noqa: E402
from qprobe.datasets import mbpp_rows  # noqa: E402
from qprobe.embedders.hf import HFEmbedder  # noqa: E402
from qprobe.samplers.hf import HFSampler  # noqa: E402

from qprobe.benchmark import SAMPLING as SETTINGS, SETS as DATASETS  # noqa: E402
from qprobe.datasets import humaneval_rows  # noqa: E402

MBPP = ROOT / "data" / "mbpp" / "mbpp.jsonl"
HUMANEVAL = ROOT / "data" / "humaneval" / "HumanEval.jsonl.gz"
K = 8
# per model: (layer, pooling) extractors kept from the sampling pass (the default first,
# then about 80% depth as the paper, then a middle layer), and the dtype
# float32 for Qwen: bfloat16 is 1.7x faster only on a CPU with AVX512-BF16; on the AVX2-only
# machine that ran this job it was slower than float32. Chunks of 24 prompts, with the greedy
# completions of each test chunk right after it, so that a partial run is a complete subset.
MODELS = {
    "smollm2-135m": dict(extractors=[(-1, "last"), (24, "last"), (24, "mean")], dtype=None, chunk=48),
    "qwen2.5-coder-0.5b": dict(extractors=[(-1, "last"), (19, "last"), (19, "mean"), (12, "mean")],
                               dtype="float32", chunk=24),
}


def chunks(rows, size):
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def plan(model="smollm2-135m", dataset="mbpp"):
    """[(name, rows, k, temperature)] in the order they are sampled."""
    if dataset == "humaneval":  # the transfer set: all 164 tasks at k = 8, no greedy
        return [(f"he-{i:02d}", c, K, 0.8) for i, c in enumerate(chunks(humaneval_rows(HUMANEVAL), 24))]
    test = mbpp_rows(MBPP, splits=["test"])
    train = mbpp_rows(MBPP, splits=["train", "validation"])
    size = MODELS[model]["chunk"]
    a, b = chunks(test, size), chunks(train, size)
    interleave_greedy = model != "smollm2-135m"  # the SmolLM2 set was sampled with greedy last
    out = []
    for i in range(max(len(a), len(b))):
        if i < len(a):
            out.append((f"test-{i:02d}", a[i], K, 0.8))
            if interleave_greedy:
                out.append((f"greedy-{i:02d}", a[i], 1, 0.0))
        if i < len(b):
            out.append((f"train-{i:02d}", b[i], K, 0.8))
    if not interleave_greedy:
        for i, c in enumerate(chunks(test, 4 * size)):
            out.append((f"greedy-{i:02d}", c, 1, 0.0))
    return out


def git_commit(paths, message):
    for _ in range(5):
        subprocess.run(["git", "add", *map(str, paths)], cwd=ROOT, check=False)
        r = subprocess.run(["git", "commit", "-q", "-m", message, "--", *map(str, paths)], cwd=ROOT,
                           capture_output=True, text=True)
        if r.returncode == 0 or "nothing" in r.stdout + r.stderr:
            return
        time.sleep(3)  # another commit holds the index lock
    print("commit failed:", r.stderr.strip(), file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS))
    ap.add_argument("--dataset", default="mbpp", choices=["mbpp", "humaneval"])
    ap.add_argument("--commit", action="store_true", help="git commit each finished chunk")
    ap.add_argument("--limit-chunks", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("QPROBE_THREADS", "1")))
    ap.add_argument("--cache", default=str(ROOT / ".qprobe-cache"))
    ap.add_argument("--worker", default="0/1", metavar="I/N",
                    help="take every N-th unfinished chunk starting at I (run N processes, one per core)")
    ap.add_argument("--device", default=None, help="e.g. cuda [default: cuda if present, else cpu]")
    ap.add_argument("--dtype", default=None, help="override the model's dtype (e.g. bfloat16 on a GPU)")
    ap.add_argument("--out", default=None, help="shards folder [default: the model's data folder]")
    ap.add_argument("--extractors", type=int, default=None, help="keep only the first N extractors")
    ap.add_argument("--all-at-once", action="store_true",
                    help="sample the rows of all chunks in one continuous batch (a GPU), then write the chunks")
    ap.add_argument("--limit-prompts", type=int, default=None, help="only the first N prompts of each chunk (tests)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    OUT = Path(args.out) if args.out else (DATASETS[args.model if args.dataset == "mbpp"
                                                      else f"{args.dataset}-{args.model}"] / "shards")
    MODEL, EXTRACTORS, dtype = args.model, MODELS[args.model]["extractors"], MODELS[args.model]["dtype"]
    EXTRACTORS = EXTRACTORS[: args.extractors] if args.extractors else EXTRACTORS
    dtype = args.dtype or dtype
    OUT.mkdir(parents=True, exist_ok=True)
    cache = Cache(args.cache)
    todo = [p for p in plan(args.model, args.dataset) if not (OUT / f"{p[0]}.rows.jsonl.gz").exists()]
    i, n = map(int, args.worker.split("/"))
    todo = todo[i::n]
    if args.limit_chunks:
        todo = todo[: args.limit_chunks]
    if args.limit_prompts:
        todo = [(name, rows[: args.limit_prompts], k, t) for name, rows, k, t in todo]
    print(f"{len(todo)} chunks to sample", flush=True)

    def sampler_for(temperature):
        return HFSampler(MODEL, batch_size=args.batch_size, capture=EXTRACTORS, dtype=dtype, device=args.device,
                         **{**SETTINGS, "temperature": temperature})

    if args.all_at_once:  # one sample() call per (k, temperature): the continuous batch never drains between chunks
        for k, temperature in sorted({(k, t) for _, _, k, t in todo}, reverse=True):
            rows = [r for _, rs, kk, t in todo if (kk, t) == (k, temperature) for r in rs]
            t0 = time.time()
            sampler_for(temperature).sample(rows, k=k, seed=0, cache=cache)
            print(f"sampled {len(rows)} prompts x {k} (T {temperature}) in {time.time() - t0:.0f}s", flush=True)
    for name, rows, k, temperature in todo:
        t0 = time.time()
        out = sampler_for(temperature).sample(rows, k=k, seed=0, cache=cache, progress=not args.all_at_once)
        feats = {}
        for layer, pooling in EXTRACTORS:
            emb = HFEmbedder(MODEL, layer=layer, pooling=pooling, dtype=dtype, device=args.device)
            X = emb.embed([(r["prompt"], r["completion"]) for r in out], cache=cache, progress=False)
            feats[f"L{emb.identity()['layer']}_{pooling}"] = X.astype(np.float16)
        stem = OUT / name
        np.savez_compressed(str(stem) + ".feats.npz", **feats)
        with gzip.open(str(stem) + ".rows.jsonl.gz.tmp", "wt", encoding="utf-8") as f:
            for r in out:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        Path(str(stem) + ".rows.jsonl.gz.tmp").rename(str(stem) + ".rows.jsonl.gz")  # rows last: marks the chunk done
        dt = time.time() - t0
        ntok = sum(len(r["completion"]) for r in out) / 3.5
        print(f"{name}: {len(out)} rows in {dt:.0f}s (~{ntok / dt:.0f} tok/s est.)", flush=True)
        if args.commit:
            git_commit([str(stem) + ".feats.npz", str(stem) + ".rows.jsonl.gz"], f"data: MBPP samples ({MODEL}), chunk {name}")


if __name__ == "__main__":
    main()

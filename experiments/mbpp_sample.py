"""Sample the MBPP benchmark data of the README's table: resumable, committed as it goes.

    python experiments/mbpp_sample.py [--commit] [--limit-chunks N] [--worker I/N]

Draws k=8 completions (T 0.8, top-p 0.95, 300 new tokens, stop when the code block
closes) from SmolLM2-135M-Instruct for MBPP train+validation (464 prompts) and
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
sys.path.insert(0, str(ROOT))

from qprobe.cache import Cache  # noqa: E402
from qprobe.datasets import mbpp_rows  # noqa: E402
from qprobe.embedders.hf import HFEmbedder  # noqa: E402
from qprobe.samplers.hf import HFSampler  # noqa: E402

MBPP = ROOT.parent / "shared" / "data" / "mbpp.jsonl"
OUT = ROOT / "data" / "mbpp" / "shards"
MODEL = "smollm2-135m"
K = 8
CHUNK = 48
# (layer, pooling): the default extractor first, then the paper's ~80% depth
EXTRACTORS = [(-1, "last"), (24, "last"), (24, "mean")]
SETTINGS = dict(temperature=0.8, top_p=0.95, max_new_tokens=300, code_block=True)


def chunks(rows, size):
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def plan():
    """[(name, rows, k, temperature)] in the order they are sampled."""
    test = mbpp_rows(MBPP, splits=["test"])
    train = mbpp_rows(MBPP, splits=["train", "validation"])
    a, b = chunks(test, CHUNK), chunks(train, CHUNK)
    out = []
    for i in range(max(len(a), len(b))):
        if i < len(a):
            out.append((f"test-{i:02d}", a[i], K, 0.8))
        if i < len(b):
            out.append((f"train-{i:02d}", b[i], K, 0.8))
    for i, c in enumerate(chunks(test, 4 * CHUNK)):
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
    ap.add_argument("--commit", action="store_true", help="git commit each finished chunk")
    ap.add_argument("--limit-chunks", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cache", default=str(ROOT / ".qprobe-cache"))
    ap.add_argument("--worker", default="0/1", metavar="I/N",
                    help="take every N-th unfinished chunk starting at I (run N processes, one per core)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("QPROBE_THREADS", "1")))
    OUT.mkdir(parents=True, exist_ok=True)
    cache = Cache(args.cache)
    todo = [p for p in plan() if not (OUT / f"{p[0]}.rows.jsonl.gz").exists()]
    i, n = map(int, args.worker.split("/"))
    todo = todo[i::n]
    if args.limit_chunks:
        todo = todo[: args.limit_chunks]
    print(f"{len(todo)} chunks to sample", flush=True)
    for name, rows, k, temperature in todo:
        t0 = time.time()
        sampler = HFSampler(MODEL, batch_size=args.batch_size, capture=EXTRACTORS,
                            **{**SETTINGS, "temperature": temperature})
        out = sampler.sample(rows, k=k, seed=0, cache=cache)
        feats = {}
        for layer, pooling in EXTRACTORS:
            emb = HFEmbedder(MODEL, layer=layer, pooling=pooling)
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
            git_commit([str(stem) + ".feats.npz", str(stem) + ".rows.jsonl.gz"], f"data: MBPP samples, chunk {name}")


if __name__ == "__main__":
    main()

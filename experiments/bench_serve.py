"""Throughput and latency of `qprobe serve` on the local model, and what reranking costs over plain sampling.

    python experiments/bench_serve.py                 # SmolLM2-135M on this CPU, k 4, max_tokens 16
    python experiments/bench_serve.py --json          # the same, plus one JSON line
    python experiments/bench_serve.py --overhead-only --max-tokens 64 --repeats 5 --json   # reranking's cost

Starts the server in this process on 127.0.0.1 (a free port) over the embedded
default model, with a probe on its last-layer, last-token features (random
weights: the cost of scoring does not depend on them), and drives it with the
official async openai client. Prints:
  1. requests/s and p50/p95 latency at concurrency 1, 4 and 16 (requests on
     MBPP chat prompts, each asking for k candidates and one choice);
  2. the overhead of reranking over plain sampling at the same k: the same
     prompts, seeds and settings drawn by `HFSampler` directly (no features, no
     probe, no HTTP), one request at a time, against the server at concurrency 1.
     With the same seeds both draw the same tokens, so the difference is HTTP,
     feature capture, scoring and the choice; a third run, the sampler keeping the
     probe's features, separates the capture's share. `--repeats R` interleaves R
     rounds of (plain, capture, served) over the same prompts and reports the overhead
     of each round and their spread, so drift of the machine between runs shows.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def prompts(n: int) -> list[list[dict]]:
    rows = [json.loads(line) for line in open(ROOT / "data" / "mbpp" / "mbpp.jsonl")][:n]
    return [[{"role": "user", "content": f"{r['text']} Answer with one Python code block."}] for r in rows]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def drive(url: str, model: str, msgs: list, conc: int, k: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(conc)
    lat = []

    async def one(i, m):
        async with sem:
            t = time.perf_counter()
            await client.chat.completions.create(model=model, messages=m, max_tokens=max_tokens, seed=i,
                                                 extra_body={"k": k})
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*[one(i, m) for i, m in enumerate(msgs)])
    wall = time.perf_counter() - t0
    await client.close()
    return {"concurrency": conc, "requests": len(msgs), "rps": len(msgs) / wall, "p50": pct(lat, 50),
            "p95": pct(lat, 95), "wall": wall, "mean": statistics.mean(lat)}


def plain_sampling(model: str, msgs: list, k: int, max_tokens: int, temperature: float, top_p: float,
                   capture=None) -> list[float]:
    """Seconds per prompt for k candidates drawn by HFSampler directly, with the server's seeds."""
    from qprobe.samplers.base import SampleJob, row_seed
    from qprobe.samplers.hf import HFSampler

    s = HFSampler(model, temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, capture=capture)
    out = []
    for i, m in enumerate(msgs):
        jobs = [SampleJob(m, j, row_seed(i, "serve", j)) for j in range(k)]
        t = time.perf_counter()
        for _ in s.sample_stream(jobs):
            pass
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds of plain / capture / served")
    ap.add_argument("--overhead-only", action="store_true", help="skip the concurrency levels")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")

    import torch

    from qprobe.embedders.hf import HFEmbedder
    from qprobe.hfmodel import load_model
    from qprobe.probe import QProbe
    from qprobe.serve import BackgroundServer, build

    model, _ = load_model(a.model)
    d = int(model.config.hidden_size)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, d)).astype(np.float32)
    probe = QProbe("mse", beta=0.1).fit(X, X @ rng.standard_normal(d))
    msgs = prompts(a.requests)
    temperature, top_p = 0.8, 0.95
    levels = [int(c) for c in a.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        probe.save(Path(tmp) / "probe", embedder=HFEmbedder(a.model, -1, "last").identity())
        app = build(Path(tmp) / "probe", model=a.model, k=a.k, max_tokens=a.max_tokens, temperature=temperature,
                    top_p=top_p, max_queue=max(64, max(levels)), batch_size=64)
        with BackgroundServer(app) as srv:
            asyncio.run(drive(srv.url, a.model, msgs[:1], 1, a.k, a.max_tokens))  # warm up
            runs = []
            for c in ([] if a.overhead_only else levels):  # each level is printed as it finishes
                runs.append(asyncio.run(drive(srv.url, a.model, msgs, c, a.k, a.max_tokens)))
                print(f"# concurrency {c}: {runs[-1]['rps']:.3f} requests/s", file=sys.stderr, flush=True)
            plain_sampling(a.model, msgs[:2], a.k, a.max_tokens, temperature, top_p)  # warm up this thread's kernels
            rounds = []  # interleaved: the machine's drift hits plain and served alike
            for i in range(a.repeats):
                plain = plain_sampling(a.model, msgs, a.k, a.max_tokens, temperature, top_p)
                captured = plain_sampling(a.model, msgs, a.k, a.max_tokens, temperature, top_p,
                                          capture=[(-1, "last")])
                served = (next((r for r in runs if r["concurrency"] == 1), None) if i == 0 and runs else None) \
                    or asyncio.run(drive(srv.url, a.model, msgs, 1, a.k, a.max_tokens))
                rounds.append({"plain_mean": statistics.mean(plain), "plain_p50": statistics.median(plain),
                               "capture_mean": statistics.mean(captured),
                               "capture_p50": statistics.median(captured),
                               "served_mean": served["mean"], "served_p50": served["p50"],
                               "overhead_mean": served["mean"] / statistics.mean(plain) - 1})
                print(f"# round {i + 1}: plain {rounds[-1]['plain_mean']:.2f} s, capture "
                      f"{rounds[-1]['capture_mean']:.2f} s, served {served['mean']:.2f} s per request: "
                      f"overhead {rounds[-1]['overhead_mean']:+.1%}", file=sys.stderr, flush=True)
            batches = app.state.backend.n_batches
    plain, captured = [r["plain_mean"] for r in rounds], [r["capture_mean"] for r in rounds]
    served_p50 = statistics.mean(r["served_p50"] for r in rounds)
    lines = [
        f"# python experiments/bench_serve.py {' '.join(argv or [])}".rstrip(),
        f"# {platform.node()}: {torch.get_num_threads()} torch threads, {a.model}, k {a.k}, max_tokens {a.max_tokens}, "
        f"{a.requests} MBPP chat prompts per level, temperature {temperature}, top-p {top_p}",
        f"{'concurrency':>11} {'requests/s':>11} {'p50 s':>8} {'p95 s':>8}",
    ]
    for r in runs:
        lines.append(f"{r['concurrency']:>11} {r['rps']:>11.3f} {r['p50']:>8.2f} {r['p95']:>8.2f}")
    lines.append(f"sampler batches: {batches}")
    overs = [r["overhead_mean"] for r in rounds]
    report = {"model": a.model, "k": a.k, "max_tokens": a.max_tokens, "levels": runs, "rounds": rounds,
              "plain_mean": statistics.mean(plain), "capture_mean": statistics.mean(captured),
              "rerank_overhead": statistics.mean(overs), "rerank_overhead_min": min(overs),
              "rerank_overhead_max": max(overs),
              "rerank_overhead_sd": statistics.stdev(overs) if len(overs) > 1 else 0.0}
    lines.append(f"plain sampling, same prompts/seeds/k, no features/probe/HTTP: {report['plain_mean']:.2f} s per "
                 f"request (mean of {len(rounds)} rounds)")
    lines.append(f"the same, keeping the probe's features (capture): {report['capture_mean']:.2f} s per request")
    lines.append(f"served with reranking at concurrency 1: p50 {served_p50:.2f} s; overhead over plain, per round: "
                 + ", ".join(f"{o:+.1%}" for o in overs)
                 + f"; mean {report['rerank_overhead']:+.1%} (min {min(overs):+.1%}, max {max(overs):+.1%}, "
                   f"sd {report['rerank_overhead_sd']:.1%})")
    print("\n".join(lines))
    if a.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

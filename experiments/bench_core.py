"""Time QProbe.fit for each objective on large synthetic features, and selection.

    python experiments/bench_core.py                  # 100k rows x 4096 float32, 10k groups of 16
    python experiments/bench_core.py --rows 20000 --features 1024 --objectives pg,pref

Features are float32 with a known linear Q (rewards ~ Bernoulli(sigmoid(Q)));
groups are prompts of --k rows; ``pref`` pairs consecutive rows and prefers the
one with the higher true Q. Each fit uses the estimator's defaults. Also prints
the held-out argmax reward against the base mean so a fast-but-useless fit
would show. cpu is this process's CPU time over all its threads: on shared
cores, wall > cpu / threads means other jobs took the cores. Timings include input validation and standardisation. The target
(issue #2) is under 30 s per objective and well under a second for selection
on a 2-core machine; the load average is printed because the cores are shared.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def make(rng, n, d, theta, chunk=10_000):
    X = np.empty((n, d), dtype=np.float32)  # filled in place: one 4n*d-byte array, no copies
    for s in range(0, n, chunk):
        X[s : s + chunk] = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
    q = X @ theta
    return X, q


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--k", type=int, default=20, help="rows per prompt for training groups")
    ap.add_argument("--objectives", default="mse,ce,pg,pref")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from qprobe import QProbe
    from qprobe.select import select_indices, selection_report

    rng = np.random.default_rng(args.seed)
    n, d = args.rows, args.features
    theta = (rng.standard_normal(d) * 1.5 / np.sqrt(d)).astype(np.float32)
    t = time.perf_counter()
    X, q_true = make(rng, n, d, theta)
    r = (rng.random(n) < 1 / (1 + np.exp(-q_true))).astype(np.float64)
    groups = np.arange(n) // args.k
    Xt, qt = make(rng, 20_000, d, theta)
    pt = 1 / (1 + np.exp(-qt))
    gt = np.arange(qt.size) // 16
    print(f"data: {n} x {d} float32 ({X.nbytes / 2**30:.2f} GiB) made in {time.perf_counter() - t:.1f}s")

    threads = "-"
    if args.threads is not None or any(o in ("pg", "pref") for o in args.objectives.split(",")):
        import torch

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        threads = torch.get_num_threads()
    print(f"cpus: {os.cpu_count()}  torch threads: {threads}  load average: {os.getloadavg()[0]:.1f}")

    for obj in args.objectives.split(","):
        y, g, Xf = r, groups, X
        if obj == "pref":  # consecutive rows form a pair; the higher true Q is preferred
            g = np.arange(n) // 2
            y = np.zeros(n)
            hi = q_true[0::2] < q_true[1::2]
            y[0::2], y[1::2] = ~hi, hi
        t, c = time.perf_counter(), time.process_time()
        probe = QProbe(obj, random_state=0).fit(Xf, y, groups=g if obj in ("pg", "pref") else None)
        dt, cpu = time.perf_counter() - t, time.process_time() - c
        rep = selection_report(probe.predict(Xt), pt, gt, beta=0)
        epochs = f" epochs={len(probe.loss_curve_)}" if probe.loss_curve_ else ""
        print(
            f"fit {obj:4s}: {dt:6.1f}s wall {cpu:6.1f}s cpu{epochs}  held-out k=16 argmax reward {rep['argmax_reward']:.3f}"
            f" (base {rep['base_reward']:.3f}, best-of-16 {rep['oracle_reward']:.3f})  load {os.getloadavg()[0]:.1f}",
            flush=True,
        )

    n_groups, k = 10_000, 16
    gs = rng.permutation(np.repeat(np.arange(n_groups), k))
    qs, rs = rng.standard_normal(gs.size), rng.random(gs.size)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        select_indices(qs, gs, 0.1, random_state=0)
        selection_report(qs, rs, gs, 0.1)
        best = min(best, time.perf_counter() - t)
    print(f"select + selection_report, {n_groups} groups of {k} (shuffled rows), best of 5: {best * 1000:.0f} ms")


if __name__ == "__main__":
    main()

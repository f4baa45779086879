"""Train each objective on features larger than comfortable RAM, read from a memory map.

    nice -n 19 python experiments/bench_scale.py                      # 1,000,000 x 1,024 float32 (3.8 GiB)
    nice -n 19 python experiments/bench_scale.py --rows 100000 --objectives mse,pg

It writes a synthetic float32 ``.npy`` feature file (with a known linear Q;
rewards ~ Bernoulli(sigmoid(Q)), prompts of --k rows, ``pref`` pairs
consecutive rows and prefers the higher true Q) into --dir block by block,
then runs each objective in a fresh process that does what ``qprobe train``,
``rerank`` and ``eval`` do with the features: ``qprobe.io.load_features``
(a read-only memory map, checked for NaN block by block), ``QProbe.fit``,
``predict`` and ``select`` over every row. The file is deleted at the end
unless --keep.

Per objective it prints wall time of open+check, fit and predict+select, the
fit's CPU time over all its threads (on shared cores wall time mostly measures the
wait for a core), and two memory peaks: ``anon``, the process's own memory (RssAnon sampled every
20 ms: arrays, torch, Python), which is what must stay small; and ``rss``
(ru_maxrss), which also counts the file's pages the map has touched: those
belong to the page cache and the kernel drops them under memory pressure.
The reward of the probe's argmax choice against the base mean shows the fit
learned something. The machine's load average is printed because the cores
may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def write_data(folder: Path, n: int, d: int, k: int, seed: int, block: int = 16384) -> None:
    """features.npy (memory-mapped as it is written), reward.npy and q_true.npy in `folder`."""
    from numpy.lib.format import open_memmap

    rng = np.random.default_rng(seed)
    theta = (rng.standard_normal(d) * 1.5 / np.sqrt(d)).astype(np.float32)
    X = open_memmap(folder / "features.npy", mode="w+", dtype=np.float32, shape=(n, d))
    q = np.empty(n, dtype=np.float32)
    for s in range(0, n, block):
        b = rng.standard_normal((min(block, n - s), d), dtype=np.float32)
        X[s : s + b.shape[0]] = b
        q[s : s + b.shape[0]] = b @ theta
    X.flush()
    del X
    np.save(folder / "q_true.npy", q)
    np.save(folder / "reward.npy", (rng.random(n) < 1 / (1 + np.exp(-q))).astype(np.float64))


class AnonPeak(threading.Thread):
    """Samples RssAnon from /proc/self/status; .peak in bytes."""

    def __init__(self, every: float = 0.02):
        super().__init__(daemon=True)
        self.every, self.peak, self.stop = every, 0, threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)


def run_one(folder: Path, objective: str, k: int, seed: int) -> dict:
    """One objective in this process: open, fit, predict + select. Returns the measurements."""
    mon = AnonPeak()
    mon.start()
    from qprobe import QProbe
    from qprobe.io import load_features
    from qprobe.select import select_indices, selection_report

    y = np.load(folder / "reward.npy")
    n = y.shape[0]
    if objective == "pref":  # consecutive pairs, y = 1 on the row with the higher true Q
        q_true = np.load(folder / "q_true.npy")
        groups = np.arange(n) // 2
        first = q_true[0::2] > q_true[1::2]  # ties: the second row wins
        y = np.stack([first, ~first], axis=1).reshape(-1).astype(np.float64)
    else:
        groups = np.arange(n) // k
    base = mon.now()
    t0 = time.perf_counter()
    X, _ = load_features(folder / "features.npy")
    t1, c1 = time.perf_counter(), time.process_time()
    probe = QProbe(objective, k=k, random_state=seed).fit(X, y, groups=groups)
    t2, c2 = time.perf_counter(), time.process_time()
    q = probe.predict(X)  # one pass over X, then the choice from q, as `qprobe rerank` does
    select_indices(q, groups, 0.0)
    t3 = time.perf_counter()
    rep = selection_report(q, y, groups, beta=0.0)
    mon.stop.set()
    mon.join()
    return {
        "objective": objective, "rows": n, "features": X.shape[1], "mapped": isinstance(X, np.memmap),
        "open_s": t1 - t0, "fit_s": t2 - t1, "fit_cpu_s": c2 - c1, "predict_select_s": t3 - t2, "n_iter": int(probe.n_iter_),
        "anon_peak_gib": mon.peak / 2**30, "anon_before_gib": base / 2**30,
        "rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        "base_reward": float(rep["base_reward"]), "argmax_reward": float(rep["probe_reward"]),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--k", type=int, default=8, help="rows per prompt (pg chunk size too)")
    ap.add_argument("--objectives", default="mse,ce,pg,pref")
    ap.add_argument("--dir", default="runs/bench_scale", help="where the feature file goes (needs rows*features*4 bytes)")
    ap.add_argument("--keep", action="store_true", help="keep the data folder (reused by a later run of the same size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = Path(args.dir)

    if args._one:  # child process: one objective, one JSON line on stdout
        print(json.dumps(run_one(folder, args._one, args.k, args.seed)))
        return

    n, d = args.rows, args.features
    folder.mkdir(parents=True, exist_ok=True)
    size = folder / "size.json"
    want = {"rows": n, "features": d, "seed": args.seed}
    try:
        t = time.perf_counter()
        if not (size.exists() and json.loads(size.read_text()) == want):
            write_data(folder, n, d, args.k, args.seed)
            size.write_text(json.dumps(want))
            print(f"data: {n} x {d} float32 ({n * d * 4 / 2**30:.2f} GiB) written to {folder} "
                  f"in {time.perf_counter() - t:.0f}s", flush=True)
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
              f"numpy {np.__version__}", flush=True)
        print(f"{'objective':<9} {'open s':>7} {'fit s':>8} {'fit cpu s':>9} {'pred+sel s':>10} {'iters':>6} "
              f"{'anon GiB':>9} {'rss GiB':>8} {'base':>6} {'argmax':>7} {'mapped':>6}", flush=True)
        for obj in args.objectives.split(","):
            cmd = [sys.executable, __file__, "--dir", str(folder), "--k", str(args.k), "--seed", str(args.seed),
                   "--_one", obj]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            print(f"{obj:<9} {r['open_s']:7.1f} {r['fit_s']:8.1f} {r['fit_cpu_s']:9.1f} {r['predict_select_s']:10.1f} {r['n_iter']:6d} "
                  f"{r['anon_peak_gib']:9.2f} {r['rss_peak_gib']:8.2f} {r['base_reward']:6.3f} "
                  f"{r['argmax_reward']:7.3f} {'yes' if r['mapped'] else 'NO':>6}", flush=True)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

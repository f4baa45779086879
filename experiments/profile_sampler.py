"""Where the local sampler's time goes: forward passes, token draws, cache merges on admission,
stop checks, padding, and the Python left over per step.

    python experiments/profile_sampler.py --model smollm2-135m
    python experiments/profile_sampler.py --model qwen2.5-coder-0.5b --prompts 16

Samples MBPP test prompts (k each, T 0.8, top-p 0.95, qprobe's default dtype for this CPU)
under cProfile, then reads the cumulative time of the sampler's own functions:

- forward: the model's forward calls, split into prefill (admission) and decode steps
- draw: softmax, nucleus and the seeded inverse-CDF draw (`_draw`, `_token_logprobs`)
- merge: concatenating admitted rows' caches into the running batch (`_Batch.merge`)
- stop checks: decoding the tokens and looking for stops (`_Run.finished`)
- the rest of a step: everything else in `sample_stream`, mostly Python per step

and, from the attention masks the decode steps ran with, the share of attended positions
that were padding. cProfile adds a little to the Python parts; the wall time without it is
printed too. Prints a table, then one JSON object.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cumulative(stats: pstats.Stats, file_part: str, name: str) -> float:
    """Cumulative seconds of the function `name` defined in a file whose path contains `file_part`."""
    total = 0.0
    for (filename, _line, func), (_cc, _nc, _tt, ct, callers) in stats.stats.items():
        if func == name and file_part in filename:
            total += ct
    return total


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=96)
    ap.add_argument("--dtype", default=None, help="override qprobe's default for this CPU")
    args = ap.parse_args(argv)
    import torch

    from qprobe.datasets.code import mbpp_rows
    from qprobe.hfmodel import dtype_name, load_model, speed_flags
    from qprobe.samplers import hf as hfmod
    from qprobe.samplers.base import SampleJob

    rows = mbpp_rows(ROOT / "data" / "mbpp" / "mbpp.jsonl", ["test"], limit=args.prompts)
    jobs = [SampleJob(r["prompt"], i, 1000 * p + i) for p, r in enumerate(rows) for i in range(args.k)]
    dtype = dtype_name("cpu", args.dtype)
    model, tok = load_model(args.model, "cpu", dtype)

    def sampler():
        return hfmod.HFSampler(args.model, temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, device="cpu", dtype=dtype)

    list(sampler().sample_stream(jobs[:2]))  # warm-up
    t = time.perf_counter()
    plain = [s for _, s in sampler().sample_stream(jobs)]
    wall = time.perf_counter() - t
    useful = sum(len(tok(s.completion, add_special_tokens=False)["input_ids"]) for s in plain)

    # padding: the share of attention-mask positions that are padding, over the decode steps
    pad = {"cells": 0, "padding": 0, "steps": 0, "rows": 0}
    # forward: split prefill and decode by timing the model's calls while each step runs
    fwd = {"prefill": 0.0, "decode": 0.0}
    admit, step = hfmod._Run.admit, hfmod._Run.step

    class Timed:
        """The model, with its forward calls timed under `kind`; every other attribute passes through."""

        def __init__(self, kind):
            self.kind = kind

        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, *a, **kw):
            t0 = time.perf_counter()
            out = model(*a, **kw)
            fwd[self.kind] += time.perf_counter() - t0
            return out

    def admit_wrapped(run, new):
        real, run.model = run.model, Timed("prefill")
        try:
            return admit(run, new)
        finally:
            run.model = real

    def step_wrapped(run):
        m = run.batch.mask
        pad["cells"] += m.numel() + m.shape[0]  # the column this step appends included
        pad["padding"] += int(m.numel() - m.sum())
        pad["steps"] += 1
        pad["rows"] += m.shape[0]
        real, run.model = run.model, Timed("decode")
        try:
            return step(run)
        finally:
            run.model = real

    hfmod._Run.admit, hfmod._Run.step = admit_wrapped, step_wrapped
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    again = [s for _, s in sampler().sample_stream(jobs)]
    prof.disable()
    profiled = time.perf_counter() - t
    hfmod._Run.admit, hfmod._Run.step = admit, step
    assert [s.completion for s in again] == [s.completion for s in plain], "the profiled run drew other tokens"

    st = pstats.Stats(prof)
    parts = {
        "forward, prefill (admission)": fwd["prefill"],
        "forward, decode steps": fwd["decode"],
        "token draw (softmax, top-p, seeded draw, log-probs)":
            cumulative(st, "samplers/hf.py", "_draw") + cumulative(st, "samplers/hf.py", "_token_logprobs"),
        "cache merges on admission": cumulative(st, "samplers/hf.py", "merge"),
        "stop checks (decode + stop search)": cumulative(st, "samplers/hf.py", "finished"),
    }
    parts["the rest: Python per step, results, bookkeeping"] = max(0.0, profiled - sum(parts.values()))
    flags = speed_flags()
    padding = pad["padding"] / max(1, pad["cells"])
    print(f"{args.model}, {dtype}, {torch.get_num_threads()} threads, CPU flags: {flags}")
    print(f"{len(rows)} MBPP prompts x {args.k}, {args.max_new_tokens} new tokens, batch {args.batch_size}: "
          f"{useful} useful tokens in {wall:.1f} s = {useful / wall:.0f} tok/s (profiled run {profiled:.1f} s)")
    print(f"{'where the time goes':55s} {'s':>7s} {'share':>6s}")
    for k, v in parts.items():
        print(f"{k:55s} {v:7.1f} {100 * v / profiled:5.0f}%")
    print(f"{pad['steps']} decode steps, {pad['rows'] / max(1, pad['steps']):.0f} rows on average; "
          f"{100 * padding:.0f}% of the attended positions were padding")
    res = {"model": args.model, "dtype": dtype, "threads": torch.get_num_threads(), "cpu_flags": flags,
           "prompts": len(rows), "k": args.k, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
           "useful_tokens": useful, "wall_s": round(wall, 2), "tok_s": round(useful / wall, 1),
           "profiled_s": round(profiled, 2), "parts_s": {k: round(v, 2) for k, v in parts.items()},
           "decode_steps": pad["steps"], "padding_share": round(padding, 3)}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()

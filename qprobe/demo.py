"""`qprobe demo`: a small MBPP run end to end on a local model, through the same file steps as the CLI.

sample (features captured in the same pass) -> reward (sandbox) -> embed (from the
cache, no second forward) -> train a pg probe on train tasks -> rerank and eval on
held-out test tasks. Every step writes its file under `out_dir`; a rerun reuses the cache.
The MBPP tasks come from the package (qprobe/data/mbpp_demo.jsonl, see PROVENANCE.md there),
so the demo runs from an installed wheel too.
"""
from __future__ import annotations

import contextlib
from importlib import resources
from pathlib import Path

from qprobe.errors import QProbeError
from qprobe.io import write_jsonl

# part 2 of the demo: the committed Qwen2.5-Coder-0.5B MBPP set of a checkout (see qprobe/benchmark.py)
BENCHMARK = Path(__file__).resolve().parents[1] / "data" / "mbpp-qwen2.5-coder-0.5b"
BENCHMARK_FEATURE = "L19_mean"  # layer 19 of 24, mean-pooled: the best stored extractor on Qwen MBPP
SHIPPED_MBPP = "data/mbpp_demo.jsonl"  # package data: 100 test and 100 train MBPP tasks
SHIPPED_TASKS = 100  # tasks of each split in it


def run_demo(out_dir, mbpp_path, train_tasks, test_tasks, k, max_new_tokens, model, cache, echo=print) -> dict:
    from qprobe.datasets import mbpp_rows
    from qprobe.embedders.hf import HFEmbedder
    from qprobe.pipeline import embed_file, eval_file, rerank_file, reward_file, sample_file, train_file
    from qprobe.samplers.hf import HFSampler

    if mbpp_path and not Path(mbpp_path).exists():
        raise QProbeError(f"{mbpp_path}: no such file (give --mbpp PATH to an MBPP jsonl)")
    if not mbpp_path and max(train_tasks, test_tasks) > SHIPPED_TASKS:
        raise QProbeError(f"the shipped MBPP slice has {SHIPPED_TASKS} train and {SHIPPED_TASKS} test tasks; "
                          "give --mbpp PATH to the full MBPP jsonl for more")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        path = mbpp_path or stack.enter_context(resources.as_file(resources.files("qprobe").joinpath(SHIPPED_MBPP)))
        rows = mbpp_rows(path, splits=["train"], limit=train_tasks) + mbpp_rows(path, splits=["test"], limit=test_tasks)
    write_jsonl(out / "prompts.jsonl", rows)
    echo(f"[1/5] sample: {len(rows)} MBPP prompts x {k} from {model} ({train_tasks} train, {test_tasks} test tasks)")
    sampler = HFSampler(model, temperature=0.8, top_p=0.95, max_new_tokens=max_new_tokens, code_block=True,
                        batch_size=32, capture=[(-1, "last")])
    sample_file(out / "prompts.jsonl", out / "completions.jsonl", sampler, k=k, seed=0, cache=cache)
    echo("[2/5] reward: run each completion with its task's tests in the sandbox")
    reward_file(out / "completions.jsonl", out / "rewarded.jsonl", "code", cache=cache)
    echo("[3/5] embed: last-layer state at the last completion token (taken during sampling)")
    embed_file(out / "rewarded.jsonl", out / "features.npy", HFEmbedder(model, layer=-1, pooling="last"), cache=cache)
    echo("[4/5] train: policy-gradient probe on the train tasks")
    train_file(out / "rewarded.jsonl", out / "features.npy", out / "probe", where=["split=train"],
               objective="pg", beta=0.1, k=k, random_state=0)
    echo("[5/5] rerank and eval on the held-out test tasks")
    rerank_file(out / "rewarded.jsonl", out / "features.npy", out / "probe", out / "chosen.jsonl", beta=0.0,
                where=["split=test"])
    rep = eval_file(out / "rewarded.jsonl", out / "features.npy", out / "probe", where=["split=test"])
    echo(f"files in {out}/: prompts, completions, rewarded (.jsonl), features.npy, probe/, chosen.jsonl")
    return rep


def format_replay(r: dict) -> str:
    """The demo's part-2 table: stored pass@1 of each policy, the probe's, best-of-k, and the sandbox rerun."""
    rerun = r.get("rechecked", {})
    rows = [("base sampler (each prompt's first sample)", "base", r["base_pass1"]),
            ("likelihood (max summed log-prob)", "likelihood", r.get("likelihood_pass1")),
            (f"Q-probe ({r['objective']}, beta {r['beta']:g})", "probe", r["probe_pass1"]),
            ("shown-test filter (runs the prompt's test)", "shown filter", r.get("shown_filter_pass1")),
            ("shown-test filter, then likelihood", "shown filter + likelihood", r.get("shown_filter_logprob_pass1")),
            ("shown-test filter, then the Q-probe", "cascade probe", r.get("cascade_probe_pass1")),
            ("best-of-k oracle", None, r["oracle_pass1"])]
    lines = [f"MBPP test prompts {r['n_test_prompts']}, k = 8; probes chosen by cross-validation on training prompts",
             f"{'policy':<46}{'pass@1':>8}{'run again now':>15}"]
    for name, key, value in rows:
        if value is None:
            continue
        again = f"{rerun[key]:>15.3f}" if key in rerun else ""
        lines.append(f"{name:<46}{value:>8.3f}{again}")
    if "rechecked_agree" in r:
        lines.append(f"(pass@1: expected over ties and draws, from the stored rewards; run again: the chosen "
                     f"completions in the sandbox now, {100 * r['rechecked_agree']:.1f}% agree with the stored rewards)")
    return "\n".join(lines)

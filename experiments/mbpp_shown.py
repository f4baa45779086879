"""Run the tests each committed prompt shows (MBPP: the assert in the prompt; HumanEval: the
docstring's >>> examples) against every committed completion, and commit the outcome beside the
rewards as `shown.jsonl.gz` (`shown` 1 = passes them all, `shown_reason`).

    python -m experiments.mbpp_shown [--model qwen2.5-coder-0.5b] [--model humaneval-qwen2.5-coder-0.5b]

The same library call as `qprobe reward --kind code:shown_tests --into shown` (the sandbox,
3 s per program), through the on-disk cache: a killed run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from qprobe.benchmark import SETS as DATASETS, is_greedy, load  # noqa: E402


def shown_tests(row: dict) -> list[str]:
    """The tests the row's prompt shows: the prompt rows of `qprobe prompts` carry them as
    `shown_tests`; committed rows sampled before that field existed get them here, the same way."""
    from qprobe.datasets.code import doctest_asserts

    if "shown_tests" in row:
        return row["shown_tests"]
    if "test_list" in row:
        return row["test_list"][:1]
    return doctest_asserts(row["code_prefix"])


def main():
    from qprobe.cache import Cache
    from qprobe.pipeline import reward_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", choices=sorted(DATASETS))
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    for model in args.model or sorted(DATASETS):
        rows, _ = load(with_rewards=False, model=model)
        work = ROOT / "runs" / "shown" / model
        work.mkdir(parents=True, exist_ok=True)
        out = []
        for kind in ("sampled", "greedy"):  # greedy rows share (prompt_id, sample) keys: their own file
            part = [{**r, "shown_tests": shown_tests(r)} for r in rows if is_greedy(r) == (kind == "greedy")]
            if not part:
                continue
            src, dst = work / f"{kind}.jsonl", work / f"{kind}.shown.jsonl"
            with open(src, "w", encoding="utf-8") as f:
                for r in part:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            print(f"{model} {kind}: {len(part)} rows", flush=True)
            scored = reward_file(src, dst, "code:shown_tests", cache=Cache(ROOT / ".qprobe-cache"),
                                 workers=args.workers, timeout=3.0, into="shown")
            out += [{"prompt_id": r["prompt_id"], "sample": r["sample"], "shown": r["shown"],
                     "shown_reason": r["shown_reason"], "n_shown_tests": len(r["shown_tests"]),
                     **({"greedy": True} if kind == "greedy" else {})} for r in scored]
        target = DATASETS[model] / "shown.jsonl.gz"
        tmp = target.with_suffix(".tmp")
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            for r in out:
                f.write(json.dumps(r) + "\n")
        tmp.replace(target)
        print(f"wrote {target.relative_to(ROOT)} ({len(out)} rows; mean shown "
              f"{sum(r['shown'] for r in out) / len(out):.3f})", flush=True)


if __name__ == "__main__":
    main()

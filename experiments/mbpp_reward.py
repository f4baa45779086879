"""Score the committed MBPP samples with `qprobe reward --kind code` and commit the rewards beside them.

    python experiments/mbpp_reward.py [--model qwen2.5-coder-0.5b]
    python experiments/mbpp_reward.py --recheck-passed     # rescore stored passes with today's sandbox

Runs the real CLI on all finished chunks (the sandbox runs each completion with all
of its task's tests, 3 s timeout), then writes <data>/rewards.jsonl.gz. Cached:
a rerun only scores new chunks. `--recheck-passed` runs every stored pass again
and prints how many no longer pass (e.g. after a fix to the reward); it writes nothing.
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from qprobe.benchmark import SETS as DATASETS, is_greedy, load  # noqa: E402


def recheck(model: str) -> None:
    from qprobe.rewards import score_rows

    rows, _ = load(model=model)
    passed = [r for r in rows if r["reward"] == 1.0]
    out = score_rows(passed, "code", timeout=3.0, workers=2)
    changed = [(r["prompt_id"], r["sample"], reason) for r, (rew, reason) in zip(passed, out) if rew != 1.0]
    print(f"{model}: {len(passed)} stored passes rechecked, {len(changed)} no longer pass")
    for c in changed:
        print("  ", *c)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(DATASETS))
    ap.add_argument("--recheck-passed", action="store_true")
    args = ap.parse_args()
    if args.recheck_passed:
        return recheck(args.model)
    rows, _ = load(with_rewards=False, model=args.model)
    work = ROOT / "runs" / "mbpp" / args.model
    work.mkdir(parents=True, exist_ok=True)
    out = []
    # greedy rows share (prompt_id, sample) with the sampled ones, so each kind is its own rows file
    for kind in ("sampled", "greedy"):
        part = [r for r in rows if is_greedy(r) == (kind == "greedy")]
        if not part:
            continue
        src, dst = work / f"{kind}.jsonl", work / f"{kind}.rewarded.jsonl"
        with open(src, "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        cmd = [sys.executable, str(ROOT / "cli.py"), "reward", str(src), "-o", str(dst), "--kind", "code",
               "--timeout", "3", "--cache-dir", str(ROOT / ".qprobe-cache")]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        with open(dst, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                out.append({**{k: r[k] for k in ("prompt_id", "sample", "reward", "reward_reason")},
                            **({"greedy": True} if kind == "greedy" else {})})
    target = DATASETS[args.model] / "rewards.jsonl.gz"
    tmp = target.with_suffix(".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    tmp.replace(target)
    print(f"wrote {target.relative_to(ROOT)} ({len(out)} rows)")


if __name__ == "__main__":
    main()

"""Score the committed MBPP samples with `qprobe reward --kind code` and commit the rewards beside them.

    python experiments/mbpp_reward.py

Runs the real CLI on all finished chunks (the sandbox runs each completion with all
of its task's tests, 3 s timeout), then writes data/mbpp/rewards.jsonl.gz. Cached:
a rerun only scores new chunks.
"""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mbpp_data import REWARDS, ROOT, is_greedy, load  # noqa: E402


def main():
    rows, _ = load(with_rewards=False)
    work = ROOT / "runs" / "mbpp"
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
    tmp = REWARDS.with_suffix(".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    tmp.replace(REWARDS)
    print(f"wrote {REWARDS.relative_to(ROOT)} ({len(out)} rows)")


if __name__ == "__main__":
    main()

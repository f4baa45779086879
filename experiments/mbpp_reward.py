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
from mbpp_data import REWARDS, ROOT, load  # noqa: E402


def main():
    rows, _ = load(with_rewards=False)
    work = ROOT / "runs" / "mbpp"
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "completions.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    cmd = [sys.executable, str(ROOT / "cli.py"), "reward", str(work / "completions.jsonl"), "-o",
           str(work / "rewarded.jsonl"), "--kind", "code", "--timeout", "3", "--cache-dir", str(ROOT / ".qprobe-cache")]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    tmp = REWARDS.with_suffix(".tmp")
    with open(work / "rewarded.jsonl", encoding="utf-8") as src, gzip.open(tmp, "wt", encoding="utf-8") as dst:
        for line in src:
            r = json.loads(line)
            dst.write(json.dumps({k: r[k] for k in ("prompt_id", "sample", "reward", "reward_reason")}) + "\n")
    tmp.replace(REWARDS)
    print(f"wrote {REWARDS.relative_to(ROOT)} ({len(rows)} rows)")


if __name__ == "__main__":
    main()

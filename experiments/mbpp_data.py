"""Load the committed MBPP benchmark data: sampled rows, rewards and features, aligned.

One folder per model (`DATASETS`):

    <folder>/shards/<chunk>.rows.jsonl.gz   completions (experiments/mbpp_sample.py)
    <folder>/shards/<chunk>.feats.npz       float16 features of a few extractors, same row order
    <folder>/rewards.jsonl.gz               reward + reason per (prompt_id, sample) (experiments/mbpp_reward.py)
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# model alias -> its data folder
DATASETS = {
    "smollm2-135m": ROOT / "data" / "mbpp",
    "qwen2.5-coder-0.5b": ROOT / "data" / "mbpp-qwen2.5-coder-0.5b",
    # HumanEval samples of the same model, for the transfer row of the MBPP table
    "humaneval-qwen2.5-coder-0.5b": ROOT / "data" / "humaneval-qwen2.5-coder-0.5b",
}
DATA = DATASETS["smollm2-135m"]


def shards_dir(model: str = "smollm2-135m") -> Path:
    return DATASETS[model] / "shards"


def rewards_path(model: str = "smollm2-135m") -> Path:
    return DATASETS[model] / "rewards.jsonl.gz"


def shard_names(kind: str | None = None, model: str = "smollm2-135m") -> list[str]:
    """Finished chunks (a chunk is finished when its rows file exists), optionally of one kind (test/train/greedy)."""
    names = sorted(p.name[: -len(".rows.jsonl.gz")] for p in shards_dir(model).glob("*.rows.jsonl.gz"))
    return [n for n in names if kind is None or n.startswith(kind + "-")]


def is_greedy(row: dict) -> bool:
    """Greedy chunks hold one T = 0 completion per test prompt, with the same (prompt_id, sample) keys."""
    return row["chunk"].startswith("greedy-")


def row_key(row: dict) -> tuple:
    """(prompt_id, sample, greedy) of a shard row (has "chunk") or a rewards row (has "greedy" if greedy)."""
    greedy = is_greedy(row) if "chunk" in row else bool(row.get("greedy", False))
    return row["prompt_id"], row["sample"], greedy


def read_gz_jsonl(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load(kind: str | None = None, with_rewards: bool = True, skip_unscored: bool = False,
         model: str = "smollm2-135m"):
    """(rows, {extractor name: float32 features}) for the finished chunks of `kind`.

    Rows without a reward are an error, or with `skip_unscored` left out with a note on stderr
    (a chunk sampled after the last `python experiments/mbpp_reward.py`).
    """
    rows, feats = [], {}
    shards, rewards_file = shards_dir(model), rewards_path(model)
    for name in shard_names(kind, model):
        rows += [{**r, "chunk": name} for r in read_gz_jsonl(shards / f"{name}.rows.jsonl.gz")]
        with np.load(shards / f"{name}.feats.npz") as z:
            for key in z.files:
                feats.setdefault(key, []).append(z[key])
    feats = {k: np.concatenate(v).astype(np.float32) for k, v in feats.items()}
    if with_rewards:
        rewards = {row_key(r): r for r in read_gz_jsonl(rewards_file)} if rewards_file.exists() else {}
        missing = [r for r in rows if row_key(r) not in rewards]
        if missing and not skip_unscored:
            raise SystemExit(f"{len(missing)} rows have no reward yet: run python experiments/mbpp_reward.py --model {model}")
        if missing:
            chunks = sorted({r["chunk"] for r in missing})
            print(f"left out {len(missing)} rows of chunks {', '.join(chunks)}: no reward yet "
                  "(python experiments/mbpp_reward.py scores them)", file=sys.stderr)
            keep = np.array([row_key(r) in rewards for r in rows])
            rows = [r for r, k in zip(rows, keep) if k]
            feats = {k: v[keep] for k, v in feats.items()}
        for r in rows:
            got = rewards[row_key(r)]
            r["reward"], r["reward_reason"] = got["reward"], got["reward_reason"]
    return rows, feats

"""qprobe.replay on a tiny synthetic benchmark set (no model, no sandbox)."""
import gzip
import json

import numpy as np
import pytest

from qprobe.errors import QProbeError
from qprobe.replay import load_set, replay


def _write_set(folder, n_train=30, n_test=20, k=4, d=6, seed=0):
    rng = np.random.default_rng(seed)
    (folder / "shards").mkdir(parents=True)
    w = rng.normal(size=d)
    rewards = []
    for split, n in (("train", n_train), ("test", n_test)):
        rows, X = [], []
        for p in range(n):
            for s in range(k):
                x = rng.normal(size=d)
                r = float(x @ w + 0.3 * rng.normal() > 0.5)  # the reward is predictable from the features
                rows.append({"prompt_id": f"{split}-{p}", "sample": s, "split": split, "completion": "x"})
                X.append(x)
                rewards.append({"prompt_id": f"{split}-{p}", "sample": s, "reward": r, "reward_reason": "-"})
        with gzip.open(folder / "shards" / f"{split}-00.rows.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        np.savez(folder / "shards" / f"{split}-00.feats.npz", F=np.array(X, dtype=np.float16))
    with gzip.open(folder / "rewards.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rewards)


def test_load_set_aligns_rewards_and_features(tmp_path):
    _write_set(tmp_path)
    rows, X = load_set(tmp_path, "F")
    assert len(rows) == len(X) == (30 + 20) * 4 and X.dtype == np.float32
    assert all(r["reward"] in (0.0, 1.0) for r in rows)


def test_replay_beats_base_when_the_reward_is_in_the_features(tmp_path):
    _write_set(tmp_path)
    out = replay(tmp_path, "F", objectives=("mse",), folds=3, k=4, recheck=False, echo=lambda *_: None)
    assert out["n_test_prompts"] == 20
    assert out["probe_pass1"] > out["base_pass1"] + 0.1
    assert out["probe_pass1"] <= out["oracle_pass1"] + 1e-9


def test_replay_refuses_a_folder_that_is_not_a_set(tmp_path):
    with pytest.raises(QProbeError, match="not a benchmark set"):
        load_set(tmp_path, "F")
    _write_set(tmp_path)
    with pytest.raises(QProbeError, match="no feature 'G'"):
        load_set(tmp_path, "G")


def test_format_replay_names_each_policy(tmp_path):
    from qprobe.demo import format_replay

    _write_set(tmp_path)
    text = format_replay(replay(tmp_path, "F", objectives=("mse",), folds=3, k=4, recheck=False,
                                echo=lambda *_: None))
    assert "base sampler" in text and "Q-probe" in text and "best-of-k oracle" in text


@pytest.mark.model
def test_demo_part_one_runs_end_to_end(tmp_path):
    """The README's first command, small: the live pipeline on the embedded default."""
    from click.testing import CliRunner

    from qprobe.cli import cli

    r = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "demo"), "--train-tasks", "4", "--test-tasks", "2",
                                 "-k", "2", "--max-new-tokens", "24", "--no-benchmark",
                                 "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    assert "best-of-k" in r.output and (tmp_path / "demo" / "chosen.jsonl").exists()

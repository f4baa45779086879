"""qprobe.benchmark (read_set, replay) on a tiny synthetic benchmark set (no model, no sandbox)."""
import gzip
import json

import numpy as np
import pytest

from qprobe.errors import QProbeError
from qprobe.benchmark import load_set, replay


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


def _with_signals(folder, seed=1):
    """Add token_logprobs to the rows and a shown.jsonl.gz whose outcome is implied by passing."""
    rng = np.random.default_rng(seed)
    shown = []
    for path in (folder / "shards").glob("*.rows.jsonl.gz"):
        with gzip.open(path, "rt") as f:
            rows = [json.loads(line) for line in f]
        for r in rows:
            r["token_logprobs"] = rng.normal(-1, 0.3, size=5).round(3).tolist()
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with gzip.open(folder / "rewards.jsonl.gz", "rt") as f:
        for r in map(json.loads, f):
            shown.append({"prompt_id": r["prompt_id"], "sample": r["sample"],
                          "shown": 1.0 if r["reward"] or rng.random() < 0.3 else 0.0})
    with gzip.open(folder / "shown.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in shown)


def test_compare_settings_and_transfer_report_both_settings(tmp_path):
    from qprobe.benchmark import compare_settings, is_greedy, read_set, transfer

    _write_set(tmp_path)
    _with_signals(tmp_path)
    rows, feats = read_set(tmp_path)
    assert not any(is_greedy(r) for r in rows) and all("shown" in r for r in rows)
    split = np.array([r["split"] for r in rows])
    res = compare_settings(rows, feats, split == "train", split == "test", folds=3, k=4)
    a = {r["policy"]: r for r in res["table"]["A"]}
    b = {r["policy"]: r for r in res["table"]["B"]}
    assert set(a) == {"base", "likelihood", "probe"} and a["likelihood"]["diff"] == 0.0
    assert set(b) == {"filter:shown", "filter:shown + likelihood", "cascade probe", "probe with signals"}
    assert all(r["lo"] <= r["diff"] <= r["hi"] for r in res["table"]["A"] + res["table"]["B"])
    # the filter can only help here (shown is implied by passing), the probe sees the reward in the features
    assert b["filter:shown"]["reward"] >= a["base"]["reward"] and a["probe"]["reward"] > a["base"]["reward"] + 0.1
    assert res["per_prompt"]["cascade probe"].mean() <= res["oracle"] + 1e-9
    assert res["choices"]["B: cascade"].params["cascade"] == "shown"
    test = split == "test"
    out = transfer(res, [r for r, t in zip(rows, test) if t], {k: v[test] for k, v in feats.items()})
    assert np.isclose(out["per_prompt"]["cascade probe"].mean(), res["per_prompt"]["cascade probe"].mean())


def test_replay_reports_filter_and_cascade_when_the_set_has_shown(tmp_path):
    _write_set(tmp_path)
    _with_signals(tmp_path)
    out = replay(tmp_path, "F", objectives=("mse",), folds=3, k=4, recheck=False, echo=lambda *_: None)
    assert {"likelihood_pass1", "shown_filter_pass1", "cascade_probe_pass1"} <= set(out)
    from qprobe.demo import format_replay

    text = format_replay(out)
    assert "likelihood" in text and "shown-test filter" in text and "then the Q-probe" in text
    assert "filter, then likelihood" in text and "shown_filter_logprob_pass1" in out

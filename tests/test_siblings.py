"""Demonstrations, reward transforms, the label-budgeted loop and the KL view of `eval`.

Reference answers: calibration of a known reward list worked by hand; the ridge bonus against
Sherman-Morrison; weighted fits against duplicated rows; best-of-n against enumeration of
subsets; a loop killed with SIGKILL mid-run resumes to the same rounds as an uninterrupted one.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qprobe import QProbe
from qprobe.cli import cli
from qprobe.errors import QProbeError
from qprobe.io import save_features, write_jsonl
from qprobe.loop import argmax_pass1, choose, labels_to_reach, ridge_bonus, run_loop
from qprobe.select import best_of_n_curve, bon_kl_bound, bon_reward_at_kl
from qprobe.transforms import calibrate, parse_transform, transform_rewards

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- calibration
def test_calibration_of_a_known_reward_list():
    r = [0, 1, 0, 0, 1, 1, 1, 1, 0, 0.5, 1]
    g = ["a"] * 4 + ["b"] * 4 + ["c"] * 3
    want = [1 / 3, 1.0, 1 / 3, 1 / 3,  # a lone pass outranks its 3 fails; a fail ties 2 of 3 others
            0.5, 0.5, 0.5, 0.5,  # everything passes: a pass is the median
            0.0, 0.5, 1.0]
    np.testing.assert_allclose(calibrate(r, g), want)
    np.testing.assert_allclose(transform_rewards("calibrated", r, g), want)
    np.testing.assert_allclose(transform_rewards("calibrated-exp:2", r, g), np.expm1(2 * np.array(want)) / np.expm1(2))
    np.testing.assert_allclose(transform_rewards("none", r, g), r)


def test_calibration_of_a_demonstration_against_the_base_samples_only():
    r = [0, 1, 0, 0, 1]  # the last row is a demonstration of the same prompt
    c = calibrate(r, [0] * 5, reference=[True] * 4 + [False])
    np.testing.assert_allclose(c, [1 / 3, 1.0, 1 / 3, 1 / 3, (3 + 0.5) / 4])


@pytest.mark.parametrize("spec", ["calibrated-exp", "calibrated-exp:0", "calibrated-exp:x", "rank", "calibrated-exp:inf"])
def test_bad_transform_is_one_clear_error(spec):
    with pytest.raises(QProbeError, match="expected none, calibrated or calibrated-exp:T"):
        parse_transform(spec)


# ---------------------------------------------------------------- sample weights
def _data(n=60, d=5, seed=0):
    rs = np.random.default_rng(seed)
    X = rs.normal(size=(n, d))
    y = (X[:, 0] + 0.5 * rs.normal(size=n) > 0).astype(float)
    return X, y, np.repeat(np.arange(n // 4), 4)


@pytest.mark.parametrize("objective", ["mse", "ce"])
def test_integer_weights_equal_duplicated_rows(objective):
    X, y, _ = _data()
    w = np.random.default_rng(1).integers(0, 4, size=len(y)).astype(float)
    rep = np.repeat(np.arange(len(y)), w.astype(int))
    kw = dict(objective=objective, alpha=3.0, standardize=False, max_iter=500)
    a = QProbe(**kw).fit(X, y, sample_weight=w)
    b = QProbe(**kw).fit(X[rep], y[rep])
    np.testing.assert_allclose(a.coef_, b.coef_, atol=1e-5)
    np.testing.assert_allclose(a.intercept_, b.intercept_, atol=1e-5)


def test_pg_weight_scales_the_rows_reward():
    X, y, g = _data()
    w = np.random.default_rng(2).uniform(0, 3, size=len(y))
    a = QProbe("pg", k=4, epochs=3, random_state=0).fit(X, y, groups=g, sample_weight=w)
    b = QProbe("pg", k=4, epochs=3, random_state=0).fit(X, y * w, groups=g)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-6)


def test_ce_takes_soft_targets_and_bad_weights_are_refused():
    X, y, g = _data()
    QProbe("ce").fit(X, calibrate(y, g))
    with pytest.raises(QProbeError, match="sample_weight"):
        QProbe("mse").fit(X, y, sample_weight=-np.ones(len(y)))


# ---------------------------------------------------------------- the ridge bonus
def test_ridge_bonus_matches_sherman_morrison():
    rs = np.random.default_rng(0)
    a, m = rs.normal(size=6), rs.normal(size=6)
    X_lab = np.stack([m + a, m - a])  # centred: Z = (a, -a), so A = alpha I + 2 a a^T
    X_c = rs.normal(size=(9, 6))
    alpha = 0.7
    x = X_c - m
    want = np.sqrt((x * x).sum(1) / alpha - 2 * (x @ a) ** 2 / (alpha * (alpha + 2 * a @ a)))
    np.testing.assert_allclose(ridge_bonus(X_lab, X_c, alpha), want, rtol=1e-10)
    # with a feature scale: the same formula on (x - mu) / scale
    s = rs.uniform(0.5, 2, size=6)
    xs, as_ = x / s, a / s
    want = np.sqrt((xs * xs).sum(1) / alpha - 2 * (xs @ as_) ** 2 / (alpha * (alpha + 2 * as_ @ as_)))
    np.testing.assert_allclose(ridge_bonus(X_lab, X_c, alpha, s), want, rtol=1e-10)


def test_rules_choose_as_documented():
    rng = np.random.default_rng(0)
    q = np.array([0.0, 3.0, 1.0, 2.0, 5.0])
    bonus = np.array([10.0, 0.0, 0.0, 0.0, 0.0])
    cand = np.array([True, True, True, True, False])
    assert choose("greedy", q, bonus, cand, 2, rng).tolist() == [1, 3]
    assert choose("optimism", q, bonus, cand, 2, rng).tolist() == [0, 1]
    assert choose("optimism", q, bonus, cand, 2, rng, c=0.0).tolist() == [1, 3]
    u = choose("uniform", q, bonus, cand, 4, rng)
    assert u.tolist() == [0, 1, 2, 3]
    assert argmax_pass1([1.0, 1.0, 0.0, 0.0, 2.0, 1.0], [1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(
        (0.5 + 1.0 + 0.0) / 3)  # ties split evenly


# ---------------------------------------------------------------- best-of-n and the KL view
def test_best_of_n_curve_matches_enumeration():
    rs = np.random.default_rng(0)
    r = np.r_[rs.integers(0, 2, size=6), rs.uniform(size=6), rs.integers(0, 2, size=5)]
    g = np.r_[[0] * 6, [1] * 6, [2] * 5]
    n, got, kl = best_of_n_curve(r, g)
    assert n.tolist() == [1, 2, 3, 4, 5]
    for j, size in enumerate(n):
        per = [np.mean([max(c) for c in itertools.combinations(r[g == grp], size)]) for grp in range(3)]
        assert got[j] == pytest.approx(np.mean(per))
    np.testing.assert_allclose(kl, bon_kl_bound(n))
    assert bon_reward_at_kl(0.0, n, got, kl) == pytest.approx(np.mean([r[g == i].mean() for i in range(3)]))
    assert bon_reward_at_kl(99.0, n, got, kl) == pytest.approx(got[-1])
    mid = (kl[1] + kl[2]) / 2
    assert bon_reward_at_kl(mid, n, got, kl) == pytest.approx((got[1] + got[2]) / 2)


def _files(tmp_path, n_prompts=30, k=4, d=6, seed=0, extra=None):
    rs = np.random.default_rng(seed)
    rows, X = [], rs.normal(size=(n_prompts * k, d))
    for p in range(n_prompts):
        for s in range(k):
            i = p * k + s
            rows.append({"prompt_id": p, "prompt": f"task {p}", "sample": s, "completion": f"c{p}-{s}",
                         "reward": float(X[i, 0] + 0.3 * rs.normal() > 0.8), "split": "train" if p % 3 else "test",
                         **(extra(p) if extra else {})})
    write_jsonl(tmp_path / "rows.jsonl", rows)
    save_features(tmp_path / "f.npy", X.astype(np.float32), rows, {"kind": "fake", "model": "t"})
    return tmp_path / "rows.jsonl", tmp_path / "f.npy"


def test_eval_reports_ess_and_best_of_k_at_the_probe_kl(tmp_path):
    rows, feats = _files(tmp_path)
    r = CliRunner().invoke(cli, ["train", str(rows), str(feats), "-o", str(tmp_path / "p"), "--objective", "mse",
                                 "--beta", "0.05", "--where", "split=train"])
    assert r.exit_code == 0, r.output
    args = ["eval", str(rows), str(feats), "--probe", str(tmp_path / "p"), "--where", "split=test"]
    rep = json.loads(CliRunner().invoke(cli, args + ["--json"]).stdout)
    assert 1 <= rep["ess"] <= rep["k"]
    assert rep["base_reward"] <= rep["bok_reward_at_probe_kl"] <= rep["oracle_reward"]
    text = CliRunner().invoke(cli, args).stdout
    assert f"probe ESS {rep['ess']:.2f} of {rep['k']}" in text
    assert f"reaches reward {rep['bok_reward_at_probe_kl']:.3f}" in text


# ---------------------------------------------------------------- demonstrations and transforms from the CLI
class FakeEmbedder:
    """Stands in for the features' extractor: a fixed vector per (prompt, completion)."""

    def __init__(self, d=6):
        self.d, self.calls = d, 0

    def embed(self, items, cache=None, desc=""):
        self.calls += len(items)
        out = np.zeros((len(items), self.d), np.float32)
        out[:, 0] = 3.0  # demonstrations look like passes
        return out


def test_train_with_demos_and_transform(tmp_path, monkeypatch):
    import qprobe.demos

    rows, feats = _files(tmp_path, extra=lambda p: {"code": f"return {p}"} if p % 2 else {})
    fake = FakeEmbedder()
    monkeypatch.setattr(qprobe.demos, "embedder_from_identity", lambda ident: fake)
    base = ["train", str(rows), str(feats), "--objective", "ce", "--where", "split=train"]
    r = CliRunner().invoke(cli, base + ["-o", str(tmp_path / "p"), "--demos", "code", "--demo-weight", "2",
                                        "--demo-template", "```python\n{demo}\n", "--reward-transform", "calibrated"])
    assert r.exit_code == 0, r.output
    n_demo = len({p for p in range(30) if p % 3 and p % 2})
    assert fake.calls == n_demo and f"+ {n_demo} demonstrations (weight 2)" in r.stderr
    r = CliRunner().invoke(cli, base + ["-o", str(tmp_path / "q"), "--demos", "code", "--tune", "3"])
    assert r.exit_code == 0, r.output
    assert "demo weight" in r.stderr
    demo_file = tmp_path / "demos.jsonl"
    write_jsonl(demo_file, [{"prompt_id": 1, "completion": "x"}, {"prompt_id": 2, "completion": "y"}])
    r = CliRunner().invoke(cli, base + ["-o", str(tmp_path / "s"), "--demos", str(demo_file)])
    assert r.exit_code == 0 and "+ 2 demonstrations (weight 1)" in r.stderr
    write_jsonl(demo_file, [{"prompt_id": 999, "completion": "x"}])
    r = CliRunner().invoke(cli, base + ["-o", str(tmp_path / "t"), "--demos", str(demo_file)])
    assert r.exit_code == 1 and "row 1: prompt_id 999 is not in the training rows" in r.stderr
    r = CliRunner().invoke(cli, base + ["-o", str(tmp_path / "u"), "--reward-transform", "calibrated-exp:-1"])
    assert r.exit_code == 1 and "calibrated-exp:T with T > 0" in r.stderr
    r = CliRunner().invoke(cli, base + ["-o", str(tmp_path / "v"), "--demos", "nofield"])
    assert r.exit_code == 1 and "neither a file nor a field" in r.stderr


# ---------------------------------------------------------------- the loop
def _pool(n_prompts=40, k=4, d=6, seed=0):
    rs = np.random.default_rng(seed)
    X = rs.normal(size=(n_prompts * k, d))
    y = (X[:, 0] + 0.3 * rs.normal(size=len(X)) > 1.0).astype(float)
    g = np.repeat(np.arange(n_prompts), k)
    return X, y, g, g < n_prompts // 2


@pytest.mark.parametrize("rule,objective", [("optimism", "mse"), ("greedy", "mse"), ("uniform", "mse"),
                                            ("optimism", "ce"), ("optimism", "pg")])
def test_loop_spends_its_budget_and_resumes_in_process(tmp_path, rule, objective):
    X, y, g, pool = _pool()
    asked = []

    def oracle(idx):
        asked.extend(idx.tolist())
        return y[idx]

    def evaluate(q):
        return {"pass1": argmax_pass1(q[~pool], y[~pool], g[~pool])}

    kw = dict(rule=rule, objective=objective, probe_params={"epochs": 2} if objective == "pg" else {"alpha": 1.0},
              ensemble=3)
    full = run_loop(X, g, pool, evaluate, oracle, tmp_path / "a.json", 4, 7, **kw)
    assert [r["labels"] for r in full] == [7, 14, 21, 28] and len(set(asked)) == 28 and pool[asked].all()
    part = run_loop(X, g, pool, evaluate, lambda i: y[i], tmp_path / "b.json", 2, 7, **kw)
    rest = run_loop(X, g, pool, evaluate, lambda i: y[i], tmp_path / "b.json", 4, 7, **kw)
    assert rest[:2] == part and rest == json.loads(json.dumps(full))
    with pytest.raises(QProbeError, match="other settings"):
        run_loop(X, g, pool, evaluate, oracle, tmp_path / "a.json", 4, 8, **kw)
    assert labels_to_reach(full, -1.0) == 7 and labels_to_reach(full, 2.0) is None


ORACLE = '''
import time
def reward(row):
    time.sleep(0.05)  # a slow labeller, so that the kill lands mid-round
    return float(row["reward"])
'''


@pytest.mark.subprocess
def test_loop_resumes_after_kill_9_with_the_same_result(tmp_path):
    rows, feats = _files(tmp_path, n_prompts=45)
    (tmp_path / "slow_oracle.py").write_text(ORACLE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}

    def cmd(state):
        return [sys.executable, "-m", "qprobe", "loop", str(rows), str(feats), "--state", str(state), "--rounds", "6",
                "--label-budget", "8", "--pool", "split=train", "--held-out", "split=test",
                "--kind", "python:slow_oracle:reward", "--json"]

    whole = subprocess.run(cmd(tmp_path / "whole.json"), env=env, cwd=tmp_path, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    state = tmp_path / "killed.json"
    proc = subprocess.Popen(cmd(state), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # generous: on a loaded 2-core machine a cold start alone took over a minute
    while time.time() < deadline:  # kill during a round after at least two were committed
        if state.exists() and len(json.loads(state.read_text())["rounds"]) >= 2:
            break
        time.sleep(0.02)
    time.sleep(0.15)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(json.loads(state.read_text())["rounds"])
    assert 2 <= n_before < 6, "the kill should land before the loop ends"
    again = subprocess.run(cmd(state), env=env, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == json.loads(whole.stdout)
    assert json.loads(state.read_text())["rounds"] == json.loads((tmp_path / "whole.json").read_text())["rounds"]

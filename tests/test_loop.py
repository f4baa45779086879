"""The label-budgeted loop (`qprobe.loop`): the ridge bonus against Sherman-Morrison, the rules as
documented, and a loop killed with SIGKILL mid-run resumes to the same rounds as an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qprobe.errors import QProbeError
from qprobe.loop import argmax_pass1, choose, labels_to_reach, ridge_bonus, run_loop
from qprobe.testing.inputs import rows_and_features

ROOT = Path(__file__).resolve().parents[1]



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
    rows, feats = rows_and_features(tmp_path, n_prompts=45)
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

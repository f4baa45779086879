"""Best-of-n and the KL view of `eval` (`qprobe.select`): the curve against enumeration of subsets."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qprobe.cli import cli
from qprobe.select import best_of_n_curve, bon_kl_bound, bon_reward_at_kl
from qprobe.testing.inputs import rows_and_features

ROOT = Path(__file__).resolve().parents[1]



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


def test_eval_reports_ess_and_best_of_k_at_the_probe_kl(tmp_path):
    rows, feats = rows_and_features(tmp_path)
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

"""Sample weights of `QProbe.fit`: weighted fits against duplicated rows, pg and ce weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qprobe import QProbe
from qprobe.errors import QProbeError
from qprobe.transforms import calibrate

ROOT = Path(__file__).resolve().parents[1]



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

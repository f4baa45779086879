"""qprobe.tune: the loss each objective is scored by, and cross-validated choices that can go
either way (a strong penalty on few noisy rows, the weakest on many clean ones)."""
import json

import numpy as np
import pytest
from sklearn.metrics import log_loss, mean_squared_error

from qprobe import QProbe, QProbeError, tune
from qprobe.select import selection_report
from qprobe.tune import own_loss

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    torch = None


def data(seed, n_groups, k=8, d=6, noise_dims=0, scale=3.0):
    """Reward ~ Bernoulli(sigmoid(scale * x0 - 2)), plus `noise_dims` useless features."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_groups * k, d + noise_dims))
    p = 1 / (1 + np.exp(-(scale * X[:, 0] - 2.0)))
    y = (rng.random(len(p)) < p).astype(float)
    return X, y, np.repeat(np.arange(n_groups), k)


def test_own_loss_matches_sklearn():
    rng = np.random.default_rng(0)
    q, y, g = rng.normal(size=40), (rng.random(40) < 0.3).astype(float), np.repeat(np.arange(10), 4)
    assert own_loss("mse", q, y, g) == pytest.approx(mean_squared_error(y, q))
    assert own_loss("ce", q, y, g) == pytest.approx(log_loss(y, 1 / (1 + np.exp(-q))))
    assert own_loss("pg", q, y, g) == pytest.approx(-selection_report(q, y, g, 1.0)["probe_reward"])
    # pref: a pair ranked the right way costs less than the same pair ranked the wrong way
    y2, g2 = np.array([0.0, 1.0, 1.0, 0.0]), np.array([0, 0, 1, 1])
    right, wrong = np.array([0.0, 2.0, 2.0, 0.0]), np.array([2.0, 0.0, 0.0, 2.0])
    assert own_loss("pref", right, y2, g2) == pytest.approx(np.log1p(np.exp(-2.0)))
    assert own_loss("pref", wrong, y2, g2) == pytest.approx(np.log1p(np.exp(2.0)))


@pytest.mark.parametrize("objective", ["mse", "ce"])
def test_penalty_follows_the_data(objective):
    # few rows, many useless features: a strong penalty wins, and it beats the weakest on fresh prompts
    X, y, g = data(1, n_groups=12, noise_dims=150)
    few = tune(X, y, g, objective, folds=4)
    weakest = min(p["alpha"] for p in few.grid)
    assert few.params["alpha"] > weakest
    Xt, yt, gt = data(2, n_groups=300, noise_dims=150)

    def held_out(alpha):
        return own_loss(objective, QProbe(objective, alpha=alpha).fit(X, y).predict(Xt), yt, gt)

    assert held_out(few.params["alpha"]) < held_out(weakest)
    # many rows, no useless features: the weakest penalty wins
    X, y, g = data(3, n_groups=400)
    assert tune(X, y, g, objective, folds=4).params["alpha"] == weakest


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.subprocess
def test_pg_chooses_training_length_and_a_sharp_beta():
    X, y, g = data(4, n_groups=150, scale=6.0)
    t = tune(X, y, g, "pg", k=8, folds=3)
    assert t.params in t.grid and len(t.losses) == len(t.grid) and len(t.rewards) == len(t.betas)
    base = selection_report(np.zeros(len(y)), y, g, 0.0)["base_reward"]
    assert t.cv_reward > base + 0.1
    assert t.beta <= 0.1  # a clean signal: selection close to the argmax pays
    assert t.cv_reward == max(t.rewards)


def test_bad_arguments():
    X, y, g = data(5, n_groups=6)
    with pytest.raises(QProbeError, match="needs groups"):
        tune(X, y, None, "mse")
    with pytest.raises(QProbeError, match="folds must be between 2 and the number of prompts \\(6\\)"):
        tune(X, y, g, "mse", folds=7)
    with pytest.raises(QProbeError, match="objective must be one of"):
        tune(X, y, g, "nope")
    with pytest.raises(QProbeError, match="betas >= 0"):
        tune(X, y, g, "mse", betas=[-1.0])


def test_cli_train_tune(tmp_path):
    from test_cli import error, invoke, synthetic

    rows, X = synthetic(tmp_path)
    r = invoke("train", rows, X, "-o", tmp_path / "probe", "--objective", "mse", "--tune", 3)
    assert "cross-validation chose alpha" in r.stderr and "trained a mse probe on" in r.stderr
    chosen = float(r.stderr.split("beta ")[1].split(" ")[0])
    cfg = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert cfg["beta"] == pytest.approx(chosen)
    assert error("train", rows, X, "-o", tmp_path / "p2", "--tune", 3, "--alpha", 5) == \
        "Error: --tune chooses --alpha / --epochs itself: give --tune or them, not both"


def test_epochs_grid_is_about_the_same_number_of_steps_at_any_size():
    from qprobe.tune import epochs_grid

    assert epochs_grid(3000) == [{"epochs": e} for e in (8, 33, 133, 533)]
    assert epochs_grid(100_000) == [{"epochs": e} for e in (1, 4, 16)]  # 25 steps round up to one epoch
    assert epochs_grid(50, batch_size=None) == [{"epochs": e} for e in (25, 100, 400, 1600)]

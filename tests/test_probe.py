"""QProbe against reference answers: closed-form ridge, sklearn logistic regression,
selection on data with a known Q, file round trips and refusals, the sklearn contract."""
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from qprobe._probe_io import _digest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import parametrize_with_checks

from qprobe import QProbe, QProbeError
from qprobe.select import selection_report

try:
    import torch

    torch.set_num_threads(1)  # tiny problems; the machine's cores are shared
except ImportError:  # pragma: no cover
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")

D = 12
THETA = np.random.default_rng(123).normal(size=D)  # the true Q direction


def synth(seed, n_groups=150, k=8):
    """Features with non-trivial means and scales; reward ~ Bernoulli(sigmoid(true Q))."""
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n_groups * k, D))
    X = Z * np.linspace(0.1, 10, D) + np.linspace(-50, 50, D)
    p = 1 / (1 + np.exp(-(Z @ THETA + np.repeat(rng.normal(size=n_groups), k))))
    r = (rng.random(p.size) < p).astype(float)
    return X, r, p, np.repeat(np.arange(n_groups), k)


def pref_pairs(X, r, g):
    """From each prompt, one pair of rows with different rewards; y = 1 on the better one."""
    rows, y, pid = [], [], []
    for p in np.unique(g):
        idx = np.flatnonzero(g == p)
        win, lose = idx[r[idx] == 1], idx[r[idx] == 0]
        if len(win) and len(lose):
            rows += [lose[0], win[0]]
            y += [0.0, 1.0]
            pid += [p, p]
    return X[rows], np.array(y), np.array(pid)


# ---------------------------------------------------------------- reference answers
@pytest.mark.parametrize("standardize", [True, False])
def test_mse_equals_closed_form_ridge(standardize):
    X, r, _, _ = synth(0)
    y = X @ np.arange(D) * 0.01 + r
    alpha = 3.0
    probe = QProbe("mse", alpha=alpha, standardize=standardize).fit(X, y)
    mu = X.mean(0)
    s = X.std(0) if standardize else np.ones(D)
    Z = (X - mu) / s
    w = np.linalg.solve(Z.T @ Z + alpha * np.eye(D), Z.T @ (y - y.mean()))
    np.testing.assert_allclose(probe.coef_, w / s, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(probe.predict(X), Z @ w + y.mean(), rtol=1e-9)
    np.testing.assert_allclose(probe.mean_, mu if standardize else 0.0, rtol=1e-12)


def test_mse_float32_features_close_to_float64():
    X, r, _, _ = synth(1)
    q64 = QProbe("mse").fit(X, r).predict(X)
    q32 = QProbe("mse").fit(X.astype(np.float32), r).predict(X)
    np.testing.assert_allclose(q32, q64, atol=1e-3)


def test_ce_equals_sklearn_logistic_regression_on_standardised_features():
    X, r, _, _ = synth(2)
    alpha = 2.0
    probe = QProbe("ce", alpha=alpha).fit(X, r)
    mu, s = X.mean(0), X.std(0)
    ref = LogisticRegression(C=1 / alpha, tol=1e-12, max_iter=10_000).fit((X - mu) / s, r)
    np.testing.assert_allclose(probe.coef_ * s, ref.coef_[0], atol=1e-5)
    np.testing.assert_allclose(probe.predict(X), ref.decision_function((X - mu) / s), atol=1e-5)


# ---------------------------------------------------------------- selection on a known Q
def _fit(objective, seed=0, **kw):
    X, r, _, g = synth(seed)
    if objective == "pref":
        X, r, g = pref_pairs(X, r, g)
    return QProbe(objective, random_state=0, **kw).fit(X, r, groups=g)


@pytest.mark.parametrize(
    "objective,kw",
    [
        ("mse", {}),
        ("ce", {}),
        pytest.param("pg", {}, marks=needs_torch),
        pytest.param("pref", {}, marks=needs_torch),
        pytest.param("pg", {"hidden": 16}, marks=needs_torch),
        pytest.param("mse", {"hidden": 8, "lr": 1e-2}, marks=needs_torch),
    ],
)
def test_every_objective_selects_clearly_better_than_base(objective, kw):
    probe = _fit(objective, **kw)
    X, _, p, g = synth(99, n_groups=300)  # held-out prompts; score with the true probabilities
    rep = selection_report(probe.predict(X), p, g, beta=0)
    # base ~0.5 and best-of-8 ~0.8 here: demand more than half of that gap
    assert rep["argmax_reward"] - rep["base_reward"] > 0.5 * (rep["oracle_reward"] - rep["base_reward"]), rep
    assert probe.score(X, p, g) > rep["base_reward"] + 0.1


@pytest.mark.parametrize(
    "objective,kw",
    [
        ("mse", {}),
        ("ce", {}),
        pytest.param("pg", {"epochs": 3}, marks=needs_torch),
        pytest.param("pref", {"epochs": 3}, marks=needs_torch),
        pytest.param("pg", {"epochs": 3, "hidden": 4}, marks=needs_torch),
    ],
)
def test_same_fit_twice_gives_identical_coefficients(objective, kw):
    a, b = _fit(objective, **kw), _fit(objective, **kw)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    assert a.intercept_ == b.intercept_


@needs_torch
def test_pg_chunks_respect_k_and_use_every_multi_row_chunk():
    from qprobe._train import _epoch_segments
    from qprobe.select import group_index

    g = np.repeat(["a", "b", "c"], [7, 10, 11])[np.random.default_rng(0).permutation(28)]
    gi = group_index(g)
    rows, sizes = _epoch_segments("pg", gi, 28, 4, np.random.RandomState(0))
    # a: 4+3, b: 4+4+2, c: 4+4+3 -> 8 chunks; no 1-row tail chunk here, so every row is used
    assert sorted(sizes.tolist()) == [2, 3, 3, 4, 4, 4, 4, 4]
    assert sorted(rows.tolist()) == list(range(28))
    chunks = np.split(rows, np.cumsum(sizes)[:-1])
    assert all(len(set(g[c])) == 1 for c in chunks)
    rows, sizes = _epoch_segments("pg", group_index(np.repeat([0, 1], [5, 4])), 9, 4, np.random.RandomState(0))
    assert sorted(sizes.tolist()) == [4, 4]  # group 0's 1-row tail is dropped


def test_select_uses_beta_and_returns_one_row_per_group():
    probe = _fit("mse")
    X, _, _, g = synth(5, n_groups=20)
    q = probe.predict(X)
    idx, labels = probe.select(X, g, beta=0, return_labels=True)
    np.testing.assert_array_equal(labels, np.arange(20))
    np.testing.assert_array_equal(idx, [np.flatnonzero(g == j)[np.argmax(q[g == j])] for j in range(20)])
    np.testing.assert_array_equal(probe.select(X, g, random_state=1), probe.select(X, g, random_state=1))


# ---------------------------------------------------------------- files
@pytest.mark.parametrize("objective,kw", [("ce", {}), pytest.param("pg", {"hidden": 5, "epochs": 2}, marks=needs_torch)])
def test_save_load_round_trip(tmp_path, objective, kw):
    probe = _fit(objective, **kw)
    ident = {"kind": "hf", "model": "tiny", "layer": 3, "pooling": "last"}
    probe.save(tmp_path / "p", embedder=ident)
    probe.save(tmp_path / "p")  # replacing an existing probe directory is fine
    back = QProbe.load(tmp_path / "p")
    X = synth(7)[0]
    np.testing.assert_array_equal(back.predict(X), probe.predict(X))
    assert back.get_params() == probe.get_params()
    assert back.embedder_ == ident
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["format"] == "qprobe-probe v1" and cfg["n_features"] == D and cfg["objective"] == objective
    back.check_features(D, ident)
    with pytest.raises(QProbeError, match="expects 12"):
        back.check_features(D + 1)
    with pytest.raises(QProbeError, match="layer"):
        back.check_features(D, {**ident, "layer": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temporary directories left


def _rewrite_weights(path, tensors):
    from safetensors.numpy import save

    blob = save(tensors)
    (path / "probe.safetensors").write_bytes(blob)
    cfg = json.loads((path / "config.json").read_text())
    cfg["sha256"] = _digest(blob, cfg)  # an attacker who recomputes the checksum: later checks must still hold
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_config(path, rehash=True, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    if rehash:
        cfg["sha256"] = _digest((path / "probe.safetensors").read_bytes(), cfg)
    (path / "config.json").write_text(json.dumps(cfg))


class _Boom:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda p: _edit_config(p, format="qprobe-probe v2"), "format"),
        (lambda p: _edit_config(p, rehash=False, beta=5.0), "checksum"),
        (lambda p: _edit_config(p, rehash=False, embedder={"kind": "hf", "model": "other"}), "checksum"),
        (lambda p: (p / "config.json").write_bytes(pickle.dumps(_Boom())), "not a qprobe config"),
        (lambda p: (p / "probe.safetensors").write_bytes(pickle.dumps(_Boom())), "checksum"),
        (lambda p: _rewrite_weights(p, {"payload": np.frombuffer(pickle.dumps(_Boom()), np.uint8).copy()}), "tensors"),
        (lambda p: _edit_config(p, n_features=D + 1), "shape"),
        (lambda p: _rewrite_weights(p, {"coef": np.zeros(D + 2), "intercept": np.zeros(1), "mean": np.zeros(D), "scale": np.ones(D)}), "shape"),
        (lambda p: (p / "probe.safetensors").write_bytes(b"\x00" * 40), "checksum"),
        (lambda p: (p / "probe.safetensors").unlink(), "not a probe directory"),
    ],
)
def test_load_refuses_bad_files_with_one_line(tmp_path, corrupt, match, capsys):
    _fit("mse").save(tmp_path / "p")
    corrupt(tmp_path / "p")
    with pytest.raises(QProbeError, match=match) as info:
        QProbe.load(tmp_path / "p")
    assert "\n" not in str(info.value)
    assert "unpickled" not in capsys.readouterr().out


def test_save_refuses_to_replace_something_else(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(QProbeError, match="not a probe directory"):
        _fit("mse").save(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


# ---------------------------------------------------------------- user errors
X0, R0, _, G0 = synth(3, n_groups=10, k=4)


@pytest.mark.parametrize(
    "objective,X,y,groups,match",
    [
        ("mse", X0[:, 0], R0, None, "2-D"),
        ("mse", X0, R0[:-1], None, "inconsistent"),
        ("mse", np.where(np.arange(X0.size).reshape(X0.shape) == 5, np.nan, X0), R0, None, "NaN"),
        ("mse", X0, np.where(np.arange(R0.size) == 2, np.inf, R0), None, "infinity"),
        ("pg", X0, R0, None, "needs groups"),
        ("pref", X0, R0, None, "needs groups"),
        ("pg", X0, R0, np.r_[G0[:-1], 99], "at least 2 rows"),
        ("pg", X0, R0, G0[:-1], "labels"),
        ("pref", X0, R0, G0, "exactly 2 rows"),
        ("pref", X0[:4], np.array([1.0, 1, 0, 1]), np.array([0, 0, 1, 1]), "exactly one row"),
        ("ce", X0, np.r_[2.0, np.zeros(R0.size - 1)], None, r"in \[0, 1\]"),
        ("nope", X0, R0, None, "objective must be"),
    ],
)
def test_bad_input_is_one_clear_error(objective, X, y, groups, match):
    with pytest.raises(QProbeError, match=match) as info:
        QProbe(objective).fit(X, y, groups=groups)
    assert "\n" not in str(info.value)


def test_predict_with_wrong_width_is_one_clear_error():
    probe = QProbe("mse").fit(X0, R0)
    with pytest.raises(QProbeError, match="X has 11 features, but QProbe is expecting 12"):
        probe.predict(X0[:, 1:])


# ---------------------------------------------------------------- sklearn contract
def test_clone_and_params():
    probe = QProbe("pg", beta=0.3, hidden=7, random_state=4)
    c = clone(probe)
    assert c.get_params() == probe.get_params() and c is not probe
    c.set_params(beta=0.0, objective="mse")
    assert (c.beta, c.objective, probe.beta) == (0.0, "mse", 0.3)
    fitted = QProbe("mse").fit(X0, R0)
    assert not hasattr(clone(fitted), "coef_")


@pytest.mark.subprocess
def test_import_qprobe_does_not_import_torch():
    code = "import sys, qprobe; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ce refuses rewards other than 0/1 by design; these two checks fit on labels {1, 2}
_CE_REFUSES = "ce refuses rewards other than 0/1 by design; the check fits on labels {1, 2}"
# sample_weight (added for demonstrations): the features' standardisation ignores the weights, so a
# weight is not exactly a repeated row, and all-zero weights are refused with qprobe's own message
_WEIGHTS = {"check_sample_weight_equivalence_on_dense_data": "standardisation is unweighted",
            "check_all_zero_sample_weights_error": "refused with qprobe's own message"}
_CE_WEIGHTS = {c: _CE_REFUSES for c in ("check_sample_weights_not_an_array", "check_sample_weights_shape",
                                        "check_sample_weights_not_overwritten")}


@parametrize_with_checks(
    [QProbe("mse"), QProbe("ce")],
    expected_failed_checks=lambda est: (
        ({"check_estimators_dtypes": _CE_REFUSES, "check_fit2d_1feature": _CE_REFUSES, **_CE_WEIGHTS}
         if est.objective == "ce" else {}) | _WEIGHTS
    ),
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)

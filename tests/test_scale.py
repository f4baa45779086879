"""Features on disk: memory-mapped loading, no whole copy on the train / rerank / eval path."""
from __future__ import annotations

import numpy as np
import pytest

from qprobe import QProbe
from qprobe.errors import QProbeError
from qprobe.io import load_features, save_features
from qprobe.pipeline import take_rows

ROWS = [{"prompt_id": i // 4, "sample": i % 4} for i in range(64)]


def _X(dtype=np.float32):
    return np.random.default_rng(0).standard_normal((len(ROWS), 24)).astype(dtype)


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_float32_features_open_as_a_read_only_map(tmp_path, suffix):
    X = _X()
    path = tmp_path / f"f{suffix}"
    save_features(path, X, ROWS, {"kind": "hf", "layer": -1})
    got, meta = load_features(path, ROWS)
    assert isinstance(got, np.memmap) and not got.flags.writeable
    assert got.dtype == np.float32 and np.array_equal(got, X)
    assert meta["extractor"] == {"kind": "hf", "layer": -1}
    with pytest.raises(QProbeError, match="other rows"):
        load_features(path, ROWS[::-1])


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_other_dtypes_are_read_and_converted(tmp_path, suffix):
    X = _X(np.float64)
    save_features(tmp_path / f"f{suffix}", X, ROWS, {})
    got, _ = load_features(tmp_path / f"f{suffix}", ROWS)
    assert not isinstance(got, np.memmap) and got.dtype == np.float32
    np.testing.assert_array_equal(got, X.astype(np.float32))


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_nan_found_in_any_block(tmp_path, suffix):
    X = np.zeros((5000, 1024), dtype=np.float32)  # blocks of 4096 rows at 1024 features: row 4501 is in the second
    X[4500, 7] = np.nan
    rows = [{"prompt_id": i, "sample": 0} for i in range(len(X))]
    save_features(tmp_path / f"f{suffix}", X, rows, {})
    with pytest.raises(QProbeError, match="row 4501 has NaN"):
        load_features(tmp_path / f"f{suffix}", rows)


def test_take_rows_keeps_the_map_unless_rows_are_dropped(tmp_path):
    save_features(tmp_path / "f.npy", _X(), ROWS, {})
    X, _ = load_features(tmp_path / "f.npy")
    assert take_rows(X, np.arange(len(ROWS))) is X
    sub = take_rows(X, [0, 2, 5])
    assert not isinstance(sub, np.memmap) and np.array_equal(sub, np.asarray(X)[[0, 2, 5]])


@pytest.mark.parametrize("objective", ["mse", "ce", "pg"])
def test_fit_on_a_map_equals_fit_in_memory(tmp_path, objective):
    X = _X()
    y = (X[:, 0] + 0.3 * X[:, 1] > 0).astype(float)
    groups = np.array([r["prompt_id"] for r in ROWS])
    save_features(tmp_path / "f.npy", X, ROWS, {})
    Xm, _ = load_features(tmp_path / "f.npy")
    kw = dict(random_state=0, epochs=3, k=4) if objective == "pg" else {}
    a = QProbe(objective, **kw).fit(Xm, y, groups=groups)
    b = QProbe(objective, **kw).fit(X, y, groups=groups)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a.predict(Xm), b.predict(X), rtol=1e-6, atol=1e-9)

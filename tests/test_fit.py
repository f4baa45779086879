"""qprobe.fit.fit_probe, the training recipe on arrays, and the rule for demonstrations in pg's
chunks: a prompt's demonstration joins its chunk (k + 1 rows) and is never dropped."""
from __future__ import annotations

import numpy as np
import pytest

from qprobe import QProbe, QProbeError, fit_probe
from qprobe.demos import join_demos
from qprobe.testing.inputs import rows_and_features
from qprobe.transforms import transform_rewards

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")


def data(n_groups=12, k=4, d=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_groups * k, d))
    y = (X[:, 0] + 0.3 * rng.normal(size=len(X)) > 0.5).astype(float)
    g = np.repeat(np.arange(n_groups), k)
    Xd = rng.normal(size=(n_groups // 2, d)) + np.eye(d)[0] * 2.0  # demonstrations look like passes
    gd = np.arange(n_groups // 2) * 2  # every other prompt has a demonstration
    return X, y, g, Xd, gd


def spy_segments(monkeypatch):
    """Record every epoch's (rows, sizes, n_rows) of the torch training loop."""
    import qprobe._train

    calls, orig = [], qprobe._train._epoch_segments

    def spy(obj, gi, n_rows, *args, **kw):
        out = orig(obj, gi, n_rows, *args, **kw)
        calls.append((*out, n_rows))
        return out

    monkeypatch.setattr(qprobe._train, "_epoch_segments", spy)
    return calls


# ---------------------------------------------------------------- the recipe against its reference answers
def test_without_extras_it_is_the_probes_own_fit():
    X, y, g, _, _ = data()
    probe, tuned, info = fit_probe(X, y, g, objective="mse", alpha=3.0)
    ref = QProbe(objective="mse", alpha=3.0, random_state=0).fit(X, y, groups=g)
    np.testing.assert_array_equal(probe.coef_, ref.coef_)
    assert tuned is None and info == {"n_demos": 0, "demo_weight": None}


@pytest.mark.parametrize("transform", ["none", "calibrated"])
def test_demonstrations_are_weighted_rows_of_their_prompt(transform):
    """Weighted ridge on samples + demonstrations, the demonstrations calibrated against their prompt."""
    X, y, g, Xd, gd = data()
    probe, _, info = fit_probe(X, y, g, demos=(Xd, gd), demo_weight=3.0, transform=transform, objective="mse")
    t = transform_rewards(transform, np.r_[y, np.ones(len(gd))], np.r_[g, gd], np.arange(len(y) + len(gd)) < len(y))
    sw = np.r_[np.ones(len(y)), np.full(len(gd), 3.0)]
    ref = QProbe(objective="mse").fit(np.r_[X, Xd], t, groups=np.r_[g, gd], sample_weight=sw)
    np.testing.assert_allclose(probe.coef_, ref.coef_, rtol=1e-10)
    assert info == {"n_demos": len(gd), "demo_weight": 3.0}
    # weight 0 leaves them out; no weight and no tuning means weight 1
    p0, _, i0 = fit_probe(X, y, g, demos=(Xd, gd), demo_weight=0.0, objective="mse")
    np.testing.assert_array_equal(p0.coef_, fit_probe(X, y, g, objective="mse")[0].coef_)
    assert i0["demo_weight"] == 0.0 and fit_probe(X, y, g, demos=(Xd, gd), objective="mse")[2]["demo_weight"] == 1.0


def test_tuning_chooses_penalty_weight_and_beta():
    X, y, g, Xd, gd = data(n_groups=15)
    probe, tuned, info = fit_probe(X, y, g, demos=(Xd, gd), tune_folds=3, objective="mse", random_state=1)
    assert tuned is not None and probe.alpha == tuned.params["alpha"] and probe.beta == tuned.beta
    assert info["demo_weight"] == tuned.demo_weight and tuned.demo_weight in (0.0, 1.0, 3.0, 10.0)
    _, fixed, _ = fit_probe(X, y, g, demos=(Xd, gd), demo_weight=2.0, tune_folds=3, objective="mse")
    assert fixed.demo_weight == 2.0 and set(fixed.grid_demo_weights) == {2.0}


def test_bad_arguments_are_one_line_errors():
    X, y, g, Xd, gd = data()
    with pytest.raises(QProbeError, match="demos must be"):
        fit_probe(X, y, g, demos=(Xd[:, :2], gd), objective="mse")
    with pytest.raises(QProbeError, match="has no sampled row"):
        fit_probe(X, y, g, demos=(Xd, gd + 100), objective="mse")
    with pytest.raises(QProbeError, match="not pref"):
        fit_probe(X, y, g, demos=(Xd, gd), objective="pref")
    with pytest.raises(QProbeError, match="demo_weight"):
        fit_probe(X, y, g, demos=(Xd, gd), demo_weight=-1.0, objective="mse")
    with pytest.raises(QProbeError, match="needs groups"):
        fit_probe(X, y, None, transform="calibrated", objective="mse")


def test_join_demos():
    X, y, g = np.zeros((3, 2), np.float32), np.zeros(3), np.array([0, 0, 1])
    Xj, yj, gj, sw, dm = join_demos(X, y, g, np.ones((2, 2)), np.ones(2), np.array([1, 0]), 2.0)
    assert Xj.dtype == np.float32 and yj.tolist() == [0, 0, 0, 1, 1] and gj.tolist() == [0, 0, 1, 1, 0]
    assert sw.tolist() == [1, 1, 1, 2, 2] and dm.tolist() == [False] * 3 + [True] * 2
    assert join_demos(X, y, g, np.ones((2, 2)), np.ones(2), np.array([1, 0]), 0.0) == (X, y, g, None, None)


# ---------------------------------------------------------------- pg: a prompt's demonstration joins its chunk
class OnesEmbedder:
    """Stands in for the features' extractor (``--demos``): a vector of ones per item."""

    def embed(self, items, **kw):
        return np.ones((len(items), 6), np.float32)


@needs_torch
def test_demonstrations_open_a_chunk_of_k_plus_one():
    from qprobe._train import _epoch_segments
    from qprobe.select import group_index

    # prompt 0: 4 samples + 1 demonstration (k = 4: one chunk of 5); prompt 1: 4 samples (one chunk of 4);
    # prompt 2: 8 samples + 1 demonstration (chunks of 5 and 4, the demonstration in the first)
    g = np.r_[np.repeat([0, 1, 2], [4, 4, 8]), [0, 2]]
    demo = np.arange(len(g)) >= 16
    for seed in range(20):
        rows, sizes = _epoch_segments("pg", group_index(g), len(g), 4, np.random.RandomState(seed), demo)
        assert sorted(rows.tolist()) == list(range(len(g)))  # nothing dropped
        chunks = np.split(rows, np.cumsum(sizes)[:-1])
        assert all(len(set(g[c])) == 1 for c in chunks)
        assert sorted((g[c[0]], len(c)) for c in chunks) == [(0, 5), (1, 4), (2, 4), (2, 5)]
        assert {int(c[0]) for c in chunks if demo[c].any()} == {16, 17}  # first in its chunk
    # without demonstrations (or none marked) the segments are plain pg's, from the same random numbers
    plain = _epoch_segments("pg", group_index(g), len(g), 4, np.random.RandomState(3))
    none = _epoch_segments("pg", group_index(g), len(g), 4, np.random.RandomState(3), np.zeros(len(g), bool))
    assert all(np.array_equal(a, b) for a, b in zip(plain, none))


@needs_torch
def test_train_never_drops_a_demonstration_as_a_one_row_tail_chunk(tmp_path, monkeypatch):
    """k samples per prompt and k = 4: each demonstration is the k+1-th row of its prompt. Cut into
    chunks of k, one prompt-epoch in k+1 left it alone in a tail chunk and dropped it."""
    import qprobe.demos
    from qprobe.pipeline import train_file

    rows, feats = rows_and_features(tmp_path, n_prompts=24, k=4, extra=lambda p: {"code": f"return {p}"})
    monkeypatch.setattr(qprobe.demos, "embedder_from_identity", lambda ident, api_key=None: OnesEmbedder())
    calls = spy_segments(monkeypatch)
    _, n, _, info = train_file(rows, feats, tmp_path / "p", demos="code", objective="pg", k=4, epochs=6,
                               random_state=0)
    assert info["n_demos"] == 24 and len(calls) == 6
    demo_rows = set(range(n, n + 24))
    for rows_, sizes, n_rows in calls:
        assert n_rows == n + 24 and demo_rows <= set(rows_.tolist())  # every demonstration trains in every epoch
        chunks = np.split(rows_, np.cumsum(sizes)[:-1])
        assert all(len(c) == 5 for c in chunks if demo_rows & set(c.tolist()))  # its prompt's k samples + it


@needs_torch
def test_tuning_folds_keep_the_demonstrations_in_their_chunks(monkeypatch):
    X, y, g, Xd, gd = data(n_groups=9, k=4)
    calls = spy_segments(monkeypatch)
    probe, _, _ = fit_probe(X, y, g, demos=(Xd, gd), demo_weight=1.0, tune_folds=3, grid=[{"epochs": 2}],
                            objective="pg", k=4)
    assert len(calls) == 4 * 2  # 3 folds and the final fit, 2 epochs each
    for rows_, sizes, n_rows in calls:  # every row of every fit trains, each prompt one chunk
        assert sorted(rows_.tolist()) == list(range(n_rows)) and set(sizes.tolist()) <= {4, 5}
    final_rows, final_sizes, _ = calls[-1]
    assert sorted(final_rows.tolist()) == list(range(len(y) + len(gd)))
    assert sorted(final_sizes.tolist()) == [4] * (9 - len(gd)) + [5] * len(gd)
    assert probe.k == 4  # the probe records the k it was given


@needs_torch
def test_train_file_is_fit_probe_on_the_files_arrays(tmp_path, monkeypatch):
    import qprobe.demos
    from qprobe.io import load_features
    from qprobe.pipeline import group_ids, read_completions, train_file

    rows_path, feats = rows_and_features(tmp_path, extra=lambda p: {"code": f"return {p}"} if p % 2 else {})
    Xd_made = []

    class Embedder:
        def embed(self, items, **kw):
            Xd_made.append(np.full((len(items), 6), 2.0, np.float32))
            return Xd_made[-1]

    monkeypatch.setattr(qprobe.demos, "embedder_from_identity", lambda ident, api_key=None: Embedder())
    probe, _, _, info = train_file(rows_path, feats, tmp_path / "p", demos="code", objective="pg", k=4, epochs=3,
                                   reward_transform="calibrated", random_state=0)
    rows = read_completions(rows_path, need_reward=True)
    X, _ = load_features(feats, rows)
    g = group_ids(rows)
    ref, _, ref_info = fit_probe(X, [r["reward"] for r in rows], g, demos=(Xd_made[0], g[::4][1::2]),
                                 transform="calibrated", objective="pg", k=4, epochs=3)
    np.testing.assert_array_equal(probe.coef_, ref.coef_)
    assert info == ref_info == {"n_demos": 15, "demo_weight": 1.0}

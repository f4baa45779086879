"""Selection weights, draws and diagnostics checked against direct per-group computations."""
import math
import time

import numpy as np
import pytest

from qprobe.errors import QProbeError
from qprobe.select import (
    bon_kl_bound,
    draw_index,
    effective_sample_size,
    group_index,
    kl_to_base,
    select_indices,
    selection_report,
    softmax_weights,
)


def _shuffled_groups(rng, n_groups, k):
    labels = np.array([f"p{i}" for i in range(n_groups)])
    return labels[np.repeat(np.arange(n_groups), k)][rng.permutation(n_groups * k)]


def test_softmax_matches_per_group_loop_on_noncontiguous_string_groups():
    rng = np.random.default_rng(0)
    g = _shuffled_groups(rng, 7, 5)
    q = rng.normal(size=g.size) * 3
    w = softmax_weights(q, g, 0.3)
    for label in np.unique(g):
        m = g == label
        e = np.exp(q[m] / 0.3)
        np.testing.assert_allclose(w[m], e / e.sum(), rtol=1e-12)


def test_softmax_is_stable_for_huge_scores():
    w = softmax_weights([1e6, 1e6 - 1, -1e6, 5e5], [0, 0, 0, 1], 1.0)
    np.testing.assert_allclose(w, [1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1)), 0.0, 1.0])


def test_beta_inf_is_uniform_and_beta_zero_is_one_hot():
    q = np.array([0.2, 0.9, 0.1, 3.0, 3.0])
    g = [0, 0, 0, 1, 1]
    np.testing.assert_allclose(softmax_weights(q, g, np.inf), [1 / 3] * 3 + [0.5] * 2)
    np.testing.assert_array_equal(softmax_weights(q, g, 0), [0, 1, 0, 1, 0])


def test_argmax_ties_go_to_lowest_row_and_groups_keep_first_appearance_order():
    q = [5.0, 1.0, 5.0, 2.0, 2.0, 0.0]
    g = ["b", "a", "b", "a", "c", "a"]
    # group "a": rows 1, 3, 5 -> max 2.0 at row 3; "b": tie between rows 0 and 2 -> row 0
    idx, labels = select_indices(q, g, 0, return_labels=True)
    np.testing.assert_array_equal(idx, [0, 3, 4])
    np.testing.assert_array_equal(labels, ["b", "a", "c"])
    # same answer whatever random_state; reversed rows: groups a, c, b and b's tie (rows 3, 5) -> row 3
    np.testing.assert_array_equal(select_indices(q, g, 0, random_state=123), [0, 3, 4])
    np.testing.assert_array_equal(select_indices(q[::-1], g[::-1], 0), [2, 1, 3])


def test_draws_follow_the_weights_and_are_reproducible():
    k, n_groups = 4, 20000
    q_one = np.array([0.0, 1.0, 2.0, -1.0])
    q = np.tile(q_one, n_groups)
    g = np.repeat(np.arange(n_groups), k)
    idx = select_indices(q, g, 0.7, random_state=0)
    freq = np.bincount(idx % k, minlength=k) / n_groups
    expected = np.exp(q_one / 0.7) / np.exp(q_one / 0.7).sum()
    np.testing.assert_allclose(freq, expected, atol=0.015)
    np.testing.assert_array_equal(idx, select_indices(q, g, 0.7, random_state=0))
    assert ((idx >= np.arange(n_groups) * k) & (idx < np.arange(n_groups) * k + k)).all()


def test_draw_index_draws_as_select_indices_for_one_group():
    q = np.array([0.3, -1.0, 2.0, 0.5, 1.9])
    for beta in (0.05, 0.7, np.inf):
        one = [draw_index(q, beta, np.random.default_rng(s)) for s in range(300)]
        assert one == [int(select_indices(q, np.zeros(5), beta, random_state=np.random.default_rng(s))[0])
                       for s in range(300)]
    # one row or beta 0: no draw (the generator is untouched), ties to the lowest index
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert draw_index([1.5], 0.1, rng) == 0 and draw_index([0.0, 2.0, 2.0], 0, rng) == 1
    assert rng.bit_generator.state == state
    assert draw_index([0.0, 1.0, 0.5], 1e-300, rng) == 1  # log space: a tiny beta is the argmax, not NaN
    with pytest.raises(QProbeError, match="NaN"):
        draw_index([0.0, np.nan], 1.0, rng)


def test_kl_uniform_onehot_and_formula():
    rng = np.random.default_rng(1)
    g = np.repeat([0, 1, 2], [3, 5, 8])
    np.testing.assert_allclose(kl_to_base(softmax_weights(np.zeros(16), g, 1.0), g), 0.0, atol=1e-15)
    np.testing.assert_allclose(kl_to_base(softmax_weights(rng.normal(size=16), g, 0), g), np.log([3, 5, 8]))
    w = softmax_weights(rng.normal(size=16), g, 0.5)
    expected = [sum(wi * math.log(len(w[g == j]) * wi) for wi in w[g == j]) for j in range(3)]
    np.testing.assert_allclose(kl_to_base(w, g), expected, rtol=1e-12)


def test_bon_bound_and_ess():
    assert bon_kl_bound(1) == 0.0
    assert bon_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    np.testing.assert_allclose(bon_kl_bound([10, 48]), [math.log(10) - 0.9, math.log(48) - 47 / 48])
    g = np.repeat([0, 1], 4)
    np.testing.assert_allclose(effective_sample_size(softmax_weights(np.zeros(8), g, 1), g), [4, 4])
    np.testing.assert_allclose(effective_sample_size(softmax_weights(np.arange(8.0), g, 0), g), [1, 1])


def test_selection_report_by_hand():
    q = np.array([0.0, np.log(3.0), 1.0, 1.0, 0.0])
    r = np.array([0.0, 1.0, 1.0, 0.0, 0.0])
    g = [0, 0, 1, 1, 1]
    rep = selection_report(q, r, g, beta=1.0)
    # group 0: weights (1/4, 3/4) -> expected reward 3/4; group 1: weights e/(2e+1) on rows 2 and 3
    e = math.e
    assert rep["n_prompts"] == 2 and rep["n_rows"] == 5 and rep["k"] == 2.5
    assert rep["base_reward"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert rep["probe_reward"] == pytest.approx((0.75 + e / (2 * e + 1)) / 2)
    assert rep["argmax_reward"] == pytest.approx((1.0 + 1.0) / 2)  # tie in group 1 -> row 2
    assert rep["oracle_reward"] == 1.0
    kl0 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    w1 = np.array([e, e, 1]) / (2 * e + 1)
    assert rep["kl"] == pytest.approx((kl0 + float(np.sum(w1 * np.log(3 * w1)))) / 2)
    assert rep["bon_kl_bound"] == pytest.approx((bon_kl_bound(2) + bon_kl_bound(3)) / 2)
    assert rep["ess"] == pytest.approx((1 / (1 / 16 + 9 / 16) + 1 / float(np.sum(w1**2))) / 2)
    assert selection_report(q[:2], r[:2], [7, 7], 0)["k"] == 2


def test_group_index_accepts_tuples_and_mixed_labels():
    gi = group_index([(1, 2), "a", (1, 2), 3])
    assert list(gi.labels) == [(1, 2), "a", 3]
    np.testing.assert_array_equal(gi.sizes, [2, 1, 1])


@pytest.mark.parametrize(
    "call",
    [
        lambda: softmax_weights([1.0, np.nan], [0, 0], 1.0),
        lambda: softmax_weights([1.0, 2.0], [0, 0], -0.1),
        lambda: softmax_weights([1.0, 2.0], [0, 0, 1], 1.0),
        lambda: selection_report([1.0, 2.0], [1.0], [0, 0], 1.0),
        lambda: select_indices([[1.0, 2.0]], [0, 0], 0),
    ],
)
def test_bad_inputs_raise_one_line_errors(call):
    with pytest.raises(QProbeError) as info:
        call()
    assert "\n" not in str(info.value)


def test_selection_is_fast():
    rng = np.random.default_rng(2)
    n_groups, k = 10_000, 16
    g = np.repeat(np.arange(n_groups), k)[rng.permutation(n_groups * k)]
    q, r = rng.normal(size=g.size), rng.random(g.size)
    t = time.perf_counter()
    select_indices(q, g, 0.1, random_state=0)
    selection_report(q, r, g, 0.1)
    assert time.perf_counter() - t < 1.0

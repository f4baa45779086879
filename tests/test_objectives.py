"""Losses checked against per-chunk loops, closed-form gradients and finite differences (float64)."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from qprobe.objectives import ce, mse, pg_loss, pref_loss, segment_softmax  # noqa: E402


def _chunks(seed=0, n=23, n_chunks=6):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, dtype=torch.float64, generator=g)
    r = (torch.rand(n, dtype=torch.float64, generator=g) < 0.5).double()
    # every chunk id used, rows of a chunk scattered, ids not in row order
    idx = torch.cat([torch.arange(n_chunks), torch.randint(0, n_chunks, (n - n_chunks,), generator=g)])
    return q, r, idx[torch.randperm(n, generator=g)]


def test_segment_softmax_matches_torch_softmax_per_segment():
    q, _, idx = _chunks()
    w = segment_softmax(q * 50, idx)  # large scores: must not overflow
    for c in range(6):
        m = idx == c
        torch.testing.assert_close(w[m], torch.softmax(q[m] * 50, 0))


def test_pg_loss_value_matches_loop():
    q, r, idx = _chunks()
    beta, base = 0.5, 0.3
    per = [float(torch.softmax(q[idx == c] / beta, 0) @ (r[idx == c] - base)) for c in range(6)]
    assert float(pg_loss(q, r, idx, beta, base)) == pytest.approx(-np.mean(per), rel=1e-12)


def test_pg_loss_mean_is_over_chunks_present_only():
    q, r, idx = _chunks()
    assert float(pg_loss(q, r, idx * 3 + 1)) == pytest.approx(float(pg_loss(q, r, idx)), rel=1e-12)


def test_pg_gradient_closed_form_finite_differences_and_baseline_invariance():
    q, r, idx = _chunks(seed=3)
    beta = 0.7
    q = q.clone().requires_grad_()
    (grad,) = torch.autograd.grad(pg_loss(q, r, idx, beta), q)
    # d/dq_i of -(1/C) sum_c sum_j w_j r_j = -(1/(C beta)) w_i (r_i - sum_j w_j r_j)
    w = segment_softmax(q.detach() / beta, idx)
    rbar = torch.zeros(6, dtype=torch.float64).index_add(0, idx, w * r)
    torch.testing.assert_close(grad, -(w * (r - rbar[idx])) / (6 * beta))
    assert torch.autograd.gradcheck(lambda x: pg_loss(x, r, idx, beta), (q,), eps=1e-6, atol=1e-7)
    (grad_b,) = torch.autograd.grad(pg_loss(q, r, idx, beta, baseline=0.8), q)
    torch.testing.assert_close(grad_b, grad)


def _pairs(seed=0, n_pairs=9):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2 * n_pairs, dtype=torch.float64, generator=g)
    perm = torch.randperm(2 * n_pairs, generator=g)
    pair = torch.arange(2 * n_pairs) // 2
    y = (torch.arange(2 * n_pairs) % 2 == torch.randint(0, 2, (2 * n_pairs,), generator=g)[pair]).double()
    return q[perm], pair[perm], y[perm]


def test_pref_loss_value_and_gradient():
    q, pair, y = _pairs()
    diffs = []
    for p in range(9):
        m = pair == p
        diffs.append(float(q[m][y[m] == 1] - q[m][y[m] == 0]))
    expected = np.mean([math.log1p(math.exp(-d)) for d in diffs])
    assert float(pref_loss(q, pair, y)) == pytest.approx(expected, rel=1e-12)
    q = q.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: pref_loss(x, pair, y), (q,), eps=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(pref_loss(q, pair, y), q)
    # d/dq_pref = -sigmoid(-d)/P, d/dq_other = +sigmoid(-d)/P
    d = torch.tensor(diffs, dtype=torch.float64)[pair]
    torch.testing.assert_close(grad, -(2 * y - 1) * torch.sigmoid(-d) / 9)


def test_mse_and_ce_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    r = (torch.rand(11, dtype=torch.float64, generator=g) < 0.5).double()
    assert mse(q, r).item() == pytest.approx(((q - r) ** 2).mean().item())
    p = torch.sigmoid(q)
    assert ce(q, r).item() == pytest.approx((-(r * p.log() + (1 - r) * (1 - p).log()).mean()).item())
    (grad,) = torch.autograd.grad(ce(q, r), q)
    torch.testing.assert_close(grad, (p - r).detach() / 11)
    assert torch.autograd.gradcheck(lambda x: mse(x, r), (q,))

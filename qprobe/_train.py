"""Fitting routines behind ``QProbe.fit``: they turn arrays into head parameters.

- ``_moments``: column mean and scale for standardisation, streamed over row
  blocks so X is never copied whole.
- ``_fit_ridge``: linear ``mse``, ridge in closed form from the Gram matrix.
- ``_fit_logistic``: linear ``ce``, L2 logistic regression by L-BFGS (scipy).
- ``_epoch_segments`` and ``_fit_torch``: the AdamW loop for ``pg``, ``pref``
  and every MLP head. Torch is imported inside ``_fit_torch`` only, so importing
  this module (and ``import qprobe``) stays light.

Ridge and logistic return the head in standardised space; the torch loop
returns its raw parameters. Mapping them back to raw feature space, parameter
validation and the estimator API are :mod:`qprobe.probe`'s job; the losses
themselves live in :mod:`qprobe.objectives`. Nothing here touches files.
"""
from __future__ import annotations

import warnings

import numpy as np

_AUTO_STEPS = 400  # AdamW steps when epochs=None (chosen on synthetic data, see QProbe docstring)


def _moments(X, standardize):
    """Column mean and scale of X, float64, merged over small row blocks (no copy of X)."""
    n, d = X.shape
    if not standardize:
        return np.zeros(d), np.ones(d)
    mean, m2 = np.zeros(d), np.zeros(d)
    step = max(1, (1 << 20) // d)  # ~4 MB blocks: each is read from memory once
    for s in range(0, n, step):
        c = X[s : s + step]
        cm = c.mean(axis=0, dtype=np.float64)
        dc = c - cm.astype(X.dtype)
        cm2 = np.einsum("ij,ij->j", dc, dc, dtype=np.float64)
        na, nb = s, c.shape[0]  # Chan et al. merge of (mean, M2) of two blocks
        delta = cm - mean
        mean += delta * (nb / (na + nb))
        m2 += cm2 + delta**2 * (na * nb / (na + nb))
    scale = np.sqrt(m2 / n)
    scale[scale <= 10 * np.finfo(X.dtype).eps * np.maximum(np.abs(mean), 1.0)] = 1.0  # constant columns
    return mean, scale


def _fit_ridge(X, y, mean, scale, alpha, sample_weight=None):
    """Ridge on standardised, centred features via the Gram matrix, streamed in row blocks.

    The Gram matrix is built with BLAS ``syrk`` (one triangle, half the flops
    of a product) in X's dtype per block and summed in float64. With
    ``sample_weight`` it minimises ``sum_i w_i (y_i - q_i)^2 + alpha |w|^2``:
    rows are centred on the weighted means and scaled by sqrt(w_i).
    Returns (w, b) in standardised space: q = ((X - mean) / scale) @ w + b.
    """
    G, rhs, mu, ybar = _gram(X, y, scale, sample_weight)
    inv = 1.0 / scale
    G[np.diag_indices_from(G)] += alpha
    try:
        w = np.linalg.solve(G, rhs)
    except np.linalg.LinAlgError:
        w = np.linalg.lstsq(G, rhs, rcond=None)[0]
    return w, float(ybar - ((mu - mean) * inv) @ w)


def _gram(X, y, scale, sample_weight=None):
    """(G, rhs, mu, ybar): ``G = Z^T W Z`` and ``rhs = Z^T W (y - ybar)`` with ``Z = (X - mu) / scale``.

    ``mu`` and ``ybar`` are the (weighted) means of X and y; ``y`` may be None (rhs is then 0).
    ``G + alpha I`` is the ridge's matrix A, whose inverse also gives the optimism bonus
    ``sqrt(z^T A^-1 z)`` of :mod:`qprobe.loop`.
    """
    from scipy.linalg.blas import dsyrk, ssyrk

    syrk = ssyrk if X.dtype == np.float32 else dsyrk
    n, d = X.shape
    sw = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if sw is None:
        mu = X.mean(axis=0, dtype=np.float64)  # centring for the intercept (== mean when standardising)
    else:
        mu = np.zeros(d)
        for s in range(0, n, 1 << 14):
            mu += sw[s : s + (1 << 14)] @ X[s : s + (1 << 14)].astype(np.float64)
        mu /= sw.sum()
    y = np.zeros(n) if y is None else y
    ybar = y.mean() if sw is None else float(sw @ y / sw.sum())
    inv = 1.0 / scale
    yc = y - ybar
    G = np.zeros((d, d))
    rhs = np.zeros(d)
    sh, iv = (mu * inv).astype(X.dtype), inv.astype(X.dtype)
    step = max(1, (1 << 25) // d)  # ~128 MB float32 blocks
    for s in range(0, n, step):
        z = X[s : s + step] * iv
        z -= sh  # (x - mu) / scale, C-ordered, so z.T is Fortran-ordered for BLAS: no copy
        yb = yc[s : s + step]
        if sw is not None:
            r = np.sqrt(sw[s : s + step])
            z *= r[:, None].astype(X.dtype)
            yb = yb * r
        G += syrk(1.0, z.T, trans=0)  # upper triangle of z.T @ z
        rhs += z.T @ yb.astype(X.dtype)
    G = np.triu(G) + np.triu(G, 1).T
    return G, rhs, mu, ybar


def _fit_logistic(X, y, mean, scale, alpha, max_iter, sample_weight=None):
    """L2 logistic regression on standardised X by L-BFGS, without copying X.

    Minimises ``mean_i logloss_i + alpha / (2 n) |w|^2`` (sklearn's objective
    with ``C = 1/alpha``, divided by n); with ``sample_weight``, row i's log loss
    is multiplied by w_i (sklearn's ``sample_weight``). y may be soft targets in
    [0, 1]. Returns (w, b) in standardised space.
    """
    from scipy.optimize import minimize
    from scipy.special import expit

    n, d = X.shape
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)

    def f(theta):
        w, b = theta[:d], theta[d]
        v = w / scale
        z = (X @ v.astype(X.dtype)).astype(np.float64) + (b - mean @ v)
        loss = sw * (np.logaddexp(0.0, z) - y * z)
        g = sw * (expit(z) - y) / n
        gw = (X.T @ g.astype(X.dtype) - mean * g.sum()) / scale + (alpha / n) * w
        return loss.mean() + 0.5 * alpha / n * (w @ w), np.append(gw, g.sum())

    p = float(sw @ y / sw.sum())
    theta0 = np.zeros(d + 1)
    theta0[d] = np.log(p / (1 - p)) if 0 < p < 1 else 0.0
    tol = 1e-10 if X.dtype == np.float64 else 1e-7
    res = minimize(f, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter, "gtol": tol, "ftol": tol})
    return res.x[:d], float(res.x[d]), int(res.nit)


# ---------------------------------------------------------------------- torch training
def _epoch_segments(obj, gi, n_rows, k, rs, demo_mask=None):
    """One epoch's training segments, shuffled.

    Returns (rows, sizes): row indices laid out segment after segment, and the
    size of each segment. ``pg``: chunks of k rows of one prompt (rows shuffled
    within the prompt first; 1-row tail chunks dropped); ``pref``: the pairs;
    otherwise every row is its own segment.

    ``demo_mask`` (pg): rows that are demonstrations rather than samples. They
    join their prompt's chunk on top of its k samples: a prompt with m
    demonstrations is cut into chunks of k + m (k + 1 for the usual one), and its
    demonstrations come first, so they always sit in its first chunk, with
    samples beside them, and are never dropped as a 1-row tail. Without one
    (or with no demonstration in it) the segments are those of plain pg, drawn
    from the same random numbers.
    """
    if obj == "pg":
        key = rs.random_sample(n_rows)
        size = np.full(gi.sizes.size, int(k))  # chunk size per group
        if demo_mask is None or not np.any(demo_mask):
            order = np.lexsort((key, gi.codes))  # grouped, random within a group
        else:
            demo_mask = np.asarray(demo_mask, dtype=bool)
            order = np.lexsort((key, ~demo_mask, gi.codes))  # grouped, demonstrations first, then random
            size += np.bincount(gi.codes[demo_mask], minlength=gi.sizes.size)
        g = gi.codes[order]
        n_chunks = -(-gi.sizes // size)
        chunk = np.repeat(np.cumsum(n_chunks) - n_chunks, gi.sizes) + (np.arange(n_rows) - gi.starts[g]) // size[g]
        keep = np.bincount(chunk)[chunk] >= 2
        order, seg = order[keep], chunk[keep]
    elif obj == "pref":
        order, seg = gi.order, gi.codes[gi.order]
    else:
        order = seg = np.arange(n_rows)
    counts = np.bincount(seg)
    perm = rs.permutation(counts.size)  # perm[j]: segment placed j-th
    rank = np.empty_like(perm)
    rank[perm] = np.arange(perm.size)
    rows = order[np.argsort(rank[seg], kind="stable")]
    sizes = counts[perm]
    return rows, sizes[sizes > 0]


def _fit_torch(probe, X, y, gi, rs, sample_weight=None, demo_mask=None):
    """AdamW on the objective's loss for a linear or MLP head; returns (params, loss_curve).

    ``sample_weight``: pg multiplies each row's reward inside its chunk; mse / ce take a weighted mean.
    ``demo_mask``: pg's demonstration rows (see ``_epoch_segments``); other objectives ignore it.
    """
    import torch

    from qprobe import objectives

    obj, h = probe.objective, probe.hidden
    if probe.device is not None:
        dev = torch.device(probe.device)
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.float64 if X.dtype == np.float64 else torch.float32
    n, d = X.shape
    gen = torch.Generator().manual_seed(int(rs.randint(2**31 - 1)))
    tens = lambda a: torch.as_tensor(np.asarray(a), dtype=dt).to(dev)  # noqa: E731
    mean, inv_scale = tens(probe.mean_), tens(1.0 / probe.scale_)
    b0 = 0.0
    sw_np = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if obj == "mse":
        b0 = float(sw_np @ y / sw_np.sum())
    elif obj == "ce":
        p = min(max(float(sw_np @ y / sw_np.sum()), 1e-6), 1 - 1e-6)
        b0 = np.log(p / (1 - p))
    if h is None:
        weights = {"w": torch.zeros(d, dtype=dt)}
        biases = {"b": torch.tensor(b0, dtype=dt)}
    else:
        u = lambda shape, fan: (torch.rand(shape, generator=gen, dtype=dt) * 2 - 1) / np.sqrt(fan)  # noqa: E731
        weights = {"W1": u((h, d), d), "w2": u((h,), h)}
        biases = {"b1": u((h,), d), "b2": torch.tensor(b0, dtype=dt)}
    params = {name: t.to(dev).requires_grad_() for name, t in {**weights, **biases}.items()}
    opt = torch.optim.AdamW(
        [
            {"params": [params[k] for k in weights], "weight_decay": float(probe.weight_decay)},
            {"params": [params[k] for k in biases], "weight_decay": 0.0},
        ],
        lr=float(probe.lr),
    )
    seg_rows = {"pg": int(probe.k), "pref": 2}.get(obj, 1)  # rows per segment, to turn batch_size into segments
    if obj == "pg" and demo_mask is not None and np.any(demo_mask):
        seg_rows += 1  # a prompt's demonstration joins its chunk (see _epoch_segments)
    y_all = torch.as_tensor(y, dtype=dt).to(dev)
    w_all = None if sample_weight is None else torch.as_tensor(sw_np, dtype=dt).to(dev)
    X_dev = None  # X on the accelerator when it fits comfortably: batches are then gathered there
    if dev.type == "cuda" and torch.cuda.mem_get_info(dev)[0] > 3 * X.shape[0] * X.shape[1] * (8 if dt == torch.float64 else 4):
        with warnings.catch_warnings():  # read-only (memory-mapped) X: only read, never written
            warnings.simplefilter("ignore", UserWarning)
            X_dev = torch.as_tensor(X).to(dev, dt)
    curve, epoch, n_epochs = [], 0, probe.epochs
    while n_epochs is None or epoch < n_epochs:
        rows, sizes = _epoch_segments(obj, gi, n, int(probe.k), rs, demo_mask)
        per = sizes.size if probe.batch_size is None else max(1, int(probe.batch_size) // seg_rows)
        if n_epochs is None:
            n_epochs = max(1, -(-_AUTO_STEPS // -(-sizes.size // per)))
        epoch += 1
        ends = np.cumsum(sizes)
        total, steps = torch.zeros((), dtype=dt, device=dev), 0
        for a in range(0, sizes.size, per):
            b = min(a + per, sizes.size)
            idx = rows[ends[a] - sizes[a] : ends[b - 1]]
            idx_t = torch.from_numpy(idx).to(dev)
            if X_dev is not None:
                xb = X_dev.index_select(0, idx_t)
            else:
                xb = torch.from_numpy(X[idx]).to(dev, dt)  # the one copy: this batch's rows
            yb = y_all[idx_t]
            wb = None if w_all is None else w_all[idx_t]
            seg = torch.from_numpy(np.repeat(np.arange(b - a), sizes[a:b])).to(dev)
            # standardisation folded into the first layer: ((x - mean) * inv) @ w == x @ (w * inv) - mean @ (w * inv)
            if h is None:
                v = params["w"] * inv_scale
                q = xb @ v + (params["b"] - mean @ v)
            else:
                W = params["W1"] * inv_scale
                q = torch.relu(xb @ W.T + (params["b1"] - W @ mean)) @ params["w2"] + params["b2"]
            if obj == "pg":
                loss = objectives.pg_loss(q, yb if wb is None else yb * wb, seg, beta=float(probe.beta_train))
            elif obj == "pref":
                loss = objectives.pref_loss(q, seg, yb)
            else:
                loss = getattr(objectives, obj)(q, yb, wb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
        curve.append(float(total) / steps)
    return {k: v.detach().cpu().double().numpy() for k, v in params.items()}, curve

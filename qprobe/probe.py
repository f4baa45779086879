"""The Q-probe estimator: fit a score Q(x) on completion features, rerank with it.

``QProbe`` follows the scikit-learn estimator contract. Four objectives:

- ``mse``: ridge regression of the reward, solved in closed form from the
  Gram matrix, computed chunk by chunk so X is never copied whole.
- ``ce``: L2 logistic regression of a 0/1 reward (Q is the logit), L-BFGS;
  the same objective as ``sklearn.linear_model.LogisticRegression(C=1/alpha)``.
- ``pg``: the paper's policy gradient: rows of a prompt are cut into chunks of
  ``k`` and the softmax(Q/beta_train)-weighted reward of each chunk is
  maximised, in torch with AdamW.
- ``pref``: a Bradley-Terry loss on pairs (a group of two rows, y = 1 on the
  preferred one), in torch with AdamW.

Features are standardised with a mean and scale learned in fit (``mean_``,
``scale_``); the learned head is stored in raw feature space, so for a linear
head ``Q = X @ coef_ + intercept_``. ``predict``/``select`` need numpy only.
Torch is imported only inside the torch training path, so ``import qprobe``
stays light. Files: a directory with ``config.json`` and ``probe.safetensors``;
no pickle anywhere.

Not here: the losses themselves (:mod:`qprobe.objectives`), the selection
maths (:mod:`qprobe.select`), reading features or rows from disk.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from qprobe.errors import QProbeError
from qprobe.select import group_index, select_indices, selection_report

OBJECTIVES = ("mse", "ce", "pg", "pref")
_CHUNK_ROWS = 4096  # rows per block when streaming over X (bounds temporary memory)
_AUTO_STEPS = 400  # AdamW steps when epochs=None (chosen on synthetic data, see QProbe docstring)

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    def _validate_data(est, *args, **kw):
        return est._validate_data(*args, **kw)


def _one_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


class QProbe(BaseEstimator):
    """A probe Q(x) on completion features, trained to pick high-reward samples.

    Parameters
    ----------
    objective : {"mse", "ce", "pg", "pref"}, default "pg"
        Training objective (see the module docstring).
    beta : float, default 0.1
        Selection temperature used by ``select`` and ``score``; 0 is argmax.
    k : int, default 10
        ``pg`` only: chunk size. Each epoch a prompt's rows are shuffled and cut
        into chunks of ``k``; a last chunk of 2..k-1 rows is kept, a last chunk
        of one row (which carries no gradient) is dropped.
    beta_train : float, default 1.0
        ``pg`` only: softmax temperature inside a chunk during training.
    hidden : int or None, default None
        None for a linear head; an int for a one-hidden-layer ReLU MLP with
        that many units (trained in torch for every objective).
    standardize : bool, default True
        Centre and scale features with statistics learned in fit.
    alpha : float, default 1.0
        L2 penalty for linear ``mse`` (ridge, ``sum (y - q)^2 + alpha |w|^2``)
        and ``ce`` (``sum logloss + alpha/2 |w|^2``, i.e. sklearn ``C = 1/alpha``),
        on the standardised coefficients.
    lr : float, default 3e-4
        AdamW learning rate (torch heads).
    epochs : int or None, default None
        Passes over the data (torch heads). None: enough epochs for about 400
        AdamW steps (at least one epoch), e.g. 4 epochs of 100k rows at
        ``batch_size=1000``. On synthetic data with standardised features,
        lr 3e-4 with 250-500 steps held out best; more steps overfit.
    batch_size : int or None, default 1000
        Rows per AdamW step, rounded to whole chunks/pairs; None for full batch.
    weight_decay : float, default 0.0
        AdamW decoupled weight decay on weights (torch heads).
    max_iter : int, default 50
        L-BFGS iteration cap for linear ``ce`` (each costs about two passes
        over X). On ill-conditioned synthetic features held-out selection
        stopped improving after ~30 iterations, so the cap doubles as early
        stopping; raise it (and check ``n_iter_``) for a fully converged fit.
    device : str or None, default None
        Torch device; None picks CUDA when available, else CPU.
    random_state : int, RandomState or None, default None
        Seeds initialisation and shuffling: the same fit twice gives the same
        probe (bit for bit on CPU; on CUDA to float rounding, since scatter-adds
        there are not ordered).

    Attributes
    ----------
    coef_ : ndarray of shape (n_features,) or (hidden,)
        Output weights; for a linear head, in raw feature space.
    intercept_ : float
    hidden_coef_, hidden_intercept_ : ndarray of shape (n_features, hidden), (hidden,)
        MLP heads only: the hidden layer, in raw feature space.
    mean_, scale_ : ndarray of shape (n_features,)
        Standardisation learned in fit (0 and 1 when ``standardize=False``).
    n_features_in_ : int
    n_iter_ : int
        Epochs (torch heads) or L-BFGS iterations (linear ``ce``); 1 for linear ``mse``.
    loss_curve_ : list of float
        Mean training loss per epoch (torch heads only; empty otherwise).
    embedder_ : dict or None
        Identity of the feature extractor (model, layer, pooling); set by the
        caller after fit or by ``save(..., embedder=...)``; recorded in the file.
    """

    def __init__(
        self,
        objective="pg",
        beta=0.1,
        k=10,
        beta_train=1.0,
        hidden=None,
        standardize=True,
        alpha=1.0,
        lr=3e-4,
        epochs=None,
        batch_size=1000,
        weight_decay=0.0,
        max_iter=50,
        device=None,
        random_state=None,
    ):
        self.objective = objective
        self.beta = beta
        self.k = k
        self.beta_train = beta_train
        self.hidden = hidden
        self.standardize = standardize
        self.alpha = alpha
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.max_iter = max_iter
        self.device = device
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.target_tags.one_d_labels = True
        if self.objective == "ce":  # binary y; sklearn's checks then send two labels {m, m + 1}
            from sklearn.utils import ClassifierTags

            tags.classifier_tags = ClassifierTags(multi_class=False)
        return tags

    # ------------------------------------------------------------------ fit
    def fit(self, X, y, groups=None):
        """Fit the probe.

        Parameters
        ----------
        X : array-like of shape (n_rows, n_features)
            Features, float32 or float64 (other dtypes become float64).
        y : array-like of shape (n_rows,)
            Rewards. ``ce``: 0/1. ``pref``: 1 on the preferred row of each pair, else 0.
        groups : array-like of shape (n_rows,), optional
            Prompt label of each row; required for ``pg`` (every group >= 2 rows)
            and ``pref`` (every group exactly 2 rows).

        Returns
        -------
        self : QProbe
        """
        self._check_params()
        X, y = self._validate(X, y, reset=True)
        y = y.astype(np.float64, copy=False)
        gi = self._check_groups(groups, y)
        rs = check_random_state(self.random_state)
        self.mean_, self.scale_ = _moments(X, self.standardize)
        self.hidden_coef_ = self.hidden_intercept_ = None
        self.loss_curve_ = []
        self.embedder_ = getattr(self, "embedder_", None)
        if self.hidden is None and self.objective == "mse":
            w, b = _fit_ridge(X, y, self.mean_, self.scale_, float(self.alpha))
            self.n_iter_ = 1
        elif self.hidden is None and self.objective == "ce":
            w, b, self.n_iter_ = _fit_logistic(X, y, self.mean_, self.scale_, float(self.alpha), int(self.max_iter))
        else:
            params, self.loss_curve_ = _fit_torch(self, X, y, gi, rs)
            self.n_iter_ = len(self.loss_curve_)
            if self.hidden is None:
                w, b = params["w"], float(params["b"])
            else:
                W1 = (params["W1"] / self.scale_).T  # (n_features, hidden), standardisation folded in
                self.hidden_coef_ = W1
                self.hidden_intercept_ = params["b1"] - self.mean_ @ W1
                self.coef_, self.intercept_ = params["w2"], float(params["b2"])
                return self
        self.coef_ = w / self.scale_  # raw feature space
        self.intercept_ = float(b - self.mean_ @ self.coef_)
        return self

    def _check_params(self):
        if self.objective not in OBJECTIVES:
            raise QProbeError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        checks = [
            ("beta", self.beta, lambda v: v >= 0),
            ("k", self.k, lambda v: int(v) == v and v >= 2),
            ("beta_train", self.beta_train, lambda v: v > 0),
            ("alpha", self.alpha, lambda v: v >= 0 if self.objective == "mse" else v > 0),
            ("lr", self.lr, lambda v: v > 0),
            ("weight_decay", self.weight_decay, lambda v: v >= 0),
            ("max_iter", self.max_iter, lambda v: int(v) == v and v >= 1),
        ]
        if self.hidden is not None:
            checks.append(("hidden", self.hidden, lambda v: int(v) == v and v >= 1))
        if self.epochs is not None:
            checks.append(("epochs", self.epochs, lambda v: int(v) == v and v >= 1))
        if self.batch_size is not None:
            checks.append(("batch_size", self.batch_size, lambda v: int(v) == v and v >= 1))
        for name, value, ok in checks:
            try:
                good = bool(ok(value))
            except (TypeError, ValueError):
                good = False
            if not good:
                raise QProbeError(f"invalid {name}={value!r} for objective {self.objective!r}")

    def _validate(self, X, y="no_validation", reset=False):
        kw = dict(reset=reset, dtype=(np.float64, np.float32), ensure_min_samples=2 if reset else 1)
        try:
            if reset:
                return _validate_data(self, X, y, y_numeric=True, **kw)
            return _validate_data(self, X, **kw)
        except ValueError as err:
            msg = _one_line(err)
            if msg.startswith("Expected 2D array"):
                msg = f"X must be 2-D of shape (n_rows, n_features), got {np.ndim(X)}-D; Reshape your data, e.g. X.reshape(1, -1) for one row"
            raise QProbeError(msg) from None

    def _check_groups(self, groups, y):
        obj = self.objective
        if obj == "ce" and not np.isin(y, (0.0, 1.0)).all():
            raise QProbeError("objective 'ce' needs rewards that are 0 or 1; use 'mse' or 'pg' for graded rewards")
        if obj == "ce" and self.hidden is None and np.ptp(y) == 0:
            raise QProbeError(f"objective 'ce' needs both rewards 0 and 1 in the data; all {y.size} rows have {y[0]:g}")
        if groups is None:
            if obj in ("pg", "pref"):
                raise QProbeError(f"objective {obj!r} needs groups= (the prompt id of each row)")
            return None
        gi = group_index(groups)
        if gi.codes.shape[0] != y.shape[0]:
            raise QProbeError(f"groups has {gi.codes.shape[0]} labels but X has {y.shape[0]} rows")
        if obj == "pg" and (gi.sizes < 2).any():
            bad = gi.labels[np.argmax(gi.sizes < 2)]
            raise QProbeError(f"objective 'pg' needs at least 2 rows per group; group {bad!r} has 1")
        if obj == "pref":
            if (gi.sizes != 2).any():
                j = int(np.argmax(gi.sizes != 2))
                raise QProbeError(f"objective 'pref' needs groups of exactly 2 rows; group {gi.labels[j]!r} has {gi.sizes[j]}")
            wins = np.add.reduceat(y[gi.order], gi.starts)
            if not np.isin(y, (0.0, 1.0)).all() or (wins != 1).any():
                raise QProbeError("objective 'pref' needs y = 1 on exactly one row of each pair and 0 on the other")
        return gi

    # ------------------------------------------------------------------ use
    def predict(self, X):
        """Probe scores Q.

        Parameters
        ----------
        X : array-like of shape (n_rows, n_features)

        Returns
        -------
        q : ndarray of shape (n_rows,), float64
        """
        check_is_fitted(self, "coef_")
        X = self._validate(X)
        out = np.empty(X.shape[0])
        for s in range(0, X.shape[0], _CHUNK_ROWS):
            xc = X[s : s + _CHUNK_ROWS].astype(np.float64)
            if self.hidden_coef_ is not None:
                xc = np.maximum(xc @ self.hidden_coef_ + self.hidden_intercept_, 0.0)
            out[s : s + _CHUNK_ROWS] = xc @ self.coef_ + self.intercept_
        return out

    def select(self, X, groups, beta=None, random_state=None, return_labels=False):
        """Choose one row per group by ``softmax(Q / beta)`` (argmax at beta 0).

        Parameters
        ----------
        X : array-like of shape (n_rows, n_features)
        groups : array-like of shape (n_rows,)
        beta : float, optional
            Defaults to ``self.beta``.
        random_state : None, int or Generator
            For the draw when beta > 0.
        return_labels : bool, default False
            Also return the group label of each choice.

        Returns
        -------
        indices : ndarray of int64, shape (n_groups,)
            Chosen row per group, groups in order of first appearance;
            with ``return_labels``, a tuple ``(indices, labels)``.
        """
        beta = self.beta if beta is None else beta
        return select_indices(self.predict(X), groups, beta, random_state, return_labels=return_labels)

    def score(self, X, y, groups=None, beta=None):
        """Expected reward of the ``softmax(Q / beta)`` choice, averaged over groups.

        Analytic (``sum_i w_i r_i`` per group), not a random draw. With no
        ``groups`` all rows form one group.

        Returns
        -------
        float
        """
        beta = self.beta if beta is None else beta
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        groups = np.zeros(y.shape[0], dtype=np.int64) if groups is None else groups
        return selection_report(self.predict(X), y, groups, beta)["probe_reward"]

    def check_features(self, n_features, embedder=None):
        """Refuse features from another extractor or of another dimension.

        Parameters
        ----------
        n_features : int
            Width of the features about to be scored.
        embedder : dict, optional
            Identity of the extractor that made them (``Embedder.identity()``);
            compared key by key with ``embedder_`` when both are known.

        Raises
        ------
        QProbeError
            One line naming the mismatch.
        """
        check_is_fitted(self, "coef_")
        if int(n_features) != self.n_features_in_:
            raise QProbeError(f"features have {n_features} dimensions but the probe expects {self.n_features_in_}")
        mine = getattr(self, "embedder_", None)
        if embedder and mine:
            for key in sorted(set(mine) & set(embedder)):
                if mine[key] != embedder[key]:
                    raise QProbeError(
                        f"features come from {key}={embedder[key]!r} but the probe was trained on {key}={mine[key]!r}"
                    )

    # ------------------------------------------------------------------ files
    def save(self, path, embedder=None):
        """Write the probe to directory ``path``, atomically.

        The directory holds ``probe.safetensors`` (coef, intercept, mean, scale
        and any hidden layer, float64) and ``config.json`` (format
        ``"qprobe-probe v1"``, objective, beta, n_features, hyper-parameters,
        embedder identity, checksum of the weights). Files are written into a
        temporary directory beside ``path`` and renamed into place; an existing
        probe directory is replaced, any other existing path is refused.

        Parameters
        ----------
        path : str or Path
        embedder : dict, optional
            Identity of the feature extractor (model, layer, pooling); stored
            as ``embedder_``. Defaults to the current ``embedder_``.
        """
        check_is_fitted(self, "coef_")
        if embedder is not None:
            self.embedder_ = dict(embedder)
        _save_probe(self, path)

    @classmethod
    def load(cls, path):
        """Read a probe written by ``save``; never unpickles."""
        return _load_probe(cls, path)


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


def _fit_ridge(X, y, mean, scale, alpha):
    """Ridge on standardised, centred features via the Gram matrix, streamed in row blocks.

    The Gram matrix is built with BLAS ``syrk`` (one triangle, half the flops
    of a product) in X's dtype per block and summed in float64.
    Returns (w, b) in standardised space: q = ((X - mean) / scale) @ w + b.
    """
    from scipy.linalg.blas import dsyrk, ssyrk

    syrk = ssyrk if X.dtype == np.float32 else dsyrk
    n, d = X.shape
    mu = X.mean(axis=0, dtype=np.float64)  # centring for the intercept (== mean when standardising)
    inv = 1.0 / scale
    yc = y - y.mean()
    G = np.zeros((d, d))
    rhs = np.zeros(d)
    sh, iv = (mu * inv).astype(X.dtype), inv.astype(X.dtype)
    step = max(1, (1 << 25) // d)  # ~128 MB float32 blocks
    for s in range(0, n, step):
        z = X[s : s + step] * iv
        z -= sh  # (x - mu) / scale, C-ordered, so z.T is Fortran-ordered for BLAS: no copy
        G += syrk(1.0, z.T, trans=0)  # upper triangle of z.T @ z
        rhs += z.T @ yc[s : s + step].astype(X.dtype)
    G = np.triu(G) + np.triu(G, 1).T
    G[np.diag_indices_from(G)] += alpha
    try:
        w = np.linalg.solve(G, rhs)
    except np.linalg.LinAlgError:
        w = np.linalg.lstsq(G, rhs, rcond=None)[0]
    return w, float(y.mean() - ((mu - mean) * inv) @ w)


def _fit_logistic(X, y, mean, scale, alpha, max_iter):
    """L2 logistic regression on standardised X by L-BFGS, without copying X.

    Minimises ``mean_i logloss_i + alpha / (2 n) |w|^2`` (sklearn's objective
    with ``C = 1/alpha``, divided by n). Returns (w, b) in standardised space.
    """
    from scipy.optimize import minimize
    from scipy.special import expit

    n, d = X.shape

    def f(theta):
        w, b = theta[:d], theta[d]
        v = w / scale
        z = (X @ v.astype(X.dtype)).astype(np.float64) + (b - mean @ v)
        loss = np.logaddexp(0.0, z) - y * z
        g = (expit(z) - y) / n
        gw = (X.T @ g.astype(X.dtype) - mean * g.sum()) / scale + (alpha / n) * w
        return loss.mean() + 0.5 * alpha / n * (w @ w), np.append(gw, g.sum())

    p = y.mean()
    theta0 = np.zeros(d + 1)
    theta0[d] = np.log(p / (1 - p)) if 0 < p < 1 else 0.0
    tol = 1e-10 if X.dtype == np.float64 else 1e-7
    res = minimize(f, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter, "gtol": tol, "ftol": tol})
    return res.x[:d], float(res.x[d]), int(res.nit)


# ---------------------------------------------------------------------- torch training
def _epoch_segments(obj, gi, n_rows, k, rs):
    """One epoch's training segments, shuffled.

    Returns (rows, sizes): row indices laid out segment after segment, and the
    size of each segment. ``pg``: chunks of k rows of one prompt (rows shuffled
    within the prompt first; 1-row tail chunks dropped); ``pref``: the pairs;
    otherwise every row is its own segment.
    """
    if obj == "pg":
        order = np.lexsort((rs.random_sample(n_rows), gi.codes))  # grouped, random within a group
        g = gi.codes[order]
        n_chunks = -(-gi.sizes // k)
        chunk = np.repeat(np.cumsum(n_chunks) - n_chunks, gi.sizes) + (np.arange(n_rows) - gi.starts[g]) // k
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


def _fit_torch(probe, X, y, gi, rs):
    """AdamW on the objective's loss for a linear or MLP head; returns (params, loss_curve)."""
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
    if obj == "mse":
        b0 = y.mean()
    elif obj == "ce":
        p = min(max(y.mean(), 1e-6), 1 - 1e-6)
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
    seg_rows = {"pg": int(probe.k), "pref": 2}.get(obj, 1)
    y_all = torch.as_tensor(y, dtype=dt).to(dev)
    X_dev = None  # X on the accelerator when it fits comfortably: batches are then gathered there
    if dev.type == "cuda" and torch.cuda.mem_get_info(dev)[0] > 3 * X.shape[0] * X.shape[1] * (8 if dt == torch.float64 else 4):
        with warnings.catch_warnings():  # read-only (memory-mapped) X: only read, never written
            warnings.simplefilter("ignore", UserWarning)
            X_dev = torch.as_tensor(X).to(dev, dt)
    curve, epoch, n_epochs = [], 0, probe.epochs
    while n_epochs is None or epoch < n_epochs:
        rows, sizes = _epoch_segments(obj, gi, n, int(probe.k), rs)
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
            seg = torch.from_numpy(np.repeat(np.arange(b - a), sizes[a:b])).to(dev)
            # standardisation folded into the first layer: ((x - mean) * inv) @ w == x @ (w * inv) - mean @ (w * inv)
            if h is None:
                v = params["w"] * inv_scale
                q = xb @ v + (params["b"] - mean @ v)
            else:
                W = params["W1"] * inv_scale
                q = torch.relu(xb @ W.T + (params["b1"] - W @ mean)) @ params["w2"] + params["b2"]
            if obj == "pg":
                loss = objectives.pg_loss(q, yb, seg, beta=float(probe.beta_train))
            elif obj == "pref":
                loss = objectives.pref_loss(q, seg, yb)
            else:
                loss = getattr(objectives, obj)(q, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
        curve.append(float(total) / steps)
    return {k: v.detach().cpu().double().numpy() for k, v in params.items()}, curve


# ---------------------------------------------------------------------- files
FORMAT = "qprobe-probe v1"
_CONFIG, _WEIGHTS = "config.json", "probe.safetensors"


def _digest(blob: bytes, config: dict) -> str:
    """sha256 over the weights and every config field but the checksum: a hand edit of either is refused."""
    import hashlib
    import json

    rest = json.dumps({k: v for k, v in config.items() if k != "sha256"}, sort_keys=True).encode()
    return hashlib.sha256(blob + b"\0" + rest).hexdigest()


def _jsonable(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, np.generic):
        return v.item()
    return str(v) if type(v).__name__ == "device" else None  # e.g. a RandomState: not recorded


def _save_probe(probe, path):
    import json
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from safetensors.numpy import save as st_save

    path = Path(path)
    tensors = {"coef": probe.coef_, "intercept": np.array([probe.intercept_]), "mean": probe.mean_, "scale": probe.scale_}
    if probe.hidden_coef_ is not None:
        tensors.update(hidden_coef=probe.hidden_coef_, hidden_intercept=probe.hidden_intercept_)
    blob = st_save({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()})
    config = {
        "format": FORMAT,
        "objective": probe.objective,
        "beta": float(probe.beta),
        "n_features": int(probe.n_features_in_),
        "hidden": probe.hidden,
        "params": {k: _jsonable(v) for k, v in probe.get_params().items()},
        "embedder": probe.embedder_,
    }
    config["sha256"] = _digest(blob, config)
    try:
        text = json.dumps(config, indent=2, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise QProbeError(f"cannot save probe: embedder identity is not JSON ({_one_line(err)})") from None
    if path.exists() and not (path.is_dir() and set(os.listdir(path)) <= {_CONFIG, _WEIGHTS}):
        raise QProbeError(f"{path} exists and is not a probe directory; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        for name, data in ((_WEIGHTS, blob), (_CONFIG, text.encode())):
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if path.exists():  # swap: the old probe stays whole until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old.tmp", dir=path.parent))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_probe(cls, path):
    import json
    from pathlib import Path

    from safetensors.numpy import load as st_load

    path = Path(path)
    cfg_path, w_path = path / _CONFIG, path / _WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise QProbeError(f"{path} is not a probe directory (needs {_CONFIG} and {_WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise QProbeError(f"{cfg_path} is not a qprobe config ({_one_line(err)})") from None
    fmt = cfg.get("format") if isinstance(cfg, dict) else None
    if fmt != FORMAT:
        raise QProbeError(f"{cfg_path} has format {fmt!r}; this qprobe reads {FORMAT!r} only")
    blob = w_path.read_bytes()
    if _digest(blob, cfg) != cfg.get("sha256"):
        raise QProbeError(f"{path}: weights or config do not match the checksum in {_CONFIG}: "
                          "the probe is corrupt or was edited by hand")
    try:
        t = st_load(blob)
        params = dict(cfg["params"])
        probe = cls(**params)
        probe._check_params()
        d, h = int(cfg["n_features"]), params.get("hidden")
    except QProbeError:
        raise
    except Exception as err:  # noqa: BLE001 - any malformation is one user-facing error
        raise QProbeError(f"{path} is not a valid probe ({_one_line(err)})") from None
    shapes = {"coef": (h or d,), "intercept": (1,), "mean": (d,), "scale": (d,)}
    if h is not None:
        shapes.update(hidden_coef=(d, h), hidden_intercept=(h,))
    if set(t) != set(shapes):
        raise QProbeError(f"{w_path} holds tensors {sorted(t)}, expected {sorted(shapes)}")
    for name, shape in shapes.items():
        if t[name].shape != shape or t[name].dtype != np.float64 or not np.isfinite(t[name]).all():
            raise QProbeError(f"{w_path}: tensor {name!r} has shape {t[name].shape}, expected {shape} finite float64")
    probe.coef_, probe.intercept_ = t["coef"], float(t["intercept"][0])
    probe.mean_, probe.scale_ = t["mean"], t["scale"]
    probe.hidden_coef_, probe.hidden_intercept_ = t.get("hidden_coef"), t.get("hidden_intercept")
    probe.n_features_in_, probe.loss_curve_, probe.embedder_ = d, [], cfg.get("embedder")
    return probe

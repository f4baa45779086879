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

This module holds the estimator: parameters and their validation, input and
group checks, ``fit`` (which dispatches to a fitting routine and maps the head
back to raw feature space), ``predict``/``select``/``score``, and the
``save``/``load`` entry points.

Not here: the fitting routines and standardisation statistics
(:mod:`qprobe._train`), writing and reading probe directories
(:mod:`qprobe._probe_io`), the losses themselves (:mod:`qprobe.objectives`),
the selection maths (:mod:`qprobe.select`), reading features or rows from disk.
"""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from qprobe._probe_io import _load_probe, _save_probe
from qprobe._train import _fit_logistic, _fit_ridge, _fit_torch, _moments
from qprobe.errors import QProbeError, one_line
from qprobe.select import group_index, select_indices, selection_report
from qprobe.signals import cascade_mask, check_names

OBJECTIVES = ("mse", "ce", "pg", "pref")
_CHUNK_ROWS = 4096  # rows per block when streaming over X (bounds temporary memory)

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    def _validate_data(est, *args, **kw):
        return est._validate_data(*args, **kw)


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
        of one row (which carries no gradient) is dropped. A prompt's
        demonstrations (``fit(..., demo_mask=)``) join its first chunk on top of
        its ``k`` samples (k + 1 for one), so they are never dropped.
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
    signals : tuple of str, default ()
        Names of the last ``len(signals)`` columns of X: numeric row fields beside
        the hidden-state features (``shown``, ``logprob_sum``, ...; see
        :mod:`qprobe.signals`, whose ``with_signals`` builds such an X). Recorded in
        the probe file, so ``rerank`` and ``serve`` refuse rows that lack one.
    cascade : str or None, default None
        One of ``signals``. ``select`` and ``score`` then choose, in each group, only
        among the rows at the group's maximum of that column (those that pass the
        shown tests, or all rows where none does), and ``fit`` trains on those rows
        only: the rows the probe will be asked to tell apart. ``groups`` is required.

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
    prefix_ : bool
        Whether this is a value probe of partial completions, fitted on prefix
        features labelled with their completion's final reward (``save(...,
        prefix=True)``, ``qprobe train --prefix``); recorded in the file.
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
        signals=(),
        cascade=None,
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
        self.signals = signals
        self.cascade = cascade

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.target_tags.one_d_labels = True
        if self.objective == "ce":  # binary y; sklearn's checks then send two labels {m, m + 1}
            from sklearn.utils import ClassifierTags

            tags.classifier_tags = ClassifierTags(multi_class=False)
        return tags

    # ------------------------------------------------------------------ fit
    def fit(self, X, y, groups=None, sample_weight=None, demo_mask=None):
        """Fit the probe.

        Parameters
        ----------
        X : array-like of shape (n_rows, n_features)
            Features, float32 or float64 (other dtypes become float64).
        y : array-like of shape (n_rows,)
            Rewards. ``ce``: 0/1 (or soft targets in [0, 1], e.g. calibrated rewards). ``pref``: 1 on the preferred row of each pair, else 0.
        groups : array-like of shape (n_rows,), optional
            Prompt label of each row; required for ``pg`` (every group >= 2 rows)
            and ``pref`` (every group exactly 2 rows).
        sample_weight : array-like of shape (n_rows,), optional
            Non-negative weight of each row's term in the loss (e.g. demonstrations,
            see ``qprobe train --demos``): ridge and logistic weight each row's
            squared error / log loss; ``pg`` multiplies the row's reward inside its
            chunk (the softmax is unchanged); torch ``mse`` / ``ce`` take a weighted
            mean. Not supported for ``pref``. Default: all 1.
        demo_mask : array-like of bool, shape (n_rows,), optional
            Rows that are demonstrations rather than the model's samples (see
            :func:`qprobe.fit.fit_probe`). ``pg`` puts them first in their prompt's
            first chunk, which grows by one row per demonstration (``k + 1`` for a
            prompt with one), so a demonstration always meets its prompt's samples
            and is never dropped as a one-row tail chunk. Other objectives ignore it.

        Returns
        -------
        self : QProbe
        """
        self._check_params()
        X, y = self._validate(X, y, reset=True)
        y = y.astype(np.float64, copy=False)
        dm = self._check_demo_mask(demo_mask, y.shape[0])
        if self.cascade is not None:
            X, y, groups, sample_weight, dm = self._cascade_rows(X, y, groups, sample_weight, dm)
        gi = self._check_groups(groups, y)
        sw = self._check_weight(sample_weight, y.shape[0])
        rs = check_random_state(self.random_state)
        self.mean_, self.scale_ = _moments(X, self.standardize)
        self.hidden_coef_ = self.hidden_intercept_ = None
        self.loss_curve_ = []
        self.embedder_ = getattr(self, "embedder_", None)
        self.prefix_ = getattr(self, "prefix_", False)
        if self.hidden is None and self.objective == "mse":
            w, b = _fit_ridge(X, y, self.mean_, self.scale_, float(self.alpha), sw)
            self.n_iter_ = 1
        elif self.hidden is None and self.objective == "ce":
            w, b, self.n_iter_ = _fit_logistic(X, y, self.mean_, self.scale_, float(self.alpha), int(self.max_iter), sw)
        else:
            params, self.loss_curve_ = _fit_torch(self, X, y, gi, rs, sw, dm)
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

    def _cascade_rows(self, X, y, groups, sample_weight, demo_mask=None):
        """The rows a cascade keeps (see ``cascade``); pg: groups left with one row are dropped."""
        if groups is None:
            raise QProbeError(f"cascade={self.cascade!r} needs groups= (the prompt id of each row)")
        groups = np.asarray(groups)
        if groups.shape[0] != y.shape[0]:
            raise QProbeError(f"groups has {groups.shape[0]} labels but X has {y.shape[0]} rows")
        keep = self.candidates(X, groups)
        if self.objective == "pg":
            gi = group_index(groups[keep])
            keep[np.flatnonzero(keep)[(gi.sizes < 2)[gi.codes]]] = False  # a lone candidate carries no gradient
        if keep.sum() < 2:
            raise QProbeError(f"cascade={self.cascade!r} leaves {int(keep.sum())} training rows; need at least 2")
        sw = None if sample_weight is None else np.asarray(sample_weight)[keep]
        dm = None if demo_mask is None else demo_mask[keep]
        return X[keep], y[keep], groups[keep], sw, dm

    def candidates(self, X, groups):
        """Rows a cascade lets the probe choose (all rows without one).

        Parameters
        ----------
        X : array-like of shape (n_rows, n_features)
            With the signal columns last.
        groups : array-like of shape (n_rows,)

        Returns
        -------
        mask : ndarray of bool, shape (n_rows,)
        """
        n = np.shape(X)[0]
        if self.cascade is None:
            return np.ones(n, dtype=bool)
        names = check_names(self.signals)
        col = np.shape(X)[1] - len(names) + names.index(self.cascade)
        return cascade_mask(np.asarray(X[:, col], dtype=np.float64), groups)

    def _check_params(self):
        if self.objective not in OBJECTIVES:
            raise QProbeError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        names = check_names(self.signals)
        if self.cascade is not None and self.cascade not in names:
            raise QProbeError(f"cascade={self.cascade!r} must be one of the signals {list(names)}")
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

    @staticmethod
    def _check_demo_mask(demo_mask, n_rows):
        if demo_mask is None:
            return None
        dm = np.asarray(demo_mask).reshape(-1)
        if dm.shape[0] != n_rows or not (dm.dtype == bool or np.isin(dm, (0, 1)).all()):
            raise QProbeError(f"demo_mask must be {n_rows} booleans (one per row of X), got {dm.shape[0]} values "
                              f"of type {dm.dtype}")
        return dm.astype(bool)

    def _check_weight(self, sample_weight, n_rows):
        if sample_weight is None:
            return None
        sw = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
        if sw.shape[0] != n_rows:
            raise QProbeError(f"sample_weight has {sw.shape[0]} values but X has {n_rows} rows")
        if not (np.isfinite(sw).all() and (sw >= 0).all() and sw.sum() > 0):
            raise QProbeError("sample_weight must be finite, >= 0 and not all 0")
        if self.objective == "pref":
            raise QProbeError("sample_weight is not supported for objective 'pref'")
        return sw

    def _validate(self, X, y="no_validation", reset=False):
        kw = dict(reset=reset, dtype=(np.float64, np.float32), ensure_min_samples=2 if reset else 1)
        try:
            if reset:
                return _validate_data(self, X, y, y_numeric=True, **kw)
            return _validate_data(self, X, **kw)
        except ValueError as err:
            msg = one_line(err)
            if msg.startswith("Expected 2D array"):
                msg = f"X must be 2-D of shape (n_rows, n_features), got {np.ndim(X)}-D; Reshape your data, e.g. X.reshape(1, -1) for one row"
            raise QProbeError(msg) from None

    def _check_groups(self, groups, y):
        obj = self.objective
        if obj == "ce" and not ((y >= 0) & (y <= 1)).all():
            raise QProbeError("objective 'ce' needs rewards in [0, 1] (0/1, or soft targets); use 'mse' or 'pg' for other rewards")
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
        cand = None if self.cascade is None else self.candidates(X, groups)
        return select_indices(self.predict(X), groups, beta, random_state, return_labels=return_labels,
                              candidates=cand)

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
        cand = None if self.cascade is None else self.candidates(X, groups)
        return selection_report(self.predict(X), y, groups, beta, candidates=cand)["probe_reward"]

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
    def save(self, path, embedder=None, prefix=None):
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
        prefix : bool, optional
            Mark the probe as a prefix value probe (stored as ``prefix_``).
        """
        check_is_fitted(self, "coef_")
        if embedder is not None:
            self.embedder_ = dict(embedder)
        if prefix is not None:
            self.prefix_ = bool(prefix)
        _save_probe(self, path)

    @classmethod
    def load(cls, path):
        """Read a probe written by ``save``; never unpickles."""
        return _load_probe(cls, path)

"""Choose a probe's regularisation and selection temperature by cross-validation over prompts.

With few positive rewards (a weak model on a hard task) the default penalty overfits, and
held-out pass@1 is too noisy to choose one: on the first 144 MBPP training prompts of
``experiments/mbpp_table.py`` only 15 prompts had both passing and failing samples, and
choosing by held-out pass@1 picked the weakest penalty, the worst one on test. So the
regularisation is chosen by the held-out value of the objective's own loss (as scikit-learn's
RidgeCV and LogisticRegressionCV do), which is smooth and uses every row, and beta is then
the one of best held-out expected reward for that probe. Folds hold out whole prompts.

scikit-learn's GridSearchCV with GroupKFold could run the grid, but not the second step
(beta is scored on the pooled out-of-fold predictions of the chosen probe, within prompts),
so the loop is written here; it is short.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qprobe.errors import QProbeError

# largest beta first and the most regularised probe first: ties go to the smaller KL and the simpler probe
BETAS = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0)
# heads trained in torch (pg, pref, MLP) are regularised by early stopping: AdamW steps to try,
# turned into epochs for the data at hand (QProbe's default is about 400 steps)
STEPS = (25, 100, 400, 1600)
GRIDS = {
    "mse": [{"alpha": a} for a in (1e5, 1e4, 1e3, 1e2, 1.0)],
    "ce": [{"alpha": a} for a in (1e4, 1e3, 1e2, 10.0, 1.0)],
    "pg": None,  # epochs from STEPS
    "pref": None,
}


def epochs_grid(n_rows: int, batch_size=1000, steps=STEPS) -> list[dict]:
    """``[{"epochs": e}]`` giving about ``steps`` AdamW steps on ``n_rows`` rows (duplicates dropped)."""
    per_epoch = 1 if not batch_size else max(1, -(-int(n_rows) // int(batch_size)))
    return [{"epochs": e} for e in sorted({max(1, round(s / per_epoch)) for s in steps})]


@dataclass
class TuneResult:
    """What :func:`tune` chose and the cross-validated scores behind it."""

    params: dict  # the chosen grid point
    beta: float  # the chosen selection temperature
    cv_reward: float  # held-out expected reward at (params, beta), pooled over folds
    grid: list = field(default_factory=list)
    losses: list = field(default_factory=list)  # held-out own loss per grid point
    rewards: list = field(default_factory=list)  # held-out expected reward of the chosen probe per beta
    betas: list = field(default_factory=list)
    demo_weight: float | None = None  # the chosen demonstration weight (None: no demonstrations given)
    grid_demo_weights: list = field(default_factory=list)  # demonstration weight of each grid point


def own_loss(objective: str, q, y, groups) -> float:
    """Held-out value of the loss an objective fits (lower is better).

    mse: mean squared error; ce: mean log loss of logits q; pg: minus the expected reward of
    softmax(q) over each prompt's rows (training temperature 1); pref: mean Bradley-Terry
    log loss of each pair (y = 1 on the preferred row).
    """
    from qprobe.select import selection_report

    q, y, groups = np.asarray(q, float), np.asarray(y, float), np.asarray(groups)
    if objective == "mse":
        return float(np.mean((q - y) ** 2))
    if objective == "ce":
        return float(np.mean(np.logaddexp(0.0, q) - y * q))
    if objective == "pg":
        return -selection_report(q, y, groups, 1.0)["probe_reward"]
    if objective == "pref":
        order = np.lexsort((-y, groups))  # per pair: preferred row first
        q = q[order].reshape(-1, 2)
        return float(np.mean(np.logaddexp(0.0, q[:, 1] - q[:, 0])))
    raise QProbeError(f"objective must be one of mse, ce, pg, pref, got {objective!r}")


# demonstration weights tried when demonstrations are given and no weight is fixed; 0 = leave them out
DEMO_WEIGHTS = (0.0, 1.0, 3.0, 10.0)


def tune(X, y, groups, objective="pg", grid=None, betas=BETAS, folds=5, random_state=0, progress=False,
         fit_y=None, demos=None, demo_weights=DEMO_WEIGHTS, **probe_params) -> TuneResult:
    """Cross-validate a probe over prompt folds; return the grid point and beta to use.

    Parameters
    ----------
    X, y, groups : as for :meth:`QProbe.fit` (groups are required: folds hold out whole prompts).
    objective : str
    grid : list of dict, optional
        QProbe parameters to try, most regularised first. Default: ``GRIDS[objective]`` (alpha)
        for linear mse / ce; for pg, pref and MLP heads (``hidden=...``), whose penalty is early
        stopping, the epochs that give about 25, 100, 400 and 1600 AdamW steps.
    betas : sequence of float
        Selection temperatures to try, largest first (0 = argmax).
    folds : int
        Number of prompt folds (at least 2, at most the number of prompts).
    random_state : int
        Seeds the fold split and every probe fit.
    fit_y : array-like of shape (n_rows,), optional
        Training targets when they differ from the rewards (a reward transform, see
        :mod:`qprobe.transforms`): probes fit ``fit_y`` and the penalty is chosen on its held-out
        loss, but beta is still chosen on held-out expected *reward* ``y``.
    demos : tuple (X_demo, y_demo, groups_demo), optional
        Demonstration rows (targets already transformed). A fold trains on the demonstrations of
        its training prompts only (joined by :func:`qprobe.demos.join_demos`, so with ``pg`` a
        prompt's demonstration joins its chunk) and never scores them. The weight is a grid dimension.
    demo_weights : sequence of float
        Weights to try for the demonstrations (0 leaves them out), crossed with ``grid``; the
        weight and penalty are chosen together on the held-out loss of the sampled rows.
    **probe_params
        Fixed QProbe parameters (``k``, ``hidden``, ``lr``, ...).
    """
    from qprobe.demos import join_demos
    from qprobe.probe import QProbe
    from qprobe.select import selection_report

    X, y = np.asarray(X), np.asarray(y, dtype=float)
    if groups is None:
        raise QProbeError("tuning needs groups (prompt ids): folds hold out whole prompts")
    groups = np.asarray(groups)
    prompts = np.unique(groups)
    if not 2 <= int(folds) <= len(prompts):
        raise QProbeError(f"folds must be between 2 and the number of prompts ({len(prompts)}), got {folds}")
    if objective not in GRIDS:
        raise QProbeError(f"objective must be one of {', '.join(GRIDS)}, got {objective!r}")
    if grid is None:
        grid = GRIDS[objective]
        if grid is None or probe_params.get("hidden"):  # fits on (folds - 1) / folds of the rows
            grid = epochs_grid(len(y) * (folds - 1) / folds, probe_params.get("batch_size", 1000))
    grid, betas = [dict(p) for p in grid], [float(b) for b in betas]
    if not grid or not betas or min(betas) < 0:
        raise QProbeError("grid and betas must be non-empty and betas >= 0")
    fy = y if fit_y is None else np.asarray(fit_y, dtype=float)
    if fy.shape != y.shape:
        raise QProbeError(f"fit_y has {fy.shape[0]} values but y has {y.shape[0]}")
    weights = [None]
    if demos is not None:
        Xd, yd, gd = (np.asarray(a) for a in demos)
        weights = sorted({float(w) for w in demo_weights})
        if not weights or weights[0] < 0:
            raise QProbeError("demo_weights must be non-empty and >= 0")
    grid = [(p, w) for w in weights for p in grid]
    prompts = np.random.default_rng(random_state).permutation(prompts)
    oof = np.zeros((len(grid), len(y)))  # out-of-fold scores per grid point
    steps = [(f, i) for f in range(folds) for i in range(len(grid))]
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"tune {objective}", unit="fit")
    for f, i in steps:
        held = np.isin(groups, prompts[f::folds])
        params, w = grid[i]
        probe = QProbe(objective=objective, random_state=random_state, **{**probe_params, **params})
        Xf, yf, gf, sw, dm = X[~held], fy[~held], groups[~held], None, None
        if w:  # demonstrations of the training prompts, with their weight
            use = ~np.isin(gd, prompts[f::folds])
            Xf, yf, gf, sw, dm = join_demos(Xf, yf, gf, Xd[use], yd[use], gd[use], w)
        oof[i, held] = probe.fit(Xf, yf, groups=gf, sample_weight=sw, demo_mask=dm).predict(X[held])
    # a cascade probe is judged on the rows it will choose among (all rows when it has none)
    cand = QProbe(objective=objective, **probe_params).candidates(X, groups)
    losses = [own_loss(objective, q[cand], fy[cand], groups[cand]) for q in oof]
    i = int(np.argmin(losses))
    rewards = [selection_report(oof[i], y, groups, b, candidates=cand)["probe_reward"] for b in betas]
    j = int(np.argmax(rewards))
    return TuneResult(params=grid[i][0], beta=betas[j], cv_reward=float(rewards[j]), grid=[p for p, _ in grid],
                      losses=losses, rewards=rewards, betas=betas, demo_weight=grid[i][1],
                      grid_demo_weights=[w for _, w in grid])

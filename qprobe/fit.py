"""The training recipe on arrays: transform the rewards, join demonstrations, tune, fit.

    fit_probe(X, y, groups, demos=(X_demo, groups_demo), transform=..., tune_folds=..., **params)
        -> (probe, tuned, info)

As scikit-learn's ``_ridge.py`` solvers are the one place a ridge is solved, this is the one
place a probe is trained from arrays. ``qprobe train`` (:func:`qprobe.pipeline.train_file`)
reads rows and features, embeds the demonstrations and calls it; experiments call it on
benchmark arrays. Its steps, in order:

1. Targets: the rewards through a reward transform (:mod:`qprobe.transforms`). Demonstrations
   are calibrated against the samples of their prompt and never count as a sample themselves.
2. With ``tune_folds``: penalty or training length, demonstration weight and beta by
   cross-validation over prompts (:func:`qprobe.tune.tune`); beta is chosen on the raw reward.
3. The fit on every row, the demonstrations joined with their weight
   (:func:`qprobe.demos.join_demos`). With ``pg`` a prompt's demonstration joins its chunk,
   which then has k + 1 rows, and is never dropped as a one-row tail (``QProbe.fit(demo_mask=)``).

Not here: reading rows or features, embedding demonstrations, saving the probe.
"""
from __future__ import annotations

import numpy as np

from qprobe.demos import DEMO_REWARD, join_demos
from qprobe.errors import QProbeError
from qprobe.probe import QProbe
from qprobe.transforms import transform_rewards


def fit_probe(X, y, groups, *, demos=None, demo_weight=None, demo_reward=DEMO_REWARD, transform="none",
              tune_folds=None, grid=None, random_state=0, progress=False, **params):
    """Fit a probe the way ``qprobe train`` does, from arrays.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
        Features of the sampled rows. A memory map is only read (copied once when
        demonstrations join it).
    y : array-like of shape (n_rows,)
        Rewards of the rows.
    groups : array-like of shape (n_rows,) or None
        Prompt label of each row. Needed for demonstrations, a reward transform, tuning, and
        the ``pg`` and ``pref`` objectives.
    demos : tuple (X_demo, groups_demo), optional
        Demonstrations: features of shape (n_demos, n_features), made by the same extractor as
        ``X``, and the prompt label of each (a label of ``groups``). Each is a row of its prompt
        with reward ``demo_reward``.
    demo_weight : float, optional
        Loss weight of each demonstration; 0 leaves them out. None: chosen by the
        cross-validation among :data:`qprobe.tune.DEMO_WEIGHTS` with ``tune_folds``, else 1.
    demo_reward : float, default 1.0
    transform : str, default "none"
        Reward transform of the training targets: ``none``, ``calibrated`` or
        ``calibrated-exp:T`` (:mod:`qprobe.transforms`).
    tune_folds : int, optional
        Choose the grid's parameter (``alpha`` for linear mse / ce, ``epochs`` otherwise), the
        demonstration weight and ``beta`` by cross-validation over this many prompt folds.
    grid : list of dict, optional
        With ``tune_folds``: the QProbe parameters to try (default: :func:`qprobe.tune.tune`'s).
    random_state : int or None, default 0
        Seeds the folds and every fit.
    progress : bool, default False
        A progress bar over the cross-validation's fits.
    **params
        :class:`QProbe` parameters (``objective``, ``k``, ``beta``, ``hidden``, ``signals``,
        ...). With ``tune_folds`` the chosen grid point and beta replace the given ones.

    Returns
    -------
    probe : QProbe
        Fitted on every row (and the demonstrations, unless their weight is 0).
    tuned : TuneResult or None
        What the cross-validation chose, with ``tune_folds``.
    info : dict
        ``n_demos``: demonstrations given; ``demo_weight``: their weight in the fit (None
        without demonstrations).
    """
    objective = params.get("objective", "pg")
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    Xd = gd = None
    if demos is not None:
        Xd, gd = demos
        Xd, gd = np.asarray(Xd), np.asarray(gd).reshape(-1)
        if Xd.ndim != 2 or Xd.shape[0] != gd.shape[0] or Xd.shape[1] != np.shape(X)[1]:
            raise QProbeError(f"demos must be (X_demo, groups_demo) of shapes (n_demos, {np.shape(X)[1]}) and "
                              f"(n_demos,); got {Xd.shape} and {gd.shape}")
        if groups is None:
            raise QProbeError("demonstrations need groups (the prompt of each row)")
        groups = np.asarray(groups)
        if not np.isin(gd, groups).all():
            raise QProbeError(f"demonstration {int(np.argmin(np.isin(gd, groups)))}'s prompt "
                              f"{gd[np.argmin(np.isin(gd, groups))]!r} has no sampled row")
        Xd = Xd.astype(np.asarray(X).dtype, copy=False)
    if groups is None and transform != "none":
        raise QProbeError(f"reward transform {transform!r} needs groups (the prompt of each row)")
    if objective == "pref" and (demos is not None or transform != "none"):
        raise QProbeError("demonstrations and reward transforms work with objectives mse, ce and pg, not pref")
    if demo_weight is not None and not (np.isfinite(demo_weight) and demo_weight >= 0):
        raise QProbeError(f"demo_weight must be finite and >= 0, got {demo_weight!r}")

    # 1. targets; demonstrations are calibrated against their prompt's samples, not counted as one
    n_d = 0 if gd is None else gd.shape[0]
    ref = np.r_[np.ones(y.shape[0], bool), np.zeros(n_d, bool)]
    y_all = np.r_[y, np.full(n_d, float(demo_reward))]
    g_all = groups if gd is None else np.r_[groups, gd]
    fit_all = transform_rewards(transform, y_all, g_all, ref)
    fy, fyd = fit_all[: y.shape[0]], fit_all[y.shape[0]:]

    # 2. tuning over prompt folds
    tuned, w = None, demo_weight
    if tune_folds:
        from qprobe.tune import DEMO_WEIGHTS, tune

        fixed = {k: v for k, v in params.items() if k not in ("objective", "beta")}
        tuned = tune(X, y, groups, objective, grid=grid, folds=tune_folds,
                     random_state=0 if random_state is None else random_state, progress=progress, fit_y=fy,
                     demos=None if gd is None else (Xd, fyd, gd), demo_weights=DEMO_WEIGHTS if w is None else (w,),
                     **fixed)
        params = {**params, **tuned.params, "beta": tuned.beta}
        w = tuned.demo_weight
    elif gd is not None and w is None:
        w = 1.0

    # 3. the fit on every row
    Xf, yf, gf, sw, dm = X, fy, groups, None, None
    if gd is not None:
        Xf, yf, gf, sw, dm = join_demos(X, fy, groups, Xd, fyd, gd, w)
    probe = QProbe(**params, random_state=random_state).fit(Xf, yf, groups=gf, sample_weight=sw, demo_mask=dm)
    return probe, tuned, {"n_demos": n_d, "demo_weight": w}

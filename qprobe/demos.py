"""Demonstrations as training evidence (demonstration-regularised RL, Tiapkin et al. 2024).

A dataset's reference solutions (MBPP's ``code``, a preference set's chosen answers) are
positives a weak model may never sample. ``qprobe train --demos`` embeds each one as a
completion of its prompt, with the same extractor as the features, and adds it to training
as a row of its prompt with a reward (default 1) and a weight; for ``pg`` it joins its
prompt's group, so the chunk softmax compares it with the model's own samples.

This module finds the demonstrations (a field of the rows, or a JSONL file of
``prompt_id, completion``), rebuilds the features' extractor from its recorded identity, and
joins demonstration rows to training arrays (``join_demos``, used by every fit: the final one
in :func:`qprobe.fit.fit_probe` and each fold's in :func:`qprobe.tune.tune`). Embedding goes
through the extractor's cached ``embed``; the training recipe is :mod:`qprobe.fit`'s job.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qprobe.errors import QProbeError

DEMO_REWARD = 1.0


def join_demos(X, y, groups, X_demo, y_demo, groups_demo, weight):
    """Training arrays with the demonstration rows appended after the samples.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    y, groups : ndarray of shape (n_rows,)
        Targets and prompt labels of the sampled rows.
    X_demo : ndarray of shape (n_demos, n_features)
    y_demo, groups_demo : ndarray of shape (n_demos,)
        Targets of the demonstrations and the prompt each belongs to (labels shared with ``groups``).
    weight : float or None
        Loss weight of each demonstration; 0 or None leaves them out.

    Returns
    -------
    X, y, groups : the joined arrays (the inputs themselves when the demonstrations are left out)
    sample_weight : ndarray of shape (n_rows + n_demos,) or None
        1 for each sample, ``weight`` for each demonstration; None when they are left out.
    demo_mask : ndarray of bool, shape (n_rows + n_demos,) or None
        True on the demonstrations, for :meth:`QProbe.fit`: with ``pg`` a prompt's
        demonstration joins its chunk, which gets k + 1 rows, and is never dropped.
    """
    if not weight:
        return X, y, groups, None, None
    n, nd = len(y), len(y_demo)
    X = np.concatenate([X, np.asarray(X_demo).astype(X.dtype, copy=False)])
    y, groups = np.concatenate([y, y_demo]), np.concatenate([groups, groups_demo])
    sw = np.concatenate([np.ones(n), np.full(nd, float(weight))])
    return X, y, groups, sw, np.arange(n + nd) >= n


def demo_items(rows: list[dict], source: str, template: str = "{demo}", path="rows") -> list[tuple]:
    """One ``(prompt_id, prompt, completion)`` per prompt that has a demonstration.

    Parameters
    ----------
    rows : list of dict
        The training rows (completion rows); prompts are taken from them, so a demonstration is
        embedded with exactly the prompt its prompt's samples were.
    source : str
        A JSONL file with ``prompt_id`` and ``completion`` per line, or else the name of a field
        of the rows holding the demonstration (the first non-empty value per prompt is used).
    template : str
        How a demonstration is written as a completion, ``{demo}`` standing for it (e.g.
        ``"```python\\n{demo}\\n"`` when the model's answers open a code block).
    """
    prompts: dict[str, dict] = {}  # json prompt_id -> first row of the prompt
    for r in rows:
        prompts.setdefault(json.dumps(r["prompt_id"]), r)
    if "{demo}" not in template:
        raise QProbeError("--demo-template must contain {demo}")
    found: dict[str, str] = {}  # json prompt_id -> demonstration text
    if Path(source).is_file():
        from qprobe.io import read_jsonl, require_fields

        demos = read_jsonl(source)
        require_fields(demos, ["prompt_id", "completion"], source)
        for i, d in enumerate(demos, 1):
            key = json.dumps(d["prompt_id"])
            if key not in prompts:
                raise QProbeError(f"{source}: row {i}: prompt_id {d['prompt_id']!r} is not in the training rows")
            if not isinstance(d["completion"], str):
                raise QProbeError(f"{source}: row {i}: 'completion' must be a string")
            found.setdefault(key, d["completion"])
    else:
        if not any(source in r for r in rows):
            raise QProbeError(f"--demos {source!r}: neither a file nor a field of the rows in {path}")
        for r in rows:
            v = r.get(source)
            if isinstance(v, str) and v.strip():
                found.setdefault(json.dumps(r["prompt_id"]), v)
    if not found:
        raise QProbeError(f"--demos {source!r}: no demonstration found for any training prompt")
    return [(prompts[k]["prompt_id"], prompts[k]["prompt"], template.replace("{demo}", d)) for k, d in found.items()]


def embedder_from_identity(identity: dict | None, api_key: str | None = None):
    """The embedder that made features with this recorded identity (any registered kind).

    An ``api`` extractor's host was read from the features' sidecar: it gets `api_key`
    (given by the user for it, ``--extractor-api-key``) and never ``$OPENAI_API_KEY``.
    """
    from qprobe.registry import EMBEDDERS, rebuild

    if not identity or "kind" not in identity:
        raise QProbeError("--demos needs features that record their extractor (made by `qprobe embed` or `sample --capture`)")
    try:
        return rebuild(EMBEDDERS, identity, api_key=api_key, env_key=False)
    except QProbeError as e:
        raise QProbeError(f"--demos: {e}") from None

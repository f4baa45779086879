"""Features from a local transformers model: the hidden state at one layer,
at the last completion token or mean-pooled over the completion tokens.

The prompt is tokenised exactly as the HF sampler feeds it (chat template for
message lists), so features computed here match those the sampler can capture.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from qprobe.embedders.base import Embedder, Item
from qprobe.errors import QProbeError
from qprobe.hfmodel import (DEFAULT_MODEL, completion_ids, config_layers, dtype_name, load_model, norm_layer,
                             prompt_ids)

POOLINGS = ("last", "mean")


def hf_identity(model: str, layer: int, pooling: str, dtype: str) -> dict:
    """Identity of HF features; `layer` is already normalised (hidden_states index).

    `dtype` is the resolved compute dtype (`hfmodel.dtype_name`): float32 and bfloat16
    features differ, so they never share a cache entry and a probe refuses the other's.
    """
    return {"kind": "hf", "model": model, "layer": int(layer), "pooling": pooling, "dtype": dtype}


def pool_states(states, prompt_state, pooling: str):
    """Pool completion-token states (n_tokens, H) -> (H,); an empty completion uses the last prompt token."""
    if states is None or len(states) == 0:
        return prompt_state
    return states[-1] if pooling == "last" else states.mean(0)


class HFEmbedder(Embedder):
    """Hidden-state features of a causal LM.

    Parameters
    ----------
    model : str
        Hugging Face id, local folder, .gguf file or ``smollm2-135m``.
    layer : int
        Index into the model's hidden states: 0 the embeddings, -1 (default) the
        last layer, after the final norm.
    pooling : {"last", "mean"}
        The last completion token, or the mean over completion tokens.
    """

    def __init__(self, model: str = DEFAULT_MODEL, layer: int = -1, pooling: str = "last",
                 batch_size: int = 16, device: str | None = None, dtype: str | None = None):
        if pooling not in POOLINGS:
            raise QProbeError(f"--pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        self.model = model
        self.layer = int(layer)
        self.pooling = pooling
        self.batch_size = int(batch_size)
        self.device = device
        self.dtype = dtype
        self._identity = None

    @classmethod
    def kwargs_from_options(cls, *, model=None, api_base=None, api_model=None, device=None, dtype=None,
                            batch_size=None, layer=None, pooling=None, sentence_model=None, **_) -> dict:
        """The generic options (`registry.build`): a local model, the default one when none is named."""
        from qprobe.registry import uses_api

        if sentence_model:
            raise QProbeError("--sentence-model goes with --embedder sentence, not hf")
        if uses_api(model, api_base, api_model):
            raise QProbeError("--embedder hf needs --model (or nothing), not --api-base")
        kw = dict(model=model or DEFAULT_MODEL, layer=-1 if layer is None else layer, pooling=pooling or "last",
                  device=device, dtype=dtype, batch_size=batch_size)
        return {k: v for k, v in kw.items() if v is not None}

    @classmethod
    def kwargs_from_identity(cls, identity: dict, device=None, dtype=None, batch_size=None, **_) -> dict:
        """Model, layer and pooling from the identity; its dtype only where the device's default differs
        (so a rebuilt embedder shares the loaded model of one built with the defaults)."""
        kw = dict(model=identity["model"], layer=identity["layer"], pooling=identity["pooling"], device=device,
                  batch_size=batch_size)
        recorded = identity.get("dtype")
        if dtype is None and recorded is not None and recorded != dtype_name(device, None):
            dtype = recorded
        return {k: v for k, v in dict(kw, dtype=dtype).items() if v is not None}

    def _load(self):
        return load_model(self.model, self.device, self.dtype)

    def identity(self) -> dict:
        if self._identity is None:  # from the config only: a warm-cache run loads no weights
            self._identity = hf_identity(self.model, norm_layer(config_layers(self.model), self.layer), self.pooling,
                                         dtype_name(self.device, self.dtype))
        return self._identity

    def embed_batch(self, items: Sequence[Item]) -> np.ndarray:
        model, tok = self._load()  # first: a missing extra is named before torch is imported here
        import torch

        layer = norm_layer(model, self.layer)
        limit = getattr(model.config, "max_position_embeddings", None) or 10**9
        seqs = []  # (ids, n_prompt_tokens)
        for prompt, completion in items:
            p = prompt_ids(tok, prompt)
            c = completion_ids(tok, completion)
            if len(p) + len(c) > limit:
                raise QProbeError(
                    f"an input of {len(p) + len(c)} tokens exceeds the model's context of {limit} tokens "
                    f"(prompt starting {str(prompt)[:40]!r})"
                )
            seqs.append((p + c, len(p)))
        T = max(len(s) for s, _ in seqs)
        inp = torch.full((len(seqs), T), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for r, (ids, _) in enumerate(seqs):  # right padding: positions start at 0 for every row
            inp[r, : len(ids)] = torch.tensor(ids)
            mask[r, : len(ids)] = 1
        dev = model.device
        base = model.get_decoder() if hasattr(model, "get_decoder") else model  # skip the LM head: no logits needed
        with torch.no_grad():
            out = base(input_ids=inp.to(dev), attention_mask=mask.to(dev), output_hidden_states=True)
        hs = out.hidden_states[layer]  # (B, T, H) in the model's dtype
        n_p = torch.tensor([n for _, n in seqs], device=dev)
        n_all = torch.tensor([len(ids) for ids, _ in seqs], device=dev)
        rows = torch.arange(len(seqs), device=dev)
        if self.pooling == "last":  # an empty completion falls back to the last prompt token
            feats = hs[rows, n_all - 1]
        else:
            pos = torch.arange(T, device=dev)[None, :]
            w = ((pos >= n_p[:, None]) & (pos < n_all[:, None])).to(hs.dtype)  # completion tokens
            empty = w.sum(1) == 0
            w[empty, (n_p[empty] - 1)] = 1  # empty completion: the last prompt token
            feats = torch.bmm(w[:, None, :], hs)[:, 0] / w.sum(1, keepdim=True)  # bmm accumulates in fp32
        return feats.float().cpu().numpy()

"""Features from an OpenAI-compatible ``/embeddings`` endpoint (OpenAI, vLLM, llama.cpp, ...).

Each (prompt, completion) pair becomes one text (see `item_text`). The base
class hands `embed_batch` up to ``batch_size * concurrency`` items; they are
split into requests of at most `batch_size` inputs and `max_chars_per_batch`
characters and sent on `concurrency` threads.

Servers answer in two shapes: one vector per input (OpenAI), or one vector per
token of each input (llama.cpp's server). The second is pooled here, by the
mean or the last token's vector. A response with fewer embeddings than inputs
is retried, then reported as a `QProbeError`. The body is decoded by us, not by
the `openai` client's typed models, which expect ``list[float]`` and would
reject token-level vectors.

It does not cache, normalise or truncate texts; `openai` is imported only when
an `OpenAIEmbedder` is built.
"""
from __future__ import annotations

import base64
from typing import Sequence

import numpy as np

from qprobe.apiclient import ApiClient, BadResponse
from qprobe.pool import TaskPool
from qprobe.embedders.base import Embedder, Item, item_text
from qprobe.errors import QProbeError


def _vector(embedding, pooling: str) -> np.ndarray:
    """One float32 vector from a vector, a base64 string, or token-level vectors (pooled)."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype=np.float32)
    try:
        arr = np.asarray(embedding, dtype=np.float32)
    except (TypeError, ValueError):
        raise BadResponse("an embedding is not a list of numbers") from None
    if arr.ndim == 2 and arr.shape[0] > 0:
        return arr.mean(axis=0) if pooling == "mean" else arr[-1]
    if arr.ndim != 1 or arr.size == 0:
        raise BadResponse(f"embedding of shape {arr.shape}")
    return arr


class OpenAIEmbedder(Embedder):
    """Embeddings of prompt+completion texts from an HTTP API.

    Parameters
    ----------
    api_base : str
        Base URL with the version prefix, e.g. ``http://127.0.0.1:8080/v1``.
    model : str
        Model name sent with every request.
    api_key : str, optional
        Defaults to ``$OPENAI_API_KEY``; local servers accept any key. Never stored in `identity`.
    batch_size : int
        Inputs per request (OpenAI accepts up to 2048).
    max_chars_per_batch : int
        Characters per request; a request is closed before it passes this (one
        longer text still goes alone). The default stays well under OpenAI's
        300,000 tokens per request.
    concurrency : int
        Requests in flight at once.
    timeout : float
        Seconds per HTTP attempt.
    max_retries : int
        Retries per request (see `qprobe.apiclient`).
    pooling : {"mean", "last"}
        How token-level embeddings are reduced to one vector (ignored when the
        server already returns one vector per input).
    backoff : float
        First retry delay in seconds (doubles per retry, jittered).
    env_key : bool
        Read a missing `api_key` from ``$OPENAI_API_KEY``. False when the host was read
        from a file (a probe's or a feature file's recorded extractor): no key goes to a
        host the user did not name.
    max_bytes : int, optional
        Largest answer read from the server.
    """

    def __init__(self, api_base: str, model: str, api_key: str | None = None, batch_size: int = 64,
                 max_chars_per_batch: int = 200_000, concurrency: int = 4, timeout: float = 60,
                 max_retries: int = 6, pooling: str = "mean", backoff: float = 0.5, env_key: bool = True,
                 max_bytes: int | None = None):
        if pooling not in ("mean", "last"):
            raise QProbeError(f"pooling must be 'mean' or 'last', not {pooling!r}")
        self.api_base = api_base.rstrip("/")
        self.model = model
        self.pooling = pooling
        self.request_size = max(1, int(batch_size))
        self.max_chars_per_batch = int(max_chars_per_batch)
        self.concurrency = max(1, int(concurrency))
        self.batch_size = self.request_size * self.concurrency  # what the base class hands embed_batch
        self.api = ApiClient(self.api_base, api_key, timeout=timeout, max_retries=max_retries, backoff=backoff,
                             env_key=env_key, **({} if max_bytes is None else {"max_bytes": max_bytes}))

    @classmethod
    def kwargs_from_options(cls, *, model=None, api_base=None, api_model=None, api_key=None, batch_size=None,
                            pooling=None, sentence_model=None, timeout=None, max_retries=None, **_) -> dict:
        """The generic options (`registry.build`): ``--api-base`` and ``--api-model`` name the server's model;
        token-level vectors pool at the last token unless ``pooling`` is ``mean``."""
        from qprobe.registry import uses_api

        if sentence_model:
            raise QProbeError("--sentence-model goes with --embedder sentence, not api")
        if not uses_api(model, api_base, api_model):
            raise QProbeError("--embedder api needs --api-base and --api-model")
        kw = dict(api_base=api_base, model=api_model, api_key=api_key, batch_size=batch_size,
                  pooling="mean" if pooling == "mean" else "last", timeout=timeout, max_retries=max_retries)
        return {k: v for k, v in kw.items() if v is not None}

    @property
    def n_requests(self) -> int:
        """HTTP attempts made so far, retries included."""
        return self.api.n_requests

    def identity(self) -> dict:
        return {"kind": "api", "api_base": self.api_base, "model": self.model, "pooling": self.pooling}

    def _requests(self, texts: list[str]) -> list[list[int]]:
        """Split text indices into requests within `request_size` and `max_chars_per_batch`."""
        out: list[list[int]] = []
        cur: list[int] = []
        chars = 0
        for i, t in enumerate(texts):
            if cur and (len(cur) >= self.request_size or chars + len(t) > self.max_chars_per_batch):
                out.append(cur)
                cur, chars = [], 0
            cur.append(i)
            chars += len(t)
        return out + ([cur] if cur else [])

    def _embed_request(self, texts: list[str], stop) -> np.ndarray:
        """Vectors of shape (len(texts), dim) for one request."""
        rows: list[np.ndarray] = []

        def check(data) -> None:
            items = data.get("data") if isinstance(data, dict) else None
            if not isinstance(items, list) or len(items) != len(texts):
                got = len(items) if isinstance(items, list) else "no"
                raise BadResponse(f"{got} embeddings for {len(texts)} inputs")
            items = sorted(items, key=lambda d: d.get("index", 0) if isinstance(d, dict) else 0)
            if any(not isinstance(d, dict) or "embedding" not in d for d in items):
                raise BadResponse("an item has no 'embedding'")
            vecs = [_vector(d["embedding"], self.pooling) for d in items]
            if len({v.shape for v in vecs}) != 1:
                raise BadResponse(f"embeddings of several sizes {sorted({v.size for v in vecs})}")
            rows[:] = vecs

        body = {"model": self.model, "input": texts, "encoding_format": "float"}
        self.api.post_json("/embeddings", body, check=check, stop=stop)
        return np.stack(rows)

    def embed_batch(self, items: Sequence[Item]) -> np.ndarray:
        """Features of shape (len(items), dim), float32."""
        texts = [item_text(p, c) for p, c in items]
        parts: dict[int, np.ndarray] = {}  # first text index -> its request's vectors
        with TaskPool(self.concurrency) as pool:
            for idx in self._requests(texts):
                pool.submit(idx[0], self._embed_request, [texts[i] for i in idx], pool.stop)
            for start, vecs in pool.results():
                parts[start] = vecs
        dims = {v.shape[1] for v in parts.values()}
        if len(dims) > 1:
            raise QProbeError(f"API at {self.api_base}: embeddings of several sizes {sorted(dims)} in one batch")
        return np.concatenate([parts[s] for s in sorted(parts)], axis=0)

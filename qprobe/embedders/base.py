"""The embedder extension point: subclasses implement `embed_batch` only.

Batching and shape checks live here; the cache, resume and progress are `qprobe.cachedmap`'s.
A backend never sees the cache and never prints.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from qprobe.cache import Cache, make_key
from qprobe.cachedmap import cached_map
from qprobe.errors import QProbeError
from qprobe.pool import map_unordered

Prompt = Any  # a string, or a list of {"role", "content"} chat messages
Item = tuple[Prompt, str]  # (prompt, completion)


def item_text(prompt, completion: str) -> str:
    """The text embedded for one row, by every backend that embeds text (sentence models, APIs).

    A string prompt is followed directly by the completion (what the model saw
    and wrote). A chat prompt is flattened to one ``role: content`` line per
    message, then ``assistant: `` and the completion, e.g.
    ``"system: Be brief.\\nuser: Add 2 and 3.\\nassistant: 5"``.
    """
    if isinstance(prompt, str):
        text = prompt + completion
    else:
        lines = [f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt]
        text = "\n".join(lines + [f"assistant: {completion}"])
    return text if text else " "  # servers reject empty inputs; a tokenizer reads " " as nothing too


class Embedder:
    """Turns (prompt, completion) pairs into feature vectors of shape (dim,)."""

    batch_size: int = 16

    def identity(self) -> dict:
        """What makes two embedders' features interchangeable (kind, model, layer, pooling)."""
        raise NotImplementedError

    def embed_batch(self, items: Sequence[Item]) -> np.ndarray:
        """Return features of shape (len(items), dim). The one method a backend writes."""
        raise NotImplementedError

    # ---------------------------------------------------------------- how it is built (qprobe.registry)
    @classmethod
    def kwargs_from_options(cls, *, model=None, api_base=None, api_model=None, api_key=None, device=None, dtype=None,
                            batch_size=None, layer=None, pooling=None, sentence_model=None, **_) -> dict:
        """Constructor arguments from the generic options of `registry.build` (None: not given).

        This default, for a plugin: the model (``--model``, or ``--api-model`` with ``--api-base``),
        the server and key, device, dtype, batch size, layer and pooling, those given. A built-in
        overrides it to add its defaults and refuse what it cannot use.
        """
        if sentence_model:
            raise QProbeError(f"--sentence-model goes with --embedder sentence, not {cls.__name__}")
        return {k: v for k, v in dict(model=model or api_model, api_base=api_base, api_key=api_key if api_base else None,
                                      device=device, dtype=dtype, batch_size=batch_size, layer=layer,
                                      pooling=pooling).items() if v is not None}

    @classmethod
    def kwargs_from_identity(cls, identity: dict, **options) -> dict:
        """Constructor arguments that rebuild the embedder whose `identity` this is (`registry.rebuild`).

        This default: every identity entry and run-time option the constructor takes by name.
        """
        from qprobe.registry import takes

        return takes(cls, {**{k: v for k, v in identity.items() if k != "kind"}, **options})

    # ---------------------------------------------------------------- shared machinery
    def cache_key(self, prompt: Prompt, completion: str) -> str:
        return make_key(self.identity(), [prompt, completion])

    def embed(
        self,
        items: Sequence[Item],
        cache: Cache | None = None,
        batch_size: int | None = None,
        progress: bool = True,
        desc: str = "embed",
    ) -> np.ndarray:
        """Features for every item, shape (len(items), dim), float32.

        Cached items are not recomputed; every finished batch is committed to the
        cache at once, so a killed run resumes where it stopped.
        """
        bs = batch_size or self.batch_size
        keys = [self.cache_key(p, c) for p, c in items]
        # A backend with `concurrency` > 1 (an API) gets its batch in that many parts on as many
        # threads, and each part is cached as soon as it is back: a killed run never repeats a
        # request that had finished.
        workers = max(1, int(getattr(self, "concurrency", 1)))
        step = max(1, -(-bs // workers))

        def run(idx: list[int]) -> np.ndarray:
            out = np.asarray(self.embed_batch([items[i] for i in idx]), dtype=np.float32)
            if out.ndim != 2 or out.shape[0] != len(idx):
                raise QProbeError(
                    f"{self.identity().get('model')}: embedder returned shape {out.shape} for {len(idx)} inputs"
                )
            if not np.isfinite(out).all():
                raise QProbeError(f"{self.identity().get('model')}: embedder returned NaN or infinite features")
            return out

        def compute(pending: list[int]):
            batches = [pending[s : s + step] for s in range(0, len(pending), step)]
            # after the first failure no further batch starts; batches already running finish
            # and are committed, then the failure is raised
            for idx, out in map_unordered(run, ((idx, idx) for idx in batches), workers, "qprobe-embed"):
                yield list(zip(idx, out))

        # similar lengths batch together: less padding for local models
        found, self.n_computed = cached_map(keys, compute, cache, vectors=True, desc=desc, unit="row",
                                            progress=progress, leave=False,
                                            order=lambda i: len(str(items[i][0])) + len(items[i][1]))
        if not items:
            return np.zeros((0, 0), dtype=np.float32)
        dims = {found[k].shape[0] for k in keys}
        if len(dims) != 1:
            raise QProbeError(f"cache holds features of several sizes {sorted(dims)} for one embedder; clear it with `qprobe cache clear`")
        return np.stack([found[k] for k in keys]).astype(np.float32)


def get_embedder(spec: dict) -> Embedder:
    """Build an embedder from a spec dict: kind (a registered embedder name) plus its constructor's arguments.

    Names come from the ``qprobe.embedders`` entry-point group (see `qprobe.registry`);
    heavy imports happen only when the chosen backend's module is imported. From the CLI's
    generic options: `registry.build`; from a recorded identity: `registry.rebuild`.
    """
    from qprobe.registry import EMBEDDERS, construct

    opts = {k: v for k, v in spec.items() if k != "kind" and v is not None}
    return construct(EMBEDDERS, spec.get("kind", "hf"), opts)

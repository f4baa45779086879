"""The sampler extension point: subclasses implement `sample_stream` only.

A backend yields `Sample` results (or plain dicts with the same fields). The base class
assembles completion rows and stores features taken during sampling under their
embedder's own keys; the cache, resume and progress are `qprobe.cachedmap`'s.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from qprobe.cache import Cache, NullCache, make_key
from qprobe.cachedmap import cached_map
from qprobe.errors import QProbeError

Prompt = Any  # a string, or a list of {"role", "content"} chat messages


@dataclass(frozen=True)
class SampleJob:
    """One completion to draw: the `sample`-th draw for one prompt, with its own seed."""

    prompt: Prompt
    sample: int
    seed: int


@dataclass(frozen=True)
class Captured:
    """Features of (prompt, completion) taken during sampling, as `embedder` would compute them.

    `embedder` is any object with ``cache_key(prompt, completion)`` (an `Embedder`): the
    vector is stored under that key, so a later `embed` with the same embedder finds it.
    """

    embedder: Any
    prompt: Prompt
    completion: str
    vector: np.ndarray


@dataclass
class Sample:
    """One drawn completion, as a backend returns it.

    `fields` holds what a backend reports beyond the text: ``n_tokens`` and
    ``token_logprobs`` (log p of each sampled token at temperature 1), ``prefix_chars``,
    ``n_generated``. `features` are the sampling pass's features (local models only).
    """

    completion: str
    finish_reason: str | None = None
    fields: dict = field(default_factory=dict)
    features: list[Captured] = field(default_factory=list)

    def row(self) -> dict:
        """The JSON fields of a completion row (what is cached and written)."""
        return {"completion": self.completion, "finish_reason": self.finish_reason, **self.fields}

    @classmethod
    def of(cls, result: "Sample | dict") -> "Sample":
        """A backend's result as a `Sample` (a plugin may yield plain dicts)."""
        if isinstance(result, Sample):
            return result
        d = dict(result)
        if not isinstance(d.get("completion"), str):
            raise QProbeError(f"a sampler returned a result without a 'completion' string (fields: {sorted(d)})")
        return cls(d.pop("completion"), d.pop("finish_reason", None), d)


def row_seed(seed: int, prompt_id: Any, sample: int) -> int:
    """A per-row seed, independent of batching and order (so reruns agree)."""
    h = hashlib.sha256(f"{seed}|{prompt_id!r}|{sample}".encode()).digest()
    return int.from_bytes(h[:4], "little")


class Sampler:
    """Draws completions. Settings (temperature, top_p, max_new_tokens, stop) live on the instance."""

    def identity(self) -> dict:
        """Model and every setting that changes the output distribution."""
        raise NotImplementedError

    def sample_stream(self, jobs: Sequence[SampleJob]) -> Iterator[tuple[int, Sample]]:
        """Yield (job index, `Sample`) as each finishes, in any order. The one method a backend writes.

        Results that finish together (one API request) may be yielded as one list of
        (job index, result) pairs; they are then cached atomically. A plain dict with
        ``completion`` and ``finish_reason`` may stand for a `Sample`.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- how it is built (qprobe.registry)
    @classmethod
    def kwargs_from_options(cls, *, model=None, api_base=None, api_model=None, api_key=None, device=None, dtype=None,
                            batch_size=None, temperature=None, top_p=None, max_new_tokens=None, stop=None, capture=None,
                            code_block=False, prefix_every=None, guide=None, **_) -> dict:
        """Constructor arguments from the generic options of `registry.build` (None: not given).

        This default, for a plugin: the model (``--model``, or ``--api-model`` with ``--api-base``),
        the server and key, device, dtype, batch size and the sampling settings, those given; the
        local model's own options (capture, code block, prefixes, guide) are refused. A built-in
        overrides it to add its defaults and refuse what it cannot use.
        """
        cls.refuse_local_options(guide=guide, prefix_every=prefix_every)
        if capture or code_block:
            raise QProbeError("--capture and --code-block work with the hf sampler only")
        return {k: v for k, v in dict(model=model or api_model, api_base=api_base, api_key=api_key if api_base else None,
                                      device=device, dtype=dtype, batch_size=batch_size, temperature=temperature,
                                      top_p=top_p, max_new_tokens=max_new_tokens, stop=stop).items() if v is not None}

    @staticmethod
    def refuse_local_options(*, guide=None, prefix_every=None) -> None:
        """One line for options that need a local model's hidden states."""
        if guide:
            raise QProbeError("--guide needs a local model (--model): it branches rows and reads hidden states, "
                              "which an API does not expose")
        if prefix_every:
            raise QProbeError("--prefix-every works with local models only")

    @classmethod
    def kwargs_from_identity(cls, identity: dict, **options) -> dict:
        """Constructor arguments that rebuild the sampler whose `identity` this is (`registry.rebuild`).

        This default: every identity entry and run-time option the constructor takes by name.
        """
        from qprobe.registry import takes

        return takes(cls, {**{k: v for k, v in identity.items() if k != "kind"}, **options})

    # ---------------------------------------------------------------- shared machinery
    def cache_key(self, job: SampleJob) -> str:
        return make_key(self.identity(), [job.prompt, job.sample, job.seed])

    def sample(
        self,
        prompt_rows: Sequence[dict],
        k: int,
        seed: int = 0,
        cache: Cache | None = None,
        progress: bool = True,
    ) -> list[dict]:
        """k completion rows per prompt row, in prompt order then sample order.

        Each output row is the prompt row plus `sample`, `completion` and `finish_reason`,
        and `n_tokens` and `token_logprobs` (log p of each sampled token at temperature 1)
        where the backend reports them.
        """
        cache = cache if cache is not None else NullCache()
        jobs = [
            SampleJob(row["prompt"], s, row_seed(seed, row.get("prompt_id"), s))
            for row in prompt_rows
            for s in range(k)
        ]
        keys = [self.cache_key(j) for j in jobs]

        def compute(pending: list[int]):
            for item in self.sample_stream([jobs[i] for i in pending]):
                # a backend may yield a list of (index, result) that came back together (one API
                # request with n > 1): they are cached in one transaction, so a kill never keeps
                # half of a finished request
                results = [(local, Sample.of(r)) for local, r in (item if isinstance(item, list) else [item])]
                feats = {c.embedder.cache_key(c.prompt, c.completion): c.vector for _, r in results for c in r.features}
                if feats:  # before the rows: a row in the cache means its features are too
                    cache.put_vectors(feats)
                yield [(pending[local], r.row()) for local, r in results]

        done, self.n_computed = cached_map(keys, compute, cache, desc="sample", unit="completion", progress=progress)
        out = []
        for (row, s), key in zip(((r, s) for r in prompt_rows for s in range(k)), keys):
            # the backend's fields (completion, finish_reason, and where it has them n_tokens, token_logprobs)
            out.append({**row, "sample": s, "finish_reason": None, **done[key]})
        return out


def get_sampler(spec: dict) -> Sampler:
    """Build a sampler from a spec dict: kind (a registered sampler name) plus its constructor's arguments.

    Names come from the ``qprobe.samplers`` entry-point group (see `qprobe.registry`);
    options that are None are left out, so the backend's defaults apply. From the CLI's
    generic options: `registry.build`.
    """
    from qprobe.registry import SAMPLERS, construct

    opts = {k: v for k, v in spec.items() if k != "kind" and v is not None}
    return construct(SAMPLERS, spec.get("kind", "hf"), opts)

"""The sampler extension point: subclasses implement `sample_stream` only.

The base class owns the cache (a finished completion is never requested twice,
and a killed run resumes), the progress bar and the assembly of completion rows.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from tqdm.auto import tqdm

from qprobe.cache import Cache, NullCache, make_key
from qprobe.errors import QProbeError

Prompt = Any  # a string, or a list of {"role", "content"} chat messages


@dataclass(frozen=True)
class SampleJob:
    """One completion to draw: the `sample`-th draw for one prompt, with its own seed."""

    prompt: Prompt
    sample: int
    seed: int


def row_seed(seed: int, prompt_id: Any, sample: int) -> int:
    """A per-row seed, independent of batching and order (so reruns agree)."""
    h = hashlib.sha256(f"{seed}|{prompt_id!r}|{sample}".encode()).digest()
    return int.from_bytes(h[:4], "little")


class Sampler:
    """Draws completions. Settings (temperature, top_p, max_new_tokens, stop) live on the instance."""

    def identity(self) -> dict:
        """Model and every setting that changes the output distribution."""
        raise NotImplementedError

    def sample_stream(self, jobs: Sequence[SampleJob]) -> Iterator[tuple[int, dict]]:
        """Yield (job index, result) as each finishes, in any order.

        result: {"completion": str, "finish_reason": str, ...}. The one method a backend writes.
        Results that finish together (one API request) may be yielded as one list of
        (job index, result) pairs; they are then cached atomically.
        """
        raise NotImplementedError

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
        done = cache.get_json(set(keys))
        first: dict[str, int] = {}  # key -> first job needing it
        for i, key in enumerate(keys):
            if key not in done:
                first.setdefault(key, i)
        pending = list(first.values())
        self.n_computed = 0
        with tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc="sample", unit="completion", disable=not progress) as bar:
            try:
                for item in self.sample_stream([jobs[i] for i in pending]) if pending else ():
                    # a backend may yield a list of (index, result) that came back together (one API
                    # request with n > 1): they are cached in one transaction, so a kill never keeps
                    # half of a finished request
                    group = item if isinstance(item, list) else [item]
                    new, feats = {}, {}
                    for local, result in group:
                        feats.update(result.pop("_features", None) or {})  # features taken during sampling
                        new[keys[pending[local]]] = result
                    if feats:
                        cache.put_vectors(feats)
                    cache.put_json(new)
                    done.update(new)
                    self.n_computed += len(new)
                    bar.update(len(new))
            except QProbeError as e:
                n_cached = len(jobs) - len(pending) + self.n_computed
                if n_cached and not isinstance(cache, NullCache):
                    raise QProbeError(
                        f"{e} [{n_cached} of {len(jobs)} completions are cached; rerun to resume]") from None
                raise
        out = []
        for (row, s), key in zip(((r, s) for r in prompt_rows for s in range(k)), keys):
            res = done[key]
            # the backend's fields (completion, finish_reason, and where it has them n_tokens, token_logprobs)
            out.append({**row, "sample": s, "finish_reason": None, **res})
        return out


def get_sampler(spec: dict) -> Sampler:
    """Build a sampler from a CLI-style spec dict: kind (a registered sampler name) plus its options.

    Names come from the ``qprobe.samplers`` entry-point group (see `qprobe.registry`);
    options that are None are left out, so the backend's defaults apply.
    """
    from qprobe.registry import SAMPLERS, build

    opts = {k: v for k, v in spec.items() if k != "kind" and v is not None}
    return build(SAMPLERS, spec.get("kind", "hf"), opts)

"""Sample completions from an OpenAI-compatible HTTP server (OpenAI, vLLM, llama.cpp, ...).

Jobs for the same prompt are sent together as one request with ``n`` equal to
the number of completions still missing (or `n_per_request`). Servers that
return fewer choices than ``n`` (llama.cpp's server ignores ``n`` and returns
one) are topped up with further requests until every job has its completion;
each request carries the seed of its first job, so a server that honours seeds
but ignores ``n`` still gives different completions for different jobs.

Each request asks for the log-probability of every sampled token (``logprobs``),
kept as ``token_logprobs`` and ``n_tokens`` like the local sampler's rows, when
the server returns them (vLLM does, by default from the raw model distribution,
i.e. at temperature 1; a server that ignores the field just leaves them out, and
one that refuses the request (HTTP 400/422) is asked once again without; if that
works, log-probs stay off for this sampler).

Requests run on `concurrency` threads and results are yielded as each request
finishes, so the base class caches them before any later failure surfaces.
Retries and error messages live in `qprobe.apiclient`.

It does not cache, print or tokenize; the `openai` package is imported only when
an `OpenAISampler` is built.
"""
from __future__ import annotations

import json
from typing import Iterator, Sequence

from qprobe.apiclient import ApiClient, ApiError, BadResponse
from qprobe.pool import TaskPool
from qprobe.errors import QProbeError
from qprobe.samplers.base import Sample, Sampler, SampleJob

MAX_N = 128  # OpenAI's cap on `n`


def _token_logprobs(lp) -> list[float] | None:
    """The sampled tokens' log p from a choice's ``logprobs`` (chat or legacy shape), rounded like the HF sampler's."""
    if not isinstance(lp, dict):
        return None
    if isinstance(lp.get("content"), list):  # chat: [{"token", "logprob", ...}, ...]
        vals = [t.get("logprob") if isinstance(t, dict) else None for t in lp["content"]]
    elif isinstance(lp.get("token_logprobs"), list):  # completions: parallel lists
        vals = lp["token_logprobs"]
    else:
        return None
    if not all(isinstance(v, (int, float)) for v in vals):
        return None
    return [round(max(float(v), -1e4), 4) for v in vals]  # -inf (a token the model gave p 0) stays JSON-safe


class OpenAISampler(Sampler):
    """Completions from ``/chat/completions`` or ``/completions``.

    Parameters
    ----------
    api_base : str
        Base URL with the version prefix, e.g. ``http://127.0.0.1:8080/v1``.
    model : str
        Model name sent with every request.
    api_key : str, optional
        Defaults to ``$OPENAI_API_KEY``; local servers accept any key. Never stored in `identity`.
    mode : {"chat", "completions"}
        Endpoint for string prompts. Chat-message prompts (lists) always go to
        ``/chat/completions``; in chat mode a string prompt becomes one user message.
    temperature, top_p : float
        Sampling settings sent to the server.
    max_new_tokens : int
        Sent as ``max_tokens``.
    stop : str or list of str, optional
        Stop sequences.
    n_per_request : int, optional
        Completions asked for per request; default all that the prompt still needs (at most 128).
    concurrency : int
        Requests in flight at once.
    timeout : float
        Seconds per HTTP attempt.
    max_retries : int
        Retries per request (see `qprobe.apiclient`).
    backoff : float
        First retry delay in seconds (doubles per retry, jittered).
    logprobs : bool
        Ask for the sampled tokens' log-probabilities; turn off for a server that
        rejects the field.
    env_key : bool
        Read a missing `api_key` from ``$OPENAI_API_KEY`` (see `qprobe.apiclient`).
    max_bytes : int, optional
        Largest answer read from the server.

    Attributes set per call (on a copy, as `qprobe serve` does): ``deadline`` (a
    `time.monotonic()` time by which every request must be answered) and ``cancel``
    (a `threading.Event`; set, the requests give up at once). Both default to None.
    """

    deadline: float | None = None
    cancel = None  # threading.Event | None

    def __init__(self, api_base: str, model: str, api_key: str | None = None, mode: str = "chat",
                 temperature: float = 0.8, top_p: float = 0.95, max_new_tokens: int = 256,
                 stop: str | list[str] | None = None, n_per_request: int | None = None,
                 concurrency: int = 4, timeout: float = 60, max_retries: int = 6, backoff: float = 0.5,
                 logprobs: bool = True, env_key: bool = True, max_bytes: int | None = None):
        if mode not in ("chat", "completions"):
            raise QProbeError(f"sampler mode must be 'chat' or 'completions', not {mode!r}")
        if n_per_request is not None and int(n_per_request) < 1:
            raise QProbeError(f"n_per_request must be at least 1, not {n_per_request}")
        self.api_base = api_base.rstrip("/")
        self.model = model
        self.mode = mode
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.max_new_tokens = int(max_new_tokens)
        self.stop = [stop] if isinstance(stop, str) else (list(stop) if stop else None)
        self.n_per_request = None if n_per_request is None else int(n_per_request)
        self.concurrency = int(concurrency)
        self.logprobs = bool(logprobs)
        self.api = ApiClient(self.api_base, api_key, timeout=timeout, max_retries=max_retries, backoff=backoff,
                             env_key=env_key, **({} if max_bytes is None else {"max_bytes": max_bytes}))

    @classmethod
    def kwargs_from_options(cls, *, model=None, api_base=None, api_model=None, api_key=None, temperature=None,
                            top_p=None, max_new_tokens=None, stop=None, capture=None, code_block=False,
                            prefix_every=None, guide=None, timeout=None, max_retries=None, **_) -> dict:
        """The generic options (`registry.build`): ``--api-base`` and ``--api-model`` name the server's model."""
        from qprobe.registry import uses_api

        cls.refuse_local_options(guide=guide, prefix_every=prefix_every)
        if not uses_api(model, api_base, api_model):
            raise QProbeError("--sampler api needs --api-base and --api-model")
        if capture:
            raise QProbeError("--capture works with local models only")
        if code_block:
            raise QProbeError("--code-block works with local models only; give the API a --stop string instead")
        kw = dict(api_base=api_base, model=api_model, api_key=api_key, timeout=timeout, max_retries=max_retries,
                  temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, stop=stop)
        return {k: v for k, v in kw.items() if v is not None}

    @property
    def n_requests(self) -> int:
        """HTTP attempts made so far, retries included."""
        return self.api.n_requests

    def identity(self) -> dict:
        return {
            "kind": "api", "api_base": self.api_base, "model": self.model, "mode": self.mode,
            "temperature": self.temperature, "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens, "stop": self.stop,
        }

    # ------------------------------------------------------------------ one request
    def _body(self, prompt, n: int, seed: int) -> tuple[str, dict]:
        """(endpoint path, JSON body) for `n` completions of `prompt`."""
        body = {"model": self.model, "temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_new_tokens, "n": n, "seed": seed}
        if self.stop:
            body["stop"] = self.stop
        if isinstance(prompt, str) and self.mode == "completions":
            if self.logprobs:
                body["logprobs"] = 1  # legacy API: top-1 alternatives, and the sampled token's own log p
            return "/completions", {**body, "prompt": prompt}
        if self.logprobs:
            body["logprobs"] = True  # chat API: the sampled tokens' log p, no alternatives
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return "/chat/completions", {**body, "messages": messages}

    @staticmethod
    def _check(data) -> None:
        """Reject bodies without at least one usable choice (retried by `post_json`)."""
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices:
            raise BadResponse("no choices")
        for c in choices:
            if not isinstance(c, dict) or not (isinstance(c.get("text"), str) or isinstance(c.get("message"), dict)):
                raise BadResponse("a choice has neither text nor message")
            if "text" not in c and not isinstance(c["message"].get("content"), (str, type(None))):
                raise BadResponse(f"a choice's message content is a {type(c['message']['content']).__name__}, "
                                  "not a string")

    def _request(self, jobs: list[SampleJob], stop) -> list[dict]:
        """Up to len(jobs) results for jobs that share one prompt (fewer if the server says so)."""
        path, body = self._body(jobs[0].prompt, len(jobs), jobs[0].seed)
        post = dict(check=self._check, stop=stop, deadline=self.deadline, cancel=self.cancel)
        try:
            data = self.api.post_json(path, body, **post)
        except ApiError as e:
            if "logprobs" not in body or e.status not in (400, 422):
                raise
            # the server refused the request: if it is the log-probs (e.g. a llama.cpp model without
            # logits_all), the same request without them works, and they stay off
            self.logprobs = False
            path, body = self._body(jobs[0].prompt, len(jobs), jobs[0].seed)
            try:
                data = self.api.post_json(path, body, **post)
            except ApiError:
                self.logprobs = True  # not the log-probs: the first error is the one to report
                raise e from None
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0)
        out = []
        for c in choices[: len(jobs)]:
            text = c["text"] if "text" in c else (c["message"].get("content") or "")
            lps = _token_logprobs(c.get("logprobs"))
            out.append(Sample(text, c.get("finish_reason"),
                              {} if lps is None else {"n_tokens": len(lps), "token_logprobs": lps}))
        return out

    # ------------------------------------------------------------------ the stream
    def sample_stream(self, jobs: Sequence[SampleJob]) -> Iterator[list[tuple[int, Sample]]]:
        """Yield one list of (job index, `Sample`) per request as requests finish.

        Raises
        ------
        QProbeError
            When a request fails for good; results finished before that were yielded first.
        """
        by_prompt: dict[str, list[int]] = {}  # canonical prompt -> job indices
        for i, job in enumerate(jobs):
            by_prompt.setdefault(json.dumps(job.prompt, sort_keys=True), []).append(i)
        chunk = min(self.n_per_request or MAX_N, MAX_N)
        with TaskPool(self.concurrency) as pool:
            def submit(idx: list[int]) -> None:
                for s in range(0, len(idx), chunk):
                    part = idx[s : s + chunk]
                    pool.submit(part, self._request, [jobs[i] for i in part], pool.stop)

            for idx in by_prompt.values():
                submit(idx)
            for idx, results in pool.results():
                yield list(zip(idx, results))  # one request's choices are cached together
                if len(results) < len(idx):  # fewer choices than n: top up the rest
                    submit(idx[len(results):])

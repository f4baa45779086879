"""Where `qprobe serve` gets its k candidates and their features.

- `LocalBackend`: a local transformers model through the continuous-batching
  `HFSampler`. One worker thread drains the requests waiting in its queue into
  one `sample_stream` call (requests with the same sampling settings share a
  batch), so concurrent requests are decoded together. When the probe was
  trained on this model's hidden states (its recorded extractor is
  ``hf`` / this model), the features are captured during sampling at no extra
  cost; otherwise the probe's own extractor embeds the chosen candidates.
- `UpstreamBackend`: an OpenAI-compatible server through `OpenAISampler`
  (asks for ``n = k`` and tops up servers that ignore ``n``), with the
  request's unused parameters passed through; features come from the probe's
  own extractor. It asks for the tokens' log-probs only when told to (the
  probe's signals need them).

A request cancelled while waiting leaves the queue; one cancelled while its
batch decodes stops that batch once every request in it is gone (the local
sampler cannot drop single rows from a running batch), and an upstream request
stops asking for top-ups and stops reading the answer in flight. Upstream calls
run on the backend's own thread pool, one thread per request it may hold
(`workers`, the server's queue bound), never on asyncio's small default pool.

Keys: the key given for the upstream goes to the upstream only. A probe's
recorded ``api`` extractor names a host read from a file; it gets a key only
when the user gave one for that host (`extractor_key`, or the upstream's key
when the host is the upstream itself), never ``$OPENAI_API_KEY`` by default.
Not here: HTTP, auth, the choice (see `app.py`, `service.py`).
"""
from __future__ import annotations

import asyncio
import copy
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qprobe.apiclient import redact_url
from qprobe.errors import QProbeError
from qprobe.pool import Stopped
from qprobe.hfmodel import DEFAULT_MODEL
from qprobe.samplers.base import SampleJob

from qprobe.serve.protocol import ServeError


@dataclass
class Candidate:
    """One of the k completions drawn for a request."""

    text: str
    finish_reason: str
    features: np.ndarray | None = None  # (n_features,), float32
    n_tokens: int | None = None
    token_logprobs: list[float] | None = None  # log p of each kept token, where the backend has them


@dataclass
class Draw:
    """What one request asks a backend for: k completions of one prompt with these settings."""

    prompt: Any  # a string, or a list of {"role", "content"} messages
    seeds: list[int]  # one per candidate: k = len(seeds)
    temperature: float
    top_p: float
    max_tokens: int
    stop: list[str]
    extra: dict = field(default_factory=dict)  # parameters the server does not read (upstream only)
    deadline: float | None = None  # time.monotonic() by which the backend must give up (set on admission)

    def settings(self) -> tuple:
        return self.temperature, self.top_p, self.max_tokens, tuple(self.stop)


def extractor_host(identity: dict | None) -> str | None:
    """The host a probe's recorded ``api`` extractor sends every prompt and completion to (credentials cut)."""
    if identity and identity.get("kind") == "api":
        return redact_url(str(identity.get("api_base", "")))
    return None


def key_for_extractor(identity: dict | None, extractor_key: str | None, upstream_base: str | None,
                      upstream_key: str | None) -> str | None:
    """The key an ``api`` extractor may get: the one the user gave for it, else the upstream's when
    it is the same host; else None (no key: the host came from a file)."""
    if not identity or identity.get("kind") != "api":
        return None
    if extractor_key is not None:
        return extractor_key
    same = upstream_base is not None and str(identity.get("api_base", "")).rstrip("/") == upstream_base.rstrip("/")
    return upstream_key if same else None


class Backend:
    """A source of candidates. Subclasses set `features` and implement `draw`."""

    features = "extractor"  # where the probe's features come from: "sampling pass" or "extractor"
    token_logprobs = False  # whether candidates carry their token log-probs (the probe's log-prob signals)
    extractor_host: str | None = None  # where an api extractor sends the candidates (said at start-up)
    extractor_key_sent = False  # whether that host gets a key

    def start(self) -> None:
        """Load what the backend needs (called once, before the first request)."""

    def close(self) -> None:
        """Release threads and connections."""

    def check_prompt(self, prompt, max_tokens: int) -> int | None:
        """Number of prompt tokens where the backend knows it; raise ServeError(413) if it cannot fit."""
        return None

    def ignored(self, extra: dict) -> list[str]:
        """Request parameters this backend drops (the upstream backend passes them on)."""
        return sorted(extra)

    async def draw(self, d: Draw) -> list[Candidate]:
        """k candidates with their features, in seed order."""
        raise NotImplementedError


class _Embedding:
    """The probe's own extractor, one batch at a time (a local model is not shared between threads)."""

    def __init__(self, identity: dict | None, api_key: str | None = None):
        if not identity:
            raise QProbeError("the probe records no feature extractor, so the server cannot embed completions; "
                              "retrain it with `qprobe train` on features made by `qprobe embed`")
        from qprobe.registry import EMBEDDERS, rebuild

        try:
            self.embedder = rebuild(EMBEDDERS, identity, api_key=api_key, max_retries=2, env_key=False)
        except QProbeError as e:
            raise QProbeError(f"the probe's feature extractor cannot be rebuilt here: {e}") from None
        self.host = extractor_host(identity)
        self.key_sent = self.host is not None and api_key is not None
        self._lock = threading.Lock()

    def fill(self, prompt, cands: list[Candidate]) -> list[Candidate]:
        with self._lock:
            X = self.embedder.embed([(prompt, c.text) for c in cands], progress=False)
        for c, x in zip(cands, X):
            c.features = x
        return cands


# ------------------------------------------------------------------------------ local model
@dataclass(eq=False)
class _Work:
    draw: Draw
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancelled: threading.Event = field(default_factory=threading.Event)
    results: list = field(default_factory=list)
    left: int = 0

    def settle(self, value=None, error: BaseException | None = None) -> None:
        def _set():
            if not self.future.done():
                self.future.set_exception(error) if error is not None else self.future.set_result(value)

        self.loop.call_soon_threadsafe(_set)


class LocalBackend(Backend):
    """k candidates per request from a local model, concurrent requests decoded in one batch.

    Candidates keep the sampler's ``token_logprobs`` and ``n_tokens`` (the probe's log-prob signals).

    Parameters
    ----------
    model : str
        As for `HFSampler` (`DEFAULT_MODEL` by default).
    extractor : dict or None
        The probe's recorded extractor. ``hf`` on this model: captured during
        sampling. None: the last layer at the last token is captured (the
        default of `qprobe embed`). Anything else: computed by that extractor.
    batch_size : int
        Rows decoded together by the sampler.
    max_batch_requests : int
        Requests drained from the queue into one batch.
    api_key : str, optional
        Key for an ``api`` extractor's host (the user gave it for that host).
    """

    token_logprobs = True

    def __init__(self, model: str = DEFAULT_MODEL, extractor: dict | None = None, batch_size: int = 32,
                 max_batch_requests: int = 64, device: str | None = None, dtype: str | None = None,
                 api_key: str | None = None):
        self.model, self.batch_size, self.max_batch_requests = model, int(batch_size), int(max_batch_requests)
        self.device, self.dtype = device, dtype
        self.extractor, self.api_key = extractor, api_key
        if not extractor or (extractor.get("kind") == "hf" and extractor.get("model") == model):
            ex = extractor or {"layer": -1, "pooling": "last"}
            self.capture, self.features, self._embedding = [(int(ex["layer"]), ex["pooling"])], "sampling pass", None
            trained = ex.get("dtype")  # the probe's features were computed in this dtype: serve computes the same
            if trained and dtype is None:
                self.dtype = trained
            elif trained and str(dtype).removeprefix("torch.") != trained:
                raise QProbeError(f"--dtype {dtype}: the probe was trained on {trained} features of {model}; "
                                  f"serve computes them in {trained} (leave --dtype out)")
        else:
            self.capture, self.features = None, "extractor"
            self._embedding = _Embedding(extractor, api_key)
            self.extractor_host, self.extractor_key_sent = self._embedding.host, self._embedding.key_sent
        self._q: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._tok_lock = threading.Lock()
        self.n_batches = 0  # sample_stream calls made (a test of batching reads it)

    def start(self) -> None:
        from qprobe.hfmodel import load_model, norm_layer

        model, self._tok = load_model(self.model, self.device, self.dtype)
        self._context = getattr(model.config, "max_position_embeddings", None) or 10**9
        if self.capture:
            norm_layer(model, self.capture[0][0])  # a layer the model lacks fails now, not per request
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="qprobe-serve-sampler", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def hidden_size(self) -> int:
        from qprobe.hfmodel import load_model

        return int(load_model(self.model, self.device, self.dtype)[0].config.hidden_size)

    def check_prompt(self, prompt, max_tokens: int) -> int:
        from qprobe.hfmodel import prompt_ids

        try:
            with self._tok_lock:
                n = len(prompt_ids(self._tok, prompt))
        except QProbeError as e:
            raise ServeError(400, str(e)) from None
        if n + max_tokens > self._context:
            raise ServeError(413, f"the prompt has {n} tokens; with max_tokens {max_tokens} that exceeds the model's "
                                  f"context of {self._context} tokens", code="context_length_exceeded")
        return n

    async def draw(self, d: Draw) -> list[Candidate]:
        if self._thread is None:
            raise ServeError(503, "the local model is not started")
        loop = asyncio.get_running_loop()
        work = _Work(d, loop, loop.create_future(), left=len(d.seeds))
        work.results = [None] * len(d.seeds)
        self._q.put(work)
        try:
            cands = await work.future
        except asyncio.CancelledError:
            work.cancelled.set()  # leaves the queue, or stops its batch once the batch has no one left
            raise
        if self._embedding is not None:
            cands = await asyncio.to_thread(self._embedding.fill, d.prompt, cands)
        return cands

    # -------------------------------------------------------------- the worker thread
    def _run(self) -> None:
        while True:
            first = self._q.get()
            if first is None:
                return
            batch, stop = [first], False
            while len(batch) < self.max_batch_requests:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            groups: dict[tuple, list[_Work]] = {}  # sampling settings -> requests decoded together
            for w in batch:
                if not w.cancelled.is_set():
                    groups.setdefault(w.draw.settings(), []).append(w)
            for works in groups.values():
                self._sample(works)
            if stop:
                return

    def _sample(self, works: list[_Work]) -> None:
        from qprobe.samplers.hf import HFSampler

        d = works[0].draw
        sampler = HFSampler(self.model, temperature=d.temperature, top_p=d.top_p, max_new_tokens=d.max_tokens,
                            stop=d.stop, batch_size=self.batch_size, capture=self.capture, device=self.device,
                            dtype=self.dtype)
        jobs, owner = [], []  # job index -> (request, candidate index)
        for w in works:
            for i, seed in enumerate(w.draw.seeds):
                jobs.append(SampleJob(w.draw.prompt, i, seed))
                owner.append((w, i))
        self.n_batches += 1
        stream = sampler.sample_stream(jobs)
        try:
            for item in stream:
                for j, res in item if isinstance(item, list) else [item]:
                    w, i = owner[j]
                    w.results[i] = Candidate(res.completion, res.finish_reason or "stop",
                                             res.features[0].vector if res.features else None,
                                             res.fields.get("n_tokens"), res.fields.get("token_logprobs"))
                    w.left -= 1
                    if w.left == 0:
                        w.settle(w.results)
                if all(w.left == 0 or w.cancelled.is_set() for w in works):
                    break  # everyone still waiting has gone away: stop decoding
        except Exception as e:  # noqa: BLE001 - answered to every request of the batch
            err = ServeError(500, f"sampling failed: {e}")
            for w in works:
                if w.left:
                    w.settle(error=err)
        finally:
            stream.close()
        for w in works:
            if w.left:  # stopped early: its client is gone, but never leave a future hanging
                w.settle(error=ServeError(499, "request cancelled"))


# ------------------------------------------------------------------------------ upstream server
def upstream_error(e: QProbeError) -> ServeError:
    """Map an `ApiClient` failure to the status a client should see, from its data, not its text.

    The client's message names the status and the upstream without its credentials;
    the upstream's own error body is never echoed (it may repeat the request or
    say more about the upstream than a client should learn).
    """
    from qprobe.apiclient import ApiError

    if not isinstance(e, ApiError):
        return ServeError(502, "upstream failed", code="upstream_unavailable")
    if e.status in (400, 422):  # the upstream refused the request itself (a passed-through parameter)
        return ServeError(400, f"the upstream refused the request (HTTP {e.status})", code="upstream_bad_request")
    if e.timed_out:
        return ServeError(504, "the upstream did not answer in time", code="upstream_timeout")
    if e.status is not None:
        return ServeError(502, f"the upstream answered HTTP {e.status}", code="upstream_unavailable")
    return ServeError(502, f"the upstream failed: {_SAY.get(e.reason, 'no usable answer')}",
                      code="upstream_unavailable")


_SAY = {"unreachable": "cannot reach it", "too_large": "its answer is too large",
        "unusable": "its answer was unusable"}


class UpstreamBackend(Backend):
    """k candidates per request from an OpenAI-compatible server; features from the probe's extractor.

    Parameters
    ----------
    api_base, api_model : str
        The upstream server (with its version prefix) and the model name it serves.
    extractor : dict
        The probe's recorded extractor, rebuilt to embed the candidates.
    api_key : str, optional
        Key for the upstream server (and for an ``api`` extractor on the same base).
        None: ``$OPENAI_API_KEY`` (the user named this host).
    extractor_key : str, optional
        Key for an ``api`` extractor on another host (the user gave it for that host).
    timeout, max_retries : float, int
        Per HTTP attempt (the whole answer), and retries per upstream request.
    concurrency : int
        Upstream requests in flight per client request (top-ups).
    workers : int
        Client requests served at once (the server's queue bound): the size of the
        thread pool upstream calls run on.
    max_bytes : int
        Largest upstream answer read.
    logprobs : bool
        Ask the upstream for the sampled tokens' log-probs (only when the probe's signals
        need them); candidates then carry them where the upstream returns them.
    """

    features = "extractor"

    def __init__(self, api_base: str, api_model: str, extractor: dict | None, api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 2, concurrency: int = 4, workers: int = 64,
                 extractor_key: str | None = None, max_bytes: int = 32 << 20, logprobs: bool = False):
        from qprobe.samplers.openai_api import OpenAISampler

        class _Passthrough(OpenAISampler):
            extra: dict = {}

            def _body(self, prompt, n, seed):
                path, body = super()._body(prompt, n, seed)
                return path, {**self.extra, **body}  # the server's own fields (n, seed, prompt) win

        self.api_base = api_base.rstrip("/")
        self._base = _Passthrough(self.api_base, api_model, api_key=api_key, timeout=timeout,
                                  max_retries=max_retries, concurrency=concurrency, backoff=0.25,
                                  max_bytes=max_bytes, logprobs=logprobs)
        self.token_logprobs = bool(logprobs)
        self._embedding = _Embedding(extractor, key_for_extractor(extractor, extractor_key, self.api_base, api_key))
        self.extractor_host, self.extractor_key_sent = self._embedding.host, self._embedding.key_sent
        self.workers = int(workers)
        self._pool: ThreadPoolExecutor | None = None

    def ignored(self, extra: dict) -> list[str]:
        return []

    def start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="qprobe-upstream")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._base.api.close()

    async def draw(self, d: Draw) -> list[Candidate]:
        if self._pool is None:
            self.start()
        gone = threading.Event()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._draw, d, gone)
        except asyncio.CancelledError:
            gone.set()  # no further top-ups, and the answer in flight is dropped at its next piece
            raise

    def _draw(self, d: Draw, gone: threading.Event) -> list[Candidate]:
        if gone.is_set() or (d.deadline is not None and time.monotonic() >= d.deadline):
            raise ServeError(499, "request cancelled")  # it waited in the pool past its caller
        s = copy.copy(self._base)  # shares the HTTP client; settings are per request
        s.temperature, s.top_p, s.max_new_tokens, s.stop = d.temperature, d.top_p, d.max_tokens, d.stop or None
        s.mode = "chat" if isinstance(d.prompt, list) else "completions"
        s.extra, s.deadline, s.cancel = d.extra, d.deadline, gone
        out: list[Candidate | None] = [None] * len(d.seeds)
        jobs = [SampleJob(d.prompt, i, seed) for i, seed in enumerate(d.seeds)]
        try:
            for item in s.sample_stream(jobs):
                for j, res in item if isinstance(item, list) else [item]:
                    out[j] = Candidate(res.completion, res.finish_reason or "stop", None, res.fields.get("n_tokens"),
                                       res.fields.get("token_logprobs"))
                if gone.is_set():
                    raise ServeError(499, "request cancelled")
        except QProbeError as e:
            raise upstream_error(e) from None
        except Stopped:
            raise ServeError(499, "request cancelled") from None
        try:
            return self._embedding.fill(d.prompt, out)
        except QProbeError:
            raise ServeError(502, "embedding the candidates with the probe's extractor failed",
                             code="extractor_failed") from None

"""What `qprobe serve` does with one request, without HTTP: `Service.plan` checks it, `Service.complete` answers it.

`plan(kind, body)` turns a decoded JSON body into a `Plan` (k, beta, the
backend's `Draw`, the caller's tests) or raises `ServeError` with the status a
client should see; it is pure and synchronous. `complete(plan)` admits the
request (503 past `max_queue` in flight), draws k candidates from the backend,
runs the request's tests against each (in the sandbox), scores them with the
probe (its features, and its signals where it was trained with some: see
`inputs.py`) and picks n among the candidates that pass the tests and the
probe's cascade (`choose_preferring`), all within the request's deadline (504
past it). A probe whose signals serve cannot give is refused when the Service
is made. The app (`app.py`) reads bodies, routes, streams and answers
errors; it cancels `complete` when the client goes away, which frees the
request's place and its backend work.

Not here: HTTP, auth and browser checks (`app.py`, `guard.py`), the wire format
(`protocol.py`), where candidates come from (`backends.py`).
"""
from __future__ import annotations

import asyncio
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qprobe.errors import QProbeError
from qprobe.samplers.base import row_seed
from qprobe.serve import protocol as P
from qprobe.serve import inputs
from qprobe.serve.backends import Backend, Candidate, Draw
from qprobe.serve.rerank import Choice, choose_preferring
from qprobe.serve.tests import check_tests, run_tests


@dataclass
class ServeConfig:
    """Server-wide defaults and limits; a request may override k, beta and the sampling settings within them."""

    model_id: str  # the name clients send as `model` (any other is a 404)
    k: int = 4
    beta: float = 0.1
    max_k: int = 32
    max_tokens: int = 256  # the default and the largest a request may ask for
    temperature: float = 0.8
    top_p: float = 0.95
    max_queue: int = 64  # requests in flight (waiting or sampling) before 503
    max_request_bytes: int = 1 << 20
    max_prompt_chars: int = 100_000
    api_key: str | None = None  # bearer token clients must send; None: no auth
    deadline: float = 300.0  # seconds from admission to answer, whatever the backend does (else 504)
    max_stops: int = 16  # stop strings per request (each is matched against every candidate as it grows)
    max_stop_chars: int = 200  # characters per stop string
    max_tests: int = 64  # tests per request (a list of asserts), see `qprobe.serve.tests`
    max_test_chars: int = 50_000  # characters of test code per request
    test_timeout: float = 5.0  # seconds per candidate's test run in the sandbox
    test_workers: int = 4  # candidates tested at once (per request)
    # where clients may reach the server from (see `guard.py`): the bound address, and these names
    bind_host: str = "127.0.0.1"
    allowed_hosts: tuple = ()
    body_timeout: float = 30.0  # seconds to receive a request body (else 408)


@dataclass
class Plan:
    """One checked request: what to draw and how to choose."""

    kind: str  # "chat" | "completions"
    draw: Draw
    k: int
    beta: float
    n: int
    seed: int | None
    stream: bool = False
    with_usage: bool = False  # stream_options.include_usage
    candidates: bool = False  # return every candidate's text in `qprobe`
    tests: list[str] | str | None = None  # the caller's tests, run against each candidate
    ignored: list[str] = field(default_factory=list)  # parameters the backend drops


@dataclass
class Answer:
    """The chosen completions and the `qprobe` object that says why."""

    id: str
    texts: list[str]
    reasons: list[str]
    info: dict
    usage: dict | None


def _finite(x: float) -> float | None:
    """A float for a JSON answer: None where it is not finite (JSON has no Infinity or NaN)."""
    return float(x) if math.isfinite(x) else None


class Service:
    """The request logic of `qprobe serve` over a backend and a probe.

    Parameters
    ----------
    backend : Backend
    probe : QProbe
        Fitted; scores the candidates' features (and the signals it records).
    config : ServeConfig

    Raises
    ------
    QProbeError
        The probe records a signal this server cannot give it (see `inputs.check_probe`).
    """

    def __init__(self, backend: Backend, probe, config: ServeConfig):
        inputs.check_probe(probe, backend)
        self.backend, self.probe, self.config = backend, probe, config
        self.inflight = 0  # requests admitted and not finished; only touched on the event loop

    # ------------------------------------------------------------------ plan
    def plan(self, kind: str, data: Any) -> Plan:
        """Check a decoded request body; raise `ServeError` (400/404/413) naming the field at fault."""
        config = self.config
        req = P.parse(P.ChatRequest if kind == "chat" else P.CompletionRequest, data)
        if req.model != config.model_id:
            raise P.ServeError(404, f"model {req.model!r} not found; this server serves {config.model_id!r}",
                               code="model_not_found", param="model")
        refused = sorted(set(req.extra()) & P.REFUSED)
        if refused:
            raise P.ServeError(400, f"{refused[0]} is not accepted here: it would get around this server's limits "
                                    "on k and max_tokens (ask for k instead)", param=refused[0])
        k = config.k if req.k is None else req.k
        if k > config.max_k:
            raise P.ServeError(400, f"k {k} exceeds this server's limit of {config.max_k}", param="k")
        if req.n > k:
            raise P.ServeError(400, f"n {req.n} exceeds k {k}: n returns the n best of k candidates", param="n")
        beta = config.beta if req.beta is None else float(req.beta)
        max_tokens = req.max_tokens
        if kind == "chat" and req.max_completion_tokens is not None:
            max_tokens = req.max_completion_tokens
        max_tokens = config.max_tokens if max_tokens is None else max_tokens
        if max_tokens > config.max_tokens:
            raise P.ServeError(400, f"max_tokens {max_tokens} exceeds this server's limit of {config.max_tokens}",
                               param="max_tokens")
        stops = req.stops()
        if len(stops) > config.max_stops:
            raise P.ServeError(400, f"stop has {len(stops)} strings; this server takes at most {config.max_stops}",
                               param="stop")
        if any(len(s) > config.max_stop_chars for s in stops) or any(not s for s in stops):
            raise P.ServeError(400, f"each stop string must have 1..{config.max_stop_chars} characters", param="stop")
        prompt = req.prompt() if kind == "chat" else req.text()
        size = sum(len(m["content"]) for m in prompt) if kind == "chat" else len(prompt)
        if size > config.max_prompt_chars:
            raise P.ServeError(413, f"the prompt has {size} characters; this server takes at most "
                                    f"{config.max_prompt_chars}", code="prompt_too_large")
        tests = check_tests(req.tests, config.max_tests, config.max_test_chars)
        inputs.check_request(self.probe, tests)
        # one seed per candidate: a request's seed makes its candidates (and its choice) repeatable
        seeds = ([row_seed(req.seed, "serve", i) for i in range(k)] if req.seed is not None
                 else [secrets.randbits(32) for _ in range(k)])
        temperature = config.temperature if req.temperature is None else req.temperature
        top_p = config.top_p if req.top_p is None else req.top_p
        extra = {key: v for key, v in req.extra().items() if key not in P.CONSUMED}
        draw = Draw(prompt, seeds, temperature, top_p, max_tokens, stops, extra)
        return Plan(kind, draw, k, beta, req.n, req.seed, stream=req.stream,
                    with_usage=bool((req.stream_options or {}).get("include_usage")), candidates=req.candidates,
                    tests=tests, ignored=self.backend.ignored(req.extra()))

    # ------------------------------------------------------------------ complete
    async def complete(self, plan: Plan) -> Answer:
        """Draw, test, score and choose for one planned request.

        Raises ServeError 503 when `max_queue` requests are in flight, 504 past the
        deadline, and the backend's own errors (400/413/502/...). Cancelling the
        coroutine (the client went away) cancels the backend's work.
        """
        config = self.config
        if self.inflight >= config.max_queue:
            raise P.ServeError(503, f"server busy: {config.max_queue} requests in flight; retry later",
                               code="queue_full", headers={"Retry-After": "1"})
        self.inflight += 1  # no lock: only the event loop's thread runs this, and there is no await in between
        try:
            plan.draw.deadline = time.monotonic() + config.deadline  # the backend's threads stop there too
            async with asyncio.timeout(config.deadline):
                return await self._complete(plan)
        except TimeoutError:
            raise P.ServeError(504, f"the request did not finish within this server's deadline of "
                                    f"{config.deadline:g} s", code="deadline_exceeded") from None
        finally:
            self.inflight -= 1

    async def _complete(self, plan: Plan) -> Answer:
        prompt_tokens = await asyncio.to_thread(self.backend.check_prompt, plan.draw.prompt, plan.draw.max_tokens)
        cands = await self.backend.draw(plan.draw)
        outcomes = None
        if plan.tests is not None:
            outcomes = await run_tests([c.text for c in cands], plan.tests, self.config.test_timeout,
                                       self.config.test_workers)
        X = inputs.probe_inputs(self.probe, np.stack([c.features for c in cands]).astype(np.float32), cands,
                                outcomes)
        q = self._score(X)
        mask = None
        if outcomes is not None or self.probe.cascade is not None:
            mask = inputs.choice_mask(self.probe, X, outcomes)
        rng = np.random.default_rng(None if plan.seed is None else row_seed(plan.seed, "choose", 0))
        pick = choose_preferring(q, plan.n, plan.beta, rng, mask)
        return self._answer(plan, cands, X, q, pick, outcomes, prompt_tokens)

    def _score(self, X: np.ndarray) -> np.ndarray:
        try:
            self.probe.check_features(X.shape[1])
            q = self.probe.predict(X)
        except QProbeError as e:
            raise P.ServeError(500, f"the probe cannot score these features: {e}") from None
        if not np.isfinite(q).all():
            raise P.ServeError(502, "the probe's scores of these candidates are not finite (features out of range)",
                               code="bad_features")
        return q

    def _answer(self, plan: Plan, cands: list[Candidate], X: np.ndarray, q: np.ndarray, pick: Choice, outcomes,
                prompt_tokens) -> Answer:
        signals = tuple(self.probe.signals or ())
        S = X[:, X.shape[1] - len(signals):]  # the signal columns are the last ones

        def _signals(i):
            return {"signals": {s: _finite(float(S[i, j])) for j, s in enumerate(signals)}} if signals else {}

        info = {"k": plan.k, "beta": _finite(plan.beta), "chosen": pick.indices.tolist(), "kl": _finite(pick.kl),
                "features": self.backend.features,
                "candidates": [{"index": i, "q": _finite(q[i]), "weight": float(pick.weights[i]),
                                "finish_reason": c.finish_reason,
                                **({"tests": outcomes[i]} if outcomes is not None else {}),
                                **_signals(i),
                                **({"text": c.text} if plan.candidates else {})}
                               for i, c in enumerate(cands)]}
        if signals:
            info["signals"] = list(signals)
        if self.probe.cascade is not None:
            info["cascade"] = self.probe.cascade
        if outcomes is not None:
            rule = "passing candidates preferred; the probe chooses among them"
            if self.probe.cascade is not None and self.probe.cascade != inputs.FROM_TESTS:
                rule = (f"passing candidates preferred, then those at their maximum of {self.probe.cascade!r}; "
                        "the probe chooses among them")
            info["tests"] = {"passed": int(sum(o["passed"] for o in outcomes)), "of": len(outcomes), "rule": rule}
        if plan.ignored:
            info["ignored_params"] = plan.ignored
        usage = None
        if prompt_tokens is not None and all(c.n_tokens is not None for c in cands):
            n_gen = sum(c.n_tokens for c in cands)  # every candidate was generated, not only the chosen
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_gen, "total_tokens": prompt_tokens + n_gen}
        return Answer(P.new_id(plan.kind), [cands[i].text for i in pick.indices],
                      [cands[i].finish_reason for i in pick.indices], info, usage)

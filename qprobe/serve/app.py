"""The ASGI app of `qprobe serve`: OpenAI-compatible routes that answer with the probe's choice among k samples.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``.
Each completion request is read (at most `max_request_bytes`), checked, admitted
if fewer than `max_queue` requests are in flight (else 503), handed to the
backend for k candidates with features, scored by the probe, and answered with
the n choices drawn by softmax(Q / beta) (see `rerank.py`), whole or as a
server-sent-event stream. A client that disconnects while its candidates are
drawn has its request cancelled, which frees its place.

Not here: where candidates come from (`backends.py`), the wire format
(`protocol.py`), the command line (`qprobe/cli.py`).
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures (Request) at run time

import asyncio
import contextlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from qprobe.errors import QProbeError
from qprobe.samplers.base import row_seed
from qprobe.serve import protocol as P
from qprobe.serve.backends import Backend, Draw
from qprobe.serve.rerank import choose


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


def create_app(backend: Backend, probe, config: ServeConfig):
    """The FastAPI app serving `probe`'s choice among `backend`'s candidates.

    The backend is started when the app starts and closed when it stops.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    state = {"inflight": 0}
    lock = threading.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(backend.start)
        try:
            yield
        finally:
            await asyncio.to_thread(backend.close)

    app = FastAPI(title="qprobe serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend, app.state.probe, app.state.config = backend, probe, config

    @app.exception_handler(P.ServeError)
    async def _serve_error(request, e: P.ServeError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = "not_found" if e.status_code == 404 else None
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(P.ServeError(e.status_code, msg, code=code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, e):
        return JSONResponse(P.ServeError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise P.ServeError(401, "missing or incorrect API key (send it as 'Authorization: Bearer KEY')",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": 0,
                                            "owned_by": "qprobe"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, "completions")

    async def _complete(request: Request, kind: str):
        authorize(request)
        req = P.parse(P.ChatRequest if kind == "chat" else P.CompletionRequest, await _read_json(request))
        if req.model != config.model_id:
            raise P.ServeError(404, f"model {req.model!r} not found; this server serves {config.model_id!r}",
                               code="model_not_found", param="model")
        draw, k, beta = _plan(req, kind)
        prompt_tokens = await asyncio.to_thread(backend.check_prompt, draw.prompt, draw.max_tokens)
        with lock:
            if state["inflight"] >= config.max_queue:
                raise P.ServeError(503, f"server busy: {config.max_queue} requests in flight; retry later",
                                   code="queue_full", headers={"Retry-After": "1"})
            state["inflight"] += 1
        try:
            cands = await _draw_unless_gone(request, backend.draw(draw))
        finally:
            with lock:
                state["inflight"] -= 1
        if cands is None:  # the client went away: nobody to answer
            return Response(status_code=499)
        X = np.stack([c.features for c in cands]).astype(np.float32)
        try:
            probe.check_features(X.shape[1])
            q = probe.predict(X)
        except QProbeError as e:
            raise P.ServeError(500, f"probe cannot score these features: {e}") from None
        rng = np.random.default_rng(None if req.seed is None else row_seed(req.seed, "choose", 0))
        pick = choose(q, req.n, beta, rng)
        info = {"k": k, "beta": beta, "chosen": pick.indices.tolist(), "kl": pick.kl,
                "features": backend.features,
                "candidates": [{"index": i, "q": float(q[i]), "weight": float(pick.weights[i]),
                                "finish_reason": c.finish_reason, **({"text": c.text} if req.candidates else {})}
                               for i, c in enumerate(cands)]}
        ignored = backend.ignored(req.extra())
        if ignored:
            info["ignored_params"] = ignored
        texts = [cands[i].text for i in pick.indices]
        reasons = [cands[i].finish_reason for i in pick.indices]
        usage = None
        if prompt_tokens is not None and all(c.n_tokens is not None for c in cands):
            n_gen = sum(c.n_tokens for c in cands)  # every candidate was generated, not only the chosen
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_gen, "total_tokens": prompt_tokens + n_gen}
        rid = P.new_id(kind)
        if not req.stream:
            return P.response(kind, rid, config.model_id, texts, reasons, info, usage)
        from sse_starlette import EventSourceResponse

        with_usage = bool((req.stream_options or {}).get("include_usage"))
        events = P.chunks(kind, rid, config.model_id, texts, reasons, info, usage if with_usage else None)

        async def stream():
            for ev in events:
                yield {"data": json.dumps(ev)}
            yield {"data": "[DONE]"}

        return EventSourceResponse(stream(), sep="\n")

    def _plan(req, kind) -> tuple[Draw, int, float]:
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
        prompt = req.prompt() if kind == "chat" else req.text()
        size = sum(len(m["content"]) for m in prompt) if kind == "chat" else len(prompt)
        if size > config.max_prompt_chars:
            raise P.ServeError(413, f"the prompt has {size} characters; this server takes at most "
                                    f"{config.max_prompt_chars}", code="prompt_too_large")
        # one seed per candidate: a request's seed makes its candidates (and its choice) repeatable
        seeds = ([row_seed(req.seed, "serve", i) for i in range(k)] if req.seed is not None
                 else [secrets.randbits(32) for _ in range(k)])
        temperature = config.temperature if req.temperature is None else req.temperature
        top_p = config.top_p if req.top_p is None else req.top_p
        extra = {key: v for key, v in req.extra().items() if key not in P.CONSUMED}
        return Draw(prompt, seeds, temperature, top_p, max_tokens, req.stops(), extra), k, beta

    async def _read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_request_bytes:
            raise P.ServeError(413, f"request body of {declared} bytes exceeds {config.max_request_bytes}",
                               code="request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > config.max_request_bytes:
                raise P.ServeError(413, f"request body exceeds {config.max_request_bytes} bytes",
                                   code="request_too_large")
        try:
            return json.loads(body)
        except ValueError as e:
            raise P.ServeError(400, f"the request body is not JSON ({e})") from None

    return app


async def _draw_unless_gone(request, coro):
    """Await `coro`, or cancel it and return None when the client disconnects first."""
    task = asyncio.ensure_future(coro)

    async def gone():
        while True:  # the body is read: the next message is the disconnect
            if (await request.receive())["type"] == "http.disconnect":
                return

    watch = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        return None
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()


# ------------------------------------------------------------------------------ running it
class BackgroundServer:
    """Run an app with uvicorn on a thread (tests, benchmarks, notebooks); `url` is the base with /v1.

    Use as a context manager; the server stops when the block exits.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, timeout: float = 120.0):
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, name="qprobe-serve", daemon=True)
        self.timeout = timeout
        self.url = ""

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + self.timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise QProbeError("the server did not start (see the log above)")
            time.sleep(0.05)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}/v1"
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)

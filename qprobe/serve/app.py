"""The ASGI app of `qprobe serve`: OpenAI-compatible routes and error handlers around a `Service`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``.
Each completion request passes the browser checks of `guard.HostGuard`, is
authorized, its body read (at most `max_request_bytes`, within `body_timeout`)
and decoded (`protocol.decode`), planned and completed by the `Service`
(see `service.py`), and answered whole or as a server-sent-event stream. A
client that disconnects while its request is being completed has it cancelled,
which frees its place and its backend work.

Every error is an OpenAI-style JSON body. An unexpected exception is a 500
that says only its type; the details go to the server's log.

Not here: the request logic (`service.py`), where candidates come from
(`backends.py`), the wire format (`protocol.py`), the command line (`qprobe/cli.py`).
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures (Request) at run time

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time

from qprobe.errors import QProbeError
from qprobe.serve import protocol as P
from qprobe.serve.backends import Backend
from qprobe.serve.guard import HostGuard, HostRule, uvicorn_config
from qprobe.serve.service import Answer, ServeConfig, Service

__all__ = ["create_app", "ServeConfig", "BackgroundServer"]
log = logging.getLogger("qprobe.serve")


def create_app(backend: Backend, probe, config: ServeConfig):
    """The FastAPI app serving `probe`'s choice among `backend`'s candidates.

    The backend is started when the app starts and closed when it stops.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    service = Service(backend, probe, config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(backend.start)
        try:
            yield
        finally:
            await asyncio.to_thread(backend.close)

    app = FastAPI(title="qprobe serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend, app.state.probe, app.state.config, app.state.service = backend, probe, config, service
    app.add_middleware(HostGuard, rule=HostRule(config.bind_host, config.allowed_hosts))

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
        log.exception("internal error answering %s %s", request.method, request.url.path)
        return JSONResponse(P.ServeError(500, f"internal error ({type(e).__name__}); see the server's log").body(),
                            status_code=500)

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
        plan = service.plan(kind, P.decode(await _read_body(request)))
        answer = await _unless_gone(request, service.complete(plan))
        if answer is None:  # the client went away: nobody to answer
            return Response(status_code=499)
        if not plan.stream:
            return JSONResponse(_response(kind, answer))
        from sse_starlette import EventSourceResponse

        events = P.chunks(kind, answer.id, config.model_id, answer.texts, answer.reasons, answer.info,
                          answer.usage if plan.with_usage else None)

        async def stream():
            for ev in events:
                yield {"data": json.dumps(ev, allow_nan=False)}
            yield {"data": "[DONE]"}

        return EventSourceResponse(stream(), sep="\n")

    def _response(kind: str, answer: Answer) -> dict:
        return P.response(kind, answer.id, config.model_id, answer.texts, answer.reasons, answer.info, answer.usage)

    async def _read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_request_bytes:
            raise P.ServeError(413, f"request body of {declared} bytes exceeds {config.max_request_bytes}",
                               code="request_too_large")
        body = bytearray()
        try:
            async with asyncio.timeout(config.body_timeout):
                async for part in request.stream():
                    body += part
                    if len(body) > config.max_request_bytes:
                        raise P.ServeError(413, f"request body exceeds {config.max_request_bytes} bytes",
                                           code="request_too_large")
        except TimeoutError:
            raise P.ServeError(408, f"the request body did not arrive within {config.body_timeout:g} s",
                               code="request_timeout", headers={"Connection": "close"}) from None
        return bytes(body)

    return app


async def _unless_gone(request, coro):
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

    Use as a context manager; the server stops when the block exits. `limits` go to
    `guard.uvicorn_config` (header_timeout, keep_alive, max_connections).
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, timeout: float = 120.0, **limits):
        import uvicorn

        self._server = uvicorn.Server(uvicorn_config(app, host, port, log_level="warning", **limits))
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

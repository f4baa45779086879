"""What stands between `qprobe serve` and the network: browser checks, and connections that cannot pile up.

- `HostGuard` (ASGI middleware): a request's ``Host`` must name the bound
  address, a loopback name, or one of ``--allowed-host``; an ``Origin``, where a
  browser sends one, must name one of the same (a web page on another site,
  or a DNS-rebinding name, gets 403); a POST must be ``application/json``
  (415), which a browser cannot send across sites without asking first. A
  server bound to every address (0.0.0.0, ::) also takes any IP literal as
  Host: DNS rebinding needs a name, never an address.
- `uvicorn_config`: uvicorn's own limits (keep-alive timeout, a connection
  limit past which requests get 503, a cap on header size), plus
  `_Guarded`, uvicorn's h11 protocol with a timer uvicorn lacks: a connection
  must finish sending a request's headers within `header_timeout` seconds of
  opening (or of its previous response), and connections past `max_connections`
  are closed as they open. A request body must arrive within the app's
  `body_timeout` (408, see `app.py`).

What it does not do: TLS, rate limits per client, or authentication (`app.py`
checks the bearer token).
"""
from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD = ("0.0.0.0", "::", "")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _host_of(value: str) -> str | None:
    """The host name of a Host header value (``name``, ``name:port``, ``[v6]:port``), lower-cased."""
    try:
        host = urlsplit("//" + value.strip()).hostname
    except ValueError:
        return None
    return host.lower() if host else None


class HostRule:
    """Which names a request may use to reach this server."""

    def __init__(self, bind_host: str, allowed: tuple | list = ()):
        bind = bind_host.strip("[]").lower()
        self.any_ip = bind in WILDCARD
        self.names = {n.lower().strip("[]") for n in (*LOOPBACK_NAMES, *allowed)}
        if not self.any_ip:
            self.names.add(bind)

    def allows(self, host: str | None) -> bool:
        if not host:
            return False
        return host in self.names or (self.any_ip and _is_ip(host))


def _refuse(status: int, message: str, code: str):
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


class HostGuard:
    """ASGI middleware: Host / Origin against a `HostRule`, and JSON-only POSTs."""

    def __init__(self, app, rule: HostRule):
        self.app, self.rule = app, rule

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.decode("latin-1"), v.decode("latin-1"))
        host = _host_of(headers.get("host", ""))
        if not self.rule.allows(host):
            return await _refuse(403, "this server does not answer to that Host; start it with --allowed-host "
                                      "NAME to allow a name", "host_not_allowed")(scope, receive, send)
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin) if origin != "null" else None
            if parts is None or parts.scheme not in ("http", "https") or not self.rule.allows(
                    (parts.hostname or "").lower()):
                return await _refuse(403, "cross-origin requests are refused (Origin is not this server)",
                                     "origin_not_allowed")(scope, receive, send)
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return await _refuse(415, "send the body as Content-Type: application/json",
                                     "unsupported_media_type")(scope, receive, send)
        return await self.app(scope, receive, send)


# ------------------------------------------------------------------------------ connections
def _guarded_protocol(header_timeout: float, max_connections: int):
    """uvicorn's h11 protocol with a header deadline and a hard connection cap."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class _Guarded(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self.transport.close()  # connection_lost removes it
                return
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def _arm(self):
            armed_for = self.cycle  # a new request replaces the cycle; the same one means no new headers
            self.loop.call_later(header_timeout, self._headers_due, armed_for)

        def _headers_due(self, armed_for):
            if self.cycle is armed_for and not self.transport.is_closing():
                self.transport.close()

    return _Guarded


def uvicorn_config(app, host: str, port: int, *, header_timeout: float = 10.0, keep_alive: int = 5,
                   max_connections: int = 256, log_level: str = "info"):
    """A `uvicorn.Config` for `app` with the limits above (used by the CLI and `BackgroundServer`)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                          http=_guarded_protocol(header_timeout, max_connections), timeout_keep_alive=keep_alive,
                          limit_concurrency=max_connections, h11_max_incomplete_event_size=64 * 1024,
                          server_header=False)

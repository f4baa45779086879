"""One JSON POST to an OpenAI-compatible server, with our own retries, deadline and size cap.

`ApiClient.post_json` sends a request over HTTP (the `httpx` that ships with the
official `openai` client) and returns the decoded JSON body. It retries, with exponential backoff and jitter,
on everything a flaky server or network does: 429 (honouring Retry-After),
408/409/5xx, timeouts, dropped or refused connections, a body that is not JSON,
and a body that the caller's `check` rejects (too few embeddings, no choices).
When retries run out it raises a one-line `ApiError` that carries its data
(`.status`, `.timed_out`, `.url` without credentials, `.detail`: the start of the
server's error body); callers match on those, never on the message. A server
that cannot be reached at all reads "cannot reach API at URL: ...".

Limits, so that one server cannot hold a caller forever or fill its memory:

- `timeout` bounds one whole attempt (connect, headers and every byte of the body),
  not one socket read: a server that sends one byte a second still times out;
- `post_json(deadline=...)` bounds the request, retries and waits included;
- the body is read in pieces and refused past `max_bytes`;
- `post_json(cancel=...)` gives up between pieces when the caller has gone (a
  silent socket is given up at the attempt's timeout or the deadline, whichever
  comes first).

Keys: `api_key` is sent as given. ``$OPENAI_API_KEY`` is read only when
`api_key` is None *and* `env_key` is true: a client built for a host read from a
file (a probe's recorded extractor) passes ``env_key=False`` and sends no key
unless the user named one for that host.

Why not the `openai` client's own retries: they cover status codes and
connection errors but not a 200 with a malformed or short body, their sleeps are
not interruptible, and they read a whole body before anyone can cap it. Every
attempt goes through the loop below, which also counts attempts (`n_requests`)
and stops retrying at once when a sibling request has failed for good (`stop`
event), so a dead server costs one retry budget, not one per worker.

This module does not know about samplers, embedders or caches. `openai` and its
HTTP client are imported only when an `ApiClient` is built, so `import qprobe`
stays light.
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from qprobe.errors import QProbeError, require_extra
from qprobe.pool import Stopped

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
MAX_RETRY_AFTER = 120.0  # seconds; a longer Retry-After is clipped to this
MAX_BYTES = 256 << 20  # default cap on one answer (an embedding batch of 128 x 8,192 floats is ~20 MiB)


class BadResponse(Exception):
    """A 2xx response whose body is unusable (not JSON, wrong shape, too few items): retried."""


class ApiError(QProbeError):
    """A request that failed for good. Match on the attributes; the message is for people.

    Attributes
    ----------
    status : int or None
        The HTTP status of the last answer; None when there was none (unreachable,
        timed out, cut off, unusable or oversized body).
    timed_out : bool
        The last attempt ran out of time (the attempt's timeout or the deadline).
    url : str
        The endpoint, without user, password or query string.
    detail : str
        The start of the server's error body (for people; may echo the request).
    reason : str
        What went wrong last: ``status`` (an HTTP error status), ``timeout``,
        ``unreachable`` (no connection, or it broke), ``unusable`` (a 2xx body
        that is not JSON or fails the caller's check), ``too_large``.
    """

    def __init__(self, message: str, status: int | None = None, timed_out: bool = False, url: str = "",
                 detail: str = "", reason: str = "status"):
        super().__init__(message)
        self.status, self.timed_out, self.url, self.detail, self.reason = status, timed_out, url, detail, reason


def redact_url(url: str) -> str:
    """`url` without user:password@ and without its query string (either may hold a key)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:  # not a URL we can take apart: say nothing of it
        return "<unparsable URL>"


def _retry_after(headers: Any) -> float | None:
    """Seconds asked for by `Retry-After` / `retry-after-ms`, or None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, min(float(value) * scale, MAX_RETRY_AFTER))
        except ValueError:
            pass  # an HTTP date: rare for 429; fall back to our own backoff
    return None


def _short(text: Any, limit: int = 200) -> str:
    """One line of at most `limit` characters, for error messages."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


class _Attempt(Exception):
    """One failed attempt: `last` is its message; retried when `retry`."""

    def __init__(self, last: str, reason: str, status: int | None = None, timed_out: bool = False,
                 retry: bool = True, retry_after: float | None = None, detail: str = ""):
        super().__init__(last)
        self.last, self.reason, self.status, self.timed_out, self.retry = last, reason, status, timed_out, retry
        self.retry_after, self.detail = retry_after, detail


class ApiClient:
    """A thread-safe JSON poster for one OpenAI-compatible base URL.

    Parameters
    ----------
    api_base : str
        Base URL including the version prefix, e.g. ``http://127.0.0.1:8080/v1``.
    api_key : str, optional
        Sent as ``Authorization: Bearer``. None: ``$OPENAI_API_KEY`` when `env_key`,
        else a placeholder (local servers accept any key).
    timeout : float
        Seconds for one whole HTTP attempt (connect, send, headers and the whole body).
    max_retries : int
        Extra attempts after the first, per request.
    backoff : float
        First retry delay in seconds; it doubles per attempt, up to `max_backoff`,
        and each delay is jittered to between half and all of its value.
    max_backoff : float
        Cap on one delay (a server's Retry-After may ask for more, up to 120 s).
    env_key : bool
        Whether a missing `api_key` may be read from ``$OPENAI_API_KEY``. False for
        a host the user did not name (one read from a file).
    max_bytes : int
        Largest answer body read; a longer one fails the request (not retried).
    """

    def __init__(self, api_base: str, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 6, backoff: float = 0.5, max_backoff: float = 30.0, *,
                 env_key: bool = True, max_bytes: int = MAX_BYTES):
        require_extra("api", ("openai",))
        try:  # openai >= 3 ships httpx2; older releases use httpx
            import httpx2 as http
        except ImportError:  # pragma: no cover
            import httpx as http
        self._http = http
        self.api_base = api_base.rstrip("/")
        self.shown_base = redact_url(self.api_base)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_bytes = int(max_bytes)
        if api_key is None and env_key:
            api_key = os.environ.get("OPENAI_API_KEY") or None
        self.sends_key = api_key is not None
        key = api_key or "sk-no-key-needed"
        self.client = http.Client(headers={"Authorization": f"Bearer {key}", "Accept": "application/json"},
                                  timeout=self.timeout, follow_redirects=False, trust_env=False)
        self.n_requests = 0  # HTTP attempts made, retries included
        self._lock = threading.Lock()

    def close(self) -> None:
        self.client.close()

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        base = min(self.max_backoff, self.backoff * 2**attempt)
        jittered = base * (0.5 + 0.5 * random.random())
        return max(jittered, retry_after) if retry_after is not None else jittered

    def post_json(self, path: str, body: dict, check: Callable[[Any], None] | None = None,
                  stop: threading.Event | None = None, *, deadline: float | None = None,
                  cancel: threading.Event | None = None) -> Any:
        """POST `body` as JSON to ``api_base + path`` and return the decoded response.

        Parameters
        ----------
        path : str
            Endpoint below the base URL, e.g. ``"/chat/completions"``.
        body : dict
            The JSON request body.
        check : callable, optional
            Called with the decoded body; raises `BadResponse` to have it retried.
        stop : threading.Event, optional
            When set (by another request that failed for good), give up instead of retrying.
        deadline : float, optional
            `time.monotonic()` by which the request must be answered, retries included.
        cancel : threading.Event, optional
            When set (the caller has gone), give up at once, also in the middle of a body.

        Raises
        ------
        ApiError
            A non-retryable status (400, 401, 404, ...), an oversized answer, the
            deadline, or retries exhausted.
        """
        where = f"API at {self.shown_base}{path}"
        url = self.shown_base + path
        stops = [e for e in (stop, cancel) if e is not None]
        last = _Attempt("", "unreachable")
        for attempt in range(self.max_retries + 1):
            if attempt and any(e.is_set() for e in stops):
                raise Stopped(last.last)
            with self._lock:
                self.n_requests += 1
            try:
                data = self._attempt(path, body, where, deadline, cancel)
                try:
                    if check is not None:
                        check(data)
                except BadResponse as e:
                    raise _Attempt(f"{where} returned an unusable response: {e}", "unusable") from None
                return data
            except _Attempt as e:
                last = e
            if not last.retry or attempt == self.max_retries:
                break
            wait = self.delay(attempt, last.retry_after)
            if deadline is not None and time.monotonic() + wait >= deadline:
                last = _Attempt(f"{where} did not answer by the request's deadline", "timeout", timed_out=True)
                break
            if stops:
                if _wait_any(stops, wait):
                    raise Stopped(last.last)
            else:
                time.sleep(wait)
        tries = attempt + 1
        suffix = f" (gave up after {tries} attempt{'s' * (tries != 1)})" if last.retry else ""
        raise ApiError(last.last + suffix, status=last.status, timed_out=last.timed_out, url=url,
                       detail=last.detail, reason=last.reason)

    def _attempt(self, path: str, body: dict, where: str, deadline: float | None,
                 cancel: threading.Event | None) -> Any:
        """One HTTP attempt: the decoded body, or an `_Attempt` saying why not."""
        http = self._http
        now = time.monotonic()
        ends = now + self.timeout if deadline is None else min(now + self.timeout, deadline)
        if ends <= now:
            raise _Attempt(f"{where} did not answer by the request's deadline", "timeout", timed_out=True,
                           retry=False)
        timed_out = f"{where} did not answer within {self.timeout:g} s"
        if deadline is not None and ends == deadline:
            timed_out = f"{where} did not answer by the request's deadline"
        try:
            raw = bytearray()
            with self.client.stream("POST", self.api_base + path, json=body,
                                    timeout=http.Timeout(max(0.001, ends - now))) as resp:
                for piece in resp.iter_bytes():
                    raw += piece
                    if len(raw) > self.max_bytes:
                        raise _Attempt(f"{where} sent an answer over {self.max_bytes} bytes", "too_large",
                                       retry=False)
                    if time.monotonic() > ends:
                        raise _Attempt(timed_out, "timeout", timed_out=True,
                                       retry=deadline is None or ends < deadline)
                    if cancel is not None and cancel.is_set():
                        raise Stopped("the caller went away")
                status, headers = resp.status_code, resp.headers
        except http.TimeoutException:
            raise _Attempt(timed_out, "timeout", timed_out=True, retry=deadline is None or ends < deadline) from None
        except (http.TransportError, http.StreamError) as e:
            cause = e.__cause__ or e
            raise _Attempt(f"cannot reach API at {self.shown_base}: {_short(cause) or type(cause).__name__}",
                           "unreachable") from None
        text = raw.decode("utf-8", errors="replace")
        if status >= 400 or status < 200:
            detail = _short(_error_message(text) or text or f"HTTP {status}")
            raise _Attempt(f"{where} answered HTTP {status}: {detail}", "status", status=status, detail=detail,
                           retry=status in RETRY_STATUS, retry_after=_retry_after(headers))
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as e:
            raise _Attempt(f"{where} returned an unusable response: malformed JSON ({_short(e, 80)})",
                           "unusable") from None


def _error_message(text: str) -> str | None:
    """The ``error.message`` of an OpenAI-style error body, if it has one."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    err = data.get("error") if isinstance(data, dict) else None
    msg = err.get("message") if isinstance(err, dict) else (err if isinstance(err, str) else None)
    return msg if isinstance(msg, str) else None


def _wait_any(events: list[threading.Event], seconds: float) -> bool:
    """Sleep up to `seconds`; True as soon as any of `events` is set."""
    end = time.monotonic() + seconds
    while True:
        if any(e.is_set() for e in events):
            return True
        left = end - time.monotonic()
        if left <= 0:
            return False
        events[0].wait(min(left, 0.05))

"""One JSON POST to an OpenAI-compatible server, with our own retries.

`ApiClient.post_json` sends a request through the official `openai` client and
returns the decoded JSON body. It retries, with exponential backoff and jitter,
on everything a flaky server or network does: 429 (honouring Retry-After),
408/409/5xx, timeouts, dropped or refused connections, a body that is not JSON,
and a body that the caller's `check` rejects (too few embeddings, no choices).
When retries run out it raises one-line `QProbeError`s; a server that cannot be
reached at all reads "cannot reach API at URL: ...".

Why not the client's own retries: they cover status codes and connection errors
but not a 200 with a malformed or short body, and their sleeps are not
interruptible. So the `openai` client is built with ``max_retries=0`` and every
HTTP attempt goes through the loop below, which also counts attempts
(`n_requests`) and stops retrying at once when a sibling request has failed for
good (`stop` event), so a dead server costs one retry budget, not one per worker.

This module does not know about samplers, embedders or caches. `openai` is
imported only when an `ApiClient` is built, so `import qprobe` stays light.
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
from typing import Any, Callable

from qprobe.errors import QProbeError, require_extra
from qprobe.pool import Stopped

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
MAX_RETRY_AFTER = 120.0  # seconds; a longer Retry-After is clipped to this


class BadResponse(Exception):
    """A 2xx response whose body is unusable (not JSON, wrong shape, too few items): retried."""


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


class ApiClient:
    """A thread-safe JSON poster for one OpenAI-compatible base URL.

    Parameters
    ----------
    api_base : str
        Base URL including the version prefix, e.g. ``http://127.0.0.1:8080/v1``.
    api_key : str, optional
        Defaults to ``$OPENAI_API_KEY``, else a placeholder (local servers accept any key).
    timeout : float
        Seconds for one HTTP attempt (connect + read).
    max_retries : int
        Extra attempts after the first, per request.
    backoff : float
        First retry delay in seconds; it doubles per attempt, up to `max_backoff`,
        and each delay is jittered to between half and all of its value.
    max_backoff : float
        Cap on one delay (a server's Retry-After may ask for more, up to 120 s).
    """

    def __init__(self, api_base: str, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 6, backoff: float = 0.5, max_backoff: float = 30.0):
        require_extra("api", ("openai",))
        import openai
        try:  # openai >= 3 ships httpx2; older releases use httpx
            import httpx2 as http
        except ImportError:  # pragma: no cover
            import httpx as http
        self._openai = openai
        self._response_type = http.Response
        self.api_base = api_base.rstrip("/")
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        key = api_key or os.environ.get("OPENAI_API_KEY") or "sk-no-key-needed"
        self.client = openai.OpenAI(base_url=self.api_base, api_key=key, timeout=self.timeout, max_retries=0)
        self.n_requests = 0  # HTTP attempts made, retries included
        self._lock = threading.Lock()

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        base = min(self.max_backoff, self.backoff * 2**attempt)
        jittered = base * (0.5 + 0.5 * random.random())
        return max(jittered, retry_after) if retry_after is not None else jittered

    def post_json(self, path: str, body: dict, check: Callable[[Any], None] | None = None,
                  stop: threading.Event | None = None) -> Any:
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

        Raises
        ------
        QProbeError
            A non-retryable status (400, 401, 404, ...), or retries exhausted.
        """
        openai = self._openai
        where = f"API at {self.api_base}{path}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt and stop is not None and stop.is_set():
                raise Stopped(last)
            with self._lock:
                self.n_requests += 1
            retry_after = None
            try:
                resp = self.client.post(path, body=body, cast_to=self._response_type)
                try:
                    data = json.loads(resp.text)
                except ValueError as e:
                    raise BadResponse(f"malformed JSON ({e})") from None
                if check is not None:
                    check(data)
                return data
            except BadResponse as e:
                last = f"{where} returned an unusable response: {e}"
            except openai.APIStatusError as e:
                detail = _short(getattr(e, "body", None) or e.message)
                last = f"{where} answered HTTP {e.status_code}: {detail}"
                if e.status_code not in RETRY_STATUS:
                    raise QProbeError(last) from None
                retry_after = _retry_after(e.response.headers)
            except openai.APITimeoutError:
                last = f"{where} did not answer within {self.timeout:g} s"
            except openai.APIConnectionError as e:
                cause = e.__cause__ or e
                last = f"cannot reach API at {self.api_base}: {_short(cause) or type(cause).__name__}"
            if attempt == self.max_retries:
                break
            wait = self.delay(attempt, retry_after)
            if stop is not None:
                if stop.wait(wait):
                    raise Stopped(last)
            else:
                time.sleep(wait)
        tries = self.max_retries + 1
        suffix = f" (gave up after {tries} attempt{'s' * (tries != 1)})"
        raise QProbeError(last + suffix)

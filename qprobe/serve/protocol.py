"""The OpenAI wire format as `qprobe serve` speaks it: request models, error bodies, responses and stream chunks.

Requests are validated with pydantic models that keep unknown fields
(`model_extra`), so parameters this server does not use can be passed on to an
upstream server. Responses are plain dicts shaped like OpenAI's, plus one extra
top-level object, ``qprobe``, that an OpenAI client ignores.

Not here: routing, auth, the backends, the choice itself (see `app.py`,
`backends.py`, `rerank.py`).
"""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# fields this server reads; everything else a client sends is "extra" (passed to an upstream server)
CONSUMED = {"model", "messages", "prompt", "n", "max_tokens", "max_completion_tokens", "temperature", "top_p",
            "stop", "stream", "stream_options", "seed", "k", "beta", "candidates", "tests"}
# fields refused outright: passed to an upstream they would get around --max-k and --max-tokens
# (more samples per request, or tokens past max_tokens / the model's end of text)
REFUSED = {"best_of", "min_tokens", "ignore_eos", "use_beam_search", "n_predict", "max_new_tokens", "min_p_tokens"}


class ServeError(Exception):
    """An error answered as an OpenAI-style JSON body with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
             404: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
             415: "invalid_request_error", 500: "server_error", 502: "upstream_error", 503: "server_error",
             504: "timeout_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    n: int = Field(1, ge=1, le=1 << 20)
    max_tokens: Optional[int] = Field(None, ge=1, le=1 << 30)
    temperature: Optional[float] = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    seed: Optional[int] = Field(None, ge=-(1 << 63), lt=1 << 64)
    # qprobe's own knobs (the openai client sends them with extra_body=...)
    k: Optional[int] = Field(None, ge=1, le=1 << 20)
    beta: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    candidates: bool = False  # also return the text of every candidate in `qprobe`
    tests: Union[list, str, None] = None  # run against each candidate (see `qprobe.serve.tests`)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def extra(self) -> dict:
        """Parameters this server does not read, as the client sent them."""
        return dict(self.model_extra or {})


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[dict], None] = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=1 << 30)

    def prompt(self) -> list[dict]:
        """The messages as {"role", "content"} with text content (content parts joined)."""
        out = []
        for i, m in enumerate(self.messages):
            content = m.content
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ServeError(400, f"messages[{i}]: only text content parts are supported, "
                                              f"got type {part.get('type')!r}", param=f"messages.{i}.content")
                    parts.append(part["text"])
                content = "".join(parts)
            out.append({"role": m.role, "content": content or ""})
        return out


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ServeError(400, f"prompt: give one prompt per request (got a list of {len(self.prompt)})",
                                 param="prompt")
            return self.prompt[0]
        return self.prompt


MAX_DEPTH = 32  # nesting of a request body: OpenAI's bodies need 5 (messages -> content parts -> part)


def decode(raw: bytes) -> Any:
    """The JSON of a request body, or a 400: not JSON, nested past `MAX_DEPTH`, or a string that is
    not Unicode text (a lone surrogate escape such as ``"\\ud800"`` cannot be encoded again)."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ServeError(400, f"the request body is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:
        raise ServeError(400, f"the request body is not JSON ({str(e)[:80]})") from None
    todo = [(data, 1)]  # (value, depth): iterative, so no depth can overflow the stack here
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise ServeError(400, f"the request body is nested deeper than {MAX_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
            for key, v in items:
                if key is not None:
                    todo.append((key, depth))
                todo.append((v, depth + 1))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ServeError(400, "the request body has a string that is not valid Unicode (a lone surrogate)"
                                 ) from None
    return data


def parse(model: type[_Request], data: Any) -> _Request:
    """Validate a decoded JSON body; a bad field is a 400 naming it."""
    if not isinstance(data, dict):
        raise ServeError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ())) or None
        raise ServeError(400, f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")), param=loc) from None


# ------------------------------------------------------------------------------ responses
Kind = Literal["chat", "completions"]


def new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def response(kind: Kind, rid: str, model: str, texts: list[str], reasons: list[str], info: dict,
             usage: dict | None) -> dict:
    """A whole (non-streamed) chat.completion or text_completion with the `qprobe` object."""
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    out = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
           "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    out["qprobe"] = info
    return out


_PIECE = re.compile(r"\s*\S+\s*|\s+")  # a word with the white space around it: pieces join back exactly


def pieces(text: str, words: int = 4) -> list[str]:
    """Cut `text` into stream pieces of a few words each; "".join(pieces(t)) == t."""
    ws = _PIECE.findall(text)
    return ["".join(ws[i:i + words]) for i in range(0, len(ws), words)]


def chunks(kind: Kind, rid: str, model: str, texts: list[str], reasons: list[str], info: dict,
           usage: dict | None) -> list[dict]:
    """The stream of an already chosen answer: the `qprobe` object rides on the first chunk."""
    created = int(time.time())
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(i, piece=None, reason=None, role=False):
        if kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece is not None else {})
            c = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            c = {"index": i, "text": piece or "", "finish_reason": reason, "logprobs": None}
        return {"id": rid, "object": obj, "created": created, "model": model, "choices": [c]}

    out = []
    for i, (text, reason) in enumerate(zip(texts, reasons)):
        if kind == "chat":
            out.append(chunk(i, role=True))
        out += [chunk(i, p) for p in pieces(text)]
        out.append(chunk(i, reason=reason))
    out[0]["qprobe"] = info
    if usage is not None:
        out.append({"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage})
    return out

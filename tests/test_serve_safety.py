"""`qprobe serve` under attack (issue 24): deadlines, keys, connections, browsers, error bodies, bounds, request tests.

Fast: the choice in log space, and the request logic through `Service` without
HTTP (plan's limits, decode, the deadline). Slow (a server, or the sandbox's
subprocesses): the HTTP and connection guards over a stub backend; request tests
in the sandbox; the upstream path against the in-repo stub server with hostile
answers (one byte a second, 64 MiB, a number for content, an error body and a
URL with a password); where keys go; request tests on the embedded SmolLM2,
including tests that hang or fork.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

from qprobe.probe import QProbe  # noqa: E402
from qprobe.serve import BackgroundServer, ServeConfig, build, create_app  # noqa: E402
from qprobe.serve.backends import Backend, Candidate  # noqa: E402
from qprobe.serve.protocol import ServeError, decode  # noqa: E402
from qprobe.serve.rerank import choose, choose_preferring  # noqa: E402
from qprobe.serve.service import Service  # noqa: E402
from qprobe.testing.servers import StubServer  # noqa: E402

DIM = 8


def fit_probe(dim: int = DIM, embedder: dict | None = None) -> QProbe:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, dim)).astype(np.float32)
    probe = QProbe("mse", beta=0.5, alpha=1.0).fit(X, X @ rng.standard_normal(dim))
    probe.embedder_ = embedder
    return probe


class CodeBackend(Backend):
    """Candidate i is `texts[i]` (code), feature row i of an identity-like matrix scaled by `qs`."""

    features = "stub"

    def __init__(self, texts, feats=None):
        self.texts = texts
        self.feats = feats if feats is not None else np.random.default_rng(1).standard_normal((32, DIM))
        self.hold = None

    async def draw(self, d):
        while self.hold is not None and not self.hold.is_set():
            await asyncio.sleep(0.01)
        return [Candidate(self.texts[i % len(self.texts)], "stop", self.feats[i].astype(np.float32), 3)
                for i in range(len(d.seeds))]


def service(**kw) -> Service:
    config = ServeConfig(model_id="qp", k=4, beta=0.0, max_k=8, max_tokens=64, **kw)
    return Service(CodeBackend(["x"]), fit_probe(), config)


def chat(**kw) -> dict:
    return {"model": "qp", "messages": [{"role": "user", "content": "hi"}], **kw}


# ------------------------------------------------------------------ the choice in log space
def test_n_best_at_a_small_beta_follow_q_not_index_order():
    q = np.array([-2.0, -2.9, 3.2, 0.7])  # the case: weights of all but index 2 underflow to 0
    for seed in range(20):
        assert choose(q, 3, 0.003, np.random.default_rng(seed)).indices.tolist() == [2, 3, 0]


def test_preferring_passing_candidates_and_the_no_passer_fallback():
    q = np.array([3.0, 1.0, 2.0, 0.0])
    rng = np.random.default_rng(0)
    c = choose_preferring(q, 1, 0.0, rng, [False, True, True, False])
    assert c.indices.tolist() == [2] and c.weights.tolist() == [0, 0, 1, 0]  # best passer, not the best overall
    assert choose_preferring(q, 1, 0.0, rng, [False] * 4).indices.tolist() == [0]  # none passes: all stay
    c = choose_preferring(q, 3, 0.0, rng, [False, True, False, False])  # fewer passers than n: then the probe
    assert c.indices.tolist() == [1, 0, 2]


# ------------------------------------------------------------------ plan: the request logic without HTTP
@pytest.mark.parametrize("body, status, param", [
    (chat(best_of=100), 400, "best_of"),
    (chat(min_tokens=10_000), 400, "min_tokens"),
    (chat(ignore_eos=True), 400, "ignore_eos"),
    (chat(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    (chat(stop=["x" * 201]), 400, "stop"),
    (chat(beta=float("inf")), 400, "beta"),  # what json.loads makes of 1e999
    (chat(temperature=float("nan")), 400, "temperature"),
    (chat(tests=[f"assert {i}" for i in range(65)]), 400, "tests"),
    (chat(tests="x" * 50_001), 413, "tests"),
    (chat(tests=[1, 2]), 400, "tests"),
    (chat(seed=10**30), 400, "seed"),
])
def test_plan_refuses_values_past_the_limits(body, status, param):
    with pytest.raises(ServeError) as e:
        service().plan("chat", body)
    assert (e.value.status, e.value.param) == (status, param)


def test_plan_without_http():
    plan = service().plan("chat", chat(n=2, seed=3, stop=["\n\n"], tests=["assert f() == 1"], presence_penalty=1))
    assert (plan.k, plan.n, plan.draw.stop, plan.tests) == (4, 2, ["\n\n"], ["assert f() == 1"])
    assert plan.draw.extra == {"presence_penalty": 1} and len(plan.draw.seeds) == 4


@pytest.mark.parametrize("raw", [b"[" * 5000 + b"]" * 5000, b'{"a": ' * 40 + b"1" + b"}" * 40,
                                 b'{"model": "qp", "prompt": "\\ud800"}', b"\xff\xfe{", b'{"x": 1' + b"0" * 5000 + b"}"])
def test_decode_answers_400_not_500(raw):
    with pytest.raises(ServeError) as e:
        decode(raw)
    assert e.value.status == 400


@pytest.mark.slow  # a server (or the sandbox's subprocesses)
def test_complete_runs_request_tests_in_the_sandbox_and_prefers_passers():
    texts = [f"def f():\n    return {i}\n" for i in range(4)]
    feats = np.zeros((32, DIM))
    probe = fit_probe()
    feats[:4] = np.random.default_rng(2).standard_normal((4, DIM))
    q = probe.predict(feats[:4].astype(np.float32))
    target = int(np.argsort(q)[0])  # the probe's least favourite is the only one that passes
    svc = Service(CodeBackend(texts, feats), probe, ServeConfig(model_id="qp", k=4, beta=0.0))
    plan = svc.plan("completions", {"model": "qp", "prompt": "f", "tests": [f"assert f() == {target}"]})
    answer = asyncio.run(svc.complete(plan))
    assert answer.info["chosen"] == [target]
    outcomes = [c["tests"] for c in answer.info["candidates"]]
    assert [o["passed"] for o in outcomes] == [i == target for i in range(4)]
    assert outcomes[(target + 1) % 4]["reason"].startswith("failed")
    assert answer.info["tests"]["passed"] == 1


def test_complete_past_its_deadline_is_504_and_frees_its_place():
    svc = service(deadline=0.3, max_queue=1)
    svc.backend.hold = threading.Event()
    plan = svc.plan("chat", chat())
    with pytest.raises(ServeError) as e:
        asyncio.run(svc.complete(plan))
    assert e.value.status == 504 and svc.inflight == 0


# ------------------------------------------------------------------ HTTP: browsers, connections, bodies
@pytest.fixture(scope="module")
def app_url():
    config = ServeConfig(model_id="qp", k=4, beta=0.0, max_k=8, max_tokens=64, body_timeout=0.5,
                         allowed_hosts=("qprobe.internal",))
    with BackgroundServer(create_app(CodeBackend(["c0", "c1", "c2", "c3"]), fit_probe(), config),
                          header_timeout=0.5, max_connections=8) as srv:
        yield srv.url


def post(url, body, **headers):
    h = {"Content-Type": "application/json", **headers}
    return httpx.post(url + "/chat/completions", content=body if isinstance(body, bytes) else json.dumps(body),
                      headers=h, timeout=30)


@pytest.mark.slow  # a server (or the sandbox's subprocesses)
@pytest.mark.parametrize("headers, status", [
    ({"Host": "attacker.example"}, 403),
    ({"Host": "attacker.example:8000"}, 403),
    ({"Origin": "http://evil.example"}, 403),
    ({"Origin": "null"}, 403),
    ({"Content-Type": "text/plain"}, 415),
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ({"Host": "qprobe.internal"}, 200),  # --allowed-host
    ({"Host": "localhost:1234", "Origin": "http://localhost:1234"}, 200),
])
def test_host_origin_and_content_type(app_url, headers, status):
    r = post(app_url, chat(), **headers)
    assert r.status_code == status, r.text
    if status != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.slow  # a server (or the sandbox's subprocesses)
def test_hostile_bodies_are_400_and_streams_are_json(app_url):
    assert post(app_url, b"[" * 5000 + b"]" * 5000).status_code == 400
    r = post(app_url, b'{"model": "qp", "messages": [{"role": "user", "content": "\\ud800"}]}')
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    r = post(app_url, b'{"model": "qp", "messages": [{"role": "user", "content": "x"}], "beta": 1e999}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "beta"
    r = post(app_url, chat(stream=True, beta=1e-300))
    assert r.status_code == 200
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            json.loads(line[6:], parse_constant=lambda c: pytest.fail(f"{c} in the stream"))


def _host_port(url):
    host, port = url.split("//")[1].split("/")[0].split(":")
    return host, int(port)


def _closed_within(sock, seconds) -> bool:
    sock.settimeout(seconds)
    try:
        sock.recv(65536)  # b"": closed by the server
        return True
    except socket.timeout:
        return False
    except OSError:
        return True


@pytest.mark.slow  # a server (or the sandbox's subprocesses)
def test_idle_and_half_sent_connections_are_closed(app_url):
    addr = _host_port(app_url)
    idle = socket.create_connection(addr)
    assert _closed_within(idle, 5)  # no headers within 0.5 s: closed
    half = socket.create_connection(addr)
    half.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\"")
    half.settimeout(5)
    assert half.recv(65536).startswith(b"HTTP/1.1 408")  # the body did not arrive within 0.5 s
    for s in (idle, half):
        s.close()


@pytest.mark.slow  # a server (or the sandbox's subprocesses)
def test_connections_past_the_limit_are_closed_at_once(app_url):
    addr = _host_port(app_url)
    socks = [socket.create_connection(addr) for _ in range(20)]
    try:
        time.sleep(0.2)
        closed = 0
        for s in socks:
            s.settimeout(0.01)
            try:
                closed += s.recv(1) == b""
            except socket.timeout:
                pass
            except OSError:
                closed += 1
        assert closed >= 12  # at most 8 stay open
    finally:
        for s in socks:
            s.close()
    assert post(app_url, chat()).status_code == 200  # and the server still answers


# ------------------------------------------------------------------ upstream: hostile answers, deadlines, pool
@pytest.fixture()
def upstream(tmp_path):
    with StubServer(drip_s=1.0, huge_bytes=64 << 20) as stub:
        ident = {"kind": "api", "api_base": stub.url.rstrip("/"), "model": "stub-model", "pooling": "mean"}
        fit_probe(DIM, ident).save(tmp_path / "probe")
        yield stub, tmp_path / "probe"


def _err(url, **kw):
    with pytest.raises(openai.APIStatusError) as e:
        openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60).chat.completions.create(
            model="stub-model", messages=[{"role": "user", "content": "q"}], **kw)
    return e.value


@pytest.mark.slow  # about 10 s: the upstream drips one byte a second
def test_a_dripping_upstream_gets_504_at_the_deadline_and_its_threads_back(upstream):
    stub, probe_dir = upstream
    app = build(probe_dir, api_base=stub.url, api_model="stub-model", max_retries=0, request_timeout=60,
                deadline=2.0, max_queue=16)
    with BackgroundServer(app) as srv:
        stub.faults, stub.fault_rate, stub.max_consecutive_faults = ("drip",), 1.0, 10**9
        t0 = time.monotonic()
        e = _err(srv.url)
        assert e.status_code == 504 and time.monotonic() - t0 < 6
        assert _wait(lambda: stub.inflight == 0, 5)  # the upstream read was dropped, not left running
        # eight at once: all reach the upstream together (own pool, not asyncio's 6 threads), all get 504
        errs = []
        threads = [threading.Thread(target=lambda: errs.append(_err(srv.url).status_code)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errs == [504] * 8 and stub.max_inflight >= 8
        stub.fault_rate = 0.0  # healthy again: answered at once
        assert _wait(lambda: stub.inflight == 0, 5)
        r = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=10).chat.completions.create(
            model="stub-model", messages=[{"role": "user", "content": "q"}])
        assert r.choices[0].message.content


def _wait(cond, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.mark.slow  # a server (or the sandbox's subprocesses)
@pytest.mark.parametrize("fault, status, says", [("huge", 502, "too large"), ("number_content", 502, "unusable"),
                                                 ("500", 502, "HTTP 500")])
def test_hostile_upstream_answers_are_502_without_their_body(upstream, fault, status, says):
    stub, probe_dir = upstream
    app = build(probe_dir, api_base=stub.url, api_model="stub-model", max_retries=0, max_upstream_bytes=1 << 20)
    with BackgroundServer(app) as srv:
        stub.faults, stub.fault_rate = (fault,), 1.0
        e = _err(srv.url)
    assert e.status_code == status and says in e.body["message"]
    assert "injected" not in e.body["message"] and stub.url not in e.body["message"]


@pytest.mark.slow  # a server (or the sandbox's subprocesses)
def test_an_upstream_url_with_a_password_is_never_echoed(upstream):
    stub, probe_dir = upstream
    secret = stub.url.replace("http://", "http://admin:pa55word@")
    app = build(probe_dir, api_base=secret, api_model="stub-model", max_retries=0)
    with BackgroundServer(app) as srv:
        stub.faults, stub.fault_rate = ("500",), 1.0
        e1 = _err(srv.url)
        stub.kill()
        e2 = _err(srv.url)
    for e in (e1, e2):
        assert e.status_code == 502 and "pa55word" not in json.dumps(e.body) and "admin" not in json.dumps(e.body)
    from qprobe.apiclient import ApiClient, ApiError

    with pytest.raises(ApiError) as err:
        ApiClient(secret, max_retries=0, timeout=2).post_json("/chat/completions", {})
    assert "pa55word" not in str(err.value) and err.value.status is None and not err.value.timed_out


@pytest.mark.slow  # a server (or the sandbox's subprocesses)
# ------------------------------------------------------------------ keys: only to the hosts the user named
def test_the_probe_files_host_gets_no_key_unless_given_for_it(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-ENV-SECRET")
    with StubServer() as upstream_srv, StubServer() as recorded:
        ident = {"kind": "api", "api_base": recorded.url.rstrip("/"), "model": "stub-model", "pooling": "mean"}
        fit_probe(DIM, ident).save(tmp_path / "probe")
        app = build(tmp_path / "probe", api_base=upstream_srv.url, api_model="stub-model", api_key="sk-UPSTREAM")
        assert app.state.backend.extractor_host == recorded.url.rstrip("/")
        assert not app.state.backend.extractor_key_sent
        with BackgroundServer(app) as srv:
            openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0).completions.create(model="stub-model",
                                                                                           prompt="p")
        assert recorded.auth and not any("SECRET" in a or "UPSTREAM" in a for a in recorded.auth)
        assert set(upstream_srv.auth) == {"Bearer sk-UPSTREAM"}
        # given for that host: it is sent there
        app = build(tmp_path / "probe", api_base=upstream_srv.url, api_model="stub-model",
                    extractor_key="sk-FOR-RECORDED")
        with BackgroundServer(app) as srv:
            openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0).completions.create(model="stub-model",
                                                                                           prompt="p")
        assert recorded.auth[-1] == "Bearer sk-FOR-RECORDED"
        # the local backend's extractor and `train --demos` rebuild the same recorded host
        from qprobe.demos import embedder_from_identity
        from qprobe.serve.backends import _Embedding, key_for_extractor

        n = len(recorded.auth)
        _Embedding(ident, key_for_extractor(ident, None, None, None)).fill("p", [Candidate("c", "stop")])
        embedder_from_identity(ident).embed([("p", "c")], progress=False)
        assert len(recorded.auth) == n + 2 and not any("SECRET" in a for a in recorded.auth)


@pytest.mark.slow  # a server (or the sandbox's subprocesses)
def test_serve_prints_the_extractor_host_at_start_up(tmp_path, monkeypatch):
    import uvicorn
    from click.testing import CliRunner

    from qprobe.cli import cli

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    with StubServer() as upstream_srv, StubServer() as recorded:
        ident = {"kind": "api", "api_base": recorded.url.rstrip("/"), "model": "stub-model", "pooling": "mean"}
        fit_probe(DIM, ident).save(tmp_path / "probe")
        r = CliRunner().invoke(cli, ["serve", "--probe", str(tmp_path / "probe"), "--api-base", upstream_srv.url,
                                     "--api-model", "stub-model"], env={"OPENAI_API_KEY": "sk-env"})
    assert r.exit_code == 0, r.output
    assert f"sends every prompt and completion to {recorded.url.rstrip('/')} (no key" in r.stderr


# ------------------------------------------------------------------ request tests on the real model (slow lane)
@pytest.mark.slow
def test_request_tests_on_smollm2_including_tests_that_hang_or_fork(smollm, tmp_path):
    from qprobe.hfmodel import load_model

    model, _ = load_model("smollm2-135m", None, None)
    probe = fit_probe(model.config.hidden_size, {"kind": "hf", "model": "smollm2-135m", "layer": -1,
                                                 "pooling": "last"})
    probe.save(tmp_path / "probe")
    app = build(tmp_path / "probe", k=3, beta=0.0, max_tokens=24, deadline=120, test_timeout=2.0)
    cases = {
        "pass": "assert 1 + 1 == 2",  # every candidate that runs without error passes
        "hang": "while True:\n    pass",
        "fork": "import os\nfor _ in range(10_000):\n    try:\n        os.fork()\n    except OSError:\n        break\n"
                "while True:\n    pass",
    }
    took = {}
    with BackgroundServer(app) as srv:
        c = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=120)
        for name, tests in cases.items():
            t0 = time.monotonic()
            r = c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Say hi."}],
                                          seed=1, extra_body={"tests": tests})
            info = r.model_extra["qprobe"]
            outcomes = [cand["tests"] for cand in info["candidates"]]
            assert len(outcomes) == 3 and info["tests"]["of"] == 3
            if name != "pass":
                assert not any(o["passed"] for o in outcomes), outcomes
                assert all(o["reason"] == "timeout" or "failed" in o["reason"] or "syntax" in o["reason"]
                           for o in outcomes), outcomes
            took[name] = time.monotonic() - t0
            assert r.choices[0].message.content == info["candidates"][info["chosen"][0]].get(
                "text", r.choices[0].message.content)
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "x"}],
                                      extra_body={"tests": [1]})
    # sampling time varies with the machine's load; the tests add at most their 2 s limit (3 run at once)
    assert took["hang"] < took["pass"] + 20 and took["fork"] < took["pass"] + 20, took


@pytest.mark.slow  # the sandbox's subprocesses
@pytest.mark.parametrize("tests", ["while True:\n    pass",
                                   "import os\nfor _ in range(10_000):\n    try:\n        os.fork()\n"
                                   "    except OSError:\n        break\nwhile True:\n    pass\n"])
def test_request_tests_that_hang_or_fork_end_at_their_limit(tests):
    svc = Service(CodeBackend([f"def f():\n    return {i}\n" for i in range(4)]), fit_probe(),
                  ServeConfig(model_id="qp", k=4, beta=0.0, test_timeout=1.0, test_workers=4))
    t0 = time.monotonic()
    answer = asyncio.run(svc.complete(svc.plan("completions", {"model": "qp", "prompt": "f", "tests": tests})))
    assert [c["tests"]["reason"] for c in answer.info["candidates"]] == ["timeout"] * 4
    assert time.monotonic() - t0 < 15 and answer.info["tests"]["passed"] == 0

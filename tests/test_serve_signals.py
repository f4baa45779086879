"""`qprobe serve` with probes trained on signals (issue 21, item 2): inputs, refusals, the cascade.

Fast: the request logic through `Service` over a stub backend whose candidates,
features and token log-probs are known (the request's tests replaced by known
outcomes, so no sandbox runs); the upstream path against the in-repo stub server
(log-probs asked for only when the probe needs them); the local path on a tiny
random model. Slow: the embedded SmolLM2 with a ``shown`` + ``logprob_sum``
probe cascading on ``shown``, its request tests run in the sandbox.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from qprobe.errors import QProbeError  # noqa: E402
from qprobe.probe import QProbe  # noqa: E402
from qprobe.serve import BackgroundServer, ServeConfig, build  # noqa: E402
from qprobe.serve import service as service_module  # noqa: E402
from qprobe.serve.backends import Backend, Candidate  # noqa: E402
from qprobe.serve.protocol import ServeError  # noqa: E402
from qprobe.serve.rerank import choose_preferring  # noqa: E402
from qprobe.serve.service import Service  # noqa: E402
from qprobe.testing.servers import StubServer, embedding_for, token_logprobs_for  # noqa: E402

DIM = 6
K = 4


def fit_signals_probe(dim: int, signals, cascade=None, embedder=None, seed: int = 0) -> QProbe:
    """A probe over ``[features | signals]`` whose scores use every column (signals weigh in)."""
    rng = np.random.default_rng(seed)
    n = 96
    X = rng.standard_normal((n, dim + len(signals))).astype(np.float32)
    y = X @ rng.standard_normal(X.shape[1]) + 0.1 * rng.standard_normal(n)
    groups = np.repeat(np.arange(n // 4), 4)
    probe = QProbe("mse", beta=0.0, alpha=1.0, signals=tuple(signals), cascade=cascade).fit(X, y, groups=groups)
    probe.embedder_ = embedder
    return probe


class LogprobBackend(Backend):
    """Candidate i is "cand-i" with features FEATS[i] and token log-probs LPS[i]."""

    features = "stub"
    token_logprobs = True

    def __init__(self, feats, lps):
        self.feats, self.lps = feats, lps

    async def draw(self, d):
        return [Candidate(f"cand-{i}", "stop", self.feats[i], len(self.lps[i]), list(self.lps[i]))
                for i in range(len(d.seeds))]


FEATS = np.random.default_rng(5).standard_normal((K, DIM)).astype(np.float32)
LPS = [[-0.5, -1.0], [-0.1], [-2.0, -0.25, -0.25], [-3.0, -0.5]]


def request(**kw) -> dict:
    return {"model": "qp", "prompt": "def f():", **kw}


def fake_tests(monkeypatch, passing: set[int]):
    """The request's tests, replaced by known outcomes: candidate i passes when i is in `passing`."""
    seen = []

    async def run_tests(texts, tests, timeout, workers):
        seen.append(tests)
        return [{"passed": int(t.split("-")[1]) in passing, "reason": "passed" if int(t.split("-")[1]) in passing
                 else "failed: AssertionError"} for t in texts]

    monkeypatch.setattr(service_module, "run_tests", run_tests)
    return seen


def serve(probe, backend=None, **kw) -> Service:
    return Service(backend or LogprobBackend(FEATS, LPS), probe, ServeConfig(model_id="qp", k=K, beta=0.0, **kw))


def complete(svc: Service, body: dict):
    return asyncio.run(svc.complete(svc.plan("completions", body)))


def expected_X(shown=None, signals=("shown", "logprob_sum")) -> np.ndarray:
    cols = {"shown": lambda i: float(shown[i]), "logprob_sum": lambda i: float(sum(LPS[i])),
            "logprob_mean": lambda i: float(np.mean(LPS[i])), "n_tokens": lambda i: float(len(LPS[i]))}
    S = np.array([[cols[s](i) for s in signals] for i in range(K)], dtype=np.float32)
    return np.hstack([FEATS, S])


# ------------------------------------------------------------------ Service without HTTP
def test_shown_probe_with_tests_scores_features_and_signals_and_cascades_on_shown(monkeypatch):
    probe = fit_signals_probe(DIM, ("shown", "logprob_sum"), cascade="shown")
    shown = [1, 0, 1, 0]
    q = probe.predict(expected_X(shown))
    passing = {0, 2}
    best_passer = max(passing, key=lambda i: q[i])
    assert best_passer != int(np.argmax(q))  # the premise: the cascade changes the choice
    seen = fake_tests(monkeypatch, passing)
    answer = complete(serve(probe), request(tests=["assert f() == 1"]))
    assert seen == [["assert f() == 1"]]
    np.testing.assert_allclose([c["q"] for c in answer.info["candidates"]], q, rtol=1e-5)
    assert answer.info["chosen"] == [best_passer] and answer.texts == [f"cand-{best_passer}"]
    assert [c["weight"] for c in answer.info["candidates"]] == [float(i == best_passer) for i in range(K)]
    cands = answer.info["candidates"]
    assert [c["tests"]["passed"] for c in cands] == [bool(s) for s in shown]  # still reports each outcome
    assert [c["signals"] for c in cands] == [{"shown": float(shown[i]), "logprob_sum": pytest.approx(sum(LPS[i]))}
                                             for i in range(K)]
    assert answer.info["signals"] == ["shown", "logprob_sum"] and answer.info["cascade"] == "shown"
    assert answer.info["tests"]["passed"] == 2


def test_shown_probe_no_passer_keeps_every_candidate_and_n_fills_from_the_probe(monkeypatch):
    probe = fit_signals_probe(DIM, ("shown", "logprob_sum"), cascade="shown")
    fake_tests(monkeypatch, set())
    answer = complete(serve(probe), request(tests=["assert False"]))
    q = probe.predict(expected_X([0] * K))
    assert answer.info["chosen"] == [int(np.argmax(q))]
    fake_tests(monkeypatch, {2})
    answer = complete(serve(probe), request(tests=["assert f()"], n=3))
    q = probe.predict(expected_X([0, 0, 1, 0]))
    rest = [i for i in np.argsort(-q, kind="stable") if i != 2]
    assert answer.info["chosen"] == [2, *rest[:2]]  # the one passer, then the probe fills n


def test_shown_probe_without_tests_is_a_400_naming_the_signal():
    svc = serve(fit_signals_probe(DIM, ("shown", "logprob_sum"), cascade="shown"))
    with pytest.raises(ServeError) as e:
        svc.plan("completions", request())
    assert (e.value.status, e.value.param, e.value.code) == (400, "tests", "missing_signal")
    assert "'shown'" in e.value.message and "\n" not in e.value.message


def test_logprob_probe_without_tests_reads_the_candidates_log_probs():
    signals = ("logprob_sum", "logprob_mean", "n_tokens")
    probe = fit_signals_probe(DIM, signals)
    answer = complete(serve(probe), request())
    q = probe.predict(expected_X(signals=signals))
    np.testing.assert_allclose([c["q"] for c in answer.info["candidates"]], q, rtol=1e-5)
    assert answer.info["chosen"] == [int(np.argmax(q))] and "tests" not in answer.info
    assert answer.info["candidates"][2]["signals"] == {"logprob_sum": pytest.approx(-2.5),
                                                       "logprob_mean": pytest.approx(-2.5 / 3), "n_tokens": 3.0}


def test_a_cascade_on_a_log_prob_signal_goes_through_the_probe(monkeypatch):
    probe = fit_signals_probe(DIM, ("logprob_sum",), cascade="logprob_sum")
    q = probe.predict(expected_X(signals=("logprob_sum",)))
    assert int(np.argmax(q)) != 1 and q[3] > q[2]  # the premise: Q alone would choose otherwise
    answer = complete(serve(probe), request())
    assert answer.info["chosen"] == [1]  # the highest summed log-prob, whatever Q says
    fake_tests(monkeypatch, {2, 3})  # the request's tests first, then the probe's cascade among the passers
    answer = complete(serve(probe), request(tests=["assert f()"]))
    assert answer.info["chosen"] == [2] and "'logprob_sum'" in answer.info["tests"]["rule"]


def test_signals_serve_cannot_give_are_refused_at_start_up():
    with pytest.raises(QProbeError, match="signal 'reward', which serve cannot provide") as e:
        serve(fit_signals_probe(DIM, ("shown", "reward")))
    assert "\n" not in str(e.value)

    class NoLogprobs(LogprobBackend):
        token_logprobs = False

    with pytest.raises(QProbeError, match="'logprob_mean'.*no token log-probs"):
        serve(fit_signals_probe(DIM, ("logprob_mean",)), NoLogprobs(FEATS, LPS))


def test_choose_preferring_is_the_cascade_rule_on_values():
    q = np.array([3.0, 1.0, 2.0, 0.0])
    rng = np.random.default_rng(0)
    # numbers, not only bools: the candidates at the maximum (as signals.cascade_mask keeps them)
    c = choose_preferring(q, 1, 0.0, rng, [0.5, 2.0, 2.0, 1.0])
    assert c.indices.tolist() == [2] and c.weights.tolist() == [0, 0, 1, 0]
    assert choose_preferring(q, 1, 0.0, rng, [0, 0, 0, 0]).indices.tolist() == [0]  # none passes: all stay
    assert choose_preferring(q, 3, 0.0, rng, [0, 1, 0, 0]).indices.tolist() == [1, 0, 2]


# ------------------------------------------------------------------ the upstream path, against the stub server
@pytest.mark.parametrize("signals", [("logprob_sum", "n_tokens"), ()])
def test_upstream_asks_for_log_probs_only_when_the_probe_needs_them(tmp_path, signals):
    with StubServer() as stub:
        ident = {"kind": "api", "api_base": stub.url.rstrip("/"), "model": "stub-model", "pooling": "mean"}
        fit_signals_probe(8, signals, embedder=ident).save(tmp_path / "probe")
        probe = QProbe.load(tmp_path / "probe")
        app = build(tmp_path / "probe", api_base=stub.url, api_model="stub-model", k=3, beta=0.0, max_retries=0)
        with BackgroundServer(app) as srv:
            r = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0).completions.create(
                model="stub-model", prompt="def add(a, b):", max_tokens=16, seed=2, extra_body={"candidates": True})
        info = r.model_extra["qprobe"]
        sent = [b for b in stub.bodies if "prompt" in b]
        assert sent and all(bool(b.get("logprobs")) == bool(signals) for b in sent)
        from qprobe.embedders.openai_api import item_text

        texts = [c["text"] for c in info["candidates"]]
        X = np.stack([embedding_for(item_text("def add(a, b):", t)) for t in texts])
        if signals:
            X = np.hstack([X, [[sum(token_logprobs_for(t)), len(t.split())] for t in texts]])
        np.testing.assert_allclose([c["q"] for c in info["candidates"]], probe.predict(X.astype(np.float32)),
                                   rtol=1e-4, atol=1e-4)


def test_upstream_without_log_probs_is_a_502_for_a_log_prob_probe(tmp_path):
    with StubServer(reject_logprobs=True) as stub:
        ident = {"kind": "api", "api_base": stub.url.rstrip("/"), "model": "stub-model", "pooling": "mean"}
        fit_signals_probe(8, ("logprob_sum",), embedder=ident).save(tmp_path / "probe")
        app = build(tmp_path / "probe", api_base=stub.url, api_model="stub-model", k=2, max_retries=0)
        with BackgroundServer(app) as srv, pytest.raises(openai.APIStatusError) as e:
            openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0).completions.create(
                model="stub-model", prompt="x", max_tokens=8)
    assert e.value.status_code == 502 and e.value.body["code"] == "missing_logprobs"
    assert "'logprob_sum'" in e.value.body["message"]


def test_build_refuses_a_signal_serve_cannot_give_before_loading_a_model(tmp_path):
    fit_signals_probe(8, ("reward",), embedder={"kind": "hf", "model": "no-such-model", "layer": -1,
                                                 "pooling": "last"}).save(tmp_path / "probe")
    with pytest.raises(QProbeError, match="'reward', which serve cannot provide"):
        build(tmp_path / "probe", model="no-such-model")


# ------------------------------------------------------------------ the local path
def _local_signals_checks(url, model_name, probe, local_model, layer: int, body: dict, outcomes_from=None):
    """One request; its Q equal the probe on the sampler's own features, log-probs and test outcomes."""
    from qprobe.samplers.base import SampleJob, row_seed
    from qprobe.samplers.hf import HFSampler
    from qprobe.signals import with_signals

    r = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=300).completions.create(
        model=model_name, seed=1, extra_body={"k": 3, "beta": 0, "candidates": True, **body.pop("extra", {})},
        **body)
    info = r.model_extra["qprobe"]
    direct = HFSampler(local_model, temperature=0.8, top_p=0.95, max_new_tokens=body["max_tokens"],
                       stop=body.get("stop"), capture=[(layer, "last")],
                       dtype=probe.embedder_.get("dtype"))  # serve computes in the probe's features' dtype
    res = dict(direct.sample_stream([SampleJob(body["prompt"], i, row_seed(1, "serve", i)) for i in range(3)]))
    assert [c["text"] for c in info["candidates"]] == [res[i].completion for i in range(3)]
    rows = [res[i].row() for i in range(3)]
    if outcomes_from is not None:
        for row, c in zip(rows, info["candidates"]):
            row["shown"] = c["tests"]["passed"]
    X = with_signals(np.stack([res[i].features[0].vector for i in range(3)]), rows, probe.signals)
    np.testing.assert_allclose([c["q"] for c in info["candidates"]], probe.predict(X), rtol=1e-4, atol=1e-4)
    return info, probe.predict(X)


def test_local_tiny_model_feeds_log_prob_signals(tiny_model_dir, tmp_path):
    from qprobe.embedders.hf import hf_identity

    fit_signals_probe(64, ("logprob_sum", "n_tokens"),
                      embedder=hf_identity(tiny_model_dir, 2, "last", "float32")).save(tmp_path / "probe")
    probe = QProbe.load(tmp_path / "probe")
    app = build(tmp_path / "probe", model=tiny_model_dir, served_model_name="tiny", max_tokens=8)
    with BackgroundServer(app) as srv:
        info, q = _local_signals_checks(srv.url, "tiny", probe, tiny_model_dir, 2, {"prompt": "1 + 1 =", "max_tokens": 6})
    assert info["chosen"] == [int(np.argmax(q))] and info["signals"] == ["logprob_sum", "n_tokens"]


@pytest.mark.slow
def test_local_smollm2_shown_probe_cascades_on_the_request_tests(smollm, tmp_path):
    model, _ = smollm
    ident = {"kind": "hf", "model": "smollm2-135m", "layer": -1, "pooling": "last"}
    fit_signals_probe(model.config.hidden_size, ("shown", "logprob_sum"), cascade="shown",
                      embedder=ident).save(tmp_path / "probe")
    probe = QProbe.load(tmp_path / "probe")
    app = build(tmp_path / "probe", k=3, beta=0.0, max_tokens=8, deadline=240, test_timeout=5.0)
    with BackgroundServer(app) as srv:
        body = {"prompt": "x = ", "max_tokens": 6, "stop": ["\n"], "extra": {"tests": ["assert isinstance(x, int)"]}}
        info, q = _local_signals_checks(srv.url, "smollm2-135m", probe, "smollm2-135m", -1, body, outcomes_from=True)
        passed = [c["tests"]["passed"] for c in info["candidates"]]
        among = [i for i in range(3) if passed[i]] or list(range(3))
        assert info["chosen"] == [max(among, key=lambda i: q[i])] and info["cascade"] == "shown"
        with pytest.raises(openai.BadRequestError) as e:  # no tests: the probe lacks its `shown` signal
            openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0).completions.create(
                model="smollm2-135m", prompt="x = ", max_tokens=4)
        assert e.value.body["param"] == "tests" and "'shown'" in e.value.body["message"]

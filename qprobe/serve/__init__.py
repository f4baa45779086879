"""`qprobe serve`: an OpenAI-compatible server that answers with the probe-reranked completion.

`build(...)` makes the app from a probe and a backend (a local model or an
upstream server); `create_app(backend, probe, config)` takes them ready-made
(tests inject a stub backend); `BackgroundServer` runs an app on a thread.
FastAPI, uvicorn and sse-starlette are imported only when a server is built
(`pip install 'qprobe[serve]'`).
"""
from __future__ import annotations

from qprobe.errors import QProbeError

__all__ = ["build", "create_app", "ServeConfig", "BackgroundServer"]


def _need_stack() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "sse_starlette") if importlib.util.find_spec(m) is None]
    if missing:
        raise QProbeError(f"qprobe serve needs {', '.join(missing)}: pip install 'qprobe[serve]'")


def build(probe_dir, model: str | None = None, api_base: str | None = None, api_model: str | None = None,
          api_key: str | None = None, served_model_name: str | None = None, k: int = 4, beta: float | None = None,
          batch_size: int = 32, device: str | None = None, dtype: str | None = None, request_timeout: float = 60.0,
          max_retries: int = 2, server_api_key: str | None = None, extractor_key: str | None = None,
          max_upstream_bytes: int = 32 << 20, **limits):
    """The app serving the probe in `probe_dir` over a local `model` or an upstream `api_base`/`api_model`.

    `api_key` goes to the upstream (and to the probe's ``api`` extractor only when that is the
    same host); `extractor_key` goes to the probe's ``api`` extractor on any other host. A host
    read from the probe file never gets ``$OPENAI_API_KEY``. `limits` are further `ServeConfig`
    fields (max_k, max_tokens, temperature, top_p, max_queue, max_request_bytes, max_prompt_chars,
    deadline, bind_host, allowed_hosts, ...). The app's backend is `app.state.backend`; its
    `extractor_host` says where an api extractor sends the candidates.
    """
    _need_stack()
    from qprobe.probe import QProbe
    from qprobe.serve.app import ServeConfig, create_app
    from qprobe.serve.backends import LocalBackend, UpstreamBackend, key_for_extractor
    from qprobe.serve.inputs import check_probe, needs_logprobs

    probe = QProbe.load(probe_dir)
    check_probe(probe)  # a signal serve cannot give: refused before any model loads
    max_queue = int(limits.get("max_queue", ServeConfig.max_queue))
    if api_base:
        backend = UpstreamBackend(api_base, api_model, probe.embedder_, api_key=api_key, timeout=request_timeout,
                                  max_retries=max_retries, workers=max_queue, extractor_key=extractor_key,
                                  max_bytes=max_upstream_bytes, logprobs=needs_logprobs(probe))
        name = served_model_name or api_model
    else:
        from qprobe.hfmodel import DEFAULT_MODEL

        model = model or DEFAULT_MODEL
        backend = LocalBackend(model, probe.embedder_, batch_size=batch_size, device=device, dtype=dtype,
                               api_key=key_for_extractor(probe.embedder_, extractor_key, None, None))
        if backend.capture:
            h = backend.hidden_size()
            n_features = probe.n_features_in_ - len(probe.signals or ())  # the signal columns come last
            if h != n_features:
                raise QProbeError(f"probe {probe_dir} expects {n_features} features but {model}'s hidden "
                                  f"states have {h}")
        name = served_model_name or model
    config = ServeConfig(model_id=name, k=k, beta=float(probe.beta if beta is None else beta),
                         api_key=server_api_key, **limits)
    if config.k > config.max_k:
        raise QProbeError(f"-k {config.k} exceeds --max-k {config.max_k}")
    return create_app(backend, probe, config)


def __getattr__(name):
    if name in ("create_app", "ServeConfig", "BackgroundServer"):
        from qprobe.serve import app

        return getattr(app, name)
    raise AttributeError(name)

"""Shared fixtures: a tiny random local model (fast), and the real embedded default (loaded once)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an unknown model id must fail at once, not wait for the hub


WHY_SLOW = ("model", "subprocess", "server")  # the markers that say why a test is in the full lane


@pytest.hookimpl(tryfirst=True)  # before `-m` selects: `-m "not slow"` leaves these out
def pytest_collection_modifyitems(items):
    for item in items:
        if any(item.get_closest_marker(m) for m in WHY_SLOW) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, saved as a local folder.

    Exercises the "any local path" branch of the loaders at a fraction of the cost.
    """
    pytest.importorskip("transformers")
    from qprobe.testing.inputs import tiny_model

    return tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm():
    """The real embedded default model, loaded once per test session."""
    pytest.importorskip("transformers")
    from qprobe.hfmodel import load_model

    return load_model("smollm2-135m", None, None)  # the same lru_cache key as the sampler and embedder use


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Base URL of a real llama.cpp server (llama-cpp-python) on loopback; skipped without one,
    failed instead when QPROBE_REQUIRE_SERVER is set (CI)."""
    from qprobe.testing.servers import llama_server, llama_unavailable

    reason = llama_unavailable()
    if reason:
        if os.environ.get("QPROBE_REQUIRE_SERVER"):
            pytest.fail(reason)
        pytest.skip(reason)
    with llama_server(tmp_path_factory.mktemp("llama") / "server.log") as base:
        yield base

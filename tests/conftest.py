"""Shared fixtures: a tiny random local model (fast), and the real embedded default (loaded once)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, saved as a local folder.

    Exercises the "any local path" branch of the loaders at a fraction of the cost.
    """
    pytest.importorskip("transformers")
    from qprobe.testing.faults import tiny_model

    return tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm():
    """The real embedded default model, loaded once per test session."""
    pytest.importorskip("transformers")
    from qprobe.hfmodel import load_model

    return load_model("smollm2-135m", None, None)  # the same lru_cache key as the sampler and embedder use

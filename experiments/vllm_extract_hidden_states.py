"""Does this vLLM build extract hidden states at chosen layers (`extract_hidden_states`, vLLM PR #33736)?

    .vllm-venv/bin/python experiments/vllm_extract_hidden_states.py [MODEL_DIR] [--layers 10,29]

Runs vLLM's offline engine with the `extract_hidden_states` speculative method and
the `ExampleHiddenStatesConnector` KV connector (the setup of vLLM's own example),
on one prompt with max_tokens=1, and reports what came back: the safetensors file
the connector wrote and the shape of its hidden states, or the error. Run it in
the vLLM venv (scripts/vllm_server.sh install); MODEL_DIR defaults to .vllm-model/
(scripts/vllm_server.sh model). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(Path(__file__).resolve().parents[1] / ".vllm-model"))
    ap.add_argument("--layers", default="10,29", help="target-model layer indices to extract")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    layers = [int(x) for x in args.layers.split(",")]
    out: dict = {"model": args.model, "layers": layers}
    t = time.perf_counter()
    try:
        import vllm
        from vllm import LLM, SamplingParams

        out["vllm"] = vllm.__version__
        with tempfile.TemporaryDirectory() as tmp:
            llm = LLM(
                model=args.model, dtype="float32", max_model_len=512, enforce_eager=True,
                speculative_config={
                    "method": "extract_hidden_states", "num_speculative_tokens": 1,
                    "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": layers}},
                },
                kv_transfer_config={
                    "kv_connector": "ExampleHiddenStatesConnector", "kv_role": "kv_producer",
                    "kv_connector_extra_config": {"shared_storage_path": tmp},
                },
            )
            res = llm.generate(["def add(a, b):\n    return a + b"], SamplingParams(max_tokens=1))
            params = getattr(res[0], "kv_transfer_params", None) or {}
            out["kv_transfer_params"] = {k: str(v) for k, v in params.items()}
            files = sorted(Path(tmp).rglob("*.safetensors"))
            out["files"] = len(files)
            if files:
                from safetensors import safe_open

                with safe_open(str(files[0]), framework="pt") as f:
                    out["tensors"] = {k: list(f.get_tensor(k).shape) for k in f.keys()}
            out["supported"] = bool(files)
    except Exception as e:  # the answer to the question, not a crash to hide
        out["supported"] = False
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
        out["trace_tail"] = traceback.format_exc()[-1500:]
    out["seconds"] = round(time.perf_counter() - t, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

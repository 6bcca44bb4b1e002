#!/usr/bin/env bash
# Builds the llama.cpp peer for benchmarks/compare.py, once (~20 min on 2 cores): llama.cpp from
# the llama-cpp-python sdist on PyPI (the version pinned below), as shared libraries plus
# llama-server, then llama-cpp-python itself into .venv without a second build of llama.cpp
# (LLAMA_BUILD=OFF; compare.py points it at these libraries with LLAMA_CPP_LIB_PATH).
#
# Why not a plain `pip install llama-cpp-python`: its default -march=native issues AMX
# instructions, which some VMs list but do not enable (the first one crashes), so the ISA is
# spelled out from this CPU's flags in /proc/cpuinfo (AVX-512 and its VNNI/BF16/VBMI only where
# listed, AMX never); and its wheel has no llama-server, the peer for the concurrency sweep.
# The build is for this CPU: rerun the script on a CPU with other flags.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEERS=$ROOT/.peers
PY=$ROOT/.venv/bin/python
JOBS=${JOBS:-$(nproc)}
CPU_FLAGS=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
has() {  # ON where this CPU lists every flag named
  for flag in "$@"; do
    case "$CPU_FLAGS" in *" $flag "*) ;; *) echo OFF; return ;; esac
  done
  echo ON
}
# GGML_AVX512 compiles with -mavx512f/cd/vl/dq/bw; its extensions only on top of it.
AVX512=$(has avx512f avx512cd avx512vl avx512dq avx512bw)
has512() { [ "$AVX512" = ON ] && has "$@" || echo OFF; }
ISA="-DGGML_NATIVE=OFF -DGGML_SSE42=$(has sse4_2) -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) \
 -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) \
 -DGGML_AVX_VNNI=$(has avx_vnni) -DGGML_AVX512=$AVX512 -DGGML_AVX512_VBMI=$(has512 avx512vbmi) \
 -DGGML_AVX512_VNNI=$(has512 avx512_vnni) -DGGML_AVX512_BF16=$(has512 avx512_bf16) \
 -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
echo "llama.cpp ISA for this CPU: $ISA"

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

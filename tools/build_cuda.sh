#!/usr/bin/env bash
# Build libvopt_cuda.so (CMake) and install it as vopt/_lib/libvopt_cuda.so.
#
# Usage: tools/build_cuda.sh [BUILD_DIR]      (default BUILD_DIR: build/cuda)
#
# The one build entry point of the CUDA library (setup.py and CI call it).
# Without nvcc (or cmake) it prints why and exits 0: the CUDA backends then
# report themselves unavailable. Re-running it when nothing changed is fast:
# CMake's incremental build decides what to rebuild, and the installed copy is
# replaced only when it differs.
#
# Environment:
#   VOPT_SKIP_CUDA_BUILD=1   skip the build entirely
#   VOPT_CUDA_ARCHS="..."    CUDA architectures (CMake list), default "80;89;90a"
#   VOPT_CUDA_NO_INSTALL=1   build only; leave vopt/_lib/ alone (tests use this)
#   CUDACXX                  the nvcc to use (else PATH, else /usr/local/cuda/bin)
#   PYTHON                   Python whose nvidia-cutlass wheel provides CUTLASS
#                            (else .venv/bin/python, else python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${1:-$ROOT/build/cuda}"
ARCHS="${VOPT_CUDA_ARCHS:-80;89;90a}"
DEST="$ROOT/vopt/_lib/libvopt_cuda.so"

if [[ "${VOPT_SKIP_CUDA_BUILD:-0}" == "1" ]]; then
  echo "vopt: VOPT_SKIP_CUDA_BUILD=1, skipping the CUDA library build"
  exit 0
fi

NVCC=""
if [[ -n "${CUDACXX:-}" && -x "${CUDACXX}" ]]; then
  NVCC="$CUDACXX"
elif command -v nvcc >/dev/null 2>&1; then
  NVCC="$(command -v nvcc)"
elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
  NVCC=/usr/local/cuda/bin/nvcc
fi
if [[ -z "$NVCC" ]]; then
  echo "vopt: nvcc not found, skipping the CUDA library build (CUDA backends will be unavailable)"
  exit 0
fi
if ! command -v cmake >/dev/null 2>&1; then
  echo "vopt: cmake not found, skipping the CUDA library build (CUDA backends will be unavailable)"
  exit 0
fi

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3 || true)"
fi

# Configure only on the first run or when the arch list changed; otherwise
# `cmake --build` re-runs the configure step itself if CMakeLists.txt changed.
CACHE="$BUILD_DIR/CMakeCache.txt"
cached_archs=""
if [[ -f "$CACHE" ]]; then
  cached_archs="$(sed -n 's/^CMAKE_CUDA_ARCHITECTURES:[A-Z]*=//p' "$CACHE")"
fi
if [[ ! -f "$CACHE" || "$cached_archs" != "$ARCHS" ]]; then
  args=(-S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release
        "-DCMAKE_CUDA_COMPILER=$NVCC" "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS")
  if [[ ! -f "$CACHE" ]] && command -v ninja >/dev/null 2>&1; then
    args+=(-G Ninja)
  fi
  if [[ -n "$PY" ]]; then
    args+=("-DPython_EXECUTABLE=$PY")
  fi
  echo "vopt: configuring the CUDA library in $BUILD_DIR (archs $ARCHS)"
  cmake "${args[@]}"
fi

cmake --build "$BUILD_DIR" -j2

LIB="$BUILD_DIR/libvopt_cuda.so"
if [[ ! -f "$LIB" ]]; then
  echo "vopt: build finished but $LIB is missing" >&2
  exit 1
fi
if [[ "${VOPT_CUDA_NO_INSTALL:-0}" == "1" ]]; then
  echo "vopt: built $LIB (VOPT_CUDA_NO_INSTALL=1: not installed)"
  exit 0
fi
mkdir -p "$(dirname "$DEST")"
if cmp -s "$LIB" "$DEST"; then
  echo "vopt: $DEST is up to date"
else
  # Copy then rename, so a process that has the old library loaded keeps a valid file.
  cp "$LIB" "$DEST.tmp.$$"
  mv -f "$DEST.tmp.$$" "$DEST"
  echo "vopt: installed $DEST"
fi

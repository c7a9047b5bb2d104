# Shared set-up of tools/demo.sh and tools/test.sh (sourced, not run).
#
# Creates .venv if missing, installs torch 2.13.0 first (so nothing pulls a
# CUDA build of torch), then vopt with its dependencies (editable, extras
# cpu,test), then builds the CUDA library when nvcc is present. A second run
# reinstalls nothing: the install is skipped while setup.py and pyproject.toml
# are unchanged, and the CUDA build is incremental.
#
# Environment: VOPT_VENV (default .venv), PYTHON (the interpreter that creates
# the venv, default python3), VOPT_SKIP_CUDA_BUILD=1 (skip the CUDA library).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VOPT_VENV:-$ROOT/.venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "vopt: creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
STAMP="$VENV/.vopt-install-stamp"
WANT="$(cat "$ROOT/setup.py" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [[ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]]; then
  if ! "$VPY" -c "import torch" 2>/dev/null; then
    echo "vopt: installing torch 2.13.0 (CPU build unless this machine's pip offers otherwise)"
    "$VPY" -m pip install --no-cache-dir --disable-pip-version-check -q torch==2.13.0
  fi
  echo "vopt: installing vopt and its dependencies into $VENV"
  "$VPY" -m pip install --disable-pip-version-check -q "setuptools>=68" wheel
  VOPT_SKIP_CUDA_BUILD=1 "$VPY" -m pip install --no-cache-dir --disable-pip-version-check -q \
    --no-build-isolation -e "$ROOT[cpu,test]"
  echo "$WANT" > "$STAMP"
else
  echo "vopt: $VENV is up to date"
fi
PYTHON="$VPY" bash "$ROOT/tools/build_cuda.sh"
export PATH="$VENV/bin:$PATH"

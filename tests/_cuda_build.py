"""Shared by the CUDA-library tests: building libvopt_cuda.so and finding the SASS tools (see conftest.py)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "tools" / "build_cuda.sh"
INSTALLED = ROOT / "vopt" / "_lib" / "libvopt_cuda.so"
EXPECTED_ARCHS = ["80", "89", "90a"]
#: The build directory tools/_setup.sh uses (reused when it was configured for EXPECTED_ARCHS).
SETUP_BUILD = ROOT / "build" / "cuda"


def find_nvcc() -> Optional[str]:
    cudacxx = os.environ.get("CUDACXX")
    if cudacxx and os.access(cudacxx, os.X_OK):
        return cudacxx
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from the triton wheel, else PATH."""
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        cand = Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin" / "cuobjdump"
        if cand.is_file():
            return str(cand)
    return shutil.which("cuobjdump")


def digest(path: Path) -> Optional[str]:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def build_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VOPT_CUDA_ARCHS", "VOPT_SKIP_CUDA_BUILD")}
    env.update(VOPT_CUDA_NO_INSTALL="1", PYTHON=sys.executable)
    return env


def build_dir_for_tests(tmp_dir: Path) -> Path:
    """Where the tests build: the setup's build/cuda when it is configured for the default archs (then the
    build is incremental: CI's set-up already compiled everything once), else a fresh ``tmp_dir``."""
    cache = SETUP_BUILD / "CMakeCache.txt"
    if cache.is_file():
        for line in cache.read_text(errors="replace").splitlines():
            if line.startswith("CMAKE_CUDA_ARCHITECTURES:") and line.split("=", 1)[1] == ";".join(EXPECTED_ARCHS):
                return SETUP_BUILD
    return tmp_dir


def build(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BUILD_SCRIPT), str(out)], cwd=ROOT, env=build_env(), capture_output=True,
                          text=True)

"""libvopt_cuda.so: the CMake build, its exports and SASS, and the ctypes loader.

The build goes to a temporary directory with ``VOPT_CUDA_NO_INSTALL=1`` so
``vopt/_lib/`` is never touched; the loader is pointed at that build through
``VOPT_CUDA_LIB``. Without a GPU (this CI), launches fail with a CUDA status,
which is exactly what the error-path tests check.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from vopt import cuda_library
from vopt.errors import CudaLibraryError

from _cuda_build import BUILD_SCRIPT, EXPECTED_ARCHS, ROOT, build_env as _build_env, find_cuobjdump


pytestmark = pytest.mark.usefixtures("fresh_cuda_loader")


# ---- the build --------------------------------------------------------------------


def test_every_api_symbol_is_exported(built_lib):
    if shutil.which("nm") is None:
        pytest.skip("nm not found")
    out = subprocess.run(["nm", "-D", "--defined-only", str(built_lib)], capture_output=True, text=True, check=True)
    exported = {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}
    assert set(cuda_library.SIGNATURES) <= exported
    # The static cudart stays private (no clash with torch's libcudart).
    assert not [s for s in exported if s.startswith("cuda")], "cudart symbols leak from libvopt_cuda.so"


def test_sass_for_every_default_arch_is_embedded(built_lib):
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (neither in the triton wheel nor on PATH)")
    out = subprocess.run([cuobjdump, "--list-elf", str(built_lib)], capture_output=True, text=True, check=True)
    for arch in EXPECTED_ARCHS:
        assert f".sm_{arch}.cubin" in out.stdout, f"no sm_{arch} SASS in:\n{out.stdout}"


def test_cudart_is_linked_statically(built_lib):
    if shutil.which("ldd") is None:
        pytest.skip("ldd not found")
    out = subprocess.run(["ldd", str(built_lib)], capture_output=True, text=True, check=True)
    assert "libcudart" not in out.stdout, out.stdout
    assert "libtorch" not in out.stdout and "libc10" not in out.stdout, out.stdout


def test_rebuild_without_changes_is_a_no_op(cuda_build_dir):
    build_dir = cuda_build_dir
    lib = build_dir / "libvopt_cuda.so"
    mtime = lib.stat().st_mtime_ns
    start = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT), str(build_dir)], cwd=ROOT, env=_build_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert lib.stat().st_mtime_ns == mtime
    assert time.perf_counter() - start < 10


def test_skip_build_env():
    env = {**os.environ, "VOPT_SKIP_CUDA_BUILD": "1"}
    proc = subprocess.run(["bash", str(BUILD_SCRIPT), "/nonexistent/build"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0
    assert "skipping" in proc.stdout


# ---- the ctypes loader ----------------------------------------------------------------


def test_load_and_query(built_lib):
    lib = cuda_library.load()
    assert lib.path == built_lib.resolve()
    assert cuda_library.load() is lib  # cached
    assert cuda_library.runtime_version() > 0
    assert cuda_library.built_archs() == EXPECTED_ARCHS
    assert lib.abi_version() == cuda_library.ABI_VERSION
    assert "cudaSuccess" in lib.error_string(0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-driver error path")
def test_errors_without_a_driver(built_lib):
    lib = cuda_library.load()
    count = ctypes.c_int(-1)
    status = lib.call("vopt_cuda_device_count", ctypes.byref(count))
    assert status != 0
    with pytest.raises(CudaLibraryError, match=r"vopt_cuda_device_count failed .*cudaError"):
        cuda_library.check_status(status, "vopt_cuda_device_count")
    cuda_library.check_status(0, "nothing")  # success is silent
    # A launch reports the missing driver as a status (n > 0 with dummy pointers).
    status = lib.call("vopt_axpy_f32", 16, 16, 16, 1.0, 4, None)
    assert status != 0
    # n == 0 succeeds without launching anything.
    assert lib.call("vopt_axpy_f16", None, None, None, 1.0, 0, None) == 0
    why = cuda_library.unavailable_reason()
    assert isinstance(why, str) and "no CUDA device" in why
    assert "library" not in why  # the library itself loaded fine


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-driver error path")
def test_runtime_driver_mismatch_makes_the_backend_unavailable(built_lib, monkeypatch):
    # torch may see a GPU that the library's own static runtime cannot use
    # (driver older than the runtime): the backend must then refuse, not fail later.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    why = cuda_library.unavailable_reason()
    assert why is not None and "cannot use this driver" in why and "cudaError" in why


def test_abi_mismatch_is_refused(built_lib, monkeypatch):
    monkeypatch.setattr(cuda_library, "ABI_VERSION", cuda_library.ABI_VERSION + 1)
    with pytest.raises(CudaLibraryError, match="ABI version"):
        cuda_library.load()


def test_missing_library_is_reported(tmp_path, monkeypatch):
    missing = tmp_path / "nope.so"
    monkeypatch.setenv("VOPT_CUDA_LIB", str(missing))
    assert cuda_library.library_path() == missing
    with pytest.raises(CudaLibraryError, match="nope.so"):
        cuda_library.load()
    why = cuda_library.unavailable_reason()
    assert isinstance(why, str) and "nope.so" in why


def test_unloadable_file_is_reported(tmp_path, monkeypatch):
    bogus = tmp_path / "libvopt_cuda.so"
    bogus.write_text("not an ELF file")
    monkeypatch.setenv("VOPT_CUDA_LIB", str(bogus))
    with pytest.raises(CudaLibraryError, match="cannot load"):
        cuda_library.load()
    assert "cannot load" in cuda_library.unavailable_reason()


def test_importing_vopt_does_not_load_the_library():
    code = (
        "import vopt, vopt.cuda_library, vopt.ops.axpy\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert 'libvopt_cuda' not in maps, 'library loaded at import'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

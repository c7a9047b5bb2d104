"""Test-suite set-up.

* Without a CUDA GPU, Triton kernels run in the interpreter: ``TRITON_INTERPRET``
  must be set before any module defining ``@triton.jit`` kernels is imported, so
  it is set here, before the tests import vopt.
* Tests marked ``gpu`` are skipped cleanly when no CUDA device is present.
"""
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cuda_build  # noqa: E402

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module (restored afterwards): the quantized-attention references issue many
    tiny matmuls, which intra-op threading slows down ~100x on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def cuda_build_dir(tmp_path_factory) -> Path:
    """libvopt_cuda.so built with the default archs and VOPT_CUDA_NO_INSTALL=1 (vopt/_lib/ untouched).

    Reuses the set-up's build/cuda when it is configured for the default archs (an incremental build: seconds),
    else builds from scratch in a temporary directory (minutes with the attention kernels)."""
    if _cuda_build.find_nvcc() is None:
        pytest.skip("nvcc not found: the CUDA library cannot be built here")
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found: the CUDA library cannot be built here")
    out = _cuda_build.build_dir_for_tests(tmp_path_factory.mktemp("cuda-build"))
    before = _cuda_build.digest(_cuda_build.INSTALLED)
    proc = _cuda_build.build(out)
    assert proc.returncode == 0, f"build failed:\n{proc.stdout}\n{proc.stderr}"
    assert _cuda_build.digest(_cuda_build.INSTALLED) == before, "VOPT_CUDA_NO_INSTALL=1 build modified vopt/_lib/"
    assert (out / "libvopt_cuda.so").is_file()
    return out


@pytest.fixture
def fresh_cuda_loader():
    """Forget loaded CUDA libraries before and after the test (the loader caches per path and process)."""
    from vopt import cuda_library

    cuda_library.clear_cache()
    yield
    cuda_library.clear_cache()


@pytest.fixture
def built_lib(cuda_build_dir, monkeypatch, fresh_cuda_loader) -> Path:
    """The test build of libvopt_cuda.so, made the one vopt loads (VOPT_CUDA_LIB)."""
    lib = cuda_build_dir / "libvopt_cuda.so"
    monkeypatch.setenv("VOPT_CUDA_LIB", str(lib))
    return lib

"""Test-suite set-up.

* Without a CUDA GPU, Triton kernels run in the interpreter: ``TRITON_INTERPRET``
  must be set before any module defining ``@triton.jit`` kernels is imported, so
  it is set here, before the tests import vopt.
* Tests marked ``gpu`` are skipped cleanly when no CUDA device is present.
"""
import os

import pytest
import torch

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

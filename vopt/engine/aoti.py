"""Format ``aoti``: an AOTInductor package (``torch._inductor.aoti_compile_and_package``).

Inductor compiles the exported program to a shared library (C++ for CPU,
C++/Triton for CUDA) plus a weights blob, packaged as one ``.pt2`` file;
``torch._inductor.aoti_load_package`` loads it (no pickle). vopt's custom ops
are *not* compiled into the package: Inductor emits a call through its proxy
executor, which resolves ``torch.ops.vopt.*`` by name in the loading process
(pytorch/pytorch#145394), so the loader imports ``vopt.ops`` first and the ops
dispatch CUDA -> Triton -> reference there as usual. That is how a Python
custom op in the graph still compiles and runs exactly. An engine with vopt
ops therefore needs a Python process with vopt installed (not the model code).

The package targets the device its program was exported on (CPU here; CUDA
when the model and inputs were on a GPU).

AOTInductor's Python API changes between torch releases; this module is the
one place vopt calls it.
"""
from __future__ import annotations

from pathlib import Path

import torch


def compile_package(ep: torch.export.ExportedProgram, path: Path) -> None:
    from torch._inductor import aoti_compile_and_package

    aoti_compile_and_package(ep, package_path=str(path))


def load(path: Path):
    """A callable taking the flat input tensors, returning the flat outputs (list)."""
    from torch._inductor import aoti_load_package

    from .. import ops  # noqa: F401  (the package calls torch.ops.vopt.* through the proxy executor)

    return aoti_load_package(str(path))

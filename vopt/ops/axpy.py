"""``vopt::axpy(Tensor x, Tensor y, float alpha) -> Tensor``: ``alpha * x + y``.

The trivial op that proves the whole kernel path: the CUDA library built by
CMake and loaded with ctypes (:mod:`vopt.cuda_library`), the Triton kernel
(:mod:`vopt.kernels.axpy`), the exact torch reference, and the dispatch
between them (:mod:`vopt.dispatch`), behind an opaque ``torch.library`` op.

Inputs: ``x`` and ``y`` of the same shape, dtype (fp32, fp16 or bf16) and
device. The result is a new contiguous tensor of ``x``'s shape and dtype,
computed in fp32 (the multiply and the add each rounded to fp32, then rounded
once to the dtype).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import cuda_library
from ..dispatch import kernel_op, triton_device_reason, triton_unavailable

OP_NAME = "vopt::axpy"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = "float32, float16, bfloat16"
_CUDA_SYMBOLS = {torch.float32: "vopt_axpy_f32", torch.float16: "vopt_axpy_f16", torch.bfloat16: "vopt_axpy_bf16"}

AXPY = kernel_op(OP_NAME)


def validate(x: torch.Tensor, y: torch.Tensor, alpha: float) -> None:
    """Raise ``TypeError``/``ValueError`` naming the offending argument."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"vopt::axpy: x must be a Tensor, got {type(x).__name__}")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"vopt::axpy: y must be a Tensor, got {type(y).__name__}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"vopt::axpy: alpha must be a float, got {type(alpha).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"vopt::axpy: x.dtype is {x.dtype}; accepted: {_DTYPE_NAMES}")
    if y.dtype != x.dtype:
        raise TypeError(f"vopt::axpy: y.dtype {y.dtype} differs from x.dtype {x.dtype}; they must match")
    if y.shape != x.shape:
        raise ValueError(f"vopt::axpy: y.shape {tuple(y.shape)} differs from x.shape {tuple(x.shape)}; they must match")
    if y.device != x.device:
        raise ValueError(f"vopt::axpy: y is on {y.device} but x is on {x.device}; they must be on the same device")


def reference(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exact torch reference: fp32 math, cast back to ``x.dtype``, contiguous."""
    return (alpha * x.float() + y.float()).to(x.dtype).contiguous()


# ---- backends ----------------------------------------------------------------


def _cuda_check(x: torch.Tensor, y: torch.Tensor, alpha: float) -> Optional[str]:
    if not (x.is_contiguous() and y.is_contiguous()):
        return "needs contiguous x and y"
    if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
        return "needs x and y of the same shape, dtype and device"
    return cuda_library.device_reason(x.device)


@AXPY.register(
    "cuda", devices={"cuda"}, dtypes=DTYPES, available=cuda_library.unavailable_reason, check=_cuda_check
)
def axpy_cuda(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Run ``libvopt_cuda.so``'s launcher on torch's current stream."""
    lib = cuda_library.load()
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    symbol = _CUDA_SYMBOLS[x.dtype]
    # Make x's device current so the library's runtime launches there.
    with torch.cuda.device(x.device):
        stream = cuda_library.current_stream_handle(x)
        status = lib.call(symbol, x.data_ptr(), y.data_ptr(), out.data_ptr(), float(alpha), n, stream)
    lib.check(status, symbol)
    return out



def _triton_check(x: torch.Tensor, y: torch.Tensor, alpha: float) -> Optional[str]:
    return triton_device_reason(x.device, "vopt.kernels.axpy")


@AXPY.register(
    "triton", devices={"cuda", "cpu"}, dtypes=DTYPES, available=triton_unavailable, check=_triton_check
)
def axpy_triton(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Run the Triton kernel (:mod:`vopt.kernels.axpy`)."""
    from vopt.kernels import axpy as kernels

    return kernels.axpy(x, y, alpha)


@AXPY.register("reference", devices={"cpu", "cuda"}, dtypes=DTYPES)
def axpy_reference(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """The torch reference as a backend."""
    return reference(x, y, alpha)


# ---- the torch.library op ------------------------------------------------------


@torch.library.custom_op(OP_NAME, mutates_args=())
def axpy(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * x + y`` through the backend chosen by :data:`AXPY` (``VOPT_BACKEND``)."""
    validate(x, y, alpha)
    return AXPY(x, y, alpha)


@axpy.register_fake
def _axpy_fake(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    validate(x, y, alpha)
    # Every backend returns a contiguous tensor, so the fake one is contiguous too.
    return torch.empty_like(x, memory_format=torch.contiguous_format)

"""Triton axpy kernel: ``out = alpha * x + y``, computed in fp32.

Supports fp32, fp16 and bf16 tensors of any shape (flattened). The multiply
and the add are written separately; on GPU the compiler may fuse them into an
FMA, so fp32 results can differ from vopt's reference in the last bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import is_interpreted as _is_interpreted, launch

BLOCK = 1024

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = alpha * x + y
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def is_interpreted() -> bool:
    """Whether the kernel was created under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return _is_interpreted(_axpy_kernel)


def axpy(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * x + y`` as a new contiguous tensor of ``x``'s shape and dtype.

    ``x`` and ``y`` must have the same shape, dtype (fp32/fp16/bf16) and device;
    callers (``vopt.ops.axpy``) validate that with typed errors.
    """
    if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
        raise ValueError(
            f"axpy: x and y must match in shape, dtype and device; got x {tuple(x.shape)} {x.dtype} {x.device}, "
            f"y {tuple(y.shape)} {y.dtype} {y.device}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"axpy: x.dtype {x.dtype} not supported (supports: fp32, fp16, bf16)")
    x = x.contiguous()
    y = y.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.numel()
    if n == 0:
        return out
    grid = (triton.cdiv(n, BLOCK),)
    launch(_axpy_kernel, grid, x.device, x, y, out, float(alpha), n, BLOCK=BLOCK)
    return out

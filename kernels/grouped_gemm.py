"""Triton grouped GEMM for sorted-by-expert MoE dispatch (``vopt::grouped_gemm``): one launch over all experts.

``out[offsets[e]:offsets[e+1]] = x[offsets[e]:offsets[e+1]] @ w[e] (+ bias[e])``; other rows are zeros.

Tile schedule. Expert ``e`` with ``c_e`` rows needs ``ceil(c_e / BLOCK_M)`` row tiles; the total is at most
``ceil(M / BLOCK_M) + E`` (each expert wastes at most one partial tile), so the grid is that bound times the column
tiles, known from the shapes alone: no host synchronization. A small table built on the device with torch
(``tile_table``: per tile, its expert and first row) maps each program id to ``(expert, m-tile)``; programs past
the last real tile return at once. Empty experts own no tiles.

Numerics: fp32 accumulation; fp32 inputs use ``input_precision="ieee"`` (no TF32), fp16/bf16 inputs the tensor
cores; the result is rounded once to the dtype. bf16 ``tl.dot`` is broken in the Triton interpreter
(specs/environment.md), so bf16 is only compile-checked on CPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import is_interpreted as _is_interpreted, launch

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _grouped_gemm_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, tile_expert_ptr, tile_row_ptr, tile_end_ptr,
                         N, K, num_experts,
                         stride_xm, stride_we, stride_wk, stride_om,
                         HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert < num_experts:
        row0 = tl.load(tile_row_ptr + pid_m)
        row_end = tl.load(tile_end_ptr + pid_m)
        rows = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        col_ok = cols < N
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            b = tl.load(w_base + ks[:, None] * stride_wk + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                        other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + expert.to(tl.int64) * N + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def is_interpreted() -> bool:
    """Whether the kernel was created under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return _is_interpreted(_grouped_gemm_kernel)


def tile_table(offsets: torch.Tensor, m: int, block_m: int = BLOCK_M) -> tuple:
    """``(tile_expert int32, tile_row int64, tile_end int64)``, each ``[T]``, ``T = ceil(m / block_m) + E``.

    Built on the offsets' device. Tile ``t`` covers rows ``tile_row[t] : min(tile_row[t] + block_m, tile_end[t])``
    of expert ``tile_expert[t]`` (``tile_end`` is the expert's last row + 1); ``tile_expert[t] == E`` marks a tile
    past the last one. Offsets are clamped to ``[0, m]`` and made non-decreasing, so malformed ones cannot address
    rows outside ``x``.
    """
    num_experts = offsets.shape[0] - 1
    offs = offsets.to(torch.int64).clamp(0, m).cummax(0).values
    counts = offs[1:] - offs[:-1]
    tiles = (counts + block_m - 1) // block_m
    tile_end = tiles.cumsum(0)
    total = -(-m // block_m) + num_experts
    t = torch.arange(total, device=offsets.device)
    expert = torch.searchsorted(tile_end, t, right=True)            # E for t >= the number of real tiles
    safe = expert.clamp(max=num_experts - 1)
    first_tile = tile_end[safe] - tiles[safe]
    row = offs[safe] + (t - first_tile) * block_m
    return expert.to(torch.int32), row, offs[safe + 1]


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[M, N]``: rows of expert ``e`` times ``w[e]`` (+ ``bias[e]``), zeros outside ``offsets[0]:offsets[E]``.

    Callers (:mod:`vopt.ops.grouped_gemm`) validate shapes and dtypes with typed errors.
    """
    if x.dtype not in SUPPORTED_DTYPES or w.dtype != x.dtype:
        raise TypeError(f"grouped_gemm: x.dtype {x.dtype} / w.dtype {w.dtype} not supported (fp32, fp16, bf16; equal)")
    m, k = x.shape
    num_experts, _, n = w.shape
    out = torch.zeros(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    x = x.contiguous()
    w = w.contiguous()
    bias = None if bias is None else bias.contiguous()
    offsets = offsets.contiguous()
    tile_expert, tile_row, tile_end = tile_table(offsets, m)
    grid = (tile_expert.shape[0], triton.cdiv(n, BLOCK_N))
    launch(_grouped_gemm_kernel, grid, x.device, x, w, bias if bias is not None else out, out, tile_expert, tile_row,
           tile_end, n, k, num_experts, x.stride(0), w.stride(0), w.stride(1), out.stride(0),
           HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
           BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out

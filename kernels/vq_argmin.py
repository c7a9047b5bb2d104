"""Triton nearest-code kernel: per row, the best score, its first index and the second-best score.

Scores are ``s_k = ||c_k||^2 - 2 x.c_k`` (the squared distance minus the row's constant ``||x||^2``),
computed in fp32 blockwise: each program owns ``BLOCK_N`` rows and one contiguous range of codes (a *split*:
several per row block when N alone would leave the GPU idle) and streams those codes past them in
``BLOCK_K``-code blocks, accumulating ``x.c`` over ``BLOCK_D``-wide slices with ``tl.dot`` (fp32 inputs use
``input_precision="ieee"``: no TF32). The ``[N, K]`` score matrix never exists; only a
``[BLOCK_N, BLOCK_K]`` tile does. Ties go to the first index, within a block (smallest column among the
minima) and across blocks (a later block must be strictly better). ``second`` is the smallest score of
any *other* code, so a duplicate of the best code gives ``second == best``.

``vopt.ops.vq_lookup`` turns these into certified codes (the kernel alone does not promise the reference's
codes at near-ties). D need not be a multiple of anything (masked loads); fp16/bf16 inputs are multiplied
exactly and accumulated in fp32 (under the interpreter they are upcast before the dot: bf16 ``tl.dot`` is
broken there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import is_interpreted as _is_interpreted, launch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_N, BLOCK_K, BLOCK_D = 64, 64, 32
_NO_INDEX = tl.constexpr(2147483647)


@triton.jit
def _vq_argmin_kernel(x_ptr, c_ptr, cc_ptr, best_ptr, idx_ptr, second_ptr,
                      N, K, D, K_PER_SPLIT, stride_xn, stride_xd, stride_ck, stride_cd,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)                         # codes [split * K_PER_SPLIT, ...) of this program
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    second = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_hi
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < D
            xb = tl.load(x_ptr + rows64[:, None] * stride_xn + dd[None, :] * stride_xd,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            cb = tl.load(c_ptr + cols64[None, :] * stride_ck + dd[:, None] * stride_cd,
                         mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            if DOT_FP32:
                acc += tl.dot(xb.to(tl.float32), cb.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(xb, cb)
        cc = tl.load(cc_ptr + cols, mask=col_ok, other=0.0)
        s = cc[None, :] - 2.0 * acc
        s = tl.where(col_ok[None, :], s, float("inf"))
        blk_min = tl.min(s, axis=1)
        blk_idx = tl.min(tl.where(s == blk_min[:, None], cols[None, :], _NO_INDEX), axis=1)
        blk_second = tl.min(tl.where(cols[None, :] == blk_idx[:, None], float("inf"), s), axis=1)
        better = blk_min < best                      # strict: an equal later block keeps the earlier index
        second = tl.where(better, tl.minimum(best, blk_second), tl.minimum(second, blk_min))
        best_idx = tl.where(better, blk_idx, best_idx)
        best = tl.where(better, blk_min, best)
    out = split.to(tl.int64) * N + rows64
    tl.store(best_ptr + out, best, mask=row_ok)
    tl.store(second_ptr + out, second, mask=row_ok)
    tl.store(idx_ptr + out, best_idx, mask=row_ok)


def is_interpreted() -> bool:
    """Whether the kernel was created under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return _is_interpreted(_vq_argmin_kernel)


def vq_scores(x: torch.Tensor, codebook: torch.Tensor, code_sq_norms: torch.Tensor, *, splits: int = 1,
              block_n: int = BLOCK_N, block_k: int = BLOCK_K, block_d: int = BLOCK_D) -> tuple:
    """``(best fp32, idx int32, second fp32)``, each ``[S, N]``, of ``x [N, D]`` against ``codebook [K, D]``.

    Split ``s`` covers the codes ``[s * K_s, (s + 1) * K_s)`` with ``K_s = ceil(ceil(K / splits) / block_k) * block_k``
    (so ``S <= splits``; more programs when N alone gives too few); ``vopt.ops.vq_lookup.merge_splits`` combines
    them. ``code_sq_norms``: fp32 ``[K]``, ``||c_k||^2``. Inputs are validated by ``vopt.ops.vq_lookup``; blocks must
    be powers of two >= 16 (``tl.dot``).
    """
    if x.dtype not in SUPPORTED_DTYPES or codebook.dtype != x.dtype:
        raise TypeError(f"vq_scores: x and codebook must share a dtype in fp32/fp16/bf16, got {x.dtype}, {codebook.dtype}")
    for name, b in (("block_n", block_n), ("block_k", block_k), ("block_d", block_d)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"vq_scores: {name}={b} must be a power of two >= 16")
    if splits < 1:
        raise ValueError(f"vq_scores: splits={splits} must be >= 1")
    n, d = x.shape
    k = codebook.shape[0]
    per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    num_splits = triton.cdiv(k, per_split)
    best = torch.empty(num_splits, n, dtype=torch.float32, device=x.device)
    second = torch.empty_like(best)
    idx = torch.empty(num_splits, n, dtype=torch.int32, device=x.device)
    if n == 0:
        return best, idx, second
    norms = code_sq_norms.to(device=x.device, dtype=torch.float32).contiguous()
    dot_fp32 = x.dtype == torch.float32 or is_interpreted()
    grid = (triton.cdiv(n, block_n), num_splits)
    launch(_vq_argmin_kernel, grid, x.device, x, codebook, norms, best, idx, second, n, k, d, per_split,
           x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1),
           BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, DOT_FP32=dot_fp32)
    return best, idx, second

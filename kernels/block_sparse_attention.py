"""Triton block-sparse masked attention: each program visits only its query block's live key blocks.

One program per (query block, batch x head). The host compacts the bool block mask
``[nQB, nKB]`` into ``kv_num [nQB]`` (live key blocks per query block) and ``kv_idx
[nQB, maxc]`` (their indices, ascending), plus ``kv_full [nQB, maxc]`` (1 = every
in-range element of the tile is visible). The program loops ``kv_num[qb]`` times, so
dead tiles cost nothing (no loads, no dots). In a full tile the element-mask load is
predicated off (no mask traffic); in a partial tile the bool mask (read as uint8
through the strides of ``dense_mask.expand(B, H, Q, K)``: broadcast dims have
stride 0, nothing is materialized) sets masked scores to -inf. Online softmax in
fp32 (exp2 domain), fp32 accumulator, ``acc / l`` epilogue; rows that see no key
output 0. fp16 inputs use fp16 MMAs (P cast to fp16 for PV); fp32 inputs use IEEE
fp32 dots (``input_precision="ieee"``, no TF32). BLOCK_M / BLOCK_N are the block
mask's ``block_q`` / ``block_k`` (powers of two, >= 16).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from ._launch import is_interpreted, launch

try:  # the module must import (and unsupported_reason must answer) without triton
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover
    triton = tl = None
    _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

from vopt.ops.ccam_mask import compact_blocks

__all__ = ["MAX_HEAD_DIM", "unsupported_reason", "block_sparse_attention_triton", "prepare_launch"]

MAX_HEAD_DIM = 128
_DTYPES = (torch.float16, torch.float32)
_TL_DTYPES = {torch.float16: "fp16", torch.float32: "fp32"}


def _is_interpreted() -> bool:
    return triton is not None and is_interpreted(_bsa_fwd_kernel)


if triton is not None:

    @triton.jit
    def _bsa_fwd_kernel(
        Q, K, V, Out, KvNum, KvIdx, KvFull, Mask, Prefix,
        H, Nq, Nk, D, DV, MAXC,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
        smb, smh, smq, smk,
        qk_scale,
        HAS_MASK: tl.constexpr, HAS_PREFIX: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    ):
        """Out[b, h, rows of block pid_m] = softmax over the live key blocks; qk_scale = sm_scale * log2(e)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_PAD)
        offs_dv = tl.arange(0, DV_PAD)
        row_ok = offs_m < Nq

        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
        if HAS_MASK:
            mask_rows = Mask + b.to(tl.int64) * smb + h.to(tl.int64) * smh + offs_m[:, None].to(tl.int64) * smq

        if HAS_PREFIX:  # key-prefix mask: row i sees keys j < Prefix[i] (CCAM: (g(i) + 1) * P), no mask tensor
            prefix = tl.load(Prefix + offs_m, mask=row_ok, other=0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)

        n_live = tl.load(KvNum + pid_m)
        list_base = pid_m.to(tl.int64) * MAXC
        for t in range(0, n_live):
            kb = tl.load(KvIdx + list_base + t)
            cols = kb * BLOCK_N + offs_n
            col_ok = cols < Nk
            k = tl.load(k_base + cols[None, :].to(tl.int64) * skn + offs_d[:, None] * skd,
                        mask=col_ok[None, :] & (offs_d < D)[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, k, input_precision="ieee")
            else:
                s = tl.dot(q, k)
            s = s * qk_scale
            valid = col_ok[None, :]
            if HAS_MASK:
                # Full tiles: the load is predicated off entirely (other=1 = visible): lim = 0.
                lim = tl.where(tl.load(KvFull + list_base + t) == 0, Nk, 0)
                mk = tl.load(mask_rows + cols[None, :].to(tl.int64) * smk,
                             mask=row_ok[:, None] & (cols < lim)[None, :], other=1)
                valid = valid & (mk != 0)
            if HAS_PREFIX:
                valid = valid & (cols[None, :] < prefix[:, None])
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + cols[:, None].to(tl.int64) * svn + offs_dv[None, :] * svd,
                        mask=col_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
            if IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        live = l_i > 0.0
        out = acc / tl.where(live, l_i, 1.0)[:, None]
        out = tl.where(live[:, None], out, 0.0)
        o_base = Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh
        tl.store(o_base + offs_m[:, None].to(tl.int64) * som + offs_dv[None, :] * sod,
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < DV)[None, :])

else:  # pragma: no cover
    _bsa_fwd_kernel = None


def _pow2_ge16(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 16 and (x & (x - 1)) == 0


def padded_dim(d: int) -> int:
    """Head dim the kernel computes with: next power of two >= max(d, 16) (zero-padded by masked loads)."""
    return max(16, 1 << (int(d) - 1).bit_length())


def unsupported_reason(query, key, value, block_mask, block_q, block_k, dense_mask=None) -> Optional[str]:
    """``None`` if the kernel runs this call exactly, else a one-line reason (the dispatcher falls back)."""
    if _TRITON_IMPORT_ERROR is not None:
        return f"triton unavailable ({_TRITON_IMPORT_ERROR})"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name} must be a [B, H, N, D] tensor"
        if t.dtype not in _DTYPES:
            return f"{name} dtype {t.dtype} not supported (float16, float32; bf16 dots are wrong under the interpreter)"
    if not (query.dtype == key.dtype == value.dtype):
        return "query, key, value dtypes differ"
    if query.shape[1] != key.shape[1]:
        return "grouped-query attention (query heads != key heads) is not supported"
    if query.shape[-1] > MAX_HEAD_DIM or value.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {query.shape[-1]} / value dim {value.shape[-1]} > {MAX_HEAD_DIM}"
    if not (_pow2_ge16(block_q) and _pow2_ge16(block_k)) or block_q > 128 or block_k > 128:
        return f"block sizes must be powers of two in [16, 128], got {block_q}x{block_k}"
    devs = {query.device, key.device, value.device}
    if dense_mask is not None:
        if not isinstance(dense_mask, torch.Tensor) or dense_mask.dtype != torch.bool:
            return "dense_mask must be a bool tensor"
        devs.add(dense_mask.device)
    if len(devs) != 1:
        return f"tensors on different devices ({', '.join(map(str, devs))})"
    dev = query.device
    if dev.type == "cpu" and not _is_interpreted():
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before importing the kernel)"
    if dev.type not in ("cpu", "cuda"):
        return f"device {dev} not supported"
    return None


def prepare_launch(query, key, value, block_mask, block_q, block_k, dense_mask=None, scale=None,
                   block_full: Optional[torch.Tensor] = None, compacted=None, key_prefix=None):
    """``(grid, args, kwargs, out)`` of one kernel call (validated).

    ``block_full`` (bool [nQB, nKB]) marks tiles needing no element mask; when ``None`` it is computed
    from ``dense_mask`` (or all live tiles are full without a mask). ``compacted`` (``kv_num, kv_idx,
    kv_full`` from :func:`vopt.ops.ccam_mask.compact_blocks` or a :class:`~vopt.ops.ccam_mask.BlockLayout`)
    skips the host-side compaction (e.g. cached per shape). ``key_prefix`` (int [Q], e.g.
    :meth:`~vopt.ops.ccam_mask.CCAMMask.keys_visible`) is an element mask given as per-row visible key-prefix
    lengths (row i sees keys j < key_prefix[i]), applied together with ``dense_mask`` if both are given; no
    [Q, K] mask is read (the CCAM mask at 1024 x 69,984 would be 72 MB). Pass ``block_full``/``compacted``
    consistent with it (e.g. ``CCAMMask.layout``); without them all live tiles are treated as partial.
    """
    from vopt.ops.block_sparse_attention import block_mask_from_dense, validate

    validate(query, key, value, block_mask, block_q, block_k, dense_mask, scale)
    why = unsupported_reason(query, key, value, block_mask, block_q, block_k, dense_mask)
    if why:
        raise NotImplementedError(f"block_sparse_attention_triton: {why}")
    bsz, h, nq, d = query.shape
    nk, dv = key.shape[2], value.shape[-1]
    dev = query.device
    if compacted is None:
        if block_full is None and dense_mask is not None:
            block_full = block_mask_from_dense(dense_mask, block_q, block_k)[1]
        if block_full is None and key_prefix is not None:
            block_full = torch.zeros_like(block_mask)
        compacted = compact_blocks(block_mask, block_full)
    kv_num, kv_idx, kv_full = (t.to(dev).contiguous() for t in compacted)
    if dense_mask is not None:
        mask = dense_mask.expand(bsz, h, nq, nk).view(torch.uint8)
        mstrides = tuple(mask.stride())
    else:
        mask, mstrides = kv_full, (0, 0, 0, 0)
    if key_prefix is not None:
        if not isinstance(key_prefix, torch.Tensor) or tuple(key_prefix.shape) != (nq,):
            raise ValueError(f"block_sparse_attention_triton: key_prefix must be an int tensor [Q={nq}]")
        prefix = key_prefix.to(device=dev, dtype=torch.int32).contiguous()
    else:
        prefix = kv_num
    out = torch.empty((bsz, h, nq, dv), dtype=query.dtype, device=dev)
    sm = 1.0 / math.sqrt(d) if scale is None else float(scale)
    grid = (block_mask.shape[0], bsz * h)
    args = (query, key, value, out, kv_num, kv_idx, kv_full, mask, prefix,
            h, nq, nk, d, dv, kv_idx.shape[1],
            *query.stride(), *key.stride(), *value.stride(), *out.stride(), *mstrides,
            sm * 1.4426950408889634)
    kwargs = dict(HAS_MASK=dense_mask is not None, HAS_PREFIX=key_prefix is not None, IEEE=query.dtype == torch.float32,
                  BLOCK_M=block_q, BLOCK_N=block_k, D_PAD=padded_dim(d), DV_PAD=padded_dim(dv),
                  num_warps=4, num_stages=2)
    return grid, args, kwargs, out


def block_sparse_attention_triton(query, key, value, block_mask, block_q, block_k, dense_mask=None, scale=None,
                                  *, block_full=None, compacted=None, key_prefix=None) -> torch.Tensor:
    """Run the kernel; same result as ``block_sparse_attention_reference`` up to fp32 accumulation order.

    Raises ``NotImplementedError`` (see :func:`unsupported_reason`) for calls it cannot run.
    """
    grid, args, kwargs, out = prepare_launch(query, key, value, block_mask, block_q, block_k, dense_mask, scale,
                                             block_full=block_full, compacted=compacted, key_prefix=key_prefix)
    if out.numel():
        launch(_bsa_fwd_kernel, grid, query.device, *args, **kwargs)
    return out

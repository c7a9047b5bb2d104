"""The CUDA backend of ``vopt::block_sparse_attention`` (``cuda/block_sparse_attn.cu``).

The kernel is exact FlashAttention-2-style attention (fp16/bf16 mma.sync, fp32 accumulation) on its own 64 x 64
tiles. The op's block mask may use any ``block_q`` x ``block_k``, so the host classifies every kernel tile once per
mask (cached): 0 = dead (every op block it overlaps is dead: never loaded), 1 = partial (the kernel applies the
op's block mask and the dense mask per element), 2 = full (every op block it overlaps is live and there is no dense
mask: nothing to read). The rule and layouts are specified in ``cuda/vopt_cuda.h``.

What it takes (:func:`unsupported_reason` says why not, and the dispatcher falls back to Triton with the reason
logged): fp16/bf16 ``[B, H, L, D]`` on an sm_80+ GPU, ``head_dim`` and value dim multiples of 8 up to 128. Inputs
that are not 16-byte aligned row by row are copied to contiguous tensors first (never modified in place).
"""
from __future__ import annotations

import ctypes
import functools
import math
from typing import Optional

import torch

from .. import cuda_library

__all__ = ["KERNEL_TILE", "kernel_tiles", "unsupported_reason", "block_sparse_attention_cuda"]

#: Rows and keys of one kernel tile (cuda/block_sparse_attn.cu).
KERNEL_TILE = 64
_DTYPES = {torch.float16: 0, torch.bfloat16: 1}


def kernel_tiles(block_mask: torch.Tensor, len_q: int, len_k: int, block_q: int, block_k: int,
                 has_dense: bool, tile: int = KERNEL_TILE) -> torch.Tensor:
    """uint8 ``[ceil(len_q / tile), ceil(len_k / tile)]`` classes of the kernel tiles (0 dead, 1 partial, 2 full).

    A kernel tile overlaps the op blocks ``[r0 // block_q, (r1 - 1) // block_q] x [c0 // block_k, (c1 - 1) //
    block_k]`` (its in-range rows ``[r0, r1)`` and keys ``[c0, c1)``); live counts over that rectangle come from a 2-D
    prefix sum of the block mask. Dead: none live. Full: all live and no dense mask. Otherwise partial.
    """
    bm = block_mask.to("cpu", torch.int64)
    ps = torch.zeros(bm.shape[0] + 1, bm.shape[1] + 1, dtype=torch.int64)
    ps[1:, 1:] = bm.cumsum(0).cumsum(1)
    nqt, nkt = -(-len_q // tile), -(-len_k // tile)
    r0 = torch.arange(nqt) * tile
    r1 = torch.clamp(r0 + tile, max=len_q)
    c0 = torch.arange(nkt) * tile
    c1 = torch.clamp(c0 + tile, max=len_k)
    a, b = (r0 // block_q)[:, None], ((r1 - 1) // block_q + 1)[:, None]
    c, d = (c0 // block_k)[None, :], ((c1 - 1) // block_k + 1)[None, :]
    live = ps[b, d] - ps[a, d] - ps[b, c] + ps[a, c]
    area = (b - a) * (d - c)
    out = torch.ones(nqt, nkt, dtype=torch.uint8)
    out[live == 0] = 0
    if not has_dense:
        out[(live == area) & (live > 0)] = 2
    return out


@functools.lru_cache(maxsize=64)
def _device_tables(mask_bytes: bytes, shape: tuple, len_q: int, len_k: int, block_q: int, block_k: int,
                   has_dense: bool, device: str):
    bm = torch.frombuffer(bytearray(mask_bytes), dtype=torch.bool).reshape(shape)
    tiles = kernel_tiles(bm, len_q, len_k, block_q, block_k, has_dense)
    return tiles.to(device), bm.to(torch.uint8).to(device)


def _rows_aligned(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:3])


def unsupported_reason(query, key, value, block_mask, block_q, block_k, dense_mask=None, scale=None) -> Optional[str]:
    """Why the CUDA kernel cannot run this call, or None."""
    why = cuda_library.unavailable_reason()
    if why:
        return why
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.device.type != "cuda":
            return f"{name} is on {t.device}, not a CUDA device"
        if t.dtype not in _DTYPES:
            return f"{name} dtype {t.dtype} not supported (float16, bfloat16)"
    if len({query.device, key.device, value.device}) != 1:
        return "query, key and value are on different devices"
    d, dv = query.shape[-1], value.shape[-1]
    if d % 8 or dv % 8 or max(d, dv) > 128:
        return f"head_dim {d} / value dim {dv}: the CUDA kernel takes multiples of 8 up to 128"
    if min(query.shape[:3]) == 0 or key.shape[2] == 0:
        return "empty input"
    if dense_mask is not None and dense_mask.device != query.device:
        return f"dense_mask is on {dense_mask.device}, query on {query.device}"
    if torch.cuda.get_device_capability(query.device) < (8, 0):
        return "needs compute capability 8.0+ (mma.sync bf16/fp16 with fp32 accumulation)"
    return cuda_library.device_reason(query.device)


def block_sparse_attention_cuda(query, key, value, block_mask, block_q, block_k, dense_mask=None, scale=None):
    """Run the kernel (the caller checked :func:`unsupported_reason`). Returns ``[B, H, Lq, Dv]`` in query.dtype."""
    lib = cuda_library.load()
    q, k, v = (t if _rows_aligned(t) else t.contiguous() for t in (query, key, value))
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    out = torch.empty(b, h, lq, dv, dtype=q.dtype, device=q.device)
    bm = block_mask.detach().to("cpu", torch.bool).contiguous()
    tiles, bm_dev = _device_tables(bm.numpy().tobytes(), tuple(bm.shape), lq, lk, block_q, block_k,
                                   dense_mask is not None, str(q.device))
    prm = cuda_library.BlockSparseAttnParams()
    prm.q, prm.k, prm.v, prm.out = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
    prm.tiles, prm.block_mask = tiles.data_ptr(), bm_dev.data_ptr()
    if dense_mask is not None:
        dm = dense_mask.expand(b, h, lq, lk)  # broadcast dims get stride 0; bool elements are single bytes
        prm.dense_mask = dm.data_ptr()
        prm.dm_sb, prm.dm_sh, prm.dm_sq, prm.dm_sk = dm.stride()
    prm.q_sb, prm.q_sh, prm.q_sl = q.stride()[:3]
    prm.k_sb, prm.k_sh, prm.k_sl = k.stride()[:3]
    prm.v_sb, prm.v_sh, prm.v_sl = v.stride()[:3]
    prm.o_sb, prm.o_sh, prm.o_sl = out.stride()[:3]
    prm.batch, prm.heads, prm.len_q, prm.len_k, prm.head_dim, prm.value_dim = b, h, lq, lk, d, dv
    prm.block_q, prm.block_k = block_q, block_k
    prm.scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    prm.dtype = _DTYPES[q.dtype]
    with torch.cuda.device(q.device):
        status = lib.call("vopt_block_sparse_attn_fwd", ctypes.byref(prm), cuda_library.current_stream_handle(q))
    lib.check(status, "vopt_block_sparse_attn_fwd")
    return out

"""``vopt::block_sparse_attention``: masked attention that computes only the live key blocks per query block.

    vopt::block_sparse_attention(Tensor query, Tensor key, Tensor value, Tensor block_mask,
                                 int block_q, int block_k, Tensor? dense_mask=None, float? scale=None) -> Tensor

``query [B, H, Q, D]``, ``key``/``value [B, H, K, D(v)]`` (same heads; no GQA), ``block_mask`` bool
``[ceil(Q / block_q), ceil(K / block_k)]`` (True = the tile holds a visible element, shared by every
batch and head), ``dense_mask`` bool broadcastable to ``[B, H, Q, K]`` (True = visible) or ``None``
(every element of a live tile is visible). The result equals
``reference_attention(q, k, v, attn_mask=dense_mask & expand(block_mask))``; when the block mask is
conservative for ``dense_mask`` (every visible element lies in a live tile, e.g.
:meth:`~vopt.ops.ccam_mask.CCAMMask.block_mask`) that is ``reference_attention(q, k, v, attn_mask=dense_mask)``.
Rows that see no key output 0 (as :func:`~vopt.ops.attention.reference_attention`).

Backends: ``cuda`` (``libvopt_cuda.so``'s exact mma.sync kernel on 64 x 64 tiles, fp16/bf16, head dims up to
128; :mod:`vopt.ops.block_sparse_cuda`), ``triton`` (:mod:`vopt.kernels.block_sparse_attention`, fp16/fp32, CUDA
or CPU under the interpreter) and ``reference`` (:func:`block_sparse_attention_reference`, torch, any device).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch

from .. import cuda_library
from ..dispatch import kernel_op

OP_NAME = "vopt::block_sparse_attention"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

BLOCK_SPARSE_ATTENTION = kernel_op(OP_NAME)

__all__ = [
    "BLOCK_SPARSE_ATTENTION",
    "block_mask_from_dense",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "validate",
]


def block_mask_from_dense(dense: torch.Tensor, block_q: int, block_k: int):
    """``(live, full)`` bool ``[nQB, nKB]`` of a bool mask ``[..., Q, K]`` (reduced over leading dims).

    ``live``: any element visible (in any batch/head); ``full``: every in-range element visible (in all).
    Generic (any mask); :class:`~vopt.ops.ccam_mask.CCAMMask` computes the same analytically.
    """
    d = dense.reshape(-1, *dense.shape[-2:]) if dense.dim() > 2 else dense[None]
    n, q, k = d.shape
    nqb, nkb = -(-q // block_q), -(-k // block_k)
    pad = torch.zeros(n, nqb * block_q, nkb * block_k, dtype=torch.bool, device=d.device)
    pad[:, :q, :k] = d
    inr = torch.zeros_like(pad)
    inr[:, :q, :k] = True
    tiles = pad.view(n, nqb, block_q, nkb, block_k)
    live = tiles.any(dim=4).any(dim=2).any(dim=0)
    full = (tiles | ~inr.view(n, nqb, block_q, nkb, block_k)).all(dim=4).all(dim=2).all(dim=0)
    return live.cpu(), full.cpu()


def validate(query, key, value, block_mask, block_q, block_k, dense_mask=None, scale=None) -> None:
    """Raise ``TypeError``/``ValueError`` naming the offending argument."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP_NAME}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{OP_NAME}: {name} must be [B, H, N, D], got shape {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"{OP_NAME}: dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})")
    b, h, q, d = query.shape
    if key.shape[:2] != (b, h) or value.shape[:2] != (b, h):
        raise ValueError(f"{OP_NAME}: batch/heads differ: q {tuple(query.shape)}, k {tuple(key.shape)}, v {tuple(value.shape)}")
    if key.shape[-1] != d or value.shape[2] != key.shape[2]:
        raise ValueError(f"{OP_NAME}: incompatible q {tuple(query.shape)}, k {tuple(key.shape)}, v {tuple(value.shape)}")
    for name, v in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{OP_NAME}: {name} must be a positive integer, got {v!r}")
    nk = key.shape[2]
    want = (-(-q // block_q), -(-nk // block_k))
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool or tuple(block_mask.shape) != want:
        got = (block_mask.dtype, tuple(block_mask.shape)) if isinstance(block_mask, torch.Tensor) else type(block_mask).__name__
        raise ValueError(f"{OP_NAME}: block_mask must be bool {want} for Q={q}, K={nk}, blocks {block_q}x{block_k}; got {got}")
    if dense_mask is not None:
        if not isinstance(dense_mask, torch.Tensor) or dense_mask.dtype != torch.bool:
            raise TypeError(f"{OP_NAME}: dense_mask must be a bool Tensor (True = visible) or None")
        try:
            torch.broadcast_shapes(dense_mask.shape, (b, h, q, nk))
        except RuntimeError:
            raise ValueError(f"{OP_NAME}: dense_mask {tuple(dense_mask.shape)} does not broadcast to {(b, h, q, nk)}") from None
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"{OP_NAME}: scale must be a float or None, got {type(scale).__name__}")


def block_sparse_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: torch.Tensor,
    block_q: int,
    block_k: int,
    dense_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Torch reference: per query block, an online softmax over its live key blocks only.

    Computes in float32 (float64 for float64 inputs); returns ``query.dtype``. Dead tiles are never
    touched: no QK product, no exp, no PV for them.
    """
    validate(query, key, value, block_mask, block_q, block_k, dense_mask, scale)
    acc_t = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k, v = query.to(acc_t), key.to(acc_t), value.to(acc_t)
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    sm = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dm = None if dense_mask is None else dense_mask.expand(b, h, nq, nk)
    out = torch.zeros(b, h, nq, dv, dtype=acc_t, device=q.device)
    bm = block_mask.cpu()
    for qb in range(bm.shape[0]):
        r0, r1 = qb * block_q, min((qb + 1) * block_q, nq)
        qt = q[:, :, r0:r1]
        m = torch.full((b, h, r1 - r0, 1), float("-inf"), dtype=acc_t, device=q.device)
        l = torch.zeros_like(m)
        o = torch.zeros(b, h, r1 - r0, dv, dtype=acc_t, device=q.device)
        for kb in torch.nonzero(bm[qb]).flatten().tolist():
            c0, c1 = kb * block_k, min((kb + 1) * block_k, nk)
            s = torch.matmul(qt, k[:, :, c0:c1].transpose(-2, -1)) * sm
            if dm is not None:
                s = s.masked_fill(~dm[:, :, r0:r1, c0:c1], float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            m_use = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            alpha = torch.exp(m - m_use)
            p = torch.exp(s - m_use)
            l = l * alpha + p.sum(dim=-1, keepdim=True)
            o = o * alpha + torch.matmul(p, v[:, :, c0:c1])
            m = m_new
        out[:, :, r0:r1] = torch.where(l > 0, o / torch.where(l > 0, l, torch.ones_like(l)), torch.zeros_like(o))
    return out.to(query.dtype)


# ---- backends ----------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _triton_module():
    """``(module, None)`` or ``(None, reason)``: the Triton kernel module, imported once, never raising."""
    try:
        from vopt.kernels import block_sparse_attention as kernels
    except Exception as exc:
        return None, f"vopt.kernels.block_sparse_attention is not importable ({type(exc).__name__}: {exc})"
    return kernels, None


def _triton_available() -> Optional[str]:
    return _triton_module()[1]


def _triton_check(query, key, value, block_mask, block_q, block_k, dense_mask=None, scale=None) -> Optional[str]:
    if query.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 is not set)"
    kernels, why = _triton_module()
    if why:
        return why
    return kernels.unsupported_reason(query, key, value, block_mask, block_q, block_k, dense_mask)


def _cuda_check(query, key, value, block_mask, block_q, block_k, dense_mask=None, scale=None) -> Optional[str]:
    from . import block_sparse_cuda

    return block_sparse_cuda.unsupported_reason(query, key, value, block_mask, block_q, block_k, dense_mask, scale)


@BLOCK_SPARSE_ATTENTION.register("cuda", devices={"cuda"}, dtypes=(torch.float16, torch.bfloat16),
                                 available=cuda_library.unavailable_reason, check=_cuda_check)
def block_sparse_attention_cuda(query, key, value, block_mask, block_q, block_k, dense_mask=None, scale=None):
    """``libvopt_cuda.so``'s block-sparse kernel (:mod:`vopt.ops.block_sparse_cuda`)."""
    from . import block_sparse_cuda

    return block_sparse_cuda.block_sparse_attention_cuda(query, key, value, block_mask, block_q, block_k,
                                                         dense_mask, scale)


@BLOCK_SPARSE_ATTENTION.register("triton", devices={"cuda", "cpu"}, dtypes=(torch.float16, torch.float32),
                                 available=_triton_available, check=_triton_check)
def block_sparse_attention_triton(query, key, value, block_mask, block_q, block_k, dense_mask=None, scale=None):
    """The Triton kernel (:mod:`vopt.kernels.block_sparse_attention`)."""
    kernels, _ = _triton_module()
    return kernels.block_sparse_attention_triton(query, key, value, block_mask, block_q, block_k, dense_mask, scale)


@BLOCK_SPARSE_ATTENTION.register("reference", devices={"cpu", "cuda"}, dtypes=DTYPES)
def block_sparse_attention_reference_backend(query, key, value, block_mask, block_q, block_k, dense_mask=None, scale=None):
    """The torch reference as a backend."""
    return block_sparse_attention_reference(query, key, value, block_mask, block_q, block_k, dense_mask, scale)


# ---- the torch.library op ------------------------------------------------------


@torch.library.custom_op(OP_NAME, mutates_args=())
def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: torch.Tensor,
    block_q: int,
    block_k: int,
    dense_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Block-sparse masked attention through the backend chosen by :data:`BLOCK_SPARSE_ATTENTION`."""
    validate(query, key, value, block_mask, block_q, block_k, dense_mask, scale)
    return BLOCK_SPARSE_ATTENTION(query, key, value, block_mask, block_q, block_k, dense_mask, scale).contiguous()


@block_sparse_attention.register_fake
def _block_sparse_attention_fake(query, key, value, block_mask, block_q, block_k, dense_mask=None, scale=None):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))

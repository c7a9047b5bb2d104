"""``vopt::attention``: scaled-dot-product attention behind vopt's dispatcher.

Same signature and semantics as ``aten.scaled_dot_product_attention`` (inference
only: ``dropout_p`` must be 0). The graph passes rewrite SDPA nodes into this op;
later issues register faster (quantized) backends under the same registry.

The reference computes in float32 for fp16/bf16 inputs (float64 stays float64)
and defines correctness: ``softmax(q k^T * scale + mask) v``. Rows whose keys are
all masked out produce zeros, as PyTorch's CPU SDPA does.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..dispatch import Backend, kernel_op

ATTENTION = kernel_op("vopt::attention")


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask, dropout_p: float, enable_gqa: bool) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dim() < 2:
            raise ValueError(f"vopt::attention: {name} must be [..., L, D], got shape {tuple(t.shape)}")
    if dropout_p != 0.0:
        raise ValueError(f"vopt::attention is inference-only: dropout_p must be 0.0, got {dropout_p}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"vopt::attention: key head_dim {k.shape[-1]} != query head_dim {q.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"vopt::attention: key length {k.shape[-2]} != value length {v.shape[-2]}")
    if q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        if not enable_gqa:
            raise ValueError(
                f"vopt::attention: query has {q.shape[-3]} heads, key {k.shape[-3]}; pass enable_gqa=True for grouped-query attention"
            )
        if q.shape[-3] % k.shape[-3]:
            raise ValueError(f"vopt::attention: query heads {q.shape[-3]} not a multiple of key heads {k.shape[-3]}")
    if attn_mask is not None and attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"vopt::attention: attn_mask must be bool or floating point, got {attn_mask.dtype}")


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Exact attention in float32 (float64 for float64 inputs); returns ``query.dtype``."""
    _validate(query, key, value, attn_mask, dropout_p, enable_gqa)
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k, v = query.to(acc), key.to(acc), value.to(acc)
    if q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    L, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    allowed = None
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask if allowed is None else allowed & attn_mask
        else:
            scores = scores + attn_mask.to(acc)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    # A fully masked row has max = -inf; zero it instead of producing NaN.
    row_max = scores.amax(dim=-1, keepdim=True)
    dead = torch.isneginf(row_max)
    probs = torch.exp(scores - torch.where(dead, torch.zeros_like(row_max), row_max))
    denom = probs.sum(dim=-1, keepdim=True)
    probs = torch.where(dead, torch.zeros_like(probs), probs / torch.where(dead, torch.ones_like(denom), denom))
    return torch.matmul(probs, v).to(query.dtype)


ATTENTION.register(
    Backend.REFERENCE,
    devices=("cpu", "cuda"),
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
)(reference_attention)


@torch.library.custom_op("vopt::attention", mutates_args=())
def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Attention dispatched CUDA -> Triton -> reference (see module docstring)."""
    out = ATTENTION(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    # Opaque ops must return fresh, contiguous tensors matching the fake.
    return out.contiguous()


@attention.register_fake
def _attention_fake(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    _validate(query, key, value, attn_mask, dropout_p, enable_gqa)
    return query.new_empty((*query.shape[:-1], value.shape[-1]))

"""Salient visual tokens for KV-cache protection (spec ``kvcache.md`` §1.4, "STP").

The published VidKV code scores each projected visual token by its **raw dot product** with the embeddings of the
text after the video (question + assistant prompt), **averaged** over the text tokens, once at the language model's
input (layer 0), and keeps the top ``p = 0.2`` of them at 2 bits. vopt keeps the chosen tokens in **full precision**
(``VidKVCache(protected=...)``) instead, and does not copy the reference's rounding to multiples of 32, its "drop the
last 32" or its hard-coded "+14" offset (§1.7): the scoring functions here return indices into the visual axis and the
caller maps them to sequence positions.

Functions (all deterministic; ties go to the earlier position; invalid arguments raise
:class:`~vopt.errors.ConfigError` naming the argument):

* :func:`by_text_similarity` -- ``visual_embeds [T_v, D]`` vs ``text_embeds [T_t, D]``; ``metric`` ``'dot'``
  (reference) or ``'cosine'``; ``reduce`` ``'mean'`` (reference) or ``'max'`` over text tokens;
* :func:`by_last_token_attention` -- attention weights of the last prompt token over the visual keys, averaged over
  every leading axis (layers, heads); either given (``attn_weights [..., T]``) or computed from ``q_last [..., H, D]``
  and ``keys [..., H_kv, T, D]`` (softmax over all ``T`` keys given, GQA by head repetition);
* :func:`by_random` -- the control of the paper's Tab. 3 (random tokens protected), seeded;
* :func:`top_fraction` -- the shared selection: ``k = round_half_up(fraction · N)``, at least 1 when
  ``fraction > 0`` and ``N > 0``; returns ``k`` indices sorted ascending;
* :func:`salient_visual_tokens` -- dispatch by name (:data:`SALIENCE_METHODS`).

Note the spec's finding (§1.4.5): protecting salient tokens barely beats protecting random ones; measure both.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import ConfigError

__all__ = ["SALIENCE_METHODS", "by_last_token_attention", "by_random", "by_text_similarity", "salient_visual_tokens",
           "top_fraction", "fraction_count"]

#: Names accepted by :func:`salient_visual_tokens` (and the ``vidkv`` pass's ``salience`` option).
SALIENCE_METHODS = ("text_similarity", "last_token_attention", "random")


def _check_fraction(fraction, where: str = "fraction") -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(float(fraction)) \
            or not 0.0 <= float(fraction) <= 1.0:
        raise ConfigError(f"{where} must be a number in [0, 1] (share of visual tokens kept), got {fraction!r}")
    return float(fraction)


def fraction_count(fraction: float, n: int) -> int:
    """``round_half_up(fraction · n)``, at least 1 when ``fraction > 0`` and ``n > 0`` (e.g. 0.25 · 33 -> 8)."""
    fraction = _check_fraction(fraction)
    if n <= 0 or fraction == 0.0:
        return 0
    return min(n, max(1, int(math.floor(fraction * n + 0.5))))


def top_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (int64, ascending) of the top :func:`fraction_count` entries of 1-D ``scores``; ties: earlier first."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ConfigError(f"scores must be a 1-D tensor, got {getattr(scores, 'shape', type(scores).__name__)}")
    k = fraction_count(fraction, scores.shape[0])
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    s = scores.detach().float().nan_to_num(nan=-math.inf)
    order = torch.sort(s, descending=True, stable=True).indices  # stable: equal scores keep position order
    return torch.sort(order[:k]).values


def _check_2d(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ConfigError(f"{name} must be a 2-D tensor [tokens, dim], got "
                          f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    return t


def by_text_similarity(visual_embeds: torch.Tensor, text_embeds: torch.Tensor, fraction: float,
                       metric: str = "dot", reduce: str = "mean") -> torch.Tensor:
    """Visual tokens most similar to the text (question) tokens: indices into ``visual_embeds`` (ascending).

    ``score_i = reduce_j sim(visual_embeds[i], text_embeds[j])``. Defaults reproduce the reference (§1.4.2: raw dot
    product, mean over text tokens, computed at layer-0 input); ``metric='cosine'`` normalises both sides first.
    """
    v, t = _check_2d(visual_embeds, "visual_embeds"), _check_2d(text_embeds, "text_embeds")
    if v.shape[1] != t.shape[1]:
        raise ConfigError(f"text_embeds must have the width of visual_embeds ({v.shape[1]}), got {t.shape[1]}")
    if metric not in ("dot", "cosine"):
        raise ConfigError(f"metric must be 'dot' (reference) or 'cosine', got {metric!r}")
    if reduce not in ("mean", "max"):
        raise ConfigError(f"reduce must be 'mean' (reference) or 'max', got {reduce!r}")
    _check_fraction(fraction)
    if t.shape[0] == 0:
        raise ConfigError("text_embeds must hold at least one text token")
    v, t = v.detach().float(), t.detach().float()
    if metric == "cosine":
        v = torch.nn.functional.normalize(v, dim=-1)
        t = torch.nn.functional.normalize(t, dim=-1)
    sim = v @ t.T  # [T_v, T_t]
    scores = sim.mean(1) if reduce == "mean" else sim.amax(1)
    return top_fraction(scores, fraction)


def by_last_token_attention(fraction: float, attn_weights: Optional[torch.Tensor] = None, *,
                            q_last: Optional[torch.Tensor] = None, keys: Optional[torch.Tensor] = None,
                            visual_index: Optional[torch.Tensor] = None,
                            key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Visual tokens the last prompt token attends to most: indices into the visual axis (ascending).

    Either ``attn_weights [..., T]`` (the last query's weights; every leading axis, e.g. layers and heads, is
    averaged) or ``q_last [..., H, D]`` with ``keys [..., H_kv, T, D]`` (same leading axes; ``H`` a multiple of
    ``H_kv``): weights = ``softmax(q·kᵀ/√D)`` over the ``T`` keys (``key_mask [T]`` bool: False keys, e.g. padding,
    get weight 0). ``visual_index`` (int ``[T_v]``): the key positions that are visual (default: all ``T``); the
    result indexes ``visual_index``.
    """
    _check_fraction(fraction)
    if attn_weights is None:
        if q_last is None or keys is None:
            raise ConfigError("by_last_token_attention needs attn_weights, or both q_last and keys")
        if not isinstance(q_last, torch.Tensor) or q_last.dim() < 2:
            raise ConfigError(f"q_last must be a tensor [..., heads, head_dim], got "
                              f"{getattr(q_last, 'shape', type(q_last).__name__)}")
        if not isinstance(keys, torch.Tensor) or keys.dim() != q_last.dim() + 1 \
                or keys.shape[:-3] != q_last.shape[:-2] or keys.shape[-1] != q_last.shape[-1]:
            raise ConfigError(f"keys must be [..., kv_heads, T, head_dim] matching q_last {tuple(q_last.shape)}, got "
                              f"{getattr(keys, 'shape', type(keys).__name__)}")
        H, Hkv = q_last.shape[-2], keys.shape[-3]
        if H % Hkv:
            raise ConfigError(f"q_last heads ({H}) must be a multiple of keys' kv heads ({Hkv})")
        k = keys.detach().float().repeat_interleave(H // Hkv, dim=-3)  # [..., H, T, D]
        logits = (k @ q_last.detach().float().unsqueeze(-1)).squeeze(-1) / math.sqrt(q_last.shape[-1])  # [..., H, T]
        if key_mask is not None:
            km = torch.as_tensor(key_mask, device=logits.device)
            if km.dtype != torch.bool or km.shape != logits.shape[-1:]:
                raise ConfigError(f"key_mask must be a bool tensor [{logits.shape[-1]}], got "
                                  f"{km.dtype} {tuple(km.shape)}")
            logits = logits.masked_fill(~km, -math.inf)
        attn_weights = torch.softmax(logits, dim=-1)
    elif q_last is not None or keys is not None:
        raise ConfigError("by_last_token_attention takes attn_weights or (q_last, keys), not both")
    if not isinstance(attn_weights, torch.Tensor) or attn_weights.dim() < 1:
        raise ConfigError(f"attn_weights must be a tensor [..., T], got "
                          f"{getattr(attn_weights, 'shape', type(attn_weights).__name__)}")
    w = attn_weights.detach().float().reshape(-1, attn_weights.shape[-1]).mean(0)  # average layers / heads
    if visual_index is not None:
        vi = torch.as_tensor(visual_index, device=w.device).reshape(-1).long()
        if vi.numel() and (int(vi.min()) < 0 or int(vi.max()) >= w.shape[0]):
            raise ConfigError(f"visual_index must lie in [0, {w.shape[0]}), got range [{int(vi.min())}, "
                              f"{int(vi.max())}]")
        w = w[vi]
    return top_fraction(w, fraction)


def by_random(n_visual: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """``fraction_count(fraction, n_visual)`` random visual indices (ascending), reproducible from ``seed``."""
    if isinstance(n_visual, bool) or not isinstance(n_visual, int) or n_visual < 0:
        raise ConfigError(f"n_visual must be an integer >= 0, got {n_visual!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    k = fraction_count(fraction, n_visual)
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n_visual, generator=g)[:k]).values


def salient_visual_tokens(method: str, fraction: float, **kwargs) -> torch.Tensor:
    """Dispatch: ``'text_similarity'`` -> :func:`by_text_similarity` (``visual_embeds``, ``text_embeds``, ...),
    ``'last_token_attention'`` -> :func:`by_last_token_attention`, ``'random'`` -> :func:`by_random`
    (``n_visual``, ``seed``)."""
    if method == "text_similarity":
        return by_text_similarity(fraction=fraction, **kwargs)
    if method == "last_token_attention":
        return by_last_token_attention(fraction, **kwargs)
    if method == "random":
        return by_random(fraction=fraction, **kwargs)
    raise ConfigError(f"method must be one of {', '.join(SALIENCE_METHODS)}, got {method!r}")

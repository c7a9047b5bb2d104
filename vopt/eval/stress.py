"""Synthetic attention inputs with the activation statistics quantized attention fears.

Random Gaussian Q/K/V are the easy case for a quantized attention kernel. Real
LLM and ViT activations are not Gaussian (see ``shared/specs/attention.md``):

* K has a large per-channel mean shared by all tokens (the motivation for
  SageAttention's K smoothing: one per-tensor scale wastes its range on the bias);
* K and Q have a few outlier channels, an order of magnitude larger than the rest;
* V is heavy-tailed;
* static video frames and padding repeat identical tokens, so keys can tie;
* sequences are long (thousands of keys), where accumulation error builds up.

:func:`attention_stress_inputs` generates each of these, or all at once
(``"mixed"``), deterministically from a seed, for the kernel tests to share.
"""
from __future__ import annotations

from enum import Enum
from typing import Optional, Union

import torch

from ..errors import ConfigError

__all__ = ["StressKind", "attention_stress_inputs", "LONG_SEQUENCE_KV_LEN"]

#: Default number of keys for ``long_sequence`` and ``mixed`` when ``kv_len`` is not given.
LONG_SEQUENCE_KV_LEN = 4096

# Magnitudes of the synthetic statistics, relative to unit-variance activations.
K_BIAS_SCALE = 8.0          # per-channel K mean ~ N(0, 8^2): |mean| ~ 6x the per-channel std
K_OUTLIER_SCALE = 20.0      # outlier K channels are 20x larger than the others
Q_OUTLIER_SCALE = 10.0      # outlier Q channels are 10x larger than the others
V_STUDENT_DF = 3            # Student-t with 3 degrees of freedom: infinite kurtosis
REPEATED_KEYS = 16          # "mixed": this many leading keys are identical (a static frame)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class StressKind(str, Enum):
    """The activation statistics :func:`attention_stress_inputs` can generate."""

    GAUSSIAN = "gaussian"                      # i.i.d. N(0, 1): the easy baseline
    K_CHANNEL_BIAS = "k_channel_bias"          # K += a per-(head, channel) bias shared by all tokens
    K_OUTLIER_CHANNELS = "k_outlier_channels"  # a few K channels scaled by K_OUTLIER_SCALE
    Q_OUTLIERS = "q_outliers"                  # a few Q channels scaled by Q_OUTLIER_SCALE
    HEAVY_TAILED_V = "heavy_tailed_v"          # V ~ Student-t(V_STUDENT_DF)
    ALL_EQUAL_ROWS = "all_equal_rows"          # every key row identical: all scores tie, attention is uniform
    LONG_SEQUENCE = "long_sequence"            # Gaussian with LONG_SEQUENCE_KV_LEN keys by default
    MIXED = "mixed"                            # all of the above at once (REPEATED_KEYS identical leading keys)


def _accepted_kinds() -> str:
    return ", ".join(k.value for k in StressKind)


def _parse_kind(kind: Union[str, StressKind]) -> StressKind:
    if isinstance(kind, StressKind):
        return kind
    if isinstance(kind, str):
        try:
            return StressKind(kind)
        except ValueError:
            pass
    raise ConfigError(f"kind must be one of {_accepted_kinds()}, got {kind!r}")


def _positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ConfigError(f"{name} must be a positive integer{extra}, got {value!r}")


def _scale_outliers(gen: torch.Generator, x: torch.Tensor, scale: float) -> torch.Tensor:
    """Multiply ~1/16 of the channels of each head of ``x`` [B, H, L, D] by ``scale`` (different channels per head)."""
    heads, head_dim = x.shape[1], x.shape[3]
    count = max(1, head_dim // 16)
    mult = torch.ones(heads, 1, head_dim)
    for h in range(heads):
        mult[h, 0, torch.randperm(head_dim, generator=gen)[:count]] = scale
    return x * mult


def _student_t(gen: torch.Generator, shape, df: int) -> torch.Tensor:
    """Student-t samples built from normals (z / sqrt(chi2_df / df)), so the generator makes them deterministic."""
    z = torch.randn(shape, generator=gen)
    chi2 = torch.randn((df, *shape), generator=gen).square().sum(0)
    return z / torch.sqrt(chi2 / df)


def attention_stress_inputs(
    kind: Union[str, StressKind],
    *,
    batch: int = 1,
    heads: int = 4,
    kv_heads: Optional[int] = None,
    q_len: int = 128,
    kv_len: Optional[int] = None,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(q, k, v)`` with the statistics named by ``kind`` (see :class:`StressKind`).

    Shapes: ``q`` is ``[batch, heads, q_len, head_dim]``; ``k`` and ``v`` are
    ``[batch, kv_heads, kv_len, head_dim]``. ``kv_heads`` defaults to ``heads``;
    fewer KV heads (a divisor of ``heads``) gives grouped-query attention (call
    the attention with ``enable_gqa=True``). ``kv_len`` defaults to ``q_len``,
    or to :data:`LONG_SEQUENCE_KV_LEN` for ``long_sequence`` and ``mixed``.

    Values are generated in float32 on the CPU from ``torch.Generator`` seeded
    with ``seed`` (same arguments, same tensors), then cast to ``dtype``. Use the
    default scale ``1/sqrt(head_dim)``; all values stay well inside the float16
    range (|x| of a few hundred at most).

    Raises :class:`~vopt.errors.ConfigError` (a ``ValueError``) naming the bad
    argument and the accepted values.
    """
    kind = _parse_kind(kind)
    for name, value in (("batch", batch), ("heads", heads), ("q_len", q_len), ("head_dim", head_dim)):
        _positive_int(name, value)
    _positive_int("kv_heads", kv_heads, allow_none=True)
    _positive_int("kv_len", kv_len, allow_none=True)
    kv_heads = heads if kv_heads is None else kv_heads
    if heads % kv_heads:
        raise ConfigError(f"kv_heads must divide heads ({heads}), got {kv_heads}")
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(str(d) for d in _DTYPES)}, got {dtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if kv_len is None:
        kv_len = LONG_SEQUENCE_KV_LEN if kind in (StressKind.LONG_SEQUENCE, StressKind.MIXED) else q_len

    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    mixed = kind is StressKind.MIXED

    if kind is StressKind.ALL_EQUAL_ROWS:
        k = k[:, :, :1].expand_as(k).clone()
    if mixed:
        n = min(REPEATED_KEYS, kv_len)
        k[:, :, :n] = k[:, :, :1]
    if kind is StressKind.K_OUTLIER_CHANNELS or mixed:
        k = _scale_outliers(gen, k, K_OUTLIER_SCALE)
    if kind is StressKind.K_CHANNEL_BIAS or mixed:
        k = k + K_BIAS_SCALE * torch.randn(1, kv_heads, 1, head_dim, generator=gen)
    if kind is StressKind.Q_OUTLIERS or mixed:
        q = _scale_outliers(gen, q, Q_OUTLIER_SCALE)
    if kind is StressKind.HEAVY_TAILED_V or mixed:
        v = _student_t(gen, v.shape, V_STUDENT_DF)
    return q.to(dtype), k.to(dtype), v.to(dtype)

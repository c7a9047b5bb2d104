"""VidKV and KIVI KV-cache quantizers with really packed storage (spec ``kvcache.md`` §1, §3).

Inputs are one layer's keys or values ``[B, H, T, D]`` (post-RoPE for keys, spec §1). Tokens are quantized in groups
of ``G`` consecutive tokens; the last ``T mod G`` tokens do not fill a group and are kept as fp16 in the container's
``tail`` (counted as *unquantized* by :func:`vopt.kvcache.account`; the cache keeps them in its FP16 residual, §1.5).

Keys (§1.2): channels are ranked by range ``max - min`` over tokens; the top ``int(D·anomalous_fraction)`` are
*anomalous* and get the 2-bit asymmetric primitive ``Q2`` per channel; the others ("easy") are transformed by an FFT
along the channel axis and each real coefficient gets a 1-bit sign code with one scale per group.

* ``mode="reference"`` follows the published code (§1.1, §1.2): one split per layer, pooled over ``B·H·T``;
  full complex ``fft`` (``2·D_easy`` reals, Hermitian-redundant); sign codes decoded to ``{0, s}`` with
  ``s = mean|x|``; the all-zero zero points it stores are stored too; ``ifft(...).real``.
* ``mode="recommended"`` (§3 ``vidkv``): one split per ``(sample, KV head)``, indices stored; ``rfft`` keeping exactly
  ``D_easy`` reals (the always-zero imaginary parts of the DC and Nyquist bins are dropped); codes decoded to
  ``±s`` with ``s = mean|x|`` (the least-squares scale of a sign code); only used metadata stored.

Values (§1.3): ternary ``Q3`` with threshold ``t = γ·mean|v|`` per group, along tokens per channel
(``value_axis="channel"``, VidKV) or along ``G`` channels per token (``value_axis="token"``, KIVI). Reference: no scale
(decoded value is the code itself), codes stored as 2-bit ``q + 1`` with the unused scale (ones) and zero (−1) the
published code stores. Recommended: trits packed five per byte, and (``value_scale``) a real per-group scale, the
least-squares one for fixed codes: the mean of ``|v|`` over the group's nonzero codes. ``value_codec="int2"`` uses
``Q2`` instead (``bV = 2``).

KIVI-2 (§4) is :func:`kivi_config`: every key channel ``Q2`` per channel, values ``Q2`` per token, group ``G``.

Every scale and zero point is rounded to ``metadata_dtype`` *before* the codes are computed, so codes and stored
metadata agree. Containers hold only packed integer words, metadata tensors, channel indices and the fp16 tail;
inputs are never modified.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Optional, Sequence

import torch

from ..config import VoptConfig, config_field, register_config
from ..errors import ConfigError
from .packing import pack_bits, pack_trits, unpack_bits, unpack_trits

__all__ = [
    "KVQuantMode", "ChannelSplit", "ValueCodec", "ValueAxis", "TritPacking", "MetadataDtype", "VidKVConfig",
    "kivi_config", "PackedCodes", "PackedKeys", "PackedValues", "quantize_keys", "dequantize_keys",
    "quantize_values", "dequantize_values", "concat_blocks", "INDEX_DTYPE", "TAIL_DTYPE",
]

#: Channel indices are stored as int16 (head dims are far below 32768).
INDEX_DTYPE = torch.int16
#: Tokens that do not fill a group are kept in this dtype.
TAIL_DTYPE = torch.float16


class KVQuantMode(str, Enum):
    """Which VidKV behaviour to follow (spec §3)."""

    REFERENCE = "reference"      # the published KD-TAO/VidKV code, defects of storage included (§1.1-1.2)
    RECOMMENDED = "recommended"  # rfft, ±s signs, per-head split, only used metadata (§3 "vidkv")


class ChannelSplit(str, Enum):
    """Scope of the anomalous/easy key channel split."""

    LAYER = "layer"  # one split per layer, ranges pooled over batch, heads and tokens (reference, §1.2.1)
    HEAD = "head"    # one split per (sample, KV head): batch-independent (§3)


class ValueCodec(str, Enum):
    """How values are quantized."""

    TERNARY = "ternary"  # Q3: {-1, 0, 1}, 1.58-bit nominal
    INT2 = "int2"        # Q2: 2-bit asymmetric (VidKV bV=2, KIVI)


class ValueAxis(str, Enum):
    """Grouping of values (spec §1.3)."""

    CHANNEL = "channel"  # per-channel: a group is G consecutive tokens of one channel (VidKV)
    TOKEN = "token"      # per-token: a group is G consecutive channels of one token (KIVI)


class TritPacking(str, Enum):
    """Storage of ternary codes."""

    BASE3 = "base3"    # five trits per byte: 1.6 bits
    TWO_BIT = "2bit"   # code q + 1 at 2 bits, 16 per int32 (reference)


class MetadataDtype(str, Enum):
    """dtype of stored scales and zero points."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


_META_TORCH = {MetadataDtype.FLOAT16: torch.float16, MetadataDtype.BFLOAT16: torch.bfloat16,
               MetadataDtype.FLOAT32: torch.float32}


@register_config
@dataclass
class VidKVConfig(VoptConfig):
    """Numerics of the VidKV / KIVI quantizers (:func:`quantize_keys`, :func:`quantize_values`)."""

    mode: KVQuantMode = config_field(
        KVQuantMode.RECOMMENDED,
        help="'reference' reproduces the published VidKV code (full complex FFT, {0,s} signs, layer-pooled split, "
        "unused metadata stored; spec §1.1-1.2); 'recommended' uses rfft, ±s signs, a per-head split and stores only "
        "used metadata (spec §3).",
    )
    anomalous_fraction: float = config_field(
        0.5,
        help="Fraction of key channels (ranked by range) quantized with 2-bit Q2; the rest go through FFT + 1-bit "
        "signs. k = int(D·fraction): 0.5 is VidKV's '1.5-bit' keys, 1.0 is plain 2-bit keys, 0.0 FFT-1-bit only.",
    )
    key_group_size: int = config_field(32, help="G for keys: tokens per quantization group (spec §1, default 32).")
    value_group_size: int = config_field(
        32, help="G for values: tokens per group (value_axis='channel') or channels per group (value_axis='token')."
    )
    channel_split: Optional[ChannelSplit] = config_field(
        None,
        help="'layer' (one key split pooled over batch, heads and tokens; the reference) or 'head' (one split per "
        "sample and KV head, indices stored). None = 'layer' in reference mode, 'head' in recommended mode.",
    )
    value_codec: ValueCodec = config_field(
        ValueCodec.TERNARY, help="'ternary' (Q3, 1.58-bit nominal) or 'int2' (Q2, 2-bit asymmetric) values."
    )
    value_axis: ValueAxis = config_field(
        ValueAxis.CHANNEL,
        help="'channel' groups G tokens of one channel (VidKV); 'token' groups G channels of one token (KIVI; text "
        "LLMs need it, spec §1.3).",
    )
    value_gamma: Optional[float] = config_field(
        None,
        help="Ternary threshold t = gamma·mean|v| per group. None = 0.5 (reference code) or 0.7 (paper, recommended).",
    )
    value_scale: Optional[bool] = config_field(
        None,
        help="Ternary values: store a real per-group scale (mean |v| over nonzero codes, the least-squares scale). "
        "None = False in reference mode (decoded value is the code), True in recommended mode.",
    )
    trit_packing: Optional[TritPacking] = config_field(
        None,
        help="Ternary storage: 'base3' (5 trits per byte, 1.6 bits) or '2bit' (code q+1 at 2 bits). None = '2bit' in "
        "reference mode, 'base3' in recommended mode.",
    )
    metadata_dtype: MetadataDtype = config_field(
        MetadataDtype.FLOAT16, help="dtype of stored scales and zero points: 'float16', 'bfloat16' or 'float32'."
    )

    def validate(self) -> None:
        name = type(self).__name__
        ref = self.mode is KVQuantMode.REFERENCE
        if self.channel_split is None:
            self.channel_split = ChannelSplit.LAYER if ref else ChannelSplit.HEAD
        if self.value_gamma is None:
            self.value_gamma = 0.5 if ref else 0.7
        if self.value_scale is None:
            self.value_scale = not ref
        if self.trit_packing is None:
            self.trit_packing = TritPacking.TWO_BIT if ref else TritPacking.BASE3
        if not (0.0 <= self.anomalous_fraction <= 1.0) or math.isnan(self.anomalous_fraction):
            raise ConfigError(
                f"{name}.anomalous_fraction must lie in [0, 1] (e.g. 0.5 for 1.5-bit keys), got {self.anomalous_fraction}"
            )
        for fname in ("key_group_size", "value_group_size"):
            if getattr(self, fname) < 1:
                raise ConfigError(f"{name}.{fname} must be a positive integer (e.g. 32), got {getattr(self, fname)}")
        if not (self.value_gamma >= 0.0) or math.isinf(self.value_gamma):
            raise ConfigError(f"{name}.value_gamma must be a finite number >= 0 (e.g. 0.7), got {self.value_gamma}")
        if ref and self.value_scale:
            raise ConfigError(
                f"{name}.value_scale must be False (or None) in mode='reference': the published ternary values carry "
                f"no scale (spec §1.1); accepted: False, None, or use mode='recommended'"
            )

    @property
    def meta_dtype(self) -> torch.dtype:
        """The torch dtype of stored scales and zero points."""
        return _META_TORCH[self.metadata_dtype]


def kivi_config(group_size: int = 32, metadata_dtype: str = "float16") -> VidKVConfig:
    """KIVI-2 (spec §4) as a :class:`VidKVConfig`: 2-bit asymmetric keys per channel, values per token, group G."""
    return VidKVConfig(
        mode=KVQuantMode.RECOMMENDED, anomalous_fraction=1.0, key_group_size=group_size, value_group_size=group_size,
        value_codec=ValueCodec.INT2, value_axis=ValueAxis.TOKEN, metadata_dtype=metadata_dtype,
    )


# ---------------------------------------------------------------------------------------------------------------
# Packed containers
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PackedCodes:
    """One packed code tensor and its group metadata.

    ``shape`` is the logical grouped code shape ``[..., G]`` (group elements last); ``scale``/``zero`` have shape
    ``shape[:-1]``. The codes are flattened before packing, so at most one word of padding per tensor. ``decode``:

    * ``"affine"``: ``code·scale + zero`` (``Q2``; reference ``Q1sign`` with its zero points; reference ternary);
    * ``"pm_sign"``: ``(2·code − 1)·scale`` (recommended ``Q1sign``);
    * ``"trit"``: ``q·scale`` (base-3 packed ``q`` in {-1, 0, 1}; ``scale`` may be None, then ``q``);
    * ``"trit2"``: ``(code − 1)·scale`` (ternary stored as 2-bit ``q + 1`` without a zero point).
    """

    words: torch.Tensor
    bits: int                       # 1, 2, 4, 8, or 0 for base-3 trits
    shape: tuple
    decode: str
    scale: Optional[torch.Tensor] = None
    zero: Optional[torch.Tensor] = None

    def codes(self) -> torch.Tensor:
        """The unpacked codes (``uint8``, or ``int8`` trits), shape :attr:`shape`."""
        n = math.prod(self.shape)
        if self.bits == 0:
            flat = unpack_trits(self.words, n)
        else:
            flat = unpack_bits(self.words, self.bits, n)
        return flat.reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 values, shape :attr:`shape`."""
        c = self.codes().to(torch.float32)
        s = None if self.scale is None else self.scale.to(torch.float32).unsqueeze(-1)
        if self.decode == "affine":
            out = c * s if s is not None else c
            return out + self.zero.to(torch.float32).unsqueeze(-1) if self.zero is not None else out
        if self.decode == "pm_sign":
            return (2.0 * c - 1.0) * s
        if self.decode in ("trit", "trit2"):
            q = c - 1.0 if self.decode == "trit2" else c
            return q * s if s is not None else q
        raise ValueError(f"unknown decode {self.decode!r}")

    def nbytes(self) -> dict:
        """``{"codes": bytes of packed words, "scales": bytes of scales and zero points}``."""
        meta = sum(t.numel() * t.element_size() for t in (self.scale, self.zero) if t is not None)
        return {"codes": self.words.numel() * self.words.element_size(), "scales": meta}


def _nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _sum_breakdown(parts, indices=None, tail=None) -> dict:
    out = {"codes": 0, "scales": 0, "indices": _nbytes(indices), "unquantized": _nbytes(tail)}
    for p in parts:
        if p is not None:
            for k, v in p.nbytes().items():
                out[k] += v
    return out


@dataclass
class PackedKeys:
    """One layer's quantized keys: ``Q2`` anomalous channels, FFT-sign easy channels, channel indices, fp16 tail."""

    shape: tuple                         # original [B, H, T, D]
    dtype: torch.dtype                   # dtype of the input (and of the dequantized output)
    mode: KVQuantMode
    group_size: int
    anomalous_idx: Optional[torch.Tensor]   # int16 [k] (layer split) or [B, H, k] (head split); None if k in {0, D}
    num_anomalous: int
    anomalous: Optional[PackedCodes]     # grouped [B, H, Tq/G, k, G]
    easy: Optional[PackedCodes]          # grouped [B, H, Tq/G, C, G], C = D_easy (rfft) or 2·D_easy (reference fft)
    tail: Optional[torch.Tensor]         # fp16 [B, H, T mod G, D]

    @property
    def num_quantized_tokens(self) -> int:
        return self.shape[2] - (0 if self.tail is None else self.tail.shape[2])

    def numel(self) -> int:
        """Number of key elements represented."""
        return math.prod(self.shape)

    def nbytes(self) -> dict:
        """Stored bytes by category: codes, scales (and zero points), indices, unquantized (tail)."""
        return _sum_breakdown((self.anomalous, self.easy), self.anomalous_idx, self.tail)


@dataclass
class PackedValues:
    """One layer's quantized values: one packed code tensor, its metadata and the fp16 tail."""

    shape: tuple
    dtype: torch.dtype
    codec: ValueCodec
    axis: ValueAxis
    group_size: int
    codes: PackedCodes
    tail: Optional[torch.Tensor]

    def numel(self) -> int:
        """Number of value elements represented."""
        return math.prod(self.shape)

    def nbytes(self) -> dict:
        """Stored bytes by category: codes, scales (and zero points), indices (none), unquantized (tail)."""
        return _sum_breakdown((self.codes,), None, self.tail)


# ---------------------------------------------------------------------------------------------------------------
# Primitives on grouped tensors [..., G] (spec §1.1)
# ---------------------------------------------------------------------------------------------------------------
def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    flat = codes.reshape(-1)
    return pack_trits(flat) if bits == 0 else pack_bits(flat, bits)


def _q2(g: torch.Tensor, meta: torch.dtype) -> PackedCodes:
    """``Q2``: per-group min ``mn`` and ``s = (max − mn)/3``; code ``clamp(round((x − mn)/s), 0, 3)``."""
    mn = g.amin(-1).to(meta)
    s = ((g.amax(-1) - mn.float()) / 3.0).to(meta)
    s32 = s.float()
    safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
    codes = torch.clamp(torch.round((g - mn.float().unsqueeze(-1)) / safe.unsqueeze(-1)), 0, 3).to(torch.uint8)
    return PackedCodes(_pack(codes, 2), 2, tuple(codes.shape), "affine", s, mn)


def _q1sign(g: torch.Tensor, meta: torch.dtype, reference: bool) -> PackedCodes:
    """``Q1sign``: code ``1[x >= 0]``, ``s = mean|x|``; decoded ``{0, s}`` (reference, zero points stored) or ``±s``."""
    s = g.abs().mean(-1).to(meta)
    codes = (g >= 0).to(torch.uint8)
    if reference:
        return PackedCodes(_pack(codes, 1), 1, tuple(codes.shape), "affine", s, torch.zeros_like(s))
    return PackedCodes(_pack(codes, 1), 1, tuple(codes.shape), "pm_sign", s, None)


def ternary_codes(g: torch.Tensor, gamma: float) -> torch.Tensor:
    """``Q3`` codes of groups ``g [..., G]``: +1 if ``x > t``, −1 if ``x < −t``, else 0, ``t = gamma·mean|x|``."""
    t = (gamma * g.abs().mean(-1)).unsqueeze(-1)
    return (g > t).to(torch.int8) - (g < -t).to(torch.int8)


def ternary_scale(g: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Least-squares scale of fixed ternary codes: ``Σ|x|·[q≠0] / Σ[q≠0]`` per group (0 for an all-zero group)."""
    nz = (q != 0).to(g.dtype)
    count = nz.sum(-1)
    return torch.where(count > 0, (g.abs() * nz).sum(-1) / count.clamp(min=1), torch.zeros_like(count))


def _q3(g: torch.Tensor, cfg: VidKVConfig) -> PackedCodes:
    q = ternary_codes(g, cfg.value_gamma)
    meta = cfg.meta_dtype
    scale = ternary_scale(g, q).to(meta) if cfg.value_scale else None
    if cfg.trit_packing is TritPacking.BASE3:
        return PackedCodes(_pack(q, 0), 0, tuple(q.shape), "trit", scale, None)
    codes = (q + 1).to(torch.uint8)
    if cfg.mode is KVQuantMode.REFERENCE:  # the published code stores a scale of ones and a zero point of -1 (§1.1)
        ones = torch.ones(q.shape[:-1], dtype=meta, device=q.device)
        return PackedCodes(_pack(codes, 2), 2, tuple(codes.shape), "affine", ones, -ones)
    return PackedCodes(_pack(codes, 2), 2, tuple(codes.shape), "trit2", scale, None)


# ---------------------------------------------------------------------------------------------------------------
# Grouping helpers
# ---------------------------------------------------------------------------------------------------------------
def _check_input(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{what} must be [B, H, T, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {x.dtype}")


def _split_tail(x: torch.Tensor, G: int):
    """(full-group tokens as float32, fp16 tail or None)."""
    T = x.shape[2]
    Tq = T - T % G
    tail = x[:, :, Tq:, :].to(TAIL_DTYPE).clone() if Tq < T else None
    return x[:, :, :Tq, :].to(torch.float32), tail


def _group_tokens(x: torch.Tensor, G: int) -> torch.Tensor:
    """``[B, H, T, C]`` (T % G == 0) -> ``[B, H, T/G, C, G]``: per-channel groups of G tokens."""
    B, H, T, C = x.shape
    return x.reshape(B, H, T // G, G, C).transpose(-1, -2)


def _ungroup_tokens(g: torch.Tensor) -> torch.Tensor:
    B, H, n, C, G = g.shape
    return g.transpose(-1, -2).reshape(B, H, n * G, C)


def _with_tail(x: torch.Tensor, tail: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if tail is not None:
        x = torch.cat([x, tail.to(torch.float32)], dim=2)
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Keys (spec §1.2)
# ---------------------------------------------------------------------------------------------------------------
def _real_coefficients(x: torch.Tensor, reference: bool) -> torch.Tensor:
    """FFT of the easy channels ``[..., De]`` as real coefficients along the last axis.

    Reference: full complex ``fft`` → ``view_as_real`` interleaved, ``2·De`` reals. Recommended: ``rfft`` real parts
    (``De//2 + 1``) then the imaginary parts that are not identically zero (bins ``1 .. ceil(De/2) − 1``): exactly
    ``De`` reals, no Hermitian redundancy.
    """
    De = x.shape[-1]
    if reference:
        return torch.view_as_real(torch.fft.fft(x, dim=-1)).reshape(*x.shape[:-1], 2 * De)
    F = torch.fft.rfft(x, dim=-1)
    n_imag_end = F.shape[-1] - 1 if De % 2 == 0 else F.shape[-1]
    return torch.cat([F.real, F.imag[..., 1:n_imag_end]], dim=-1)


def _inverse_coefficients(r: torch.Tensor, De: int, reference: bool) -> torch.Tensor:
    """Inverse of :func:`_real_coefficients` (reference: ``ifft(...).real``)."""
    if reference:
        return torch.fft.ifft(torch.view_as_complex(r.reshape(*r.shape[:-1], De, 2).contiguous()), dim=-1).real
    nc = De // 2 + 1
    n_imag_end = nc - 1 if De % 2 == 0 else nc
    imag = torch.zeros(*r.shape[:-1], nc, dtype=r.dtype, device=r.device)
    imag[..., 1:n_imag_end] = r[..., nc:]
    return torch.fft.irfft(torch.complex(r[..., :nc], imag), n=De, dim=-1)


def _channel_order(kq: torch.Tensor, k: int, split: ChannelSplit):
    """(stored anomalous indices, easy index [B,H,De], anomalous index [B,H,k]), each ascending."""
    B, H, T, D = kq.shape
    if split is ChannelSplit.LAYER:
        flat = kq.reshape(-1, D)
        rng = (flat.amax(0) - flat.amin(0)).expand(B, H, D)
    else:
        rng = kq.amax(2) - kq.amin(2)  # [B, H, D]
    top = torch.topk(rng, k, dim=-1).indices if k else torch.empty(B, H, 0, dtype=torch.long, device=kq.device)
    is_anom = torch.zeros(B, H, D, dtype=torch.int8, device=kq.device).scatter_(-1, top, 1)
    order = torch.sort(is_anom, dim=-1, stable=True).indices  # easy channels first, each part ascending
    easy_idx, anom_idx = order[..., : D - k], order[..., D - k:]
    stored = None
    if 0 < k < D:
        stored = (anom_idx[0, 0] if split is ChannelSplit.LAYER else anom_idx).to(INDEX_DTYPE).clone()
    return stored, easy_idx, anom_idx


def _gather_channels(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, -1, idx.unsqueeze(2).expand(*x.shape[:3], idx.shape[-1]))


def quantize_keys(k: torch.Tensor, cfg: Optional[VidKVConfig] = None) -> PackedKeys:
    """Quantize one layer's keys ``[B, H, T, D]`` (spec §1.2; module docstring). ``k`` is not modified."""
    cfg = cfg or VidKVConfig()
    _check_input(k, "keys")
    G, meta = cfg.key_group_size, cfg.meta_dtype
    reference = cfg.mode is KVQuantMode.REFERENCE
    D = k.shape[-1]
    n_anom = int(D * cfg.anomalous_fraction)
    kq, tail = _split_tail(k, G)
    anomalous = easy = stored_idx = None
    if kq.shape[2] == 0:  # fewer tokens than one group: all in the fp16 tail, no split yet
        return PackedKeys(tuple(k.shape), k.dtype, cfg.mode, G, None, n_anom, None, None, tail)
    stored_idx, easy_idx, anom_idx = _channel_order(kq, n_anom, cfg.channel_split)
    if n_anom:
        anomalous = _q2(_group_tokens(_gather_channels(kq, anom_idx), G), meta)
    if n_anom < D:
        coeffs = _real_coefficients(_gather_channels(kq, easy_idx), reference)
        easy = _q1sign(_group_tokens(coeffs, G), meta, reference)
    return PackedKeys(tuple(k.shape), k.dtype, cfg.mode, G, stored_idx, n_anom, anomalous, easy, tail)


def _device(pk: PackedKeys) -> torch.device:
    for t in (pk.anomalous_idx, pk.tail):
        if t is not None:
            return t.device
    for p in (pk.anomalous, pk.easy):
        if p is not None:
            return p.words.device
    return torch.device("cpu")


def _stored_channel_order(pk: PackedKeys):
    B, H, T, D = pk.shape
    k = pk.num_anomalous
    if pk.anomalous_idx is None:  # k in {0, D}: nothing to order
        all_ch = torch.arange(D, device=_device(pk)).expand(B, H, D)
        return all_ch[..., : D - k], all_ch[..., D - k:]
    anom = pk.anomalous_idx.long()
    anom = anom.expand(B, H, k) if anom.dim() == 1 else anom
    is_anom = torch.zeros(B, H, D, dtype=torch.int8, device=anom.device).scatter_(-1, anom, 1)
    order = torch.sort(is_anom, dim=-1, stable=True).indices
    return order[..., : D - k], order[..., D - k:]


def dequantize_keys(pk: PackedKeys) -> torch.Tensor:
    """Reconstruct ``[B, H, T, D]`` keys in the input dtype from :class:`PackedKeys`."""
    B, H, T, D = pk.shape
    Tq = pk.num_quantized_tokens
    out = torch.zeros(B, H, Tq, D, dtype=torch.float32, device=_device(pk))
    easy_idx, anom_idx = _stored_channel_order(pk)
    reference = pk.mode is KVQuantMode.REFERENCE
    if pk.anomalous is not None:
        vals = _ungroup_tokens(pk.anomalous.dequantize())
        out.scatter_(-1, anom_idx.unsqueeze(2).expand(B, H, Tq, anom_idx.shape[-1]), vals)
    if pk.easy is not None:
        vals = _inverse_coefficients(_ungroup_tokens(pk.easy.dequantize()), D - pk.num_anomalous, reference)
        out.scatter_(-1, easy_idx.unsqueeze(2).expand(B, H, Tq, easy_idx.shape[-1]), vals)
    return _with_tail(out, pk.tail, pk.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Values (spec §1.3)
# ---------------------------------------------------------------------------------------------------------------
def quantize_values(v: torch.Tensor, cfg: Optional[VidKVConfig] = None) -> PackedValues:
    """Quantize one layer's values ``[B, H, T, D]`` (spec §1.3; module docstring). ``v`` is not modified."""
    cfg = cfg or VidKVConfig()
    _check_input(v, "values")
    G = cfg.value_group_size
    B, H, T, D = v.shape
    if cfg.value_axis is ValueAxis.CHANNEL:
        vq, tail = _split_tail(v, G)
        g = _group_tokens(vq, G)
    else:
        if D % G:
            raise ConfigError(
                f"VidKVConfig.value_group_size={G} must divide the head dim {D} when value_axis='token'; "
                f"accepted: a divisor of {D}"
            )
        tail = None
        g = v.to(torch.float32).reshape(B, H, T, D // G, G)
    packed = _q2(g, cfg.meta_dtype) if cfg.value_codec is ValueCodec.INT2 else _q3(g, cfg)
    return PackedValues(tuple(v.shape), v.dtype, cfg.value_codec, cfg.value_axis, G, packed, tail)


def dequantize_values(pv: PackedValues) -> torch.Tensor:
    """Reconstruct ``[B, H, T, D]`` values in the input dtype from :class:`PackedValues`."""
    B, H, T, D = pv.shape
    g = pv.codes.dequantize()
    if pv.axis is ValueAxis.CHANNEL:
        return _with_tail(_ungroup_tokens(g), pv.tail, pv.dtype)
    return g.reshape(B, H, T, D).to(pv.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Joining append-only blocks
# ---------------------------------------------------------------------------------------------------------------
def _concat_codes(parts: list) -> Optional[PackedCodes]:
    """One :class:`PackedCodes` whose groups are ``parts``' groups in order (the group axis is dim 2 in every
    layout: ``[B, H, T/G, C, G]`` token groups, ``[B, H, T, D/G, G]`` per-token value groups)."""
    if parts[0] is None:
        return None
    first = parts[0]
    codes = torch.cat([p.codes() for p in parts], dim=2)
    cat = lambda ts: None if ts[0] is None else torch.cat(ts, dim=2)
    return PackedCodes(_pack(codes, first.bits), first.bits, tuple(codes.shape), first.decode,
                       cat([p.scale for p in parts]), cat([p.zero for p in parts]))


def concat_blocks(keys: Sequence[PackedKeys], values: Sequence[PackedValues]) -> tuple:
    """``(PackedKeys, PackedValues)`` covering consecutive blocks in token order, re-packed as one container each
    (what a one-block kernel such as :mod:`vopt.kernels.vidkv_decode` reads). Exact: the codes, scales and zero
    points are the blocks' own; only the word packing is redone. Every block but the last must hold whole groups
    (no fp16 tail), and the key channel split must be the same in every block (it is frozen after the first block
    of an append-only cache); otherwise ``ValueError``.
    """
    if not keys or len(keys) != len(values):
        raise ValueError(f"concat_blocks needs as many key blocks as value blocks (>= 1), got {len(keys)} and "
                         f"{len(values)}")
    if len(keys) == 1:
        return keys[0], values[0]
    k0, v0 = keys[0], values[0]
    for pk in keys[:-1]:
        if pk.tail is not None:
            raise ValueError("concat_blocks: only the last key block may have an fp16 tail")
    for pv in values[:-1]:
        if pv.tail is not None:
            raise ValueError("concat_blocks: only the last value block may have an fp16 tail")
    for pk in keys[1:]:
        same = (pk.anomalous_idx is None) == (k0.anomalous_idx is None) and (
            pk.anomalous_idx is None or torch.equal(pk.anomalous_idx, k0.anomalous_idx))
        if not same or (pk.mode, pk.group_size, pk.num_anomalous) != (k0.mode, k0.group_size, k0.num_anomalous):
            raise ValueError("concat_blocks: the key blocks differ in channel split, mode or group size")
    T = sum(pk.shape[2] for pk in keys)
    pk = PackedKeys((*k0.shape[:2], T, k0.shape[3]), k0.dtype, k0.mode, k0.group_size, k0.anomalous_idx,
                    k0.num_anomalous, _concat_codes([p.anomalous for p in keys]), _concat_codes([p.easy for p in keys]),
                    keys[-1].tail)
    pv = PackedValues((*v0.shape[:2], T, v0.shape[3]), v0.dtype, v0.codec, v0.axis, v0.group_size,
                      _concat_codes([p.codes for p in values]), values[-1].tail)
    return pk, pv

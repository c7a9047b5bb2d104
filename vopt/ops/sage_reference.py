"""Exact torch reference of SageAttention2-style quantized attention (spec: shared/specs/attention.md §1).

This module is the *oracle* of vopt's quantized attention kernels: every step
is written out in torch, in a fixed order of floating-point operations, so a
Triton or CUDA kernel can be compared against it step by step (quantizer codes
and scales bit for bit; the attention output within the few fp32 ulps that
exp2 and summation order leave). It is slow and meant for tests, calibration
(§1.8) and debugging, not for inference.

Pipeline (one function per step, in this order)::

    smooth_k_mean        §1.1  K' = K - km              (km: per-KV-head mean over keys)
    smooth_q_blocks      §1.2  γ(Q) = Q - qm_b,  ΔS_b = qm_b · K'ᵀ   (per block_q rows)
    quantize_qk          §1.4  symmetric INT8/INT4 codes, fp32 scales per granularity;
                               Q's scale carries sm_scale·log2(e) (exp2 domain)
    quantize_v_fp8       §1.3/§1.6  V (- vm) per-channel E4M3, scale = amax/448
    _scores_tile         exact integer QK dot, dequantize, + ΔS, + masks      (one block_k tile)
    _softmax_update      online softmax in fp32 (m, l), exp2, FP8 offset 8.807  (§1.6)
    _accumulate_pv_fp8   P and V in E4M3, FP22 accumulator model, two-level accumulation (§1.7)
    _accumulate_pv_wide  P and V in fp16 (pv="fp16") or fp32 (pv="fp32")
    _epilogue            O = acc / l, × V channel scale, + vm; fully masked rows -> 0
    _lse                 natural-log LSE of the *original* scores (+ s·q·km, §1.1)

Conventions and decisions (see each function for its exact operation order):

* Scores live in the exp2 domain: ``S2 = S · log2(e)`` where ``S = q·kᵀ·scale + mask``.
  Q's scale is ``q_scale = (amax/qmax) * fp32(scale * log2(e))``; the codes do not
  depend on ``scale``.
* Integer dot products are exact (float64 matmul of integer codes; |code| <= 127 and
  head_dim <= :data:`MAX_HEAD_DIM` keep every dot below 2**24, so its conversion to
  fp32 is exact too, whichever rounding the hardware's int->float conversion uses).
* Causal masking is **bottom-right aligned** (query i sees keys j <= i + Lk - Lq, spec
  §1.9). Note: ``vopt::attention``'s reference (like PyTorch SDPA) aligns top-left; the
  two agree only when Lq == Lk.
* GQA: query head h uses KV head h // (Hq/Hkv). K and V are never repeated: the G query
  heads of a KV group are stacked as extra rows ("row space" [B, Hkv, G*Lq, ...]).
* The softmax denominator ``l`` sums the fp32 P (before its FP8 rounding), as the
  reference sm89 kernel does with ``DenominatorAccumUnit = kCudaCore``.
* FP22 (§1.7): the FP8-MMA accumulator is modelled as "add the exact 32-key (k-fragment)
  partial product sum, then truncate (round toward zero) to a 13-bit mantissa"; DeepSeek-V3
  reports ~14 retained bits on Hopper with errors that grow with K, i.e. truncation, not
  round-to-nearest. pv="fp16"/"fp32" use a plain fp32 accumulator (no FP22 model).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import VoptConfig, config_field, register_config
from ..errors import ConfigError
from .attention import _validate

__all__ = [
    "QKPrecision",
    "Granularity",
    "PVPrecision",
    "SagePrecision",
    "QuantizedQK",
    "quantize_qk",
    "quantize_v_fp8",
    "smooth_k_mean",
    "smooth_q_blocks",
    "sage_attention_reference",
    "LOG2E",
    "S_FP8_OFFSET",
    "FP8_E4M3_MAX",
    "MAX_HEAD_DIM",
    "K_FRAGMENT",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
#: Static P offset of §1.6: P = exp2(S2 - (m - 8.807)), so the row maximum maps to 2**8.807 ~ 448.
S_FP8_OFFSET = 8.807
#: Largest finite float8_e4m3fn value.
FP8_E4M3_MAX = 448.0
#: Keys per FP8 MMA (m16n8k32): the unit after which the FP22 accumulator is rounded.
K_FRAGMENT = 32
#: 127**2 * 1040 < 2**24: integer QK dots up to this head_dim are exact in fp32.
MAX_HEAD_DIM = 1040
#: Mantissa bits an FP22 accumulator keeps (1 sign + 8 exponent + 13 mantissa).
FP22_MANTISSA_BITS = 13

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------
class QKPrecision(str, enum.Enum):
    """Integer format of the QK^T product (§1.4, §1.5)."""

    INT8 = "int8"  # codes in [-127, 127], scale = amax/127
    INT4 = "int4"  # codes in [-7, 7], scale = amax/7 (stored one per int8 here; kernels pack two per byte)


class Granularity(str, enum.Enum):
    """Which rows share one Q scale / one K scale (§1.4)."""

    PER_BLOCK = "per_block"    # Q: block_q rows; K: block_k rows
    PER_WARP = "per_warp"      # Q: warp_q rows; K: block_k rows
    PER_THREAD = "per_thread"  # Q: rows r = g (mod 8) of each warp_q group; K: rows {8j+2t, 8j+2t+1} of each block_k block


class PVPrecision(str, enum.Enum):
    """Format of P and V in the PV product (§1.5, §1.6)."""

    FP8 = "fp8"    # P = exp2(S2 - m + 8.807) in E4M3, V per-channel E4M3
    FP16 = "fp16"  # P (in [0, 1]) and V rounded to fp16 (|V| > 65504 overflows, as in a kernel), fp32 accumulator
    FP32 = "fp32"  # unquantized PV (isolates the QK quantization error)


_QMAX = {QKPrecision.INT8: 127, QKPrecision.INT4: 7}


@register_config
@dataclass
class SagePrecision(VoptConfig):
    """Numerics of the SageAttention2-style reference (:func:`sage_attention_reference`)."""

    qk: QKPrecision = config_field(
        QKPrecision.INT8, help="QK^T integer format: 'int8' (codes -127..127) or 'int4' (codes -7..7; needs smooth_q)."
    )
    granularity: Granularity = config_field(
        Granularity.PER_THREAD,
        help="Scale granularity (spec §1.4): 'per_block' (Q block_q rows / K block_k rows), 'per_warp' (Q warp_q rows / "
        "K block_k rows) or 'per_thread' (Q rows r = g mod 8 of each warp_q group / K rows {8j+2t, 8j+2t+1} of each "
        "block_k block; the CUDA default).",
    )
    pv: PVPrecision = config_field(
        PVPrecision.FP8,
        help="PV format: 'fp8' (P with the static 8.807 offset and per-channel V in E4M3), 'fp16' (P and V rounded "
        "to fp16) or 'fp32' (unquantized PV).",
    )
    smooth_q: Optional[bool] = config_field(
        None,
        help="Subtract the per-block_q mean of Q and add ΔS = qm·K'^T back (spec §1.2). None = automatic: False "
        "for int8, True for int4 (int4 requires it).",
    )
    smooth_k: bool = config_field(True, help="Subtract the per-KV-head mean of K before quantizing (spec §1.1; exact).")
    smooth_v: bool = config_field(
        False, help="Subtract the per-channel mean of V before the PV product and add it in the epilogue (spec §1.3)."
    )
    two_level_accumulation: bool = config_field(
        True,
        help="pv='fp8' only: accumulate each block_k tile's PV in a fresh FP22 accumulator and add it into an fp32 "
        "one (spec §1.7). False models a single FP22 accumulator across the whole row (rounded every 32 keys).",
    )
    warp_q: int = config_field(32, help="Q rows per warp (WARPQ): 32 on sm80/89, 16 on sm90. Multiple of 8 dividing block_q.")
    block_q: int = config_field(128, help="Q rows per block (BLKQ): per_block Q scale and Q-smoothing group.")
    block_k: int = config_field(
        64, help="Keys per tile (BLKK; 128 on sm90): online-softmax tile, K scale block. Multiple of 32."
    )

    def validate(self) -> None:
        name = type(self).__name__
        if self.smooth_q is None:
            self.smooth_q = self.qk is QKPrecision.INT4
        if self.qk is QKPrecision.INT4 and not self.smooth_q:
            raise ConfigError(
                f"{name}.smooth_q must be True (or None) when qk='int4': INT4 QK needs Q smoothing (spec §1.2, §1.5); "
                f"accepted for int4: True, None"
            )
        if self.warp_q < 8 or self.warp_q % 8:
            raise ConfigError(f"{name}.warp_q must be a positive multiple of 8 (e.g. 16 or 32), got {self.warp_q}")
        if self.block_q < 1 or self.block_q % self.warp_q:
            raise ConfigError(
                f"{name}.block_q must be a positive multiple of warp_q ({self.warp_q}), e.g. 64 or 128, got {self.block_q}"
            )
        if self.block_k < K_FRAGMENT or self.block_k % K_FRAGMENT:
            raise ConfigError(
                f"{name}.block_k must be a positive multiple of {K_FRAGMENT} (e.g. 64 or 128), got {self.block_k}"
            )

    @property
    def qmax(self) -> int:
        """Largest QK code: 127 (int8) or 7 (int4)."""
        return _QMAX[self.qk]


def _resolve_precision(precision) -> SagePrecision:
    if precision is None:
        return SagePrecision()
    if isinstance(precision, SagePrecision):
        return precision
    if isinstance(precision, dict):
        return SagePrecision.from_dict(precision)
    raise ConfigError(f"precision must be a SagePrecision, a dict of its fields or None, got {type(precision).__name__}")


# --------------------------------------------------------------------------------------
# Smoothing (§1.1, §1.2, §1.3)
# --------------------------------------------------------------------------------------
def smooth_k_mean(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """§1.1: ``(K - km, km)`` with ``km = mean over keys`` per (batch, KV head), all fp32.

    ``k`` is [B, Hkv, Nk, D]; ``km`` is [B, Hkv, D]. Out of place.
    """
    k32 = k.to(torch.float32)
    km = k32.mean(dim=-2)
    return k32 - km.unsqueeze(-2), km


def smooth_q_blocks(q: torch.Tensor, block_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """§1.2: ``(γ(Q), qm)``: each block of ``block_q`` rows minus its mean (fp32).

    ``q`` is [B, Hq, Nq, D]; ``qm`` is [B, Hq, ceil(Nq/block_q), D]; the last block averages
    the rows it has. Out of place.
    """
    q32 = q.to(torch.float32)
    n = q32.shape[-2]
    nb = -(-n // block_q)
    blk = torch.arange(n, device=q.device) // block_q
    sums = torch.zeros(*q32.shape[:-2], nb, q32.shape[-1], dtype=torch.float32, device=q.device)
    sums.index_add_(-2, blk, q32)
    counts = torch.bincount(blk, minlength=nb).to(torch.float32).clamp_min(1)
    qm = sums / counts.unsqueeze(-1)
    return q32 - qm.index_select(-2, blk), qm


# --------------------------------------------------------------------------------------
# Quantization (§1.4, §1.6)
# --------------------------------------------------------------------------------------
def _q_groups(n: int, p: SagePrecision, device) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Scale-group index of each Q row, and the layout shape of the Q scales (after [B, Hq])."""
    r = torch.arange(n, device=device)
    if p.granularity is Granularity.PER_BLOCK:
        return r // p.block_q, (-(-n // p.block_q),)
    nw = -(-n // p.warp_q)
    if p.granularity is Granularity.PER_WARP:
        return r // p.warp_q, (nw,)
    return (r // p.warp_q) * 8 + r % 8, (nw, 8)


def _k_groups(n: int, p: SagePrecision, device) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Scale-group index of each K row, and the layout shape of the K scales (after [B, Hkv])."""
    r = torch.arange(n, device=device)
    nb = -(-n // p.block_k)
    if p.granularity is Granularity.PER_THREAD:
        return (r // p.block_k) * 4 + (r % 8) // 2, (nb, 4)
    return r // p.block_k, (nb,)


def _quantize_symmetric(x: torch.Tensor, group: torch.Tensor, layout: tuple[int, ...], qmax: int):
    """Symmetric per-group quantization of ``x`` [B, H, N, D] (fp32), rows grouped by ``group`` [N].

    Exact operation order: ``amax`` = max |x| over the group's rows and channels;
    ``scale = amax / qmax`` (fp32; 1.0 where amax == 0, so empty and all-zero groups give
    code 0); ``codes = clamp(round_half_even(x / scale), -qmax, qmax)`` as int8.
    Returns ``(codes [B, H, N, D] int8, scale [B, H, *layout] fp32, per-row scale [B, H, N])``.
    """
    n_groups = math.prod(layout)
    row_amax = x.abs().amax(dim=-1)  # [B, H, N]
    amax = torch.zeros(*x.shape[:-2], n_groups, dtype=torch.float32, device=x.device)
    amax.scatter_reduce_(-1, group.expand_as(row_amax), row_amax, reduce="amax", include_self=True)
    # A tensor divisor: torch's CUDA kernel turns division by a Python scalar into a multiplication by its
    # reciprocal (off by an ulp for ~half the int4/fp8 scales); tensor / tensor is the IEEE division kernels do.
    scale = amax / torch.full_like(amax, qmax)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    row_scale = scale.index_select(-1, group)
    codes = torch.round(x / row_scale.unsqueeze(-1)).clamp_(-qmax, qmax).to(torch.int8)
    return codes, scale.reshape(*x.shape[:-2], *layout), row_scale


@dataclass(frozen=True, eq=False)
class QuantizedQK:
    """Q and K as a SageAttention2 kernel consumes them (output of :func:`quantize_qk`).

    Shapes (B batch, Hq/Hkv heads, Nq/Nk rows, D head_dim; nqb = ceil(Nq/block_q),
    nw = ceil(Nq/warp_q), nkb = ceil(Nk/block_k)):

    ================  ======================================================================
    ``q_codes``       int8 [B, Hq, Nq, D]; int4 codes (-7..7) are stored one per int8 too
    ``k_codes``       int8 [B, Hkv, Nk, D]
    ``q_scale``       fp32, per_block [B, Hq, nqb]; per_warp [B, Hq, nw];
                      per_thread [B, Hq, nw, 8] (index [.., r // warp_q, r % 8]).
                      Includes ``sm_scale_log2``: q_scale = (amax/qmax) * sm_scale_log2.
    ``k_scale``       fp32, per_block and per_warp [B, Hkv, nkb];
                      per_thread [B, Hkv, nkb, 4] (index [.., n // block_k, (n % 8) // 2])
    ``km``            fp32 [B, Hkv, D] (smooth_k) or None
    ``qm``            fp32 [B, Hq, nqb, D] (smooth_q) or None
    ``delta_s``       fp32 [B, Hq, nqb, Nk] (smooth_q) or None: qm·K'ᵀ·sm_scale·log2(e),
                      added to every row of Q block b (exp2-domain units, like the scores)
    ``sm_scale``      the softmax scale (Python float), ``sm_scale_log2`` = fp32(sm_scale·log2 e)
    ================  ======================================================================

    The dequantized exp2-domain score of row r and key n is
    ``fp32(dot(q_codes[r], k_codes[n])) * (q_row_scale[r] * k_row_scale[n]) + delta_s[r // block_q, n]``.
    """

    q_codes: torch.Tensor
    k_codes: torch.Tensor
    q_scale: torch.Tensor
    k_scale: torch.Tensor
    km: Optional[torch.Tensor]
    qm: Optional[torch.Tensor]
    delta_s: Optional[torch.Tensor]
    sm_scale: float
    sm_scale_log2: float
    precision: SagePrecision

    def q_row_scale(self) -> torch.Tensor:
        """The scale of every Q row, [B, Hq, Nq] fp32 (the layout expanded)."""
        group, _ = _q_groups(self.q_codes.shape[-2], self.precision, self.q_codes.device)
        return self.q_scale.flatten(2).index_select(-1, group)

    def k_row_scale(self) -> torch.Tensor:
        """The scale of every K row, [B, Hkv, Nk] fp32 (the layout expanded)."""
        group, _ = _k_groups(self.k_codes.shape[-2], self.precision, self.k_codes.device)
        return self.k_scale.flatten(2).index_select(-1, group)


def _check_float_input(name: str, x: torch.Tensor) -> None:
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"sage reference: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def quantize_qk(
    q: torch.Tensor, k: torch.Tensor, precision: Optional[SagePrecision] = None, scale: Optional[float] = None
) -> QuantizedQK:
    """Smooth (§1.1, §1.2) and quantize (§1.4) Q [B, Hq, Nq, D] and K [B, Hkv, Nk, D].

    ``scale`` is the softmax scale (default 1/sqrt(D)); ``scale * log2(e)`` is folded into Q's
    scale, so the dequantized scores are in the exp2 domain. Hq must be a multiple of Hkv
    (GQA). Inputs are never modified. See :class:`QuantizedQK` for the layouts and
    :func:`_quantize_symmetric` for the exact rounding.
    """
    p = _resolve_precision(precision)
    for name, t in (("q", q), ("k", k)):
        _check_float_input(name, t)
        if t.dim() != 4:
            raise ValueError(f"quantize_qk: {name} must be [B, H, N, D], got shape {tuple(t.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"quantize_qk: q {tuple(q.shape)} and k {tuple(k.shape)} need the same batch and head_dim, "
            "and query heads a multiple of key heads"
        )
    d = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    fold = torch.tensor(sm_scale * LOG2E, dtype=torch.float32)

    if p.smooth_k:
        k_s, km = smooth_k_mean(k)
    else:
        k_s, km = k.to(torch.float32), None
    qm = delta_s = None
    if p.smooth_q:
        q_s, qm = smooth_q_blocks(q, p.block_q)
        # ΔS = qm·K'ᵀ per KV group without repeating K: [B, Hkv, G*nqb, D] @ [B, Hkv, D, Nk].
        b, hq, nqb, _ = qm.shape
        hkv, nk = k.shape[1], k.shape[2]
        grouped = qm.to(torch.float64).reshape(b, hkv, (hq // hkv) * nqb, d)
        ds = torch.matmul(grouped, k_s.to(torch.float64).transpose(-1, -2)) * (sm_scale * LOG2E)
        delta_s = ds.reshape(b, hq, nqb, nk).to(torch.float32)
    else:
        q_s = q.to(torch.float32)

    qg, q_layout = _q_groups(q.shape[-2], p, q.device)
    kg, k_layout = _k_groups(k.shape[-2], p, k.device)
    q_codes, q_raw, _ = _quantize_symmetric(q_s, qg, q_layout, p.qmax)
    k_codes, k_scale, _ = _quantize_symmetric(k_s, kg, k_layout, p.qmax)
    return QuantizedQK(
        q_codes=q_codes,
        k_codes=k_codes,
        q_scale=q_raw * fold,
        k_scale=k_scale,
        km=km,
        qm=qm,
        delta_s=delta_s,
        sm_scale=sm_scale,
        sm_scale_log2=float(fold),
        precision=p,
    )


def quantize_v_fp8(v: torch.Tensor, smooth_v: bool = False) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """§1.6 (and §1.3 if ``smooth_v``): V [B, Hkv, Nk, Dv] to per-channel E4M3.

    ``vm`` = mean over keys (fp32 [B, Hkv, Dv], None unless ``smooth_v``); ``x = V - vm``;
    ``scale = amax_n |x| / 448`` per (batch, head, channel) (fp32 [B, Hkv, Dv]; 1.0 where
    amax == 0); ``v_fp8 = clamp(x / scale, -448, 448).to(float8_e4m3fn)`` (round to nearest
    even; the clamp is explicit because torch's cast does not saturate). Returns
    ``(v_fp8 [B, Hkv, Nk, Dv], scale, vm)``; dequantized V is ``v_fp8 * scale (+ vm)``.
    The reference kernel's column permutation and padding to 64 keys are layout only and
    not modelled. Out of place.
    """
    _check_float_input("v", v)
    x = v.to(torch.float32)
    vm = None
    if smooth_v:
        vm = x.mean(dim=-2)
        x = x - vm.unsqueeze(-2)
    amax = x.abs().amax(dim=-2) if x.shape[-2] else torch.zeros(*x.shape[:-2], x.shape[-1], device=x.device)
    scale = amax / torch.full_like(amax, FP8_E4M3_MAX)  # IEEE division on CUDA too (see _quantize_symmetric)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    v_fp8 = (x / scale.unsqueeze(-2)).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return v_fp8, scale, vm


# --------------------------------------------------------------------------------------
# Attention steps
# --------------------------------------------------------------------------------------
def _scores_tile(
    q_codes: torch.Tensor,
    q_row_scale: torch.Tensor,
    qq: QuantizedQK,
    k_row_scale: torch.Tensor,
    k0: int,
    k1: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """Exp2-domain scores of keys [k0, k1) for every row, fp32 [B, Hkv, R, k1-k0] (§1.2, §1.4).

    ``q_codes`` (float64) and ``q_row_scale`` are in row space [B, Hkv, R = G*Lq, ...];
    ``k_row_scale`` is [B, Hkv, Nk]; ``bias`` [B, Hkv, R, Nk] or None. Order: exact integer
    dot (float64 matmul of the codes; exact, and exact again when cast to fp32) ``*``
    ``(q_row_scale * k_row_scale)`` (fp32 product), ``+ delta_s`` of the row's Q block
    (smooth_q), ``+ bias`` (the mask in exp2 units, -inf where masked; causal included).
    """
    kc = qq.k_codes[:, :, k0:k1].to(torch.float64)
    dot = torch.matmul(q_codes, kc.transpose(-1, -2)).to(torch.float32)
    s = dot * (q_row_scale.unsqueeze(-1) * k_row_scale[:, :, None, k0:k1])
    if qq.delta_s is not None:
        lq = qq.q_codes.shape[-2]
        q_block = torch.arange(lq, device=s.device) // qq.precision.block_q
        s = s + qq.delta_s[..., k0:k1].index_select(2, q_block).reshape(s.shape)  # [B, Hq, Lq, bk] -> rows
    if bias is not None:
        s = s + bias[..., k0:k1]
    return s


def _softmax_update(m: torch.Tensor, l: torch.Tensor, s: torch.Tensor, offset: float):
    """One online-softmax step in fp32, exp2 domain (§1.6, §1.7).

    ``m`` is the running row maximum **minus** ``offset`` (8.807 for FP8 P, else 0), ``l`` the
    running sum of P. ``m_new = max(m, rowmax(s) - offset)``; ``alpha = exp2(m - m_new)``;
    ``P = exp2(s - m_new)`` (so the row maximum maps to 2**offset, ~448 for FP8);
    ``l_new = l * alpha + rowsum(P)`` with the fp32 P. Rows with every key masked so far keep
    m = -inf and get P = 0, alpha = 0. Returns ``(P, alpha, m_new, l_new)``.
    """
    tile_max = s.amax(dim=-1) - torch.tensor(offset, dtype=torch.float32)
    m_new = torch.maximum(m, tile_max)
    m_use = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
    alpha = torch.exp2(m - m_use)
    p = torch.exp2(s - m_use.unsqueeze(-1))
    l_new = l * alpha + p.sum(dim=-1)
    return p, alpha, m_new, l_new


def _round_fp22(x: torch.Tensor) -> torch.Tensor:
    """§1.7 FP22 model: truncate float64 ``x`` toward zero to a 13-bit mantissa (returns float64).

    Values stay in fp32's normal range here, so the result is exactly an fp32 value.
    """
    drop = 52 - FP22_MANTISSA_BITS
    return (x.view(torch.int64) & -(1 << drop)).view(torch.float64)


def _accumulate_pv_fp8(acc: torch.Tensor, alpha: torch.Tensor, p: torch.Tensor, v8: torch.Tensor, two_level: bool):
    """PV of one tile with P and V in E4M3 (§1.6) into the fp32 accumulator ``acc`` (§1.7).

    ``P8 = clamp(P, max=448).to(e4m3)``. The tile is split into 32-key k-fragments; each
    fragment's sum of products is exact (products of E4M3 values are exact; float64 sums
    of 32 of them too) and is added to an FP22 accumulator (:func:`_round_fp22` after
    each add).

    * two_level: ``t`` starts at 0 for the tile, ``t = fp22(t + frag)`` per fragment, then
      ``acc = fp32(acc * alpha) + fp32(t)`` on CUDA cores (the reference's inst-buffer path).
    * single level: ``acc = fp32(acc * alpha)``, then ``acc = fp22(acc + frag)`` per fragment:
      one FP22 accumulator for the whole row.
    """
    p8 = p.clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float64)
    v = v8.to(torch.float64)
    acc = acc * alpha.unsqueeze(-1)
    run = torch.zeros_like(acc, dtype=torch.float64) if two_level else acc.to(torch.float64)
    for c0 in range(0, p8.shape[-1], K_FRAGMENT):
        frag = torch.matmul(p8[..., c0:c0 + K_FRAGMENT], v[..., c0:c0 + K_FRAGMENT, :])
        run = _round_fp22(run + frag)
    return acc + run.to(torch.float32) if two_level else run.to(torch.float32)


def _accumulate_pv_wide(acc: torch.Tensor, alpha: torch.Tensor, p: torch.Tensor, v: torch.Tensor, fp16: bool):
    """PV of one tile for pv='fp16' (P and V rounded to fp16) or 'fp32' (P and V as they are).

    The tile's products are summed in float64 and rounded once to fp32 (a plain fp32-accumulate
    MMA; no FP22 model): ``acc = fp32(acc * alpha) + fp32(P @ V)``.
    """
    if fp16:
        p = p.to(torch.float16)
    part = torch.matmul(p.to(torch.float64), v.to(torch.float64)).to(torch.float32)
    return acc * alpha.unsqueeze(-1) + part


def _epilogue(acc: torch.Tensor, l: torch.Tensor, v_scale: Optional[torch.Tensor], vm: Optional[torch.Tensor]):
    """``O = acc / l`` (fp32), ``* v_scale`` (per channel, pv='fp8'), ``+ vm`` (smooth_v); rows with l == 0 -> 0."""
    live = (l > 0).unsqueeze(-1)
    out = acc / torch.where(live, l.unsqueeze(-1), torch.ones_like(acc[..., :1]))
    if v_scale is not None:
        out = out * v_scale.unsqueeze(-2)
    if vm is not None:
        out = out + vm.unsqueeze(-2)
    return torch.where(live, out, torch.zeros_like(out))


def _lse(m: torch.Tensor, l: torch.Tensor, correction: Optional[torch.Tensor]) -> torch.Tensor:
    """Natural-log LSE of the original scores: ``(m + log2 l) * ln 2 (+ s·q·km)`` (§1.1); -inf if l == 0.

    ``m`` is the shifted running maximum, so ``m + log2 l = log2 sum exp2(S2)`` whatever the offset.
    """
    m64 = m.to(torch.float64)
    lse = (m64 + torch.log2(l.to(torch.float64))) * LN2
    if correction is not None:
        lse = lse + correction
    return torch.where(l > 0, lse, torch.full_like(lse, float("-inf"))).to(torch.float32)


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------
def _to_bhld(x: torch.Tensor, batch_shape) -> torch.Tensor:
    if x.dim() == 2:
        x = x.unsqueeze(0)
    x = x.expand(*batch_shape, *x.shape[-3:])
    return x.reshape(math.prod(batch_shape), *x.shape[-3:])


def _mask_bias(attn_mask, is_causal: bool, full_shape, lq: int, lk: int, device) -> Optional[torch.Tensor]:
    """The mask as an exp2-domain additive fp32 bias broadcast to ``full_shape`` [.., Hq, Lq, Lk] (or None).

    Bool masks: False -> -inf. Float masks: ``fp32(mask) * fp32(log2 e)``. Causal: keys
    j > i + (Lk - Lq) -> -inf (bottom-right aligned, §1.9).
    """
    if attn_mask is None and not is_causal:
        return None
    bias = torch.zeros(full_shape, dtype=torch.float32, device=device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = bias.masked_fill(~attn_mask.expand(full_shape), float("-inf"))
        else:
            bias = bias + attn_mask.to(torch.float32) * torch.tensor(LOG2E, dtype=torch.float32)
    if is_causal:
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)
        bias = bias.masked_fill(~allowed, float("-inf"))
    return bias


def sage_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    precision: Optional[SagePrecision] = None,
    return_lse: bool = False,
):
    """SageAttention2-style quantized attention with SDPA's signature (spec §1.1-§1.9).

    Arguments are those of ``vopt::attention`` / ``F.scaled_dot_product_attention``
    (validated by the same code): ``query`` [..., Hq, Lq, D], ``key`` [..., Hkv, Lk, D],
    ``value`` [..., Hkv, Lk, Dv] in fp16/bf16/fp32 (fp64 accepted), bool or additive
    ``attn_mask`` broadcastable to [..., Hq, Lq, Lk], ``dropout_p`` must be 0, ``scale``
    defaults to 1/sqrt(D), ``enable_gqa`` allows Hkv | Hq. **Causal masking is bottom-right
    aligned** (query i sees keys j <= i + Lk - Lq; rows that see no key output 0).
    Fully masked rows output 0 and have LSE -inf.

    ``precision`` (a :class:`SagePrecision`, default int8 per-thread QK + FP8 PV) picks the
    numerics. Returns the output in ``query.dtype`` with shape [..., Hq, Lq, Dv], and with
    ``return_lse=True`` also the fp32 natural-log LSE [..., Hq, Lq] of the original
    (unsmoothed, unquantized-scale) scores ``q·kᵀ·scale + mask``.
    """
    p = _resolve_precision(precision)
    _validate(query, key, value, attn_mask, dropout_p, enable_gqa)
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_float_input(name, t)
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"sage reference: query, key, value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})")
    d = query.shape[-1]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"sage reference: head_dim {d} > {MAX_HEAD_DIM}: integer QK dots would not be exact in fp32")

    # ---- shapes: [B, H, L, D], batch dims flattened, GQA groups as extra rows ----
    lead = lambda t: t.shape[:-3] if t.dim() >= 3 else ()  # noqa: E731
    batch_shape = torch.broadcast_shapes(lead(query), lead(key), lead(value))
    q, k, v = (_to_bhld(t, batch_shape) for t in (query, key, value))
    b, hq, lq, _ = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    out_shape = (lq, dv) if query.dim() == 2 and not batch_shape else (*batch_shape, hq, lq, dv)
    sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    # ---- smoothing + quantization (§1.1-§1.4, §1.6) ----
    qq = quantize_qk(q, k, p, sm_scale)
    rows = g * lq
    q_codes = qq.q_codes.to(torch.float64).reshape(b, hkv, rows, d)
    q_row_scale = qq.q_row_scale().reshape(b, hkv, rows)
    k_row_scale = qq.k_row_scale()
    full_shape = (*batch_shape, hq, lq, lk) if query.dim() > 2 or batch_shape else (lq, lk)
    bias = _mask_bias(attn_mask, is_causal, full_shape, lq, lk, q.device)
    if bias is not None:
        bias = bias.reshape(b, hkv, rows, lk)

    v_scale = vm = None
    if p.pv is PVPrecision.FP8:
        v_pv, v_scale, vm = quantize_v_fp8(v, p.smooth_v)
        offset = S_FP8_OFFSET
    else:
        v_pv = v.to(torch.float32)
        if p.smooth_v:
            vm = v_pv.mean(dim=-2)
            v_pv = v_pv - vm.unsqueeze(-2)
        if p.pv is PVPrecision.FP16:
            v_pv = v_pv.to(torch.float16)
        offset = 0.0

    # ---- online softmax over block_k tiles (§1.6, §1.7) ----
    m = torch.full((b, hkv, rows), float("-inf"), dtype=torch.float32, device=q.device)
    l = torch.zeros((b, hkv, rows), dtype=torch.float32, device=q.device)
    acc = torch.zeros((b, hkv, rows, dv), dtype=torch.float32, device=q.device)
    for k0 in range(0, lk, p.block_k):
        k1 = min(k0 + p.block_k, lk)
        s = _scores_tile(q_codes, q_row_scale, qq, k_row_scale, k0, k1, bias)
        probs, alpha, m, l = _softmax_update(m, l, s, offset)
        if p.pv is PVPrecision.FP8:
            acc = _accumulate_pv_fp8(acc, alpha, probs, v_pv[:, :, k0:k1], p.two_level_accumulation)
        else:
            acc = _accumulate_pv_wide(acc, alpha, probs, v_pv[:, :, k0:k1], p.pv is PVPrecision.FP16)

    out = _epilogue(acc, l, v_scale, vm).reshape(b, hq, lq, dv).reshape(out_shape).to(query.dtype)
    if not return_lse:
        return out
    correction = None
    if qq.km is not None:  # §1.1: K smoothing shifted every score of row i by -q_i·km·scale
        qg = q.to(torch.float64).reshape(b, hkv, rows, d)
        correction = torch.matmul(qg, qq.km.to(torch.float64).unsqueeze(-1)).squeeze(-1) * sm_scale
    lse = _lse(m, l, correction).reshape(out_shape[:-1])
    return out, lse

"""Triton SageAttention2-style attention: INT8 QK (per-block scales) + FP8 PV (spec: shared/specs/attention.md §1).

Two kernels and a launcher; the oracle is :func:`vopt.ops.sage_reference.sage_attention_reference`
with :data:`TRITON_PRECISION` (int8 QK, per-block scales, FP8 P and V, smooth-K, two-level
accumulation, block_q 128, block_k 64):

* :func:`_quant_int8_kernel`: per-block symmetric INT8 quantization of one [B, H, N, D]
  tensor (Q with 128-row blocks, K with 64-row blocks), with K smoothing fused in (the
  per-(batch, kv-head) channel mean ``km`` is computed in torch beforehand, in the same
  fp32 operations as the reference). Codes and scales are bit-identical to
  :func:`~vopt.ops.sage_reference.quantize_qk`: ``scale = amax / 127`` with an IEEE
  division (``div_rn``), ``codes = clamp(round_half_even(x / scale))`` (round-half-to-even
  built from ``floor``, exact for |x/scale| <= 127), Q's scale times ``fp32(sm_scale * log2 e)``.
* :func:`_sage_attn_fwd_kernel`: one program per (128-or-fewer query rows, batch x query
  head). INT8 ``tl.dot`` -> int32, dequantized by ``q_scale * k_scale`` (exp2-domain scores),
  online softmax in fp32 over 64-key tiles with the static FP8 offset 8.807, P rounded to
  E4M3, PV of each tile into a fresh fp32 partial that is then added to the fp32 output
  accumulator (two-level accumulation, §1.7), epilogue ``acc / l * v_scale``. GQA indexes
  the KV head as ``h // (Hq // Hkv)`` (K/V never repeated); causal masking is bottom-right
  aligned (query i sees keys j <= i + Nk - Nq); tails of Nq/Nk/head_dim are masked;
  head_dim is padded internally to :func:`padded_head_dim` (V's to :func:`padded_value_dim`).
  An ``attn_mask`` (constexpr ``HAS_MASK``; the no-mask build has no mask code at all) is read
  in place through the strides of ``attn_mask.expand(B, Hq, Nq, Nk)`` (broadcast dims have
  stride 0, nothing is materialized), one [BLOCK_M, 64] tile per KV tile with masked tail
  loads, and applied exactly as the reference's ``_mask_bias``: bool False -> -inf; float masks
  add ``fp32(mask) * fp32(log2 e)`` to the exp2-domain scores (after the dequantization, as the
  reference's ``_scores_tile``). Causal and the mask combine (both apply); rows that end up
  seeing no key output 0 with LSE -inf. With a bool mask the host also builds a per-tile "live" table
  (:func:`_tile_live`, constexpr ``HAS_LIVE``) and the kernel skips key tiles the mask hides entirely
  (bit-exact: a fully masked tile changes neither m, l nor acc), e.g. ~47% of the tiles of a CCAM mask.

PV modes (constexpr ``PV_FP8``):

* ``True`` (sm_89 / sm_90): P is cast in-kernel to ``float8e4nv`` (round to nearest even,
  saturating) and V is loaded as E4M3 codes: an FP8 MMA (``mma...e4m3`` / ``wgmma...e4m3``).
  On sm_90 with BLOCK_M 16 (Nq <= 16, decode) Triton emits no wgmma: ``mma.sync`` s8 for QK and,
  for PV, FP8 operands widened to fp16 (``cvt.rn.f16x2.e4m3x2``) into an f16 ``mma.sync``.
* ``False`` (sm_80, and the Triton interpreter, whose in-kernel FP8 casts are wrong, see
  shared/specs/environment.md §2): P is rounded to E4M3 *values* in software
  (:func:`_round_e4m3_rne`, bit-exact vs torch's ``.to(float8_e4m3fn)``), V is passed as the
  E4M3 codes widened to fp16 (exact), and the product runs as an fp16 MMA with fp32
  accumulation: same operand values as the FP8 MMA, so the same numerics (up to accumulation).

V is quantized on the host with :func:`~vopt.ops.sage_reference.quantize_v_fp8`. Boolean and
additive (fp16/bf16/fp32/fp64) attention masks broadcastable to [B, Hq, Nq, Nk] are supported.
:func:`unsupported_reason` names every call this path cannot run exactly as asked, and
:func:`sage_attention_triton` raises :class:`SageTritonUnsupportedError` for them.
Inputs are never modified.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from ._launch import is_interpreted, launch

from vopt.errors import VoptError
from vopt.ops.sage_reference import (
    FP8_E4M3_MAX,
    LN2,
    LOG2E,
    S_FP8_OFFSET,
    Granularity,
    PVPrecision,
    QKPrecision,
    SagePrecision,
    _resolve_precision,
    quantize_v_fp8,
)

try:  # the module must import (and unsupported_reason must answer) without triton
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - triton is a dependency of the Triton backend only
    triton = tl = None
    _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = [
    "TRITON_PRECISION",
    "MAX_TRITON_HEAD_DIM",
    "SageTritonUnsupportedError",
    "padded_head_dim",
    "padded_value_dim",
    "unsupported_reason",
    "quantize_qk_triton",
    "round_e4m3_triton",
    "sage_attention_triton",
]

#: Q rows per Q scale (BLKQ) and keys per K scale / softmax tile (BLKK) of this kernel.
BLOCK_Q = 128
BLOCK_K = 64
#: Largest head_dim (query/key and value) the kernel handles; above, callers fall back.
MAX_TRITON_HEAD_DIM = 128
#: The only numerics this path implements (the reference run with it is the kernel's oracle).
TRITON_PRECISION = SagePrecision(
    qk=QKPrecision.INT8,
    granularity=Granularity.PER_BLOCK,
    pv=PVPrecision.FP8,
    smooth_q=False,
    smooth_k=True,
    smooth_v=False,
    two_level_accumulation=True,
    block_q=BLOCK_Q,
    block_k=BLOCK_K,
)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MASK_DTYPES = (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64)


class SageTritonUnsupportedError(VoptError, NotImplementedError):
    """The Triton SageAttention path cannot run this call exactly as asked; ``reason`` says why."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"sage_attention_triton: {reason}")


def padded_head_dim(d: int) -> int:
    """Q/K head_dim the kernel computes with: the next power of two >= max(d, 32).

    32, not 16: Triton's int8 ``tl.dot`` refuses K < 32 ("Input shapes should have ... K >= 32",
    a CompilationError on sm_80/89/90; the s8 MMA is m16n8k32). The padding is zeros (masked
    loads), so it changes no result, only wastes work: ``1 - d / padded_head_dim(d)``
    (e.g. 80 -> 128 wastes 37.5%, 16 -> 32 wastes 50%).
    """
    if d < 1:
        raise ValueError(f"head_dim must be >= 1, got {d}")
    return max(32, 1 << (int(d) - 1).bit_length())


def padded_value_dim(dv: int) -> int:
    """V head_dim the kernel computes with (the N of the PV dot): the next power of two >= max(dv, 16)."""
    if dv < 1:
        raise ValueError(f"value head_dim must be >= 1, got {dv}")
    return max(16, 1 << (int(dv) - 1).bit_length())


def _is_interpreted() -> bool:
    return triton is not None and is_interpreted(_sage_attn_fwd_kernel)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _round_half_even(y):
        """Round-half-to-even of fp32 ``y`` with |y| < 2**22, exactly (floor and exact differences only)."""
        r = tl.floor(y)
        frac = y - r  # exact
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        up = (frac > 0.5) | ((frac == 0.5) & odd)
        return tl.where(up, r + 1.0, r)

    @triton.jit
    def _round_e4m3_rne(x):
        """fp32 ``x`` rounded to the nearest float8_e4m3fn value (ties to even), saturated at +-448.

        Returned as fp32 (exactly the E4M3 value). Per binade [2**e, 2**(e+1)) the E4M3 quantum is
        2**(e-3) (3 mantissa bits); below 2**-6 (subnormals) it is 2**-9. Scaling by a power of two
        is exact, so ``rne(x / quantum) * quantum`` is the correctly rounded value, carries into
        the next binade included (e.g. 1.96875 -> 2.0). Finite inputs only.
        """
        bits = x.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 127
        qexp = tl.maximum(e, -6) - 3
        qexp = tl.minimum(qexp, 100)  # keeps 2**-qexp normal for huge |x| (saturated below anyway)
        quantum = ((qexp + 127) << 23).to(tl.float32, bitcast=True)
        inv_quantum = ((127 - qexp) << 23).to(tl.float32, bitcast=True)
        r = _round_half_even(x * inv_quantum) * quantum
        r = tl.where(r == 0.0, x * 0.0, r)  # keep the sign of zero (-tiny -> -0.0, as torch)
        return tl.minimum(tl.maximum(r, -448.0), 448.0)

    @triton.jit
    def _round_e4m3_kernel(X, Y, n, BLOCK: tl.constexpr):
        """Test helper: Y = _round_e4m3_rne(X) elementwise (fp32)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < n, other=0.0)
        tl.store(Y + offs, _round_e4m3_rne(x), mask=offs < n)

    @triton.jit
    def _quant_int8_kernel(
        X, MEAN, CODES, SCALE,
        H, N, D, NBLK,
        sxb, sxh, sxn, sxd,
        scale_mul,
        HAS_MEAN: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    ):
        """Per-block INT8 quantization of X [B, H, N, D] (any strides), optionally minus MEAN [B, H, D].

        Program (block, b*H + h): rows [block*BLOCK_N, +BLOCK_N). CODES [B, H, N, D] int8
        contiguous; SCALE [B, H, NBLK] fp32 = (amax / 127, or 1 if amax == 0) * scale_mul.
        """
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, D_PAD)
        mask = (rows < N)[:, None] & (cols < D)[None, :]
        base = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh
        x = tl.load(base + rows[:, None].to(tl.int64) * sxn + cols[None, :] * sxd, mask=mask, other=0.0)
        x = x.to(tl.float32)
        if HAS_MEAN:
            mean = tl.load(MEAN + pid_bh.to(tl.int64) * D + cols, mask=cols < D, other=0.0)
            x = tl.where(mask, x - mean[None, :], 0.0)
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        scale = tl.math.div_rn(amax, 127.0)
        scale = tl.where(amax == 0.0, 1.0, scale)
        y = tl.math.div_rn(x, scale)
        codes = tl.minimum(tl.maximum(_round_half_even(y), -127.0), 127.0)
        out = CODES + pid_bh.to(tl.int64) * N * D
        tl.store(out + rows[:, None].to(tl.int64) * D + cols[None, :], codes.to(tl.int8), mask=mask)
        tl.store(SCALE + pid_bh.to(tl.int64) * NBLK + pid_n, scale * scale_mul)

    @triton.jit
    def _sage_attn_fwd_kernel(
        Q, K, V, QS, KS, VS, Out, M, L, Mask, Live,
        Hq, G, Nq, Nk, D, DV, NQB, NKB,
        smb, smh, smq, smk, slb, slh, slm,
        IS_CAUSAL: tl.constexpr, PV_FP8: tl.constexpr, STORE_ML: tl.constexpr,
        HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_LIVE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QBLK: tl.constexpr,
        D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    ):
        """Sage attention forward. Layouts (all contiguous):

        Q int8 [B, Hq, Nq, D]; K int8 [B, Hkv, Nk, D]; V [B, Hkv, Nk, DV] E4M3 (PV_FP8) or fp16
        holding E4M3 values; QS fp32 [B, Hq, NQB] (includes sm_scale*log2 e); KS fp32 [B, Hkv, NKB];
        VS fp32 [B, Hkv, DV]; Out [B, Hq, Nq, DV]; M, L fp32 [B, Hq, Nq] (running max minus the
        FP8 offset, and the softmax denominator; written if STORE_ML). BLOCK_M divides QBLK and
        BLOCK_N equals the K scale block. Mask (HAS_MASK): element (b, h, i, j) at
        ``b*smb + h*smh + i*smq + j*smk`` (any strides, 0 for broadcast dims); uint8 (MASK_BOOL,
        0 = masked) or a float dtype (additive, natural-log units, scaled by log2 e here).
        Live (HAS_LIVE, bool masks only): uint8 per (b, h, query tile of BLOCK_M, key tile of BLOCK_N) at
        ``b*slb + h*slh + m*slm + n``; 0 = every element of the tile is masked, so the tile is skipped
        (exact: a fully masked tile adds exp2(-inf) = 0 to l and acc and leaves m unchanged).
        """
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        hkv_idx = b * (Hq // G) + h // G  # flat (batch, kv head)
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_PAD)
        offs_dv = tl.arange(0, DV_PAD)

        q_ptrs = Q + pid_bh.to(tl.int64) * Nq * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
        q = tl.load(q_ptrs, mask=(offs_m < Nq)[:, None] & (offs_d < D)[None, :], other=0)
        q_scale = tl.load(QS + pid_bh.to(tl.int64) * NQB + start_m // QBLK)
        k_base = K + hkv_idx.to(tl.int64) * Nk * D
        v_base = V + hkv_idx.to(tl.int64) * Nk * DV
        ks_base = KS + hkv_idx.to(tl.int64) * NKB
        if HAS_MASK:
            mask_rows = Mask + b.to(tl.int64) * smb + h.to(tl.int64) * smh + offs_m[:, None].to(tl.int64) * smq
        if HAS_LIVE:
            live_row = Live + b.to(tl.int64) * slb + h.to(tl.int64) * slh + pid_m.to(tl.int64) * slm

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)

        hi = Nk
        if IS_CAUSAL:  # bottom-right aligned: row i sees keys j <= i + Nk - Nq
            hi = tl.minimum(Nk, tl.maximum(start_m + BLOCK_M + Nk - Nq, 0))
        for start_n in range(0, hi, BLOCK_N):
            run = True
            if HAS_LIVE:  # skip key tiles the bool mask hides entirely
                run = tl.load(live_row + start_n // BLOCK_N) != 0
            if run:
                cols = start_n + offs_n
                k = tl.load(k_base + cols[None, :].to(tl.int64) * D + offs_d[:, None],
                            mask=(cols < Nk)[None, :] & (offs_d < D)[:, None], other=0)
                k_scale = tl.load(ks_base + start_n // BLOCK_N)
                qk = tl.dot(q, k, out_dtype=tl.int32)
                s = qk.to(tl.float32) * (q_scale * k_scale)
                valid = (cols < Nk)[None, :]
                if IS_CAUSAL:
                    valid = valid & (cols[None, :] <= offs_m[:, None] + (Nk - Nq))
                if HAS_MASK:  # the reference's _mask_bias: bool False -> -inf, float -> + fp32(mask) * fp32(log2 e)
                    mk = tl.load(mask_rows + cols[None, :].to(tl.int64) * smk,
                                 mask=(offs_m < Nq)[:, None] & (cols < Nk)[None, :], other=0)
                    if MASK_BOOL:
                        valid = valid & (mk != 0)
                    else:
                        s = s + mk.to(tl.float32) * 1.4426950408889634
                s = tl.where(valid, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1) - 8.807)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_i - m_use)
                p = tl.math.exp2(s - m_use[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                v = tl.load(v_base + cols[:, None].to(tl.int64) * DV + offs_dv[None, :],
                            mask=(cols < Nk)[:, None] & (offs_dv < DV)[None, :], other=0.0)
                # Two-level accumulation (§1.7): the tile's PV goes into its own zeroed MMA accumulator
                # and is added to ``acc`` on CUDA cores. A non-zero max_num_imprecise_acc stops Triton's
                # combine pass from folding ``acc * alpha + dot(p, v)`` into ``dot(p, v, acc * alpha)``
                # (it only folds dots with max_num_imprecise_acc == 0; without it the sm_80/sm_89 PTX
                # accumulated every tile in the single MMA accumulator: one FP22 accumulator per row).
                if PV_FP8:
                    pv = tl.dot(p.to(tl.float8e4nv), v, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_N)
                else:
                    pv = tl.dot(_round_e4m3_rne(p).to(tl.float16), v, out_dtype=tl.float32,
                                max_num_imprecise_acc=BLOCK_N)
                acc = acc * alpha[:, None] + pv
                m_i = m_new

        live = l_i > 0.0
        vs = tl.load(VS + hkv_idx.to(tl.int64) * DV + offs_dv, mask=offs_dv < DV, other=1.0)
        out = tl.math.div_rn(acc, tl.where(live, l_i, 1.0)[:, None]) * vs[None, :]
        out = tl.where(live[:, None], out, 0.0)
        o_ptrs = Out + pid_bh.to(tl.int64) * Nq * DV + offs_m[:, None].to(tl.int64) * DV + offs_dv[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m < Nq)[:, None] & (offs_dv < DV)[None, :])
        if STORE_ML:
            tl.store(M + pid_bh.to(tl.int64) * Nq + offs_m, m_i, mask=offs_m < Nq)
            tl.store(L + pid_bh.to(tl.int64) * Nq + offs_m, l_i, mask=offs_m < Nq)

else:  # pragma: no cover
    _sage_attn_fwd_kernel = _quant_int8_kernel = _round_e4m3_kernel = None


# --------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------
def _precision_reason(precision) -> Optional[str]:
    if precision is None:
        return None
    try:
        p = _resolve_precision(precision)  # never validate() the caller's object: it mutates smooth_q
    except Exception as exc:  # noqa: BLE001 - reported as the reason
        return f"invalid precision: {exc}"
    want = TRITON_PRECISION
    diffs = []
    for field in ("qk", "granularity", "pv", "smooth_k", "smooth_v", "two_level_accumulation", "block_q", "block_k"):
        got, exp = getattr(p, field), getattr(want, field)
        if got != exp:
            diffs.append(f"{field}={getattr(got, 'value', got)!r} (needs {getattr(exp, 'value', exp)!r})")
    if p.smooth_q:
        diffs.append("smooth_q=True (needs False)")
    if diffs:
        return "precision not implemented by the Triton kernel: " + ", ".join(diffs)
    return None


def unsupported_reason(query, key, value, attn_mask=None, precision=None) -> Optional[str]:
    """Why the Triton SageAttention path cannot run this call exactly as asked, or None if it can.

    Refuses: an ``attn_mask`` that is not a bool or floating-point (fp16/bf16/fp32/fp64) tensor
    on the query's device (such masks themselves are supported); a precision other than
    :data:`TRITON_PRECISION` (int8 QK, per_block, fp8 PV, smooth_k True, smooth_q False,
    smooth_v False, two-level, block_q 128, block_k 64; ``None`` means that precision);
    head_dim > 128; non-[B, H, N, D] tensors, dtypes other than fp16/bf16/fp32; CPU tensors
    without the Triton interpreter; no triton.
    The dispatcher logs the reason and falls back.
    """
    if _TRITON_IMPORT_ERROR is not None:
        return f"triton unavailable ({_TRITON_IMPORT_ERROR})"
    reason = _precision_reason(precision)
    if reason:
        return reason
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            return f"{name} is not a tensor"
        if t.dim() != 4:
            return f"{name} must be [B, H, N, D], got shape {tuple(t.shape)}"
        if t.dtype not in _KERNEL_DTYPES:
            return f"{name} dtype {t.dtype} not supported (float16, bfloat16, float32)"
    if query.shape[-1] > MAX_TRITON_HEAD_DIM or value.shape[-1] > MAX_TRITON_HEAD_DIM:
        return f"head_dim {query.shape[-1]} / value dim {value.shape[-1]} > {MAX_TRITON_HEAD_DIM}"
    devs = {query.device, key.device, value.device}
    if len(devs) != 1:
        return f"query, key, value on different devices ({', '.join(map(str, devs))})"
    dev = query.device
    if dev.type == "cpu" and not _is_interpreted():
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before importing the kernel)"
    if dev.type not in ("cpu", "cuda"):
        return f"device {dev} not supported"
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            return f"attn_mask is not a tensor ({type(attn_mask).__name__})"
        if attn_mask.dtype not in _MASK_DTYPES:
            return f"attn_mask dtype {attn_mask.dtype} not supported (bool, float16, bfloat16, float32, float64)"
        if attn_mask.device != dev:
            return f"attn_mask on {attn_mask.device}, query on {dev}"
    return None


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
def _quantize(x: torch.Tensor, mean: Optional[torch.Tensor], block: int, scale_mul: float):
    bsz, h, n, d = x.shape
    nblk = -(-n // block)
    codes = torch.empty((bsz, h, n, d), dtype=torch.int8, device=x.device)
    scale = torch.empty((bsz, h, nblk), dtype=torch.float32, device=x.device)
    if codes.numel() == 0:
        return codes, scale.fill_(1.0 * scale_mul)
    launch(_quant_int8_kernel, (nblk, bsz * h), x.device,
            x, mean if mean is not None else scale, codes, scale,
            h, n, d, nblk, *x.stride(), scale_mul,
            HAS_MEAN=mean is not None, BLOCK_N=block, D_PAD=padded_head_dim(d),
            num_warps=4)
    return codes, scale


def quantize_qk_triton(q: torch.Tensor, k: torch.Tensor, scale: Optional[float] = None):
    """Triton version of ``quantize_qk(q, k, TRITON_PRECISION, scale)``.

    Returns ``(q_codes [B,Hq,Nq,D] int8, q_scale [B,Hq,ceil(Nq/128)] fp32 (incl. fp32(scale*log2 e)),
    k_codes [B,Hkv,Nk,D] int8, k_scale [B,Hkv,ceil(Nk/64)] fp32, km [B,Hkv,D] fp32)``, bit-identical to
    the reference's ``q_codes, q_scale, k_codes, k_scale, km``. Inputs are read, never written.
    """
    d = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    fold = float(torch.tensor(sm_scale * LOG2E, dtype=torch.float32))
    km = k.to(torch.float32).mean(dim=-2).contiguous()  # == smooth_k_mean's km, same torch ops
    q_codes, q_scale = _quantize(q, None, BLOCK_Q, fold)
    k_codes, k_scale = _quantize(k, km, BLOCK_K, 1.0)
    return q_codes, q_scale, k_codes, k_scale, km


def round_e4m3_triton(x: torch.Tensor) -> torch.Tensor:
    """The kernel's software E4M3 rounding (:func:`_round_e4m3_rne`) applied to fp32 ``x`` (for tests)."""
    x = x.to(torch.float32).contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        launch(_round_e4m3_kernel, (triton.cdiv(n, 1024),), x.device, x, y, n, BLOCK=1024)
    return y


def _mask_view(attn_mask: Optional[torch.Tensor], shape):
    """``(tensor, strides)`` the kernel reads ``attn_mask`` through, broadcast to ``shape`` [B, Hq, Nq, Nk].

    ``attn_mask.expand(shape)`` (a view: broadcast dims get stride 0, nothing is copied); bool masks
    are reinterpreted as uint8 (same bytes, 0 = masked). Leading size-1 dims beyond 4 are dropped.
    ``(None, (0, 0, 0, 0))`` without a mask. Raises ``ValueError`` if the mask does not broadcast.
    """
    if attn_mask is None:
        return None, (0, 0, 0, 0)
    mask = attn_mask
    while mask.dim() > 4 and mask.shape[0] == 1:
        mask = mask[0]
    try:
        mask = mask.expand(*shape)
    except RuntimeError as exc:
        raise ValueError(
            f"sage_attention_triton: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {tuple(shape)}"
        ) from exc
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return mask, tuple(mask.stride())


def _tile_live(attn_mask: torch.Tensor, shape, block_m: int, block_n: int):
    """``(live, strides)``: uint8 ``[B', H', ceil(Nq/block_m), ceil(Nk/block_n)]`` (1 where some element of the
    tile is visible) of a bool ``attn_mask`` broadcastable to ``shape`` [B, Hq, Nq, Nk], as a view broadcast over
    batch and heads (stride 0 where the mask broadcasts). One pass over the mask; lets the kernel skip dead tiles."""
    bsz, hq, nq, nk = shape
    mask = attn_mask
    while mask.dim() > 4 and mask.shape[0] == 1:
        mask = mask[0]
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    nmb, nnb = triton.cdiv(nq, block_m), triton.cdiv(nk, block_n)
    b_, h_, mq, mk = mask.shape
    # A broadcast (size-1) query or key dim stays size 1: a [B, 1, 1, Nk] padding mask is never blown up to Nq rows.
    nm, bm = (nmb, block_m) if mq != 1 else (1, 1)
    nn, bn = (nnb, block_n) if mk != 1 else (1, 1)
    padded = torch.nn.functional.pad(mask, (0, nn * bn - mk, 0, nm * bm - mq))  # False outside the mask
    live = padded.view(b_, h_, nm, bm, nn, bn).any(dim=5).any(dim=3).to(torch.uint8)
    live = live.expand(b_, h_, nm, nnb).contiguous().expand(bsz, hq, nmb, nnb)  # key tiles contiguous (stride 1)
    return live, tuple(live.stride()[:3])


def _use_fp8_mma(device: torch.device) -> bool:
    """In-kernel FP8 cast + FP8 MMA on sm_89+ GPUs; software E4M3 rounding + fp16 MMA otherwise."""
    if device.type != "cuda" or _is_interpreted():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


@dataclass
class PreparedAttention:
    """A validated, quantized call of the attention kernel: :meth:`launch` runs only the kernel (what kernel-only
    benchmarks time; it may be repeated), :meth:`result` returns what :func:`sage_attention_triton` returns."""

    query: torch.Tensor
    launch_args: tuple
    launch_kwargs: dict
    grid: tuple
    out: torch.Tensor
    m: torch.Tensor
    l: torch.Tensor
    km: Optional[torch.Tensor]
    sm_scale: float
    return_lse: bool

    def launch(self) -> None:
        if self.grid:
            launch(_sage_attn_fwd_kernel, self.grid, self.query.device, *self.launch_args, **self.launch_kwargs)

    def result(self):
        out = self.out.to(self.query.dtype)
        if not self.return_lse:
            return out
        # Natural-log LSE of the original scores, as the reference's _lse: (m + log2 l) ln2 + s q.km (§1.1).
        bsz, hq, nq, d = self.query.shape
        lse = (self.m.to(torch.float64) + torch.log2(self.l.to(torch.float64))) * LN2
        if self.km is not None:
            hkv = self.km.shape[1]
            qg = self.query.to(torch.float64).reshape(bsz, hkv, (hq // hkv) * nq, d)
            corr = torch.matmul(qg, self.km.to(torch.float64).unsqueeze(-1)).squeeze(-1) * self.sm_scale
            lse = lse + corr.reshape(bsz, hq, nq)
        return out, torch.where(self.l > 0, lse, torch.full_like(lse, float("-inf"))).to(torch.float32)


def sage_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    precision: Optional[SagePrecision] = None,
    return_lse: bool = False,
    attn_mask: Optional[torch.Tensor] = None,
):
    """SageAttention2 (int8 per-block QK, FP8 PV) on Triton; tensors [B, H, N, D].

    Same result as ``sage_attention_reference(query, key, value, is_causal=..., scale=...,
    enable_gqa=..., precision=TRITON_PRECISION, return_lse=...)`` up to fp32 accumulation order.
    ``precision=None`` means :data:`TRITON_PRECISION`; any other precision or head_dim > 128
    raises :class:`SageTritonUnsupportedError` (see :func:`unsupported_reason`). ``attn_mask``:
    bool (False = masked) or additive float, broadcastable to [B, Hq, Nq, Nk] (read in place
    through stride-0 broadcasting, never materialized), applied as the reference does and
    combined with ``is_causal``; a shape that does not broadcast raises ``ValueError``.
    Causal is bottom-right aligned. Returns ``out`` (query's dtype, [B, Hq, Nq, Dv]) and with
    ``return_lse`` also the fp32 natural-log LSE [B, Hq, Nq] of ``q k^T scale`` (-inf for rows
    that see no key, e.g. fully masked ones, whose output is 0). Inputs are never modified.
    """
    call = prepare_sage_attention(query, key, value, is_causal, scale, enable_gqa, precision=precision,
                                  return_lse=return_lse, attn_mask=attn_mask)
    call.launch()
    return call.result()


def prepare_sage_attention(query, key, value, is_causal=False, scale=None, enable_gqa=False, *, precision=None,
                           return_lse=False, attn_mask=None) -> PreparedAttention:
    """Validate and quantize (Q/K on Triton, V per-channel E4M3 on the host) one :func:`sage_attention_triton` call."""
    reason = unsupported_reason(query, key, value, attn_mask, precision)
    if reason:
        raise SageTritonUnsupportedError(reason)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"sage_attention_triton: dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})")
    bsz, hq, nq, d = query.shape
    bk, hkv, nk, dk = key.shape
    if bk != bsz or value.shape[0] != bsz or dk != d or value.shape[1] != hkv or value.shape[2] != nk:
        raise ValueError(
            f"sage_attention_triton: incompatible shapes q {tuple(query.shape)}, k {tuple(key.shape)}, v {tuple(value.shape)}"
        )
    if hq != hkv:
        if not enable_gqa:
            raise ValueError(f"sage_attention_triton: query has {hq} heads, key {hkv}; pass enable_gqa=True")
        if hq % hkv:
            raise ValueError(f"sage_attention_triton: query heads {hq} not a multiple of key heads {hkv}")
    dv = value.shape[-1]
    device = query.device
    out_dtype = torch.float32 if query.dtype == torch.bfloat16 else query.dtype
    out = torch.zeros((bsz, hq, nq, dv), dtype=out_dtype, device=device)
    m = torch.full((bsz, hq, nq), float("-inf"), dtype=torch.float32, device=device)
    l = torch.zeros((bsz, hq, nq), dtype=torch.float32, device=device)
    sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mask_arg, mask_strides = _mask_view(attn_mask, (bsz, hq, nq, nk))
    call = PreparedAttention(query, (), {}, (), out, m, l, None, sm_scale, bool(return_lse))
    if out.numel() and nk:
        q_codes, q_scale, k_codes, k_scale, call.km = quantize_qk_triton(query, key, sm_scale)
        v8, v_scale, _ = quantize_v_fp8(value)  # host-side per-channel E4M3 (bit-exact by construction)
        pv_fp8 = _use_fp8_mma(device)
        v_arg = v8.contiguous() if pv_fp8 else v8.to(torch.float16).contiguous()  # E4M3 values are exact in fp16
        block_m = min(BLOCK_Q, max(16, triton.next_power_of_2(nq)))
        call.grid = (triton.cdiv(nq, block_m), bsz * hq)
        mask_bool = mask_arg is not None and mask_arg.dtype == torch.uint8
        live, live_strides = _tile_live(attn_mask, (bsz, hq, nq, nk), block_m, BLOCK_K) if mask_bool else (None, (0, 0, 0))
        call.launch_args = (q_codes, k_codes, v_arg, q_scale, k_scale, v_scale.contiguous(), out, m, l,
                            mask_arg if mask_arg is not None else l, live if live is not None else l,
                            hq, hq // hkv, nq, nk, d, dv, q_scale.shape[-1], k_scale.shape[-1], *mask_strides,
                            *live_strides)
        call.launch_kwargs = dict(
            IS_CAUSAL=bool(is_causal), PV_FP8=pv_fp8, STORE_ML=bool(return_lse),
            HAS_MASK=mask_arg is not None, MASK_BOOL=mask_bool, HAS_LIVE=live is not None,
            BLOCK_M=block_m, BLOCK_N=BLOCK_K, QBLK=BLOCK_Q, D_PAD=padded_head_dim(d), DV_PAD=padded_value_dim(dv),
            num_warps=4, num_stages=2)
    return call


# Keep the offsets the kernel hard-codes tied to the reference's constants.
assert S_FP8_OFFSET == 8.807 and FP8_E4M3_MAX == 448.0

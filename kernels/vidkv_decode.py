"""Triton decode attention over a packed KIVI / VidKV KV cache (spec ``kvcache.md`` §3 "Decode path" (2)-(4), §4).

One program per (batch, KV head) handles every query row of that KV head (``Hq/Hkv`` query heads × ``Lq``
positions, GQA without repeating K/V) and streams the cache ``[packed tokens | fp16 residual]`` in tiles of
``BLOCK_N`` tokens with an online (exp2-domain) softmax, so neither K nor V is ever materialized in memory:

* **Keys, segment A** (2-bit ``Q2`` codes, per channel, groups of ``GK`` tokens: all channels for KIVI-2, the
  anomalous channels for VidKV): the int32 words are loaded and the codes extracted in registers
  (``(word >> 2·(i mod 16)) & 3``), dequantized with the group's scale and zero (``code·s + z``) and multiplied by
  the query gathered on those channels (``QA``) with ``tl.dot`` (fp16 operands, fp32 accumulation).
* **Keys, segment B** (VidKV easy channels: 1-bit sign codes of the FFT coefficients, 32 per int32): the logits
  are formed in the frequency domain (Parseval, :func:`vopt.kvcache.decode_attention.frequency_domain_query`):
  the host computes the frequency-domain query ``QB`` once per step (one FFT of ``q``), the kernel decodes
  ``(2·bit − 1)·s`` (recommended ``±s``) or ``bit·s + z`` (reference ``{0, s}``) and dots it with ``QB``. No
  inverse FFT of the keys is ever done.
* **Word loads**: with group sizes a multiple of 16 (2-bit) / 32 (1-bit) tokens, one tile loads each int32 word
  once and expands it to 16 / 32 codes in registers (``(w[..., None] >> 2·i) & 3``, then a reshape); otherwise (any
  group size, base-3 trits) each code gathers its word (``word[i >> 4] >> 2·(i & 15)``, cache hits for neighbours).
* **Residual** (the containers' fp16 tails of ``T mod G`` tokens followed by the window): ``q·k`` in fp16.
* **Values**: 2-bit codes (``code·s + z`` for ``Q2`` / the reference ternary, ``(code − 1)·s`` for 2-bit trits) or
  base-3 trits five per byte (``digit(byte, i mod 5) − 1``, times the scale if stored), per token (KIVI, groups of
  ``GV`` channels) or per channel (VidKV, groups of ``GV`` tokens), then ``P·V`` with ``tl.dot`` (P rounded to fp16,
  fp32 accumulation). Residual values are read as fp16.

Token ``t`` takes its key from the packed part when ``t < TQK`` (else the key residual) and its value from the
packed part when ``t < TQV`` (else the value residual): KIVI's per-token values quantize every token while its
keys keep ``T mod G`` in the tail, and both are handled by masked loads in the same tile.

The launcher concatenates ``pk.tail``/``window_k`` (and ``pv.tail``/``window_v``) into one fp16 residual (a copy of
at most ``G − 1 + W`` tokens per call) and, for VidKV keys, gathers the query on the stored channel indices and
computes ``QB``. The oracle is :func:`vopt.kvcache.decode_attention.packed_decode_attention` (itself equal to
dequantize + SDPA). Numerics: dequantized K, V and P are rounded to fp16 for the MMAs (as the fp16 SDPA of the
definition would), scores, softmax and accumulation are fp32, the output is cast to ``query.dtype``.
Not done (performance; correctness is tested): one program per (batch, KV head) with no split over tokens
(flash-decoding style split-K + merge would be needed to fill a GPU at small ``B·Hkv`` and long caches); scales,
zero points and the fp16 residual are gathered per element (scalar ``ld.global.b16`` in the PTX) and tiles that are
all-residual still issue the (masked) packed loads; bf16/fp32 windows are rounded to fp16; no GPU timing yet.
:func:`unsupported_reason` names what this path cannot run; :func:`packed_decode_attention_triton` raises
:class:`VidKVTritonUnsupportedError` for it. Inputs are never modified.
"""
from __future__ import annotations

from typing import Optional

import torch
from ._launch import launch

from vopt.errors import VoptError
from vopt.kvcache.fused_decode_args import MAX_HEAD_DIM, V_BASE3, fused_decode_args, layout_reason
from vopt.kvcache.quantizers import PackedKeys, PackedValues

try:  # the module must import (and unsupported_reason must answer) without triton
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover
    triton = tl = None
    _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = [
    "VidKVTritonUnsupportedError", "unsupported_reason", "packed_decode_attention_triton",
    "kivi_decode_attention_triton", "MAX_HEAD_DIM", "BLOCK_N",
]

#: Tokens per tile of the online softmax.
BLOCK_N = 32


class VidKVTritonUnsupportedError(VoptError, NotImplementedError):
    """The Triton packed-decode path cannot run this call; ``reason`` says why."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"packed_decode_attention_triton: {reason}")


if triton is not None:

    @triton.jit
    def _unpack_last(w, BITS: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
        """int32 words ``[R, C / (32/BITS)]`` -> codes ``[R, C]``, each word expanded along the last axis."""
        sh = tl.arange(0, 32 // BITS) * BITS
        c = (w[:, :, None] >> sh[None, None, :]) & ((1 << BITS) - 1)
        return tl.reshape(c, [R, C])

    @triton.jit
    def _unpack_first(w, BITS: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
        """int32 words ``[R / (32/BITS), C]`` -> codes ``[R, C]``, each word expanded along the first axis."""
        sh = tl.arange(0, 32 // BITS) * BITS
        c = (w[:, None, :] >> sh[None, :, None]) & ((1 << BITS) - 1)
        return tl.reshape(c, [R, C])

    @triton.jit
    def _packed_decode_kernel(
        Q, QA, QB,                  # fp16 [BH, M, D], [BH, M, KA], [BH, M, KB]
        KAW, KAS, KAZ,              # int32 2-bit words; scale, zero [BH, NGK, KA]
        KBW, KBS, KBZ,              # int32 1-bit words; scale (, zero) [BH, NGK, KB]
        KR,                         # fp16 key residual [BH, NRK, D]
        VW, VS, VZ,                 # value words (int32 2-bit or uint8 base-3); scale (, zero)
        VR,                         # fp16 value residual [BH, NRV, DV]
        Out,                        # fp32 [BH, M, DV]
        M, D, DV, KA, KB, TQK, TQV, N, qk_scale,
        GK: tl.constexpr, GV: tl.constexpr,
        HAS_A: tl.constexpr, HAS_B: tl.constexpr, KB_PM: tl.constexpr,
        V_PER_TOKEN: tl.constexpr, V_CODEC: tl.constexpr, V_HAS_SCALE: tl.constexpr,
        ALIGNED_K: tl.constexpr, ALIGNED_V: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DA: tl.constexpr,
        BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(Q + bh * M * D + offs_m[:, None] * D + offs_d[None, :],
                    mask=mask_m[:, None] & (offs_d[None, :] < D), other=0.0)
        offs_da = tl.arange(0, BLOCK_DA)
        offs_db = tl.arange(0, BLOCK_DB)
        if HAS_A:
            qa = tl.load(QA + bh * M * KA + offs_m[:, None] * KA + offs_da[None, :],
                         mask=mask_m[:, None] & (offs_da[None, :] < KA), other=0.0)
        if HAS_B:
            qb = tl.load(QB + bh * M * KB + offs_m[:, None] * KB + offs_db[None, :],
                         mask=mask_m[:, None] & (offs_db[None, :] < KB), other=0.0)
        ngk = TQK // GK
        ngv = TQV // GV
        nrk = N - TQK
        nrv = N - TQV
        offs_dv = tl.arange(0, BLOCK_DV)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for start in range(0, N, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            in_n = offs_n < N
            s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            # ---- packed keys: tile [channels, tokens]
            t_k = offs_n[None, :].to(tl.int64)
            kq = t_k < TQK
            grp = t_k // GK
            ti = t_k % GK
            if HAS_A:
                ca = offs_da[:, None]
                ma = kq & (ca < KA)
                gidx = (bh * ngk + grp) * KA + ca
                if ALIGNED_K:  # one load per int32 word (16 tokens of one channel), expanded in registers
                    tw = (start + tl.arange(0, BLOCK_N // 16) * 16)[None, :].to(tl.int64)
                    fw = ((bh * ngk + tw // GK) * KA + ca) * GK + tw % GK
                    w = tl.load(KAW + (fw >> 4), mask=(tw < TQK) & (ca < KA), other=0)
                    code = _unpack_last(w, 2, BLOCK_DA, BLOCK_N)
                else:          # generic: one (cached) word load per code, any group size
                    flat = gidx * GK + ti
                    w = tl.load(KAW + (flat >> 4), mask=ma, other=0)
                    code = (w >> ((flat & 15) * 2).to(tl.int32)) & 3
                sc = tl.load(KAS + gidx, mask=ma, other=0.0).to(tl.float32)
                zp = tl.load(KAZ + gidx, mask=ma, other=0.0).to(tl.float32)
                ka = tl.where(ma, code.to(tl.float32) * sc + zp, 0.0)
                s += tl.dot(qa, ka.to(tl.float16))
            if HAS_B:
                cb = offs_db[:, None]
                mb = kq & (cb < KB)
                gidx = (bh * ngk + grp) * KB + cb
                if ALIGNED_K:
                    tw = (start + tl.arange(0, BLOCK_N // 32) * 32)[None, :].to(tl.int64)
                    fw = ((bh * ngk + tw // GK) * KB + cb) * GK + tw % GK
                    w = tl.load(KBW + (fw >> 5), mask=(tw < TQK) & (cb < KB), other=0)
                    bit = _unpack_last(w, 1, BLOCK_DB, BLOCK_N).to(tl.float32)
                else:
                    flat = gidx * GK + ti
                    w = tl.load(KBW + (flat >> 5), mask=mb, other=0)
                    bit = ((w >> (flat & 31).to(tl.int32)) & 1).to(tl.float32)
                sc = tl.load(KBS + gidx, mask=mb, other=0.0).to(tl.float32)
                if KB_PM:
                    kb = (2.0 * bit - 1.0) * sc
                else:
                    kb = bit * sc + tl.load(KBZ + gidx, mask=mb, other=0.0).to(tl.float32)
                kb = tl.where(mb, kb, 0.0)
                s += tl.dot(qb, kb.to(tl.float16))
            # ---- key residual (tails + window)
            mr = (t_k >= TQK) & (t_k < N) & (offs_d[:, None] < D)
            kr = tl.load(KR + (bh * nrk + (t_k - TQK)) * D + offs_d[:, None], mask=mr, other=0.0)
            s += tl.dot(q, kr)
            # ---- online softmax (exp2 domain)
            s = tl.where(in_n[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            # ---- values: tile [tokens, channels]
            t_v = offs_n[:, None].to(tl.int64)
            cv = offs_dv[None, :]
            mv = (t_v < TQV) & (cv < DV)
            if V_PER_TOKEN:
                gidx = (bh * TQV + t_v) * (DV // GV) + cv // GV
                flat = (bh * TQV + t_v) * DV + cv
            else:
                gidx = (bh * ngv + t_v // GV) * DV + cv
                flat = gidx * GV + t_v % GV
            if V_CODEC == 2:  # base-3 trits, five per byte
                byte = tl.load(VW + flat // 5, mask=mv, other=0).to(tl.int32)
                r5 = flat % 5
                pw = tl.where(r5 == 0, 1, tl.where(r5 == 1, 3, tl.where(r5 == 2, 9, tl.where(r5 == 3, 27, 81))))
                val = ((byte // pw.to(tl.int32)) % 3 - 1).to(tl.float32)
                if V_HAS_SCALE:
                    val = val * tl.load(VS + gidx, mask=mv, other=0.0).to(tl.float32)
            else:
                if ALIGNED_V:
                    if V_PER_TOKEN:  # words run along channels: [tokens, BLOCK_DV / 16]
                        cw = (tl.arange(0, BLOCK_DV // 16) * 16)[None, :]
                        w = tl.load(VW + (((bh * TQV + t_v) * DV + cw) >> 4), mask=(t_v < TQV) & (cw < DV), other=0)
                        code = _unpack_last(w, 2, BLOCK_N, BLOCK_DV).to(tl.float32)
                    else:            # words run along tokens: [BLOCK_N / 16, channels]
                        tw = (start + tl.arange(0, BLOCK_N // 16) * 16)[:, None].to(tl.int64)
                        fw = ((bh * ngv + tw // GV) * DV + cv) * GV + tw % GV
                        w = tl.load(VW + (fw >> 4), mask=(tw < TQV) & (cv < DV), other=0)
                        code = _unpack_first(w, 2, BLOCK_N, BLOCK_DV).to(tl.float32)
                else:
                    w = tl.load(VW + (flat >> 4), mask=mv, other=0)
                    code = ((w >> ((flat & 15) * 2).to(tl.int32)) & 3).to(tl.float32)
                if V_CODEC == 1:  # 2-bit trits q + 1
                    val = code - 1.0
                    if V_HAS_SCALE:
                        val = val * tl.load(VS + gidx, mask=mv, other=0.0).to(tl.float32)
                else:
                    val = code * tl.load(VS + gidx, mask=mv, other=0.0).to(tl.float32) \
                        + tl.load(VZ + gidx, mask=mv, other=0.0).to(tl.float32)
            val = tl.where(mv, val, 0.0)
            mvr = (t_v >= TQV) & (t_v < N) & (cv < DV)
            vr = tl.load(VR + (bh * nrv + (t_v - TQV)) * DV + cv, mask=mvr, other=0.0).to(tl.float32)
            v = (val + vr).to(tl.float16)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(Out + bh * M * DV + offs_m[:, None] * DV + offs_dv[None, :], out,
                 mask=mask_m[:, None] & (offs_dv[None, :] < DV))


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def unsupported_reason(query, packed_keys, packed_values, window_k=None, window_v=None, enable_gqa=False):
    """None if :func:`packed_decode_attention_triton` can run this call, else why not (one sentence)."""
    if triton is None:
        return f"triton is not importable ({_TRITON_IMPORT_ERROR})"
    return layout_reason(query, packed_keys, packed_values, window_k, window_v, enable_gqa)


def packed_decode_attention_triton(query, packed_keys: PackedKeys, packed_values: PackedValues, window_k=None,
                                   window_v=None, scale: Optional[float] = None, enable_gqa: bool = False,
                                   word_loads: bool = True):
    """Fused Triton version of :func:`vopt.kvcache.decode_attention.packed_decode_attention` for one packed block
    (KIVI-2 and the VidKV layouts). Returns ``[B, Hq, Lq, Dv]`` in ``query.dtype``.

    ``word_loads`` (default True): where the layout allows it (key groups a multiple of 16 tokens, 32 with FFT
    sign keys; per-token 2-bit values with ``Dv % 16 == 0``; per-channel 2-bit values with groups a multiple of 16)
    each packed word is loaded once and expanded to its 16 (32) codes in registers. Otherwise, and with
    ``word_loads=False``, each code loads its own (cache-shared) word: any group size works."""
    reason = unsupported_reason(query, packed_keys, packed_values, window_k, window_v, enable_gqa)
    if reason is not None:
        raise VidKVTritonUnsupportedError(reason)
    a = fused_decode_args(query, packed_keys, packed_values, window_k, window_v, scale)
    dev = query.device
    dummy_f = torch.zeros(1, dtype=torch.float16, device=dev)
    dummy_i = torch.zeros(1, dtype=torch.int32, device=dev)
    or_f = lambda t: dummy_f if t is None else t  # noqa: E731
    or_i = lambda t: dummy_i if t is None else t  # noqa: E731
    has_a, has_b = a.qa is not None, a.qb is not None
    aligned_k = a.gk % (32 if has_b else 16) == 0
    aligned_v = a.v_codec != V_BASE3 and (a.dv % 16 == 0 if a.v_per_token else a.gv % 16 == 0)
    if not word_loads:
        aligned_k = aligned_v = False
    out = torch.empty(a.bh, a.m, a.dv, dtype=torch.float32, device=dev)
    args = (a.q, or_f(a.qa), or_f(a.qb), or_i(a.ka_words), or_f(a.ka_scale), or_f(a.ka_zero), or_i(a.kb_words),
            or_f(a.kb_scale), or_f(a.kb_zero), or_f(a.k_res), a.v_words, or_f(a.v_scale), or_f(a.v_zero),
            or_f(a.v_res), out, a.m, a.d, a.dv, a.ka, a.kb, a.tqk, a.tqv, a.n, a.qk_scale)
    kw = dict(GK=a.gk, GV=a.gv, HAS_A=has_a, HAS_B=has_b, KB_PM=a.kb_pm, V_PER_TOKEN=a.v_per_token,
              V_CODEC=a.v_codec, V_HAS_SCALE=a.v_has_scale, ALIGNED_K=aligned_k, ALIGNED_V=aligned_v,
              BLOCK_M=_pow2(a.m), BLOCK_N=BLOCK_N,
              BLOCK_D=_pow2(a.d), BLOCK_DA=_pow2(a.ka), BLOCK_DB=_pow2(a.kb), BLOCK_DV=_pow2(a.dv))
    launch(_packed_decode_kernel, (a.bh,), dev, *args, **kw)
    return out.reshape(a.out_shape).to(query.dtype)


def kivi_decode_attention_triton(query, packed_keys: PackedKeys, packed_values: PackedValues, window_k=None,
                                 window_v=None, scale: Optional[float] = None, enable_gqa: bool = False):
    """KIVI-2 decode attention (2-bit per-channel keys, 2-bit per-token values, fp16 window), fused in Triton.

    The same kernel as :func:`packed_decode_attention_triton`, which also runs the VidKV layouts."""
    return packed_decode_attention_triton(query, packed_keys, packed_values, window_k, window_v, scale, enable_gqa)

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

import math
from typing import Optional

import torch
from ._launch import launch

from vopt.errors import VoptError
from vopt.kvcache.decode_attention import frequency_domain_query
from vopt.kvcache.quantizers import KVQuantMode, PackedKeys, PackedValues, ValueAxis, _stored_channel_order

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
#: Largest head_dim handled.
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
_V_AFFINE, _V_TRIT2, _V_BASE3 = 0, 1, 2


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
    if not isinstance(packed_keys, PackedKeys) or not isinstance(packed_values, PackedValues):
        return "needs exactly one PackedKeys and one PackedValues block (lists of blocks: use the torch reference)"
    if query.dim() != 4:
        return f"query must be [B, Hq, Lq, D], got {tuple(query.shape)}"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"query dtype {query.dtype} not supported (fp16, bf16, fp32)"
    B, Hq, Lq, D = query.shape
    kshape, vshape = tuple(packed_keys.shape), tuple(packed_values.shape)
    if kshape[:3] != vshape[:3] or kshape[0] != B:
        return f"keys {kshape} and values {vshape} must share B, Hkv, T with query batch {B}"
    Hkv = kshape[1]
    if kshape[3] != D:
        return f"key head_dim {kshape[3]} != query head_dim {D}"
    if Hq != Hkv and (not enable_gqa or Hq % Hkv):
        return f"query heads {Hq} vs KV heads {Hkv}: needs enable_gqa=True and Hq % Hkv == 0"
    if max(D, vshape[3]) > MAX_HEAD_DIM:
        return f"head_dim above {MAX_HEAD_DIM}"
    if (Hq // Hkv) * Lq > 128:
        return f"(Hq/Hkv)·Lq = {(Hq // Hkv) * Lq} query rows per KV head exceed 128 (decode path)"
    if (window_k is None) != (window_v is None):
        return "window_k and window_v must be given together"
    if window_k is not None:
        if window_k.shape[:2] != (B, Hkv) or window_k.shape[3] != D or window_v.shape[:3] != window_k.shape[:3] \
                or window_v.shape[3] != vshape[3]:
            return f"windows {tuple(window_k.shape)}, {tuple(window_v.shape)} do not match the cache"
    pk, pc = packed_keys, packed_values.codes
    for part, want in ((pk.anomalous, ("affine", 2)), (pk.easy, None)):
        if part is not None and want is not None and (part.decode, part.bits) != want:
            return f"anomalous key codes must be 2-bit affine, got {part.decode}/{part.bits}"
    if pk.easy is not None and (pk.easy.bits, pk.easy.decode) not in ((1, "pm_sign"), (1, "affine")):
        return f"easy key codes must be 1-bit signs, got {pk.easy.decode}/{pk.easy.bits}"
    if (pc.bits, pc.decode) not in ((2, "affine"), (2, "trit2"), (0, "trit")):
        return f"value codes {pc.decode}/{pc.bits}-bit not supported"
    if pc.decode == "affine" and (pc.scale is None or pc.zero is None):
        return "affine value codes need a scale and a zero point"
    total = kshape[2] + (0 if window_k is None else window_k.shape[2])
    if total == 0:
        return "empty cache"
    return None


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).contiguous()


def _residual(tail: Optional[torch.Tensor], window: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    parts = [x for x in (tail, window) if x is not None and x.shape[2] > 0]
    if not parts:
        return like.new_zeros(1, dtype=torch.float16)
    return _fp16(torch.cat([p.to(torch.float16) for p in parts], dim=2))


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
    pk, pv = packed_keys, packed_values
    B, Hq, Lq, D = query.shape
    Hkv, T, DV = pk.shape[1], pk.shape[2], pv.shape[3]
    M = (Hq // Hkv) * Lq
    dev = query.device
    q32 = query.to(torch.float32).reshape(B, Hkv, M, D)
    dummy_f = torch.zeros(1, dtype=torch.float16, device=dev)
    dummy_i = torch.zeros(1, dtype=torch.int32, device=dev)
    has_a, has_b = pk.anomalous is not None, pk.easy is not None
    easy_idx, anom_idx = _stored_channel_order(pk) if (has_a or has_b) else (None, None)

    def gather(idx):
        return torch.gather(q32, -1, idx.to(dev).unsqueeze(2).expand(B, Hkv, M, idx.shape[-1]))

    ka = pk.num_anomalous if has_a else 0
    qa = _fp16(gather(anom_idx)) if has_a else dummy_f
    kaw, kas, kaz = ((pk.anomalous.words, pk.anomalous.scale, pk.anomalous.zero) if has_a
                     else (dummy_i, dummy_f, dummy_f))
    if has_b:
        w = frequency_domain_query(gather(easy_idx), pk.mode is KVQuantMode.REFERENCE)
        kb = w.shape[-1]
        qb = _fp16(w)
        kbw, kbs = pk.easy.words, pk.easy.scale
        kbz = pk.easy.zero if pk.easy.zero is not None else dummy_f
        kb_pm = pk.easy.decode == "pm_sign"
    else:
        kb, qb, kbw, kbs, kbz, kb_pm = 0, dummy_f, dummy_i, dummy_f, dummy_f, True
    tqk = pk.num_quantized_tokens
    pc = pv.codes
    v_codec = {"affine": _V_AFFINE, "trit2": _V_TRIT2, "trit": _V_BASE3}[pc.decode]
    per_token = pv.axis is ValueAxis.TOKEN
    tqv = T - (0 if pv.tail is None else pv.tail.shape[2])
    vs = pc.scale if pc.scale is not None else dummy_f
    vz = pc.zero if pc.zero is not None else dummy_f
    kr = _residual(pk.tail, window_k, query)
    vr = _residual(pv.tail, window_v, query)
    n_total = T + (0 if window_k is None else window_k.shape[2])
    aligned_k = pk.group_size % (32 if has_b else 16) == 0
    aligned_v = v_codec != _V_BASE3 and (DV % 16 == 0 if per_token else pv.group_size % 16 == 0)
    if not word_loads:
        aligned_k = aligned_v = False
    out = torch.empty(B, Hkv, M, DV, dtype=torch.float32, device=dev)
    sm = (1.0 / math.sqrt(D) if scale is None else float(scale)) * _LOG2E
    args = (_fp16(q32), qa, qb, kaw, kas, kaz, kbw, kbs, kbz, kr, pc.words, vs, vz, vr, out,
            M, D, DV, ka, kb, tqk, tqv, n_total, sm)
    kw = dict(GK=pk.group_size, GV=pv.group_size, HAS_A=has_a, HAS_B=has_b, KB_PM=kb_pm, V_PER_TOKEN=per_token,
              V_CODEC=v_codec, V_HAS_SCALE=pc.scale is not None, ALIGNED_K=aligned_k, ALIGNED_V=aligned_v,
              BLOCK_M=_pow2(M), BLOCK_N=BLOCK_N,
              BLOCK_D=_pow2(D), BLOCK_DA=_pow2(ka), BLOCK_DB=_pow2(kb), BLOCK_DV=_pow2(DV))
    grid = (B * Hkv,)
    launch(_packed_decode_kernel, grid, dev, *args, **kw)
    return out.reshape(B, Hq, Lq, DV).to(query.dtype)


def kivi_decode_attention_triton(query, packed_keys: PackedKeys, packed_values: PackedValues, window_k=None,
                                 window_v=None, scale: Optional[float] = None, enable_gqa: bool = False):
    """KIVI-2 decode attention (2-bit per-channel keys, 2-bit per-token values, fp16 window), fused in Triton.

    The same kernel as :func:`packed_decode_attention_triton`, which also runs the VidKV layouts."""
    return packed_decode_attention_triton(query, packed_keys, packed_values, window_k, window_v, scale, enable_gqa)

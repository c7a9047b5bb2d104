"""Decode attention over a packed quantized KV cache (spec ``kvcache.md`` §3 "Decode path", §4), exact torch reference.

The cache of one layer is ``[packed quantized block(s) | full-precision window]`` along tokens: the packed keys
(:class:`~vopt.kvcache.quantizers.PackedKeys`, whose fp16 ``tail`` of ``T mod G`` tokens follows its quantized
tokens), the packed values (:class:`~vopt.kvcache.quantizers.PackedValues`, likewise), then ``window_k`` /
``window_v``. :func:`packed_decode_attention` is **defined** as::

    SDPA(query, cat(dequantize_keys(pk), window_k), cat(dequantize_values(pv), window_v), scale=scale,
         enable_gqa=enable_gqa)

(a list of blocks is concatenated in order) and equals it to float tolerance. How it is computed:

* **Keys, 2-bit anomalous / KIVI channels** (decode ``affine``): on the codes. Per group,
  ``q·k = Σ_c (q_c·s_c)·code_c + Σ_c q_c·z_c``: the query is gathered on the anomalous channels and scaled by
  the group scales, then contracted with the integer codes; the zero points enter as one ``q·z`` per group.
* **Keys, FFT-sign channels**: in the frequency domain, on the codes, never inverse-transformed. With
  ``k_easy = irfft(X)`` (recommended) Parseval gives
  ``q·k = (1/N)·[Q₀X₀ + Σ_{0<f<N/2} 2·(Re Q_f Re X_f + Im Q_f Im X_f) + Q_{N/2}X_{N/2}]``, ``Q = rfft(q_easy)``
  (weight 1 on DC and, for even ``N``, Nyquist, 2 on the doubled bins; the DC/Nyquist imaginary parts are not
  stored and ``irfft`` ignores them). With the reference's ``ifft(X).real`` (full complex FFT, ``2N`` reals
  interleaved) ``q·k = (1/N)·Σ_f (Re Q_f Re X_f + Im Q_f Im X_f)``, ``Q = fft(q_easy)``. The frequency-domain
  query ``W`` (one ``N``-point FFT of the query per step, ``O(N log N)``) is then contracted with the sign codes:
  ``X_j = (2·code_j − 1)·s_j`` (recommended ``±s``) or ``code_j·s_j + z_j`` (reference ``{0, s}``).
* **Values** (``Q2``, ternary with or without scale, per-channel or per-token groups): ``P·V`` on the codes. Each
  decoded value is ``a·code + b`` with per-group ``a`` (scale) and ``b`` (zero point, ``−s`` for ``±s`` / 2-bit
  trits, 0 for base-3 trits); per-channel groups give ``Σ_g a_g·(P_g·codes_g) + b_g·ΣP_g``, per-token groups
  ``Σ_t (P_t·a_t)·codes_t + Σ_t P_t·b_t``.
* Tails (``T mod G`` tokens) and the window are plain fp32 dot products. One softmax over all scores.

The packed words are unpacked to integer codes (``uint8``/``int8``, torch has no bit-field gather); floating-point
dequantized K or V (``[B, H, T, D]``) are never formed. Everything runs in float32 (float64 for float64 input);
the result is in ``query.dtype``. Differences to the definition: summation order, and that the definition rounds
the dequantized K/V to ``pk.dtype`` (e.g. fp16) while this computes in fp32 (so the fp16 case agrees to fp16
rounding, the fp32 case to ~1e-6, ~1e-4 with outlier channels whose logits reach ~1e2).
:mod:`vopt.kernels.vidkv_decode` (Triton) and :mod:`vopt.kvcache.decode_cuda` (CUDA) are the fused kernels
(KIVI-2 and VidKV layouts).
Inputs are never modified.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from .quantizers import KVQuantMode, PackedCodes, PackedKeys, PackedValues, ValueAxis, _stored_channel_order

__all__ = ["packed_decode_attention", "frequency_domain_query", "affine_coefficients"]

KeysArg = Union[PackedKeys, Sequence[PackedKeys], None]
ValuesArg = Union[PackedValues, Sequence[PackedValues], None]


def affine_coefficients(pc: PackedCodes):
    """``(a, b)`` float32 with ``decoded = a·code + b`` per group (shape ``pc.shape[:-1]``), for every decode."""
    shp = pc.shape[:-1]
    dev = pc.words.device
    one = torch.ones(shp, dtype=torch.float32, device=dev)
    s = one if pc.scale is None else pc.scale.to(torch.float32)
    if pc.decode == "affine":
        b = torch.zeros_like(s) if pc.zero is None else pc.zero.to(torch.float32)
        return s, b
    if pc.decode == "pm_sign":
        return 2.0 * s, -s
    if pc.decode == "trit":  # codes are q in {-1, 0, 1}
        return s, torch.zeros_like(s)
    if pc.decode == "trit2":  # codes are q + 1
        return s, -s
    raise ValueError(f"unknown decode {pc.decode!r}")


def frequency_domain_query(q_easy: torch.Tensor, reference: bool) -> torch.Tensor:
    """Weights ``W`` with ``q_easy · k_easy == W · r`` for ``k_easy`` the inverse transform of the stored real
    coefficients ``r`` (layout of ``quantizers._real_coefficients``): ``N`` reals (``rfft``) or ``2N`` (reference)."""
    n = q_easy.shape[-1]
    if reference:
        F = torch.fft.fft(q_easy, dim=-1)
        return torch.view_as_real(F).reshape(*q_easy.shape[:-1], 2 * n) / n
    F = torch.fft.rfft(q_easy, dim=-1)
    nc = F.shape[-1]
    n_imag_end = nc - 1 if n % 2 == 0 else nc
    w = torch.full((nc,), 2.0, dtype=q_easy.dtype, device=q_easy.device)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return torch.cat([F.real * w, (F.imag * w)[..., 1:n_imag_end]], dim=-1) / n


def _code_scores(w: torch.Tensor, pc: PackedCodes) -> torch.Tensor:
    """``w [B, H, M, C]`` against token-grouped codes ``[B, H, nG, C, G]``: scores ``[B, H, M, nG·G]``."""
    codes = pc.codes().to(w.dtype)                     # [B, H, nG, C, G] integer codes, no scale applied
    a, b = (t.to(w.dtype) for t in affine_coefficients(pc))  # [B, H, nG, C]
    B, H, nG, C, G = codes.shape
    wa = w.unsqueeze(2) * a.unsqueeze(3)               # [B, H, nG, M, C]: query folded with the group scales
    s = wa @ codes                                     # [B, H, nG, M, G]
    s = s + torch.einsum("bhmc,bhgc->bhgm", w, b).unsqueeze(-1)
    return s.permute(0, 1, 3, 2, 4).reshape(B, H, w.shape[2], nG * G)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, H, M, D]`` at channels ``idx [B, H, n]``."""
    return torch.gather(x, -1, idx.unsqueeze(2).expand(*x.shape[:3], idx.shape[-1]))


def _key_scores(q: torch.Tensor, pk: PackedKeys) -> torch.Tensor:
    """Scores ``q·k`` for ``q [B, Hkv, M, D]`` over all ``pk.shape[2]`` tokens (quantized then tail)."""
    B, H, T, D = pk.shape
    parts = []
    if pk.anomalous is not None or pk.easy is not None:
        easy_idx, anom_idx = _stored_channel_order(pk)
        s = 0
        if pk.anomalous is not None:
            s = s + _code_scores(_gather(q, anom_idx.to(q.device)), pk.anomalous)
        if pk.easy is not None:
            w = frequency_domain_query(_gather(q, easy_idx.to(q.device)), pk.mode is KVQuantMode.REFERENCE)
            s = s + _code_scores(w, pk.easy)
        parts.append(s)
    if pk.tail is not None:
        parts.append(q @ pk.tail.to(q.dtype).transpose(-1, -2))
    if not parts:
        return q.new_zeros(B, H, q.shape[2], 0)
    return torch.cat(parts, dim=-1)


def _value_out(p: torch.Tensor, pv: PackedValues) -> torch.Tensor:
    """``p [B, Hkv, M, T] @ V`` for the packed values (quantized then tail), on the codes."""
    B, H, T, D = pv.shape
    pc = pv.codes
    codes = pc.codes().to(p.dtype)
    a, b = (t.to(p.dtype) for t in affine_coefficients(pc))
    M = p.shape[2]
    if pv.axis is ValueAxis.TOKEN:                      # codes [B, H, T, D/G, G], a/b [B, H, T, D/G]
        pa = p.unsqueeze(-1) * a.unsqueeze(2)           # [B, H, M, T, D/G]
        out = torch.einsum("bhmtj,bhtji->bhmji", pa, codes).reshape(B, H, M, D)
        return out + torch.einsum("bhmt,bhtj->bhmj", p, b).repeat_interleave(pv.group_size, dim=-1)
    nG, G = codes.shape[2], codes.shape[4]              # codes [B, H, nG, D, G], a/b [B, H, nG, D]
    Tq = nG * G
    pg = p[..., :Tq].reshape(B, H, M, nG, G).transpose(2, 3)   # [B, H, nG, M, G]
    pc_ = pg @ codes.transpose(-1, -2)                  # [B, H, nG, M, D]
    out = (pc_ * a.unsqueeze(3)).sum(2) + torch.einsum("bhgm,bhgd->bhmd", pg.sum(-1), b)
    if pv.tail is not None:
        out = out + p[..., Tq:] @ pv.tail.to(p.dtype)
    return out


def _as_list(x):
    if x is None:
        return []
    if isinstance(x, (PackedKeys, PackedValues)):
        return [x]
    return list(x)


def packed_decode_attention(
    query: torch.Tensor,
    packed_keys: KeysArg,
    packed_values: ValuesArg,
    window_k: Optional[torch.Tensor] = None,
    window_v: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    attn_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of ``query [B, Hq, Lq, D]`` over ``[packed block(s) | window]``; returns ``[B, Hq, Lq, Dv]``.

    ``packed_keys`` / ``packed_values``: one container or a sequence of blocks (in token order; key and value
    blocks may be cut differently but must cover the same tokens), or None. ``window_k [B, Hkv, W, D]`` /
    ``window_v [B, Hkv, W, Dv]`` follow them. ``scale`` defaults to ``1/sqrt(D)``. ``enable_gqa`` as in SDPA:
    query head ``h`` reads KV head ``h // (Hq/Hkv)``. ``attn_mask`` (optional, SDPA semantics: bool = keep, or
    additive) broadcastable to ``[B, Hq, Lq, T_total]``; no causal masking is applied (a decode query sees the
    whole cache). See the module docstring for what runs on packed data.
    """
    if query.dim() != 4:
        raise ValueError(f"query must be [B, Hq, Lq, D], got shape {tuple(query.shape)}")
    pks, pvs = _as_list(packed_keys), _as_list(packed_values)
    B, Hq, Lq, D = query.shape
    shapes = [p.shape for p in pks] + [p.shape for p in pvs]
    shapes += [tuple(w.shape) for w in (window_k, window_v) if w is not None]
    if not shapes:
        raise ValueError("packed_decode_attention needs at least one packed block or a window")
    Hkv = shapes[0][1]
    for s in shapes:
        if s[0] != B or s[1] != Hkv:
            raise ValueError(f"K/V batch/heads {tuple(s[:2])} do not match ({B}, {Hkv})")
    if Hq != Hkv and (not enable_gqa or Hq % Hkv):
        raise ValueError(f"query heads {Hq} vs KV heads {Hkv}: needs enable_gqa=True and Hq % Hkv == 0")
    for p in pks:
        if p.shape[3] != D:
            raise ValueError(f"key head_dim {p.shape[3]} != query head_dim {D}")
    tk = sum(p.shape[2] for p in pks) + (0 if window_k is None else window_k.shape[2])
    tv = sum(p.shape[2] for p in pvs) + (0 if window_v is None else window_v.shape[2])
    if tk != tv:
        raise ValueError(f"keys cover {tk} tokens, values {tv}")
    dv = (pvs[0].shape[3] if pvs else window_v.shape[3])
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    g = Hq // Hkv
    q = query.to(work).reshape(B, Hkv, g * Lq, D)       # rows of one KV head: (query head in group, position)
    scores = [_key_scores(q, pk) for pk in pks]
    if window_k is not None:
        scores.append(q @ window_k.to(work).transpose(-1, -2))
    s = torch.cat(scores, dim=-1) * scale                # [B, Hkv, g·Lq, T_total]
    if attn_mask is not None:
        s4 = s.reshape(B, Hq, Lq, tk)
        if attn_mask.dtype == torch.bool:
            s4 = s4.masked_fill(~attn_mask, float("-inf"))
        else:
            s4 = s4 + attn_mask.to(work)
        s = s4.reshape(B, Hkv, g * Lq, tk)
    p = torch.softmax(s, dim=-1)
    out = q.new_zeros(B, Hkv, g * Lq, dv)
    start = 0
    for pv in pvs:
        n = pv.shape[2]
        out = out + _value_out(p[..., start:start + n], pv)
        start += n
    if window_v is not None:
        out = out + p[..., start:] @ window_v.to(work)
    return out.reshape(B, Hq, Lq, dv).to(query.dtype)

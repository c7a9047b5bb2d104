"""The operands of a fused packed-decode kernel, prepared once per call (shared by the Triton and CUDA kernels).

A fused kernel (:mod:`vopt.kernels.vidkv_decode`, ``cuda/vidkv_decode.cu``) attends one query block to ONE packed
block (KIVI-2 or a VidKV layout, :func:`~vopt.kvcache.quantizers.concat_blocks` joins append-only blocks) plus an
fp16 residual (the containers' tails and the recent window). :func:`fused_decode_args` turns the containers into
flat tensors and integers with the layout both kernels read, so the index arithmetic lives in the kernels only:

* rows: the ``G = Hq/Hkv`` query heads of a KV head times ``Lq`` positions, ``M = G·Lq`` rows per ``(b, kv head)``
  (``bh = b·Hkv + h``), GQA without repeating K/V;
* ``q`` fp16 ``[BH, M, D]``; ``qa`` fp16 ``[BH, M, KA]`` (the query on the anomalous key channels, 2-bit codes);
  ``qb`` fp16 ``[BH, M, KB]`` (the frequency-domain query of the easy channels, 1-bit sign codes; Parseval);
* key codes: ``ka_words`` int32 (2-bit, code ``i`` of the flat index ``((bh·NGK + t // GK)·KA + c)·GK + t % GK`` in
  word ``i >> 4`` at bits ``2·(i & 15)``), ``kb_words`` int32 (1-bit, word ``i >> 5`` bit ``i & 31``, same flat
  index with ``KB``), scales / zeros ``[BH, NGK, KA|KB]`` in the metadata dtype; ``kb_pm``: ``(2·bit − 1)·s``,
  else ``bit·s + z``; tokens ``t < TQK`` are packed, ``TQK <= t < N`` read ``k_res`` fp16 ``[BH, N − TQK, D]``;
* value codes (``v_codec`` 0: 2-bit ``code·s + z``; 1: 2-bit ``(code − 1)·s``; 2: base-3 ``digit − 1`` (times ``s``
  if ``v_has_scale``), five trits per byte, byte ``i // 5``, digit ``i % 5``), flat index per token
  ``(bh·TQV + t)·DV + c`` with group ``(bh·TQV + t)·(DV/GV) + c // GV``, or per channel
  ``((bh·NGV + t // GV)·DV + c)·GV + t % GV`` with group ``(bh·NGV + t // GV)·DV + c``; tokens ``TQV <= t < N`` read
  ``v_res`` fp16 ``[BH, N − TQV, DV]``;
* ``qk_scale`` = softmax scale · log2(e) (scores in the exp2 domain).

Numerics of both kernels: dequantized K and V and the softmax P are rounded to fp16 for the products, scores,
softmax and accumulation are fp32, the output is fp32 ``[BH, M, DV]`` (the caller reshapes and casts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .decode_attention import frequency_domain_query
from .quantizers import KVQuantMode, PackedKeys, PackedValues, ValueAxis, _stored_channel_order

__all__ = ["FusedDecodeArgs", "fused_decode_args", "layout_reason", "V_AFFINE", "V_TRIT2", "V_BASE3", "LOG2E",
           "MAX_HEAD_DIM", "MAX_ROWS"]

LOG2E = 1.4426950408889634
#: Largest head_dim (keys and values) the fused kernels handle.
MAX_HEAD_DIM = 256
#: Largest number of query rows per KV head, (Hq/Hkv)·Lq: the kernels are decode kernels.
MAX_ROWS = 128
V_AFFINE, V_TRIT2, V_BASE3 = 0, 1, 2


@dataclass
class FusedDecodeArgs:
    """Flat operands of one fused decode call (layouts in the module docstring). ``None`` = absent part."""

    q: torch.Tensor
    qa: Optional[torch.Tensor]
    qb: Optional[torch.Tensor]
    ka_words: Optional[torch.Tensor]
    ka_scale: Optional[torch.Tensor]
    ka_zero: Optional[torch.Tensor]
    kb_words: Optional[torch.Tensor]
    kb_scale: Optional[torch.Tensor]
    kb_zero: Optional[torch.Tensor]
    k_res: Optional[torch.Tensor]
    v_words: torch.Tensor
    v_scale: Optional[torch.Tensor]
    v_zero: Optional[torch.Tensor]
    v_res: Optional[torch.Tensor]
    bh: int
    m: int
    d: int
    dv: int
    ka: int
    kb: int
    tqk: int
    tqv: int
    n: int
    gk: int
    gv: int
    qk_scale: float
    kb_pm: bool
    v_per_token: bool
    v_codec: int
    v_has_scale: bool
    out_shape: tuple  # (B, Hq, Lq, DV): the caller's view of the [BH, M, DV] result


def layout_reason(query, packed_keys, packed_values, window_k=None, window_v=None, enable_gqa=False) -> Optional[str]:
    """None if the fused kernels' layouts cover this call (one packed block + window), else why not."""
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
    if (Hq // Hkv) * Lq > MAX_ROWS:
        return f"(Hq/Hkv)·Lq = {(Hq // Hkv) * Lq} query rows per KV head exceed {MAX_ROWS} (decode path)"
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


def _residual(tail: Optional[torch.Tensor], window: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    parts = [x for x in (tail, window) if x is not None and x.shape[2] > 0]
    if not parts:
        return None
    return _fp16(torch.cat([p.to(torch.float16) for p in parts], dim=2))


def fused_decode_args(query, packed_keys: PackedKeys, packed_values: PackedValues, window_k=None, window_v=None,
                      scale: Optional[float] = None) -> FusedDecodeArgs:
    """The operands for ``query`` [B, Hq, Lq, D] against one packed block + window (the caller checked the call
    is supported, e.g. with :func:`vopt.kernels.vidkv_decode.unsupported_reason`). Inputs are not modified."""
    pk, pv = packed_keys, packed_values
    b, hq, lq, d = query.shape
    hkv, t, dv = pk.shape[1], pk.shape[2], pv.shape[3]
    m = (hq // hkv) * lq
    dev = query.device
    q32 = query.to(torch.float32).reshape(b, hkv, m, d)
    has_a, has_b = pk.anomalous is not None, pk.easy is not None
    easy_idx, anom_idx = _stored_channel_order(pk) if (has_a or has_b) else (None, None)

    def gather(idx):
        return torch.gather(q32, -1, idx.to(dev).unsqueeze(2).expand(b, hkv, m, idx.shape[-1]))

    qa = _fp16(gather(anom_idx)) if has_a else None
    ka_words, ka_scale, ka_zero = ((pk.anomalous.words, pk.anomalous.scale, pk.anomalous.zero) if has_a
                                   else (None, None, None))
    if has_b:
        qb = _fp16(frequency_domain_query(gather(easy_idx), pk.mode is KVQuantMode.REFERENCE))
        kb_words, kb_scale, kb_zero = pk.easy.words, pk.easy.scale, pk.easy.zero
        kb_pm = pk.easy.decode == "pm_sign"
    else:
        qb = kb_words = kb_scale = kb_zero = None
        kb_pm = True
    pc = pv.codes
    v_codec = {"affine": V_AFFINE, "trit2": V_TRIT2, "trit": V_BASE3}[pc.decode]
    sm = (1.0 / math.sqrt(d) if scale is None else float(scale)) * LOG2E
    return FusedDecodeArgs(
        q=_fp16(q32), qa=qa, qb=qb,
        ka_words=ka_words, ka_scale=ka_scale, ka_zero=ka_zero,
        kb_words=kb_words, kb_scale=kb_scale, kb_zero=kb_zero,
        k_res=_residual(pk.tail, window_k),
        v_words=pc.words, v_scale=pc.scale, v_zero=pc.zero,
        v_res=_residual(pv.tail, window_v),
        bh=b * hkv, m=m, d=d, dv=dv,
        ka=pk.num_anomalous if has_a else 0, kb=0 if qb is None else qb.shape[-1],
        tqk=pk.num_quantized_tokens, tqv=t - (0 if pv.tail is None else pv.tail.shape[2]),
        n=t + (0 if window_k is None else window_k.shape[2]),
        gk=pk.group_size, gv=pv.group_size, qk_scale=sm,
        kb_pm=kb_pm, v_per_token=pv.axis is ValueAxis.TOKEN, v_codec=v_codec, v_has_scale=pc.scale is not None,
        out_shape=(b, hq, lq, dv),
    )

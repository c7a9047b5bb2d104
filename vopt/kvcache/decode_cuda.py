"""Fused packed-decode attention on ``libvopt_cuda.so`` (``cuda/vidkv_decode.cu``), the CUDA twin of the Triton
kernel :mod:`vopt.kernels.vidkv_decode`.

Both read the operands :func:`~vopt.kvcache.fused_decode_args.fused_decode_args` prepares (one packed block +
fp16 residual; layouts and numerics in that module). The CUDA kernel splits the tokens over several CTAs per
``(batch, kv head)`` when there are few of those (flash-decoding: partial max / sum / accumulator, then a merge
kernel), which the Triton kernel does not. :func:`unsupported_reason` names what it cannot run; the cache
(:class:`~vopt.kvcache.cache.VidKVLayer`) then tries Triton, then the torch reference, logging why once.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from .. import cuda_library
from .fused_decode_args import fused_decode_args, layout_reason

__all__ = ["unsupported_reason", "packed_decode_attention_cuda", "choose_splits"]

_META = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
#: Fewest tokens one split handles (below this, splitting costs more than it gains).
MIN_TOKENS_PER_SPLIT = 256


def _meta_tensors(pk, pv) -> list:
    parts = [pk.anomalous, pk.easy]
    out = [t for p in parts if p is not None for t in (p.scale, p.zero) if t is not None]
    return out + [t for t in (pv.codes.scale, pv.codes.zero) if t is not None]


def unsupported_reason(query, packed_keys, packed_values, window_k=None, window_v=None, enable_gqa=False):
    """None if :func:`packed_decode_attention_cuda` can run this call, else why not."""
    why = cuda_library.unavailable_reason()
    if why:
        return why
    if query.device.type != "cuda":
        return f"query is on {query.device}, not a CUDA device"
    why = layout_reason(query, packed_keys, packed_values, window_k, window_v, enable_gqa)
    if why:
        return why
    dtypes = {t.dtype for t in _meta_tensors(packed_keys, packed_values)}
    if len(dtypes) > 1 or not dtypes <= set(_META):
        return f"scales and zero points must share one dtype of float16, bfloat16, float32 (got {sorted(map(str, dtypes))})"
    return cuda_library.device_reason(query.device)


def choose_splits(bh: int, n: int, device) -> int:
    """Token splits per (batch, kv head): enough CTAs for ~2 per SM, each with >= MIN_TOKENS_PER_SPLIT tokens."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * sms // max(bh, 1))
    return max(1, min(want, n // MIN_TOKENS_PER_SPLIT))


def packed_decode_attention_cuda(query, packed_keys, packed_values, window_k=None, window_v=None,
                                 scale: Optional[float] = None, enable_gqa: bool = False,
                                 splits: Optional[int] = None) -> torch.Tensor:
    """Decode attention of ``query`` [B, Hq, Lq, D] over one packed block (+ window) on the CUDA kernel.

    Returns [B, Hq, Lq, Dv] in ``query.dtype``. ``splits`` (default: :func:`choose_splits`) token ranges per
    (batch, kv head). The caller checked :func:`unsupported_reason`. Inputs are not modified.
    """
    lib = cuda_library.load()
    a = fused_decode_args(query, packed_keys, packed_values, window_k, window_v, scale)
    dev = query.device
    splits = choose_splits(a.bh, a.n, dev) if splits is None else int(splits)
    out = torch.empty(a.bh, a.m, a.dv, dtype=torch.float32, device=dev)
    prm = cuda_library.VidKVDecodeParams()
    tensors = dict(q=a.q, qa=a.qa, qb=a.qb, ka_words=a.ka_words, ka_scale=a.ka_scale, ka_zero=a.ka_zero,
                   kb_words=a.kb_words, kb_scale=a.kb_scale, kb_zero=None if a.kb_pm else a.kb_zero, k_res=a.k_res,
                   v_words=a.v_words, v_scale=a.v_scale, v_zero=a.v_zero if a.v_codec == 0 else None,
                   v_res=a.v_res, out=out)
    keep = []
    for name, t in tensors.items():
        if t is not None:
            t = t.contiguous()
            keep.append(t)
            setattr(prm, name, t.data_ptr())
    for name in ("bh", "m", "d", "dv", "ka", "kb", "tqk", "tqv", "n", "gk", "gv"):
        setattr(prm, name, int(getattr(a, name)))
    prm.splits = splits
    prm.qk_scale = a.qk_scale
    metas = _meta_tensors(packed_keys, packed_values)
    prm.meta_dtype = _META[metas[0].dtype] if metas else 0
    prm.kb_pm, prm.v_per_token, prm.v_codec, prm.v_has_scale = (int(a.kb_pm), int(a.v_per_token), a.v_codec,
                                                                int(a.v_has_scale))
    nbytes = ctypes.c_int64(0)
    lib.check(lib.call("vopt_vidkv_decode_workspace_bytes", ctypes.byref(prm), ctypes.byref(nbytes)),
              "vopt_vidkv_decode_workspace_bytes")
    workspace = None
    if nbytes.value:
        workspace = torch.empty(-(-nbytes.value // 4), dtype=torch.float32, device=dev)
        prm.workspace = workspace.data_ptr()
    with torch.cuda.device(dev):
        status = lib.call("vopt_vidkv_decode_fwd", ctypes.byref(prm), cuda_library.current_stream_handle(query))
    lib.check(status, "vopt_vidkv_decode_fwd")
    del keep, workspace  # alive until the launch was queued; the caching allocator keeps stream order
    return out.reshape(a.out_shape).to(query.dtype)

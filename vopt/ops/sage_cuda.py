"""The CUDA backend of ``vopt::sage_attention``: ``libvopt_cuda.so``'s hand-written SageAttention2 kernels.

Host side of ``cuda/sage_quant.cu`` (fused smoothing + quantization) and ``cuda/sage_attn*.cu`` (attention on the
codes); the layouts are specified once, in ``cuda/vopt_cuda.h``. One call:

1. ``km`` (K smoothing) and ``vm`` (V smoothing) with the channel-mean kernel;
2. Q and K to INT8/INT4 codes with per-thread (or per-block) scales, Q smoothing (``qm``) fused in; V to
   per-channel E4M3 in the transposed, fragment-permuted layout (FP8 PV), or to fp16 (FP16 PV, in torch);
3. ``ΔS = qm·(K - km)ᵀ·scale·log2 e`` in torch (Q smoothing only; a GEMM ~1/128 of the QK FLOPs);
4. the attention kernel, which the library picks per device: ``wgmma`` + TMA on sm_90a (INT8 QK + FP8 PV),
   ``mma.sync`` on sm_80/sm_89 (and sm_90 for what the wgmma kernel does not take).

What the kernels take (:func:`unsupported_reason` says why a call is refused, and the dispatcher then falls back to
Triton with that reason logged): fp16/bf16 ``[B, H, L, D]`` tensors with ``D <= 128`` (padded to 64 or 128 here;
the padding is free for Q/K codes, the output is cut back), Hq a multiple of Hkv, no ``attn_mask`` (masks run in
the Triton kernel), precisions with per-thread (32-row warps, 64-key blocks) or per-block (128/64) scales, INT8 or
INT4 QK and FP8 or FP16 PV. INT4 is not a Hopper instruction: on sm_90 an INT4 precision runs INT8 QK (more
accurate, never less), which is logged once. Causal masks are bottom-right aligned (the op normalizes SDPA's
top-left convention before any backend runs).
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import math
from typing import Optional

import torch

from .. import cuda_library
from ..errors import CudaLibraryError
from .sage_reference import LN2, LOG2E, Granularity, PVPrecision, QKPrecision, SagePrecision

log = logging.getLogger(__name__)

__all__ = ["unsupported_reason", "sage_attention_cuda", "prepare", "quantize", "channel_mean", "KERNEL_NAMES"]

#: Kernel ids of ``vopt_sage_attn_params.kernel`` (VOPT_SAGE_KERNEL_*).
KERNEL_NAMES = {0: "auto", 1: "mma", 2: "wgmma"}
_KERNEL_IDS = {v: k for k, v in KERNEL_NAMES.items()}
_PER_THREAD, _PER_BLOCK = 0, 1
_PV_FP8, _PV_FP16 = 0, 1
_ROW_TILE = 128  # L_pad: rows and keys are padded to multiples of this
_DTYPES = {torch.float16: "f16", torch.bfloat16: "bf16"}


def _pad(n: int, to: int = _ROW_TILE) -> int:
    return -(-n // to) * to


def _head_dim_pad(d: int) -> int:
    return 64 if d <= 64 else 128


def _precision_reason(p: SagePrecision) -> Optional[str]:
    """Why the CUDA kernels cannot compute precision ``p`` exactly as the reference defines it, or None."""
    if p.granularity is Granularity.PER_WARP:
        return "per_warp scales are not implemented by the CUDA kernels (per_thread, per_block are)"
    if p.granularity is Granularity.PER_THREAD and p.warp_q != 32:
        return f"per_thread scales need warp_q=32 (got {p.warp_q})"
    if p.block_q != 128 or p.block_k != 64:
        return f"the CUDA kernels use block_q=128, block_k=64 (got {p.block_q}, {p.block_k})"
    if p.pv is PVPrecision.FP32:
        return "pv='fp32' has no CUDA kernel (fp8 and fp16 do)"
    return None


def _effective_bits(p: SagePrecision, cc: int) -> int:
    """QK bits the kernel runs: INT4 maps to INT8 on sm_90 (no INT4 tensor-core rate on Hopper)."""
    if p.qk is QKPrecision.INT4 and cc == 90:
        _note_int4_on_hopper()
        return 8
    return 4 if p.qk is QKPrecision.INT4 else 8


@functools.lru_cache(maxsize=1)
def _note_int4_on_hopper() -> None:
    log.warning("vopt sage_attention (cuda): INT4 QK is not a Hopper instruction; sm_90 runs INT8 QK instead "
                "(same smoothing, more accurate)")


def _params(b, hq, hkv, lq, lk, d_pad, out_dim, bits, p: SagePrecision, causal, out_dtype, kernel,
            **pointers) -> cuda_library.SageAttnParams:
    prm = cuda_library.SageAttnParams()
    for name, value in pointers.items():
        setattr(prm, name, value)
    prm.batch, prm.heads_q, prm.heads_kv, prm.len_q, prm.len_k = b, hq, hkv, lq, lk
    prm.head_dim, prm.out_dim = d_pad, out_dim
    prm.qk_bits = bits
    prm.granularity = _PER_THREAD if p.granularity is Granularity.PER_THREAD else _PER_BLOCK
    prm.pv = _PV_FP8 if p.pv is PVPrecision.FP8 else _PV_FP16
    prm.two_level = int(bool(p.two_level_accumulation))
    prm.causal = int(bool(causal))
    prm.out_dtype = 0 if out_dtype == torch.float16 else 1
    prm.kernel = _KERNEL_IDS[kernel]
    return prm


def _select(prm) -> tuple[Optional[str], Optional[str]]:
    """``(kernel name, None)`` the library would run for ``prm`` on the current device, or ``(None, reason)``."""
    lib = cuda_library.load()
    chosen = ctypes.c_int32(0)
    status = lib.call("vopt_sage_attn_select", ctypes.byref(prm), ctypes.byref(chosen))
    if status != 0:
        return None, f"{lib.error_string(status)}: {lib.last_error_message()}"
    return KERNEL_NAMES[chosen.value], None


def unsupported_reason(query, key, value, attn_mask, is_causal, precision: SagePrecision,
                       kernel: str = "auto") -> Optional[str]:
    """Why the CUDA kernels cannot run this call, or None (then :func:`sage_attention_cuda` can)."""
    why = cuda_library.unavailable_reason()
    if why:
        return why
    if kernel not in _KERNEL_IDS:
        return f"kernel={kernel!r}; accepted: {', '.join(_KERNEL_IDS)}"
    if attn_mask is not None:
        return "attn_mask is not supported by the CUDA kernels (causal is; the Triton kernel takes masks)"
    why = _precision_reason(precision)
    if why:
        return why
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            return f"{name} must be [B, H, L, D], got shape {tuple(t.shape)}"
        if t.dtype not in _DTYPES:
            return f"{name} dtype {t.dtype} not supported (float16, bfloat16)"
        if t.device.type != "cuda":
            return f"{name} is on {t.device}, not a CUDA device"
        if t.stride(-1) != 1:
            return f"{name} must be contiguous along head_dim (stride {t.stride(-1)})"
    if min(query.shape[:3]) == 0 or key.shape[2] == 0:
        return f"empty input (query {tuple(query.shape)}, key {tuple(key.shape)}): nothing for the kernels to do"
    if len({query.device, key.device, value.device}) != 1:
        return "query, key and value are on different devices"
    if query.shape[0] != key.shape[0] or key.shape[:3] != value.shape[:3]:
        return f"shapes do not match: query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
    d, dv = query.shape[-1], value.shape[-1]
    if max(d, dv) > 128 or key.shape[-1] != d:
        return f"head_dim {d} / value dim {dv}: the CUDA kernels take up to 128 (64 and 128, smaller ones padded)"
    why = cuda_library.device_reason(query.device)
    if why:
        return why
    cc = _compute_capability(query.device)
    with torch.cuda.device(query.device):
        # Dummy, aligned, non-NULL pointers: selection checks the arguments and the device, it launches nothing.
        dummy = {n: 256 for n in ("q", "k", "q_scale", "k_scale", "v", "out")}
        if precision.pv is PVPrecision.FP8:
            dummy["v_scale"] = 256
        b, hq, lq, _ = query.shape
        prm = _params(b, hq, key.shape[1], lq, key.shape[2], _head_dim_pad(max(d, dv)), dv,
                      _effective_bits(precision, cc), precision, is_causal, query.dtype, kernel, **dummy)
        prm.out_stride_b, prm.out_stride_h, prm.out_stride_l = hq * lq * dv, lq * dv, dv
        _, why = _select(prm)
    return why


@functools.lru_cache(maxsize=None)
def _compute_capability(device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


@dataclasses.dataclass
class QuantizedInputs:
    """What :func:`quantize` hands the attention kernel (layouts: cuda/vopt_cuda.h). Tensors only; no state."""

    q_codes: torch.Tensor
    k_codes: torch.Tensor
    q_scale: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: Optional[torch.Tensor]
    v_mean: Optional[torch.Tensor]  # [B, Hkv, D_pad] (0 past D)
    km: Optional[torch.Tensor]      # [B, Hkv, D]
    qm: Optional[torch.Tensor]      # [B, Hq, L_pad(Lq)/128, D_pad]
    delta_s: Optional[torch.Tensor]  # [B, Hq, L_pad(Lq)/128, L_pad(Lk)]
    bits: int
    d_pad: int
    sm_scale_log2: float


def _call(lib, symbol: str, *args) -> None:
    lib.check(lib.call(symbol, *args), symbol)


def _strided(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), *x.shape)


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    """fp32 mean over L of ``x`` [B, H, L, D] (fp16/bf16, on CUDA) -> [B, H, D], with the library's kernel."""
    lib = cuda_library.load()
    b, h, _, d = x.shape
    out = torch.empty(b, h, d, dtype=torch.float32, device=x.device)
    _call(lib, f"vopt_sage_channel_mean_{_DTYPES[x.dtype]}", *_strided(x), out.data_ptr(),
          cuda_library.current_stream_handle(x))
    return out


def quantize(query, key, value, precision: SagePrecision, scale: Optional[float], bits: int,
             km: Optional[torch.Tensor] = None, vm: Optional[torch.Tensor] = None) -> QuantizedInputs:
    """Smooth and quantize Q, K, V with the library's kernels.

    ``km`` / ``vm`` (fp32 [B, Hkv, D]): use these K / V means instead of computing them (tests pass the
    reference's, to compare codes bit for bit); ignored when the precision does not smooth K / V.
    Inputs are read, never written. ``bits`` is the QK width the kernel runs (8 or 4).
    """
    lib = cuda_library.load()
    dev = query.device
    stream = cuda_library.current_stream_handle(query)
    b, hq, lq, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[-1]
    d_pad = _head_dim_pad(max(d, dv))
    lq_pad, lk_pad = _pad(lq), _pad(lk)
    gran = _PER_THREAD if precision.granularity is Granularity.PER_THREAD else _PER_BLOCK
    sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    fold = float(torch.tensor(sm_scale * LOG2E, dtype=torch.float32))
    code_cols = d_pad if bits == 8 else d_pad // 2
    sfx = _DTYPES[query.dtype]

    if precision.smooth_k and km is None:
        km = channel_mean(key)
    if not precision.smooth_k:
        km = None
    km = None if km is None else km.to(torch.float32).contiguous()
    q_codes = torch.empty(b, hq, lq_pad, code_cols, dtype=torch.int8, device=dev)
    q_scale = torch.empty(b, hq, *((lq_pad // 32, 8) if gran == _PER_THREAD else (lq_pad // 128,)),
                          dtype=torch.float32, device=dev)
    qm = torch.empty(b, hq, lq_pad // 128, d_pad, dtype=torch.float32, device=dev) if precision.smooth_q else None
    _call(lib, f"vopt_sage_quant_q_{sfx}", *_strided(query), d_pad, bits, gran, int(bool(precision.smooth_q)), fold,
          q_codes.data_ptr(), q_scale.data_ptr(), None if qm is None else qm.data_ptr(), stream)
    k_codes = torch.empty(b, hkv, lk_pad, code_cols, dtype=torch.int8, device=dev)
    k_scale = torch.empty(b, hkv, *((lk_pad // 64, 4) if gran == _PER_THREAD else (lk_pad // 64,)),
                          dtype=torch.float32, device=dev)
    _call(lib, f"vopt_sage_quant_k_{sfx}", *_strided(key), d_pad, bits, gran,
          None if km is None else km.data_ptr(), k_codes.data_ptr(), k_scale.data_ptr(), stream)

    if precision.smooth_v and vm is None:
        vm = channel_mean(value)
    if not precision.smooth_v:
        vm = None
    vm = None if vm is None else vm.to(torch.float32).contiguous()
    v_mean = None if vm is None else torch.nn.functional.pad(vm, (0, d_pad - dv))
    v_scale = None
    if precision.pv is PVPrecision.FP8:
        v = torch.empty(b, hkv, d_pad, lk_pad, dtype=torch.float8_e4m3fn, device=dev)
        v_scale = torch.empty(b, hkv, d_pad, dtype=torch.float32, device=dev)
        _call(lib, f"vopt_sage_quant_v_fp8_{sfx}", *_strided(value), d_pad,
              None if vm is None else vm.data_ptr(), v.data_ptr(), v_scale.data_ptr(), stream)
    else:  # FP16 PV: V (minus its mean) rounded to fp16, as the reference does, padded to [L_pad, D_pad].
        vf = value.float() - vm.unsqueeze(-2) if vm is not None else value
        v = torch.nn.functional.pad(vf.to(torch.float16), (0, d_pad - dv, 0, lk_pad - lk)).contiguous()

    delta_s = None
    if precision.smooth_q:
        delta_s = _delta_s(qm[..., :d], key, km, fold, lk_pad)
    return QuantizedInputs(q_codes, k_codes, q_scale, k_scale, v, v_scale, v_mean, km, qm, delta_s, bits, d_pad,
                           fold)


def _delta_s(qm: torch.Tensor, key: torch.Tensor, km: Optional[torch.Tensor], fold: float, lk_pad: int):
    """ΔS = qm·(K - km)ᵀ·fold, [B, Hq, nqb, L_pad(Lk)] fp32, without repeating K over a GQA group.

    fp32 GEMM; in float64 when torch is set to TF32 matmuls (TF32's 10-bit mantissa would be a visible error).
    """
    b, hq, nqb, d = qm.shape
    hkv, lk = key.shape[1], key.shape[2]
    work = torch.float64 if torch.backends.cuda.matmul.allow_tf32 else torch.float32
    ks = key.to(work)
    if km is not None:
        ks = ks - km.to(work).unsqueeze(-2)
    grouped = qm.to(work).reshape(b, hkv, (hq // hkv) * nqb, d)
    ds = (torch.matmul(grouped, ks.transpose(-1, -2)) * fold).to(torch.float32).reshape(b, hq, nqb, lk)
    return torch.nn.functional.pad(ds, (0, lk_pad - lk)).contiguous()


@dataclasses.dataclass
class PreparedCall:
    """Quantized operands, output buffers and kernel parameters of one attention call (see :func:`prepare`).

    ``launch()`` runs only the attention kernel (benchmarks time it alone); ``kernel`` is the one the library
    picked for this device (``"mma"`` or ``"wgmma"``).
    """

    inputs: QuantizedInputs
    params: cuda_library.SageAttnParams
    out: torch.Tensor
    lse_log2: Optional[torch.Tensor]
    kernel: str

    def launch(self) -> torch.Tensor:
        lib = cuda_library.load()
        with torch.cuda.device(self.out.device):
            _call(lib, "vopt_sage_attn_fwd", ctypes.byref(self.params), cuda_library.current_stream_handle(self.out))
        return self.out


def prepare(query, key, value, is_causal: bool, scale: Optional[float], precision: SagePrecision, *,
            kernel: str = "auto", return_lse: bool = False, out: Optional[torch.Tensor] = None) -> PreparedCall:
    """Quantize Q/K/V and set up the kernel parameters; nothing is attended yet (call ``launch()``).

    ``out`` (optional): a preallocated [B, Hq, Lq, Dv] tensor of ``query.dtype`` with unit stride along the last
    dimension (any other strides); only its elements are written.
    """
    b, hq, lq, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[-1]
    if out is None:
        out = torch.empty(b, hq, lq, dv, dtype=query.dtype, device=query.device)
    elif out.shape != (b, hq, lq, dv) or out.dtype != query.dtype or out.stride(-1) != 1 or out.device != query.device:
        raise ValueError(f"sage_cuda.prepare: out must be [{b}, {hq}, {lq}, {dv}] {query.dtype} on {query.device} "
                         f"with unit stride along the last dim, got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    with torch.cuda.device(query.device):
        bits = _effective_bits(precision, _compute_capability(query.device))
        qi = quantize(query, key, value, precision, scale, bits)
        lse2 = torch.empty(b, hq, lq, dtype=torch.float32, device=query.device) if return_lse else None
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        prm = _params(b, hq, hkv, lq, lk, qi.d_pad, dv, bits, precision, is_causal, query.dtype, kernel,
                      q=ptr(qi.q_codes), k=ptr(qi.k_codes), q_scale=ptr(qi.q_scale), k_scale=ptr(qi.k_scale),
                      delta_s=ptr(qi.delta_s), v=ptr(qi.v), v_scale=ptr(qi.v_scale), v_mean=ptr(qi.v_mean),
                      out=ptr(out), lse_log2=ptr(lse2))
        prm.out_stride_b, prm.out_stride_h, prm.out_stride_l = out.stride(0), out.stride(1), out.stride(2)
        chosen, why = _select(prm)
    if why:
        raise CudaLibraryError(f"vopt_sage_attn_select refused the call: {why}")
    return PreparedCall(qi, prm, out, lse2, chosen)


def sage_attention_cuda(query, key, value, is_causal: bool, scale: Optional[float], precision: SagePrecision,
                        return_lse: bool = False, kernel: str = "auto", out: Optional[torch.Tensor] = None):
    """Quantized attention on the CUDA kernels (the caller checked :func:`unsupported_reason`).

    ``is_causal`` is bottom-right aligned. Returns ``out`` [B, Hq, Lq, Dv] in ``query.dtype``, and with
    ``return_lse`` also the natural-log LSE [B, Hq, Lq] fp32 of the original scores ``q·kᵀ·scale``.
    ``kernel``: ``"auto"`` (the library's choice), ``"mma"`` or ``"wgmma"`` (tests and benchmarks).
    """
    call = prepare(query, key, value, is_causal, scale, precision, kernel=kernel, return_lse=return_lse, out=out)
    out = call.launch()
    if not return_lse:
        return out
    lse2 = call.lse_log2
    lse = lse2 * LN2
    km = call.inputs.km
    if km is not None:  # K smoothing shifted every score of row i by -q_i·km·scale (spec §1.1)
        b, hq, lq, d = query.shape
        hkv = key.shape[1]
        qf = query.float().reshape(b, hkv, (hq // hkv) * lq, d)
        corr = torch.matmul(qf, km.unsqueeze(-1)).squeeze(-1).reshape(b, hq, lq)
        sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        lse = torch.where(torch.isneginf(lse2), lse2, lse + corr * sm_scale)
    return out, lse

"""``vopt::sage_attention``: SageAttention2-style quantized attention behind vopt's dispatcher.

Signature (the SDPA one plus a precision preset)::

    vopt::sage_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None,
                         float dropout_p=0.0, bool is_causal=False, float? scale=None,
                         bool enable_gqa=False, str precision="int8_fp8_block") -> Tensor

**Semantics are those of** ``aten.scaled_dot_product_attention`` (the ``sageattention2``
graph pass swaps SDPA nodes for this op), computed with the quantized numerics that
``precision`` names (:data:`PRESETS`, spec shared/specs/attention.md §1):

* ``"int8_fp8"``: INT8 per-thread QK (K smoothing) + FP8 E4M3 PV with two-level accumulation
  (the SageAttention2 sm89/sm90 recipe);
* ``"int8_fp16"``: INT8 per-thread QK + FP16 PV (the sm80 recipe; more accurate, no FP8);
* ``"int4_fp8"``: INT4 per-thread QK with Q smoothing + FP8 PV (cheapest, least accurate;
  spec §1.5 says to use it only behind an accuracy guard);
* ``"int8_fp8_block"``: INT8 **per-block** QK (128 Q rows / 64 K rows per scale) + FP8 PV,
  two-level: the numerics the Triton kernel implements (the only preset it serves). The CUDA
  kernels serve all four quantized presets; where they refuse a call (a mask, fp32, head_dim > 128,
  an unsupported GPU), a per-thread preset falls back to the (slow) reference and the dispatcher
  logs why once;
* ``"exact"``: no quantization: runs ``vopt::attention``'s dispatcher (exact reference).

**Causal alignment.** ``is_causal`` is **top-left** aligned, as in PyTorch SDPA (query ``i``
sees keys ``j <= i``). :func:`~vopt.ops.sage_reference.sage_attention_reference` (and the
Triton kernel) align causal masks bottom-right (``j <= i + Lk - Lq``). The two agree when
``Lq == Lk``, so only then is ``is_causal`` forwarded; otherwise the op builds SDPA's
top-left boolean mask, combines it with ``attn_mask`` (bool: ``&``; additive: ``-inf`` where
causally hidden) and passes it as ``attn_mask`` with ``is_causal=False``. Backends therefore
never see a causal flag with ``Lq != Lk``.

Backends (:mod:`vopt.dispatch`, ``VOPT_BACKEND``), tried in this order: ``cuda`` (``libvopt_cuda.so``'s
hand-written kernels, :mod:`vopt.ops.sage_cuda`: wgmma + TMA on sm_90a, mma.sync on sm_80/sm_89; fp16/bf16,
head_dim <= 128, no ``attn_mask``, per-thread or per-block presets: ``int8_fp8``, ``int8_fp16``, ``int4_fp8`` and
``int8_fp8_block``), ``triton`` (CUDA only; bool and additive
``attn_mask`` run in the kernel; :mod:`vopt.kernels.sage_attention`, imported lazily; if it is missing or fails to import,
the backend reports why and dispatch falls back; serves ``int8_fp8_block``) and ``reference``
(:func:`~vopt.ops.sage_reference.sage_attention_reference`, slow, bit-faithful, any device).
Backends receive ``(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
precision)`` with the causal flag already normalized and ``precision`` a
:class:`~vopt.ops.sage_reference.SagePrecision`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from .. import cuda_library
from ..dispatch import kernel_op
from .attention import ATTENTION, _validate
from .sage_reference import Granularity, PVPrecision, QKPrecision, SagePrecision, sage_attention_reference

OP_NAME = "vopt::sage_attention"
SAGE_ATTENTION = kernel_op(OP_NAME)

#: Preset name -> numerics (``None`` = exact attention). Use :func:`preset` for a private copy.
PRESETS: dict = {
    "int8_fp8": SagePrecision(
        qk=QKPrecision.INT8, granularity=Granularity.PER_THREAD, pv=PVPrecision.FP8, two_level_accumulation=True
    ),
    "int8_fp16": SagePrecision(qk=QKPrecision.INT8, granularity=Granularity.PER_THREAD, pv=PVPrecision.FP16),
    "int4_fp8": SagePrecision(
        qk=QKPrecision.INT4,
        granularity=Granularity.PER_THREAD,
        smooth_q=True,
        pv=PVPrecision.FP8,
        two_level_accumulation=True,
    ),
    # Per-block INT8 QK (one scale per 128 Q rows / 64 K rows) + FP8 PV: the numerics of the Triton
    # kernel (vopt.kernels.sage_attention.TRITON_PRECISION), so the only preset it serves; the CUDA kernels serve it too.
    "int8_fp8_block": SagePrecision(
        qk=QKPrecision.INT8,
        granularity=Granularity.PER_BLOCK,
        smooth_q=False,
        pv=PVPrecision.FP8,
        two_level_accumulation=True,
        block_q=128,
        block_k=64,
    ),
    "exact": None,
}
#: Presets from cheapest (fastest kernel, largest error) to most expensive.
#: The default preset (op and pass): the one a fast kernel (Triton) runs today.
DEFAULT_PRESET = "int8_fp8_block"
COST_ORDER = ("int4_fp8", "int8_fp8_block", "int8_fp8", "int8_fp16", "exact")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_preset(name, *, what: str = "precision") -> str:
    """Return ``name`` if it is a preset, else raise ``ValueError`` naming ``what`` and listing :data:`PRESETS`."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"vopt::sage_attention: {what}={name!r} is not a preset; accepted: {', '.join(PRESETS)}")
    return name


def preset(name: str) -> Optional[SagePrecision]:
    """A fresh copy of preset ``name``'s :class:`SagePrecision` (``None`` for ``"exact"``)."""
    p = PRESETS[check_preset(name)]
    return None if p is None else dataclasses.replace(p)


def validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, precision) -> None:
    """Raise ``TypeError``/``ValueError`` naming the offending argument and what is accepted."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"vopt::sage_attention: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise TypeError(
                f"vopt::sage_attention: {name}.dtype is {t.dtype}; accepted: float16, bfloat16, float32, float64"
            )
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"vopt::sage_attention: query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    check_preset(precision)
    _validate(query, key, value, attn_mask, dropout_p, enable_gqa)


def top_left_causal_mask(attn_mask: Optional[torch.Tensor], lq: int, lk: int, device) -> torch.Tensor:
    """SDPA's top-left causal mask (query i sees keys j <= i) combined with ``attn_mask``.

    Bool ``attn_mask``: ``attn_mask & causal``. Additive ``attn_mask``: ``-inf`` where the causal
    mask hides a key, the mask's value elsewhere. ``None``: the boolean causal mask [Lq, Lk].
    The result broadcasts like ``attn_mask`` and [Lq, Lk] together. Inputs are not modified.
    """
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=device).tril()
    if attn_mask is None:
        return allowed
    if attn_mask.dtype == torch.bool:
        return attn_mask & allowed
    return torch.where(allowed, attn_mask, torch.full((), float("-inf"), dtype=attn_mask.dtype, device=device))


def normalize_causal(query, key, attn_mask, is_causal):
    """``(attn_mask, is_causal)`` with SDPA's top-left causal flag made safe for bottom-right backends.

    ``Lq == Lk``: unchanged (both alignments agree). Otherwise a causal call becomes
    ``(top_left_causal_mask(attn_mask, Lq, Lk), False)``.
    """
    lq, lk = query.shape[-2], key.shape[-2]
    if not is_causal or lq == lk:
        return attn_mask, is_causal
    return top_left_causal_mask(attn_mask, lq, lk, query.device), False


# ---- backends ----------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _triton_module():
    """``(module, None)`` or ``(None, reason)``: the Triton kernels, imported once, never raising."""
    try:
        from vopt.kernels import sage_attention as kernels
    except Exception as exc:  # ImportError, or anything the module raises while importing
        return None, f"vopt.kernels.sage_attention is not importable ({type(exc).__name__}: {exc})"
    missing = [n for n in ("sage_attention_triton", "unsupported_reason") if not hasattr(kernels, n)]
    if missing:
        return None, f"vopt.kernels.sage_attention lacks {', '.join(missing)}"
    return kernels, None


def _triton_available() -> Optional[str]:
    return _triton_module()[1]


def _triton_check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, precision) -> Optional[str]:
    if query.device.type != "cuda":
        return "needs a CUDA device"
    kernels, why = _triton_module()
    if why:
        return why
    return kernels.unsupported_reason(query, key, value, attn_mask, precision)


def _cuda_check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, precision) -> Optional[str]:
    from . import sage_cuda

    return sage_cuda.unsupported_reason(query, key, value, attn_mask, is_causal, precision)


@SAGE_ATTENTION.register(
    "cuda",
    devices={"cuda"},
    dtypes=(torch.float16, torch.bfloat16),
    available=cuda_library.unavailable_reason,
    check=_cuda_check,
)
def sage_attention_cuda(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, precision):
    """``libvopt_cuda.so``'s SageAttention2 kernels (:mod:`vopt.ops.sage_cuda`)."""
    from . import sage_cuda

    return sage_cuda.sage_attention_cuda(query, key, value, is_causal, scale, precision)


@SAGE_ATTENTION.register(
    "triton",
    devices={"cuda"},
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    available=_triton_available,
    check=_triton_check,
)
def sage_attention_triton(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, precision):
    """The Triton kernel (:mod:`vopt.kernels.sage_attention`); bool and additive masks run in the kernel."""
    kernels, _ = _triton_module()
    return kernels.sage_attention_triton(
        query, key, value, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, precision=precision,
        return_lse=False, attn_mask=attn_mask,
    )


@SAGE_ATTENTION.register("reference", devices={"cpu", "cuda"}, dtypes=DTYPES)
def sage_attention_reference_backend(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, precision):
    """The bit-faithful torch reference (:func:`~vopt.ops.sage_reference.sage_attention_reference`)."""
    return sage_attention_reference(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, precision=precision
    )


def neutralize_hidden_keys(query, key, value, attn_mask):
    """``(key, value)`` with every key that no query can see replaced by the mean of the visible keys.

    Hidden keys (padding, or keys past the causal horizon) get zero attention, so their contents never reach the
    output of exact attention -- but quantized attention would still fold them into its statistics (the K smoothing
    mean, the per-block K scales, the per-channel V scales), so changing a padded token would change the answers of
    the others. Replacing them with the visible keys' mean leaves every statistic as if they were absent (their
    smoothed K rows are 0, their V rows are within the V range), whatever they held. New tensors are returned;
    the inputs are untouched (and returned as is when nothing is hidden or the inputs are not ``[B, H, L, D]``).
    """
    if attn_mask is None or query.dim() != 4 or key.dim() != 4:
        return key, value
    b, hq, lq, _ = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    visible = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
    seen = visible.expand(b, hq, lq, lk).any(dim=2).view(b, hkv, hq // hkv, lk).any(dim=2)  # [B, Hkv, Lk]
    if bool(seen.all()):
        return key, value
    w = seen.unsqueeze(-1).to(torch.float32)
    count = w.sum(dim=2, keepdim=True).clamp_min(1.0)

    def fill(t):
        mean = ((t.float() * w).sum(dim=2, keepdim=True) / count).to(t.dtype)
        return torch.where(seen.unsqueeze(-1), t, mean)

    return fill(key), fill(value)


def run(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
        precision: str = DEFAULT_PRESET) -> torch.Tensor:
    """The op's eager body (also used by calibration): validate, normalize causal, neutralize hidden keys, dispatch."""
    validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, precision)
    if PRESETS[precision] is None:
        return ATTENTION(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa).contiguous()
    attn_mask, is_causal = normalize_causal(query, key, attn_mask, is_causal)
    key, value = neutralize_hidden_keys(query, key, value, attn_mask)
    out = SAGE_ATTENTION(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, preset(precision))
    return out.contiguous()


def sageattn(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
             precision: str = DEFAULT_PRESET, return_lse: bool = False):
    """Quantized attention called directly (not through a graph), with FlashAttention's conventions.

    Differences from the op: ``is_causal`` is **bottom-right** aligned (query ``i`` of ``Lq`` sees keys
    ``j <= i + Lk - Lq``: prefill against a KV cache, chunked prefill, decode), and ``return_lse=True``
    also returns the softmax log-sum-exp (natural log, ``[B, Hq, Lq]`` float32, of the unsmoothed scores;
    ``-inf`` for fully masked rows). Same backends and selection as the op (``VOPT_BACKEND`` honoured;
    fallbacks logged once). ``precision="exact"`` is refused: use ``torch.nn.functional.scaled_dot_product_attention``.
    Inputs are never modified.
    """
    validate(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa, precision)
    if PRESETS[precision] is None:
        raise ValueError("vopt.ops.sage_attention.sageattn: precision='exact' is not a quantized preset; "
                         f"accepted: {', '.join(n for n, p in PRESETS.items() if p is not None)}")
    p = preset(precision)
    key, value = neutralize_hidden_keys(query, key, value, attn_mask)
    impl = SAGE_ATTENTION.select(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa, p)
    if impl.fn is sage_attention_cuda:
        from . import sage_cuda

        return sage_cuda.sage_attention_cuda(query, key, value, is_causal, scale, p, return_lse=return_lse)
    if impl.fn is sage_attention_triton:
        kernels, _ = _triton_module()
        return kernels.sage_attention_triton(query, key, value, is_causal=is_causal, scale=scale,
                                             enable_gqa=enable_gqa, precision=p, return_lse=return_lse,
                                             attn_mask=attn_mask)
    return sage_attention_reference(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa, precision=p,
                                    return_lse=return_lse)


# ---- the torch.library op ------------------------------------------------------


@torch.library.custom_op(OP_NAME, mutates_args=())
def sage_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    precision: str = "int8_fp8_block",
) -> torch.Tensor:
    """SDPA semantics with SageAttention2 numerics ``precision`` (see the module docstring)."""
    return run(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, precision)


@sage_attention.register_fake
def _sage_attention_fake(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False, precision=DEFAULT_PRESET):
    validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, precision)
    return query.new_empty((*query.shape[:-1], value.shape[-1]))

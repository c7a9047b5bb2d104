"""``vopt::grouped_gemm(Tensor x, Tensor w, Tensor offsets, Tensor? bias) -> Tensor``: one GEMM per expert segment.

The primitive of sorted-by-expert mixture-of-experts dispatch (:mod:`vopt.moe`). The rows of ``x [M, K]`` are
sorted by expert: expert ``e`` owns rows ``offsets[e]:offsets[e + 1]``, and

    out[offsets[e]:offsets[e + 1]] = x[offsets[e]:offsets[e + 1]] @ w[e] (+ bias[e])

with ``w [E, K, N]`` and ``bias [E, N]`` (optional). Rows outside ``offsets[0]:offsets[E]`` (tokens a capacity
limit dropped, sorted to the end) are zeros. An expert with no rows (``offsets[e] == offsets[e + 1]``) costs
nothing. The output shape ``[M, N]`` depends only on the input shapes, so graphs holding the op export with static
shapes; the data-dependent split lives inside the opaque op.

Inputs: ``x`` and ``w`` (and ``bias``) of one dtype (fp32, fp16 or bf16) and device; ``offsets`` int32/int64 of
``E + 1`` non-decreasing entries in ``[0, M]`` on the same device. Every backend accumulates in fp32 and rounds
once to the dtype.

Backends (:mod:`vopt.dispatch`): ``cuda`` (``libvopt_cuda.so``, CUTLASS grouped GEMM, fp16/bf16, K and N
multiples of 8; ``cuda/moe_grouped_gemm.cu``), ``triton`` (:mod:`vopt.kernels.grouped_gemm`: one launch over all
experts; on CPU only under ``TRITON_INTERPRET=1``), ``reference`` (torch: one fp32 matmul per non-empty expert
segment inside the op, exact up to fp32 summation order). The offsets are checked (non-decreasing, within
``[0, M]``) by the reference, which reads them on the host anyway; the GPU backends never synchronize with the
host and clamp the offsets so that malformed ones cannot address memory out of bounds.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from .. import cuda_library
from ..dispatch import kernel_op, triton_device_reason, triton_unavailable

OP_NAME = "vopt::grouped_gemm"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = "float32, float16, bfloat16"
OFFSET_DTYPES = (torch.int32, torch.int64)
_CUDA_SYMBOLS = {torch.float16: "vopt_moe_grouped_gemm_f16", torch.bfloat16: "vopt_moe_grouped_gemm_bf16"}
CUDA_ALIGN = 8  # CUTLASS tensor-core tiles read 16-byte vectors of 16-bit elements

GROUPED_GEMM = kernel_op(OP_NAME)


def validate(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
    """Shape / dtype / device checks (no data reads); raise ``TypeError``/``ValueError`` naming the argument."""
    for name, t in (("x", x), ("w", w), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"vopt::grouped_gemm: {name} must be a Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"vopt::grouped_gemm: bias must be a Tensor or None, got {type(bias).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"vopt::grouped_gemm: x.dtype is {x.dtype}; accepted: {_DTYPE_NAMES}")
    if w.dtype != x.dtype:
        raise TypeError(f"vopt::grouped_gemm: w.dtype {w.dtype} differs from x.dtype {x.dtype}; they must match")
    if offsets.dtype not in OFFSET_DTYPES:
        raise TypeError(f"vopt::grouped_gemm: offsets.dtype is {offsets.dtype}; accepted: int32, int64")
    if x.dim() != 2:
        raise ValueError(f"vopt::grouped_gemm: x must be [M, K], got shape {tuple(x.shape)}")
    if w.dim() != 3:
        raise ValueError(f"vopt::grouped_gemm: w must be [E, K, N], got shape {tuple(w.shape)}")
    e, k, n = w.shape
    if e < 1:
        raise ValueError("vopt::grouped_gemm: w must hold at least one expert (E >= 1), got E = 0")
    if x.shape[1] != k:
        raise ValueError(f"vopt::grouped_gemm: x is [M, {x.shape[1]}] but w is [E, {k}, N]; K must match")
    if offsets.dim() != 1 or offsets.shape[0] != e + 1:
        raise ValueError(f"vopt::grouped_gemm: offsets must be [E + 1] = [{e + 1}], got shape {tuple(offsets.shape)}")
    if bias is not None:
        if bias.dtype != x.dtype:
            raise TypeError(f"vopt::grouped_gemm: bias.dtype {bias.dtype} differs from x.dtype {x.dtype}; "
                            "they must match")
        if tuple(bias.shape) != (e, n):
            raise ValueError(f"vopt::grouped_gemm: bias must be [E, N] = [{e}, {n}], got shape {tuple(bias.shape)}")
    for name, t in (("w", w), ("offsets", offsets), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"vopt::grouped_gemm: {name} is on {t.device} but x is on {x.device}; they must be on "
                             "the same device")


def check_offsets(offsets: torch.Tensor, m: int) -> list:
    """``offsets`` as a host list after checking it is non-decreasing within ``[0, m]`` (``ValueError`` otherwise)."""
    offs = [int(v) for v in offsets.tolist()]
    if offs and (offs[0] < 0 or offs[-1] > m or any(b < a for a, b in zip(offs, offs[1:]))):
        raise ValueError(f"vopt::grouped_gemm: offsets must be non-decreasing within [0, M={m}], got {offs}")
    return offs


def reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact torch reference: fp32 matmul per non-empty expert segment, zeros elsewhere, cast to ``x.dtype``."""
    m, n = x.shape[0], w.shape[2]
    offs = check_offsets(offsets, m)
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    for e in range(w.shape[0]):
        lo, hi = offs[e], offs[e + 1]
        if hi == lo:
            continue
        seg = x[lo:hi].float() @ w[e].float()
        if bias is not None:
            seg = seg + bias[e].float()
        out[lo:hi] = seg
    return out.to(x.dtype)


def offsets_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """``[E] -> [E + 1]`` int64 offsets (a leading 0, then the running sum); traceable, no host sync."""
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int64)


# ---- backends ----------------------------------------------------------------


def _cuda_check(x, w, offsets, bias=None) -> Optional[str]:
    k, n = w.shape[1], w.shape[2]
    if k % CUDA_ALIGN or n % CUDA_ALIGN:
        return f"CUTLASS tiles need K and N multiples of {CUDA_ALIGN} (got K={k}, N={n})"
    tensors = [t for t in (x, w, bias) if t is not None]
    if not all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors):
        return "needs contiguous, 16-byte aligned x, w and bias"
    return cuda_library.device_reason(x.device)


@GROUPED_GEMM.register("cuda", devices={"cuda"}, dtypes=(torch.float16, torch.bfloat16),
                       available=cuda_library.unavailable_reason, check=_cuda_check)
def grouped_gemm_cuda(x, w, offsets, bias=None) -> torch.Tensor:
    """``libvopt_cuda.so``'s CUTLASS grouped GEMM on torch's current stream (no host synchronization)."""
    lib = cuda_library.load()
    m, k = x.shape
    e, _, n = w.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    offs = offsets.to(torch.int64).contiguous()
    nbytes = ctypes.c_int64(0)
    lib.check(lib.call("vopt_moe_grouped_gemm_workspace_bytes", e, ctypes.byref(nbytes)),
              "vopt_moe_grouped_gemm_workspace_bytes")
    workspace = torch.empty(nbytes.value, dtype=torch.uint8, device=x.device)
    symbol = _CUDA_SYMBOLS[x.dtype]
    with torch.cuda.device(x.device):
        stream = cuda_library.current_stream_handle(x)
        status = lib.call(symbol, x.data_ptr(), w.data_ptr(), None if bias is None else bias.data_ptr(),
                          offs.data_ptr(), out.data_ptr(), m, n, k, e, workspace.data_ptr(), nbytes.value, stream)
    lib.check(status, symbol)
    return out



def _triton_check(x, w, offsets, bias=None) -> Optional[str]:
    why = triton_device_reason(x.device, "vopt.kernels.grouped_gemm")
    if why or x.device.type != "cpu":
        return why
    if x.dtype == torch.bfloat16:
        return "bf16 tl.dot is broken in the Triton interpreter (specs/environment.md)"
    return None


@GROUPED_GEMM.register("triton", devices={"cuda", "cpu"}, dtypes=DTYPES, available=triton_unavailable,
                       check=_triton_check)
def grouped_gemm_triton(x, w, offsets, bias=None) -> torch.Tensor:
    """The Triton kernel (:mod:`vopt.kernels.grouped_gemm`): one launch over every expert's tiles."""
    from vopt.kernels import grouped_gemm as kernels

    return kernels.grouped_gemm(x, w, offsets, bias)


@GROUPED_GEMM.register("reference", devices={"cpu", "cuda"}, dtypes=DTYPES)
def grouped_gemm_reference(x, w, offsets, bias=None) -> torch.Tensor:
    """The torch reference as a backend."""
    return reference(x, w, offsets, bias)


# ---- the torch.library op ------------------------------------------------------


@torch.library.custom_op(OP_NAME, mutates_args=())
def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-expert-segment ``x @ w[e] (+ bias[e])`` through the backend chosen by :data:`GROUPED_GEMM`."""
    validate(x, w, offsets, bias)
    return GROUPED_GEMM(x, w, offsets, bias)


@grouped_gemm.register_fake
def _grouped_gemm_fake(x, w, offsets, bias=None):
    validate(x, w, offsets, bias)
    return x.new_empty(x.shape[0], w.shape[2])

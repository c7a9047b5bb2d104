"""``vopt::vq_argmin(x, codebook, form="mm", fallback="batch") -> (codes, min_dist)``: nearest-code search.

``x [N, D]`` and ``codebook [K, D]`` (same dtype: fp32, fp16 or bf16; same device; ``K >= 1``). Returns
``codes`` (int64 ``[N]``) and ``min_dist`` (fp32 ``[N]``, the squared Euclidean distance of the chosen code).

**The reference** (what "exact" means). ``form`` names the torch expression whose codes the op reproduces;
each is evaluated in fp32 (fp16/bf16 inputs are upcast first, so half inputs get fp32 accumulation), on the
whole ``[N, K]``, exactly as written here, and ``argmin(-1)`` picks the **first** index on ties:

* ``"mm"`` (the zoo's E-ViLM ``VectorQuantizer``): ``(x*x).sum(-1, keepdim=True) - 2.0 * (x @ c.t()) + (c*c).sum(-1)``;
* ``"diff"``: ``((x[:, None] - c[None]) ** 2).sum(-1)``;
* ``"cdist"``: ``torch.cdist(x, c)`` (p=2, default ``compute_mode``).

Codes are therefore bit-identical to a model that runs that expression on the same device (same BLAS).

**The fast path** (Triton / CUDA backends). A fused kernel streams the codebook (or one contiguous range of
it per program when the rows alone give too few programs; :func:`merge_splits` combines the ranges) past
blocks of rows, computes the scores ``s_k = ||c_k||^2 - 2 x.c_k`` blockwise in fp32 and keeps, per row, the best score, its
first index and the second-best score; the ``[N, K]`` matrix never exists. A row's code is *certified*
when ``second - best > margin``, where ``margin = 4 E`` and

    E = (D + 4) * 2^-23 * (||x|| + max_k ||c_k||)^2 * 1.01

bounds the error of *any* fp32 evaluation of a squared distance (any summation order, FMA or not,
tensor-core accumulation; twice the worst-case ``gamma_D`` bound) for both the kernel and the reference
expression; ``cdist`` adds ``2^-20 * |distance|`` because its ``sqrt`` can merge two distances into a tie.
If both the kernel and the reference are within ``E`` of the exact distance, a gap above ``4E`` means
the reference's argmin is the kernel's. Ties (duplicate codes), NaN/inf anywhere (``E`` or the gap becomes
NaN/inf) and near-ties are never certified. Uncertified rows are resolved by ``fallback``:

* ``"batch"`` (default): the reference expression on the **whole** input (it materializes ``[N, K]`` for
  that call only), so codes are always identical to the reference. Why not just the uncertified rows: on
  CPU (torch 2.13's BLAS) ``x[rows] @ c.t()`` rounds differently from the same rows of ``x @ c.t()`` (the GEMM
  picks different kernels for different row counts: measured on 1..523-row subsets of 40..2000-row inputs,
  0.8-10% of the entries differ in the last bits), and a row is uncertified exactly when such
  rounding may decide its code. cuBLAS also picks kernels by shape. The kernel accumulation model behind
  ``E`` (fp32 FMA; fp16/bf16 tensor cores with exact products and fp32 accumulation, truncating at worst)
  is checked against fp64 in the tests on CPU (interpreter) and, by the GPU tests, on hardware.
* ``"rows"``: the reference expression on the uncertified rows only (never ``[N, K]``). Codes equal the
  reference's except possibly on rows whose two best codes are within the rounding bound, where the
  reference's own result depends on how many rows its GEMM was given.

``min_dist`` is the reference's value on rows taken from the reference, else the kernel's
``||x||^2 + best``: within ``2E`` of the exact squared distance (not bitwise reproducible across backends).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .. import cuda_library
from ..dispatch import kernel_op, triton_device_reason, triton_unavailable

log = logging.getLogger(__name__)

OP_NAME = "vopt::vq_argmin"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = "float32, float16, bfloat16"
FORMS = ("mm", "diff", "cdist")
FALLBACKS = ("batch", "rows")
_CUDA_SYMBOLS = {torch.float32: "vopt_vq_argmin_f32", torch.float16: "vopt_vq_argmin_f16",
                 torch.bfloat16: "vopt_vq_argmin_bf16"}
#: 2 x the fp32 unit roundoff: covers round-to-nearest summation and tensor-core accumulation that truncates.
UNIT = 2.0 ** -23

VQ_ARGMIN = kernel_op(OP_NAME)


def validate(x: torch.Tensor, codebook: torch.Tensor, form: str = "mm", fallback: str = "batch") -> None:
    """Raise ``TypeError``/``ValueError`` naming the offending argument."""
    for name, t in (("x", x), ("codebook", codebook)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"vopt::vq_argmin: {name} must be a Tensor, got {type(t).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"vopt::vq_argmin: x.dtype is {x.dtype}; accepted: {_DTYPE_NAMES}")
    if codebook.dtype != x.dtype:
        raise TypeError(f"vopt::vq_argmin: codebook.dtype {codebook.dtype} differs from x.dtype {x.dtype}; they must match")
    if x.dim() != 2:
        raise ValueError(f"vopt::vq_argmin: x must be 2-D [N, D], got shape {tuple(x.shape)}")
    if codebook.dim() != 2:
        raise ValueError(f"vopt::vq_argmin: codebook must be 2-D [K, D], got shape {tuple(codebook.shape)}")
    if codebook.shape[1] != x.shape[1]:
        raise ValueError(f"vopt::vq_argmin: codebook is [K, {codebook.shape[1]}] but x is [N, {x.shape[1]}]; D must match")
    if codebook.shape[0] < 1:
        raise ValueError("vopt::vq_argmin: codebook has no codes (K = 0); argmin needs K >= 1")
    if codebook.device != x.device:
        raise ValueError(f"vopt::vq_argmin: codebook is on {codebook.device} but x is on {x.device}; they must be on the same device")
    if form not in FORMS:
        raise ValueError(f"vopt::vq_argmin: form={form!r} is invalid; accepted: {list(FORMS)}")
    if fallback not in FALLBACKS:
        raise ValueError(f"vopt::vq_argmin: fallback={fallback!r} is invalid; accepted: {list(FALLBACKS)}")


# ---- the reference -----------------------------------------------------------------------


def distances(x: torch.Tensor, codebook: torch.Tensor, form: str = "mm", *, total_rows: Optional[int] = None) -> torch.Tensor:
    """The reference distances ``[N, K]`` in fp32 (squared for ``mm``/``diff``, plain for ``cdist``).

    ``total_rows``: the row count of the call a subset of rows comes from (``cdist`` picks its algorithm by
    the number of rows, so a subset must use the mode the whole call used).
    """
    x, c = x.float(), codebook.float()
    if form == "mm":
        return (x * x).sum(-1, keepdim=True) - 2.0 * (x @ c.t()) + (c * c).sum(-1)
    if form == "diff":
        return ((x[:, None] - c[None]) ** 2).sum(-1)
    if form == "cdist":
        if total_rows is None:
            return torch.cdist(x, c)
        # torch.cdist's default mode uses the GEMM expansion when either side has more than 25 rows.
        mode = "use_mm_for_euclid_dist" if (total_rows > 25 or c.shape[0] > 25) else "donot_use_mm_for_euclid_dist"
        return torch.cdist(x, c, compute_mode=mode)
    raise ValueError(f"vopt::vq_argmin: form={form!r} is invalid; accepted: {list(FORMS)}")


def _squared(dist: torch.Tensor, form: str) -> torch.Tensor:
    return dist * dist if form == "cdist" else dist


def reference(x: torch.Tensor, codebook: torch.Tensor, form: str = "mm", *, total_rows: Optional[int] = None) -> tuple:
    """Exact reference: ``(codes int64 [N], min_dist fp32 [N])`` from :func:`distances` and ``argmin(-1)``."""
    d = distances(x, codebook, form, total_rows=total_rows)
    codes = d.argmin(dim=-1)
    return codes, _squared(d.gather(1, codes[:, None]).squeeze(1), form).contiguous()


# ---- certification (shared by the fused backends) ---------------------------------------


def error_bound(x: torch.Tensor, codebook: torch.Tensor) -> tuple:
    """``(E [N], ||x||^2 [N])``: per-row bound on the error of any fp32 evaluation of a squared distance."""
    xn = _norms(x)                                   # fused reductions: no [N, D] / [K, D] temporaries
    cmax = _norms(codebook).max()                    # NaN / inf in the codebook -> NaN / inf bound
    e = (x.shape[1] + 4) * UNIT * (xn + cmax) ** 2 * 1.01
    return e, xn * xn


def certified(x: torch.Tensor, codebook: torch.Tensor, best: torch.Tensor, second: torch.Tensor, form: str) -> tuple:
    """``(ok [N] bool, min_dist [N])``: which rows' kernel argmin provably equals the reference's."""
    e, xx = error_bound(x, codebook)
    margin = 4.0 * e
    if form == "cdist":
        margin = margin + 2.0 ** -20 * ((xx + best).abs() + 4.0 * e)
    # False for NaN; and no certificate near fp32 overflow (the reference's intermediates reach (||x|| + ||c||)^2).
    ok = ((second - best) > margin) & torch.isfinite(margin * 2.0 ** 23)
    return ok, xx + best


def finish(x: torch.Tensor, codebook: torch.Tensor, best: torch.Tensor, idx: torch.Tensor, second: torch.Tensor,
           form: str, fallback: str) -> tuple:
    """Codes and distances from a fused kernel's ``(best, idx, second)``, uncertified rows per ``fallback``."""
    ok, min_dist = certified(x, codebook, best, second, form)
    codes = idx.to(torch.int64)
    if bool(ok.all()):
        return codes, min_dist
    rows = (~ok).nonzero().squeeze(1)
    log.debug("vopt::vq_argmin: %d of %d rows not certified (near-ties, ties or non-finite values); fallback=%s",
              rows.numel(), x.shape[0], fallback)
    if fallback == "batch":
        return reference(x, codebook, form)
    sub_codes, sub_dist = reference(x[rows], codebook, form, total_rows=x.shape[0])
    codes[rows] = sub_codes
    min_dist[rows] = sub_dist
    return codes, min_dist


def plan_splits(x: torch.Tensor, k: int, rows_per_block: int = 64, codes_per_block: int = 64) -> int:
    """How many code ranges to split the search into so that ``row blocks x splits`` fills the GPU (~2 waves).

    One split on CPU. E-ViLM's 1568 tokens are only 25 row blocks of 64: without splits most SMs would idle.
    """
    if x.device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    row_blocks = max(1, -(-x.shape[0] // rows_per_block))
    want = -(-2 * sms // row_blocks)
    return max(1, min(want, -(-k // codes_per_block), 65535))


def merge_splits(best: torch.Tensor, idx: torch.Tensor, second: torch.Tensor) -> tuple:
    """Combine per-split ``[S, N]`` results (splits in code order) into ``[N]`` ones, first index on ties."""
    if best.shape[0] == 1:
        return best[0], idx[0], second[0]
    win = best.argmin(dim=0, keepdim=True)          # first split among equal bests = the smallest code index
    top2 = best.topk(2, dim=0, largest=False).values  # the runner-up split's best may equal the winner's (a tie)
    own_second = second.gather(0, win)[0]
    return best.gather(0, win)[0], idx.gather(0, win)[0], torch.minimum(own_second, top2[1])


def _empty(x: torch.Tensor) -> tuple:
    return (torch.empty(0, dtype=torch.int64, device=x.device), torch.empty(0, dtype=torch.float32, device=x.device))


def _norms(t: torch.Tensor) -> torch.Tensor:
    """fp32 row norms (one fused reduction; within a few ulps of ``sqrt((t*t).sum(-1))``, inside the bound's slack)."""
    return torch.linalg.vector_norm(t, dim=-1, dtype=torch.float32)


def _code_sq_norms(codebook: torch.Tensor) -> torch.Tensor:
    n = _norms(codebook)
    return (n * n).contiguous()


# ---- backends ---------------------------------------------------------------------------------


def _cuda_check(x, codebook, form="mm", fallback="batch") -> Optional[str]:
    if codebook.shape[0] >= 2 ** 31:
        return f"K={codebook.shape[0]} codes exceed the kernel's int32 indices"
    return cuda_library.device_reason(x.device)


def cuda_scores(x: torch.Tensor, codebook: torch.Tensor, splits: Optional[int] = None) -> tuple:
    """``(best fp32, idx int32, second fp32)`` (``[N]`` each, splits merged) from ``libvopt_cuda.so``'s kernel."""
    n, d = x.shape
    k = codebook.shape[0]
    splits = plan_splits(x, k) if splits is None else splits
    per_split = -(-(-(-k // splits)) // 64) * 64          # codes per split: a multiple of the kernel's 64-code tile
    num_splits = -(-k // per_split)
    best = torch.empty(num_splits, n, dtype=torch.float32, device=x.device)
    second = torch.empty_like(best)
    idx = torch.empty(num_splits, n, dtype=torch.int32, device=x.device)
    if n == 0:
        return best[0], idx[0], second[0]
    xc, cc = x.contiguous(), codebook.contiguous()
    norms = _code_sq_norms(codebook)
    lib = cuda_library.load()
    symbol = _CUDA_SYMBOLS[x.dtype]
    with torch.cuda.device(x.device):
        stream = cuda_library.current_stream_handle(x)
        status = lib.call(symbol, xc.data_ptr(), cc.data_ptr(), norms.data_ptr(), best.data_ptr(), idx.data_ptr(),
                          second.data_ptr(), n, k, d, per_split, stream)
    lib.check(status, symbol)
    return merge_splits(best, idx, second)


@VQ_ARGMIN.register("cuda", devices={"cuda"}, dtypes=DTYPES, available=cuda_library.unavailable_reason, check=_cuda_check)
def vq_argmin_cuda(x: torch.Tensor, codebook: torch.Tensor, form: str = "mm", fallback: str = "batch") -> tuple:
    """The CUDA library's fused kernel (:func:`cuda_scores`), then :func:`finish`."""
    if x.shape[0] == 0:
        return _empty(x)
    best, idx, second = cuda_scores(x, codebook)
    return finish(x, codebook, best, idx, second, form, fallback)



def _triton_check(x, codebook, form="mm", fallback="batch") -> Optional[str]:
    if codebook.shape[0] >= 2 ** 31:
        return f"K={codebook.shape[0]} codes exceed the kernel's int32 indices"
    return triton_device_reason(x.device, "vopt.kernels.vq_argmin")


@VQ_ARGMIN.register("triton", devices={"cuda", "cpu"}, dtypes=DTYPES, available=triton_unavailable, check=_triton_check)
def vq_argmin_triton(x: torch.Tensor, codebook: torch.Tensor, form: str = "mm", fallback: str = "batch") -> tuple:
    """The Triton kernel (:mod:`vopt.kernels.vq_argmin`), then :func:`finish`."""
    from vopt.kernels import vq_argmin as kernels

    if x.shape[0] == 0:
        return _empty(x)
    best, idx, second = merge_splits(*kernels.vq_scores(x, codebook, _code_sq_norms(codebook),
                                                         splits=plan_splits(x, codebook.shape[0])))
    return finish(x, codebook, best, idx, second, form, fallback)


@VQ_ARGMIN.register("reference", devices={"cpu", "cuda"}, dtypes=DTYPES)
def vq_argmin_reference(x: torch.Tensor, codebook: torch.Tensor, form: str = "mm", fallback: str = "batch") -> tuple:
    """The torch reference as a backend (materializes ``[N, K]``)."""
    if x.shape[0] == 0:
        return _empty(x)
    return reference(x, codebook, form)


# ---- the torch.library op ------------------------------------------------------------------


@torch.library.custom_op(OP_NAME, mutates_args=())
def vq_argmin(x: torch.Tensor, codebook: torch.Tensor, form: str = "mm", fallback: str = "batch") -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of every row of ``x`` through the backend chosen by :data:`VQ_ARGMIN` (``VOPT_BACKEND``)."""
    validate(x, codebook, form, fallback)
    return VQ_ARGMIN(x, codebook, form, fallback)


@vq_argmin.register_fake
def _vq_argmin_fake(x, codebook, form="mm", fallback="batch"):
    validate(x, codebook, form, fallback)
    n = x.shape[0]
    return x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=torch.float32)

"""ctypes loader of ``libvopt_cuda.so``, vopt's standalone CUDA library.

The library (``cuda/``, built by ``tools/build_cuda.sh``) is independent of
torch: its ``extern "C"`` launchers take raw device pointers, sizes and the CUDA
stream handle as integers and return a ``cudaError_t`` status. This module finds
it, loads it once per process on first use (never when vopt is imported),
declares every symbol's C signature, and turns statuses into
:class:`~vopt.errors.CudaLibraryError`.

Search order: the ``VOPT_CUDA_LIB`` environment variable (a file path), then
``vopt/_lib/libvopt_cuda.so`` next to this package.
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Optional

from .errors import CudaLibraryError

ENV_VAR = "VOPT_CUDA_LIB"
LIBRARY_NAME = "libvopt_cuda.so"
# Must equal VOPT_CUDA_ABI_VERSION in cuda/vopt_cuda.h.
ABI_VERSION = 3

_VOIDP = ctypes.c_void_p
_INT_P = ctypes.POINTER(ctypes.c_int)
_AXPY_ARGS = (_VOIDP, _VOIDP, _VOIDP, ctypes.c_float, ctypes.c_int64, _VOIDP)
_VQ_ARGS = (_VOIDP,) * 6 + (ctypes.c_int64,) * 4 + (_VOIDP,)
_I64 = ctypes.c_int64
_MOE_GG_ARGS = (_VOIDP, _VOIDP, _VOIDP, _VOIDP, _VOIDP, _I64, _I64, _I64, _I64, _VOIDP, _I64, _VOIDP)
_I32 = ctypes.c_int32
# sage_quant.cu (x, sb, sh, sl, batch, heads, len, dim, ...): see cuda/vopt_cuda.h.
_SAGE_MEAN_ARGS = (_VOIDP,) + (_I64,) * 7 + (_VOIDP, _VOIDP)
_SAGE_Q_ARGS = (_VOIDP,) + (_I64,) * 8 + (_I32, _I32, _I32, ctypes.c_float) + (_VOIDP,) * 4
_SAGE_K_ARGS = (_VOIDP,) + (_I64,) * 8 + (_I32, _I32) + (_VOIDP,) * 4
_SAGE_V_ARGS = (_VOIDP,) + (_I64,) * 8 + (_VOIDP,) * 4


class SageAttnParams(ctypes.Structure):
    """``vopt_sage_attn_params`` of cuda/vopt_cuda.h, field for field (checked against the C layout in tests)."""

    _fields_ = [
        ("q", _VOIDP), ("k", _VOIDP), ("q_scale", _VOIDP), ("k_scale", _VOIDP), ("delta_s", _VOIDP),
        ("v", _VOIDP), ("v_scale", _VOIDP), ("v_mean", _VOIDP), ("out", _VOIDP), ("lse_log2", _VOIDP),
        ("out_stride_b", _I64), ("out_stride_h", _I64), ("out_stride_l", _I64),
        ("batch", _I64), ("heads_q", _I64), ("heads_kv", _I64), ("len_q", _I64), ("len_k", _I64),
        ("head_dim", _I64), ("out_dim", _I64),
        ("qk_bits", _I32), ("granularity", _I32), ("pv", _I32), ("two_level", _I32), ("causal", _I32),
        ("out_dtype", _I32), ("kernel", _I32), ("reserved", _I32),
    ]


_SAGE_PARAMS_P = ctypes.POINTER(SageAttnParams)


class BlockSparseAttnParams(ctypes.Structure):
    """``vopt_block_sparse_attn_params`` of cuda/vopt_cuda.h, field for field (checked against the C layout in tests)."""

    _fields_ = [
        ("q", _VOIDP), ("k", _VOIDP), ("v", _VOIDP), ("out", _VOIDP),
        ("tiles", _VOIDP), ("block_mask", _VOIDP), ("dense_mask", _VOIDP),
        *((name, _I64) for name in ("q_sb", "q_sh", "q_sl", "k_sb", "k_sh", "k_sl", "v_sb", "v_sh", "v_sl",
                                    "o_sb", "o_sh", "o_sl", "dm_sb", "dm_sh", "dm_sq", "dm_sk", "batch", "heads",
                                    "len_q", "len_k", "head_dim", "value_dim", "block_q", "block_k")),
        ("scale", ctypes.c_float), ("dtype", _I32),
    ]

class VidKVDecodeParams(ctypes.Structure):
    """``vopt_vidkv_decode_params`` of cuda/vopt_cuda.h, field for field (checked against the C layout in tests)."""

    _fields_ = [
        *((name, _VOIDP) for name in ("q", "qa", "qb", "ka_words", "ka_scale", "ka_zero", "kb_words", "kb_scale",
                                      "kb_zero", "k_res", "v_words", "v_scale", "v_zero", "v_res", "out",
                                      "workspace")),
        *((name, _I64) for name in ("bh", "m", "d", "dv", "ka", "kb", "tqk", "tqv", "n", "gk", "gv", "splits")),
        ("qk_scale", ctypes.c_float),
        *((name, _I32) for name in ("meta_dtype", "kb_pm", "v_per_token", "v_codec", "v_has_scale")),
    ]


_VIDKV_PARAMS_P = ctypes.POINTER(VidKVDecodeParams)

# symbol -> (restype, argtypes): every function the library exports.
SIGNATURES: dict = {
    "vopt_cuda_abi_version": (ctypes.c_int, ()),
    "vopt_cuda_runtime_version": (ctypes.c_int, (_INT_P,)),
    "vopt_cuda_device_count": (ctypes.c_int, (_INT_P,)),
    "vopt_cuda_error_string": (ctypes.c_char_p, (ctypes.c_int,)),
    "vopt_cuda_built_archs": (ctypes.c_char_p, ()),
    "vopt_cuda_last_error_message": (ctypes.c_char_p, ()),
    "vopt_axpy_f32": (ctypes.c_int, _AXPY_ARGS),
    "vopt_axpy_f16": (ctypes.c_int, _AXPY_ARGS),
    "vopt_axpy_bf16": (ctypes.c_int, _AXPY_ARGS),
    # vq_argmin.cu: x, codebook, code_sq_norms, best, best_idx, second, n, k, d, codes_per_split, stream
    "vopt_vq_argmin_f32": (ctypes.c_int, _VQ_ARGS),
    "vopt_vq_argmin_f16": (ctypes.c_int, _VQ_ARGS),
    "vopt_vq_argmin_bf16": (ctypes.c_int, _VQ_ARGS),
    "vopt_moe_grouped_gemm_workspace_bytes": (ctypes.c_int, (_I64, ctypes.POINTER(_I64))),
    "vopt_moe_grouped_gemm_f16": (ctypes.c_int, _MOE_GG_ARGS),
    "vopt_moe_grouped_gemm_bf16": (ctypes.c_int, _MOE_GG_ARGS),
    "vopt_sage_channel_mean_f16": (ctypes.c_int, _SAGE_MEAN_ARGS),
    "vopt_sage_channel_mean_bf16": (ctypes.c_int, _SAGE_MEAN_ARGS),
    "vopt_sage_quant_q_f16": (ctypes.c_int, _SAGE_Q_ARGS),
    "vopt_sage_quant_q_bf16": (ctypes.c_int, _SAGE_Q_ARGS),
    "vopt_sage_quant_k_f16": (ctypes.c_int, _SAGE_K_ARGS),
    "vopt_sage_quant_k_bf16": (ctypes.c_int, _SAGE_K_ARGS),
    "vopt_sage_quant_v_fp8_f16": (ctypes.c_int, _SAGE_V_ARGS),
    "vopt_sage_quant_v_fp8_bf16": (ctypes.c_int, _SAGE_V_ARGS),
    "vopt_sage_attn_params_size": (ctypes.c_int64, ()),
    "vopt_sage_attn_select": (ctypes.c_int, (_SAGE_PARAMS_P, ctypes.POINTER(_I32))),
    "vopt_sage_attn_fwd": (ctypes.c_int, (_SAGE_PARAMS_P, _VOIDP)),
    "vopt_block_sparse_attn_params_size": (ctypes.c_int64, ()),
    "vopt_block_sparse_attn_fwd": (ctypes.c_int, (ctypes.POINTER(BlockSparseAttnParams), _VOIDP)),
    "vopt_vidkv_decode_params_size": (ctypes.c_int64, ()),
    "vopt_vidkv_decode_workspace_bytes": (ctypes.c_int, (_VIDKV_PARAMS_P, ctypes.POINTER(_I64))),
    "vopt_vidkv_decode_fwd": (ctypes.c_int, (_VIDKV_PARAMS_P, _VOIDP)),
}


class CudaLibrary:
    """A loaded ``libvopt_cuda.so`` with typed entry points.

    ``functions[name]`` is the ctypes function of symbol ``name`` (see
    :data:`SIGNATURES`); launchers return a CUDA status, see :meth:`check`.
    """

    def __init__(self, path: Path, cdll: ctypes.CDLL):
        self.path = path
        self._cdll = cdll
        self.functions: dict = {}
        for name, (restype, argtypes) in SIGNATURES.items():
            try:
                fn = getattr(cdll, name)
            except AttributeError:
                raise CudaLibraryError(
                    f"{path}: symbol {name!r} is missing; rebuild the library (tools/build_cuda.sh)"
                ) from None
            fn.restype = restype
            fn.argtypes = list(argtypes)
            self.functions[name] = fn

    def call(self, name: str, *args) -> int:
        """Call symbol ``name`` and return its raw status (0 = success)."""
        return self.functions[name](*args)

    def abi_version(self) -> int:
        return self.functions["vopt_cuda_abi_version"]()

    def error_string(self, status: int) -> str:
        """``"cudaErrorX: description"`` for a CUDA status."""
        raw = self.functions["vopt_cuda_error_string"](int(status))
        return raw.decode("utf-8", "replace") if raw else f"CUDA error {status}"

    def last_error_message(self) -> str:
        """Why this thread's last failed ``vopt_*`` call failed, in the library's words ("" if it said nothing)."""
        raw = self.functions["vopt_cuda_last_error_message"]()
        return raw.decode("utf-8", "replace") if raw else ""

    def check(self, status: int, what: str) -> None:
        """Raise :class:`CudaLibraryError` naming ``what`` (and the library's reason) when ``status`` is not 0."""
        if status != 0:
            detail = self.last_error_message()
            raise CudaLibraryError(
                f"{what} failed with CUDA status {status} ({self.error_string(status)})" + (f": {detail}" if detail else "")
            )

    def runtime_version(self) -> int:
        """The linked CUDA runtime version, e.g. 13000 (needs no driver)."""
        out = ctypes.c_int(0)
        self.check(self.functions["vopt_cuda_runtime_version"](ctypes.byref(out)), "vopt_cuda_runtime_version")
        return out.value

    def device_count(self) -> int:
        """Visible CUDA devices as the library's runtime sees them."""
        out = ctypes.c_int(0)
        self.check(self.functions["vopt_cuda_device_count"](ctypes.byref(out)), "vopt_cuda_device_count")
        return out.value

    def built_archs(self) -> list:
        """The CUDA architectures compiled in, e.g. ``["80", "89", "90a"]``."""
        raw = self.functions["vopt_cuda_built_archs"]()
        return [a for a in (raw or b"").decode().split(";") if a]


def library_path() -> Optional[Path]:
    """Where the library would be loaded from, or ``None`` when no candidate exists.

    ``VOPT_CUDA_LIB`` wins when set (even if that file is missing, so a typo is
    reported rather than silently ignored).
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    bundled = Path(__file__).resolve().parent / "_lib" / LIBRARY_NAME
    return bundled if bundled.is_file() else None


@functools.lru_cache(maxsize=None)
def _load_path(path: str) -> CudaLibrary:
    try:
        cdll = ctypes.CDLL(path)
    except OSError as exc:
        raise CudaLibraryError(f"cannot load {path}: {exc}") from exc
    lib = CudaLibrary(Path(path), cdll)
    found = lib.abi_version()
    if found != ABI_VERSION:
        raise CudaLibraryError(
            f"{path} has ABI version {found}, this vopt needs {ABI_VERSION}; rebuild it (tools/build_cuda.sh)"
        )
    return lib


def load() -> CudaLibrary:
    """The loaded library (cached per path and process).

    Raises :class:`CudaLibraryError` saying which path was tried and why it failed.
    """
    path = library_path()
    if path is None:
        bundled = Path(__file__).resolve().parent / "_lib" / LIBRARY_NAME
        raise CudaLibraryError(
            f"{LIBRARY_NAME} not found: {ENV_VAR} is unset and {bundled} does not exist "
            "(build it with tools/build_cuda.sh; needs nvcc and cmake)"
        )
    if not path.is_file():
        raise CudaLibraryError(f"{ENV_VAR}={os.environ.get(ENV_VAR)!r}: {path} is not a file")
    return _load_path(str(path.resolve()))


def clear_cache() -> None:
    """Forget loaded libraries and probes (tests; ctypes cannot unload them)."""
    _load_path.cache_clear()
    _driver_reason.cache_clear()


def library_reason() -> Optional[str]:
    """Why the library cannot be loaded, or ``None`` when it loads. Never raises."""
    try:
        load()
    except CudaLibraryError as exc:
        return str(exc)
    return None


def unavailable_reason() -> Optional[str]:
    """Why vopt's CUDA backend cannot run here, or ``None`` when it can. Never raises.

    The backend needs both the library and a CUDA device visible to torch.
    """
    reasons = []
    why = library_reason()
    if why:
        reasons.append(f"CUDA library unavailable: {why}")
    try:
        import torch

        has_device = torch.cuda.is_available()
    except ImportError as exc:
        reasons.append(f"torch is not importable: {exc}")
    else:
        if not has_device:
            built = torch.version.cuda or "none (CPU-only build)"
            reasons.append(f"no CUDA device (torch.cuda.is_available() is False; torch CUDA version: {built})")
        elif not why:
            driver_why = _driver_reason(str(load().path))
            if driver_why:
                reasons.append(driver_why)
    return "; ".join(reasons) or None


@functools.lru_cache(maxsize=None)
def _driver_reason(path: str) -> Optional[str]:
    """Whether the library's own (static) CUDA runtime works with this driver.

    torch may see the GPU through an older runtime than the one linked into the
    library (e.g. a CUDA 13 library needs driver >= 580). Probed once per library.
    """
    lib = _load_path(path)
    count = ctypes.c_int(0)
    status = lib.call("vopt_cuda_device_count", ctypes.byref(count))
    if status != 0:
        version = ctypes.c_int(0)
        lib.call("vopt_cuda_runtime_version", ctypes.byref(version))
        return f"the CUDA library's runtime ({version.value}) cannot use this driver: {lib.error_string(status)}"
    if count.value == 0:
        return "the CUDA library's runtime sees no CUDA device"
    return None


def device_reason(device) -> Optional[str]:
    """Why the library has no code for ``device`` (a CUDA ``torch.device``), or ``None``.

    Code built for ``sm_XY`` runs on compute capability X.Y and later minors of
    the same major; PTX (CMake's default for plain entries) JIT-compiles on any
    later GPU. Arch-specific ``90a`` code runs only on 9.0. So a GPU older than
    every built arch cannot run the library.
    """
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    cc = major * 10 + minor
    archs = load().built_archs()
    nums = [int("".join(ch for ch in a if ch.isdigit()) or 0) for a in archs]
    if nums and cc < min(nums):
        return f"GPU compute capability {major}.{minor} is older than every built arch ({';'.join(archs)})"
    return None


def check_status(status: int, what: str) -> None:
    """Raise :class:`CudaLibraryError` with the CUDA error string unless ``status`` is 0."""
    if status != 0:
        load().check(status, what)


def built_archs() -> list:
    """The architectures the library was built for (loads it)."""
    return load().built_archs()


def runtime_version() -> int:
    """The CUDA runtime version linked into the library (loads it)."""
    return load().runtime_version()


def current_stream_handle(tensor) -> int:
    """The raw ``cudaStream_t`` of torch's current stream on ``tensor``'s device."""
    import torch

    return torch.cuda.current_stream(tensor.device).cuda_stream

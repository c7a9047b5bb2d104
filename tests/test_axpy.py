"""``vopt::axpy``: reference accuracy, Triton (interpreter) and CUDA backends, dispatch errors.

Tolerances, all against the fp32 arithmetic the op defines:

* ``reference`` vs exact fp64 math: one rounding of the product and one of the
  sum in fp32 (bounded by ``2 * eps32 * (|alpha*x| + |y|)``), then one rounding
  to the output dtype (bounded by 1 ulp of that dtype).
* Triton vs reference: fp32 within 1e-6 relative plus the same cancellation term
  (on GPU the compiler may fuse ``alpha*x + y`` into one FMA, i.e. skip one
  fp32 rounding); fp16 within 1 ulp (that FMA can move a value across a
  rounding boundary); bf16 within 1 ulp (the Triton interpreter truncates
  fp32 -> bf16 instead of rounding to nearest).
* CUDA vs reference: the kernel rounds multiply and add separately like the
  reference, so it is expected to be bit-exact; checked with the same bounds.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vopt import cuda_library
from vopt.dispatch import Backend
from vopt.errors import BackendUnavailableError, ConfigError
import vopt.ops.axpy as axpy_mod
from vopt.ops.axpy import AXPY, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
op = torch.ops.vopt.axpy


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values at magnitude ``|v|`` (fp64 tensor)."""
    fi = torch.finfo(dtype)
    mag = v.double().abs().clamp_min(fi.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * fi.eps


def _cancellation(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    eps32 = torch.finfo(torch.float32).eps
    return 2 * eps32 * ((alpha * x.double()).abs() + y.double().abs())


def _assert_close_ulp(got, want, x, y, alpha, *, ulps: float = 1.0, rel: float = 0.0):
    """``|got - want| <= ulps * ulp(max(|got|, |want|)) + rel * |want| + cancellation``."""
    assert got.shape == want.shape and got.dtype == want.dtype
    g, w = got.double(), want.double()
    tol = ulps * _ulp(torch.maximum(g.abs(), w.abs()), want.dtype) + rel * w.abs() + _cancellation(x, y, alpha)
    err = (g - w).abs()
    bad = err > tol
    assert not bad.any(), f"{int(bad.sum())} values off; worst err {err.max().item():.3g} (tol there {tol[err.argmax()].item():.3g})"


def _inputs(shape, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
    y = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
    return x.to(device), y.to(device)


def _exact(x, y, alpha):
    """fp64 math with alpha as the fp32 value the kernels see (exact product)."""
    a32 = float(torch.tensor(alpha, dtype=torch.float32))
    return a32 * x.double() + y.double()


shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)
alphas = st.floats(-8, 8, allow_nan=False, allow_infinity=False, width=32)


# ---- reference ----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), alpha=alphas, seed=st.integers(0, 2**16))
def test_reference_matches_fp64_math(shape, dtype, alpha, seed):
    x, y = _inputs(shape, dtype, seed)
    got = reference(x, y, alpha)
    exact = _exact(x, y, alpha)
    assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
    err = (got.double() - exact).abs()
    tol = _ulp(exact, dtype) + _cancellation(x, y, alpha)
    assert (err <= tol).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_backend_through_the_op(dtype, monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", "reference")
    x, y = _inputs((4, 33), dtype)
    assert torch.equal(op(x, y, 0.75), reference(x, y, 0.75))


# ---- triton (interpreter on CPU) ------------------------------------------------------------


@pytest.fixture
def triton_on_cpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter path (a GPU is present)")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VOPT_BACKEND", "triton")


def _triton_tolerance(dtype):
    return {"ulps": 0.0, "rel": 1e-6} if dtype == torch.float32 else {"ulps": 1.0}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (1023,), (1025,), (3, 700)])
def test_triton_matches_reference(triton_on_cpu, dtype, shape):
    x, y = _inputs(shape, dtype, seed=len(shape))
    assert AXPY.select(x, y, -1.25).backend is Backend.TRITON
    _assert_close_ulp(op(x, y, -1.25), reference(x, y, -1.25), x, y, -1.25, **_triton_tolerance(dtype))


@settings(max_examples=15, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), alpha=alphas, seed=st.integers(0, 2**16))
def test_triton_matches_reference_hypothesis(shape, dtype, alpha, seed):
    # Hypothesis does not mix with function-scoped fixtures; set the env by hand.
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter path (a GPU is present)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.setenv("VOPT_BACKEND", "triton")
        x, y = _inputs(shape, dtype, seed)
        _assert_close_ulp(op(x, y, alpha), reference(x, y, alpha), x, y, alpha, **_triton_tolerance(dtype))


def test_triton_handles_non_contiguous_inputs(triton_on_cpu):
    x, y = _inputs((40, 30), torch.float32)
    xt, yt = x.t(), y.t()
    _assert_close_ulp(op(xt, yt, 2.0), reference(xt, yt, 2.0), xt, yt, 2.0, ulps=0.0, rel=1e-6)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, y = _inputs((8,), torch.float32)
    monkeypatch.setenv("VOPT_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        op(x, y, 1.0)
    monkeypatch.setenv("VOPT_BACKEND", "auto")
    assert AXPY.select(x, y, 1.0).backend is Backend.REFERENCE
    assert torch.equal(op(x, y, 1.0), reference(x, y, 1.0))


# ---- dispatch and validation errors ------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_forced_cuda_backend_on_cpu_lists_every_backend(monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", "cuda")
    x, y = _inputs((8,), torch.float32)
    with pytest.raises(BackendUnavailableError) as info:
        op(x, y, 1.0)
    msg = str(info.value)
    for name in ("cuda", "triton", "reference"):
        assert f"- {name}:" in msg
    assert [b for b, _ in info.value.refusals] == ["cuda", "triton", "reference"]


def test_bad_backend_name_lists_accepted_values(monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", "fastest")
    x, y = _inputs((8,), torch.float32)
    with pytest.raises(ConfigError) as info:
        op(x, y, 1.0)
    for name in ("auto", "cuda", "triton", "reference"):
        assert name in str(info.value)


def test_shape_mismatch_names_the_argument():
    x, _ = _inputs((4, 5), torch.float32)
    y, _ = _inputs((5, 4), torch.float32)
    with pytest.raises(ValueError, match=r"y\.shape"):
        op(x, y, 1.0)


def test_dtype_mismatch_names_the_argument():
    x, y = _inputs((4,), torch.float32)
    with pytest.raises(TypeError, match=r"y\.dtype"):
        op(x, y.half(), 1.0)
    with pytest.raises(TypeError, match=r"x\.dtype"):
        op(x.double(), y.double(), 1.0)


def test_validate_rejects_non_float_alpha():
    x, y = _inputs((4,), torch.float32)
    with pytest.raises(TypeError, match="alpha"):
        axpy_mod.validate(x, y, "2")
    with pytest.raises(TypeError, match="alpha"):
        axpy_mod.validate(x, y, True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_inputs_are_not_modified(backend, monkeypatch):
    device = "cpu"
    if backend == "triton":
        # Triton runs on the GPU when there is one, else in the interpreter.
        if torch.cuda.is_available():
            device = "cuda"
        else:
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VOPT_BACKEND", backend)
    x, y = _inputs((3, 17), torch.float16, device=device)
    x0, y0 = x.clone(), y.clone()
    out = op(x, y, 3.0)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert out.data_ptr() not in (x.data_ptr(), y.data_ptr())


def test_opcheck(monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", "reference")
    x, y = _inputs((4, 6), torch.float32)
    torch.library.opcheck(op.default, (x, y, 0.5))
    xh, yh = _inputs((3,), torch.bfloat16)
    torch.library.opcheck(op.default, (xh, yh, -2.0))


def test_fake_tensor_validates_and_keeps_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, dtype=torch.float16)
        out = op(x, torch.empty(2, 3, dtype=torch.float16), 1.0)
        assert out.shape == (2, 3) and out.dtype == torch.float16
        with pytest.raises(ValueError, match=r"y\.shape"):
            op(x, torch.empty(3, 2, dtype=torch.float16), 1.0)


# ---- GPU ------------------------------------------------------------------------------------


GPU_SIZES = [0, 1, 255, 1000, (1 << 20) + 3]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", GPU_SIZES)
def test_cuda_backend_matches_reference(dtype, n, monkeypatch):
    why = cuda_library.unavailable_reason()
    assert why is None, f"CUDA backend unavailable on a GPU machine: {why}"
    monkeypatch.setenv("VOPT_BACKEND", "cuda")
    x, y = _inputs((n,), dtype, seed=n, device="cuda")
    x0, y0 = x.clone(), y.clone()
    got = op(x, y, 0.3)
    want = reference(x, y, 0.3)
    torch.cuda.synchronize()
    assert torch.equal(x, x0) and torch.equal(y, y0)
    _assert_close_ulp(got.cpu(), want.cpu(), x.cpu(), y.cpu(), 0.3, ulps=1.0 if dtype != torch.float32 else 0.0)


@pytest.mark.gpu
def test_cuda_backend_is_chosen_by_auto_and_uses_the_current_stream(monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", "auto")
    x, y = _inputs((4096,), torch.float16, device="cuda")
    assert AXPY.select(x, y, 1.0).backend is Backend.CUDA
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = op(x, y, 2.0)
    stream.synchronize()
    assert torch.equal(got, reference(x, y, 2.0))


@pytest.mark.gpu
def test_cuda_backend_refuses_non_contiguous(monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", "auto")
    x, y = _inputs((64, 32), torch.float32, device="cuda")
    assert AXPY.select(x.t(), y.t(), 1.0).backend is not Backend.CUDA
    _assert_close_ulp(op(x.t(), y.t(), 1.5).cpu(), reference(x.t(), y.t(), 1.5).cpu(), x.t().cpu(), y.t().cpu(), 1.5, ulps=0.0, rel=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_backend_on_gpu(dtype, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("VOPT_BACKEND", "triton")
    x, y = _inputs((5000,), dtype, device="cuda")
    got, want = op(x, y, -0.7), reference(x, y, -0.7)
    _assert_close_ulp(got.cpu(), want.cpu(), x.cpu(), y.cpu(), -0.7, **_triton_tolerance(dtype))

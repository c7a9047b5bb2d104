"""``vopt::vq_argmin`` and the ``vq_lookup`` pass: reference, certification bound, Triton (interpreter), CUDA (GPU),
the pass on the zoo's E-ViLM and on the cdist / broadcast-difference variants, errors, fake / export.

Tolerances and why:

* codes: **identical** (``torch.equal``) to the reference expression evaluated on the whole input, on every
  input (ties, duplicates, outliers, NaN included) with ``fallback="batch"``; that is the op's contract.
* ``min_dist``: within ``2 E`` of the fp64 squared distance, ``E`` being the op's own per-row error bound
  (:func:`vopt.ops.vq_lookup.error_bound`); the bound itself is checked against fp64 for the kernel's scores
  and for the reference's fp32 distances (it must hold for both for the certification to be sound).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import vopt
from vopt import zoo
from vopt.errors import BackendUnavailableError, ConfigError, StrictModeError
import vopt.ops.vq_lookup as vq
from vopt.ops.vq_lookup import VQ_ARGMIN, certified, error_bound, reference

op = torch.ops.vopt.vq_argmin.default
HAS_GPU = torch.cuda.is_available()


def _triton(x, c, form="mm", fallback="batch"):
    return vq.vq_argmin_triton(x, c, form, fallback)


def _exact_sq(x, c):
    """fp64 squared distances of the (upcast) inputs: exact to ~1e-13 relative at these sizes."""
    xd, cd = x.double(), c.double()
    return ((xd[:, None, :] - cd[None, :, :]) ** 2).sum(-1)


def _exact_to(x, c, codes):
    """fp64 squared distance of every row to its chosen code (O(N D): fine at GPU sizes too)."""
    return ((x.double() - c.double()[codes]) ** 2).sum(-1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _check_op(x, c, form="mm", fallback="batch", run=_triton):
    codes, dist = run(x, c, form, fallback)
    want_codes, _ = reference(x, c, form)
    assert codes.dtype == torch.int64 and dist.dtype == torch.float32 and codes.shape == dist.shape == (x.shape[0],)
    if fallback == "batch":
        assert torch.equal(codes, want_codes)
    e, _ = error_bound(x, c)
    exact = _exact_to(x, c, codes)
    finite = torch.isfinite(exact) & torch.isfinite(e.double())
    assert ((dist.double() - exact).abs() <= 2 * e.double())[finite].all()
    return codes


# ---- the reference --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_reference_is_the_zoo_expression_and_the_variants(seed):
    from vopt.zoo.evilm import VectorQuantizer

    g = _gen(seed)
    q = VectorQuantizer(50, 12)
    with torch.no_grad():
        q.codebook.copy_(torch.randn(50, 12, generator=g))
        x = torch.randn(37, 12, generator=g)
        c = q.codebook.detach()
        assert torch.equal(reference(x, c, "mm")[0], q(x))
        assert torch.equal(reference(x, c, "diff")[0], ((x[:, None] - c[None]) ** 2).sum(-1).argmin(-1))
        assert torch.equal(reference(x, c, "cdist")[0], torch.cdist(x, c).argmin(-1))


def test_reference_ties_pick_the_first_code():
    c = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [4.0, 4.0]])   # code 3 duplicates code 1
    x = torch.tensor([[2.0, 0.0], [1.0, 0.0], [1.0, 1.0], [2.0, 1.0], [3.0, 3.0], [0.0, 1.0]])
    for form in vq.FORMS:
        assert reference(x, c, form)[0].tolist() == [1, 0, 0, 1, 4, 0]


@pytest.mark.parametrize("seed", range(3))
def test_error_bound_holds_for_the_reference_and_the_kernel(seed):
    """E bounds |fp32 value - exact| for the reference's distances and the kernel's scores (needed for soundness)."""
    g = _gen(seed)
    x = torch.randn(70, 33, generator=g) * torch.logspace(-2, 2, 70)[:, None]      # norms over 4 decades
    c = torch.randn(90, 33, generator=g) * 3
    e, xx = error_bound(x, c)
    exact = _exact_sq(x, c)
    for form in ("mm", "diff"):
        assert ((vq.distances(x, c, form).double() - exact).abs() <= e.double()[:, None]).all()
    best, idx, second = _scores(x, c)
    kernel_d = xx.double() + best.double()      # the kernel's score plus the (fp32) row norm
    assert ((kernel_d - exact.gather(1, idx.long()[:, None]).squeeze(1)).abs() <= 2 * e.double()).all()
    assert (second >= best).all()


def _scores(x, c, **blocks):
    """The Triton kernel's merged ``(best, idx, second)``, small blocks by default (fast in the interpreter)."""
    from vopt.kernels import vq_argmin as kernels

    raw = kernels.vq_scores(x, c, vq._code_sq_norms(c), **({"block_n": 32, "block_k": 32, "block_d": 16} | blocks))
    return vq.merge_splits(*raw)


# ---- the Triton kernel (interpreter on CPU) -----------------------------------------------------------


def test_kernel_best_index_and_second_on_hand_made_ties():
    """Duplicates across and within blocks: first index, and second == best."""
    g = _gen(0)
    c = torch.randn(80, 16, generator=g)
    c[50] = c[7]            # duplicate in a later block (blocks of 32 codes)
    c[12] = c[9]            # duplicate in the same block
    x = torch.stack([c[7] + 1e-3, c[9], c[50], torch.zeros(16), c[79]])
    best, idx, second = _scores(x, c)
    assert idx.tolist()[:3] == [7, 9, 7]
    assert best[1] == second[1] and best[2] == second[2] and best[0] == second[0]
    assert idx[4] == 79 and second[4] > best[4]


def test_code_splits_merge_to_the_same_result():
    """Splitting the codebook across programs (GPU occupancy) changes nothing: ties across split boundaries included."""
    g = _gen(11)
    c = torch.randn(200, 20, generator=g)
    c[100] = c[10]            # duplicate in a later split (splits of 32 / 64 codes)
    c[150] = c[99]
    x = torch.cat([torch.randn(40, 20, generator=g), c[[10, 99, 100, 150]]])
    one = _scores(x, c, splits=1)
    from vopt.kernels import vq_argmin as kernels

    for splits in (2, 3, 7, 1000):
        raw = kernels.vq_scores(x, c, vq._code_sq_norms(c), splits=splits, block_n=32, block_k=32, block_d=16)
        assert raw[0].shape[0] == min(splits, 7)          # ceil(200 / 32) = 7 code blocks at most
        for a, b in zip(vq.merge_splits(*raw), one):
            assert torch.equal(a, b)
    assert one[1][-4:].tolist() == [10, 99, 10, 99]
    assert torch.equal(one[0][-4:], one[2][-4:])            # second == best for the duplicated codes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(70, 90, 33), (64, 64, 32), (1, 1, 16), (5, 200, 7)])
def test_triton_codes_identical_to_reference(shape, dtype):
    n, k, d = shape
    g = _gen(n * k + d)
    x = torch.randn(n, d, generator=g).to(dtype)
    c = torch.randn(k, d, generator=g).to(dtype)
    _check_op(x, c)


@pytest.mark.parametrize("form", vq.FORMS)
def test_triton_adversarial_inputs(form):
    g = _gen(1)
    k, d = 70, 33
    c = torch.randn(k, d, generator=g)
    c[40] = c[3]                                   # exact duplicate: ties -> first index
    c[41] = c[5] + 1e-6                            # codes that differ by tiny amounts
    c[42] = c[5] * (1 + 2 ** -22)
    c[69] = 1e3                                    # a far outlier code
    x = torch.cat([
        torch.randn(20, d, generator=g),
        c[[3, 5, 41, 42, 40]],                     # on (near-)duplicate codes
        (c[5] + c[41]) / 2 * torch.ones(2, 1),     # midway between nearly equal codes
        torch.zeros(3, d),                         # zero rows
        torch.randn(4, d, generator=g) * 1e4,      # large-norm outliers
        (c[0] + c[1])[None] / 2,                   # equidistant from two codes (up to rounding)
    ])
    codes = _check_op(x, c, form)
    assert codes[20].item() == 3 and codes[24].item() == 3     # the duplicate of code 3 (code 40) never wins


def test_triton_non_finite_inputs_follow_the_reference():
    g = _gen(2)
    c = torch.randn(40, 16, generator=g)
    x = torch.randn(9, 16, generator=g)
    x[2, 3] = float("nan")
    x[4, 0] = float("inf")
    x[6] = 1e30                                    # overflows fp32 squares
    x[7] = 3e18                                    # squares finite, but near overflow: never certified
    codes, _ = _triton(x, c)
    assert torch.equal(codes, reference(x, c)[0])
    c2 = c.clone()
    c2[11, 0] = float("nan")
    assert torch.equal(_triton(x[[0, 1, 3]], c2)[0], reference(x[[0, 1, 3]], c2)[0])
    ok, _ = certified(x, c, *_scores(x, c)[::2], "mm")
    assert not ok[[2, 4, 6, 7]].any() and ok[[0, 1, 3, 5, 8]].all()


def test_rows_fallback_recomputes_only_uncertified_rows(monkeypatch):
    g = _gen(3)
    c = torch.randn(64, 8, generator=g)
    c[30] = c[2]
    x = torch.cat([torch.randn(40, 8, generator=g), c[[2, 2]]])
    seen = []
    real = vq.reference

    def spy(xs, cb, form="mm", **kw):
        seen.append(xs.shape[0])
        return real(xs, cb, form, **kw)

    monkeypatch.setattr(vq, "reference", spy)
    best, idx, second = _scores(x, c)
    ok, _ = certified(x, c, best, second, "mm")
    codes, _ = _triton(x, c, "mm", "rows")
    assert seen == [int((~ok).sum())] and seen[0] >= 2           # only the uncertified rows (the two ties at least)
    assert codes[-2:].tolist() == [2, 2]
    assert torch.equal(codes[ok], idx.long()[ok])
    seen.clear()
    _triton(x, c, "mm", "batch")
    assert seen == [x.shape[0]]                                   # the whole call


def test_zero_rows_and_single_code():
    assert [t.shape for t in _triton(torch.empty(0, 8), torch.randn(3, 8))] == [(0,), (0,)]
    codes, _ = _triton(torch.randn(5, 8), torch.randn(1, 8))
    assert codes.tolist() == [0] * 5


# ---- the custom op: dispatch, errors, fake / export --------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_op_dispatch(backend, monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", backend)
    g = _gen(4)
    x, c = torch.randn(33, 20, generator=g), torch.randn(45, 20, generator=g)
    codes, dist = op(x, c)
    assert torch.equal(codes, reference(x, c)[0])
    assert VQ_ARGMIN.select(x, c, "mm", "batch").backend.value == backend


def test_forced_cuda_backend_says_why(monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", "cuda")
    if HAS_GPU:
        pytest.skip("a GPU may serve the CUDA backend")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        op(torch.randn(3, 4), torch.randn(5, 4))


@pytest.mark.parametrize("args, err, match", [
    ((torch.randn(3, 4).double(), torch.randn(5, 4).double()), TypeError, "x.dtype.*accepted: float32"),
    ((torch.randn(3, 4), torch.randn(5, 4).half()), TypeError, "codebook.dtype"),
    ((torch.randn(2, 3, 4), torch.randn(5, 4)), ValueError, r"x must be 2-D"),
    ((torch.randn(3, 4), torch.randn(5, 4, 1)), ValueError, r"codebook must be 2-D"),
    ((torch.randn(3, 4), torch.randn(5, 6)), ValueError, "D must match"),
    ((torch.randn(3, 4), torch.randn(0, 4)), ValueError, "K >= 1"),
    ((torch.randn(3, 4), torch.randn(5, 4), "l1"), ValueError, r"form='l1'.*accepted: \['mm', 'diff', 'cdist'\]"),
    ((torch.randn(3, 4), torch.randn(5, 4), "mm", "none"), ValueError, r"fallback='none'.*accepted"),
])
def test_errors_name_the_argument(args, err, match):
    with pytest.raises(err, match=match):
        op(*args)


def test_op_does_not_mutate_inputs_and_exports():
    g = _gen(5)
    x, c = torch.randn(20, 8, generator=g), torch.randn(30, 8, generator=g)
    x0, c0 = x.clone(), c.clone()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Parameter(c.clone())

        def forward(self, x):
            codes, dist = torch.ops.vopt.vq_argmin(x, self.c)
            return codes, dist.sum()

    ep = torch.export.export(M(), (x,), strict=False)
    assert any(n.target is op for n in ep.graph.nodes)
    codes, _ = ep.module()(x)
    assert torch.equal(codes, reference(x, c)[0])
    assert torch.equal(x, x0) and torch.equal(c, c0)


# ---- the pass ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evilm():
    return zoo.build("e-vilm")


def _rewritten(opt):
    return [m for ev in opt.report.stage_events for r in ev.pass_results for m in r.matches if m.rewritten]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_pass_on_zoo_evilm_gives_identical_codes(evilm, backend, monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", backend)
    m = evilm.model
    opt = vopt.optimize(m, passes=["vq_lookup"], config=vopt.OptimizeConfig(strict=True))
    for seed, batch in ((0, 1), (1, 2), (2, 3)):
        pixels = evilm.example_inputs(batch=batch, seed=seed)["pixel_values"]
        assert torch.equal(opt.tokenize_video(pixels), m.tokenize_video(pixels))
    hits = _rewritten(opt)
    assert len(hits) == 3 and all(h.where.startswith("vq_tokenizer:") and "[mm]" in h.what for h in hits)
    gm = opt.stages["vq_tokenizer"].specializations[0].gm
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert op in targets and torch.ops.aten.argmin.default not in targets and torch.ops.aten.matmul.default not in targets
    # the original model is untouched; the QA forward is unaffected
    inputs = evilm.example_inputs()
    with torch.no_grad():
        assert torch.equal(opt(**inputs), m(**inputs))


class _Variant(nn.Module):
    def __init__(self, kind, k=40, d=12):
        super().__init__()
        self.kind = kind
        self.c = nn.Parameter(torch.randn(k, d, generator=_gen(6)))

    def forward(self, x):
        c = self.c
        if self.kind == "cdist":
            return torch.cdist(x, c).argmin(-1)
        if self.kind == "diff":
            return ((x[:, None] - c[None]) ** 2).sum(-1).argmin(-1)
        if self.kind == "mm3d_keepdim":              # [B, N, D] rows, argmin keepdim
            d = (x * x).sum(-1, keepdim=True) - 2 * (x @ c.t()) + (c * c).sum(-1)
            return d.argmin(dim=-1, keepdim=True)
        if self.kind == "pow_transpose":
            d = x.pow(2).sum(-1, keepdim=True) - (x @ c.transpose(0, 1)) * 2.0 + c.pow(2).sum(1)
            return d.argmin(1)
        if self.kind == "reordered":                 # rounds differently: not rewritten
            return ((x * x).sum(-1, keepdim=True) + (c * c).sum(-1) - 2 * (x @ c.t())).argmin(-1)
        if self.kind == "shared":                    # the distance is also returned: not rewritten
            d = (x * x).sum(-1, keepdim=True) - 2 * (x @ c.t()) + (c * c).sum(-1)
            return d.argmin(-1), d.min()
        if self.kind == "dim0":
            return ((x * x).sum(-1, keepdim=True) - 2 * (x @ c.t()) + (c * c).sum(-1)).argmin(0)
        raise AssertionError(self.kind)


@pytest.mark.parametrize("kind, x_shape", [("cdist", (30, 12)), ("cdist", (7, 12)), ("diff", (30, 12)),
                                           ("mm3d_keepdim", (2, 15, 12)), ("pow_transpose", (30, 12))])
def test_pass_rewrites_the_variants_exactly(kind, x_shape):
    model = _Variant(kind).eval()
    x = torch.randn(*x_shape, generator=_gen(7))
    x[0] = model.c.detach()[3]                     # on a code; row 1 is a tie between codes 0 and 1
    x[1] = (model.c.detach()[0] + model.c.detach()[1]) / 2
    opt = vopt.optimize(model, passes=["vq_lookup"], example_inputs=(x,), config=vopt.OptimizeConfig(strict=True))
    with torch.no_grad():
        assert torch.equal(opt(x), model(x))
        x2 = torch.randn(*x_shape, generator=_gen(8))
        assert torch.equal(opt(x2), model(x2))
    (hit,) = _rewritten(opt)
    assert f"[{kind.split('3d')[0].replace('pow_transpose', 'mm')}]" in hit.what


@pytest.mark.parametrize("kind, reason", [
    ("reordered", "none of the forms"), ("shared", "also read by"), ("dim0", "argmin over dim=0")])
def test_pass_skips_with_reasons(kind, reason):
    model = _Variant(kind).eval()
    x = torch.randn(30, 12, generator=_gen(9))
    opt = vopt.optimize(model, passes=["vq_lookup"], example_inputs=(x,))
    skipped = [m for ev in opt.report.stage_events for r in ev.pass_results for m in r.matches if not m.rewritten]
    assert len(skipped) == 1 and reason in skipped[0].reason, skipped
    with pytest.raises(StrictModeError):
        vopt.optimize(model, passes=["vq_lookup"], example_inputs=(x,), config=vopt.OptimizeConfig(strict=True))


def test_pass_skips_half_precision_unless_asked():
    model = _Variant("diff").eval().half()
    x = torch.randn(30, 12, generator=_gen(10)).half()
    opt = vopt.optimize(model, passes=["vq_lookup"], example_inputs=(x,))
    (m,) = [m for ev in opt.report.stage_events for r in ev.pass_results for m in r.matches]
    assert not m.rewritten and "upcast_half" in m.reason
    opt = vopt.optimize(model, passes=["vq_lookup"], example_inputs=(x,),
                        config=vopt.OptimizeConfig(pass_configs={"vq_lookup": {"upcast_half": True}}))
    assert len(_rewritten(opt)) == 1
    with torch.no_grad():
        assert torch.equal(opt(x), reference(x, model.c.detach(), "diff")[0])   # fp32 codes


def test_pass_config_is_validated_and_opt_in():
    from vopt.pass_protocol import get_pass
    from vopt.passes.vq_lookup import VqLookupConfig

    assert get_pass("vq_lookup").default is False
    with pytest.raises(ConfigError, match=r"fallback='all'.*accepted: \['batch', 'rows'\]"):
        VqLookupConfig(fallback="all")
    with pytest.raises(ConfigError, match="stages"):
        VqLookupConfig(stages="vq_tokenizer")
    assert VqLookupConfig.from_dict(VqLookupConfig(fallback="rows").to_dict()).fallback == "rows"


# ---- Triton compiles for the GPU targets (no GPU needed) ------------------------------------------------------

COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vopt.kernels.vq_argmin import _vq_argmin_kernel as kernel
out = {}
for arch, dtype, dot_fp32 in json.loads(sys.argv[1]):
    sig = {"x_ptr": "*" + dtype, "c_ptr": "*" + dtype, "cc_ptr": "*fp32", "best_ptr": "*fp32", "idx_ptr": "*i32",
           "second_ptr": "*fp32", "N": "i32", "K": "i32", "D": "i32", "K_PER_SPLIT": "i32", "stride_xn": "i32", "stride_xd": "i32",
           "stride_ck": "i32", "stride_cd": "i32",
           "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr", "DOT_FP32": "constexpr"}
    consts = {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 32, "DOT_FP32": dot_fp32}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    res = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 2})
    out[f"{arch}-{dtype}"] = res.asm["ptx"]
print(json.dumps(out))
"""


def test_triton_kernel_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton")
    cases = [(80, "fp32", True), (80, "fp16", False), (90, "fp16", False)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                         env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    ptx = json.loads(res.stdout.strip().splitlines()[-1])
    assert ".target sm_80" in ptx["80-fp32"] and "fma.rn.f32" in ptx["80-fp32"]
    assert "mma.sync" not in ptx["80-fp32"]                                          # ieee: no TF32 tensor cores
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx["80-fp16"]
    assert ".target sm_90" in ptx["90-fp16"] and ("wgmma" in ptx["90-fp16"] or "mma.sync" in ptx["90-fp16"])


# ---- the CUDA library's launchers (argument checks need no GPU) ----------------------------------------------


def test_cuda_launchers_check_their_arguments():
    from vopt import cuda_library

    why = cuda_library.library_reason()
    if why:
        pytest.skip(f"CUDA library not loadable: {why}")
    lib = cuda_library.load()
    invalid = 1  # cudaErrorInvalidValue
    for sym in ("vopt_vq_argmin_f32", "vopt_vq_argmin_f16", "vopt_vq_argmin_bf16"):
        assert lib.call(sym, *[None] * 6, 0, 3, 8, 64, None) == 0             # n == 0: nothing to launch
        for n, k, d, per in ((-1, 3, 8, 64), (4, 0, 8, 64), (4, 3, 0, 64), (4, 2 ** 31, 8, 64), (4, 3, 8, 0),
                             (4, 70000, 8, 1)):                              # the last: 70000 splits > 65535
            assert lib.call(sym, *[16] * 6, n, k, d, per, None) == invalid, (sym, n, k, d, per)
        assert lib.call(sym, *[None] * 6, 4, 3, 8, 64, None) == invalid      # NULL pointers


# ---- GPU ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1568, 1024, 256), (333, 4099, 33), (64, 64, 1024), (1, 7, 16)])
def test_gpu_backends_identical_to_reference(backend, dtype, shape, monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", backend)
    n, k, d = shape
    g = _gen(n + k + d)
    c = torch.randn(k, d, generator=g)
    c[k // 2] = c[0]
    x = torch.cat([torch.randn(n, d, generator=g), c[[0, 1]], torch.zeros(1, d)]).to("cuda", dtype)
    c = c.to("cuda", dtype)
    for fallback in vq.FALLBACKS:
        codes, dist = op(x, c, "mm", fallback)
        want, _ = reference(x, c)
        if fallback == "batch":
            assert torch.equal(codes, want)
        e, _ = error_bound(x, c)
        exact = _exact_to(x, c, codes)
        assert ((dist.double() - exact).abs() <= 2 * e.double()).all()
    best, idx, second = (_scores(x, c, block_n=64, block_k=64, block_d=32) if backend == "triton"
                         else vq.cuda_scores(x, c))
    if n >= 64:
        ok, _ = certified(x, c, best, second, "mm")
        assert ok.float().mean() > 0.5                                # most rows certified on random data


@pytest.mark.gpu
def test_gpu_pass_on_zoo_evilm():
    zm = zoo.build("e-vilm", device="cuda")
    m = zm.model
    opt = vopt.optimize(m, passes=["vq_lookup"])
    pixels = zm.example_inputs(batch=4)["pixel_values"]
    assert torch.equal(opt.tokenize_video(pixels), m.tokenize_video(pixels))

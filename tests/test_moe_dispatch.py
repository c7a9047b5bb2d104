"""Sparse MoE dispatch: ``vopt::grouped_gemm`` (reference, Triton, CUDA), routing, and the ``moe_dispatch`` pass.

Tolerances (stated once, used throughout):

* fp32: ``1e-5 * (1 + max|reference|)``. Every path computes the same sums in fp32 and differs only in summation
  order (blocked K loop, matmul vs einsum contraction order); with K <= 780 and O(1) inputs that is ~1e-6 relative.
* fp16: ``2e-3 * (1 + max|reference|)``. Both sides accumulate in fp32 and round once to fp16 (2^-11 relative
  half-ulp); a different fp32 summation order can flip one rounding: one fp16 ulp = 2^-10 ~ 1e-3 relative.
* bf16 (GPU only; bf16 ``tl.dot`` is broken in the Triton interpreter): ``1.6e-2 * (1 + max|reference|)``,
  one bf16 ulp (2^-7 ~ 7.8e-3 relative) times two.
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import vopt
import vopt.moe.vrd as vrd
from vopt import cuda_library, zoo
from vopt.errors import ConfigError
from vopt.moe.grouped_mlp import SparseMoE, describe
from vopt.moe.routing import capacity_for, combine, route
from vopt.ops.grouped_gemm import GROUPED_GEMM, offsets_from_counts, reference
from vopt.pass_protocol import PassContext, get_pass
from vopt.zoo import moe_vrd

op = torch.ops.vopt.grouped_gemm
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def assert_close(got, want, dtype=torch.float32):
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = TOL[dtype] * (1 + want.float().abs().max().item() if want.numel() else 1)
    assert (got.float() - want.float()).abs().max().item() <= tol if want.numel() else True


def problem(counts, k, n, dtype=torch.float32, seed=0, bias=True, tail=0, device="cpu", outlier=False):
    """x sorted by expert with ``counts`` rows each (+ ``tail`` dropped rows), w [E, K, N], bias, offsets."""
    g = torch.Generator().manual_seed(seed)
    m = sum(counts) + tail
    x = torch.randn(m, k, generator=g)
    if outlier and m:
        x[0, 0] = 300.0   # one large activation: fp32 accumulation must keep the rest
    w = torch.randn(len(counts), k, n, generator=g) / k ** 0.5
    b = torch.randn(len(counts), n, generator=g) if bias else None
    offs = offsets_from_counts(torch.tensor(counts))
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return cast(x), cast(w), offs.to(device), cast(b)


def brute_force(x, w, offs, b):
    """Row by row, in float64: the definition of the op."""
    out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64)
    o = offs.tolist()
    for e in range(w.shape[0]):
        for r in range(o[e], o[e + 1]):
            out[r] = x[r].double() @ w[e].double() + (b[e].double() if b is not None else 0)
    return out


# Adversarial layouts: empty experts (first, middle, last), one expert with every row, a single row, odd sizes
# (not multiples of any tile), a dropped tail, one expert.
LAYOUTS = [
    ([5, 0, 9, 3], 0), ([0, 0, 17, 0], 0), ([1], 0), ([70, 1, 0, 66], 0), ([3, 4, 0, 2], 5), ([0, 0, 0], 4),
    ([33, 31, 2, 0, 1, 0, 7], 0),
]


# ---- the op: reference and validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("counts,tail", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_row_by_row_definition(counts, tail, bias):
    x, w, offs, b = problem(counts, 19, 13, bias=bias, tail=tail, outlier=True)
    got = reference(x, w, offs, b)
    want = brute_force(x, w, offs, b)
    assert (got.double() - want).abs().max().item() <= 1e-5 * (1 + want.abs().max().item())
    assert torch.equal(got[sum(counts):], torch.zeros_like(got[sum(counts):]))  # dropped rows are zeros


def test_op_does_not_mutate_inputs_and_fake_shape():
    x, w, offs, b = problem([3, 0, 4], 8, 6)
    copies = [t.clone() for t in (x, w, offs, b)]
    out = op(x, w, offs, b)
    assert all(torch.equal(a, c) for a, c in zip((x, w, offs, b), copies))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fw, fo, fb = (mode.from_tensor(t) for t in (x, w, offs, b))
        fake = op(fx, fw, fo, fb)
    assert tuple(fake.shape) == tuple(out.shape) == (7, 6) and fake.dtype == out.dtype


@pytest.mark.parametrize("args,exc,match", [
    (lambda x, w, o, b: (x.long(), w, o, b), TypeError, "x.dtype"),
    (lambda x, w, o, b: (x, w.half(), o, b), TypeError, "w.dtype"),
    (lambda x, w, o, b: (x, w, o.float(), b), TypeError, "offsets.dtype"),
    (lambda x, w, o, b: (x[None], w, o, b), ValueError, r"x must be \[M, K\]"),
    (lambda x, w, o, b: (x, w[0], o, b), ValueError, r"w must be \[E, K, N\]"),
    (lambda x, w, o, b: (x[:, :3], w, o, b), ValueError, "K must match"),
    (lambda x, w, o, b: (x, w, o[:-1], b), ValueError, r"offsets must be \[E \+ 1\]"),
    (lambda x, w, o, b: (x, w, o, b[:, :2]), ValueError, r"bias must be \[E, N\]"),
    (lambda x, w, o, b: (x, w, o, b.double()), TypeError, "bias.dtype"),
    (lambda x, w, o, b: (x, w[:0], o[:1], None), ValueError, "at least one expert"),
    (lambda x, w, o, b: (x, w, torch.tensor([0, 5, 2, 7]), b), ValueError, "non-decreasing"),
    (lambda x, w, o, b: (x, w, torch.tensor([0, 2, 3, 9]), b), ValueError, "non-decreasing"),
])
def test_bad_arguments_raise_typed_errors(args, exc, match, monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", "reference")
    x, w, offs, b = problem([3, 0, 4], 8, 6)
    with pytest.raises(exc, match=match):
        op(*args(x, w, offs, b))


def test_offsets_from_counts():
    assert offsets_from_counts(torch.tensor([2, 0, 3])).tolist() == [0, 2, 2, 5]
    assert offsets_from_counts(torch.tensor([2, 0, 3])).dtype == torch.int64


def test_op_exports_with_static_shapes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 8, 5))

        def forward(self, x, counts):
            return op(x, self.w, offsets_from_counts(counts), None) * 2

    m = M()
    x, counts = torch.randn(9, 8), torch.tensor([4, 0, 5])
    ep = torch.export.export(m, (x, counts))
    assert any(n.target is torch.ops.vopt.grouped_gemm.default for n in ep.graph.nodes)
    for c in ([4, 0, 5], [0, 9, 0], [1, 1, 1]):   # other splits, same export
        ct = torch.tensor(c)
        assert_close(ep.module()(x, ct), m(x, ct))


# ---- Triton (interpreter on CPU) ----------------------------------------------------------------------------------


def _interp():
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter path (a GPU is present)")
    pytest.importorskip("triton")
    from vopt.kernels import grouped_gemm as kernels

    if not kernels.is_interpreted():
        pytest.skip("vopt.kernels.grouped_gemm was imported without TRITON_INTERPRET=1")
    return kernels


@pytest.mark.parametrize("counts,tail", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(counts, tail, dtype, monkeypatch):
    _interp()
    monkeypatch.setenv("VOPT_BACKEND", "triton")
    x, w, offs, b = problem(counts, 40, 70, dtype=dtype, tail=tail, seed=len(counts), outlier=True)
    assert GROUPED_GEMM.select(x, w, offs, b).backend.value == "triton"
    got = op(x, w, offs, b)
    assert_close(got, reference(x, w, offs, b), dtype)
    assert_close(op(x, w, offs, None), reference(x, w, offs, None), dtype)


def test_triton_refuses_bf16_in_the_interpreter_and_falls_back():
    _interp()
    x, w, offs, b = problem([3, 2], 16, 16, dtype=torch.bfloat16)
    impl = GROUPED_GEMM.impls[GROUPED_GEMM.select(x, w, offs, b).backend]
    assert impl.backend.value == "reference"
    assert "bf16" in GROUPED_GEMM.impls[type(impl.backend)("triton")].refusal((x, w, offs, b), {})


def test_tile_table_covers_each_expert_and_clamps_bad_offsets():
    kernels = _interp()
    offs = torch.tensor([0, 70, 70, 75, 200])            # last offset past M = 100: clamped
    expert, row, end = kernels.tile_table(offs, 100, block_m=32)
    real = expert < 4
    assert expert.shape[0] == 4 + 4                       # ceil(100 / 32) + E
    assert expert[real].tolist() == [0, 0, 0, 2, 3]
    assert row[real].tolist() == [0, 32, 64, 70, 75]
    assert end[real].tolist() == [70, 70, 70, 75, 100]


# ---- routing ------------------------------------------------------------------------------------------------------


def brute_route(top_idx, num_experts, capacity):
    """Python definition: priority = rank-major then token; keep while the expert has room."""
    n, k = top_idx.shape
    used = [0] * num_experts
    kept = {}
    for j in range(k):
        for t in range(n):
            e = int(top_idx[t, j])
            if capacity is None or used[e] < capacity:
                used[e] += 1
                kept[(t, j)] = e
    return kept, used


@pytest.mark.parametrize("case", ["random", "one_expert", "ties", "capacity", "capacity0", "single"])
def test_route_against_brute_force(case):
    g = torch.Generator().manual_seed(1)
    n, k, e, cap = 37, 2, 6, None
    logits = torch.randn(n, e, generator=g)
    if case == "one_expert":
        logits[:, 3] += 100      # expert 3 first for everyone; experts never chosen stay empty
    if case == "ties":
        logits = torch.zeros(n, e)   # all tie: topk picks some order, routing must stay consistent
    if case == "capacity":
        cap = capacity_for(n, e, k, 0.5)
    if case == "capacity0":
        cap = 0
    if case == "single":
        n, logits = 1, logits[:1]
    w, idx = torch.softmax(logits, 1).topk(k, dim=1)
    r = route(idx, w, e, cap)
    kept, used = brute_route(idx, e, cap)
    assert r.counts.tolist() == used
    assert int(r.dropped) == n * k - len(kept)
    assert torch.all(r.expert[1:] >= r.expert[:-1])                     # sorted by expert, dropped (= E) last
    for t in range(n):
        for j in range(k):
            row = int(r.inverse[t, j])
            assert int(r.token[row]) == t
            if (t, j) in kept:
                assert int(r.expert[row]) == kept[(t, j)] and float(r.weight[row]) == float(w[t, j])
            else:
                assert int(r.expert[row]) == e and float(r.weight[row]) == 0.0
    for ex in range(e):                                                # stable: priority order within an expert
        seg = slice(int(r.offsets[ex]), int(r.offsets[ex + 1]))
        pri = [int(s) for s in (r.inverse.t().reshape(-1).argsort()[seg])]
        assert pri == sorted(pri)


def test_combine_is_gate_weighted_sum():
    g = torch.Generator().manual_seed(2)
    idx = torch.tensor([[0, 2], [2, 1], [1, 0]])
    w = torch.rand(3, 2, generator=g)
    r = route(idx, w, 3)
    y = torch.randn(6, 4, generator=g)
    out = combine(y, r)
    for t in range(3):
        want = sum(w[t, j] * y[r.inverse[t, j]] for j in range(2))
        assert torch.allclose(out[t], want, atol=1e-6)
    with pytest.raises(ValueError, match="y_sorted must be"):
        combine(y[:5], r)


def test_route_errors():
    idx = torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(TypeError, match="top_idx"):
        route(idx.float(), idx.float(), 3)
    with pytest.raises(ValueError, match="top_w"):
        route(idx, torch.zeros(4, 3), 3)
    with pytest.raises(ValueError, match="num_experts"):
        route(idx, idx.float(), 0)
    with pytest.raises(ValueError, match="capacity"):
        route(idx, idx.float(), 3, capacity=-1)
    with pytest.raises(ConfigError, match="capacity_factor"):
        capacity_for(4, 3, 2, 0.0)


# ---- the pass on the zoo's MoE-VRD ----------------------------------------------------------------------------------


def _leaves(out):
    return [t for t in tuple(out)[:4]]


@pytest.mark.parametrize("combine_mode", ["weighted", "unweighted"])
def test_pass_on_zoo_moe_vrd_equals_original(combine_mode):
    zm = moe_vrd.build("tiny", torch.device("cpu"), torch.float32, combine=combine_mode)
    model = zm.model.eval()     # zoo.build returns eval-mode models; the module-level build does not
    inputs = zm.example_inputs(pairs=24, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(**inputs)
    opt = vopt.optimize(model, passes=["moe_dispatch", "moe_detect"], example_inputs=inputs)
    with torch.no_grad():
        got = opt(**inputs)
    for a, b in zip(_leaves(want), _leaves(got)):
        assert_close(b, a)
    assert len(opt.report.rewritten("moe_dispatch")) == 1 and not opt.report.skipped()
    assert not [m for r in opt.report.pass_results if r.pass_name == "moe_detect" for m in r.matches]
    assert all(ev.exported for ev in opt.report.stage_events)           # still one exported graph
    # The caller's model is untouched.
    assert isinstance(model.experts, nn.ModuleList) and "forward" not in vars(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_moe_detect_reports_dense_dispatch_without_the_rewrite():
    zm = zoo.build("moe-vrd")
    opt = vopt.optimize(zm.model, passes=["moe_detect"], example_inputs=zm.example_inputs())
    (m,) = opt.report.skipped("moe_detect")
    assert "dense MoE dispatch: topk(3) over 4 expert logits" in m.what and "moe_dispatch" in m.reason


def test_rewritten_moe_vrd_routes_only_selected_experts_and_handles_empty_experts(monkeypatch):
    """Force every pair onto experts 1 and 3 (0 and 2 empty): outputs still equal the dense model."""
    zm = zoo.build("moe-vrd")
    model = zm.model
    with torch.no_grad():
        model.w_gate[:, 0] -= 50.0
        model.w_gate[:, 2] -= 50.0
    inputs = zm.example_inputs(pairs=10, seed=5)
    inputs["sf"] = inputs["sf"].abs()        # so the bias pushes every logit the same way
    with torch.no_grad():
        want = model(**inputs)
    work = copy.deepcopy(model)
    assert get_pass("moe_dispatch")().run_runtime(work, PassContext()).rewritten
    seen = []

    def spy(*a, **k):
        r = route(*a, **k)
        seen.append(r.counts.tolist())
        return r

    monkeypatch.setattr(vrd, "route", spy)
    with torch.no_grad():
        got = work(**inputs)
    assert seen == [[0, 10, 0, 10]]                                      # N * k = 20 expert rows, not N * E = 40
    for a, b in zip(_leaves(want), _leaves(got)):
        assert_close(b, a)


def test_capacity_drops_and_reports_on_moe_vrd():
    zm = zoo.build("moe-vrd")
    inputs = zm.example_inputs(pairs=32, seed=1)
    # Eager: the dropped count is recorded and equals the brute-force rule (capacity ceil(0.5 * 64 / 4) = 8).
    work = copy.deepcopy(zm.model)
    get_pass("moe_dispatch")(get_pass("moe_dispatch").config_cls(capacity_factor=0.5)).run_runtime(work, PassContext())
    with torch.no_grad():
        got = work(**inputs)
        want = zm.model(**inputs)
        top_idx = (inputs["sf"] @ zm.model.w_gate).topk(3, dim=1).indices[:, :2]
    kept, _ = brute_route(top_idx, 4, 8)
    assert work.vopt_moe_dropped == 64 - len(kept) > 0
    assert (got.predicate - want.predicate).abs().max().item() > 1e-3   # dropping changes the outputs (documented)
    assert torch.equal(got.gates, want.gates)                            # the gate itself is unchanged
    # Through vopt.optimize: still one exported graph, same numbers as the eager rewrite.
    cfg = vopt.OptimizeConfig(passes=["moe_dispatch"], pass_configs={"moe_dispatch": {"capacity_factor": 0.5}})
    opt = vopt.optimize(zm.model, cfg, example_inputs=inputs)
    assert all(ev.exported for ev in opt.report.stage_events)
    with torch.no_grad():
        for a, b in zip(_leaves(got), _leaves(opt(**inputs))):
            assert_close(b, a)


def test_training_mode_is_skipped_and_rewrite_raises_in_training():
    zm = zoo.build("moe-vrd")
    m = copy.deepcopy(zm.model).train()
    res = get_pass("moe_dispatch")().run_runtime(m, PassContext())
    assert res.skipped and "training mode" in res.skipped[0].reason
    m.eval()
    get_pass("moe_dispatch")().run_runtime(m, PassContext())
    m.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        m(**zm.example_inputs())


def test_config_errors():
    cls = get_pass("moe_dispatch").config_cls
    with pytest.raises(ConfigError, match="capacity_factor"):
        cls(capacity_factor=-1.0)
    with pytest.raises(ConfigError, match="probe_tokens"):
        cls(probe_tokens=0)
    with pytest.raises(ConfigError, match="verify"):
        cls(verify="yes")


# ---- the common block: gate + experts ModuleList -------------------------------------------------------------------


class SwiGLU(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.w2 = nn.Linear(h, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class LoopMoE(nn.Module):
    """The block as people write it: a gate, a loop over experts with ``nonzero`` (not exportable)."""

    def __init__(self, d=24, h=40, e=6, k=2, glu=False, scoring="softmax_topk", returns_logits=False):
        super().__init__()
        self.gate = nn.Linear(d, e, bias=False)
        if glu:
            self.experts = nn.ModuleList(SwiGLU(d, h) for _ in range(e))
        else:
            self.experts = nn.ModuleList(
                nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Dropout(0.1), nn.Linear(h, d)) for _ in range(e))
        self.top_k, self.scoring, self.returns_logits = k, scoring, returns_logits

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        logits = self.gate(x2)
        if self.scoring == "softmax_topk":
            vals, idx = logits.topk(self.top_k, dim=-1)
            w = torch.softmax(vals, dim=-1)
        elif self.scoring == "sigmoid":                   # a routing convention SparseMoE does not know
            w, idx = torch.sigmoid(logits).topk(self.top_k, dim=-1)
        else:
            w, idx = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
            if self.scoring == "softmax_all_renorm":
                w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x2)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                out.index_add_(0, tok, expert(x2[tok]) * w[tok, slot, None])
        out = out.reshape(shape)
        return (out, logits) if self.returns_logits else out


class Block(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.norm = nn.LayerNorm(24)
        self.moe = LoopMoE(**kw)

    def forward(self, x):
        out = self.moe(self.norm(x))
        return x + (out[0] if isinstance(out, tuple) else out)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(glu=True, scoring="softmax_all_renorm", returns_logits=True),
    dict(glu=True, scoring="softmax_all", k=3),
    dict(k=1, e=3),
], ids=["gelu-topk", "swiglu-renorm-logits", "swiglu-norenorm-k3", "top1"])
def test_pass_on_common_block(kw):
    torch.manual_seed(0)
    model = Block(**kw).eval()
    x = torch.randn(2, 9, 24)
    with torch.no_grad():
        want = model(x)
    opt = vopt.optimize(model, passes=["moe_dispatch"], example_inputs=(x,))
    with torch.no_grad():
        got = opt(x)
    assert_close(got, want)
    text = str(opt.report)
    assert "rewritten" in text and "moe" in text
    assert all(ev.exported for ev in opt.report.stage_events)      # the nonzero loop is gone: the block exports
    assert isinstance(model.moe, LoopMoE)                            # caller's model untouched


def test_common_block_as_root_and_empty_experts():
    torch.manual_seed(1)
    moe = LoopMoE(e=8, k=2).eval()
    with torch.no_grad():
        moe.gate.weight[2:] = -moe.gate.weight[2:].abs() * 0 - 1.0   # experts 2..7: constant low logits (empty)
        moe.gate.weight[:2] = moe.gate.weight[:2].abs()
    x = torch.rand(1, 11, 24)                                          # positive: experts 0 and 1 always win
    with torch.no_grad():
        want = moe(x)
    work = copy.deepcopy(moe)
    res = get_pass("moe_dispatch")().run_runtime(work, PassContext())
    assert res.rewritten and "forward" in vars(work)
    with torch.no_grad():
        assert_close(work(x), want)


def test_unknown_routing_is_skipped_with_reason():
    model = Block(scoring="sigmoid").eval()
    res = get_pass("moe_dispatch")().run_runtime(copy.deepcopy(model), PassContext())
    assert len(res.skipped) == 1 and "no scoring" in res.skipped[0].reason


def test_describe_rejections():
    m = LoopMoE()
    m.experts[3] = nn.Sequential(nn.Linear(24, 41), nn.GELU(), nn.Linear(41, 24))
    assert "differ" in describe(m)[1]
    m2 = LoopMoE()
    m2.top_k = 9
    assert "top-k" in describe(m2)[1]
    assert "experts" in describe(nn.Linear(2, 2))[1]


def test_capacity_on_common_block_matches_brute_force():
    torch.manual_seed(2)
    moe = LoopMoE(e=4, k=2).eval()
    x = torch.randn(16, 24)
    layout, _ = describe(moe)
    sparse = SparseMoE(moe, layout, capacity_factor=0.5).eval()
    with torch.no_grad():
        got = sparse(x)
        vals, idx = moe.gate(x).topk(2, dim=-1)
        w = torch.softmax(vals, -1)
        cap = capacity_for(16, 4, 2, 0.5)
        kept, _ = brute_route(idx, 4, cap)
        want = torch.zeros_like(x)
        for (t, j), e in kept.items():
            want[t] += w[t, j] * moe.experts[e](x[t:t + 1])[0]
    assert sparse.dropped == 32 - len(kept) > 0
    assert_close(got, want)


# ---- Triton compiles for the GPU targets (no GPU needed) -------------------------------------------------------------

COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vopt.kernels.grouped_gemm import _grouped_gemm_kernel as k
out = []
for dtype, arch, ieee in json.loads(sys.argv[1]):
    sig = {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
           "tile_expert_ptr": "*i32", "tile_row_ptr": "*i64", "tile_end_ptr": "*i64", "N": "i32", "K": "i32",
           "num_experts": "i32", "stride_xm": "i32", "stride_we": "i32", "stride_wk": "i32", "stride_om": "i32",
           "HAS_BIAS": "constexpr", "IEEE": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
           "BLOCK_K": "constexpr"}
    consts = {"HAS_BIAS": True, "IEEE": ieee, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
    src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(a),): v for a, v in consts.items()})
    res = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 2})
    out.append(res.asm["ptx"])
print(json.dumps(out))
"""

# (dtype, arch, IEEE fp32 dot, PTX that must appear): tensor-core MMA for 16-bit inputs (bf16 only compiles here:
# the interpreter cannot run it), plain fp32 FMAs (no TF32) for fp32.
COMPILE_CASES = [("fp16", 80, False, "mma.sync.aligned"), ("bf16", 80, False, "mma.sync.aligned"),
                 ("bf16", 90, False, "mma"), ("fp32", 80, True, "fma.rn.f32")]


def test_triton_kernel_compiles_for_gpu_targets():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cases = [c[:3] for c in COMPILE_CASES]
    res = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(cases)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ptxs = json.loads(res.stdout.strip().splitlines()[-1])
    for (dtype, arch, _ieee, needle), ptx in zip(COMPILE_CASES, ptxs):
        assert f".target sm_{arch}" in ptx and needle in ptx, (dtype, arch, needle)
    assert "tf32" not in ptxs[-1]


# ---- GPU ------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("counts,tail", [([5, 0, 9, 3], 0), ([0, 0, 300, 0], 7), ([129, 1, 0, 255, 64], 0),
                                         ([0, 0, 0], 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_backend_matches_reference(dtype, counts, tail, bias, monkeypatch):
    why = cuda_library.unavailable_reason()
    assert why is None, f"CUDA backend unavailable on a GPU machine: {why}"
    monkeypatch.setenv("VOPT_BACKEND", "cuda")
    x, w, offs, b = problem(counts, 64, 136, dtype=dtype, tail=tail, bias=bias, device="cuda")
    out = op(x, w, offs, b)
    torch.cuda.synchronize()
    assert_close(out.cpu(), reference(x.cpu(), w.cpu(), offs.cpu(), None if b is None else b.cpu()), dtype)


@pytest.mark.gpu
def test_cuda_backend_refuses_unaligned_and_auto_falls_back(monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", "auto")
    x, w, offs, b = problem([3, 4], 20, 12, dtype=torch.float16, device="cuda")   # K = 20: not a multiple of 8
    assert GROUPED_GEMM.select(x, w, offs, b).backend.value != "cuda"
    assert_close(op(x, w, offs, b).cpu(), reference(x.cpu(), w.cpu(), offs.cpu(), b.cpu()), torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_backend_on_gpu(dtype, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("VOPT_BACKEND", "triton")
    x, w, offs, b = problem([70, 0, 129, 1, 33], 96, 80, dtype=dtype, tail=9, device="cuda", outlier=True)
    assert_close(op(x, w, offs, b).cpu(), reference(x.cpu(), w.cpu(), offs.cpu(), b.cpu()), dtype)


@pytest.mark.gpu
def test_pass_on_zoo_moe_vrd_on_gpu():
    zm = zoo.build("moe-vrd", device="cuda")
    inputs = zm.example_inputs(pairs=64)
    with torch.no_grad():
        want = zm.model(**inputs)
    opt = vopt.optimize(zm.model, passes=["moe_dispatch"], example_inputs=inputs)
    with torch.no_grad():
        got = opt(**inputs)
    for a, b in zip(_leaves(want), _leaves(got)):
        assert_close(b.cpu(), a.cpu())

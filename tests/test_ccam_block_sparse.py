"""Video-CCAM mask object (vopt.ops.ccam_mask) and block-sparse masked attention (reference + Triton).

Measured (this file's shapes; Triton under TRITON_INTERPRET=1 on CPU):
* tiles skipped for the causal CCAM layout at the Video-CCAM shape (N 1024, T 16, P 729):
  43.7% with 128x64 tiles, 46.8% with 64x64 or 16x16 (ideal (T-1)/(2T) = 46.9%); T 32 and T 96 (more
  frames than training, ceil and floor): 43.7% (128x64).
* reference block-sparse vs dense masked reference (TRITON_CASES shapes): fp64 max 8.9e-16, fp32 max 3.0e-7.
* Triton vs reference: fp32 max 2.4e-7 (cos 1 - 8e-15); fp16 max 9.8e-4 (one fp16 ulp of the output, cos >= 0.99999996).
* PTX (triton 3.9, BLOCK_M 64, BLOCK_N 64, head_dim 64, fp16): sm_80 ``mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32``;
  sm_90 ``wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16`` (no mma.sync). fp32 inputs (IEEE dots) use no MMA.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vopt.dispatch import BackendPreference
from vopt.errors import ConfigError
from vopt.ops.attention import reference_attention
from vopt.ops.block_sparse_attention import (
    BLOCK_SPARSE_ATTENTION,
    block_mask_from_dense,
    block_sparse_attention,
    block_sparse_attention_reference,
)
from vopt.ops.ccam_mask import CCAMMask, compact_blocks
from vopt.zoo._ccam_projector import ccam_mask

triton = pytest.importorskip("triton")
from vopt.kernels import block_sparse_attention as bsk  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _qkv(b, h, nq, nk, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(nq), mk(nk), mk(nk)


def _cos(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


# ------------------------------------------------------------------ the mask object
MASK_SHAPES = [(1024, 16, 3), (1024, 96, 2), (1024, 1, 5), (64, 16, 7), (40, 24, 3), (7, 20, 2), (5, 5, 1), (1, 3, 4)]


@pytest.mark.parametrize("form", ["ceil", "floor"])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_dense_equals_zoo_mask(shape, form):
    n, t, p = shape
    m = CCAMMask(n, t, p, form)
    dense = m.dense()
    assert dense.dtype == torch.bool and dense.shape == (n, t * p)
    assert torch.equal(dense, ccam_mask(n, t, p, rule=form))
    assert torch.equal(m.frames_visible(), dense.view(n, t, p)[:, :, 0].sum(1))
    assert bool(dense[:, 0].all())                                        # no fully masked row
    g = m.last_frame()
    assert bool((g[1:] >= g[:-1]).all())                                  # block lower triangular
    if t == 1:
        assert bool(dense.all())
    if form == "ceil":
        assert int(g[-1]) == t - 1                                         # last query sees all frames


def test_ceil_floor_equal_when_frames_divide_queries_and_differ_otherwise():
    assert torch.equal(CCAMMask(1024, 16, 2, "ceil").dense(), CCAMMask(1024, 16, 2, "floor").dense())
    assert not torch.equal(CCAMMask(1024, 96, 2, "ceil").dense(), CCAMMask(1024, 96, 2, "floor").dense())


def test_mask_object_is_frozen_cached_and_validated():
    m = CCAMMask(64, 16, 4)
    assert m.layout(16, 32) is CCAMMask(64, 16, 4).layout(16, 32)         # cached per shape
    assert m.with_frames(48) == CCAMMask(64, 48, 4)
    with pytest.raises(Exception):
        m.frames = 3
    for bad in [dict(num_queries=0), dict(frames=-1), dict(tokens_per_frame=1.5), dict(form="round")]:
        with pytest.raises(ConfigError):
            CCAMMask(**{**dict(num_queries=4, frames=2, tokens_per_frame=2), **bad})


LAYOUT_CASES = [(1024, 16, 729, 128, 64), (40, 24, 3, 16, 32), (33, 5, 7, 16, 16), (7, 20, 2, 32, 16),
                (64, 16, 7, 32, 32), (100, 96, 3, 16, 64), (1, 1, 1, 16, 16)]


@pytest.mark.parametrize("form", ["ceil", "floor"])
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_block_mask_conservative_tight_and_full(case, form):
    n, t, p, bq, bk = case
    m = CCAMMask(n, t, p, form)
    lay = m.layout(bq, bk)
    dense = m.dense()
    nqb, nkb = -(-n // bq), -(-t * p // bk)
    assert lay.live.shape == lay.full.shape == (nqb, nkb)
    pad = torch.zeros(nqb * bq, nkb * bk, dtype=torch.bool)
    pad[:n, : t * p] = dense
    inr = torch.zeros_like(pad)
    inr[:n, : t * p] = True
    tiles, tin = pad.view(nqb, bq, nkb, bk), inr.view(nqb, bq, nkb, bk)
    any_vis = tiles.any(3).any(1)
    all_vis = (tiles | ~tin).all(3).all(1)
    # conservative: every visible element lies in a live tile; tight: every live tile has a visible element
    assert not bool((any_vis & ~lay.live).any()) and not bool((lay.live & ~any_vis).any())
    assert torch.equal(lay.full, all_vis & lay.live)
    live_b, full_b = block_mask_from_dense(dense, bq, bk)                 # the generic (dense) computation agrees
    assert torch.equal(live_b, lay.live) and torch.equal(full_b & live_b, lay.full)
    # compacted lists
    assert torch.equal(lay.kv_num.long(), lay.live.sum(1))
    for r in range(nqb):
        c = int(lay.kv_num[r])
        assert lay.kv_idx[r, :c].tolist() == torch.nonzero(lay.live[r]).flatten().tolist()
        assert lay.kv_full[r, :c].bool().tolist() == lay.full[r, lay.kv_idx[r, :c].long()].tolist()


def test_skipped_fraction_at_video_ccam_shape():
    """Measured: T=16: 43.7% skipped (128x64 tiles), 46.8% (64x64 and 16x16; ideal (T-1)/(2T) = 46.9%);
    T=96 (more frames than training): 43.7% (128x64), ceil and floor."""
    m16 = CCAMMask(1024, 16, 729)
    f = {(bq, bk): m16.skipped_fraction(bq, bk) for bq, bk in [(128, 64), (64, 64), (16, 16)]}
    assert 0.43 < f[(128, 64)] < 0.44 and 0.46 < f[(64, 64)] < 0.47
    ideal = (16 - 1) / (2 * 16)
    assert abs(f[(16, 16)] - ideal) < 0.01
    for form in ("ceil", "floor"):
        assert 0.43 < CCAMMask(1024, 96, 729, form).skipped_fraction(128, 64) < 0.45
    assert CCAMMask(1024, 1, 729).skipped_fraction(128, 64) == 0.0     # T = 1: full attention


def test_flex_block_mask():
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    m = CCAMMask(40, 5, 7, "floor")
    bm = m.to_flex_block_mask(block_size=16)
    assert isinstance(bm, fa.BlockMask)
    dense_blocks = bm.to_dense()[0, 0].bool()
    assert torch.equal(dense_blocks[: m.block_mask(16, 16).shape[0], : m.block_mask(16, 16).shape[1]], m.block_mask(16, 16))


# ------------------------------------------------------------------ reference block-sparse == dense masked
REF_CASES = [  # (Q, T, P, D, bq, bk, form)
    (64, 16, 4, 32, 16, 16, "ceil"),     # T | N (training-like)
    (64, 24, 3, 32, 16, 32, "ceil"),     # more frames than training, T does not divide N
    (64, 24, 3, 64, 32, 16, "floor"),
    (37, 7, 5, 32, 16, 16, "ceil"),      # ragged Q and K tails
    (37, 7, 5, 32, 32, 32, "floor"),
    (5, 9, 3, 16, 16, 16, "ceil"),       # T > N
]


@pytest.mark.parametrize("case", REF_CASES, ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_reference_block_sparse_equals_dense(case, dtype, tol):
    n, t, p, d, bq, bk, form = case
    m = CCAMMask(n, t, p, form)
    q, k, v = _qkv(2, 2, n, t * p, d, dtype)
    dense = m.dense()
    want = reference_attention(q, k, v, attn_mask=dense)
    got = block_sparse_attention_reference(q, k, v, m.block_mask(bq, bk), bq, bk, dense)
    assert got.dtype == dtype
    assert (got - want).abs().max().item() <= tol


def test_reference_block_mask_only_and_generic_masks():
    torch.manual_seed(1)
    q, k, v = _qkv(2, 3, 40, 50, 32)
    live = torch.rand(3, 4) < 0.5
    live[:, 0] = True
    expanded = live.repeat_interleave(16, 0)[:40].repeat_interleave(16, 1)[:, :50]
    got = block_sparse_attention_reference(q, k, v, live, 16, 16)       # no dense mask: live tiles fully visible
    assert (got - reference_attention(q, k, v, attn_mask=expanded)).abs().max() < 1e-12
    dense = torch.rand(2, 1, 40, 50) < 0.3                                 # per-batch mask, some rows empty
    dense[0, 0, 3] = False
    lv, _ = block_mask_from_dense(dense, 16, 16)
    got = block_sparse_attention_reference(q, k, v, lv, 16, 16, dense)
    want = reference_attention(q, k, v, attn_mask=dense)
    assert (got - want).abs().max() < 1e-12 and bool((got[0, :, 3] == 0).all())


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 70), t=st.integers(1, 20), p=st.integers(1, 6), d=st.sampled_from([32, 64]),
       bq=st.sampled_from([16, 32]), bk=st.sampled_from([16, 32]), form=st.sampled_from(["ceil", "floor"]),
       seed=st.integers(0, 1000))
def test_reference_property(n, t, p, d, bq, bk, form, seed):
    m = CCAMMask(n, t, p, form)
    dense = m.dense()
    assert torch.equal(dense, ccam_mask(n, t, p, rule=form))
    live, full = block_mask_from_dense(dense, bq, bk)
    assert torch.equal(live, m.block_mask(bq, bk)) and torch.equal(full & live, m.full_blocks(bq, bk))
    q, k, v = _qkv(1, 2, n, t * p, d, torch.float64, seed)
    got = block_sparse_attention_reference(q, k, v, m.block_mask(bq, bk), bq, bk, dense)
    assert (got - reference_attention(q, k, v, attn_mask=dense)).abs().max().item() <= 1e-10


def test_validation_errors():
    q, k, v = _qkv(1, 1, 20, 20, 16)
    with pytest.raises(ValueError, match="block_mask"):
        block_sparse_attention_reference(q, k, v, torch.ones(1, 1, dtype=torch.bool), 16, 16)
    with pytest.raises(ValueError, match="broadcast"):
        block_sparse_attention_reference(q, k, v, torch.ones(2, 2, dtype=torch.bool), 16, 16,
                                         torch.ones(3, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, H, N, D\]"):
        block_sparse_attention_reference(q[0], k, v, torch.ones(2, 2, dtype=torch.bool), 16, 16)


# ------------------------------------------------------------------ Triton (interpreter) vs reference
TRITON_CASES = [  # (B, H, Q, T, P, D, bq, bk, form)
    (1, 2, 64, 16, 4, 64, 16, 16, "ceil"),
    (1, 2, 64, 24, 3, 32, 32, 16, "floor"),
    (2, 1, 37, 7, 5, 32, 16, 32, "ceil"),
    (1, 1, 5, 9, 3, 16, 16, 16, "floor"),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3)])
def test_triton_matches_reference(case, dtype, tol):
    b, h, n, t, p, d, bq, bk, form = case
    m = CCAMMask(n, t, p, form)
    q, k, v = _qkv(b, h, n, t * p, d, dtype, seed=3)
    dense = m.dense()
    want = block_sparse_attention_reference(q, k, v, m.block_mask(bq, bk), bq, bk, dense)
    got = bsk.block_sparse_attention_triton(q, k, v, m.block_mask(bq, bk), bq, bk, dense)
    assert got.dtype == dtype and got.shape == want.shape
    diff = (got.double() - want.double()).abs().max().item()
    assert diff <= tol, diff
    assert _cos(got, want) >= 0.99999
    # the cached compacted layout gives the same result
    lay = m.layout(bq, bk)
    again = bsk.block_sparse_attention_triton(q, k, v, lay.live, bq, bk, dense,
                                              compacted=(lay.kv_num, lay.kv_idx, lay.kv_full))
    assert torch.equal(again, got)


def test_triton_generic_masks_strides_and_empty_rows():
    q, k, v = _qkv(2, 2, 40, 50, 32, torch.float32, seed=5)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)                    # non-contiguous [B, H, N, D] view
    dense = torch.rand(2, 1, 40, 50, generator=torch.Generator().manual_seed(0)) < 0.3
    dense[1, 0, 7] = False
    live, full = block_mask_from_dense(dense, 16, 16)
    got = bsk.block_sparse_attention_triton(q, k, v, live, 16, 16, dense)
    want = reference_attention(q, k, v, attn_mask=dense)
    assert (got - want).abs().max().item() <= 1e-5
    assert bool((got[1, :, 7] == 0).all())
    live2 = live.clone()
    live2[:, 0] = True
    got = bsk.block_sparse_attention_triton(q, k, v, live2, 16, 16)       # no element mask at all
    expanded = live2.repeat_interleave(16, 0)[:40].repeat_interleave(16, 1)[:, :50]
    assert (got - reference_attention(q, k, v, attn_mask=expanded)).abs().max().item() <= 1e-5


def test_unsupported_reason():
    q, k, v = _qkv(1, 1, 20, 20, 16, torch.float32)
    bm = torch.ones(2, 2, dtype=torch.bool)
    assert bsk.unsupported_reason(q, k, v, bm, 16, 16) is None
    assert "dtype" in bsk.unsupported_reason(q.bfloat16(), k.bfloat16(), v.bfloat16(), bm, 16, 16)
    assert "block sizes" in bsk.unsupported_reason(q, k, v, bm, 24, 16)
    assert "head_dim" in bsk.unsupported_reason(*_qkv(1, 1, 4, 4, 160, torch.float32), bm, 16, 16)
    assert "grouped" in bsk.unsupported_reason(q.expand(1, 2, 20, 16), k, v, bm, 16, 16)
    with pytest.raises(NotImplementedError):
        bsk.block_sparse_attention_triton(q, k, v, torch.ones(1, 2, dtype=torch.bool), 24, 16)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dispatch_and_custom_op(backend, monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", backend)
    m = CCAMMask(32, 4, 5)
    q, k, v = _qkv(1, 2, 32, 20, 32, torch.float32, seed=7)
    dense = m.dense()
    assert BLOCK_SPARSE_ATTENTION.select(q, k, v, m.block_mask(16, 16), 16, 16, dense, None).backend.value == backend
    got = torch.ops.vopt.block_sparse_attention(q, k, v, m.block_mask(16, 16), 16, 16, dense, None)
    assert (got - reference_attention(q, k, v, attn_mask=dense)).abs().max().item() <= 1e-5
    assert block_sparse_attention(q, k, v, m.block_mask(16, 16), 16, 16, dense).shape == (1, 2, 32, 32)


def test_dispatch_falls_back_for_bf16_and_float64(monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", BackendPreference.AUTO.value)
    q, k, v = _qkv(1, 1, 20, 20, 16, torch.float64)
    bm = torch.ones(2, 2, dtype=torch.bool)
    assert BLOCK_SPARSE_ATTENTION.select(q, k, v, bm, 16, 16, None, None).backend.value == "reference"
    assert BLOCK_SPARSE_ATTENTION.select(q.float(), k.float(), v.float(), bm, 16, 16, None, None).backend.value == "triton"


def test_compact_blocks():
    live = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    num, idx, full = compact_blocks(live, torch.tensor([[True, True, False]] * 3))
    assert num.tolist() == [2, 0, 1] and idx.tolist() == [[0, 2], [0, 0], [1, 0]] and full.tolist() == [[1, 0], [0, 0], [1, 0]]


# ------------------------------------------------------------------ compile for sm_80 / sm_90 (no GPU needed)
_COMPILE = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vopt.kernels.block_sparse_attention import _bsa_fwd_kernel as k
res = {}
for name, dt, ieee, arch, has_mask, has_prefix in json.loads(sys.argv[1]):
    sig = {n: "i32" for n in k.arg_names}
    sig.update(Q=dt, K=dt, V=dt, Out=dt, KvNum="*i32", KvIdx="*i32", KvFull="*i8", Mask="*u8", Prefix="*i32",
               qk_scale="fp32")
    consts = dict(HAS_MASK=has_mask, HAS_PREFIX=has_prefix, IEEE=ieee, BLOCK_M=64, BLOCK_N=64, D_PAD=64, DV_PAD=64)
    sig.update({c: "constexpr" for c in consts})
    src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(c),): v for c, v in consts.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 2}).asm["ptx"]
    res[name] = {"target": f".target sm_{arch}" in ptx, "mma": sorted(set(re.findall(r"w?g?mma\.[\w.]+", ptx)))}
print(json.dumps(res))
"""


def test_kernel_compiles_for_sm80_sm90():
    """fp16: sm_80 -> mma.sync m16n8k16 f32.f16.f16.f32; sm_90 -> wgmma m64n64k16 f32.f16.f16 (Triton 3.9 emits
    wgmma for BLOCK_M 64, no mma.sync; also with the key-prefix mask). fp32 (IEEE dots) on sm_80 -> no MMA
    instruction (FMA loop)."""
    jobs = [("f16_80", "*fp16", False, 80, True, False), ("f16_90", "*fp16", False, 90, True, False),
            ("f32_80", "*fp32", True, 80, True, False), ("f16_90_prefix", "*fp16", False, 90, False, True)]
    env = {kk: vv for kk, vv in os.environ.items() if kk != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(jobs)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(x["target"] for x in res.values())
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in res["f16_80"]["mma"]
    assert "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16" in res["f16_90"]["mma"]
    assert not any(x.startswith("mma.sync") for x in res["f16_90"]["mma"])
    assert res["f32_80"]["mma"] == []
    assert "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16" in res["f16_90_prefix"]["mma"]


# ------------------------------------------------------------------ causality, Triton property, FlexAttention
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_causality_later_frames_do_not_change_earlier_queries(impl):
    """Perturbing frames > f leaves every query with g(i) <= f unchanged (bit for bit)."""
    n, t, p = 48, 6, 5
    m = CCAMMask(n, t, p, "floor")
    q, k, v = _qkv(1, 2, n, t * p, 32, torch.float32, seed=11)
    f = 2
    k2, v2 = k.clone(), v.clone()
    k2[:, :, (f + 1) * p:] += 3.0
    v2[:, :, (f + 1) * p:] -= 5.0
    run = block_sparse_attention_reference if impl == "reference" else bsk.block_sparse_attention_triton
    a = run(q, k, v, m.block_mask(16, 16), 16, 16, m.dense())
    b = run(q, k2, v2, m.block_mask(16, 16), 16, 16, m.dense())
    early = m.last_frame() <= f
    assert int(early.sum()) > 0 and not bool(early.all())
    assert torch.equal(a[:, :, early], b[:, :, early])
    assert not torch.equal(a[:, :, ~early], b[:, :, ~early])


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 48), t=st.integers(1, 12), p=st.integers(1, 5), d=st.sampled_from([32, 64]),
       bq=st.sampled_from([16, 32]), bk=st.sampled_from([16, 32]), form=st.sampled_from(["ceil", "floor"]),
       fp16=st.booleans(), seed=st.integers(0, 1000))
def test_triton_property(n, t, p, d, bq, bk, form, fp16, seed):
    dtype = torch.float16 if fp16 else torch.float32
    m = CCAMMask(n, t, p, form)
    q, k, v = _qkv(1, 1, n, t * p, d, dtype, seed)
    dense = m.dense()
    want = block_sparse_attention_reference(q, k, v, m.block_mask(bq, bk), bq, bk, dense)
    got = bsk.block_sparse_attention_triton(q, k, v, m.block_mask(bq, bk), bq, bk, dense)
    assert (got.double() - want.double()).abs().max().item() <= (2e-3 if fp16 else 1e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_with_ccam_block_mask_matches_dense():
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    m = CCAMMask(64, 8, 16, "ceil")
    q, k, v = _qkv(1, 2, 64, 128, 32, torch.float32, seed=2)
    try:
        got = fa.flex_attention(q, k, v, block_mask=m.to_flex_block_mask(block_size=32))
    except Exception as exc:  # eager FlexAttention on CPU is not available in every torch build
        pytest.skip(f"flex_attention does not run here: {type(exc).__name__}: {exc}")
    assert (got - reference_attention(q, k, v, attn_mask=m.dense())).abs().max().item() <= 1e-5


def test_custom_op_schema_and_fake():
    m = CCAMMask(32, 4, 5)
    q, k, v = _qkv(1, 2, 32, 20, 32, torch.float32)
    res = torch.library.opcheck(torch.ops.vopt.block_sparse_attention.default,
                                (q, k, v, m.block_mask(16, 16), 16, 16, m.dense(), None),
                                test_utils=("test_schema", "test_faketensor"))
    assert set(res.values()) == {"SUCCESS"}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3)])
@pytest.mark.parametrize("case", [(64, 24, 3, 16, 32, "ceil"), (37, 7, 5, 32, 16, "floor")], ids=str)
def test_triton_key_prefix_mask(case, dtype, tol):
    """The CCAM mask as per-row key-prefix lengths (no [Q, K] tensor) with the cached layout's full-tile flags."""
    n, t, p, bq, bk, form = case
    m = CCAMMask(n, t, p, form)
    lay = m.layout(bq, bk)
    q, k, v = _qkv(1, 2, n, t * p, 32, dtype, seed=4)
    want = block_sparse_attention_reference(q, k, v, lay.live, bq, bk, m.dense())
    got = bsk.block_sparse_attention_triton(q, k, v, lay.live, bq, bk, key_prefix=m.keys_visible(),
                                            compacted=(lay.kv_num, lay.kv_idx, lay.kv_full))
    assert (got.double() - want.double()).abs().max().item() <= tol
    got2 = bsk.block_sparse_attention_triton(q, k, v, lay.live, bq, bk, key_prefix=m.keys_visible())
    assert torch.equal(got, got2)

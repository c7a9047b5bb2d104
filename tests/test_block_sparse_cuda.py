"""The CUDA backend of vopt::block_sparse_attention (cuda/block_sparse_attn.cu, vopt/ops/block_sparse_cuda.py).

Without a GPU (CI): the kernel-tile classification against a brute-force expansion of the masks, the C ABI (struct
layout, argument checks before any CUDA call), and the SASS (fp16/bf16 tensor-core MMAs, no local memory).
With a GPU (``-m gpu``): results against the exact reference for CCAM masks, random block masks of any block
size, dense masks (broadcast or not), rows that see nothing, head dims 64/72/128, fp16 and bf16.
"""
from __future__ import annotations

import ctypes
import re

import pytest
import torch
import torch.nn.functional as F

from _cuda_build import assert_ctypes_matches_c, sass_functions
from vopt import cuda_library
from vopt.ops import block_sparse_attention as bsa
from vopt.ops import block_sparse_cuda
from vopt.ops.ccam_mask import CCAMMask

CUDA_INVALID_VALUE = 1


pytestmark = pytest.mark.usefixtures("fresh_cuda_loader")



# ---- tile classification (pure host code) ----------------------------------------------------------------------


def _brute_tiles(block_mask, lq, lk, bq, bk, dense, tile=64):
    rows = torch.arange(lq) // bq
    cols = torch.arange(lk) // bk
    vis = block_mask[rows][:, cols]
    if dense is not None:
        vis = vis & dense
    nqt, nkt = -(-lq // tile), -(-lk // tile)
    out = torch.zeros(nqt, nkt, dtype=torch.uint8)
    for i in range(nqt):
        for j in range(nkt):
            t = vis[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile]
            blk = block_mask[rows[i * tile:(i + 1) * tile]][:, cols[j * tile:(j + 1) * tile]]
            if not blk.any():
                out[i, j] = 0
            elif dense is None and t.all():
                out[i, j] = 2
            else:
                out[i, j] = 1
    return out


@pytest.mark.parametrize("lq, lk, bq, bk", [(200, 300, 16, 50), (64, 64, 64, 64), (130, 1000, 128, 729),
                                             (1, 77, 7, 13), (300, 129, 100, 3)])
@pytest.mark.parametrize("with_dense", [False, True])
def test_kernel_tiles_match_a_brute_force_expansion(lq, lk, bq, bk, with_dense):
    g = torch.Generator().manual_seed(lq + lk)
    bm = torch.rand(-(-lq // bq), -(-lk // bk), generator=g) < 0.5
    dense = (torch.rand(lq, lk, generator=g) < 0.8) if with_dense else None
    got = block_sparse_cuda.kernel_tiles(bm, lq, lk, bq, bk, with_dense)
    assert torch.equal(got, _brute_tiles(bm, lq, lk, bq, bk, dense))


def test_ccam_mask_has_dead_and_full_kernel_tiles():
    m = CCAMMask(1024, 16, 729)
    bm = m.block_mask(64, 729)
    tiles = block_sparse_cuda.kernel_tiles(bm, 1024, m.num_keys, 64, 729, False)
    assert (tiles == 0).any() and (tiles == 2).any()
    assert 0.3 < float((tiles == 0).float().mean()) < 0.7  # the causal mask kills about half the tiles


# ---- C ABI ----------------------------------------------------------------------------------------------------


def test_params_struct_matches_the_c_layout(built_lib, tmp_path):
    lib = cuda_library.load()
    assert lib.call("vopt_block_sparse_attn_params_size") == ctypes.sizeof(cuda_library.BlockSparseAttnParams)
    assert_ctypes_matches_c("vopt_block_sparse_attn_params", cuda_library.BlockSparseAttnParams, tmp_path)


def _params(**over):
    p = cuda_library.BlockSparseAttnParams()
    for name in ("q", "k", "v", "out", "tiles", "block_mask"):
        setattr(p, name, 256)
    p.batch, p.heads, p.len_q, p.len_k, p.head_dim, p.value_dim, p.block_q, p.block_k = 1, 2, 100, 300, 64, 64, 16, 50
    p.q_sl = p.k_sl = p.v_sl = p.o_sl = 64
    p.q_sh, p.k_sh, p.v_sh, p.o_sh = 6400, 19200, 19200, 6400
    p.q_sb, p.k_sb, p.v_sb, p.o_sb = 12800, 38400, 38400, 12800
    p.scale = 0.125
    for name, value in over.items():
        setattr(p, name, value)
    return p


@pytest.mark.parametrize("over, word", [({"head_dim": 12}, "head_dim"), ({"value_dim": 136}, "value_dim"),
                                        ({"q": None}, "q"), ({"dtype": 2}, "dtype"), ({"block_k": 0}, "block_k"),
                                        ({"len_q": 0}, "len_q")])
def test_bad_params_are_refused_before_any_cuda_call(built_lib, over, word):
    lib = cuda_library.load()
    status = lib.call("vopt_block_sparse_attn_fwd", ctypes.byref(_params(**over)), None)
    assert status == CUDA_INVALID_VALUE
    assert word in lib.last_error_message()


def test_misaligned_rows_are_refused(built_lib):
    lib = cuda_library.load()
    status = lib.call("vopt_block_sparse_attn_fwd", ctypes.byref(_params(k_sl=60)), None)
    assert status != 0 and lib.last_error_message()


@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90a"])
def test_kernels_use_fp16_and_bf16_tensor_cores_without_local_memory(built_lib, arch):
    funcs = sass_functions(built_lib, arch, "block_sparse")
    assert funcs, f"no block_sparse kernel in the {arch} SASS"
    text = "\n".join(funcs.values())
    assert re.search(r"HMMA\.16816\.F32(?!\.BF16)", text), "fp16 m16n8k16 missing"
    assert "HMMA.16816.F32.BF16" in text, "bf16 m16n8k16 missing"
    assert not re.search(r"\b(STL|LDL)\b", text), "local-memory traffic (spills)"


def test_cuda_backend_refuses_on_cpu_with_a_reason():
    q = torch.randn(1, 1, 8, 64, dtype=torch.float16)
    bm = torch.ones(1, 1, dtype=torch.bool)
    assert block_sparse_cuda.unsupported_reason(q, q, q, bm, 8, 8)


# ---- GPU --------------------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu


def _qkv(b, h, lq, lk, d, dv, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(*s, generator=g).to("cuda", dtype) for s in ((b, h, lq, d), (b, h, lk, d), (b, h, lk, dv)))


def _check(out, q, k, v, bm, bq, bk, dense, scale=None):
    ref = bsa.block_sparse_attention_reference(q.float(), k.float(), v.float(), bm, bq, bk, dense, scale)
    o, r = out.double().flatten(), ref.double().flatten()
    cos = float(F.cosine_similarity(o, r, dim=0))
    rel = float((o - r).abs().sum() / r.abs().sum().clamp_min(1e-30))
    # Exact attention; the only rounding is P (and the output) in the input dtype: ~2^-11 (fp16) / 2^-8 (bf16).
    tol = 3e-3 if q.dtype == torch.float16 else 1.5e-2
    assert cos >= 0.9999 and rel <= tol, (cos, rel)
    dead_rows = ~(ref != 0).any(-1)
    assert not out[dead_rows].any(), "rows that see no key must be 0"


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d, dv", [(64, 64), (72, 40), (128, 128)])
def test_ccam_mask_matches_reference(dtype, d, dv):
    m = CCAMMask(256, 4, 97)
    q, k, v = _qkv(2, 3, 256, m.num_keys, d, dv, dtype, seed=d)
    bm = m.block_mask(32, 97)
    dense = m.dense("cuda")
    out = block_sparse_cuda.block_sparse_attention_cuda(q, k, v, bm, 32, 97, dense)
    _check(out, q, k, v, bm, 32, 97, dense)


@gpu
@pytest.mark.parametrize("bq, bk, dense_shape", [(16, 50, None), (100, 3, "qk"), (64, 64, "b1qk"), (7, 200, None)])
def test_random_block_masks_match_reference(bq, bk, dense_shape):
    lq, lk = 300, 700
    q, k, v = _qkv(2, 2, lq, lk, 64, 64, torch.float16, seed=bq + bk)
    g = torch.Generator().manual_seed(bq * bk)
    bm = torch.rand(-(-lq // bq), -(-lk // bk), generator=g) < 0.4
    bm[0] = False  # some query blocks see nothing at all
    dense = None
    if dense_shape == "qk":
        dense = (torch.rand(lq, lk, generator=g) < 0.7).cuda()
    elif dense_shape == "b1qk":
        dense = (torch.rand(2, 1, lq, lk, generator=g) < 0.7).cuda()
    out = block_sparse_cuda.block_sparse_attention_cuda(q, k, v, bm, bq, bk, dense, 0.2)
    _check(out, q, k, v, bm, bq, bk, dense, 0.2)


@gpu
def test_unaligned_inputs_are_copied_not_modified_and_dispatch_picks_cuda():
    lq, lk = 130, 200
    base = torch.randn(1, 2, lk, 72 + 1, device="cuda", dtype=torch.float16)
    k = base[..., 1:]  # rows not 16-byte aligned
    q = torch.randn(1, 2, lq, 72, device="cuda", dtype=torch.float16)
    v = torch.randn(1, 2, lk, 72, device="cuda", dtype=torch.float16)
    before = base.clone()
    bm = torch.ones(-(-lq // 64), -(-lk // 64), dtype=torch.bool)
    assert bsa.BLOCK_SPARSE_ATTENTION.select(q, k, v, bm, 64, 64, None, None).backend.value == "cuda"
    out = torch.ops.vopt.block_sparse_attention(q, k, v, bm, 64, 64, None, None)
    assert torch.equal(base, before)
    _check(out, q, k, v, bm, 64, 64, None)

"""The CUDA packed-decode kernel (cuda/vidkv_decode.cu, vopt/kvcache/decode_cuda.py).

Without a GPU (CI): the C ABI (struct layout, argument checks before any CUDA call) and the SASS (no local memory);
its device code also runs emulated on the CPU against the reference in tests/test_vidkv_decode_emulated.py.
With a GPU (``-m gpu``): every cache layout (KIVI-2, VidKV reference / recommended / per-token values / trits /
FFT only), GQA, windows and tails, one and several token splits, against the torch reference; the cache's fused
decode path runs it.
"""
from __future__ import annotations

import ctypes
import re

import pytest
import torch

from _cuda_build import assert_ctypes_matches_c, sass_functions
from vopt import cuda_library
from vopt.kvcache import VidKVConfig, kivi_config, quantize_keys, quantize_values
from vopt.kvcache import decode_cuda
from vopt.kvcache.decode_attention import packed_decode_attention

CUDA_INVALID_VALUE = 1


pytestmark = pytest.mark.usefixtures("fresh_cuda_loader")



def test_params_struct_matches_the_c_layout(built_lib, tmp_path):
    lib = cuda_library.load()
    assert lib.call("vopt_vidkv_decode_params_size") == ctypes.sizeof(cuda_library.VidKVDecodeParams)
    assert_ctypes_matches_c("vopt_vidkv_decode_params", cuda_library.VidKVDecodeParams, tmp_path)


def _params(**over):
    p = cuda_library.VidKVDecodeParams()
    p.q, p.k_res, p.v_words, p.v_scale, p.v_zero, p.v_res, p.out = 256, 256, 256, 256, 256, 256, 256
    p.ka_words, p.ka_scale, p.ka_zero, p.qa = 256, 256, 256, 256
    p.bh, p.m, p.d, p.dv, p.ka, p.kb, p.tqk, p.tqv, p.n, p.gk, p.gv = 2, 4, 64, 64, 64, 0, 64, 64, 70, 32, 32
    p.splits, p.qk_scale, p.kb_pm, p.v_per_token, p.v_codec, p.v_has_scale = 1, 0.18, 1, 1, 0, 1
    for name, value in over.items():
        setattr(p, name, value)
    return p


@pytest.mark.parametrize("over, word", [({"m": 129}, "m="), ({"d": 300}, "d="), ({"meta_dtype": 3}, "meta_dtype"),
                                        ({"v_codec": 5}, "v_codec"), ({"splits": 0}, "splits"), ({"q": None}, "q"),
                                        ({"splits": 2}, "workspace"), ({"gk": 0}, "gk")])
def test_bad_params_are_refused_before_any_cuda_call(built_lib, over, word):
    lib = cuda_library.load()
    status = lib.call("vopt_vidkv_decode_fwd", ctypes.byref(_params(**over)), None)
    assert status == CUDA_INVALID_VALUE
    assert word in lib.last_error_message(), lib.last_error_message()


def test_workspace_size_grows_with_splits(built_lib):
    lib = cuda_library.load()
    sizes = []
    for splits in (1, 4):
        out = ctypes.c_int64(-1)
        assert lib.call("vopt_vidkv_decode_workspace_bytes", ctypes.byref(_params(splits=splits)),
                        ctypes.byref(out)) == 0
        sizes.append(out.value)
    assert sizes[0] == 0 and sizes[1] >= 4 * 2 * 4 * (64 + 2) * 4


@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90a"])
def test_no_local_memory(built_lib, arch):
    funcs = sass_functions(built_lib, arch, "vidkv")
    assert funcs, f"no vidkv kernel in the {arch} SASS"
    assert not re.search(r"\b(STL|LDL)\b", "\n".join(funcs.values())), "local-memory traffic (spills)"


def test_refuses_on_cpu_with_a_reason():
    q = torch.randn(1, 2, 1, 64)
    k = torch.randn(1, 2, 40, 64)
    cfg = kivi_config()
    why = decode_cuda.unsupported_reason(q, quantize_keys(k, cfg), quantize_values(k, cfg))
    assert why


# ---- GPU --------------------------------------------------------------------------------------------------------

CFGS = {
    "kivi": lambda: kivi_config(),
    "kivi_g8_bf16": lambda: kivi_config(group_size=8, metadata_dtype="bfloat16"),
    "recommended": lambda: VidKVConfig(),
    "reference": lambda: VidKVConfig(mode="reference"),
    "rec_value_token": lambda: VidKVConfig(value_axis="token"),
    "rec_trit_2bit": lambda: VidKVConfig(trit_packing="2bit"),
    "rec_no_value_scale": lambda: VidKVConfig(value_scale=False),
    "rec_fft_only_fp32": lambda: VidKVConfig(anomalous_fraction=0.0, metadata_dtype="float32"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CFGS))
@pytest.mark.parametrize("splits", [1, 3])
def test_matches_reference(name, splits):
    g = torch.Generator().manual_seed(len(name) + splits)
    b, hkv, grp, lq, t, w, d = 2, 2, 3, 2, 700, 9, 64
    k = torch.randn(b, hkv, t + w, d, generator=g)
    k[..., [3, 17]] *= 20.0  # anomalous channels
    v = torch.randn(b, hkv, t + w, d, generator=g)
    q = torch.randn(b, hkv * grp, lq, d, generator=g)
    cfg = CFGS[name]()
    pk, pv = quantize_keys(k[:, :, :t].cuda(), cfg), quantize_values(v[:, :, :t].cuda(), cfg)
    wk, wv = k[:, :, t:].cuda(), v[:, :, t:].cuda()
    qc = q.cuda().half()
    assert decode_cuda.unsupported_reason(qc, pk, pv, wk, wv, True) is None
    out = decode_cuda.packed_decode_attention_cuda(qc, pk, pv, wk, wv, enable_gqa=True, splits=splits)
    ref = packed_decode_attention(qc.float(), pk, pv, wk, wv, enable_gqa=True)
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0)
    # K, V and P are rounded to fp16 for the products (as in the Triton kernel): ~1e-3 of the output range.
    assert cos >= 0.99999
    assert (out.float() - ref).abs().max() <= 2e-3 * max(1.0, ref.abs().max().item())

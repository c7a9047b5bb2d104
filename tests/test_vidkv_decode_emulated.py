"""cuda/vidkv_decode.cu's device code run on the CPU (tests/cuda_emu/vidkv_decode_emu.cpp) against the reference.

The fused packed-decode kernels (decode + flash-decoding merge) are compiled unchanged as host C++ (one std::thread
per CUDA thread, barriers for __syncthreads and warp shuffles) and run on operands prepared by
:func:`vopt.kvcache.fused_decode_args.fused_decode_args` from caches built with the real quantizers: KIVI-2, the
VidKV recommended and reference modes, per-token and per-channel values, base-3 and 2-bit trit codecs, no value
scale, FFT-only keys, GQA, windows and key tails, caches shorter than a group, group sizes that are / are not
multiples of 16 and 32, fp16 / bf16 / fp32 metadata, more than 32 query rows, splits 1 and 3. With one split it
also matches the Triton kernel (kernels/vidkv_decode.py, interpreter) to fp32 summation order.

Oracle: :func:`vopt.kvcache.decode_attention.packed_decode_attention` (fp32). Tolerance (as for the Triton kernel
in tests/test_vidkv_decode.py): cosine >= 0.99999 and max |diff| <= 2e-3 * max(1, max |ref|). The kernel rounds the
dequantized K and V and the softmax P to fp16 before their products (the reference does not) and sums in another
fp32 order; with splits > 1, P is rounded relative to each split's own running max. Measured (CPU, seeds below):
max |diff| / max(1, max |ref|) 9e-5 .. 1.5e-3 (the largest: VidKV recommended with outlier channels, logits ~1e2),
1 - cos <= 2.7e-7, splits 1 and 3 alike. The GPU run of the same kernel must agree with this emulation to fp32
summation order (exp2f is the MUFU approximation there).
"""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest
import torch

from _cuda_build import ROOT, build_emulated
from test_vidkv_decode import _inputs as decode_inputs
from vopt import cuda_library
from vopt.kvcache import VidKVConfig, kivi_config, quantize_keys, quantize_values
from vopt.kvcache.decode_attention import packed_decode_attention
from vopt.kvcache.fused_decode_args import fused_decode_args

SOURCE = ROOT / "cuda" / "vidkv_decode.cu"
HARNESS = Path(__file__).resolve().parent / "cuda_emu" / "vidkv_decode_emu.cpp"
F = torch.nn.functional
Params = cuda_library.VidKVDecodeParams  # the ABI struct (its C layout is tested in test_vidkv_decode_cuda.py)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    so = build_emulated(SOURCE, HARNESS, tmp_path_factory.mktemp("vidkv-decode-emu"),
                        "\n// ---- device code ----\nnamespace {\n")
    assert not re.search(r"extern\s+__shared__", SOURCE.read_text()), "dynamic shared memory: update the harness"
    so.emu_vidkv_params_size.restype = ctypes.c_int64
    so.emu_vidkv_decode.argtypes = [ctypes.POINTER(Params)]
    assert so.emu_vidkv_params_size() == ctypes.sizeof(Params), "Params differs from vopt_vidkv_decode_params"
    return so


_META = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def _run(so, a, splits):
    keep = []

    def ptr(t):
        if t is None:
            return None
        t = t.contiguous()
        keep.append(t)
        return t.data_ptr()

    metas = {t.dtype for t in (a.ka_scale, a.ka_zero, a.kb_scale, a.kb_zero, a.v_scale, a.v_zero) if t is not None}
    assert len(metas) <= 1, metas
    out = torch.full((a.bh, a.m, a.dv), float("nan"))  # garbage: every element must be written
    ws = torch.full((a.bh * splits * a.m * (a.dv + 2),), float("nan")) if splits > 1 else None
    p = Params(q=ptr(a.q), qa=ptr(a.qa), qb=ptr(a.qb), ka_words=ptr(a.ka_words), ka_scale=ptr(a.ka_scale),
               ka_zero=ptr(a.ka_zero), kb_words=ptr(a.kb_words), kb_scale=ptr(a.kb_scale), kb_zero=ptr(a.kb_zero),
               k_res=ptr(a.k_res), v_words=ptr(a.v_words), v_scale=ptr(a.v_scale), v_zero=ptr(a.v_zero),
               v_res=ptr(a.v_res), out=ptr(out), workspace=ptr(ws), bh=a.bh, m=a.m, d=a.d, dv=a.dv, ka=a.ka, kb=a.kb,
               tqk=a.tqk, tqv=a.tqv, n=a.n, gk=a.gk, gv=a.gv, splits=splits, qk_scale=a.qk_scale,
               meta_dtype=_META[metas.pop()] if metas else 0, kb_pm=int(a.kb_pm), v_per_token=int(a.v_per_token),
               v_codec=a.v_codec, v_has_scale=int(a.v_has_scale))
    so.emu_vidkv_decode(ctypes.byref(p))
    return out


CASES = {  # name: (config, shape)
    "kivi_gqa_tail_window": (lambda: kivi_config(), dict(Lq=1, g=2, T=77, W=5)),
    "kivi_g8_d40_straddle": (lambda: kivi_config(group_size=8), dict(D=40, T=45, W=3, outliers=True)),
    "kivi_shorter_than_group": (lambda: kivi_config(), dict(T=20, W=7)),
    "kivi_bf16_meta": (lambda: kivi_config(metadata_dtype="bfloat16"), dict(T=64, W=2)),
    "vidkv_rec_outliers_lq4": (lambda: VidKVConfig(), dict(Lq=4, outliers=True)),
    "vidkv_reference": (lambda: VidKVConfig(mode="reference"), dict(Lq=4, outliers=True)),
    "vidkv_value_token": (lambda: VidKVConfig(value_axis="token"), dict(Lq=2, outliers=True)),
    "vidkv_value_int2": (lambda: VidKVConfig(value_codec="int2"), dict(Lq=2)),
    "vidkv_trit_2bit": (lambda: VidKVConfig(trit_packing="2bit"), dict(Lq=2, outliers=True)),
    "vidkv_no_value_scale": (lambda: VidKVConfig(value_scale=False), dict(Lq=1)),
    "vidkv_fft_only": (lambda: VidKVConfig(anomalous_fraction=0.0), dict(Lq=1, outliers=True)),
    "vidkv_group24_fp32_meta": (lambda: VidKVConfig(key_group_size=24, value_group_size=24, metadata_dtype="float32"),
                                dict(T=80, W=3)),
    "vidkv_no_residual": (lambda: VidKVConfig(), dict(T=64, W=0)),   # k_res = v_res = NULL
    "vidkv_ref_40_rows_d96": (lambda: VidKVConfig(mode="reference"), dict(g=8, Lq=5, D=96, T=40, W=2, B=1, Hkv=1)),
}


def _case(name):
    cfg_fn, shape = CASES[name]
    q, k, v, wk, wv = decode_inputs(seed=len(name), **{"B": 1, "Lq": 1, **shape})
    cfg = cfg_fn()
    pk, pv = quantize_keys(k, cfg), quantize_values(v, cfg)
    wk, wv = (wk, wv) if wk.shape[2] else (None, None)
    return q, pk, pv, wk, wv, q.shape[1] != pk.shape[1]


@pytest.mark.parametrize("name", list(CASES))
def test_emulated_kernel_matches_reference(emu, name):
    q, pk, pv, wk, wv, gqa = _case(name)
    ref = packed_decode_attention(q, pk, pv, wk, wv, enable_gqa=gqa).float()
    a = fused_decode_args(q, pk, pv, wk, wv)
    for splits in (1, 3):
        out = _run(emu, a, splits).reshape(a.out_shape)
        assert torch.isfinite(out).all(), f"splits={splits}: unwritten or non-finite outputs"
        cos = F.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0).item()
        err = (out - ref).abs().max().item()
        assert cos >= 0.99999 and err <= 2e-3 * max(1.0, ref.abs().max().item()), (splits, cos, err)


@pytest.mark.parametrize("name", list(CASES))
def test_emulated_kernel_matches_triton_kernel_tightly(emu, name):
    """With one split the CUDA kernel does the Triton kernel's arithmetic (the same 32-token tiles, running max,
    fp16 roundings of K, V and P): only the fp32 summation order differs, and it can flip an fp16 rounding of P.
    Measured max |diff| / max(1, max |out|) <= 8.5e-7 over these cases (CPU, triton interpreter)."""
    vd = pytest.importorskip("vopt.kernels.vidkv_decode")
    if vd.triton is None:
        pytest.skip("triton is not importable")
    q, pk, pv, wk, wv, gqa = _case(name)
    want = vd.packed_decode_attention_triton(q, pk, pv, wk, wv, enable_gqa=gqa).float()
    out = _run(emu, fused_decode_args(q, pk, pv, wk, wv), 1).reshape(want.shape)
    err = (out - want).abs().max().item()
    assert err <= 4e-6 * max(1.0, want.abs().max().item()), err

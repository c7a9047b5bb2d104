"""Decode attention over a packed KIVI / VidKV cache: the torch reference (vopt/kvcache/decode_attention.py) against
its definition (dequantize + SDPA), and the Triton kernel (kernels/vidkv_decode.py) against the reference.

Without a GPU the kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1); shapes stay small
(shared/specs/environment.md §2). Measured (seeds as below, CPU, triton 3.9 interpreter, fp32 inputs):

* reference vs dequantize + SDPA, fp32, every layout in CFGS, Lq 1/4, GQA 2: max |diff| 1.5e-6 on N(0,1) inputs,
  9.1e-5 with outlier channels (logits ~1e2; fp32 summation order only); fp64 input: 2.6e-8 (the definition's own
  dequantization runs in fp32);
* Triton vs reference (12 cases below): max |diff| 3.0e-4 .. 4.7e-4 on N(0,1) inputs, 2.1e-3 .. 1.6e-2 with
  outliers (|out| up to ~20); max |diff| / max |ref| <= 1.1e-3; cosine >= 0.99999968. The kernel rounds dequantized
  K, V and P to fp16 for its MMAs: against an SDPA on fp16-rounded q, K, V the KIVI outlier case drops from 1.7e-2
  to 1.6e-3. Word loads and the per-code gather give identical results.
* Runtime of this file: ~20 s on 2 shared cores (4 compiles ~3 s each; interpreter cases 0.1-0.4 s).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from vopt.kvcache import VidKVConfig, dequantize_keys, dequantize_values, kivi_config, quantize_keys, quantize_values
from vopt.kvcache.decode_attention import frequency_domain_query, packed_decode_attention

F = torch.nn.functional

CFGS = {
    "recommended": lambda: VidKVConfig(),
    "reference": lambda: VidKVConfig(mode="reference"),
    "kivi": lambda: kivi_config(),
    "rec_value_token": lambda: VidKVConfig(value_axis="token"),
    "rec_value_int2": lambda: VidKVConfig(value_codec="int2"),
    "rec_trit_2bit": lambda: VidKVConfig(trit_packing="2bit"),
    "rec_no_value_scale": lambda: VidKVConfig(value_scale=False),
    "rec_fft_only": lambda: VidKVConfig(anomalous_fraction=0.0),
}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(B=2, Hkv=2, g=2, Lq=4, T=77, W=5, D=64, outliers=False, seed=0, dtype=torch.float32):
    gen = _gen(seed)
    k = torch.randn(B, Hkv, T + W, D, generator=gen)
    if outliers:  # a few large-range key channels (the anomalous ones) and a large value channel
        k[..., [3, 17]] *= 20.0
        k[..., 5] += 10.0
    v = torch.randn(B, Hkv, T + W, D, generator=gen)
    if outliers:
        v[..., 7] *= 15.0
    q = torch.randn(B, Hkv * g, Lq, D, generator=gen)
    k, v, q = k.to(dtype), v.to(dtype), q.to(dtype)
    return q, k[:, :, :T], v[:, :, :T], k[:, :, T:], v[:, :, T:]


def _definition(q, pk, pv, wk, wv, **kw):
    K = dequantize_keys(pk) if wk is None else torch.cat([dequantize_keys(pk), wk], 2)
    V = dequantize_values(pv) if wv is None else torch.cat([dequantize_values(pv), wv], 2)
    return F.scaled_dot_product_attention(q, K, V, **kw)


def _cos(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


# ------------------------------------------------------------------ frequency-domain identity
@pytest.mark.parametrize("n", [1, 2, 7, 8, 33])
@pytest.mark.parametrize("reference", [False, True])
def test_frequency_domain_query_is_parseval(n, reference):
    from vopt.kvcache.quantizers import _inverse_coefficients, _real_coefficients

    gen = _gen(n)
    q, x = torch.randn(3, n, generator=gen, dtype=torch.float64), torch.randn(5, n, generator=gen, dtype=torch.float64)
    r = _real_coefficients(x, reference)
    r = r + torch.randn(r.shape, generator=gen, dtype=torch.float64)  # arbitrary (e.g. quantized) coefficients
    k = _inverse_coefficients(r, n, reference)                          # what dequantize_keys reconstructs
    w = frequency_domain_query(q, reference)
    assert w.shape[-1] == (2 * n if reference else n)
    torch.testing.assert_close(w @ r.T, q @ k.T, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ torch reference == dequantize + SDPA
@pytest.mark.parametrize("mode", list(CFGS))
@pytest.mark.parametrize("Lq", [1, 4])
@pytest.mark.parametrize("outliers", [False, True])
def test_reference_equals_dequantize_sdpa(mode, Lq, outliers):
    q, k, v, wk, wv = _inputs(Lq=Lq, outliers=outliers, seed=Lq)
    cfg = CFGS[mode]()
    pk, pv = quantize_keys(k, cfg), quantize_values(v, cfg)
    out = packed_decode_attention(q, pk, pv, wk, wv, enable_gqa=True)
    want = _definition(q, pk, pv, wk, wv, enable_gqa=True)
    assert out.shape == (2, 4, Lq, 64) and out.dtype == q.dtype
    # fp32 summation order only; with outliers the logits reach ~1e2, so the bound scales with them
    torch.testing.assert_close(out, want, rtol=0, atol=1e-4 if outliers else 2e-5)


@pytest.mark.parametrize("mode", ["recommended", "reference", "rec_value_int2"])
def test_reference_odd_head_dim_no_gqa_no_window_custom_scale(mode):
    q, k, v, _, _ = _inputs(g=1, D=63, T=70, seed=3)   # odd FFT length: no Nyquist bin
    cfg = CFGS[mode]()
    pk, pv = quantize_keys(k, cfg), quantize_values(v, cfg)
    out = packed_decode_attention(q, pk, pv, scale=0.3)
    torch.testing.assert_close(out, _definition(q, pk, pv, None, None, scale=0.3), rtol=0, atol=2e-5)
    with pytest.raises(ValueError):
        packed_decode_attention(q.repeat(1, 2, 1, 1), pk, pv)  # GQA shape without enable_gqa


def test_reference_float64_is_tight_and_blocks_and_mask():
    q, k, v, wk, wv = _inputs(T=96, seed=5, dtype=torch.float64)
    cfg = VidKVConfig()
    pk, pv = quantize_keys(k, cfg), quantize_values(v, cfg)
    want = _definition(q, pk, pv, wk, wv, enable_gqa=True)
    # dequantize_keys/values decode in fp32 even for fp64 input, so the definition itself is fp32-accurate
    torch.testing.assert_close(packed_decode_attention(q, pk, pv, wk, wv, enable_gqa=True), want, rtol=0, atol=1e-6)
    # the same tokens as two append-only blocks (keys and values cut at different places)
    blocks_k = [quantize_keys(k[:, :, :64], cfg), quantize_keys(k[:, :, 64:], cfg)]
    blocks_v = [quantize_values(v[:, :, :32], cfg), quantize_values(v[:, :, 32:], cfg)]
    K = torch.cat([dequantize_keys(b) for b in blocks_k] + [wk], 2)
    V = torch.cat([dequantize_values(b) for b in blocks_v] + [wv], 2)
    mask = torch.rand(2, 4, 4, K.shape[2], generator=_gen(1)) > 0.3
    mask[..., 0] = True
    want = F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=True)
    out = packed_decode_attention(q, blocks_k, blocks_v, wk, wv, enable_gqa=True, attn_mask=mask)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_reference_fp16_inputs_agree_to_fp16_rounding():
    q, k, v, wk, wv = _inputs(seed=7, dtype=torch.float16)
    pk, pv = quantize_keys(k, kivi_config()), quantize_values(v, kivi_config())
    out = packed_decode_attention(q, pk, pv, wk, wv, enable_gqa=True)
    want = _definition(q.float(), pk, pv, wk.float(), wv.float(), enable_gqa=True)  # dequantized K/V in fp16
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), want.float(), rtol=0, atol=3e-3)


def test_reference_does_not_modify_inputs():
    q, k, v, wk, wv = _inputs(seed=2)
    pk, pv = quantize_keys(k), quantize_values(v)
    before = [t.clone() for t in (q, wk, wv, pk.easy.words, pk.anomalous.scale, pv.codes.words)]
    packed_decode_attention(q, pk, pv, wk, wv, enable_gqa=True)
    for a, b in zip(before, (q, wk, wv, pk.easy.words, pk.anomalous.scale, pv.codes.words)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ Triton kernel vs the reference
pytest.importorskip("triton")
from vopt.kernels import vidkv_decode as vd  # noqa: E402


def _triton_case(cfg, word_loads=True, **shape):
    q, k, v, wk, wv = _inputs(**shape)
    pk, pv = quantize_keys(k, cfg), quantize_values(v, cfg)
    gqa = q.shape[1] != k.shape[1]
    ref = packed_decode_attention(q, pk, pv, wk if wk.shape[2] else None, wv if wv.shape[2] else None,
                                  enable_gqa=gqa)
    out = vd.packed_decode_attention_triton(q, pk, pv, wk if wk.shape[2] else None, wv if wv.shape[2] else None,
                                            enable_gqa=gqa, word_loads=word_loads)
    assert out.shape == ref.shape and out.dtype == q.dtype
    return out.float(), ref.float()


def _close(out, ref):
    """cos >= 0.99999 and max |diff| <= 2e-3 · max |ref| (K, V, P rounded to fp16 for the MMAs)."""
    assert _cos(out, ref) >= 0.99999
    assert (out - ref).abs().max().item() <= 2e-3 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("Lq,g,T,W,D,outliers", [
    (1, 2, 77, 5, 64, False),   # GQA, key tail of 13 tokens, values all quantized (per token), window
    (4, 2, 77, 5, 64, True),
    (1, 1, 40, 0, 64, True),    # no window: keys' tail is the only residual
    (4, 4, 96, 33, 64, False),  # whole groups, window longer than a tile
    (1, 2, 20, 7, 64, False),   # fewer tokens than a group: keys all fp16 tail
])
@pytest.mark.parametrize("word_loads", [True, False])
def test_kivi_triton_matches_reference(Lq, g, T, W, D, outliers, word_loads):
    out, ref = _triton_case(kivi_config(), word_loads, Lq=Lq, g=g, T=T, W=W, D=D, outliers=outliers, seed=T + W)
    _close(out, ref)


def test_kivi_triton_small_groups_non_pow2_head_dim():
    out, ref = _triton_case(kivi_config(group_size=8), D=40, T=45, W=3, seed=11)   # 2-bit words straddle groups
    _close(out, ref)


@pytest.mark.parametrize("mode", ["recommended", "reference", "rec_value_token", "rec_trit_2bit",
                                  "rec_no_value_scale", "rec_fft_only"])
@pytest.mark.parametrize("word_loads", [True, False])
def test_vidkv_triton_matches_reference(mode, word_loads):
    out, ref = _triton_case(CFGS[mode](), word_loads, Lq=4, outliers=True, seed=13)
    _close(out, ref)


@pytest.mark.parametrize("meta", ["bfloat16", "float32"])
def test_triton_other_metadata_dtypes(meta):
    _close(*_triton_case(kivi_config(metadata_dtype=meta), Lq=1, T=64, W=2, seed=19))
    _close(*_triton_case(VidKVConfig(metadata_dtype=meta), Lq=1, T=64, W=2, seed=19))


def test_vidkv_triton_odd_head_dim_fp16_query():
    q, k, v, wk, wv = _inputs(D=40, T=50, Lq=1, seed=17)
    cfg = VidKVConfig(anomalous_fraction=0.25)   # 10 anomalous, 30 FFT channels
    pk, pv = quantize_keys(k, cfg), quantize_values(v, cfg)
    out = vd.packed_decode_attention_triton(q.half(), pk, pv, wk, wv, enable_gqa=True)
    ref = packed_decode_attention(q, pk, pv, wk, wv, enable_gqa=True)
    assert out.dtype == torch.float16
    _close(out.float(), ref)


def test_unsupported_reasons():
    q, k, v, wk, wv = _inputs(seed=1)
    pk, pv = quantize_keys(k, kivi_config()), quantize_values(v, kivi_config())
    assert vd.unsupported_reason(q, pk, pv, wk, wv, enable_gqa=True) is None
    assert "enable_gqa" in vd.unsupported_reason(q, pk, pv, wk, wv)
    assert "together" in vd.unsupported_reason(q, pk, pv, wk, None, enable_gqa=True)
    assert "one PackedKeys" in vd.unsupported_reason(q, [pk], pv, wk, wv, enable_gqa=True)
    with pytest.raises(vd.VidKVTritonUnsupportedError):
        vd.kivi_decode_attention_triton(q, pk, pv, wk, wv)


# ------------------------------------------------------------------ compile for sm_80 / sm_90 (no GPU needed)
from test_triton_compile import SCRIPT as _COMPILE_SCRIPT  # noqa: E402

_SIG = {"Q": "*fp16", "QA": "*fp16", "QB": "*fp16", "KAW": "*i32", "KAS": "*fp16", "KAZ": "*fp16", "KBW": "*i32",
        "KBS": "*fp16", "KBZ": "*fp16", "KR": "*fp16", "VW": "*i32", "VS": "*fp16", "VZ": "*fp16", "VR": "*fp16",
        "Out": "*fp32", "M": "i32", "D": "i32", "DV": "i32", "KA": "i32", "KB": "i32", "TQK": "i32", "TQV": "i32",
        "N": "i32", "qk_scale": "fp32"}
_LAYOUTS = {
    # KIVI-2: all key channels 2-bit per channel, values 2-bit per token; 8 query rows per KV head (GQA 8, Lq 1)
    "kivi": (dict(GK=32, GV=32, HAS_A=True, HAS_B=False, KB_PM=True, V_PER_TOKEN=True, V_CODEC=0, V_HAS_SCALE=True,
                  ALIGNED_K=True, ALIGNED_V=True,
                  BLOCK_M=16, BLOCK_N=32, BLOCK_D=128, BLOCK_DA=128, BLOCK_DB=16, BLOCK_DV=128), {}),
    # VidKV recommended: 64 anomalous 2-bit channels + 64 rFFT sign coefficients, base-3 ternary values per channel
    "vidkv": (dict(GK=32, GV=32, HAS_A=True, HAS_B=True, KB_PM=True, V_PER_TOKEN=False, V_CODEC=2, V_HAS_SCALE=True,
                   ALIGNED_K=True, ALIGNED_V=False,
                   BLOCK_M=16, BLOCK_N=32, BLOCK_D=128, BLOCK_DA=64, BLOCK_DB=64, BLOCK_DV=128), {"VW": "*u8"}),
    # VidKV reference: {0, s} sign keys over 128 full-FFT reals, 2-bit ternary values per channel (word loads
    # expanded along tokens), per-code gather for the keys
    "vidkv_reference": (dict(GK=32, GV=32, HAS_A=True, HAS_B=True, KB_PM=False, V_PER_TOKEN=False, V_CODEC=0,
                             V_HAS_SCALE=True, ALIGNED_K=False, ALIGNED_V=True, BLOCK_M=16, BLOCK_N=32,
                             BLOCK_D=128, BLOCK_DA=64, BLOCK_DB=128, BLOCK_DV=128), {}),
}


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_decode_kernel_compiles(layout, arch):
    """PTX found (triton 3.9, bundled ptxas, num_warps 4, num_stages 2), both layouts, sm_80 and sm_90:

    * QKᵀ and PV: ``mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32`` (24 per kernel; BLOCK_M 16 gives no
      wgmma on sm_90); ``fma.rn.f32`` for the fused dequantization ``code·s + z``; ``cvt.rn.f16x2.f32`` /
      ``cvt.rn.f16.f32`` for the fp16 MMA operands; no FP8 type or conversion anywhere.
    * Packed int32 words: software-pipelined into shared memory as 4-byte ``cp.async.ca.shared.global ..., 0x4``
      (KIVI: 8 per thread per tile with word loads, vs 128 with the per-code gather; vidkv_reference, key gather
      + value word loads: 100, 28 MMAs); base-3 trit bytes:
      ``ld.global.b8`` (32 per thread per tile). Scales, zeros and the fp16 residual: scalar ``ld.global.b16``
      (224 KIVI, 176 VidKV; not vectorized: a known cost, see the kernel module)."""
    consts, sig_over = _LAYOUTS[layout]
    sig = dict(_SIG, **sig_over, **{name: "constexpr" for name in consts})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = json.dumps(["vopt.kernels.vidkv_decode", "_packed_decode_kernel", sig, consts, arch])
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, args], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ptx = json.loads(res.stdout.strip().splitlines()[-1])["ptx"]
    assert f".target sm_{arch}" in ptx
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx
    assert "fma.rn.f32" in ptx
    n_words = len(re.findall(r"cp\.async\.ca\.shared\.global \[[^]]*\], \[[^]]*\], 0x4", ptx)) \
        + len(re.findall(r"ld\.global(?:\.[\w:]+)*\.b32", ptx))
    if consts["ALIGNED_K"]:
        assert 0 < n_words <= 16, n_words    # the packed int32 words: one 4-byte load per word, not per code
    else:
        assert n_words > 16, n_words         # per-code gather of the key words
    if layout == "vidkv":
        assert "ld.global.b8" in ptx     # base-3 trit bytes
    assert not re.search(r"cvt[\w.]*e[45]m[23]", ptx) and "e4m3" not in ptx and "e5m2" not in ptx


# ------------------------------------------------------------------ joined append-only blocks (the cache's GPU path)
@pytest.mark.parametrize("mode", ["kivi", "recommended", "reference", "rec_value_token", "rec_trit_2bit"])
def test_concat_blocks_is_exact_and_feeds_the_one_block_kernel(mode):
    """Blocks quantized separately with a frozen channel split (as VidKVLayer does), joined by concat_blocks:
    the joined container dequantizes to exactly the blocks' concatenation, and the Triton kernel over it equals the
    torch reference over the list of blocks (interpreter on CPU)."""
    from vopt.kvcache import VidKVCache  # noqa: F401  (the cache module, where blocks are made)
    from vopt.kvcache.cache import VidKVLayer
    from vopt.kvcache.quantizers import concat_blocks

    cfg = kivi_config(group_size=16) if mode == "kivi" else CFGS[mode]()
    g = _gen(21)
    layer = VidKVLayer(cfg, residual_length=4)
    B, H, D = 1, 2, 64
    layer.update(torch.randn(B, H, 3 * layer.block_size + 5, D, generator=g),
                 torch.randn(B, H, 3 * layer.block_size + 5, D, generator=g))
    for _ in range(layer.block_size):                 # decode steps append one more block
        layer.update(torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g))
    pks, pvs = [b[0] for b in layer.blocks], [b[1] for b in layer.blocks]
    assert len(pks) >= 2
    pk, pv = concat_blocks(pks, pvs)
    assert torch.equal(dequantize_keys(pk), torch.cat([dequantize_keys(p) for p in pks], 2))
    assert torch.equal(dequantize_values(pv), torch.cat([dequantize_values(p) for p in pvs], 2))
    assert layer.merged_blocks()[0] is layer.merged_blocks()[0]          # joined once, then cached
    q = torch.randn(B, 2 * H, 1, D, generator=g)
    ref = packed_decode_attention(q, pks, pvs, layer.keys, layer.values, enable_gqa=True)
    out = vd.packed_decode_attention_triton(q, pk, pv, layer.keys, layer.values, enable_gqa=True)
    _close(out.float(), ref.float())


def test_concat_blocks_refuses_mismatched_blocks():
    from vopt.kvcache.quantizers import concat_blocks

    cfg = VidKVConfig(key_group_size=8, value_group_size=8)
    k1, k2 = torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8) * 5
    k2[..., 0] *= 100                                    # a different channel split
    a, b = quantize_keys(k1, cfg), quantize_keys(k2, cfg)
    v = quantize_values(torch.randn(1, 1, 16, 8), cfg)
    with pytest.raises(ValueError, match="channel split"):
        concat_blocks([a, b], [v, v])
    with pytest.raises(ValueError, match="as many key blocks"):
        concat_blocks([a], [v, v])


@pytest.mark.gpu
def test_fused_decode_uses_a_fused_kernel_on_gpu():
    """On CUDA, VidKVLayer.decode_attention (no mask) runs a fused kernel (the CUDA library's, else Triton) over the
    joined blocks: equal to the torch reference over the block list. NOT run by vopt yet (no GPU here)."""
    from vopt.kvcache.cache import VidKVLayer

    g = _gen(22)
    layer = VidKVLayer(VidKVConfig(), residual_length=32, fused_decode=True)
    layer.update(torch.randn(1, 4, 300, 128, generator=g).cuda().half(),
                 torch.randn(1, 4, 300, 128, generator=g).cuda().half())
    for _ in range(40):
        layer.update(torch.randn(1, 4, 1, 128, generator=g).cuda().half(),
                     torch.randn(1, 4, 1, 128, generator=g).cuda().half())
    q = torch.randn(1, 28, 1, 128, generator=g).cuda().half()
    ref = packed_decode_attention(q, [b[0] for b in layer.blocks], [b[1] for b in layer.blocks], layer.keys,
                                  layer.values, enable_gqa=True)
    _close(layer.decode_attention(q).float(), ref.float())

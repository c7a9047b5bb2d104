"""The hand-written SageAttention2 CUDA kernels (cuda/sage_*.cu, vopt/ops/sage_cuda.py).

Without a GPU (CI): the C ABI (struct layout, exports), argument checks that run before any CUDA call, the
Python-side refusals, and the SASS of every arch (tensor-core instructions where intended, no local memory).
With a GPU (``-m gpu``, tools/gpu_check.sh): quantizer codes/scales bit-identical to the reference, attention
against the reference and exact SDPA on fresh and adversarial inputs, every output element written, kernel
selection, CUDA-graph replay.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _cuda_build import assert_ctypes_matches_c, sass_functions
from vopt import cuda_library
from vopt.errors import CudaLibraryError
from vopt.ops import sage_attention as sa_op
from vopt.ops import sage_cuda
from vopt.ops.sage_reference import (
    Granularity,
    PVPrecision,
    QKPrecision,
    SagePrecision,
    quantize_qk,
    quantize_v_fp8,
    sage_attention_reference,
)

CUDA_INVALID_VALUE = 1


pytestmark = pytest.mark.usefixtures("fresh_cuda_loader")



# ---- C ABI ----------------------------------------------------------------------------------------------------


def test_params_struct_matches_the_c_layout(built_lib, tmp_path):
    """ctypes' SageAttnParams has the C struct's size and every field's offset (a C program prints them)."""
    assert cuda_library.load().call("vopt_sage_attn_params_size") == ctypes.sizeof(cuda_library.SageAttnParams)
    assert_ctypes_matches_c("vopt_sage_attn_params", cuda_library.SageAttnParams, tmp_path)


def _valid_params(**over) -> cuda_library.SageAttnParams:
    prm = cuda_library.SageAttnParams()
    for name in ("q", "k", "q_scale", "k_scale", "v", "v_scale", "out"):
        setattr(prm, name, 256)
    prm.batch, prm.heads_q, prm.heads_kv, prm.len_q, prm.len_k = 1, 4, 2, 100, 300
    prm.head_dim, prm.out_dim = 128, 80
    prm.out_stride_b, prm.out_stride_h, prm.out_stride_l = 4 * 100 * 80, 100 * 80, 80
    prm.qk_bits, prm.two_level = 8, 1
    for name, value in over.items():
        setattr(prm, name, value)
    return prm


@pytest.mark.parametrize(
    "over, words",
    [
        ({"head_dim": 96}, ["head_dim=96", "64, 128"]),
        ({"qk_bits": 5}, ["qk_bits=5", "8, 4"]),
        ({"heads_q": 3}, ["heads_q=3", "heads_kv=2"]),
        ({"q": None}, ["non-NULL"]),
        ({"out_dim": 129}, ["out_dim=129"]),
        ({"granularity": 7}, ["granularity=7"]),
        ({"pv": 1}, ["v_scale"]),  # fp16 PV with a v_scale pointer
        ({"causal": 2}, ["causal=2"]),
        ({"kernel": 9}, ["kernel=9"]),
        ({"reserved": 1}, ["reserved"]),
        ({"len_k": 0}, ["len_k=0"]),
        ({"out_stride_l": 10}, ["out strides"]),
    ],
)
def test_bad_params_are_refused_before_any_cuda_call(built_lib, over, words):
    lib = cuda_library.load()
    prm = _valid_params(**over)
    for symbol in ("vopt_sage_attn_fwd", "vopt_sage_attn_select"):
        extra = (None,) if symbol == "vopt_sage_attn_fwd" else (ctypes.byref(ctypes.c_int32()),)
        status = lib.call(symbol, ctypes.byref(prm), *extra)
        assert status == CUDA_INVALID_VALUE, (symbol, status)
        msg = lib.last_error_message()
        for w in words:
            assert w in msg, (symbol, msg)
    with pytest.raises(CudaLibraryError, match=re.escape(words[0])):
        lib.check(lib.call("vopt_sage_attn_fwd", ctypes.byref(prm), None), "vopt_sage_attn_fwd")


def test_misaligned_codes_are_refused(built_lib):
    lib = cuda_library.load()
    status = lib.call("vopt_sage_attn_fwd", ctypes.byref(_valid_params(k=264)), None)
    assert status != 0 and "16-byte aligned" in lib.last_error_message()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-driver path")
def test_valid_params_without_a_driver_fail_with_the_driver_error(built_lib):
    lib = cuda_library.load()
    status = lib.call("vopt_sage_attn_fwd", ctypes.byref(_valid_params()), None)
    assert status not in (0, CUDA_INVALID_VALUE)
    assert "device" in lib.last_error_message()
    # The next successful-or-not call starts from a clean message.
    assert lib.call("vopt_sage_attn_params_size") > 0


_QUANT_CALLS = {
    # symbol: args with one bad value (x, sb, sh, sl, batch, heads, len, dim, ...)
    "vopt_sage_quant_q_f16": ((256, 0, 0, 128, 1, 1, 10, 64, 96, 8, 0, 0, 0.18, 256, 256, None, None), "dim_pad"),
    "vopt_sage_quant_k_bf16": ((256, 0, 0, 128, 1, 1, 10, 64, 64, 3, 0, None, 256, 256, None), "bits"),
    "vopt_sage_quant_v_fp8_f16": ((256, 0, 0, 128, 1, 1, 10, 200, 128, None, 256, 256, None), "dim"),
    "vopt_sage_channel_mean_bf16": ((None, 0, 0, 128, 1, 1, 10, 64, 256, None), "NULL"),
}


@pytest.mark.parametrize("symbol", sorted(_QUANT_CALLS))
def test_quantizer_argument_errors_name_the_argument(built_lib, symbol):
    lib = cuda_library.load()
    args, word = _QUANT_CALLS[symbol]
    assert lib.call(symbol, *args) == CUDA_INVALID_VALUE
    assert word in lib.last_error_message()


def test_q_smoothing_needs_a_qm_buffer(built_lib):
    lib = cuda_library.load()
    args = (256, 0, 0, 128, 1, 1, 10, 64, 64, 4, 0, 1, 0.18, 256, 256, None, None)  # smooth=1, qm NULL
    assert lib.call("vopt_sage_quant_q_f16", *args) == CUDA_INVALID_VALUE
    assert "qm" in lib.last_error_message()


# ---- Python-side refusals (no GPU needed) ----------------------------------------------------------------------


def test_cuda_backend_refuses_with_a_reason_on_cpu():
    q = torch.randn(1, 2, 16, 64, dtype=torch.float16)
    why = sage_cuda.unsupported_reason(q, q, q, None, False, sa_op.preset("int8_fp8"))
    assert why
    impl = sa_op.SAGE_ATTENTION.select(q, q, q, None, 0.0, False, None, False, sa_op.preset("int8_fp8"))
    assert impl.backend.value != "cuda"


@pytest.mark.parametrize(
    "precision, words",
    [
        (SagePrecision(granularity=Granularity.PER_WARP), "per_warp"),
        (SagePrecision(block_k=128), "block_k"),
        (SagePrecision(pv=PVPrecision.FP32), "fp32"),
        (SagePrecision(warp_q=16, block_q=128), "warp_q"),
    ],
)
def test_precisions_without_a_kernel_are_refused(precision, words):
    assert words in sage_cuda._precision_reason(precision)


def test_every_quantized_preset_has_a_kernel():
    for name, p in sa_op.PRESETS.items():
        if p is not None:
            assert sage_cuda._precision_reason(sa_op.preset(name)) is None, name


# ---- SASS: the instructions we meant, no local memory ----------------------------------------------------------


def _sass_functions(lib: Path, arch: str) -> dict:
    """{mangled function name: SASS text} of the sage kernels compiled for ``arch`` (e.g. "sm_89")."""
    return sass_functions(lib, arch, "sage")


def _kernels(funcs: dict, *words) -> dict:
    return {n: body for n, body in funcs.items() if all(w in n.lower() for w in words)}


@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90a"])
def test_mma_kernels_use_integer_tensor_cores(built_lib, arch):
    funcs = _kernels(_sass_functions(built_lib, arch), "mma")
    funcs = {n: b for n, b in funcs.items() if "wgmma" not in n.lower()}
    assert funcs, f"no sage mma kernel in the {arch} SASS"
    text = "\n".join(funcs.values())
    assert "IMMA.16832.S8.S8" in text, "INT8 m16n8k32 QK missing"
    if arch != "sm_90a":  # Hopper emulates s4 mma.sync (spec §1.5): only sm_80/89 are checked for native INT4
        assert re.search(r"IMMA\.16864\.S4\.S4", text), "INT4 m16n8k64 QK missing"
    assert "HMMA.16816.F32" in text, "FP16 PV (m16n8k16, fp32 accumulate) missing"
    if arch == "sm_89":
        assert re.search(r"QMMA\.16832\.F32\.E4M3\.E4M3|HMMA\.16832\.F32\.E4M3", text), "FP8 PV missing on sm_89"


def test_wgmma_kernel_uses_gmma_and_tma(built_lib):
    funcs = _kernels(_sass_functions(built_lib, "sm_90a"), "wgmma")
    assert funcs, "no sage wgmma kernel in the sm_90a SASS"
    text = "\n".join(funcs.values())
    assert re.search(r"\bIGMMA\b|IGMMA\.", text), "INT8 wgmma (IGMMA) missing"
    assert re.search(r"\bQGMMA\b|QGMMA\.", text), "FP8 wgmma (QGMMA) missing"
    assert "UTMALDG" in text, "TMA loads missing"


@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90a"])
def test_sage_kernels_do_not_use_local_memory(built_lib, arch):
    funcs = _sass_functions(built_lib, arch)
    assert funcs
    spills = {n: sorted(set(re.findall(r"\b(STL|LDL)\b[.\w]*", b))) for n, b in funcs.items()}
    spills = {n: s for n, s in spills.items() if s}
    assert not spills, f"local-memory traffic (spills) in {arch}: {spills}"


# ---- GPU: quantizers bit-exact ---------------------------------------------------------------------------------

gpu = pytest.mark.gpu


def _inputs(shape_q, shape_kv, dtype, seed=0, outliers=False, dv=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(*shape_q, generator=g)
    k = torch.randn(*shape_kv, generator=g)
    v = torch.randn(*shape_kv[:-1], dv or shape_kv[-1], generator=g)
    if outliers:  # the outlier channels SageAttention smoothing exists for, and a constant K bias
        k[..., 3] += 40.0
        k = k + 5.0
        q[..., 7] *= 30.0
        v[..., 1] *= 50.0
    return (t.to("cuda", dtype) for t in (q, k, v))


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    lo = (packed << 4) >> 4  # arithmetic shifts on int8: sign-extend the low nibble
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def _unpermute_v(v_t: torch.Tensor) -> torch.Tensor:
    """[B, H, D_pad, L_pad] fp8 with perm16 positions -> [B, H, L_pad, D_pad] in key order."""
    perm16 = torch.tensor([0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15])
    lpad = v_t.shape[-1]
    pos = torch.arange(lpad)
    key_of_pos = (pos // 16) * 16 + perm16[pos % 16]
    out = torch.empty_like(v_t.view(torch.uint8))
    out[..., key_of_pos.to(v_t.device)] = v_t.view(torch.uint8)
    return out.view(torch.float8_e4m3fn).transpose(-1, -2)


QUANT_CASES = [
    # (bits, granularity, smooth_q, L, D, dtype)
    (8, Granularity.PER_THREAD, False, 300, 128, torch.float16),
    (8, Granularity.PER_BLOCK, False, 128, 64, torch.bfloat16),
    (8, Granularity.PER_THREAD, True, 77, 80, torch.bfloat16),
    (4, Granularity.PER_THREAD, True, 300, 64, torch.float16),
    (4, Granularity.PER_BLOCK, True, 1, 128, torch.float16),
]


@gpu
@pytest.mark.parametrize("bits, gran, smooth_q, length, d, dtype", QUANT_CASES)
def test_quantizers_match_the_reference_bit_for_bit(bits, gran, smooth_q, length, d, dtype):
    b, hq, hkv = 2, 4, 2
    q, k, v = _inputs((b, hq, length, d), (b, hkv, length + 13, d), dtype, seed=length + d, outliers=True)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous heads: strides must be honoured
    p = SagePrecision(qk=QKPrecision(f"int{bits}"), granularity=gran, smooth_q=smooth_q, smooth_v=True)
    km = k.float().mean(dim=-2)  # the reference's own km (same ops, same device)
    vm = v.float().mean(dim=-2)
    qi = sage_cuda.quantize(q, k, v, p, None, bits, km=km, vm=vm)
    ref = quantize_qk(q, k, p)
    lq, lk = q.shape[2], k.shape[2]
    q_codes = qi.q_codes if bits == 8 else _unpack_int4(qi.q_codes)
    k_codes = qi.k_codes if bits == 8 else _unpack_int4(qi.k_codes)
    if smooth_q:  # qm is summed in another order than torch's: allow an ulp there, and rare +-1 codes
        torch.testing.assert_close(qi.qm[..., :d], ref.qm, rtol=1e-6, atol=1e-6)
        diff = (q_codes[:, :, :lq, :d].int() - ref.q_codes.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 1e-3
        torch.testing.assert_close(qi.q_scale.flatten(2)[..., : ref.q_scale.flatten(2).shape[-1]],
                                   ref.q_scale.flatten(2), rtol=1e-6, atol=0)
    else:
        assert torch.equal(q_codes[:, :, :lq, :d], ref.q_codes)
        assert torch.equal(qi.q_scale.flatten(2)[..., : ref.q_scale.flatten(2).shape[-1]], ref.q_scale.flatten(2))
    assert torch.equal(k_codes[:, :, :lk, :d], ref.k_codes)
    assert torch.equal(qi.k_scale.flatten(2)[..., : ref.k_scale.flatten(2).shape[-1]], ref.k_scale.flatten(2))
    # Padding: zero codes past L and D.
    assert not q_codes[:, :, lq:].any() and not q_codes[..., d:].any()
    assert not k_codes[:, :, lk:].any() and not k_codes[..., d:].any()
    # V: per-channel E4M3 with the reference's vm, transposed and perm16-permuted.
    v8, v_scale, _ = quantize_v_fp8(v, smooth_v=True)
    v_back = _unpermute_v(qi.v)
    assert torch.equal(v_back[:, :, :lk, :d].view(torch.uint8), v8.view(torch.uint8))
    assert not v_back[:, :, lk:].view(torch.uint8).any()
    assert torch.equal(qi.v_scale[..., :d], v_scale)
    torch.testing.assert_close(sage_cuda.channel_mean(k), km, rtol=1e-5, atol=1e-5)


# ---- GPU: attention --------------------------------------------------------------------------------------------


def _cos_rel(out: torch.Tensor, ref: torch.Tensor) -> tuple:
    o, r = out.double().flatten(), ref.double().flatten()
    cos = float(F.cosine_similarity(o, r, dim=0))
    rel = float((o - r).abs().sum() / r.abs().sum().clamp_min(1e-30))
    return cos, rel


def _expected_precision(name: str) -> SagePrecision:
    """The preset's numerics as the CUDA backend runs them on this GPU (INT4 -> INT8 on sm_90)."""
    p = sa_op.preset(name)
    if p.qk is QKPrecision.INT4 and torch.cuda.get_device_capability() == (9, 0):
        p = dataclasses.replace(p, qk=QKPrecision.INT8)
    return p


def _cuda_presets():
    cc = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    names = ["int8_fp8_block", "int8_fp8", "int8_fp16", "int4_fp8"]
    return [n for n in names if not (cc < (8, 9) and "fp8" in n)]


ATTN_CASES = [
    # (B, Hq, Hkv, Lq, Lk, D, Dv, causal, dtype)
    (2, 4, 4, 256, 256, 128, 128, False, torch.float16),
    (1, 8, 2, 300, 300, 128, 128, True, torch.bfloat16),   # GQA, ragged length, causal
    (1, 4, 4, 100, 700, 64, 64, True, torch.float16),     # prefill against a cache (bottom-right causal)
    (1, 2, 1, 200, 70, 64, 64, True, torch.float16),      # Lq > Lk: the first rows see no key
    (2, 3, 3, 1, 513, 80, 80, False, torch.bfloat16),     # decode row, head_dim 80 padded to 128
    (1, 2, 2, 129, 65, 72, 40, False, torch.float16),     # SigLIP-like 72, value dim != head dim
]


@gpu
@pytest.mark.parametrize("preset_name", ["int8_fp8_block", "int8_fp8", "int8_fp16", "int4_fp8"])
@pytest.mark.parametrize("case", ATTN_CASES)
@pytest.mark.parametrize("kernel", ["auto", "mma"])
def test_attention_matches_reference(preset_name, case, kernel):
    if preset_name not in _cuda_presets():
        pytest.skip(f"{preset_name} needs FP8 mma (sm_89+)")
    b, hq, hkv, lq, lk, d, dv, causal, dtype = case
    q, k, v = _inputs((b, hq, lq, d), (b, hkv, lk, d), dtype, seed=lq * 7 + lk, outliers=True, dv=dv)
    before = [t.clone() for t in (q, k, v)]
    p = sa_op.preset(preset_name)
    out, lse = sage_cuda.sage_attention_cuda(q, k, v, causal, None, p, return_lse=True, kernel=kernel)
    for t, t0 in zip((q, k, v), before):
        assert torch.equal(t, t0), "inputs were modified"
    ref, ref_lse = sage_attention_reference(q, k, v, None, 0.0, causal, None, hq != hkv,
                                            precision=_expected_precision(preset_name), return_lse=True)
    assert out.shape == ref.shape and out.dtype == dtype and torch.isfinite(out).all()
    # Same numerics as the reference: differences come from exp2 approximations, summation order, the hardware's
    # FP22 accumulator vs its model and rare rounding-boundary flips: well under the quantization error itself.
    cos, rel = _cos_rel(out, ref)
    assert cos >= 0.9999 and rel <= 5e-3, (cos, rel)
    live = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), live)
    torch.testing.assert_close(lse[live], ref_lse[live], rtol=0, atol=2e-3)
    # And against exact attention (fp32 SDPA, bottom-right causal): the quantization error of the preset.
    mask = None
    if causal:
        mask = torch.ones(lq, lk, dtype=torch.bool, device="cuda").tril(diagonal=lk - lq)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                           enable_gqa=hq != hkv)
    exact = torch.where(mask.any(-1)[:, None], exact, torch.zeros_like(exact)) if mask is not None else exact
    cos, rel = _cos_rel(out, exact)
    int4 = _expected_precision(preset_name).qk is QKPrecision.INT4
    # int8: the spec's default accuracy guard (cos >= 0.999, rel-L1 <= 0.03); int4 is coarser (~7x the step).
    assert cos >= (0.995 if int4 else 0.999) and rel <= (0.1 if int4 else 0.03), (cos, rel)


@gpu
def test_wgmma_kernel_is_selected_on_hopper_and_refused_elsewhere():
    q, k, v = _inputs((1, 2, 256, 128), (1, 2, 256, 128), torch.float16)
    p = sa_op.preset("int8_fp8")
    if torch.cuda.get_device_capability() == (9, 0):
        call = sage_cuda.prepare(q, k, v, False, None, p)
        assert call.kernel == "wgmma"
        ref = sage_attention_reference(q, k, v, precision=p)
        cos, rel = _cos_rel(sage_cuda.sage_attention_cuda(q, k, v, False, None, p, kernel="wgmma"), ref)
        assert cos >= 0.9999 and rel <= 5e-3
        assert sage_cuda.prepare(q, k, v, False, None, sa_op.preset("int8_fp16")).kernel == "mma"
    else:
        with pytest.raises(CudaLibraryError, match="wgmma"):
            sage_cuda.prepare(q, k, v, False, None, p, kernel="wgmma")
        assert sage_cuda.prepare(q, k, v, False, None, p).kernel == "mma"


@gpu
@pytest.mark.parametrize("kernel", ["auto", "mma"])
def test_every_output_element_is_written_and_nothing_else(kernel):
    q, k, v = _inputs((2, 4, 200, 64), (2, 2, 333, 64), torch.bfloat16, seed=5)
    big = torch.full((2, 4, 200, 64 + 8), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = big[..., :64]
    name = "int8_fp8_block" if "int8_fp8_block" in _cuda_presets() else "int8_fp16"
    sage_cuda.sage_attention_cuda(q, k, v, True, None, sa_op.preset(name), kernel=kernel, out=out)
    assert torch.isfinite(out).all()
    assert torch.isnan(big[..., 64:]).all()


@gpu
def test_long_sequence_matches_reference():
    q, k, v = _inputs((1, 2, 8192, 128), (1, 2, 8192, 128), torch.float16, seed=9)
    p = sa_op.preset("int8_fp8")
    out = sage_cuda.sage_attention_cuda(q, k, v, True, None, p)
    ref = sage_attention_reference(q, k, v, None, 0.0, True, None, precision=p)
    cos, rel = _cos_rel(out, ref)
    assert cos >= 0.9999 and rel <= 5e-3, (cos, rel)


@gpu
def test_all_equal_rows_and_custom_scale():
    q = torch.ones(1, 2, 130, 64, dtype=torch.float16, device="cuda")
    k = torch.full((1, 2, 130, 64), 0.5, dtype=torch.float16, device="cuda")  # K' = 0 after smoothing
    v = torch.randn(1, 2, 130, 64, dtype=torch.float16, device="cuda")
    p = sa_op.preset("int8_fp8")
    out = sage_cuda.sage_attention_cuda(q, k, v, False, 0.3, p)
    ref = sage_attention_reference(q, k, v, None, 0.0, False, 0.3, precision=p)
    cos, rel = _cos_rel(out, ref)
    assert cos >= 0.9999 and rel <= 5e-3, (cos, rel)


@gpu
def test_dispatcher_picks_cuda_and_falls_back_for_masks(caplog):
    q, k, v = _inputs((1, 4, 256, 128), (1, 4, 256, 128), torch.float16, seed=3)
    p = sa_op.preset("int8_fp8")
    assert sa_op.SAGE_ATTENTION.select(q, k, v, None, 0.0, False, None, False, p).backend.value == "cuda"
    mask = torch.ones(256, 256, dtype=torch.bool, device="cuda")
    with caplog.at_level(logging.WARNING):
        impl = sa_op.SAGE_ATTENTION.select(q, k, v, mask, 0.0, False, None, False, p)
    assert impl.backend.value != "cuda"
    assert "attn_mask is not supported by the CUDA kernels" in caplog.text
    out = torch.ops.vopt.sage_attention(q, k, v, None, 0.0, True, None, False, "int8_fp8")
    ref = sage_attention_reference(q, k, v, None, 0.0, True, None, precision=p)
    assert _cos_rel(out, ref)[0] >= 0.9999


@gpu
def test_cuda_graph_replay_with_new_inputs():
    q, k, v = _inputs((1, 4, 256, 128), (1, 4, 256, 128), torch.float16, seed=11)
    p = sa_op.preset("int8_fp8")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            sage_cuda.sage_attention_cuda(q, k, v, True, None, p)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = sage_cuda.sage_attention_cuda(q, k, v, True, None, p)
    for seed in (12, 13):
        nq, nk, nv = _inputs((1, 4, 256, 128), (1, 4, 256, 128), torch.float16, seed=seed)
        q.copy_(nq), k.copy_(nk), v.copy_(nv)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, sage_cuda.sage_attention_cuda(q, k, v, True, None, p))


@gpu
def test_refuses_shapes_it_does_not_serve():
    q, k, v = _inputs((1, 2, 64, 160), (1, 2, 64, 160), torch.float16)
    assert "128" in sage_cuda.unsupported_reason(q, k, v, None, False, sa_op.preset("int8_fp8"))
    q32 = torch.randn(1, 2, 64, 64, device="cuda")
    assert "float32" in sage_cuda.unsupported_reason(q32, q32, q32, None, False, sa_op.preset("int8_fp8"))
    mask = torch.ones(64, 64, dtype=torch.bool, device="cuda")
    q, k, v = _inputs((1, 2, 64, 64), (1, 2, 64, 64), torch.float16)
    assert "attn_mask" in sage_cuda.unsupported_reason(q, k, v, mask, False, sa_op.preset("int8_fp8"))

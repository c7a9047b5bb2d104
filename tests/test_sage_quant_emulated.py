"""cuda/sage_quant.cu's device code run on the CPU (tests/cuda_emu/sage_quant_emu.cpp) against the reference.

The quantizer kernels' source is compiled unchanged as host C++ (threads for CUDA threads, barriers for
__syncthreads and warp shuffles) and must reproduce :mod:`vopt.ops.sage_reference` bit for bit: Q/K codes, scales
and qm (CPU torch sums qm's rows in the kernel's order), the transposed perm16 E4M3 V layout and its scales, with
every padding byte written (outputs start as garbage), for fp16/bf16 inputs that are contiguous, offset by one
element, or [B, L, H, D] in memory. The GPU tests (tests/test_sage_cuda.py) check the same on hardware.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from _cuda_build import ROOT, build_emulated
from vopt.ops import sage_reference as R

SOURCE = ROOT / "cuda" / "sage_quant.cu"
HARNESS = Path(__file__).resolve().parent / "cuda_emu" / "sage_quant_emu.cpp"
PERM16 = [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    so = build_emulated(SOURCE, HARNESS, tmp_path_factory.mktemp("sage-quant-emu"), "\nnamespace {\n",
                        replace=(("extern __shared__ uint4 tile_s[];", "uint4* tile_s = g_dyn_smem;"),))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    so.emu_quant_qk.argtypes = [ctypes.c_int, ctypes.c_int, ptr] + [i64] * 8 + [ctypes.c_int] * 3 + [
        ctypes.c_float, ptr, ptr, ptr, ptr, ctypes.c_int]
    so.emu_quant_v.argtypes = [ctypes.c_int, ptr] + [i64] * 8 + [ptr, ptr, ptr]
    so.emu_channel_mean.argtypes = [ctypes.c_int, ptr] + [i64] * 7 + [ptr]
    return so


def _input(b, h, length, d, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(b, h, length, d, generator=g) * 3 + torch.randn(1, 1, 1, d, generator=g) * 5).to(dtype)
    base[..., 0, :] = 0  # an all-zero row
    if layout == "offset1":  # storage offset of one element: no 16-byte vector loads
        buf = torch.zeros(base.numel() + 1, dtype=dtype)
        t = buf[1:].view(base.shape)
        t.copy_(base)
        return t
    if layout == "bhld_T":
        return base.transpose(1, 2).contiguous().transpose(1, 2)
    return base.contiguous()


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


QK_CASES = [  # (is_k, L, D, D_pad, bits, granularity, smooth, dtype, layout, scalar_out)
    (0, 300, 128, 128, 8, 0, 0, torch.float16, "contig", False),
    (0, 300, 128, 128, 4, 0, 1, torch.bfloat16, "offset1", False),
    (0, 129, 72, 128, 8, 1, 1, torch.float16, "bhld_T", True),
    (0, 1, 64, 64, 4, 1, 1, torch.bfloat16, "contig", False),
    (0, 77, 100, 128, 8, 0, 1, torch.float16, "offset1", False),
    (1, 300, 128, 128, 8, 0, 1, torch.bfloat16, "bhld_T", False),
    (1, 256, 64, 64, 4, 0, 1, torch.float16, "contig", True),
    (1, 129, 72, 128, 8, 1, 0, torch.bfloat16, "offset1", False),
    (1, 1, 64, 64, 4, 1, 1, torch.float16, "bhld_T", False),
]


@pytest.mark.parametrize("is_k, length, d, d_pad, bits, gran, smooth, dtype, layout, scalar_out", QK_CASES)
def test_q_k_quantizers_are_bit_exact(emu, is_k, length, d, d_pad, bits, gran, smooth, dtype, layout, scalar_out):
    b, h = 2, 2
    x = _input(b, h, length, d, dtype, layout, seed=length + d + 7 * is_k)
    nblk = -(-length // 128)
    lpad = nblk * 128
    codes = torch.full((b, h, lpad, d_pad if bits == 8 else d_pad // 2), 0x5A, dtype=torch.uint8)  # garbage
    ngroups = (nblk * 32 if gran == 0 else nblk) if not is_k else (nblk * 8 if gran == 0 else nblk * 2)
    scale = torch.full((b, h, ngroups), float("nan"))
    qm = torch.full((b, h, nblk, d_pad), float("nan"))
    prec = R.SagePrecision(qk=R.QKPrecision.INT8 if bits == 8 else R.QKPrecision.INT4,
                           granularity=R.Granularity.PER_THREAD if gran == 0 else R.Granularity.PER_BLOCK,
                           smooth_q=bool(smooth) if bits == 8 else True)
    fold = float(torch.tensor(0.125 * R.LOG2E, dtype=torch.float32))
    km = qm_ref = None
    if is_k:
        xs, km = R.smooth_k_mean(x) if smooth else (x.to(torch.float32), None)
        grp, lay = R._k_groups(length, prec, x.device)
    else:
        xs, qm_ref = R.smooth_q_blocks(x, 128) if smooth else (x.to(torch.float32), None)
        grp, lay = R._q_groups(length, prec, x.device)
    ref_codes, ref_scale, _ = R._quantize_symmetric(xs, grp, lay, 127 if bits == 8 else 7)
    mult = 1.0 if is_k else fold
    if not is_k:
        ref_scale = ref_scale * torch.tensor(fold, dtype=torch.float32)
    emu.emu_quant_qk(0 if dtype == torch.float16 else 1, is_k, x.data_ptr(), *_strides(x), b, h, length, d, d_pad,
                     bits, gran, smooth if not is_k else 0, mult, None if km is None else km.contiguous().data_ptr(),
                     codes.data_ptr(), scale.data_ptr(), qm.data_ptr() if smooth and not is_k else None,
                     int(scalar_out))
    if bits == 8:
        got = codes.view(torch.int8)
    else:
        lo, hi = (codes & 0xF).to(torch.int16), (codes >> 4).to(torch.int16)
        lo, hi = torch.where(lo > 7, lo - 16, lo), torch.where(hi > 7, hi - 16, hi)
        got = torch.stack([lo, hi], -1).reshape(b, h, lpad, d_pad).to(torch.int8)
    want = torch.zeros(b, h, lpad, d_pad, dtype=torch.int8)
    want[:, :, :length, :d] = ref_codes
    assert torch.equal(got, want), f"{int((got != want).sum())} codes differ"
    want_scale = torch.full((b, h, ngroups), mult)
    flat = ref_scale.reshape(b, h, -1)
    want_scale[..., : flat.shape[-1]] = flat
    assert torch.equal(scale.view(torch.int32), want_scale.view(torch.int32)), "scales differ"
    if smooth and not is_k:
        want_qm = torch.zeros(b, h, nblk, d_pad)
        want_qm[..., :d] = qm_ref
        assert torch.equal(qm.view(torch.int32), want_qm.view(torch.int32)), "qm differs"


@pytest.mark.parametrize("length, d, d_pad, smooth, dtype, layout", [
    (300, 128, 128, False, torch.float16, "contig"),
    (300, 128, 128, True, torch.bfloat16, "offset1"),
    (1, 64, 64, True, torch.float16, "bhld_T"),
    (700, 72, 128, False, torch.bfloat16, "contig"),
])
def test_v_fp8_quantizer_is_bit_exact(emu, length, d, d_pad, smooth, dtype, layout):
    b, h = 2, 2
    x = _input(b, h, length, d, dtype, layout, seed=100 + length)
    lpad = -(-length // 128) * 128
    v8, v_scale, vm = R.quantize_v_fp8(x, smooth)
    out = torch.full((b, h, d_pad, lpad), 0x5A, dtype=torch.uint8)
    scale = torch.full((b, h, d_pad), float("nan"))
    emu.emu_quant_v(0 if dtype == torch.float16 else 1, x.data_ptr(), *_strides(x), b, h, length, d, d_pad,
                    None if vm is None else vm.contiguous().data_ptr(), out.data_ptr(), scale.data_ptr())
    by_key = torch.zeros(b, h, lpad, d_pad, dtype=torch.uint8)
    by_key[:, :, :length, :d] = v8.view(torch.uint8)
    order = torch.tensor([16 * (p // 16) + PERM16[p % 16] for p in range(lpad)])
    assert torch.equal(out, by_key.index_select(2, order).transpose(2, 3)), "V codes or their layout differ"
    want = torch.ones(b, h, d_pad)
    want[..., :d] = v_scale
    assert torch.equal(scale.view(torch.int32), want.view(torch.int32)), "V scales differ"


@pytest.mark.parametrize("length, d, dtype, layout", [(300, 128, torch.float16, "contig"),
                                                      (1000, 72, torch.bfloat16, "offset1")])
def test_channel_mean_is_close_to_torch(emu, length, d, dtype, layout):
    x = _input(2, 2, length, d, dtype, layout, seed=200 + length)
    mean = torch.full((2, 2, d), float("nan"))
    emu.emu_channel_mean(0 if dtype == torch.float16 else 1, x.data_ptr(), *_strides(x), 2, 2, length, d,
                         mean.data_ptr())
    # Another fp32 summation order than torch's: within a few ulps of the fp32 mean (|mean| ~ 5).
    torch.testing.assert_close(mean, x.float().mean(-2), rtol=1e-5, atol=1e-5)

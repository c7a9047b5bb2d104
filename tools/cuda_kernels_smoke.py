#!/usr/bin/env python
"""Small calls of the hand-written attention kernels, for compute-sanitizer (tools/gpu_check.sh).

    compute-sanitizer --tool memcheck --error-exitcode 9 python tools/cuda_kernels_smoke.py

SageAttention2: the quantizers and each kernel the library offers on this GPU (mma always; wgmma on sm_90) for every
preset it serves, causal and not, GQA, ragged lengths and head dims 64/80/128. Block-sparse attention: a CCAM mask
(dense mask, partial and dead tiles) and a random block mask without a dense mask (full tiles), fp16 and bf16.
Packed VidKV/KIVI decode: KIVI-2 and VidKV recommended caches with a window, one and three token splits.
Shapes are small enough for the sanitizer's slowdown. Prints one line per call and exits 0 if every call returned;
correctness is the job of tests/test_sage_cuda.py, tests/test_block_sparse_cuda.py and
tests/test_vidkv_decode_cuda.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vopt.ops import sage_attention as sa_op  # noqa: E402
from vopt.ops import block_sparse_cuda, sage_cuda  # noqa: E402
from vopt.ops.ccam_mask import CCAMMask  # noqa: E402

SHAPES = [  # (B, Hq, Hkv, Lq, Lk, D, causal)
    (1, 2, 1, 130, 200, 128, True),
    (1, 2, 2, 64, 64, 64, False),
    (2, 1, 1, 3, 77, 80, False),
]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    cc = torch.cuda.get_device_capability()
    kernels = ["mma"] + (["wgmma"] if cc == (9, 0) else [])
    presets = [n for n, p in sa_op.PRESETS.items() if p is not None and not (cc < (8, 9) and "fp8" in n)]
    g = torch.Generator(device="cpu").manual_seed(0)
    for b, hq, hkv, lq, lk, d, causal in SHAPES:
        q = torch.randn(b, hq, lq, d, generator=g).cuda().half()
        k = torch.randn(b, hkv, lk, d, generator=g).cuda().half()
        v = torch.randn(b, hkv, lk, d, generator=g).cuda().half()
        for name in presets:
            for kernel in kernels:
                p = sa_op.preset(name)
                why = sage_cuda.unsupported_reason(q, k, v, None, causal, p, kernel=kernel)
                if why:
                    print(f"skip {name} {kernel} {(b, hq, hkv, lq, lk, d, causal)}: {why}")
                    continue
                out, lse = sage_cuda.sage_attention_cuda(q, k, v, causal, None, p, return_lse=True, kernel=kernel)
                torch.cuda.synchronize()
                print(f"ok   {name} {kernel} {(b, hq, hkv, lq, lk, d, causal)} finite={bool(torch.isfinite(out).all())}")
    for dtype in (torch.float16, torch.bfloat16):
        m = CCAMMask(128, 3, 50)
        q = torch.randn(1, 2, 128, 72, generator=g).cuda().to(dtype)
        k = torch.randn(1, 2, m.num_keys, 72, generator=g).cuda().to(dtype)
        v = torch.randn(1, 2, m.num_keys, 40, generator=g).cuda().to(dtype)
        for bm, bq, bk, dense in ((m.block_mask(32, 50), 32, 50, m.dense("cuda")),
                                  (torch.rand(2, 3, generator=g) < 0.5, 64, 64, None)):
            why = block_sparse_cuda.unsupported_reason(q, k, v, bm, bq, bk, dense)
            if why:
                print(f"skip block_sparse {dtype}: {why}")
                continue
            out = block_sparse_cuda.block_sparse_attention_cuda(q, k, v, bm, bq, bk, dense)
            torch.cuda.synchronize()
            print(f"ok   block_sparse {dtype} dense={dense is not None} finite={bool(torch.isfinite(out).all())}")
    from vopt.kvcache import VidKVConfig, decode_cuda, kivi_config, quantize_keys, quantize_values

    k = torch.randn(1, 2, 300, 64, generator=g).cuda().half()
    v = torch.randn(1, 2, 300, 64, generator=g).cuda().half()
    q = torch.randn(1, 4, 1, 64, generator=g).cuda().half()
    for name, cfg in (("kivi", kivi_config()), ("vidkv", VidKVConfig())):
        pk, pv = quantize_keys(k[:, :, :290], cfg), quantize_values(v[:, :, :290], cfg)
        wk, wv = k[:, :, 290:], v[:, :, 290:]
        why = decode_cuda.unsupported_reason(q, pk, pv, wk, wv, True)
        for splits in (1, 3):
            if why:
                print(f"skip vidkv_decode {name}: {why}")
                break
            out = decode_cuda.packed_decode_attention_cuda(q, pk, pv, wk, wv, enable_gqa=True, splits=splits)
            torch.cuda.synchronize()
            print(f"ok   vidkv_decode {name} splits={splits} finite={bool(torch.isfinite(out).all())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

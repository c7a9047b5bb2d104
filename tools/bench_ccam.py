#!/usr/bin/env python
"""CCAM benchmark: block-sparse causal cross-attention vs dense masked attention (Video-CCAM projector shapes).

Shapes (issue 9): the Video-CCAM-7B projector's cross-attention, ``Q = 1024`` learnable queries attending to
``T x P`` frame tokens (``P = 729`` SigLIP tokens per frame, frame-major), ``H = 16`` heads of ``D = 64``
(projector width 1024 / 16 heads, ``vopt/zoo/video_ccam.py`` FULL_PROJECTOR; 64 is a power of two, so the
Triton kernel computes with no head-dim padding; the 72 of SigLIP's own attention is *not* this op), batch 1,
fp16 on GPU, ``T`` in {8, 16, 32} (``--frames``). Mask: :class:`vopt.ops.ccam_mask.CCAMMask` (``--form``
ceil/floor). For every T it times, on the same inputs and in the same run:

* ``sdpa-<backend>-bool`` / ``sdpa-<backend>-add``: ``F.scaled_dot_product_attention`` pinned to one backend
  (flash, efficient, cudnn, math) with the dense bool mask ``[Q, T*P]`` or the additive (0 / -inf) mask; a
  backend that refuses (flash takes no mask) records torch's reason. **The baseline** of the speedup column is
  the fastest of these rows in the same case;
* ``flex-eager`` / ``flex-compiled``: FlexAttention with ``CCAMMask.to_flex_block_mask`` (compiled on GPU only,
  ``--no-compile`` skips it; the block mask is built once, outside the timing);
* ``vopt-triton-dense``: ``vopt.kernels.block_sparse_attention.block_sparse_attention_triton`` with the live
  block mask, the cached compacted layout (``CCAMMask.layout``) and the dense bool mask (read in partial tiles);
* ``vopt-triton-prefix``: the same with ``key_prefix=CCAMMask.keys_visible()`` and no dense mask;
* ``vopt-triton-{dense,prefix}-kernel``: the same kernels launched alone (``prepare_launch`` done once beforehand:
  no validation / host checks; at these sizes the GPU kernel takes ~0.1 ms, so host overhead matters);
* ``vopt-sage-dense``: ``vopt.kernels.sage_attention.sage_attention_triton`` (SageAttention2 INT8 QK / FP8 PV)
  with the dense bool mask: the ``ccam`` + ``sageattention2`` composition; the kernel skips key tiles the mask
  hides entirely (128 x 64 tiles). Quantized, so its cos vs the fp32 reference is ~0.999, not ~1;
* ``vopt-reference``: the torch block-sparse reference (a Python loop over query blocks): ``--smoke`` or
  ``--reference`` only.

Per row: ms (median; CUDA events on GPU), effective TFLOPs counting only visible elements
``4·B·H·Σ_i keys_visible(i)·D / t``, speedup vs the best dense masked SDPA row, the skipped-tile fraction
(0 for dense SDPA; the kernel's ``block_q x block_k`` tiles for vopt; FlexAttention's block size for flex), and
max abs diff / cosine vs an fp32 dense masked SDPA reference (on the first ``--ref-heads`` heads when
``T*P > --ref-full-max-keys``; column ``ref``).

CPU runs are real CPU timings (``time.perf_counter``, the device line says so) at small default sizes (Q 512,
T 8/16, P 64, H 4, D 64, fp32); Triton runs on CPU only under the interpreter (``--smoke`` or ``--interpret``),
which is a harness check, not a timing. ``--smoke``: Q 64, T 4, P 16, H 2, D 32, blocks 16x16.

    python tools/bench_ccam.py [--out FILE [--force]] [--frames 8,16,32] [--queries 1024] [--tokens 729]
        [--heads 16] [--head-dim 64] [--batch 1] [--block-q 64] [--block-k 64] [--form ceil|floor]
        [--no-compile] [--reference] [--interpret] [--max-seconds S] [--smoke]

Timing helpers, device/version report and size parsing come from ``tools/bench_kernels.py``; the
single-call/failure capture and rep selection from ``tools/bench_attention.py``.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import (  # noqa: E402
    bench_info, fmt, measurement_mode, parse_size, pick_device, refuses_overwrite, write_json)
from bench_attention import measure, run_once  # noqa: E402  (bench_attention's Timer is bench_kernels.Timer)

SDPA_BACKENDS = ["flash", "efficient", "cudnn", "math"]
GPU = dict(frames=[8, 16, 32], queries=1024, tokens=729, heads=16, head_dim=64, batch=1, block_q=64, block_k=64)
CPU = dict(frames=[8, 16], queries=512, tokens=64, heads=4, head_dim=64, batch=1, block_q=64, block_k=64)
SMOKE = dict(frames=[4], queries=64, tokens=16, heads=2, head_dim=32, batch=1, block_q=16, block_k=16)
SMOKE_NOTE = "SMOKE TEST: tiny sizes{} -- NOT a performance measurement"


@dataclass
class Row:
    family: str  # sdpa | flex | vopt
    impl: str
    frames: int
    queries: int
    tokens_per_frame: int
    heads: int
    head_dim: int
    batch: int
    dtype: str
    ms: Optional[float] = None
    tflops: Optional[float] = None
    speedup: Optional[float] = None
    skipped: Optional[float] = None
    max_abs: Optional[float] = None
    cos: Optional[float] = None
    ref: str = ""
    note: str = ""


def _sdpa_fn(name, q, k, v, mask):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]

    def fn():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return fn


def _kernels():
    try:
        from vopt.kernels import block_sparse_attention as kb

        return kb, None
    except Exception as exc:  # noqa: BLE001 - reported in the row
        return None, f"import vopt.kernels.block_sparse_attention failed: {type(exc).__name__}: {exc}"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(frames: int, cfg: dict, args, device, dtype) -> list:
    from vopt.ops.block_sparse_attention import block_sparse_attention_reference
    from vopt.ops.ccam_mask import CCAMMask

    bsz, h, nq, p, d = cfg["batch"], cfg["heads"], cfg["queries"], cfg["tokens"], cfg["head_dim"]
    bq, bk = cfg["block_q"], cfg["block_k"]
    cm = CCAMMask(nq, frames, p, args.form)
    nk = cm.num_keys
    dname = {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    g = torch.Generator(device="cpu").manual_seed(1234 + frames)
    q = torch.randn(bsz, h, nq, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(bsz, h, nk, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(bsz, h, nk, d, generator=g).to(device=device, dtype=dtype)
    dense = cm.dense(device)                                              # bool [Q, K], True = visible
    additive = torch.zeros(nq, nk, dtype=dtype, device=device).masked_fill(~dense, float("-inf"))
    flops = 4.0 * bsz * h * float(cm.keys_visible().sum()) * d

    # fp32 dense masked reference, on the first --ref-heads heads for large key counts.
    if nk > args.ref_full_max_keys and h > args.ref_heads:
        sub = (slice(None), slice(0, args.ref_heads))
        ref_label = f"h0-{args.ref_heads - 1} of {h}"
    else:
        sub = (slice(None), slice(None))
        ref_label = "all"
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q[sub].float(), k[sub].float(), v[sub].float(), attn_mask=dense)

    rows = []

    def add(family, impl, fn, skipped, note=""):
        row = Row(family, impl, frames, nq, p, h, d, bsz, dname, skipped=skipped, ref=ref_label, note=note)
        rows.append(row)
        if fn is None:
            row.ref = ""
            return row
        out, why = run_once(fn)
        if why is not None:
            row.note = (note + "; " if note else "") + why
            row.ref = ""
            return row
        o, r = out[sub].double(), ref.double()
        row.max_abs = (o - r).abs().max().item()
        row.cos = F.cosine_similarity(o.flatten(), r.flatten(), dim=0).item()
        del out, o
        try:
            row.ms = measure(fn, device, args)
        except torch.OutOfMemoryError as exc:
            row.note = (note + "; " if note else "") + f"out of memory while timing: {str(exc).splitlines()[0]}"
        if row.ms:
            row.tflops = flops / (row.ms * 1e-3) / 1e12
        return row

    # (a) dense masked SDPA, every backend, bool and additive masks.
    for name in args.sdpa:
        for kind, mask in (("bool", dense), ("add", additive)):
            impl = f"sdpa-{name}-{kind}"
            if device.type == "cpu" and name in ("efficient", "cudnn"):
                add("sdpa", impl, None, 0.0, "unavailable: torch has no CPU kernel for this SDPA backend")
                continue
            add("sdpa", impl, _sdpa_fn(name, q, k, v, mask), 0.0)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # (b) FlexAttention with the CCAM block mask (built once, outside the timing).
    fb = args.flex_block
    try:
        from torch.nn.attention.flex_attention import flex_attention

        bm = cm.to_flex_block_mask(block_size=fb, device=device)
        flex_why = None
    except Exception as exc:  # noqa: BLE001
        flex_attention = bm = None
        flex_why = f"FlexAttention unavailable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    fskip = cm.skipped_fraction(fb, fb)
    if flex_why:
        add("flex", "flex-eager", None, fskip, flex_why)
    else:
        add("flex", "flex-eager", lambda: flex_attention(q, k, v, block_mask=bm), fskip,
            f"eager (unfused reference path), block {fb}")
    if args.no_compile:
        add("flex", "flex-compiled", None, fskip, "skipped: --no-compile")
    elif device.type != "cuda":
        add("flex", "flex-compiled", None, fskip, "skipped: compiled only on GPU")
    elif flex_why:
        add("flex", "flex-compiled", None, fskip, flex_why)
    else:
        compiled = torch.compile(flex_attention, dynamic=False)
        add("flex", "flex-compiled", lambda: compiled(q, k, v, block_mask=bm), fskip,
            f"torch.compile(flex_attention), block {fb}")

    # (c) vopt Triton block-sparse: dense mask, then key_prefix (no [Q, K] mask read).
    lay = cm.layout(bq, bk)
    skip = 1.0 - lay.live_fraction
    live = lay.live
    compacted = tuple(t.to(device) for t in (lay.kv_num, lay.kv_idx, lay.kv_full))
    prefix = cm.keys_visible().to(device=device, dtype=torch.int32)
    tiles = f"tiles {bq}x{bk}"
    kb, why = _kernels()
    if device.type == "cpu" and not (args.smoke or args.interpret):
        why = "skipped: on CPU Triton runs only under the interpreter (--smoke or --interpret)"
    elif kb is not None:
        why = kb.unsupported_reason(q, k, v, live, bq, bk, dense)
        why = f"unsupported: {why}" if why else None
    variants = (("dense", dict(dense_mask=dense), "dense bool mask in partial tiles"),
                ("prefix", dict(dense_mask=None, key_prefix=prefix), "key_prefix (no dense mask)"))
    interp = "; Triton interpreter" if device.type == "cpu" else ""
    for name, kw, what in variants:
        impl = f"vopt-triton-{name}"
        if why:
            add("vopt", impl, None, skip, why)
            add("vopt", impl + "-kernel", None, skip, why)
            continue
        dm = kw.get("dense_mask")
        kp = kw.get("key_prefix")
        add("vopt", impl,
            lambda dm=dm, kp=kp: kb.block_sparse_attention_triton(q, k, v, live, bq, bk, dm, compacted=compacted,
                                                                  key_prefix=kp),
            skip, f"{tiles}, {what}, end to end (host checks + launch){interp}")
        try:
            grid, kargs, kkw, kout = kb.prepare_launch(q, k, v, live, bq, bk, dm, compacted=compacted, key_prefix=kp)

            def kernel_only(grid=grid, kargs=kargs, kkw=kkw, kout=kout):
                kb.launch(kb._bsa_fwd_kernel, grid, device, *kargs, **kkw)
                return kout

            add("vopt", impl + "-kernel", kernel_only, skip, f"{tiles}, {what}, kernel launch only{interp}")
        except Exception as exc:  # noqa: BLE001 - reported in the row
            add("vopt", impl + "-kernel", None, skip, f"prepare_launch failed: {type(exc).__name__}: {exc}")

    # (c2) vopt CUDA block-sparse (cuda/block_sparse_attn.cu: exact mma.sync, 64x64 kernel tiles, dense mask).
    try:
        from vopt.ops import block_sparse_cuda as bcu

        cwhy = bcu.unsupported_reason(q, k, v, live, bq, bk, dense)
        cwhy = f"unsupported: {cwhy}" if cwhy else None
    except Exception as exc:  # noqa: BLE001 - reported in the row
        bcu, cwhy = None, f"import vopt.ops.block_sparse_cuda failed: {type(exc).__name__}: {exc}"
    cskip = skip
    if not cwhy:
        ctiles = bcu.kernel_tiles(live, nq, nk, bq, bk, True)
        cskip = float((ctiles == 0).float().mean())
    add("vopt", "vopt-cuda-dense", None if cwhy else (lambda: bcu.block_sparse_attention_cuda(q, k, v, live, bq, bk,
                                                                                              dense)),
        cskip, cwhy or "CUDA mma.sync, 64x64 kernel tiles (dead ones never loaded), dense bool mask in live tiles")

    # (e) SageAttention2 Triton with the dense bool mask (quantized + masked; dead 128x64 tiles skipped).
    try:
        from vopt.kernels import sage_attention as sk

        swhy = sk.unsupported_reason(q, k, v, dense, None)
        swhy = f"unsupported: {swhy}" if swhy else None
    except Exception as exc:  # noqa: BLE001 - reported in the row
        sk, swhy = None, f"import vopt.kernels.sage_attention failed: {type(exc).__name__}: {exc}"
    if device.type == "cpu" and not (args.smoke or args.interpret):
        swhy = "skipped: on CPU Triton runs only under the interpreter (--smoke or --interpret)"
    sage_skip = 1.0 - float(cm.layout(128, 64).live_fraction) if not swhy else skip
    add("vopt", "vopt-sage-dense", None if swhy else (lambda: sk.sage_attention_triton(q, k, v, attn_mask=dense)),
        sage_skip, swhy or f"SageAttention2 INT8/FP8, dense bool mask, dead 128x64 tiles skipped{interp}")

    # (d) torch block-sparse reference (slow Python loop): smoke / --reference only.
    if args.smoke or args.reference:
        add("vopt", "vopt-reference",
            lambda: block_sparse_attention_reference(q, k, v, live, bq, bk, dense), skip, f"{tiles}, torch loop")
    else:
        add("vopt", "vopt-reference", None, skip, "skipped: slow Python loop (--smoke or --reference)")

    # Speedup vs the fastest dense masked SDPA row of this case.
    sdpa_ok = {r.impl: r.ms for r in rows if r.family == "sdpa" and r.ms}
    base = min(sdpa_ok, key=sdpa_ok.get) if sdpa_ok else None
    for r in rows:
        if base and r.ms:
            r.speedup = sdpa_ok[base] / r.ms
            if r.impl == base:
                r.note = (r.note + "; " if r.note else "") + "speedup baseline"
    return rows  # the inputs go with this frame; main() collects and empties the CUDA cache


def print_table(info: dict, rows: list, file=sys.stdout) -> None:
    for key, val in info.items():
        print(f"# {key}: {val}", file=file)
    head = (f"{'impl':<26} {'T':>3} {'keys':>6} {'ms':>10} {'TFLOPs':>8} {'speedup':>8} {'skipped':>7} "
            f"{'max_abs':>9} {'cos':>9} {'ref':<12} note")
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in rows:
        print(f"{r.impl:<26} {r.frames:>3} {r.frames * r.tokens_per_frame:>6} {fmt(r.ms, '10.4f')} "
              f"{fmt(r.tflops, '8.3f')} {fmt(r.speedup, '8.2f')} {fmt(r.skipped, '7.3f')} "
              f"{fmt(r.max_abs, '9.2e')} {fmt(r.cos, '9.6f')} {r.ref:<12} {r.note}", file=file)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", help="comma list of frame counts T (default 8,16,32 GPU; 8,16 CPU; 4 smoke)")
    p.add_argument("--queries", type=parse_size, help="learnable queries Q (default 1024 GPU, 512 CPU, 64 smoke)")
    p.add_argument("--tokens", type=parse_size, help="tokens per frame P (default 729 GPU, 64 CPU, 16 smoke)")
    p.add_argument("--heads", type=int, help="heads H (default 16 GPU, 4 CPU, 2 smoke)")
    p.add_argument("--head-dim", type=int, help="head dim D (default 64 = projector 1024 / 16 heads; 32 smoke)")
    p.add_argument("--batch", type=int, help="batch (default 1)")
    p.add_argument("--block-q", type=int, help="vopt query tile (default 64; 16 smoke)")
    p.add_argument("--block-k", type=int, help="vopt key tile (default 64; 16 smoke)")
    p.add_argument("--flex-block", type=int, default=128, help="FlexAttention block size (default 128)")
    p.add_argument("--form", choices=["ceil", "floor"], default="ceil", help="CCAM mask form (default ceil)")
    p.add_argument("--dtype", choices=["fp16", "fp32"], help="default fp16 on GPU, fp32 on CPU")
    p.add_argument("--sdpa", default=",".join(SDPA_BACKENDS), help=f"SDPA backends ({', '.join(SDPA_BACKENDS)})")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile'd FlexAttention")
    p.add_argument("--reference", action="store_true", help="also time the (slow) torch block-sparse reference")
    p.add_argument("--interpret", action="store_true", help="on CPU, run Triton under the interpreter (not a timing)")
    p.add_argument("--ref-full-max-keys", type=parse_size, default=8 << 10,
                   help="above this many keys the fp32 reference covers the first --ref-heads heads (default 8k)")
    p.add_argument("--ref-heads", type=int, default=4)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny sizes; a harness test, not a measurement")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 3 GPU, 1 CPU, 0 smoke)")
    p.add_argument("--reps", type=int, default=None, help="max timed runs (default 30 GPU, 5 CPU, 2 smoke)")
    p.add_argument("--min-reps", type=int, default=None, help="min timed runs (default 5 GPU, 1 CPU)")
    p.add_argument("--target-ms", type=float, default=300.0, help="aim for about this much timed work per row")
    p.add_argument("--cold-l2", action="store_true", help="flush L2 before every timed run (GPU)")
    p.add_argument("--max-seconds", type=float, default=None, help="start no new T after this many seconds")
    p.add_argument("--out", type=Path, help="write results as JSON here (rewritten after every case)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    args = p.parse_args(argv)

    if refuses_overwrite("bench_ccam", args.out, args.force):
        return 2
    args.sdpa = [s for s in args.sdpa.split(",") if s]
    bad = [s for s in args.sdpa if s not in SDPA_BACKENDS]
    if bad:
        print(f"bench_ccam: unknown SDPA backends {bad}", file=sys.stderr)
        return 2
    device = pick_device("bench_ccam", args.device)
    if device is None:
        return 2
    use_cuda = device.type == "cuda"
    if device.type == "cpu" and (args.smoke or args.interpret):
        # Must precede the first import of the kernel module (@triton.jit decides at decoration).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    cfg = dict(SMOKE if args.smoke else (GPU if use_cuda else CPU))
    if args.frames:
        cfg["frames"] = [int(s) for s in args.frames.split(",") if s.strip()]
    for key in ("queries", "tokens", "heads", "head_dim", "batch", "block_q", "block_k"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype or ("fp16" if use_cuda else "fp32")]
    args.warmup = args.warmup if args.warmup is not None else (3 if use_cuda else (0 if args.smoke else 1))
    args.reps = args.reps or (30 if use_cuda else (2 if args.smoke else 5))
    args.min_reps = args.min_reps or (5 if use_cuda else 1)

    smoke_note = SMOKE_NOTE.format(", Triton interpreter, CPU timing" if device.type == "cpu" else "")
    info = bench_info(device, smoke_note if args.smoke else measurement_mode(device))
    info.update(shape=dict(cfg, dtype=args.dtype or ("fp16" if use_cuda else "fp32"), form=args.form),
                flex_block=args.flex_block, warmup=args.warmup, max_reps=args.reps, min_reps=args.min_reps,
                target_ms=args.target_ms, cold_l2=bool(args.cold_l2 and use_cuda),
                tflops_formula="4*B*H*sum_i keys_visible(i)*D / t (visible elements only)",
                speedup="vs the fastest dense masked SDPA row of the same T",
                reference=(f"fp32 dense masked SDPA; above {args.ref_full_max_keys} keys on the first "
                           f"{args.ref_heads} heads"),
                head_dim_note="projector head dim 1024/16 = 64 (a power of two: no Triton padding)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    rows, skipped = [], []
    for t in cfg["frames"]:
        if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
            skipped.append(t)
            continue
        rows.extend(run_case(t, cfg, args, device, dtype))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"# done T={t} ({time.perf_counter() - start:.1f}s)", file=sys.stderr)
        if args.out is not None:
            write_json(args.out, {"meta": dict(info, complete=False), "results": [asdict(r) for r in rows]})
    if skipped:
        info["skipped_frames"] = f"{skipped} (over --max-seconds {args.max_seconds})"
    info["seconds"] = round(time.perf_counter() - start, 1)
    print_table(info, rows)
    if args.smoke:
        print(f"# {info['mode']}")
    if args.out is not None:
        write_json(args.out, {"meta": dict(info, complete=not skipped), "results": [asdict(r) for r in rows]})
        print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

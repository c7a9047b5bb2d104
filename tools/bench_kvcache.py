#!/usr/bin/env python
"""KV-cache benchmark: stored bytes of FP16 / KIVI-2 / VidKV caches and decode latency vs context length.

Method: shared/specs/kvcache.md §2 (honest bits) and §6.1, §6.4 (how to measure). Two parts, one run:

1. **Memory** (full-size zoo models, ``vopt.zoo.build(name, size="full")`` on the meta device: only the decoder
   dimensions are read). Nothing is allocated at full size: per model and setting ONE representative block
   ``[1, kv_heads, T_mem, head_dim]`` (``T_mem`` = 4096, 256 with ``--smoke``; random N(0,1) fp16 K and V) is
   quantized with :func:`vopt.kvcache.quantize_keys` / :func:`quantize_values` and measured with
   :func:`vopt.kvcache.account` (``numel·element_size`` of everything the packed containers hold: codes, scales and
   zero points, channel indices). ``T_mem`` is a multiple of every group size, so there is no fp16 tail. Bytes
   scale linearly per token except the channel index lists (a per-sequence constant per layer and head, kept as
   such): ``bytes(T) = layers·(per_token·T + indices)``. Bits/element and the ratio come from ``account`` at
   ``T_mem``. Settings: FP16; KIVI-2 (G32); VidKV reference (G32, the published code's storage); VidKV recommended
   at G32 and G64. Videos: LLaVA-OV at 32 frames (``zm.visual_tokens(32)``); VideoLLM-online streaming 1 hour at
   the zoo entry's 2 fps (``DEFAULT_FRAMES["full"]`` = 1200 frames = 10 min), ``1 + tokens_per_frame`` cache
   tokens per frame (the interval token ``,`` plus the frame's visual tokens). **Excluded**: the FP16 residual
   window (at most R = 128 tokens per sequence: ``R·FP16 bytes/token``) and transient dequantization buffers.

2. **Decode latency** per generated token vs context length T, batch 1, ONE layer, LLaVA-OV-7B's attention shape
   (28 query heads, 4 KV heads, head_dim 128, GQA; ``--smoke``: 4/2/64). The cache is ``[packed T − W | fp16
   window W]`` (W = 64 = R/2, the mean residual; the FP16 baseline has all T tokens dense). Methods, timed on the
   same inputs, A/B alternated in one process (``--rounds`` rounds per context, median of the rounds' medians):

   * ``fp16-sdpa``: ``F.scaled_dot_product_attention`` over a dense fp16 cache (**the baseline**: slope ratio and
     break-even are vs this one);
   * ``fp32-sdpa``: the same over a dense fp32 copy (on CPUs without fast fp16 math, fp16 SDPA is far slower than
     fp32, so on CPU this is the fair dense reference; ``slope/fp32`` column);
   * ``torch-packed`` (KIVI-2, VidKV recommended G32): :func:`vopt.kvcache.packed_decode_attention`, the torch
     reference computing logits on the codes;
   * ``dequant+sdpa`` (same two): dequantize the whole packed cache every step, then fp16 SDPA (what transformers'
     quantized caches and the VidKV reference do);
   * ``triton`` (same two): ``vopt.kernels.vidkv_decode.packed_decode_attention_triton`` on CUDA; on CPU Triton only
     runs in its interpreter, so it is **skipped on CPU unless** ``--interpret`` (then it is an interpreter timing,
     not a performance number, and the row says so);
   * ``cuda`` (same two): ``vopt.kvcache.decode_cuda.packed_decode_attention_cuda`` (``libvopt_cuda.so``, tokens
     split over CTAs flash-decoding style); GPU only.

   Per method a least-squares fit ``µs = slope·T/1000 + intercept`` (spec §6.4), the slope ratio vs FP16 and the
   break-even context (where it exists). ``max_abs_err``: output vs an fp32 SDPA over the same cache (dequantized
   for the packed methods, the fp16 cache for the baseline): a correctness check, not an accuracy result.

CPU runs are real CPU measurements of these shapes (``time.perf_counter``; the device line says so); GPU runs use
CUDA events and contexts 1K..32K. Table + JSON (``--out``, refused if it exists unless ``--force``) with the device
and versions (``environment`` from ``tools/bench_kernels.py``, like the other benchmarks).

    python tools/bench_kvcache.py [--out FILE [--force]] [--contexts 512,1k,2k,4k] [--smoke] [--interpret]
        [--device auto|cuda|cpu] [--rounds 3] [--reps N] [--warmup N] [--max-seconds S] [--no-memory|--no-latency]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import (  # noqa: E402
    Timer, bench_info, fmt, measurement_mode, parse_size, pick_device, refuses_overwrite, write_json)

GPU_CONTEXTS = [1 << 10, 2 << 10, 4 << 10, 8 << 10, 16 << 10, 32 << 10]
CPU_CONTEXTS = [512, 1 << 10, 2 << 10, 4 << 10]
SMOKE_CONTEXTS = [128, 256]
MEM_TOKENS = 4096
SMOKE_MEM_TOKENS = 256
WINDOW = 64                      # fp16 residual window in the latency cases (R/2, R = 128)
RESIDUAL_R = 128                 # residual window length, for the memory note
LLAVA_FRAMES = 32
STREAM_SECONDS = 3600
SMOKE_NOTE = "SMOKE TEST: tiny attention shapes -- NOT a performance measurement"


def settings() -> dict:
    """name -> VidKVConfig (None = FP16)."""
    from vopt.kvcache import VidKVConfig, kivi_config

    return {
        "fp16": None,
        "kivi2-g32": kivi_config(32),
        "vidkv-ref-g32": VidKVConfig(mode="reference"),
        "vidkv-rec-g32": VidKVConfig(),
        "vidkv-rec-g64": VidKVConfig(key_group_size=64, value_group_size=64),
    }


LATENCY_SETTINGS = ("kivi2-g32", "vidkv-rec-g32")


# ---- memory --------------------------------------------------------------------------------------------------


@dataclass
class MemRow:
    model: str
    setting: str
    layers: int
    kv_heads: int
    head_dim: int
    t_mem: int
    bits_per_element: float
    bits: dict
    bytes_per_token: float          # all layers, K + V (index lists amortized over `tokens`, see bytes_per_video)
    index_bytes_per_sequence: int   # all layers: channel index lists (constant per sequence)
    video: str
    tokens: int
    bytes_per_video: int
    ratio_vs_fp16: Optional[float] = None


def model_videos() -> list:
    """(zoo name, LLMDims, video description, cache tokens) for the two models of the table."""
    import vopt.zoo as zoo
    from vopt.zoo.videollm_online import DEFAULT_FRAMES

    out = []
    ov = zoo.build("llava-onevision", size="full")
    out.append(("llava-onevision", ov.llm, f"{LLAVA_FRAMES} frames (visual tokens)", ov.visual_tokens(LLAVA_FRAMES)))
    vo = zoo.build("videollm-online", size="full")
    fps = DEFAULT_FRAMES["full"] / 600.0      # the zoo default: 1200 frames = 10 min at 2 fps
    frames = int(round(STREAM_SECONDS * fps))
    per_frame = 1 + vo.model.tokens_per_frame  # interval token + visual tokens, each frame prefilled onto the cache
    out.append(("videollm-online", vo.llm,
                f"1 h stream at {fps:g} fps = {frames} frames x {per_frame} tokens", frames * per_frame))
    return out


def memory_rows(t_mem: int) -> list:
    from vopt.kvcache import account, quantize_keys, quantize_values

    rows = []
    for name, llm, video, tokens in model_videos():
        gen = torch.Generator().manual_seed(0)
        shape = (1, llm.kv_heads, t_mem, llm.head_dim)
        k = torch.randn(*shape, generator=gen).to(torch.float16)
        v = torch.randn(*shape, generator=gen).to(torch.float16)
        fp16_bytes = None
        for sname, cfg in settings().items():
            if cfg is None:
                acc = account(k, v, label=sname)
            else:
                acc = account(quantize_keys(k, cfg), quantize_values(v, cfg), label=sname)
            assert acc.elements == 2 * k.numel()
            per_token = (acc.total_bytes - acc.indices) / t_mem * llm.layers
            idx = acc.indices * llm.layers
            row = MemRow(name, sname, llm.layers, llm.kv_heads, llm.head_dim, t_mem, acc.bits_per_element,
                         acc.bits(), per_token, idx, video, tokens, int(round(per_token * tokens)) + idx)
            if cfg is None:
                fp16_bytes = row.bytes_per_video
            row.ratio_vs_fp16 = fp16_bytes / row.bytes_per_video
            rows.append(row)
    return rows


def print_memory(rows: list, file=sys.stdout) -> None:
    head = (f"{'model':<16} {'setting':<14} {'bits/elem':>9} {'B/token':>10} {'tokens':>7} {'MiB/video':>10} "
            f"{'x fp16':>7}  video")
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in rows:
        print(f"{r.model:<16} {r.setting:<14} {r.bits_per_element:>9.4f} {r.bytes_per_token:>10.1f} {r.tokens:>7} "
              f"{r.bytes_per_video / 2**20:>10.2f} {r.ratio_vs_fp16:>7.2f}  {r.video}", file=file)
    print(f"# bytes/token: all layers, K+V, from one quantized [1, kv_heads, {rows[0].t_mem if rows else '?'}, hd] "
          f"block (account); MiB/video adds the per-sequence channel index lists; excludes the fp16 residual "
          f"window (<= {RESIDUAL_R} tokens x fp16 bytes/token) and transient dequantization buffers", file=file)


# ---- latency -------------------------------------------------------------------------------------------------


@dataclass
class LatRow:
    method: str
    setting: str
    context: int
    us: Optional[float]
    max_abs_err: Optional[float] = None
    note: str = ""


@dataclass
class Fit:
    method: str
    setting: str
    points: int
    slope_us_per_1k: Optional[float]
    intercept_us: Optional[float]
    slope_ratio_vs_fp16: Optional[float] = None
    slope_ratio_vs_fp32: Optional[float] = None
    break_even_tokens: Optional[float] = None
    note: str = ""


def _triton_module(device: torch.device, interpret: bool):
    """(module, None) or (None, why not)."""
    if device.type != "cuda" and not interpret:
        return None, "skipped on CPU: Triton runs only in its interpreter there (pass --interpret)"
    try:
        from vopt.kernels import vidkv_decode
    except Exception as exc:  # noqa: BLE001
        return None, f"import failed: {type(exc).__name__}: {exc}"
    return vidkv_decode, None


def latency_case(T: int, shape: dict, device: torch.device, dtype: torch.dtype, triton_mod, triton_why: str,
                 interpret: bool) -> list:
    """Callables for one context length: [(method, setting, fn or None, reference or None, note)]."""
    from vopt.kvcache import dequantize_keys, dequantize_values, packed_decode_attention, quantize_keys, \
        quantize_values

    hq, hkv, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    gen = torch.Generator().manual_seed(T)
    k = torch.randn(1, hkv, T, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(1, hkv, T, d, generator=gen).to(device=device, dtype=dtype)
    q = torch.randn(1, hq, 1, d, generator=gen).to(device=device, dtype=dtype)
    W = min(WINDOW, T // 2)
    wk, wv = k[:, :, T - W:].contiguous(), v[:, :, T - W:].contiguous()

    def sdpa32(kk, vv):
        return F.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), enable_gqa=True)

    cases = [("fp16-sdpa", "fp16", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
              lambda: sdpa32(k, v), f"dense {str(dtype).removeprefix('torch.')} cache; baseline")]
    k32, v32, q32 = k.float(), v.float(), q.float()
    cases.append(("fp32-sdpa", "fp32", lambda: F.scaled_dot_product_attention(q32, k32, v32, enable_gqa=True),
                  lambda: sdpa32(k, v), "dense fp32 cache (the fast dense path on CPUs without fp16 math)"))
    for sname in LATENCY_SETTINGS:
        cfg = settings()[sname]
        pk = quantize_keys(k[:, :, : T - W], cfg)
        pv = quantize_values(v[:, :, : T - W], cfg)
        kd, vd = dequantize_keys(pk), dequantize_values(pv)
        ref = (lambda kd=kd, vd=vd: sdpa32(torch.cat([kd, wk], 2), torch.cat([vd, wv], 2)))
        cases.append(("torch-packed", sname,
                      lambda pk=pk, pv=pv: packed_decode_attention(q, pk, pv, wk, wv, enable_gqa=True), ref,
                      f"packed {T - W} + fp16 window {W}"))

        def deq(pk=pk, pv=pv):
            kk = torch.cat([dequantize_keys(pk), wk], 2)
            vv = torch.cat([dequantize_values(pv), wv], 2)
            return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)

        cases.append(("dequant+sdpa", sname, deq, ref, "whole cache dequantized every step"))
        if triton_mod is None:
            cases.append(("triton", sname, None, None, triton_why))
        else:
            why = triton_mod.unsupported_reason(q, pk, pv, wk, wv, enable_gqa=True)
            if why:
                cases.append(("triton", sname, None, None, f"unsupported: {why}"))
            else:
                note = "TRITON INTERPRETER: not a performance number" if device.type != "cuda" else "fused kernel"
                cases.append(("triton", sname,
                              lambda pk=pk, pv=pv: triton_mod.packed_decode_attention_triton(
                                  q, pk, pv, wk, wv, enable_gqa=True), ref, note))
        cases.append(_cuda_case(q, pk, pv, wk, wv, sname, ref))
    return cases


def _cuda_case(q, pk, pv, wk, wv, sname, ref) -> tuple:
    """The ``cuda`` row: vopt.kvcache.decode_cuda (libvopt_cuda.so, split over tokens), or why it cannot run."""
    try:
        from vopt.kvcache import decode_cuda
    except Exception as exc:  # noqa: BLE001 - reported in the row
        return ("cuda", sname, None, None, f"import failed: {type(exc).__name__}: {exc}")
    why = decode_cuda.unsupported_reason(q, pk, pv, wk, wv, enable_gqa=True)
    if why:
        return ("cuda", sname, None, None, f"unsupported: {why}")
    splits = decode_cuda.choose_splits(pk.shape[0] * pk.shape[1], pk.shape[2] + wk.shape[2], q.device)
    return ("cuda", sname, lambda: decode_cuda.packed_decode_attention_cuda(q, pk, pv, wk, wv, enable_gqa=True),
            ref, f"fused CUDA kernel, {splits} token splits")


def run_latency(contexts: list, shape: dict, device: torch.device, dtype: torch.dtype, timer: Timer, rounds: int,
                interpret: bool, max_seconds: Optional[float], start: float) -> tuple:
    triton_mod, triton_why = _triton_module(device, interpret)
    rows, skipped = [], []
    for T in contexts:
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            skipped.append(T)
            continue
        cases = latency_case(T, shape, device, dtype, triton_mod, triton_why, interpret)
        errs, times = {}, {}
        for method, sname, fn, ref, note in cases:
            if fn is None:
                continue
            try:
                out = fn()
                errs[(method, sname)] = (out.float() - ref().float()).abs().max().item()
                times[(method, sname)] = []
            except Exception as exc:  # noqa: BLE001 - reported in the row
                errs[(method, sname)] = f"failed: {type(exc).__name__}: {exc}"
        for _ in range(rounds):  # A/B alternation: every method once per round
            for method, sname, fn, _ref, _note in cases:
                if (method, sname) in times:
                    times[(method, sname)].append(timer(fn) * 1e3)
        for method, sname, fn, _ref, note in cases:
            err = errs.get((method, sname))
            if isinstance(err, str):
                rows.append(LatRow(method, sname, T, None, None, err))
            elif fn is None:
                rows.append(LatRow(method, sname, T, None, None, note))
            else:
                rows.append(LatRow(method, sname, T, statistics.median(times[(method, sname)]), err, note))
        del cases
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"# done context {T} ({time.perf_counter() - start:.1f}s)", file=sys.stderr)
    return rows, skipped


def fit_rows(rows: list) -> list:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.method, r.setting), []).append(r)
    fits = []
    for (method, sname), rs in groups.items():
        pts = [(r.context / 1000.0, r.us) for r in rs if r.us is not None and math.isfinite(r.us)]
        if len(pts) < 2:
            note = (rs[0].note if rs else "") or "fewer than 2 points"
            fits.append(Fit(method, sname, len(pts), None, None, note=note))
            continue
        mx = statistics.fmean(x for x, _ in pts)
        my = statistics.fmean(y for _, y in pts)
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
        fits.append(Fit(method, sname, len(pts), slope, my - slope * mx))
    base32 = next((f for f in fits if f.method == "fp32-sdpa" and f.slope_us_per_1k is not None), None)
    if base32 is not None and base32.slope_us_per_1k > 0:
        for f in fits:
            if f.slope_us_per_1k is not None:
                f.slope_ratio_vs_fp32 = f.slope_us_per_1k / base32.slope_us_per_1k
    base = next((f for f in fits if f.method == "fp16-sdpa" and f.slope_us_per_1k is not None), None)
    if base is not None:
        for f in fits:
            if f.slope_us_per_1k is None:
                continue
            if base.slope_us_per_1k > 0:
                f.slope_ratio_vs_fp16 = f.slope_us_per_1k / base.slope_us_per_1k
            ds = base.slope_us_per_1k - f.slope_us_per_1k
            di = f.intercept_us - base.intercept_us
            if f is not base and ds > 0 and di > 0:
                f.break_even_tokens = 1000.0 * di / ds  # beyond it the method is faster than fp16
    return fits


def print_latency(rows: list, fits: list, file=sys.stdout) -> None:
    head = f"{'method':<14} {'setting':<14} {'context':>8} {'us/token':>11} {'max_abs_err':>11}  note"
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in rows:
        print(f"{r.method:<14} {r.setting:<14} {r.context:>8} {fmt(r.us, '11.1f')} {fmt(r.max_abs_err, '11.2e')}  "
              f"{r.note}", file=file)
    print(file=file)
    head = (f"{'method':<14} {'setting':<14} {'pts':>3} {'us/1k tok':>10} {'intercept us':>12} {'slope/fp16':>10} "
            f"{'slope/fp32':>10} {'break-even T':>12}")
    print(head, file=file)
    print("-" * len(head), file=file)
    for f in fits:
        print(f"{f.method:<14} {f.setting:<14} {f.points:>3} {fmt(f.slope_us_per_1k, '10.2f')} "
              f"{fmt(f.intercept_us, '12.1f')} {fmt(f.slope_ratio_vs_fp16, '10.2f')} "
              f"{fmt(f.slope_ratio_vs_fp32, '10.2f')} {fmt(f.break_even_tokens, '12.0f')}  {f.note}", file=file)


# ---- main ----------------------------------------------------------------------------------------------------


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", help="comma list of context lengths, e.g. 1k,4k (default 512..4k CPU, 1k..32k GPU, "
                   "128,256 smoke)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (4 heads, 2 KV heads, hd 64; contexts 128,256; "
                   f"memory block of {SMOKE_MEM_TOKENS} tokens): a harness test, not a measurement")
    p.add_argument("--interpret", action="store_true", help="on CPU, also time the Triton kernel in the interpreter")
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="dtype of the dense cache / query")
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds per context (median of the rounds' medians)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per measurement (default 5 GPU, 2 CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default 30 GPU, 5 CPU)")
    p.add_argument("--max-seconds", type=float, default=None, help="start no new context after this many seconds")
    p.add_argument("--no-memory", action="store_true", help="skip the memory table")
    p.add_argument("--no-latency", action="store_true", help="skip the latency sweep")
    p.add_argument("--out", type=Path, help="write results as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    args = p.parse_args(argv)

    if refuses_overwrite("bench_kvcache", args.out, args.force):
        return 2
    device = pick_device("bench_kvcache", args.device)
    if device is None:
        return 2
    use_cuda = device.type == "cuda"
    if args.interpret and not use_cuda:
        # Must precede the first import of the kernel module (@triton.jit decides at decoration).
        os.environ["TRITON_INTERPRET"] = "1"
    if args.contexts:
        contexts = [parse_size(s) for s in args.contexts.split(",") if s.strip()]
    else:
        contexts = SMOKE_CONTEXTS if args.smoke else (GPU_CONTEXTS if use_cuda else CPU_CONTEXTS)
    bad = [c for c in contexts if c < 64]
    if bad:
        print(f"bench_kvcache: contexts {bad} too short (need >= 64)", file=sys.stderr)
        return 2
    shape = dict(heads=4, kv_heads=2, head_dim=64) if args.smoke else dict(heads=28, kv_heads=4, head_dim=128)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    warmup = args.warmup if args.warmup is not None else (5 if use_cuda else 2)
    reps = args.reps or (30 if use_cuda else 5)
    timer = Timer(device, warmup, reps, cold_l2=False)
    t_mem = SMOKE_MEM_TOKENS if args.smoke else MEM_TOKENS

    info = bench_info(device, SMOKE_NOTE if args.smoke else measurement_mode(device))
    info.update(latency_shape=dict(batch=1, layers=1, **shape, dtype=args.dtype, window=WINDOW),
                contexts=contexts, rounds=args.rounds, warmup=warmup, reps=reps, mem_tokens=t_mem,
                memory_method=("one random [1, kv_heads, T_mem, head_dim] fp16 K/V block quantized per setting; "
                               "vopt.kvcache.account bytes scaled linearly per token, channel index lists per "
                               "sequence; fp16 residual window excluded"),
                fit="us = slope * T/1000 + intercept, least squares over contexts")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    mem = [] if args.no_memory else memory_rows(t_mem)
    info["memory_seconds"] = round(time.perf_counter() - start, 1)
    lat, skipped = ([], []) if args.no_latency else run_latency(
        contexts, shape, device, dtype, timer, args.rounds, args.interpret, args.max_seconds, start)
    fits = fit_rows(lat)
    if skipped:
        info["skipped_contexts"] = f"{skipped} (over --max-seconds {args.max_seconds})"
    info["seconds"] = round(time.perf_counter() - start, 1)

    for key, val in info.items():
        print(f"# {key}: {val}")
    if mem:
        print()
        print_memory(mem)
    if lat:
        print()
        print_latency(lat, fits)
    if args.smoke:
        print(f"# {SMOKE_NOTE}")
    if args.out is not None:
        write_json(args.out, {"meta": dict(info, complete=not skipped), "memory": [asdict(r) for r in mem],
                              "latency": [asdict(r) for r in lat], "fits": [asdict(f) for f in fits]})
        print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

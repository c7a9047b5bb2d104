#!/usr/bin/env python
"""Attention benchmark: torch SDPA backends vs vopt's Triton SageAttention vs sageattention 1.0.6.

Method of the SageAttention reference benchmark (shared/specs/attention.md §3): B=4, H=32,
fp16, head_dim 64 and 128, N = 1K..32K, causal and not, and
``TOPS = 4·B·H·N²·D / t`` (halved for causal). For every (head_dim, causal, N) case it times,
on the same inputs and in the same run:

* ``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-cudnn`` / ``sdpa-math``: ``F.scaled_dot_product_attention``
  pinned to one backend with ``torch.nn.attention.sdpa_kernel`` (math is skipped above
  ``--math-max-seq``, default 8K, and when its N² scores would not fit in free memory); a backend
  that cannot run records the reason torch gives;
* ``vopt-triton``: :func:`vopt.kernels.sage_attention.sage_attention_triton` end to end
  (Q/K INT8 quantization, host-side V FP8 quantization, output allocation and the kernel);
* ``vopt-triton-kernel``: the attention kernel alone on inputs quantized beforehand
  (``prepare_sage_attention(...).launch``);
* ``vopt-cuda``: :func:`vopt.ops.sage_cuda.sage_attention_cuda` end to end (the hand-written kernels of
  ``libvopt_cuda.so``: fused Q/K/V quantization kernels + attention, preset ``int8_fp8`` -- per-thread INT8 QK, FP8
  PV -- or ``int8_fp16`` below sm_89), ``vopt-cuda-kernel`` the attention kernel alone on pre-quantized inputs
  (``prepare(...).launch``; the note names the kernel the library picked: ``wgmma`` on sm_90, ``mma`` otherwise),
  and on sm_90 ``vopt-cuda-mma-kernel``, the mma.sync kernel forced, for comparison;
* ``sageattn-1.0.6``: ``sageattention.sageattn`` (its own quantization included) if the
  package imports, else a "not installed" row. It subtracts K's mean from K in place, so it
  gets its own clone of K (the accuracy call a fresh one).

Each row: ms (median; CUDA events on GPU), TOPS, speedup vs ``sdpa-flash`` (or, if flash
cannot run, the fastest SDPA backend) measured in this case, and cos-sim / relative L1 of
the output vs an fp32 SDPA reference. Above ``--ref-full-max-seq`` (4K) the reference, and
so the comparison, covers batch 0 and the first ``--ref-heads`` heads only (column ``ref``).

Without a GPU (or with ``--smoke``) it runs tiny sizes (N 128/256, D 64, B 1, H 2); on CPU the
Triton kernels run under the Triton interpreter with ``time.perf_counter`` timing: **a smoke
test of the harness, not a performance measurement**.

    python tools/bench_attention.py [--out FILE [--force]] [--seqs 1k,2k] [--head-dims 64,128]
        [--batch 4] [--heads 32] [--causal both|yes|no] [--max-seconds S] [--smoke]

Timing helpers, device/version report and size parsing come from ``tools/bench_kernels.py``.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import Timer, bench_info, fmt, parse_size, pick_device, refuses_overwrite, write_json  # noqa: E402

GPU_SEQS = [1 << 10, 2 << 10, 4 << 10, 8 << 10, 16 << 10, 32 << 10]
GPU_HEAD_DIMS = [64, 128]
SMOKE_SEQS = [128, 256]
SMOKE_HEAD_DIMS = [64]
SDPA_BACKENDS = ["flash", "efficient", "cudnn", "math"]
NOT_PERF = "SMOKE TEST: tiny sizes{} -- NOT a performance measurement"


@dataclass
class Row:
    family: str  # sdpa | vopt-triton | sageattn
    impl: str
    head_dim: int
    seq: int
    causal: bool
    batch: int
    heads: int
    dtype: str
    ms: Optional[float] = None
    tops: Optional[float] = None
    speedup: Optional[float] = None
    cos: Optional[float] = None
    rel_l1: Optional[float] = None
    ref: str = ""
    note: str = ""


# ---- implementations ----------------------------------------------------------------


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


def sdpa_fn(name: str, q, k, v, causal: bool) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import sdpa_kernel

    backend = _sdpa_backend(name)

    def fn():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


def _kernel_module():
    """vopt's Triton SageAttention module, or the reason it cannot be imported."""
    try:
        from vopt.kernels import sage_attention as sa

        return sa, None
    except Exception as exc:  # noqa: BLE001 - reported in the row
        return None, f"import vopt.kernels.sage_attention failed: {type(exc).__name__}: {exc}"


def vopt_kernel_only(sa, q, k, v, causal: bool):
    """(fn, why): the attention kernel alone on pre-quantized Q/K/V (``prepare_sage_attention(...).launch``)."""
    if getattr(sa, "prepare_sage_attention", None) is None:
        return None, "kernel-only timing not possible: vopt.kernels.sage_attention lacks prepare_sage_attention"
    call = sa.prepare_sage_attention(q, k, v, is_causal=causal)

    def fn():
        call.launch()
        return call.out

    return fn, None


def cuda_rows(q, k, v, causal: bool, device) -> list:
    """[(impl, kernel, (fn or None, note))] for the vopt-cuda rows; a refusal becomes a row with the reason."""
    try:
        from vopt.ops import sage_attention as sa_op
        from vopt.ops import sage_cuda
    except Exception as exc:  # noqa: BLE001 - reported in the row
        return [("vopt-cuda", "auto", (None, f"import failed: {type(exc).__name__}: {exc}"))]
    if device.type != "cuda":
        return [("vopt-cuda", "auto", (None, "needs CUDA"))]
    cc = torch.cuda.get_device_capability(device)
    preset = "int8_fp8" if cc >= (8, 9) else "int8_fp16"
    p = sa_op.preset(preset)
    rows = []
    why = sage_cuda.unsupported_reason(q, k, v, None, causal, p)
    if why:
        return [("vopt-cuda", "auto", (None, f"unsupported: {why}"))]
    rows.append(("vopt-cuda", "auto", (lambda: sage_cuda.sage_attention_cuda(q, k, v, causal, None, p),
                                       f"end to end: {preset}, quantization kernels included")))
    for impl, kernel in (("vopt-cuda-kernel", "auto"), ("vopt-cuda-mma-kernel", "mma")):
        if kernel == "mma" and cc != (9, 0):
            continue  # elsewhere the auto kernel is the mma kernel
        try:
            call = sage_cuda.prepare(q, k, v, causal, None, p, kernel=kernel)
        except Exception as exc:  # noqa: BLE001 - reported in the row
            rows.append((impl, kernel, (None, f"prepare failed: {type(exc).__name__}: {exc}")))
            continue
        rows.append((impl, kernel, (call.launch, f"kernel only ({call.kernel}): pre-quantized {preset}")))
    return rows


def sageattn_module():
    """(sageattn, version, why_not)."""
    try:
        from sageattention import sageattn
    except ImportError as exc:
        return None, None, f"sageattention not installed ({exc})"
    except Exception as exc:  # noqa: BLE001 - a broken install is reported, not fatal
        return None, None, f"sageattention failed to import: {type(exc).__name__}: {exc}"
    try:
        version = importlib.metadata.version("sageattention")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return sageattn, version, None


# ---- measuring -----------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _short(exc: BaseException, caught: list) -> str:
    msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    reasons = []
    for w in caught:
        text = " ".join(str(w.message).split())
        if text and text not in reasons:
            reasons.append(text)
    if reasons:
        msg += " | " + " | ".join(reasons)
    return msg[:600]


def run_once(fn) -> tuple:
    """(output, None) or (None, reason); torch's 'kernel not used because ...' warnings go into the reason."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn(), None
        except torch.OutOfMemoryError as exc:
            return None, f"out of memory: {str(exc).splitlines()[0]}"
        except Exception as exc:  # noqa: BLE001 - every failure becomes a row note
            return None, _short(exc, caught)


def measure(fn, device, args) -> float:
    """Median ms: estimate one call, pick reps to fill ~``--target-ms``, then bench_kernels.Timer."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    reps = max(args.min_reps, min(args.reps, int(args.target_ms / est_ms)))
    warmup = min(args.warmup, reps)
    return Timer(device, warmup, reps, args.cold_l2)(fn)


def accuracy(out: torch.Tensor, ref: torch.Tensor, sub) -> tuple:
    o = out[sub].double()
    r = ref.double()
    cos = F.cosine_similarity(o.flatten(), r.flatten(), dim=0).item()
    rel_l1 = ((o - r).abs().sum() / r.abs().sum().clamp_min(1e-30)).item()
    return cos, rel_l1


def run_case(d: int, n: int, causal: bool, args, device, sa, sa_why, sage) -> list:
    bsz, h = args.batch, args.heads
    dtype = torch.float16
    g = torch.Generator(device="cpu").manual_seed(1234 + n + d)
    # Generated on the host in fp32 and copied (identical values on every device).
    q, k, v = (torch.randn(bsz, h, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    flops = 4.0 * bsz * h * n * n * d / (2.0 if causal else 1.0)

    # fp32 SDPA reference, on a subset of (batch, heads) for long sequences.
    if n > args.ref_full_max_seq and (bsz > 1 or h > args.ref_heads):
        nh = min(h, args.ref_heads)
        sub = (slice(0, 1), slice(0, nh))
        ref_label = f"b0,h0-{nh - 1} of {bsz}x{h}"
    else:
        sub = (slice(None), slice(None))
        ref_label = "all"
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q[sub].float(), k[sub].float(), v[sub].float(), is_causal=causal)

    rows = []

    def add(family, impl, fn, note=""):
        row = Row(family, impl, d, n, causal, bsz, h, "fp16", ref=ref_label, note=note)
        rows.append(row)
        if fn is None:
            row.ref = ""
            return row
        out, why = run_once(fn)
        if why is not None:
            row.note = (note + "; " if note else "") + why
            row.ref = ""
            return row
        row.cos, row.rel_l1 = accuracy(out, ref, sub)
        del out
        try:
            row.ms = measure(fn, device, args)
        except torch.OutOfMemoryError as exc:
            row.note = (note + "; " if note else "") + f"out of memory while timing: {str(exc).splitlines()[0]}"
        if row.ms:
            row.tops = flops / (row.ms * 1e-3) / 1e12
        return row

    # (a) torch SDPA, one backend at a time.
    for name in args.sdpa:
        if device.type == "cpu" and name in ("efficient", "cudnn"):
            add("sdpa", f"sdpa-{name}", None, "unavailable: torch has no CPU kernel for this SDPA backend")
            continue
        if name == "math" and n > args.math_max_seq:
            add("sdpa", "sdpa-math", None, f"skipped: N > {args.math_max_seq} (N^2 scores)")
            continue
        if name == "math" and device.type == "cuda":
            need = 3 * bsz * h * n * n * 2  # scores, probs (fp16) and slack
            free = torch.cuda.mem_get_info(device)[0]
            if need > 0.8 * free:
                add("sdpa", "sdpa-math", None, f"skipped: needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")
                continue
        add("sdpa", f"sdpa-{name}", sdpa_fn(name, q, k, v, causal))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # (b) vopt Triton SageAttention: end to end, then the kernel alone.
    if sa is None:
        add("vopt-triton", "vopt-triton", None, sa_why)
    else:
        why = sa.unsupported_reason(q, k, v)
        if why:
            add("vopt-triton", "vopt-triton", None, f"unsupported: {why}")
            add("vopt-triton", "vopt-triton-kernel", None, f"unsupported: {why}")
        else:
            add("vopt-triton", "vopt-triton",
                lambda: sa.sage_attention_triton(q, k, v, is_causal=causal),
                "end to end: Q/K int8 + V fp8 quantization included")
            try:
                fn, why = vopt_kernel_only(sa, q, k, v, causal)
            except Exception as exc:  # noqa: BLE001 - pre-quantization failed: reported in the row
                fn, why = None, f"pre-quantization failed: {type(exc).__name__}: {exc}"
            add("vopt-triton", "vopt-triton-kernel", fn, why or "kernel only: pre-quantized Q/K/V")

    # (b2) vopt's hand-written CUDA kernels: end to end, then the kernel alone (and the mma kernel on sm_90).
    for impl, kernel, fn_why in cuda_rows(q, k, v, causal, device):
        fn, why = fn_why
        add("vopt-cuda", impl, fn, why)

    # (c) sageattention 1.0.6.
    impl = f"sageattn-{sage[1]}" if sage[0] is not None else "sageattn-1.0.6"
    if sage[0] is None:
        add("sageattn", impl, None, sage[2])
    elif device.type != "cuda":
        add("sageattn", impl, None, "needs CUDA")
    else:
        sageattn = sage[0]
        k_acc = k.clone()  # sageattn subtracts K's mean from K in place
        k_bench = k.clone()  # for timing: repeated in-place mean removal leaves it ~unchanged
        first = [True]

        def sage_fn():
            kk = k_acc if first[0] else k_bench
            first[0] = False
            return sageattn(q, kk, v, tensor_layout="HND", is_causal=causal)

        add("sageattn", impl, sage_fn, "end to end (own quantization included)")
        del k_acc, k_bench

    # Speedup vs SDPA flash, else the fastest SDPA backend that ran.
    sdpa_ok = {r.impl: r.ms for r in rows if r.family == "sdpa" and r.ms}
    base_name = "sdpa-flash" if "sdpa-flash" in sdpa_ok else (min(sdpa_ok, key=sdpa_ok.get) if sdpa_ok else None)
    for r in rows:
        if base_name and r.ms:
            r.speedup = sdpa_ok[base_name] / r.ms
            if r.impl == base_name:
                r.note = (r.note + "; " if r.note else "") + "speedup baseline"
    del q, k, v, ref
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---- reporting ------------------------------------------------------------------------


def print_table(info: dict, rows: list, file=sys.stdout) -> None:
    for key, val in info.items():
        print(f"# {key}: {val}", file=file)
    head = (f"{'impl':<20} {'D':>4} {'N':>6} {'causal':>6} {'ms':>10} {'TOPS':>8} {'speedup':>8} "
            f"{'cos':>9} {'rel_l1':>9} {'ref':<16} note")
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in rows:
        print(f"{r.impl:<20} {r.head_dim:>4} {r.seq:>6} {str(r.causal):>6} {fmt(r.ms, '10.4f')} {fmt(r.tops, '8.2f')} "
              f"{fmt(r.speedup, '8.2f')} {fmt(r.cos, '9.6f')} {fmt(r.rel_l1, '9.2e')} {r.ref:<16} {r.note}",
              file=file)


def _int_list(text: str) -> list:
    return [parse_size(s) for s in text.split(",") if s.strip()]


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", help="comma list of sequence lengths, e.g. 1k,4k (default 1k..32k on GPU; 128,256 smoke)")
    p.add_argument("--head-dims", help="comma list (default 64,128 on GPU; 64 smoke)")
    p.add_argument("--batch", type=int, help="batch size (default 4 on GPU; 1 smoke)")
    p.add_argument("--heads", type=int, help="heads (default 32 on GPU; 2 smoke)")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--sdpa", default=",".join(SDPA_BACKENDS), help=f"SDPA backends to time ({', '.join(SDPA_BACKENDS)})")
    p.add_argument("--math-max-seq", type=parse_size, default=8 << 10, help="skip sdpa-math above this N (default 8k)")
    p.add_argument("--ref-full-max-seq", type=parse_size, default=4 << 10,
                   help="above this N the fp32 reference covers batch 0 and --ref-heads heads only (default 4k)")
    p.add_argument("--ref-heads", type=int, default=4)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (automatic without CUDA); not a performance measurement")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 3 GPU, 0 CPU)")
    p.add_argument("--reps", type=int, default=None, help="max timed runs per measurement (default 30 GPU, 2 CPU)")
    p.add_argument("--min-reps", type=int, default=None, help="min timed runs (default 5 GPU, 1 CPU)")
    p.add_argument("--target-ms", type=float, default=300.0, help="aim for about this much timed work per measurement")
    p.add_argument("--cold-l2", action="store_true", help="flush L2 before every timed run (GPU)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no new case after this many seconds (the rest are listed as skipped)")
    p.add_argument("--out", type=Path, help="write results as JSON here (rewritten after every case)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    args = p.parse_args(argv)

    if refuses_overwrite("bench_attention", args.out, args.force):
        return 2
    args.sdpa = [s for s in args.sdpa.split(",") if s]
    bad = [s for s in args.sdpa if s not in SDPA_BACKENDS]
    if bad:
        print(f"bench_attention: unknown SDPA backends {bad}", file=sys.stderr)
        return 2
    device = pick_device("bench_attention", args.device)
    if device is None:
        return 2
    use_cuda = device.type == "cuda"
    smoke = args.smoke or not use_cuda
    if device.type == "cpu":
        # Must precede the first import of the kernel module (@triton.jit decides at decoration).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    seqs = _int_list(args.seqs) if args.seqs else (SMOKE_SEQS if smoke else GPU_SEQS)
    head_dims = _int_list(args.head_dims) if args.head_dims else (SMOKE_HEAD_DIMS if smoke else GPU_HEAD_DIMS)
    args.batch = args.batch or (1 if smoke else 4)
    args.heads = args.heads or (2 if smoke else 32)
    args.warmup = args.warmup if args.warmup is not None else (3 if use_cuda else 0)
    args.reps = args.reps or (30 if use_cuda else 2)
    args.min_reps = args.min_reps or (5 if use_cuda else 1)
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]

    sa, sa_why = _kernel_module()
    sage = sageattn_module()
    not_perf = NOT_PERF.format(", Triton interpreter, CPU timing" if device.type == "cpu" else "")
    info = bench_info(device, not_perf if smoke else "performance")
    info["sageattention"] = sage[1] or sage[2]
    info.update(batch=args.batch, heads=args.heads, dtype="fp16", seqs=seqs, head_dims=head_dims,
                warmup=args.warmup, max_reps=args.reps, min_reps=args.min_reps, target_ms=args.target_ms,
                cold_l2=bool(args.cold_l2 and use_cuda),
                tops_formula="4*B*H*N^2*D / t, halved for causal",
                reference=f"fp32 SDPA; for N > {args.ref_full_max_seq} on batch 0 and the first {args.ref_heads} heads")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    rows = []
    skipped = []
    for d in head_dims:
        for causal in causals:
            for n in seqs:
                if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
                    skipped.append(f"D={d} N={n} causal={causal}")
                    continue
                case_rows = run_case(d, n, causal, args, device, sa, sa_why, sage)
                rows.extend(case_rows)
                print(f"# done D={d} N={n} causal={causal} ({time.perf_counter() - start:.1f}s)", file=sys.stderr)
                if args.out is not None:
                    write_json(args.out, {"meta": dict(info, complete=False), "results": [asdict(r) for r in rows]})
    if skipped:
        info["skipped_cases"] = f"{len(skipped)} (over --max-seconds {args.max_seconds}): " + ", ".join(skipped)
    info["seconds"] = round(time.perf_counter() - start, 1)
    print_table(info, rows)
    if smoke:
        print(f"# {not_perf}")
    if args.out is not None:
        write_json(args.out, {"meta": dict(info, complete=not skipped), "results": [asdict(r) for r in rows]})
        print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

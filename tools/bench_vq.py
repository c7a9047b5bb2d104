#!/usr/bin/env python
"""VQ nearest-code benchmark: ``vopt::vq_argmin`` vs the unfused torch expression (E-ViLM-like shapes).

The baseline is E-ViLM's ``VectorQuantizer`` expression, ``((x*x).sum(-1, keepdim=True) - 2.0 * (x @ c.t()) +
(c*c).sum(-1)).argmin(-1)``, which materializes the ``[N, K]`` distance matrix. For every shape (tokens N x
codebook K x dim D) and data kind it times, on the same inputs and in the same run:

* ``torch-unfused``: the baseline (the speedup column's denominator);
* ``vopt-auto``: ``torch.ops.vopt.vq_argmin`` (dispatch picks the backend; ``VOPT_BACKEND`` applies);
* ``vopt-<backend>``: each backend's implementation called directly (``cuda``, ``triton``, ``reference``) with
  ``fallback="batch"`` (exact); a backend that refuses records why (on CPU Triton would run in its interpreter:
  ``--interpret`` only);
* ``vopt-<cuda|triton>-rows``: the same kernel with ``fallback="rows"`` (uncertified rows recomputed alone:
  never ``[N, K]``; codes may differ from the baseline only on rows its GEMM rounding decides).

Per row: ms (median; CUDA events on GPU, ``time.perf_counter`` on CPU), speedup vs the baseline, peak extra
bytes (GPU: ``torch.cuda.max_memory_allocated`` above the inputs; CPU: the peak of live tensors created by the
call, tracked at the dispatcher: ops inside an opaque custom op are invisible there, so ``vopt-auto`` has no CPU
byte count), whether the codes equal the baseline's, and for the fused backends the fraction of rows the kernel
could not certify (those make ``fallback="batch"`` run the whole reference too).

Data: ``gaussian`` (x and codes N(0, 1): many near-ties, the hard case) and ``clustered`` (each token a code
plus 0.3-sigma noise: tokens near their code, like a trained tokenizer's features).

GPU default shapes: tokens {1568, 8192} x codebook {1024, 4096, 16384} x dim {256, 1024}, fp32 (``--dtypes``).
CPU default: 1568 x {1024, 4096} x 256 within ``--max-seconds``. ``--smoke``: 64 x 96 x 33 (a plumbing check).

    python tools/bench_vq.py [--out FILE [--force]] [--sizes 1568x8192x256,8192x16384x1024] [--dtypes fp32,fp16]
        [--data gaussian,clustered] [--device auto|cuda|cpu] [--reps N] [--max-seconds S] [--interpret] [--smoke]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import (  # noqa: E402
    DTYPES, Timer, bench_info, fmt, measurement_mode, pick_device, refuses_overwrite, write_json)

GPU_SIZES = [(n, k, d) for n in (1568, 8192) for k in (1024, 4096, 16384) for d in (256, 1024)]
CPU_SIZES = [(1568, 1024, 256), (1568, 4096, 256)]
SMOKE_SIZES = [(64, 96, 33)]
DATA = ("gaussian", "clustered")
BACKENDS = ("cuda", "triton", "reference")
SMOKE_NOTE = "SMOKE TEST: tiny sizes -- NOT a performance measurement"


@dataclass
class Row:
    impl: str
    tokens: int
    codes: int
    dim: int
    dtype: str
    data: str
    ms: Optional[float] = None
    speedup: Optional[float] = None
    peak_extra_bytes: Optional[int] = None
    identical: Optional[bool] = None
    uncertified: Optional[float] = None
    note: str = ""


def unfused(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The baseline: E-ViLM's VectorQuantizer expression (fp32 math for half inputs, like the op)."""
    x, c = x.float(), c.float()
    return ((x * x).sum(-1, keepdim=True) - 2.0 * (x @ c.t()) + (c * c).sum(-1)).argmin(dim=-1)


def make_inputs(n: int, k: int, d: int, dtype: torch.dtype, data: str, device: torch.device) -> tuple:
    g = torch.Generator().manual_seed(n * 31 + k * 7 + d)
    c = torch.randn(k, d, generator=g)
    if data == "gaussian":
        x = torch.randn(n, d, generator=g)
    else:
        x = c[torch.randint(0, k, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    return x.to(device=device, dtype=dtype), c.to(device=device, dtype=dtype)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created by ops while active and still alive (views of earlier tensors skipped)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in inputs or ptr in self._seen or ptr == 0:
                continue
            nbytes = t.untyped_storage().nbytes()
            self._seen.add(ptr)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, ptr, nbytes)
        return out

    def _free(self, ptr: int, nbytes: int) -> None:
        self._seen.discard(ptr)
        self.live -= nbytes


def peak_extra_bytes(fn, device: torch.device, dispatch_visible: bool = True) -> Optional[int]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    if not dispatch_visible:
        return None
    with LiveBytes() as mode:
        out = fn()
    del out
    return int(mode.peak)


def uncertified_fraction(backend: str, x: torch.Tensor, c: torch.Tensor) -> Optional[float]:
    from vopt.ops import vq_lookup as vq

    if backend == "triton":
        from vopt.kernels import vq_argmin as kernels

        best, _, second = vq.merge_splits(*kernels.vq_scores(x, c, vq._code_sq_norms(c), splits=vq.plan_splits(x, c.shape[0])))
    elif backend == "cuda":
        best, _, second = vq.cuda_scores(x, c)
    else:
        return None
    ok, _ = vq.certified(x, c, best, second, "mm")
    return float((~ok).float().mean().item())


def run_case(n, k, d, dtype, data, device, timer, interpret: bool) -> list:
    import vopt.ops.vq_lookup as vq
    from vopt.dispatch import Backend

    dtype_name = next(name for name, v in DTYPES.items() if v == dtype)
    x, c = make_inputs(n, k, d, dtype, data, device)
    want = unfused(x, c)
    rows = []

    def row(impl, fn, dispatch_visible=True, backend=None, note=""):
        r = Row(impl, n, k, d, dtype_name, data, note=note)
        try:
            got = fn()
            r.identical = bool(torch.equal(got[0] if isinstance(got, tuple) else got, want))
            r.ms = timer(fn)
            r.peak_extra_bytes = peak_extra_bytes(fn, device, dispatch_visible)
            if backend is not None:
                r.uncertified = uncertified_fraction(backend, x, c)
        except Exception as exc:  # noqa: BLE001 - a failing implementation is a table row, not a crash
            r.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        rows.append(r)
        return r

    base = row("torch-unfused", lambda: unfused(x, c), note="baseline")
    auto_backend = None
    try:
        auto_backend = vq.VQ_ARGMIN.select(x, c, "mm", "batch").backend.value
    except Exception as exc:  # noqa: BLE001 - reported in the row
        auto_backend = f"none ({exc})"
    row("vopt-auto", lambda: torch.ops.vopt.vq_argmin(x, c), dispatch_visible=False, note=f"dispatch -> {auto_backend}")
    for name in BACKENDS:
        impl = vq.VQ_ARGMIN.impls[Backend(name)]
        why = impl.refusal((x, c, "mm", "batch"), {})
        if why is None and name == "triton" and device.type == "cpu" and not interpret:
            why = "CPU: the Triton interpreter is a correctness tool, not a timing (--interpret runs it)"
        if why:
            rows.append(Row(f"vopt-{name}", n, k, d, dtype_name, data, note=why))
            continue
        row(f"vopt-{name}", lambda impl=impl: impl.fn(x, c, "mm", "batch"), backend=name)
        if name != "reference":   # the fused kernels again, uncertified rows recomputed alone (never [N, K])
            row(f"vopt-{name}-rows", lambda impl=impl: impl.fn(x, c, "mm", "rows"), backend=name,
                note='fallback="rows"')
    for r in rows:
        if r.ms and base.ms:
            r.speedup = base.ms / r.ms
    gc.collect()
    return rows


def print_table(info: dict, rows: list) -> None:
    for key, value in info.items():
        print(f"# {key}: {value}")
    head = (f"{'impl':<16} {'N':>6} {'K':>6} {'D':>5} {'dtype':<5} {'data':<9} {'ms':>10} {'speedup':>8} "
            f"{'peak MiB':>9} {'same':>5} {'uncert':>7}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        mib = None if r.peak_extra_bytes is None else r.peak_extra_bytes / 2 ** 20
        same = "-" if r.identical is None else ("yes" if r.identical else "NO")
        print(f"{r.impl:<16} {r.tokens:>6} {r.codes:>6} {r.dim:>5} {r.dtype:<5} {r.data:<9} {fmt(r.ms, '10.3f')} "
              f"{fmt(r.speedup, '8.2f')} {fmt(mib, '9.2f')} {same:>5} {fmt(r.uncertified, '7.4f')}  {r.note}")


def parse_sizes(text: str) -> list:
    out = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--sizes item {item!r} is not NxKxD with positive integers (e.g. 1568x8192x256)")
        out.append(tuple(int(p) for p in parts))
    return out


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", help="comma list of NxKxD (tokens x codebook x dim); default depends on the device")
    p.add_argument("--dtypes", default="fp32", help=f"comma list of {', '.join(DTYPES)}")
    p.add_argument("--data", default=",".join(DATA), help=f"comma list of {', '.join(DATA)}")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 5 GPU, 1 CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default 30 GPU, 5 CPU)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop starting new cases after this many seconds (default: none on GPU, 120 on CPU)")
    p.add_argument("--interpret", action="store_true", help="on CPU, also run the Triton backend in the interpreter")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one rep: a plumbing check, not a measurement")
    p.add_argument("--out", type=Path, help="write results as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    args = p.parse_args(argv)

    if refuses_overwrite("bench_vq", args.out, args.force):
        return 2
    bad_dtypes = [t for t in args.dtypes.split(",") if t not in DTYPES]
    bad_data = [t for t in args.data.split(",") if t not in DATA]
    if bad_dtypes or bad_data:
        print(f"bench_vq: unknown dtypes {bad_dtypes} / data {bad_data}; accepted: {list(DTYPES)} / {list(DATA)}",
              file=sys.stderr)
        return 2
    try:
        sizes = parse_sizes(args.sizes) if args.sizes else None
    except ValueError as exc:
        print(f"bench_vq: {exc}", file=sys.stderr)
        return 2
    device = pick_device("bench_vq", args.device)
    if device is None:
        return 2
    use_cuda = device.type == "cuda"
    interpret = args.interpret or args.smoke
    if not use_cuda and interpret and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"      # before vopt.kernels.vq_argmin is imported (set only for this run)
    if sizes is None:
        sizes = SMOKE_SIZES if args.smoke else (GPU_SIZES if use_cuda else CPU_SIZES)
    reps = 1 if args.smoke else (args.reps or (30 if use_cuda else 5))
    warmup = 0 if args.smoke else (args.warmup if args.warmup is not None else (5 if use_cuda else 1))
    budget = args.max_seconds if args.max_seconds is not None else (None if use_cuda else 120.0)
    timer = Timer(device, warmup, reps, cold_l2=False)

    import vopt.ops.vq_lookup  # noqa: F401  (registers torch.ops.vopt.vq_argmin)

    info = bench_info(device, SMOKE_NOTE if args.smoke else measurement_mode(device))
    info.update(reps=reps, warmup=warmup, baseline="torch-unfused: ((x*x).sum(-1,keepdim) - 2*(x@c.t()) + (c*c).sum(-1)).argmin(-1)",
                peak_bytes="torch.cuda.max_memory_allocated above the inputs" if use_cuda
                else "peak live bytes of tensors created by the call (dispatcher-level; opaque custom ops hide theirs)")
    rows, skipped = [], []
    t0 = time.perf_counter()
    for n, k, d in sizes:
        for dtype_name in args.dtypes.split(","):
            for data in args.data.split(","):
                if budget is not None and time.perf_counter() - t0 > budget:
                    skipped.append(f"{n}x{k}x{d} {dtype_name} {data}")
                    continue
                rows.extend(run_case(n, k, d, DTYPES[dtype_name], data, device, timer, interpret))
    info["complete"] = not skipped
    if skipped:
        info["skipped_over_budget"] = skipped
    info["seconds"] = round(time.perf_counter() - t0, 1)
    print_table(info, rows)
    if args.out is not None:
        write_json(args.out, {"meta": info, "results": [asdict(r) for r in rows]})
        print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

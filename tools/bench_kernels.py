#!/usr/bin/env python
"""Kernel microbenchmark: every available vopt backend of an op vs torch eager.

For each benchmark case (op, dtype, size) it times the torch eager baseline and
each backend's implementation called directly (no custom-op or dispatch
overhead), and prints a table: op, backend, dtype, n, ms, GB/s, speedup vs the
eager baseline (>1 is faster) and max abs error vs vopt's reference.

On a GPU, times come from CUDA events (warm-up, then the median of ``--reps``
individually timed runs; ``--cold-l2`` overwrites a buffer larger than L2
before each run). Without a GPU it still runs as a smoke test: small sizes, the
reference backend only, ``time.perf_counter`` ("CPU timing").

To benchmark another op, add a function returning :class:`Case` objects and
list it in :data:`CASE_BUILDERS`.

    python tools/bench_kernels.py [--out FILE [--force]] [--sizes 1M,16M] [--dtypes fp32,fp16] [--cold-l2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GPU_SIZES = [1 << 20, 16 << 20, 64 << 20]
CPU_SIZES = [1 << 16, 1 << 20]


@dataclass
class Case:
    """One benchmark problem: inputs, the eager baseline, the op's backends."""

    op: str
    dtype: torch.dtype
    n: int
    make_inputs: Callable[[torch.device], tuple]
    baseline: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    kernel_op: object  # vopt.dispatch.KernelOp
    bytes_moved: int


@dataclass
class Row:
    op: str
    backend: str
    dtype: str
    n: int
    ms: Optional[float]
    gbps: Optional[float]
    speedup: Optional[float]
    max_abs_err: Optional[float]
    note: str = ""


def axpy_cases(sizes: list, dtypes: list) -> list:
    """``vopt::axpy``: out = alpha * x + y (reads x, y; writes out)."""
    from vopt.ops.axpy import AXPY, reference

    alpha = 0.5
    cases = []
    for dtype in dtypes:
        for n in sizes:
            def make(device, n=n, dtype=dtype):
                g = torch.Generator(device="cpu").manual_seed(0)
                x = torch.randn(n, generator=g).to(device=device, dtype=dtype)
                y = torch.randn(n, generator=g).to(device=device, dtype=dtype)
                return (x, y, alpha)

            cases.append(
                Case(
                    op="axpy",
                    dtype=dtype,
                    n=n,
                    make_inputs=make,
                    baseline=lambda x, y, a: a * x + y,
                    reference=reference,
                    kernel_op=AXPY,
                    bytes_moved=3 * n * torch.empty((), dtype=dtype).element_size(),
                )
            )
    return cases


CASE_BUILDERS = {"axpy": axpy_cases}


# ---- timing -------------------------------------------------------------------


class Timer:
    """Median wall time of a callable, in ms."""

    def __init__(self, device: torch.device, warmup: int, reps: int, cold_l2: bool):
        self.device = device
        self.warmup = warmup
        self.reps = reps
        self.flush = None
        if cold_l2 and device.type == "cuda":
            # Larger than any current L2 (H100: 50 MB, H200: 60 MB... B200: 126 MB).
            self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device)

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize(self.device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for start, end in zip(starts, ends):
            if self.flush is not None:
                self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def run_case(case: Case, device: torch.device, timer: Timer, backends: list) -> list:
    args = case.make_inputs(device)
    dtype_name = next(k for k, v in DTYPES.items() if v == case.dtype)
    want = case.reference(*args)

    def row(backend, ms, out, note=""):
        gbps = case.bytes_moved / (ms * 1e-3) / 1e9 if ms else None
        err = (out.float() - want.float()).abs().max().item() if out is not None and out.numel() else None
        return Row(case.op, backend, dtype_name, case.n, ms, gbps, None, err, note)

    base_out = case.baseline(*args)
    base_ms = timer(lambda: case.baseline(*args))
    rows = [row("torch-eager", base_ms, base_out)]
    for name in backends:
        impl = case.kernel_op.impls.get(_backend(name))
        if impl is None:
            rows.append(row(name, None, None, "not implemented for this op"))
            continue
        why = impl.refusal(args, {})
        if why:
            rows.append(row(name, None, None, why))
            continue
        out = impl.fn(*args)
        rows.append(row(name, timer(lambda: impl.fn(*args)), out))
    for r in rows:
        if r.ms:
            r.speedup = base_ms / r.ms
    del args, want, base_out
    return rows


def _backend(name: str):
    from vopt.dispatch import Backend

    return Backend(name)


# ---- reporting --------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "timing": "CUDA events" if device.type == "cuda" else "CPU timing (time.perf_counter)",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    from vopt import cuda_library

    reason = cuda_library.library_reason()
    info["vopt_cuda_lib"] = str(cuda_library.library_path()) if reason is None else f"unavailable: {reason}"
    if reason is None:
        info["vopt_cuda_runtime"] = cuda_library.runtime_version()
        info["vopt_cuda_archs"] = ";".join(cuda_library.built_archs())
    info["git_sha"] = _git_sha()
    return info


def _git_sha() -> Optional[str]:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def fmt(v, spec: str) -> str:
    """``format(v, spec)``, or a dash right-aligned to the spec's width when ``v`` is None."""
    width = int(spec.split(".")[0] or 0)
    return f"{'-':>{width}}" if v is None else format(v, spec)


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (a reader never sees a half-written file), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def refuses_overwrite(tool: str, out: Optional[Path], force: bool) -> bool:
    """True (after saying why on stderr) when ``out`` exists and ``force`` is not set."""
    if out is not None and out.exists() and not force:
        print(f"{tool}: {out} exists; pass --force to overwrite", file=sys.stderr)
        return True
    return False


def pick_device(tool: str, choice: str) -> Optional[torch.device]:
    """The device for ``--device auto|cuda|cpu``; None (after saying why) when cuda is asked for but absent."""
    use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        print(f"{tool}: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return None
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


def measurement_mode(device: torch.device) -> str:
    """The ``mode`` label of a real (non-smoke) measurement on ``device``."""
    return "performance (GPU)" if device.type == "cuda" else "CPU measurement (time.perf_counter; not a GPU number)"


def bench_info(device: torch.device, mode: str) -> dict:
    """:func:`environment` plus vopt's version, torch threads, TRITON_INTERPRET and the run's ``mode`` label."""
    info = environment(device)
    try:
        import vopt

        info["vopt"] = getattr(vopt, "__version__", "unknown")
    except Exception as exc:  # noqa: BLE001 - a broken install is reported in the metadata
        info["vopt"] = f"import failed: {exc}"
    info["torch_threads"] = torch.get_num_threads()
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
    info["mode"] = mode
    return info


def print_table(info: dict, rows: list) -> None:
    for k, v in info.items():
        print(f"# {k}: {v}")
    head = f"{'op':<8} {'backend':<12} {'dtype':<5} {'n':>10} {'ms':>9} {'GB/s':>8} {'speedup':>8} {'max_abs_err':>11}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.op:<8} {r.backend:<12} {r.dtype:<5} {r.n:>10} {fmt(r.ms, '9.4f')} {fmt(r.gbps, '8.1f')} "
            f"{fmt(r.speedup, '8.2f')} {fmt(r.max_abs_err, '11.3g')}  {r.note}"
        )


# ---- main -----------------------------------------------------------------------------


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text[:-1] if mult != 1 else text) * mult


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default=",".join(CASE_BUILDERS), help=f"comma list of {', '.join(CASE_BUILDERS)}")
    p.add_argument("--sizes", help="comma list of element counts, e.g. 1M,16M (default: 1M,16M,64M on GPU; 64K,1M on CPU)")
    p.add_argument("--dtypes", default="fp32,fp16", help=f"comma list of {', '.join(DTYPES)}")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default 50 GPU, 5 CPU)")
    p.add_argument("--cold-l2", action="store_true", help="flush L2 before every timed run (GPU)")
    p.add_argument("--out", type=Path, help="write results as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    args = p.parse_args(argv)

    if refuses_overwrite("bench_kernels", args.out, args.force):
        return 2
    unknown = [o for o in args.ops.split(",") if o not in CASE_BUILDERS]
    bad_dtypes = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown or bad_dtypes:
        print(f"bench_kernels: unknown ops {unknown} / dtypes {bad_dtypes}", file=sys.stderr)
        return 2

    device = pick_device("bench_kernels", args.device)
    if device is None:
        return 2
    use_cuda = device.type == "cuda"
    sizes = [parse_size(s) for s in args.sizes.split(",")] if args.sizes else (GPU_SIZES if use_cuda else CPU_SIZES)
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    # On CPU only the reference is timed: Triton would run in its (slow) interpreter.
    backends = ["cuda", "triton", "reference"] if use_cuda else ["reference"]
    reps = args.reps or (50 if use_cuda else 5)
    timer = Timer(device, args.warmup if use_cuda else min(args.warmup, 2), reps, args.cold_l2)

    info = environment(device)
    info.update(reps=reps, warmup=timer.warmup, cold_l2=bool(timer.flush is not None))
    rows = []
    for op in args.ops.split(","):
        for case in CASE_BUILDERS[op](sizes, dtypes):
            rows.extend(run_case(case, device, timer, backends))
    print_table(info, rows)
    if args.out is not None:
        write_json(args.out, {"meta": info, "results": [asdict(r) for r in rows]})
        print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""MoE benchmark: sorted-by-expert dispatch (the ``moe_dispatch`` pass) vs the models' own loops over experts.

Cases (``--cases``, comma list):

* ``moe-vrd-tiny`` / ``moe-vrd-full``: the zoo's MoE-VRD (``vopt/zoo/moe_vrd.py`` TINY / FULL dims: E 4, top-2;
  full: 1536-d features, hidden 768, 36 object / 132 predicate classes, 3 refinement steps) over ``--pairs``
  tracklet pairs. Baseline ``dense-loop``: the model's own forward (a Python loop over the E experts, each run on
  every pair, combined with the mostly-zero gate matrix). ``vopt-sparse``: the same model after the
  ``moe_dispatch`` pass (eager): route, gather, grouped GEMMs over the ``N * k`` routed rows, combine.
* ``generic-e<E>``: the common block (linear gate, ``experts`` ModuleList of Linear-GELU-Linear MLPs
  ``d -> ffn -> d``, softmax over the top-2 logits) over ``--tokens`` tokens. Baselines: ``dense-loop`` (every
  expert on every token, gate-matrix combine: what MoE-VRD does) and ``token-loop`` (the usual implementation: a
  Python loop over experts running each on its selected tokens via ``nonzero`` / ``index_add_``);
  ``vopt-sparse`` as above.

On a GPU the ``vopt-sparse`` row is repeated per ``vopt::grouped_gemm`` backend: ``auto`` (each call picks: CUDA
where it accepts the shapes, else Triton), then ``cuda`` (CUTLASS grouped GEMM, fp16/bf16 with K, N multiples of 8;
MoE-VRD's 780-wide and 36/132-class layers are not, so forcing it records the refusal), ``triton`` and ``reference``
(one matmul per expert inside the op) forced; a backend that refuses the case records why. On CPU the auto choice
runs (the reference backend: Triton needs a GPU or its interpreter). Timings are medians of ``bench_kernels.Timer``
(CUDA events on GPU, ``time.perf_counter`` on CPU); everything runs under ``torch.no_grad()``.

Columns: ms, speedup vs ``dense-loop`` of the same case (>1 is faster), expert GFLOPs actually computed
(2 x multiply-adds of the expert GEMMs: dense ``N * E`` rows vs routed ``N * k`` rows; the gate is the same for
all and left out), effective TFLOP/s of those FLOPs, max |diff| vs the dense-loop output (the rewrite is
exact up to fp32 summation order).

Defaults: GPU fp16, pairs 64 / 4096 (MoE-VRD), generic d 1024, ffn 4096, 4096 tokens, E 8 and 64. CPU fp32 (this is
a CPU measurement, not a GPU number): pairs 64 / 1024, generic d 256, ffn 1024, 1024 tokens, E 8 and 32.
``--max-seconds`` stops starting new cases when spent (they are listed as skipped). ``--smoke``: tiny sizes,
2 reps: a plumbing check, not a measurement.

    python tools/bench_moe.py [--out FILE [--force]] [--cases moe-vrd-tiny,moe-vrd-full,generic-e8]
        [--pairs 64] [--tokens 4096] [--dim 1024] [--ffn 4096] [--experts 8,64] [--top-k 2]
        [--dtype fp16|bf16|fp32] [--device auto|cuda|cpu] [--reps N] [--max-seconds S] [--smoke]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import (  # noqa: E402
    DTYPES, Timer, bench_info, fmt, measurement_mode, pick_device, refuses_overwrite, write_json)

GPU = dict(pairs=[64, 4096], tokens=4096, dim=1024, ffn=4096, experts=[8, 64], reps=20, dtype="fp16")
CPU = dict(pairs=[64, 1024], tokens=1024, dim=256, ffn=1024, experts=[8, 32], reps=5, dtype="fp32")
SMOKE = dict(pairs=[16], tokens=48, dim=32, ffn=64, experts=[4], reps=2, dtype="fp32")
SMOKE_NOTE = "SMOKE TEST: tiny sizes -- NOT a performance measurement"


@dataclass
class Row:
    case: str
    impl: str
    backend: str
    experts: int
    top_k: int
    rows: int
    dtype: str
    ms: Optional[float] = None
    speedup: Optional[float] = None
    gflop: Optional[float] = None
    tflops: Optional[float] = None
    max_diff: Optional[float] = None
    note: str = ""


class GenericMoE(nn.Module):
    """The common block: linear gate, ``experts`` ModuleList of Linear-GELU-Linear, softmax over the top-k logits."""

    def __init__(self, dim: int, ffn: int, experts: int, top_k: int):
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim)) for _ in range(experts))
        self.top_k = top_k

    def route(self, x):
        vals, idx = self.gate(x).topk(self.top_k, dim=-1)
        return idx, torch.softmax(vals, dim=-1)

    def forward(self, x):
        """``token-loop``: each expert on its selected tokens (``nonzero``: host syncs, not exportable)."""
        idx, w = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return out

    def dense(self, x):
        """``dense-loop``: every expert on every token, weighted by the ``[N, E]`` gate matrix (zeros off the top-k)."""
        idx, w = self.route(x)
        gates = torch.zeros(x.shape[0], len(self.experts), dtype=x.dtype, device=x.device).scatter(1, idx, w)
        return torch.einsum("ne,enc->nc", gates, torch.stack([expert(x) for expert in self.experts]))

    def flops(self, rows: int) -> float:
        lin = self.experts[0]
        return 2.0 * rows * (lin[0].in_features * lin[0].out_features + lin[2].in_features * lin[2].out_features)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rewrite(model: nn.Module) -> tuple:
    """``(rewritten deep copy, reason or None)`` after the ``moe_dispatch`` pass."""
    from vopt.pass_protocol import PassContext, get_pass

    work = copy.deepcopy(model)
    res = get_pass("moe_dispatch")().run_runtime(work, PassContext())
    if not res.rewritten:
        return None, "; ".join(m.reason or "?" for m in res.skipped) or "no MoE block found"
    return work, None


def _backends(device) -> list:
    """``auto`` (per call: CUDA where it accepts the shapes, else Triton), then each backend forced (GPU only)."""
    return ["auto", "cuda", "triton", "reference"] if device.type == "cuda" else ["auto"]


def _with_backend(backend: str, fn):
    """Run ``fn`` with ``VOPT_BACKEND=backend`` (restored afterwards)."""
    old = os.environ.get("VOPT_BACKEND")
    os.environ["VOPT_BACKEND"] = backend
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("VOPT_BACKEND", None)
        else:
            os.environ["VOPT_BACKEND"] = old


def _time(fn, device, reps) -> float:
    return Timer(device, warmup=min(2, reps), reps=reps, cold_l2=False)(fn)


def _diff(a, b) -> float:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def _sparse_rows(name, work, call, base_out, dense_flops, routed_flops, common, device, reps, base_ms) -> list:
    rows = []
    for backend in _backends(device):
        row = Row(name, "vopt-sparse", backend, gflop=routed_flops / 1e9, **common)
        try:
            out = _with_backend(backend, call)
            _sync(device)
            row.ms = _with_backend(backend, lambda: _time(call, device, reps))
            row.max_diff = _diff(base_out, out)
            row.speedup = base_ms / row.ms if row.ms else None
            row.tflops = routed_flops / (row.ms * 1e-3) / 1e12
            if backend == "auto" and device.type == "cpu":   # one backend serves every CPU call: name it
                from vopt.ops.grouped_gemm import GROUPED_GEMM

                p = next(work.parameters())
                probe = (torch.zeros(1, 8, device=device, dtype=p.dtype), torch.zeros(1, 8, 8, device=device,
                         dtype=p.dtype), torch.zeros(2, dtype=torch.int64, device=device))
                row.backend = f"auto={GROUPED_GEMM.select(*probe).backend.value}"
        except Exception as exc:  # noqa: BLE001 - a refusing backend becomes a row note
            row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        rows.append(row)
    return rows


def run_moe_vrd(size: str, pairs: int, dtype, device, reps: int) -> list:
    from vopt.moe.vrd import routed_flops
    from vopt.zoo import moe_vrd

    model = moe_vrd.build(size, device, dtype).model.eval()
    inputs = moe_vrd.build(size, device, dtype).example_inputs(pairs=pairs) if size == "tiny" else None
    if inputs is None:
        g = torch.Generator().manual_seed(0)
        dims = moe_vrd.FULL
        x = lambda d: torch.randn(pairs, d, generator=g).to(device=device, dtype=dtype)
        inputs = {"sf": x(dims["feature_dim"]), "of": x(dims["feature_dim"]), "ppf": x(dims["geometry_dim"]),
                  "pvf": x(dims["pair_visual_dim"])}
    name = f"moe-vrd-{size}"
    dense_f, routed_f = routed_flops(model, pairs)
    common = dict(experts=model.num_experts, top_k=model.top_k, rows=pairs, dtype=str(dtype).removeprefix("torch."))
    base = lambda: model(**inputs)
    base_out = tuple(base())[:3]
    base_ms = _time(base, device, reps)
    rows = [Row(name, "dense-loop", "torch", ms=base_ms, speedup=1.0, gflop=dense_f / 1e9,
                tflops=dense_f / (base_ms * 1e-3) / 1e12, max_diff=0.0, **common)]
    work, why = _rewrite(model)
    if work is None:
        rows.append(Row(name, "vopt-sparse", "-", note=f"not rewritten: {why}", **common))
        return rows
    call = lambda: tuple(work(**inputs))[:3]
    return rows + _sparse_rows(name, work, call, base_out, dense_f, routed_f, common, device, reps, base_ms)


def run_generic(experts: int, tokens: int, dim: int, ffn: int, top_k: int, dtype, device, reps: int) -> list:
    torch.manual_seed(experts)
    model = GenericMoE(dim, ffn, experts, top_k).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, dim, generator=g).to(device=device, dtype=dtype)
    name = f"generic-e{experts}"
    common = dict(experts=experts, top_k=top_k, rows=tokens, dtype=str(dtype).removeprefix("torch."))
    dense_f, routed_f = model.flops(tokens * experts), model.flops(tokens * top_k)
    base_out = model.dense(x)
    base_ms = _time(lambda: model.dense(x), device, reps)
    rows = [Row(name, "dense-loop", "torch", ms=base_ms, speedup=1.0, gflop=dense_f / 1e9,
                tflops=dense_f / (base_ms * 1e-3) / 1e12, max_diff=0.0, **common)]
    loop_out = model(x)
    loop_ms = _time(lambda: model(x), device, reps)
    rows.append(Row(name, "token-loop", "torch", ms=loop_ms, speedup=base_ms / loop_ms, gflop=routed_f / 1e9,
                    tflops=routed_f / (loop_ms * 1e-3) / 1e12, max_diff=_diff(base_out, loop_out), **common))
    work, why = _rewrite(model)
    if work is None:
        rows.append(Row(name, "vopt-sparse", "-", note=f"not rewritten: {why}", **common))
        return rows
    return rows + _sparse_rows(name, work, lambda: work(x), base_out, dense_f, routed_f, common, device, reps, base_ms)


def print_table(info: dict, rows: list) -> None:
    for k, v in info.items():
        print(f"# {k}: {v}")
    head = (f"{'case':<14} {'impl':<11} {'backend':<15} {'E':>3} {'k':>2} {'rows':>6} {'dtype':<8} {'ms':>10} "
            f"{'speedup':>8} {'GFLOP':>9} {'TFLOP/s':>8} {'max_diff':>9}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.case:<14} {r.impl:<11} {r.backend:<15} {r.experts:>3} {r.top_k:>2} {r.rows:>6} {r.dtype:<8} "
              f"{fmt(r.ms, '10.3f')} {fmt(r.speedup, '8.2f')} {fmt(r.gflop, '9.3f')} {fmt(r.tflops, '8.3f')} "
              f"{fmt(r.max_diff, '9.2g')}  {r.note}")


def _ints(text: Optional[str]) -> Optional[list]:
    return None if text is None else [int(v) for v in text.split(",") if v.strip()]


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", help="comma list of moe-vrd-tiny, moe-vrd-full, generic (default: all; generic runs "
                   "once per --experts value)")
    p.add_argument("--pairs", help="comma list of MoE-VRD tracklet-pair counts (default: 64,4096 GPU; 64,1024 CPU)")
    p.add_argument("--tokens", type=int, help="tokens of the generic block")
    p.add_argument("--dim", type=int, help="generic block width d")
    p.add_argument("--ffn", type=int, help="generic expert hidden width")
    p.add_argument("--experts", help="comma list of expert counts of the generic block (default: 8,64 GPU; 8,32 CPU)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default fp16 on GPU, fp32 on CPU")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--reps", type=int, help="timed runs per measurement (default 20 GPU, 5 CPU)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop starting new cases after this many seconds")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 2 reps: plumbing check, not a measurement")
    p.add_argument("--out", type=Path, help="write results as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    args = p.parse_args(argv)

    if refuses_overwrite("bench_moe", args.out, args.force):
        return 2
    device = pick_device("bench_moe", args.device)
    if device is None:
        return 2
    known = ("moe-vrd-tiny", "moe-vrd-full", "generic")
    cases = args.cases.split(",") if args.cases else list(known)
    bad = [c for c in cases if c not in known]
    if bad:
        print(f"bench_moe: unknown cases {bad}; accepted: {', '.join(known)}", file=sys.stderr)
        return 2
    base = SMOKE if args.smoke else (GPU if device.type == "cuda" else CPU)
    pairs = _ints(args.pairs) or base["pairs"]
    experts = _ints(args.experts) or base["experts"]
    tokens, dim, ffn = args.tokens or base["tokens"], args.dim or base["dim"], args.ffn or base["ffn"]
    reps = args.reps or base["reps"]
    dtype = DTYPES[args.dtype or base["dtype"]]
    if args.smoke and "moe-vrd-full" in cases and not args.cases:
        cases.remove("moe-vrd-full")   # 18 M parameters: not a smoke size

    info = bench_info(device, SMOKE_NOTE if args.smoke else measurement_mode(device))
    info.update(reps=reps, top_k=args.top_k, generic=dict(tokens=tokens, dim=dim, ffn=ffn),
                flops="expert GEMMs only (2 x MACs); dense = N*E rows, routed = N*k rows")
    jobs = []
    for c in cases:
        if c.startswith("moe-vrd"):
            jobs += [(f"{c} pairs={n}", lambda c=c, n=n: run_moe_vrd(c.split("-")[-1], n, dtype, device, reps))
                     for n in pairs]
        else:
            jobs += [(f"generic E={e}", lambda e=e: run_generic(e, tokens, dim, ffn, args.top_k, dtype, device, reps))
                     for e in experts]
    rows, skipped = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for label, job in jobs:
            if args.max_seconds is not None and time.perf_counter() - t0 > args.max_seconds:
                skipped.append(label)
                continue
            rows.extend(job())
            _sync(device)
    if skipped:
        info["skipped_cases"] = f"{', '.join(skipped)} (--max-seconds {args.max_seconds} spent)"
    print_table(info, rows)
    if args.out is not None:
        write_json(args.out, {"meta": info, "results": [asdict(r) for r in rows]})
        print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Print (and optionally save) the full-size cost of every zoo model: params, prefill FLOPs, KV bytes.

Everything is computed on the meta device (nothing allocated): parameters from
the built model, exact prefill FLOPs from FlopCounterMode over the stages, the
HoliTom/FastV "paper" FLOPs over the visual tokens, and KV-cache bytes.

    python tools/zoo_cost.py [--size full|tiny] [--frames N] [--out FILE [--force]]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    import torch

    from vopt import zoo

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=zoo.SIZES, default="full")
    p.add_argument("--frames", type=int, default=None, help="frames per video (default: each entry's own)")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = p.parse_args(argv)
    if args.out and Path(args.out).exists() and not args.force:
        print(f"zoo_cost: {args.out} exists; pass --force to overwrite", file=sys.stderr)
        return 2
    rows = []
    for name in zoo.names():
        c = zoo.cost(name, args.size, frames=args.frames)
        rows.append(c.to_dict())
    fmt = lambda x, s, u: "-" if x is None else f"{x / s:.2f} {u}"
    print(f"{'model':<16} {'frames':>6} {'params':>10} {'prefill (exact)':>16} {'paper':>11} {'vis. tokens':>11} {'KV/token':>10} {'KV/video':>10}")
    for r in rows:
        print(f"{r['model']:<16} {r['frames']:>6} {fmt(r['params'], 1e9, 'B'):>10} {fmt(r['prefill_flops'], 1e12, 'TF'):>16} "
              f"{fmt(r['prefill_flops_paper'], 1e12, 'TF'):>11} {r['visual_tokens'] if r['visual_tokens'] is not None else '-':>11} "
              f"{fmt(r['kv_bytes_per_token'], 1024, 'KiB'):>10} {fmt(r['kv_bytes_per_video'], 2**20, 'MiB'):>10}")
    print(f"# size {args.size}, dtype bfloat16, batch 1, meta device; torch {torch.__version__}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
        print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Accuracy of the zoo's trained tiny video model on the synthetic task, and what a pass pipeline changes.

    .venv/bin/python tools/eval_video_qa.py                    # held-out QA accuracy + grounding (small split)
    .venv/bin/python tools/eval_video_qa.py --full             # 2000 QA clips, 1000 grounding clips
    .venv/bin/python tools/eval_video_qa.py --passes sdpa      # + vopt.eval.compare(original, optimized)
    .venv/bin/python tools/eval_video_qa.py --passes default   # the default pass pipeline
    .venv/bin/python tools/eval_video_qa.py --full --json benchmarks/results/video_qa_tiny.json

The model is ``vopt.zoo.build(vopt.zoo.DEFAULT_MODEL)`` (weights trained by ``tools/train_video_qa.py``); the
splits are ``vopt.eval.video_task``'s held-out "test" split. Prints tables; ``--json`` writes every number (refuses
to overwrite an existing file unless ``--force``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import vopt  # noqa: E402
from vopt import eval as veval, zoo  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="bigger splits: 2000 QA and 1000 grounding clips")
    p.add_argument("--n", type=int, default=None, help="QA clips (default 400, --full 2000)")
    p.add_argument("--n-grounding", type=int, default=None, help="grounding clips (default 200, --full 1000)")
    p.add_argument("--seed", type=int, default=0, help="split seed (and bootstrap seed)")
    p.add_argument("--passes", default=None,
                   help="comma-separated pass names, or 'default' (vopt's default pipeline): also optimize the model "
                        "and compare it with the original")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--force", action="store_true", help="overwrite --json if it exists")
    p.add_argument("--per-sample", action="store_true", help="keep per-clip predictions in the JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.json and os.path.exists(args.json) and not args.force:
        print(f"error: {args.json} exists (pass --force to overwrite)", file=sys.stderr)
        return 2
    n_qa = args.n or (2000 if args.full else 400)
    n_gr = args.n_grounding or (1000 if args.full else 200)
    model = zoo.build(zoo.DEFAULT_MODEL).model
    qa = veval.video_qa(model, n=n_qa, seed=args.seed)
    gr = veval.grounding(model, n=n_gr, seed=args.seed)
    print(f"{zoo.DEFAULT_MODEL} (tiny, trained), held-out 'test' split, seed {args.seed}")
    print(qa.table())
    print(gr.table())
    result = {
        "model": zoo.DEFAULT_MODEL, "split": "test", "seed": args.seed,
        "versions": {"vopt": vopt.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "video_qa": qa.to_dict(args.per_sample), "grounding": gr.to_dict(args.per_sample),
    }
    if args.passes:
        passes = None if args.passes == "default" else [p.strip() for p in args.passes.split(",") if p.strip()]
        optimized = vopt.optimize(model, passes=passes)
        cmp = veval.compare(model, optimized, n=n_qa, seed=args.seed)
        names = [p["name"] for p in optimized.report.passes]
        print(f"\noriginal vs vopt.optimize(passes={names})")
        print(cmp.table())
        result["passes"] = names
        result["compare"] = cmp.to_dict()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

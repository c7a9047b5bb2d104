#!/usr/bin/env python3
"""Train the tiny LLaVA-OneVision on the synthetic video task (QA + grounding), on CPU, from a seed.

    .venv/bin/python tools/train_video_qa.py --out /tmp/llava_ov_videoqa.safetensors

reproduces ``vopt/zoo/weights/llava-onevision-tiny.safetensors`` (the zoo's default model) up to float
non-associativity across machines: same seed, same data, same schedule. The model is exactly
``vopt.zoo.build("llava-onevision", pretrained=False)`` (HF ``LlavaOnevisionForConditionalGeneration``); the task is
:mod:`vopt.eval.video_task`. Each example is ``[<bos>, video placeholders, question, answer...]`` and the loss is
cross-entropy on the answer tokens only (one for a QA answer, two -- start and end frame -- for grounding), with
teacher forcing. The held-out accuracy is measured at the end with :func:`vopt.eval.video_qa` on the "test" split
and written next to the weights (``.json``).

``--size tiny64`` trains ``vopt.zoo.build("llava-onevision", "tiny64")`` (64x64 frames, 16 tokens per frame) on
64x64 clips of the same task: ``vopt/zoo/weights/llava-onevision-tiny64.safetensors``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vopt.eval import video_task as vt  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="where to write the .safetensors (a .json with metrics goes beside it)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--size", default="tiny", help="zoo size of llava-onevision: tiny (32x32 frames) or tiny64 (64x64)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the data and the batch order")
    p.add_argument("--steps", type=int, default=5000, help="optimizer steps")
    p.add_argument("--batch", type=int, default=64, help="examples per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (linear warm-up, cosine decay)")
    p.add_argument("--train-qa", type=int, default=24000, help="QA training clips (generated once)")
    p.add_argument("--train-grounding", type=int, default=8000, help="grounding training clips")
    p.add_argument("--eval-every", type=int, default=1000, help="validate every N steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    return p.parse_args(argv)


def encode(samples, video_token_id: int) -> dict:
    """Right-padded batch with answers appended (teacher forcing); ``targets``/``target_pos`` index the loss."""
    rows, targets = [], []
    n_video = vt.video_token_count(*_clip_dims(samples))
    for s in samples:
        answer = s.answer_tokens if isinstance(s, vt.GroundingSample) else [s.answer_id]
        prefix = [vt.BOS_ID] + [video_token_id] * n_video + list(s.question_tokens)
        rows.append(prefix + answer[:-1])
        targets.append([(len(prefix) - 1 + j, tok) for j, tok in enumerate(answer)])
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), vt.PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    video = (torch.stack([s.video for s in samples]) - 0.5) / 0.5
    rows_idx = torch.tensor([i for i, t in enumerate(targets) for _ in t])
    pos = torch.tensor([p for t in targets for p, _ in t])
    tok = torch.tensor([k for t in targets for _, k in t])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": video, "rows": rows_idx, "pos": pos,
            "tok": tok}


def _clip_dims(samples):
    frames, _, side, _ = samples[0].video.shape
    return frames, side, 8


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.path.exists(args.out) and not args.force:
        print(f"error: {args.out} exists (pass --force to overwrite)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from vopt import eval as veval, zoo

    torch.manual_seed(args.seed)
    zm = zoo.build("llava-onevision", args.size, pretrained=False)
    model = zm.model
    vid = model.config.video_token_index
    side = dict(height=model.config.vision_config.image_size, width=model.config.vision_config.image_size)
    t0 = time.time()
    train = vt.make_split("train", args.train_qa, seed=args.seed, **side)
    train += vt.make_grounding_split("train", args.train_grounding, seed=args.seed, **side)
    val = vt.make_split("val", 512, seed=args.seed, **side)
    print(f"data: {len(train)} training examples in {time.time() - t0:.0f}s", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=gen).tolist()
    cursor, t0, running = 0, time.time(), None
    model.train()
    for step in range(args.steps):
        if cursor + args.batch > len(order):
            order, cursor = torch.randperm(len(train), generator=gen).tolist(), 0
        batch = [train[j] for j in order[cursor:cursor + args.batch]]
        cursor += args.batch
        b = encode(batch, vid)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       pixel_values_videos=b["pixel_values_videos"]).logits
        loss = torch.nn.functional.cross_entropy(logits[b["rows"], b["pos"]], b["tok"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1} loss {running:.4f} lr {lr_at(step, args.steps, args.lr):.2e} "
                  f"{(time.time() - t0) / (step + 1):.3f}s/step", flush=True)
        if (step + 1) % args.eval_every == 0:
            res = veval.video_qa(model, samples=val, bootstrap=0)
            per_type = " ".join(f"{k} {v.accuracy:.3f}" for k, v in res.per_type.items())
            print(f"  val accuracy {res.accuracy:.4f} ({per_type})", flush=True)

    from safetensors.torch import save_file

    import vopt

    model.eval()
    qa = veval.video_qa(model, samples=vt.make_split("test", 1000, seed=args.seed, **side), seed=args.seed)
    gr = veval.grounding(model, samples=vt.make_grounding_split("test", 400, seed=args.seed, **side), seed=args.seed)
    print(qa.table())
    print(gr.table())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, args.out, metadata={"seed": str(args.seed), "steps": str(args.steps)})
    info = {
        "model": f"llava-onevision ({args.size})", "task": "vopt.eval.video_task", "args": vars(args),
        "train_seconds": round(time.time() - t0, 1), "final_loss": running,
        "versions": {"vopt": vopt.__version__, "torch": torch.__version__},
        "test_video_qa": qa.to_dict(per_sample=False), "test_grounding": gr.to_dict(per_sample=False),
    }
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(info, f, indent=2)
    print(f"wrote {args.out} (+ .json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

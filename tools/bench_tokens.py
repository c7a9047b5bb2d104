#!/usr/bin/env python
"""Visual-token merging benchmark: time to first token, decode speed, LLM FLOPs and fidelity of HoliTom and its
peers against the unmerged LLaVA-OneVision, at several retain ratios (issue 8; spec shared/specs/tokens.md §5-§6).

Models (``--sizes``):

* ``tiny``: the trained zoo model (``vopt.zoo.build("llava-onevision")``, 8 frames x 4 pooled tokens + newline).
  Fidelity: :func:`vopt.eval.compare` on ``--eval-n`` held-out clips (answer agreement, accuracy delta).
* ``medium``: random weights, Qwen2-0.5B's language model (896 wide, 24 layers, 14 heads / 2 KV heads, MLP 4864;
  vocab 32000 instead of 151936, which only changes the one-token LM head) under a small SigLIP (256 wide, 2 layers,
  112 px, patch 14: 16 pooled tokens per frame), ``--frames`` frames (default 16: 257 video tokens). Fidelity:
  cosine similarity and top-1 agreement of the last position's logits vs the unmerged model (random weights have no
  right answers).
* ``full``: LLaVA-OV-7B's dimensions with random weights (32 frames, 196 tokens per frame), GPU only (``--gpu``).

Methods (configs of the ``holitom`` pass, equal budget per retain ratio r):
``holitom`` (outer stage), ``holitom+inner`` (outer at r, plus inner merging at layer round(N * 18/28) keeping half:
the paper's K=18 of 28), ``visionzip`` (per-frame attention top-k + contextual tokens, D = 0.16 ~ VisionZip's
54 dominant + 10 contextual), ``pool`` (uniform per-frame pooling), ``fastv`` (no outer stage; inner pruning at layer
2 keeping r of the visual tokens: FastV's K=2 at the same budget).

Metrics per row: ``ttft_ms`` = median wall time of ``generate(max_new_tokens=1)`` (vision tower + merging + LLM
prefill + one token); ``decode_tok_s`` = ``D / (t(1 + D) - t(1))`` from ``generate(min_new_tokens = max_new_tokens =
1 + D)``; the video tokens the LLM received; the LLM prefill FLOPs over the video tokens with the paper's formula
(:mod:`vopt.merging.flops`) as a fraction of the unmerged model's; speedups are vs the ``none`` row measured in the
same run. CPU numbers are CPU measurements (``time.perf_counter``), not GPU numbers.

    python tools/bench_tokens.py [--sizes tiny,medium] [--retains 0.25,0.15,0.10] [--methods ...] [--reps 3]
        [--decode 8] [--eval-n 128] [--frames 16] [--out FILE [--force]] [--smoke] [--gpu]
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import Timer, bench_info, fmt, measurement_mode, pick_device, refuses_overwrite, write_json  # noqa: E402

METHODS = ("holitom", "holitom+inner", "visionzip", "pool", "fastv")
VISIONZIP_CONTEXTUAL = 0.16  # VisionZip keeps 54 dominant + 10 contextual of 64: 10/64 of the budget contextual
MEDIUM_TEXT = dict(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096)
MEDIUM_VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                     image_size=112, patch_size=14)


@dataclass
class Row:
    size: str
    method: str
    retain: Optional[float]
    ttft_ms: Optional[float] = None
    ttft_speedup: Optional[float] = None
    decode_tok_s: Optional[float] = None
    decode_speedup: Optional[float] = None
    video_tokens: Optional[int] = None        #: per video, into the LLM (after the outer stage)
    video_tokens_inner: Optional[int] = None  #: per video, from the inner layer on (inner methods)
    video_tokens_full: Optional[int] = None
    paper_flops_frac: Optional[float] = None
    agreement: Optional[float] = None
    accuracy_delta: Optional[float] = None
    logit_cos: Optional[float] = None
    note: str = ""


# ---- models ----------------------------------------------------------------------------------------------------


def build_model(size: str, device: torch.device, frames: int):
    """``(model, inputs, trained)``; ``inputs`` is one batch-1 video prompt."""
    from vopt import zoo

    if size == "tiny":
        zm = zoo.build("llava-onevision")
        from vopt.eval import scoring

        inputs = scoring.model_inputs(zm.model, scoring.qa_samples("test", 1, 0, 8, None))
        return zm.model.to(device).eval(), {k: v.to(device) for k, v in inputs.items()}, True
    import transformers as T

    from vopt.zoo import llava_onevision as lo
    from vopt.zoo._inputs import prompt_ids

    if size == "medium":
        text, vision, ids, dtype = MEDIUM_TEXT, MEDIUM_VISION, lo.TINY_IDS | dict(image_token_index=31000,
                                                                                  video_token_index=31001), torch.float32
    elif size == "full":
        text, vision, ids, dtype = lo.FULL_TEXT, lo.FULL_VISION, lo.FULL_IDS, torch.bfloat16
    else:
        raise ValueError(f"--sizes: unknown size {size!r}; accepted: tiny, medium, full")
    side = vision["image_size"]
    cfg = T.LlavaOnevisionConfig(text_config=dict(model_type="qwen2", **text),
                                 vision_config=dict(model_type="siglip_vision_model", **vision),
                                 vision_feature_layer=-1, vision_feature_select_strategy="full",
                                 image_grid_pinpoints=[[side, side]], **ids)
    torch.manual_seed(0)
    with torch.device(device):
        model = T.LlavaOnevisionForConditionalGeneration(cfg).to(dtype).eval()
    gen = torch.Generator().manual_seed(0)
    n_video = frames * lo.tokens_per_frame(cfg) + 1
    inputs = {"input_ids": prompt_ids(1, n_video, cfg.video_token_index, cfg.text_config.vocab_size, gen),
              "pixel_values_videos": torch.randn(1, frames, 3, side, side, generator=gen).to(dtype)}
    return model, {k: v.to(device) for k, v in inputs.items()}, False


def method_config(method: str, retain: float, layers: int):
    from vopt.merging import HoliTomConfig
    from vopt.passes.holitom import HoliTomPassConfig

    if method == "fastv":
        return HoliTomPassConfig(outer=False, inner_layer=min(2, layers - 1), inner_keep=retain, inner_merge=False)
    merge = HoliTomConfig(retain_ratio=retain, tau=0.65 if retain <= 0.10 else 0.8,
                          method={"visionzip": "visionzip", "pool": "pool"}.get(method, "holitom"),
                          dominant_ratio=VISIONZIP_CONTEXTUAL if method == "visionzip" else 0.0)
    if method == "holitom+inner":
        return HoliTomPassConfig(merge=merge, inner_layer=min(round(layers * 18 / 28), layers - 1), inner_keep=0.5)
    return HoliTomPassConfig(merge=merge)


# ---- measurements ----------------------------------------------------------------------------------------------


def timings(model, inputs: dict, timer: Timer, decode: int) -> tuple:
    """``(ttft_ms, decode tokens/s)`` of ``model.generate`` on ``inputs`` (greedy)."""
    def gen(n):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    t1 = timer(lambda: gen(1))
    if decode <= 0:
        return t1, None
    tn = timer(lambda: gen(1 + decode))
    return t1, (decode / ((tn - t1) * 1e-3) if tn > t1 else None)


def last_logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[:, -1].float()


def measure(size: str, model, inputs: dict, trained: bool, methods: list, retains: list, args, timer: Timer) -> list:
    import vopt
    import vopt.eval
    from vopt.merging.flops import paper_prefill_flops
    from vopt.optimize import OptimizeConfig
    from vopt.passes.holitom import STATS_ATTR

    text = model.config.get_text_config()
    layers = text.num_hidden_layers
    n_full = int((inputs["input_ids"] == model.config.video_token_id).sum())
    flops = lambda n, **kw: paper_prefill_flops(layers, text.hidden_size, text.intermediate_size, n, **kw)
    base_ttft, base_tok_s = timings(model, inputs, timer, args.decode)
    base = Row(size, "none", None, base_ttft, 1.0, base_tok_s, 1.0 if base_tok_s else None, n_full, None, n_full, 1.0,
               note="unmerged baseline")
    rows = [base]
    base_logits = None if trained else last_logits(model, inputs)
    for retain in retains:
        for method in methods:
            row = Row(size, method, retain, video_tokens_full=n_full)
            try:
                cfg = method_config(method, retain, layers)
                opt = vopt.optimize(model, OptimizeConfig(pass_configs={"holitom": cfg}), passes=["holitom"])
                row.ttft_ms, row.decode_tok_s = timings(opt, inputs, timer, args.decode)
                stats = getattr(opt.module, STATS_ATTR)
                into = stats.tokens_after // max(stats.videos, 1) if cfg.outer else n_full
                row.video_tokens = into
                if cfg.inner_layer is not None and stats.inner.prefills:
                    row.video_tokens_inner = stats.inner.visual_after // stats.inner.prefills
                    row.paper_flops_frac = flops(into, inner_layer=cfg.inner_layer, inner_keep=cfg.inner_keep) / flops(n_full)
                else:
                    row.paper_flops_frac = flops(into) / flops(n_full)
                if trained:
                    cmp = vopt.eval.compare(model, opt, n=args.eval_n, seed=0, stages=False)
                    row.agreement, row.accuracy_delta = cmp.agreement, cmp.accuracy_delta
                else:
                    got = last_logits(opt, inputs)
                    row.logit_cos = torch.nn.functional.cosine_similarity(got, base_logits, dim=-1).min().item()
                    row.agreement = (got.argmax(-1) == base_logits.argmax(-1)).float().mean().item()
            except (RuntimeError, ValueError, NotImplementedError) as exc:  # a method that cannot run is a row
                row.note = f"failed: {type(exc).__name__}: {exc}"[:200]
            if row.ttft_ms:
                row.ttft_speedup = base_ttft / row.ttft_ms
            if row.decode_tok_s and base_tok_s:
                row.decode_speedup = row.decode_tok_s / base_tok_s
            rows.append(row)
            print(f"  {size} {method} r={retain}: ttft {fmt(row.ttft_ms, '.1f')} ms", file=sys.stderr, flush=True)
    return rows


def print_table(info: dict, rows: list) -> None:
    for k, v in info.items():
        print(f"# {k}: {v}")
    head = (f"{'size':<7} {'method':<14} {'retain':>6} {'TTFT ms':>9} {'TTFT x':>7} {'dec tok/s':>9} {'dec x':>6} "
            f"{'vid tok':>8} {'inner':>6} {'FLOPs%':>7} {'agree':>6} {'dAcc':>7} {'cos':>7}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        frac = None if r.paper_flops_frac is None else 100 * r.paper_flops_frac
        print(f"{r.size:<7} {r.method:<14} {fmt(r.retain, '6.2f')} {fmt(r.ttft_ms, '9.1f')} {fmt(r.ttft_speedup, '7.2f')} "
              f"{fmt(r.decode_tok_s, '9.1f')} {fmt(r.decode_speedup, '6.2f')} {fmt(r.video_tokens, '8')} "
              f"{fmt(r.video_tokens_inner, '6')} {fmt(frac, '7.1f')} {fmt(r.agreement, '6.3f')} "
              f"{fmt(r.accuracy_delta, '+7.3f')} {fmt(r.logit_cos, '7.4f')}  {r.note}")


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="comma list of tiny, medium, full (default: tiny,medium on CPU; "
                   "tiny,full with --gpu)")
    p.add_argument("--retains", default="0.25,0.15,0.10", help="comma list of retain ratios in (0, 1]")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--frames", type=int, default=16, help="frames of the medium model's video (full: 32)")
    p.add_argument("--reps", type=int, default=3, help="timed generate calls per measurement (median)")
    p.add_argument("--decode", type=int, default=8, help="decode tokens timed after the first (0: skip)")
    p.add_argument("--eval-n", type=int, default=128, help="held-out clips for the trained tiny model's fidelity")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--gpu", action="store_true", help="GPU profile: sizes tiny,full; fewer reps")
    p.add_argument("--smoke", action="store_true", help="plumbing check: tiny, one retain, two methods, 1 rep")
    p.add_argument("--out", type=Path, help="write results as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    args = p.parse_args(argv)
    if refuses_overwrite("bench_tokens", args.out, args.force):
        return 2
    device = pick_device("bench_tokens", "cuda" if args.gpu else args.device)
    if device is None:
        return 2
    sizes = (args.sizes or ("tiny,full" if args.gpu else "tiny,medium")).split(",")
    retains = [float(r) for r in args.retains.split(",")]
    methods = args.methods.split(",")
    if args.smoke:
        sizes, retains, methods, args.reps, args.decode, args.eval_n = ["tiny"], [0.25], ["holitom", "fastv"], 1, 2, 8
    bad = [m for m in methods if m not in METHODS]
    if bad or not all(0 < r <= 1 for r in retains):
        print(f"bench_tokens: --methods accepts {', '.join(METHODS)} (got {bad}); --retains must lie in (0, 1]",
              file=sys.stderr)
        return 2
    if "full" in sizes and device.type != "cuda":
        print("bench_tokens: size 'full' needs a GPU (--gpu)", file=sys.stderr)
        return 2
    logging.getLogger("vopt.capture").setLevel(logging.ERROR)  # "runs eagerly" notes for every inner variant
    mode = "SMOKE TEST: NOT a performance measurement" if args.smoke else measurement_mode(device)
    info = bench_info(device, mode)
    timer = Timer(device, warmup=1, reps=args.reps, cold_l2=False)
    rows = []
    for size in sizes:
        frames = 32 if size == "full" else args.frames
        model, inputs, trained = build_model(size, device, frames)
        rows += measure(size, model, inputs, trained, methods, retains, args, timer)
        del model
    print_table(info, rows)
    if args.out is not None:
        write_json(args.out, {"meta": {**info, "sizes": sizes, "retains": retains, "methods": methods,
                                       "reps": args.reps, "decode": args.decode, "eval_n": args.eval_n,
                                       "frames_medium": args.frames},
                              "results": [asdict(r) for r in rows]})
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

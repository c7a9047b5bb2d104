#!/usr/bin/env python
"""Visual-token merging benchmark: time to first token, decode speed, LLM FLOPs and fidelity of HoliTom and its
peers against the unmerged LLaVA-OneVision, at several retain ratios (issue 8; spec shared/specs/tokens.md §5-§6).

Models (``--sizes``):

* ``tiny``: the trained zoo model (``vopt.zoo.build("llava-onevision")``, 8 frames x 4 pooled tokens + newline).
  Fidelity: :func:`vopt.eval.compare` on ``--eval-n`` held-out clips of ``--eval-split`` (answer agreement,
  accuracy delta, accuracy with its bootstrap CI and as a fraction of the unmerged model's).
* ``tiny64``: the same, trained at 64x64 frames (``vopt.zoo.build("llava-onevision", "tiny64")``, 8 frames x 16
  pooled tokens + newline = 129 video tokens; most are black background, like a real video's static scene); clips of
  the same task rendered at 64x64. Same methods and fidelity metrics as ``tiny``.
* ``medium``: random weights, Qwen2-0.5B's language model (896 wide, 24 layers, 14 heads / 2 KV heads, MLP 4864;
  vocab 32000 instead of 151936, which only changes the one-token LM head) under a small SigLIP (256 wide, 2 layers,
  112 px, patch 14: 16 pooled tokens per frame), ``--frames`` frames (default 16: 257 video tokens). Fidelity:
  cosine similarity and top-1 agreement of the last position's logits vs the unmerged model (random weights have no
  right answers).
* ``full``: LLaVA-OV-7B's dimensions with random weights (32 frames, 196 tokens per frame), GPU only (``--gpu``).

Methods (configs of the ``holitom`` pass, equal budget per retain ratio r; ``--tuned`` overrides their knobs):
``holitom`` (outer stage), ``holitom+inner`` (outer at r, plus inner merging at layer round(N * 18/28) keeping half:
the paper's K=18 of 28), ``visionzip`` (per-frame attention top-k + contextual tokens, D = 0.16 ~ VisionZip's
54 dominant + 10 contextual), ``pool`` (uniform per-frame pooling), ``fastv`` (no outer stage; inner pruning at layer
2 keeping r of the visual tokens: FastV's K=2 at the same budget).

Metrics per row: ``ttft_ms`` = median wall time of ``generate(max_new_tokens=1)`` (vision tower + merging + LLM
prefill + one token); ``decode_tok_s`` = ``D / (t(1 + D) - t(1))`` from ``generate(min_new_tokens = max_new_tokens =
1 + D)``; the video tokens the LLM received; the LLM prefill FLOPs over the video tokens with the paper's formula
(:mod:`vopt.merging.flops`) as a fraction of the unmerged model's; speedups are vs the ``none`` row measured in the
same run. CPU numbers are CPU measurements (``time.perf_counter``), not GPU numbers.

    python tools/bench_tokens.py [--sizes tiny,tiny64,medium] [--retains 0.25,0.15,0.10] [--methods ...] [--reps 3]
        [--decode 8] [--eval-n 128] [--eval-split test] [--tuned JSON|@FILE] [--frames 16] [--out FILE [--force]]
        [--smoke] [--gpu]

``--tuned`` maps a method (``"holitom"``) or a method at one retain ratio (``"holitom@0.1"``, applied after the
method's own) to knob overrides: fields of ``HoliTomConfig`` (``tau``, ``beta``, ``knn``, ``dominant_ratio``, ...)
or of ``HoliTomPassConfig`` (``positions``, ``scores``, ``inner_layer``, ``inner_keep``, ...). Tune them on
``--eval-split val``, report on ``test``.
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
TRAINED = ("tiny", "tiny64")  # sizes that are zoo sizes of the trained llava-onevision (fidelity on the video task)
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
    accuracy: Optional[float] = None          #: trained sizes: this row's accuracy on the eval clips
    accuracy_ci: Optional[list] = None        #: its 95 % bootstrap CI
    accuracy_frac: Optional[float] = None     #: accuracy / the unmerged model's accuracy on the same clips
    accuracy_delta_ci: Optional[list] = None  #: paired 95 % bootstrap CI of accuracy_delta (same clips, both models)
    eval_n: Optional[int] = None
    video_tokens_mean: Optional[float] = None #: trained sizes: mean over the eval clips of video_tokens (unrounded)
    config: Optional[dict] = None             #: method rows: the knobs of their holitom pass config
    logit_cos: Optional[float] = None
    note: str = ""


# ---- models ----------------------------------------------------------------------------------------------------


def build_model(size: str, device: torch.device, frames: int):
    """``(model, inputs, trained)``; ``inputs`` is one batch-1 video prompt."""
    from vopt import zoo

    if size in TRAINED:
        zm = zoo.build("llava-onevision", size)
        from vopt.eval import scoring

        inputs = scoring.model_inputs(zm.model, eval_samples(zm.model, "test", 1))
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
        raise ValueError(f"--sizes: unknown size {size!r}; accepted: {', '.join(TRAINED)}, medium, full")
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


def eval_samples(model, split: str, n: int) -> list:
    """``n`` clips (seed 0, 8 frames) of the video task's ``split`` at the trained ``model``'s image size."""
    from vopt.eval import video_task as vt

    side = model.config.vision_config.image_size
    return vt.make_split(split, n, seed=0, frames=8, height=side, width=side)


def overrides_for(tuned: Optional[dict], method: str, retain: float) -> dict:
    """``tuned[method]`` updated with ``tuned["method@r"]`` for ``r == retain`` (see the module docstring)."""
    out = dict((tuned or {}).get(method, {}))
    for key, knobs in (tuned or {}).items():
        name, _, r = key.partition("@")
        if name == method and r and abs(float(r) - retain) < 1e-9:
            out.update(knobs)
    return out


def method_config(method: str, retain: float, layers: int, overrides: Optional[dict] = None):
    """The ``holitom`` pass config of ``method`` at ``retain`` with ``overrides`` (knob -> value) applied."""
    import dataclasses

    from vopt.merging import HoliTomConfig
    from vopt.passes.holitom import HoliTomPassConfig

    overrides = dict(overrides or {})
    merge_fields = {f.name for f in dataclasses.fields(HoliTomConfig)}
    pass_fields = {f.name for f in dataclasses.fields(HoliTomPassConfig)} - {"merge"}
    unknown = set(overrides) - merge_fields - pass_fields
    if unknown:
        raise ValueError(f"--tuned: unknown knob(s) {sorted(unknown)} for {method}")
    merge_kw = {k: v for k, v in overrides.items() if k in merge_fields}
    pass_kw = {k: v for k, v in overrides.items() if k in pass_fields}
    if method == "fastv":
        return HoliTomPassConfig(**{**dict(outer=False, inner_layer=min(2, layers - 1), inner_keep=retain,
                                           inner_merge=False), **pass_kw})
    merge = HoliTomConfig(**{**dict(retain_ratio=retain, tau=0.65 if retain <= 0.10 else 0.8,
                                    method={"visionzip": "visionzip", "pool": "pool"}.get(method, "holitom"),
                                    dominant_ratio=VISIONZIP_CONTEXTUAL if method == "visionzip" else 0.0),
                             **merge_kw})
    if method == "holitom+inner":
        pass_kw = {**dict(inner_layer=min(round(layers * 18 / 28), layers - 1), inner_keep=0.5), **pass_kw}
    return HoliTomPassConfig(merge=merge, **pass_kw)


def config_summary(cfg) -> dict:
    """The knobs of a ``holitom`` pass config that matter for fidelity (for the results JSON)."""
    m = cfg.merge
    out = {k: getattr(cfg, k) for k in ("outer", "positions", "scores", "inner_layer", "inner_keep", "inner_merge")}
    if cfg.outer:
        out.update({k: getattr(m, k) for k in ("method", "retain_ratio", "tau", "beta", "knn", "dominant_ratio")})
        out.update({k: str(getattr(getattr(m, k), "value", getattr(m, k))) for k in ("cluster_merge", "budget_rounding")})
    return out


# ---- measurements ----------------------------------------------------------------------------------------------


def timings(model, inputs: dict, timer: Optional[Timer], decode: int) -> tuple:
    """``(ttft_ms, decode tokens/s)`` of ``model.generate`` on ``inputs`` (greedy); ``(None, None)`` without a timer."""
    if timer is None:
        return None, None

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


def token_counts(stats) -> tuple:
    """``(videos merged, video tokens the LLM received, visual tokens kept at the inner layer, inner prefills)``
    so far (generate calls are batch 1: an inner prefill is one video)."""
    return stats.videos, stats.tokens_after, stats.inner.visual_after, stats.inner.prefills


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
    base = Row(size, "none", None, base_ttft, 1.0 if base_ttft else None, base_tok_s, 1.0 if base_tok_s else None,
               n_full, None, n_full, 1.0, note="unmerged baseline")
    rows = [base]
    base_logits = None if trained else last_logits(model, inputs)
    samples = eval_samples(model, args.eval_split, args.eval_n) if trained else None
    if trained:
        res = vopt.eval.video_qa(model, samples=samples, seed=0)
        base.accuracy, base.accuracy_ci, base.accuracy_frac, base.eval_n = res.accuracy, list(res.ci), 1.0, res.n
    for retain in retains:
        for method in methods:
            row = Row(size, method, retain, video_tokens_full=n_full)
            try:
                cfg = method_config(method, retain, layers, overrides_for(getattr(args, "tuned", None), method, retain))
                row.config = config_summary(cfg)
                opt = vopt.optimize(model, OptimizeConfig(pass_configs={"holitom": cfg}), passes=["holitom"])
                try:
                    row.ttft_ms, row.decode_tok_s = timings(opt, inputs, timer, args.decode)
                except NotImplementedError as exc:  # e.g. generate() with positions='original': fidelity still runs
                    row.note = f"not timed: {exc}"[:200]
                stats = getattr(opt.module, STATS_ATTR)
                counts = token_counts(stats)       # (videos, video tokens into the LLM, inner visual tokens, rows)
                if trained:  # token counts: the mean over the eval clips (budgets may vary per clip)
                    cmp = vopt.eval.compare(model, opt, samples=samples, seed=0, stages=False)
                    counts = tuple(b - a for a, b in zip(counts, token_counts(stats)))[:3] + (cmp.n,)
                    row.agreement, row.accuracy_delta = cmp.agreement, cmp.accuracy_delta
                    row.accuracy, row.accuracy_ci = cmp.accuracy_optimized, list(cmp.optimized_result.ci)
                    row.accuracy_frac = cmp.accuracy_optimized / cmp.accuracy_baseline if cmp.accuracy_baseline else None
                    row.eval_n = cmp.n
                    diff = [float(o) - float(b) for o, b in zip(cmp.optimized_result.correct, cmp.baseline_result.correct)]
                    row.accuracy_delta_ci = list(vopt.eval.scoring.bootstrap_ci(diff, seed=0))
                videos, after, inner_after, rows_inner = counts
                row.video_tokens_mean = after / videos if cfg.outer and videos else float(n_full)
                into = round(row.video_tokens_mean) if trained else (after // max(videos, 1) if cfg.outer else n_full)
                row.video_tokens = into
                if cfg.inner_layer is not None and rows_inner:
                    row.video_tokens_inner = round(inner_after / rows_inner) if trained else inner_after // rows_inner
                    row.paper_flops_frac = flops(into, inner_layer=cfg.inner_layer, inner_keep=cfg.inner_keep) / flops(n_full)
                else:
                    row.paper_flops_frac = flops(into) / flops(n_full)
                if not trained:
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
            print(f"  {size} {method} r={retain}: ttft {fmt(row.ttft_ms, '.1f')} ms agree {fmt(row.agreement, '.3f')} "
                  f"acc {fmt(row.accuracy, '.3f')} {row.note}", file=sys.stderr, flush=True)
    return rows


def print_table(info: dict, rows: list) -> None:
    for k, v in info.items():
        print(f"# {k}: {v}")
    head = (f"{'size':<7} {'method':<14} {'retain':>6} {'TTFT ms':>9} {'TTFT x':>7} {'dec tok/s':>9} {'dec x':>6} "
            f"{'vid tok':>8} {'inner':>6} {'FLOPs%':>7} {'agree':>6} {'dAcc':>7} {'acc':>6} {'%base':>6} {'cos':>7}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        frac = None if r.paper_flops_frac is None else 100 * r.paper_flops_frac
        print(f"{r.size:<7} {r.method:<14} {fmt(r.retain, '6.2f')} {fmt(r.ttft_ms, '9.1f')} {fmt(r.ttft_speedup, '7.2f')} "
              f"{fmt(r.decode_tok_s, '9.1f')} {fmt(r.decode_speedup, '6.2f')} {fmt(r.video_tokens, '8')} "
              f"{fmt(r.video_tokens_inner, '6')} {fmt(frac, '7.1f')} {fmt(r.agreement, '6.3f')} "
              f"{fmt(r.accuracy_delta, '+7.3f')} {fmt(r.accuracy, '6.3f')} "
              f"{fmt(None if r.accuracy_frac is None else 100 * r.accuracy_frac, '6.1f')} {fmt(r.logit_cos, '7.4f')}  {r.note}")


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="comma list of tiny, tiny64, medium, full (default: tiny,medium on "
                   "CPU; tiny,full with --gpu)")
    p.add_argument("--retains", default="0.25,0.15,0.10", help="comma list of retain ratios in (0, 1]")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--frames", type=int, default=16, help="frames of the medium model's video (full: 32)")
    p.add_argument("--reps", type=int, default=3, help="timed generate calls per measurement (median)")
    p.add_argument("--decode", type=int, default=8, help="decode tokens timed after the first (0: skip)")
    p.add_argument("--eval-n", type=int, default=128, help="held-out clips for the trained tiny models' fidelity")
    p.add_argument("--eval-split", choices=["val", "test"], default="test", help="their split (tune on val)")
    p.add_argument("--tuned", default=None, help="JSON (or @FILE) of knob overrides per method / method@retain")
    p.add_argument("--no-timing", action="store_true", help="skip the TTFT / decode timings (fidelity only)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--gpu", action="store_true", help="GPU profile: sizes tiny,full; fewer reps")
    p.add_argument("--smoke", action="store_true", help="plumbing check: tiny, one retain, two methods, 1 rep")
    p.add_argument("--out", type=Path, help="write results as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    args = p.parse_args(argv)
    if refuses_overwrite("bench_tokens", args.out, args.force):
        return 2
    if args.tuned is not None:
        import json

        args.tuned = json.loads(Path(args.tuned[1:]).read_text() if args.tuned.startswith("@") else args.tuned)
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
    timer = None if args.no_timing else Timer(device, warmup=1, reps=args.reps, cold_l2=False)
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
                                       "eval_split": args.eval_split, "tuned": args.tuned, "timing": timer is not None,
                                       "frames_medium": args.frames},
                              "results": [asdict(r) for r in rows]})
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

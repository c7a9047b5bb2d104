#!/usr/bin/env python
"""KV-cache fidelity on the trained tiny LLaVA-OneVision: long-generation agreement and per-token KL of quantized
caches vs the full-precision cache, with each cache's measured stored bits (issue 7; spec shared/specs/kvcache.md §6).

For each of ``--n`` held-out video-QA clips (batch 1) the model generates ``--tokens`` tokens greedily with a
``DynamicCache`` (the baseline). Then, per cache setting:

* **free run**: greedy generation with the setting's cache -> ``token_agreement`` (fraction of the ``--tokens``
  positions whose token equals the baseline's), ``exact`` (fraction of clips whose whole continuation is identical),
  ``first_diff`` (mean index of the first differing token, ``--tokens`` when none differs);
* **teacher forced**: prefill, then the *baseline's* tokens fed one by one through the setting's cache; per step the
  KL divergence ``KL(p_base || p_setting)`` of the next-token distributions (nats): ``kl_mean`` over all steps and
  clips, ``kl_p99`` and ``kl_max``. Step 0 (the prefill's logits) is included; vopt's caches attend to exact K/V in
  the prefill, so their step-0 KL is 0 and only decode steps see quantized K/V;
* ``answer_acc``: the first generated token is the QA answer (the task's accuracy under that cache);
* ``bits``: stored bits per K/V element at the end of the last clip's free run, from :func:`vopt.kvcache.account`
  for vopt's caches (codes + scales/zero points + indices + full-precision window + protected tokens), and from the
  bytes of every tensor the layers hold for transformers' caches (same definition: all stored bytes / elements).

Scaled to the tiny model: its prompts are ~40 tokens, so the full-precision window is ``--residual`` (default 8)
tokens and quantization groups ``--group`` (default 16) tokens, instead of 128 / 32 (with those, nothing would be
quantized). Settings: ``fp`` (DynamicCache, the baseline itself: a sanity row with KL 0), ``kivi2``
(:func:`vopt.kvcache.kivi_config`), ``vidkv-reference`` (the published layout and its re-quantizing flush),
``vidkv-recommended``, ``vidkv-recommended+text`` (text/system tokens kept full precision), and transformers'
own ``QuantizedCache`` backends where they run here: ``hf-fp8`` (built in; per-tensor FP8) and ``hf-quanto-int2`` /
``hf-quanto-int4`` (needs ``optimum-quanto``; otherwise a "not run" row with the reason).

    python tools/eval_kvcache.py [--n 64] [--tokens 24] [--residual 8] [--group 16] [--settings a,b]
        [--out FILE [--force]] [--smoke]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import bench_info, fmt, refuses_overwrite, write_json  # noqa: E402

SETTINGS = ("fp", "kivi2", "vidkv-reference", "vidkv-recommended", "vidkv-recommended+text", "hf-fp8",
            "hf-quanto-int2", "hf-quanto-int4")


@dataclass
class Row:
    setting: str
    bits: Optional[float] = None
    answer_acc: Optional[float] = None
    token_agreement: Optional[float] = None
    exact: Optional[float] = None
    first_diff: Optional[float] = None
    kl_mean: Optional[float] = None
    kl_p99: Optional[float] = None
    kl_max: Optional[float] = None
    note: str = ""
    kls: list = field(default_factory=list, repr=False)


def make_cache(setting: str, model, input_ids: torch.Tensor, residual: int, group: int):
    """A fresh cache for one clip, or raise ``RuntimeError`` with the reason it cannot run here."""
    from transformers import DynamicCache, QuantizedCache

    from vopt.kvcache import KVQuantMode, VidKVConfig, kivi_config
    from vopt.kvcache.cache import VidKVCache

    text = model.config.get_text_config()
    if setting == "fp":
        return DynamicCache(config=text)
    if setting.startswith("hf-"):
        backend, _, nbits = setting[3:].partition("-int")
        try:
            if backend == "fp8":
                return QuantizedCache("fp8", text)
            return QuantizedCache(backend, text, nbits=int(nbits), q_group_size=group, residual_length=residual)
        except ImportError as exc:
            raise RuntimeError(f"not run: {str(exc).splitlines()[0][:120]}") from None
    groups = dict(key_group_size=group, value_group_size=group)
    protected = None
    flush = "append"
    if setting == "kivi2":
        cfg = kivi_config(group_size=group)
    elif setting == "vidkv-reference":
        cfg, flush = VidKVConfig(mode=KVQuantMode.REFERENCE, **groups), "requantize"
    elif setting in ("vidkv-recommended", "vidkv-recommended+text"):
        cfg = VidKVConfig(**groups)
        if setting.endswith("+text"):
            protected = input_ids[0] != model.config.video_token_id
    else:
        raise ValueError(f"--settings: unknown setting {setting!r}; accepted: {', '.join(SETTINGS)}")
    return VidKVCache(model.config, vidkv=cfg, residual_length=residual, protected=protected, flush=flush)


def stored_bits(cache, text_config) -> Optional[float]:
    """Stored bits per K/V element: vopt caches via ``account``; others from the bytes of their tensors."""
    from vopt.kvcache import cache_stored_bytes

    if hasattr(cache, "account"):
        return cache.account().bits_per_element
    tokens = max(int(layer.get_seq_length()) for layer in cache.layers)
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    elements = 2 * len(cache.layers) * heads * head_dim * tokens
    return 8.0 * cache_stored_bytes(cache) / elements if elements else None


def generate(model, inputs: dict, cache, n: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache=cache)
    return out[0, -n:]


def forced_logits(model, inputs: dict, cache, tokens: torch.Tensor) -> torch.Tensor:
    """``[n, V]`` next-token logits: after the prompt, then after each of ``tokens[:-1]`` fed through ``cache``."""
    rows = []
    with torch.no_grad():
        out = model(**inputs, cache=cache, use_cache=True)
        rows.append(out.logits[0, -1])
        for t in tokens[:-1]:
            out = model(input_ids=t.view(1, 1), cache=cache, use_cache=True)
            rows.append(out.logits[0, -1])
    return torch.stack(rows).double()


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    p = torch.log_softmax(p_logits, -1)
    return (p.exp() * (p - torch.log_softmax(q_logits, -1))).sum(-1)


def run(args) -> tuple:
    from vopt import zoo
    from vopt.eval import scoring

    model = zoo.build("llava-onevision").model.eval()
    text = model.config.get_text_config()
    samples = scoring.qa_samples("test", args.n, args.seed, 8, None)
    clips = []
    for s in samples:
        inputs = scoring.model_inputs(model, [s])
        base_tokens = generate(model, inputs, make_cache("fp", model, inputs["input_ids"], 0, 0), args.tokens)
        base_logits = forced_logits(model, inputs, make_cache("fp", model, inputs["input_ids"], 0, 0), base_tokens)
        clips.append((inputs, base_tokens, base_logits, s.answer_id))
    rows = []
    for setting in args.settings:
        row = Row(setting)
        agree = exact = first = correct = 0
        t0 = time.perf_counter()
        try:
            for inputs, base_tokens, base_logits, answer in clips:
                cache = make_cache(setting, model, inputs["input_ids"], args.residual, args.group)
                toks = generate(model, inputs, cache, args.tokens)
                row.bits = stored_bits(cache, text)
                same = (toks == base_tokens)
                agree += int(same.sum())
                exact += int(same.all())
                first += int(torch.nonzero(~same)[0, 0]) if not bool(same.all()) else args.tokens
                correct += int(int(toks[0]) == answer)
                cache = make_cache(setting, model, inputs["input_ids"], args.residual, args.group)
                row.kls.append(kl(base_logits, forced_logits(model, inputs, cache, base_tokens)))
        except RuntimeError as exc:
            if not str(exc).startswith("not run"):
                raise
            row.note = str(exc)
            rows.append(row)
            print(f"  {setting}: {row.note}", file=sys.stderr, flush=True)
            continue
        n = len(clips)
        all_kl = torch.cat(row.kls)
        row.token_agreement, row.exact, row.first_diff = agree / (n * args.tokens), exact / n, first / n
        row.answer_acc = correct / n
        row.kl_mean, row.kl_max = float(all_kl.mean()), float(all_kl.max())
        row.kl_p99 = float(torch.quantile(all_kl, 0.99))
        print(f"  {setting}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def print_table(info: dict, rows: list) -> None:
    for k, v in info.items():
        print(f"# {k}: {v}")
    head = (f"{'setting':<24} {'bits':>6} {'answer':>7} {'tok agree':>9} {'exact':>6} {'1st diff':>8} "
            f"{'KL mean':>9} {'KL p99':>9} {'KL max':>9}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.setting:<24} {fmt(r.bits, '6.2f')} {fmt(r.answer_acc, '7.3f')} {fmt(r.token_agreement, '9.3f')} "
              f"{fmt(r.exact, '6.3f')} {fmt(r.first_diff, '8.2f')} {fmt(r.kl_mean, '9.2e')} {fmt(r.kl_p99, '9.2e')} "
              f"{fmt(r.kl_max, '9.2e')}  {r.note}")


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="held-out clips")
    p.add_argument("--tokens", type=int, default=24, help="generated tokens per clip")
    p.add_argument("--residual", type=int, default=8, help="full-precision window (tokens)")
    p.add_argument("--group", type=int, default=16, help="quantization group size (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    p.add_argument("--smoke", action="store_true", help="plumbing check: 2 clips, 6 tokens")
    p.add_argument("--out", type=Path, help="write results as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    args = p.parse_args(argv)
    args.settings = args.settings.split(",")
    bad = [s for s in args.settings if s not in SETTINGS]
    if bad:
        print(f"eval_kvcache: unknown --settings {bad}; accepted: {', '.join(SETTINGS)}", file=sys.stderr)
        return 2
    if refuses_overwrite("eval_kvcache", args.out, args.force):
        return 2
    if args.smoke:
        args.n, args.tokens = 2, 6
    torch.manual_seed(0)
    info = bench_info(torch.device("cpu"), "fidelity (CPU; timing-free)" if not args.smoke else "SMOKE TEST")
    import transformers

    info["transformers"] = transformers.__version__
    try:
        from importlib.metadata import version

        info["optimum_quanto"] = version("optimum-quanto")
    except Exception:  # noqa: BLE001 - not installed: the hf-quanto rows say so
        info["optimum_quanto"] = None
    rows = run(args)
    print_table(info, rows)
    if args.out is not None:
        write_json(args.out, {"meta": {**info, "n": args.n, "tokens": args.tokens, "residual": args.residual,
                                       "group": args.group, "seed": args.seed},
                              "results": [{k: v for k, v in asdict(r).items() if k != "kls"} for r in rows]})
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

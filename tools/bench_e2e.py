#!/usr/bin/env python
"""End-to-end benchmark: for each zoo model, what every vopt pass saves and what it costs in answers.

For each zoo model (``vopt.zoo.list()``) it measures, in one process and on the same inputs, these **variants**:

* ``eager``: the model as built (HF models use their configured attention, ``sdpa`` for the zoo's HF entries):
  **the baseline** every ratio is taken against;
* ``compile``: ``torch.compile(model)`` of the baseline (what a user would otherwise run). Compiling on CPU takes
  ~20 s per model, so by default only ``--compile-models`` (``llava-onevision,llama``) get it; ``--compile-models
  all`` for every model. The compile time (first call) is its own metric, never folded into TTFT; decode is not
  measured for it (``generate`` would recompile per length);
* ``hf-quantized-cache``: transformers' own quantized KV cache (``generate(cache_implementation="quantized")``):
  4-bit with ``optimum-quanto`` or ``hqq`` when one imports, else its built-in per-tensor ``fp8`` backend (the
  row's config says which);
* ``pass:<name>``: each registered pass of the zoo entry alone, through ``vopt.optimize(model, passes=[...])``.
  Graph passes that act on SDPA nodes get ``canonicalize_attention`` first (``sdpa``, ``sageattention2``, so eager
  matmul-softmax attention is quantized too); the exact pass list is recorded per row. A pass listed by the entry but
  not registered (yet) gets a "not run: not registered" row, so it is picked up once it lands;
* ``all``: every applicable registered pass together (runtime passes first, then graph passes, ordered by their
  ``after`` / ``before``).

Metrics (one long-format row per model, variant, metric; ``value`` + ``unit``):

* ``ttft_ms``: time to first token = median latency of one forward over the example prompt (the prefill that
  produces the first token's logits; for vopt variants the captured, pass-rewritten path), ``--reps`` timed runs
  after ``--warmup``; ``ttft_speedup`` = eager / variant (>1 is faster), A/B: eager is re-timed right before each
  variant (``eager_ttft_ms_ab``), so drift of a shared machine cancels;
* ``decode_tok_s``: ``N / (t(generate 1+N tokens) - t(generate 1 token))``, greedy, ``min_new_tokens`` forced
  (generating models only); ``decode_speedup`` vs eager re-timed the same way (``eager_decode_tok_s_ab``).
  ``generate`` runs the language model eagerly in vopt variants (a cache cannot cross an export boundary), so graph
  passes show in TTFT, runtime passes (``vidkv``) here;
* ``peak_mem_bytes``: CPU: growth of the process's peak RSS over one prefill + one generate (``VmHWM`` of
  ``/proc/self/status`` after resetting it through ``/proc/self/clear_refs``, minus ``VmRSS`` before): measured, but
  at tiny sizes it is allocator noise of a few pages; GPU: ``torch.cuda.max_memory_allocated`` minus the allocation
  before the call. ``weights_bytes`` (parameters + buffers) is separate;
* ``kv_bytes``: the cache ``generate`` returns: ``vopt.kvcache.account`` for a ``VidKVCache``, tensor bytes of the
  keys and values for a ``DynamicCache`` (after 1+N tokens);
* ``visual_tokens``: visual tokens per video entering the LLM (``zm.visual_tokens``; HoliTom: what the working
  copy's ``vopt_holitom_stats`` measured);
* ``flops_measured``: ``torch.utils.flop_counter.FlopCounterMode`` over one prefill forward (vopt's attention custom
  ops are counted with SDPA's formula, block-sparse attention over its live tiles); ``flops_analytic``:
  ``vopt.zoo.cost`` (the baseline's stage-wise count on the meta device); ``flops_paper``: the HoliTom/FastV
  analytic LLM count over this row's visual tokens;
* fidelity vs eager. The trained tiny ``llava-onevision``: ``vopt.eval.compare`` on ``--fidelity-n`` held-out
  clips (``agreement``, ``accuracy``, ``accuracy_delta``, ``answer_logit_cos``, ``answer_kl``); every model: the
  main output on the example inputs (``output_cos``, ``output_rel_l2``, and ``output_kl`` over the last dim when it
  is logits) and ``gen_token_agreement`` (share of the N greedy tokens equal to eager's: the only fidelity metric that
  sees KV-cache quantization).

Sizes: ``tiny`` (default: every zoo model, CPU), ``medium`` (random weights, larger shapes defined here:
LLaVA-OneVision with a Qwen2-0.5B-like LLM, Llama at 0.5B-like dims; other models are "not run" at this size) and
``full`` (the zoo's published dims, materialized with random weights on the device: GPU only). ``--gpu`` is the
profile of ``tools/gpu_check.sh`` (~4 min on an H100).

Also per variant: ``optimize_s`` / ``compile_s`` (never part of TTFT), ``rewrites`` (matches the passes rewrote; a
variant that rewrote nothing has status ``no-op`` and its passes' skip reasons in the notes), ``weights_bytes``.

Outputs in ``--out DIR`` (refused if it exists and is not empty, unless ``--force``; rewritten after every model, so
a run cut by a time limit keeps what it measured, ``meta.complete`` False): ``results.csv`` and ``results.json``
(long format: one row per model, variant, metric with device, versions, the pass list and this run's pass-config
overrides; the JSON adds ``meta`` with the run settings and every pass's full config per variant), ``table.md``,
``speed_vs_fidelity.png`` and ``memory_per_model.png`` (matplotlib; skipped with a message when it is missing).
``--update-readme README.md --from DIR`` rewrites only the README block between ``<!-- bench_e2e:begin -->`` and
``<!-- bench_e2e:end -->`` from the committed results.

    python tools/bench_e2e.py --out benchmarks/results/e2e_cpu [--force] [--models a,b] [--size tiny|medium|full]
        [--reps N] [--decode-tokens N] [--fidelity-n N] [--compile-models a,b|all|none] [--variants ...] [--gpu]
    python tools/bench_e2e.py --update-readme README.md --from benchmarks/results/e2e_cpu
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import Timer, bench_info, measurement_mode, pick_device  # noqa: E402
import _e2e_report as report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOOL = "bench_e2e"
SIZES = ("tiny", "medium", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_COMPILE = ("llava-onevision", "llama")
VARIANT_KINDS = ("eager", "compile", "hf-quantized-cache", "passes", "all")
#: Graph passes that act on SDPA nodes: they get canonicalize_attention first, so eager attention is covered too.
PREREQUISITES = {"sdpa": ("canonicalize_attention",), "sageattention2": ("canonicalize_attention",)}
#: The trained zoo model whose fidelity is measured on held-out clips (vopt.eval).
TRAINED = "llava-onevision"
#: vidkv at tiny size: the tiny prompts (12-86 tokens) are shorter than the default 128-token full-precision window
#: and barely one 32-token quantization group, which would leave nothing quantized; medium / full use the defaults.
TINY_VIDKV = {"residual_length": 8, "vidkv": {"key_group_size": 8, "value_group_size": 8}}
GPU_PROFILE = dict(device="cuda", size="medium", dtype="bf16", models="llava-onevision,llama", reps=10, warmup=3,
                   decode_tokens=32, fidelity_n=64, compile_models="llava-onevision", max_seconds=200)


# ---- models -------------------------------------------------------------------------------------------------------


def build_model(name: str, size: str, device: torch.device, dtype: torch.dtype):
    """A ``vopt.zoo.ZooModel`` at ``size`` on ``device``, or a string saying why not."""
    import vopt.zoo as zoo

    if size == "tiny":
        zm = zoo.build(name, "tiny", device=device, dtype=dtype)
        return zm
    if size == "full":
        if device.type != "cuda":
            return "size 'full' materializes the published dims: GPU only"
        with torch.random.fork_rng(devices=[device]):
            torch.manual_seed(0)
            zm = zoo.build(name, "full", device=device, dtype=dtype, pretrained=False)
        return zm
    builder = MEDIUM.get(name)
    if builder is None:
        return f"no medium shape defined for {name} (defined: {', '.join(MEDIUM)})"
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        zm = builder(device, dtype)
    zm.model.eval()
    return zm


def _medium_llava(device: torch.device, dtype: torch.dtype):
    """LLaVA-OneVision, random weights: SigLIP 384-wide/6 layers at 224 px (49 pooled tokens per frame), a
    Qwen2-0.5B-like LLM (896 wide, 24 layers, 14 heads / 2 KV, MLP 4864; vocab 32000), 8 frames."""
    import transformers as T
    from vopt.zoo import LLMDims, ZooModel
    from vopt.zoo._inputs import prompt_ids
    from vopt.zoo.llava_onevision import tokens_per_frame

    text = dict(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096)
    vision = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                  image_size=224, patch_size=16)
    side = vision["image_size"]
    cfg = T.LlavaOnevisionConfig(text_config=dict(model_type="qwen2", **text),
                                 vision_config=dict(model_type="siglip_vision_model", **vision),
                                 vision_feature_layer=-1, vision_feature_select_strategy="full",
                                 image_grid_pinpoints=[[side, side]], image_token_index=31998, video_token_index=31999)
    with torch.device(device):
        model = T.LlavaOnevisionForConditionalGeneration(cfg).to(dtype)
    per_frame, frames = tokens_per_frame(cfg), 8

    def visual_tokens(n: int) -> int:
        return n * per_frame + 1

    def example_inputs(batch: int = 1, frames: int = frames, seed: int = 0) -> dict:
        gen = torch.Generator().manual_seed(seed)
        ids = prompt_ids(batch, visual_tokens(frames), cfg.video_token_index, cfg.text_config.vocab_size, gen)
        video = torch.randn(batch, frames, 3, side, side, generator=gen)
        return {"input_ids": ids.to(device), "pixel_values_videos": video.to(device=device, dtype=dtype)}

    return ZooModel("llava-onevision", "medium", model, example_inputs, frames, generates=True,
                    llm=LLMDims.from_hf(cfg.text_config), visual_tokens=visual_tokens)


def _medium_llama(device: torch.device, dtype: torch.dtype):
    """Llama, random weights, 0.5B-like: 896 wide, 24 layers, 14 heads / 2 KV, MLP 4864, vocab 32000; 512 tokens."""
    import transformers as T
    from vopt.zoo import LLMDims, ZooModel

    cfg = T.LlamaConfig(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096)
    with torch.device(device):
        model = T.LlamaForCausalLM(cfg).to(dtype)

    def example_inputs(batch: int = 1, seq_len: int = 512, seed: int = 0) -> dict:
        gen = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen).to(device)}

    return ZooModel("llama", "medium", model, example_inputs, 0, generates=True, llm=LLMDims.from_hf(cfg))


MEDIUM = {"llava-onevision": _medium_llava, "llama": _medium_llama}


# ---- variants -----------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    kind: str                       #: eager | compile | hf-quantized-cache | passes | all
    passes: tuple = ()
    skip: Optional[str] = None      #: "not run" reason


def _pipeline(names: list) -> tuple:
    """Runtime passes first, then graph passes, each group ordered by ``after`` / ``before`` (stable)."""
    from vopt.pass_manager import _order
    from vopt.pass_protocol import PassKind, get_pass

    classes = [get_pass(n) for n in dict.fromkeys(names)]
    runtime = [c for c in classes if c.kind is PassKind.RUNTIME]
    graph = [c for c in classes if c.kind is not PassKind.RUNTIME]
    return tuple(c.name for c in _order(runtime) + _order(graph))


def quantized_cache_backend() -> tuple:
    """(backend, None) for transformers' quantized cache, or (None, reason): 4-bit ``quanto`` / ``HQQ`` when one is
    installed, else the ``fp8`` backend transformers 5 ships (per-tensor FP8, no extra package)."""
    for module, backend in (("optimum.quanto", "quanto"), ("hqq", "HQQ")):
        try:
            if importlib.util.find_spec(module) is not None:
                return backend, None
        except (ImportError, ValueError):
            continue
    try:
        from transformers.cache_utils import Fp8QuantizedLayer  # noqa: F401  (transformers >= 5 ships it)
    except ImportError:
        return None, "neither optimum-quanto nor hqq is installed and this transformers has no fp8 quantized cache"
    return "fp8", None


def quantized_cache_config(backend: str) -> dict:
    """``generate(cache_config=...)`` for :func:`quantized_cache_backend`'s backend (fp8 takes no bit width)."""
    return {"backend": backend} if backend == "fp8" else {"backend": backend, "nbits": 4}


def plan_variants(entry, zm, kinds: set, compile_models: set, only_passes: Optional[set] = None) -> list:
    """The variants of one model (see the module docstring), with a ``skip`` reason where one cannot run."""
    from vopt.pass_protocol import registered_passes

    registered = registered_passes()
    out = [Variant("eager", "eager")]
    if "compile" in kinds:
        why = None if (entry.name in compile_models or "all" in compile_models) else \
            "not in --compile-models (CPU compile takes ~20 s per model)"
        out.append(Variant("compile", "compile", skip=why))
    if "hf-quantized-cache" in kinds:
        backend, why = quantized_cache_backend()
        if not zm.generates:
            why = "the model does not generate"
        out.append(Variant("hf-quantized-cache", "hf-quantized-cache", skip=why))
    applicable = [p for p in entry.passes if p in registered]
    if "passes" in kinds:
        for p in entry.passes:
            if only_passes is not None and p not in only_passes:
                continue
            if p not in registered:
                out.append(Variant(f"pass:{p}", "passes", (p,), skip=f"pass {p!r} is not registered (yet)"))
            else:
                out.append(Variant(f"pass:{p}", "passes", _pipeline([*PREREQUISITES.get(p, ()), p])))
    if "all" in kinds:
        why = None if applicable else "no registered pass applies"
        out.append(Variant("all", "all", _pipeline(applicable) if applicable else (), skip=why))
    return out


def pass_configs(size: str, passes: tuple) -> dict:
    """Per-pass configs of this run (recorded in every row)."""
    cfgs = {}
    if "vidkv" in passes and size == "tiny":
        cfgs["vidkv"] = json.loads(json.dumps(TINY_VIDKV))
    return cfgs


# ---- measurement helpers ------------------------------------------------------------------------------------------


def call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def main_tensor(output) -> Optional[torch.Tensor]:
    """The output compared for fidelity: ``logits`` when present, else the first floating tensor found."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = output.values() if isinstance(output, dict) else \
        (output.to_tuple() if hasattr(output, "to_tuple") else (output if isinstance(output, (tuple, list)) else
                                                                 [getattr(output, k) for k in vars(output)]))
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    return None


def output_fidelity(base: torch.Tensor, other: torch.Tensor, is_logits: bool) -> dict:
    """cos-sim and relative L2 of the flattened outputs (float64); for logits ``[B, L, V]`` those of the last
    position (the next token's), plus KL(softmax(base) || softmax(other)), mean over the batch."""
    if base.shape != other.shape:
        return {"_note": f"output shape {tuple(other.shape)} != eager {tuple(base.shape)}"}
    if is_logits and base.dim() == 3:
        base, other = base[:, -1], other[:, -1]  # the next token's logits (HoliTom zeroes dropped video slots)
    b, o = base.detach().double().reshape(-1).cpu(), other.detach().double().reshape(-1).cpu()
    nb, no = b.norm().item(), o.norm().item()
    out = {"output_cos": (b @ o).item() / (nb * no) if nb > 0 and no > 0 else float(nb == no),
           "output_rel_l2": (o - b).norm().item() / nb if nb > 0 else 0.0}
    if is_logits:
        lp = torch.log_softmax(base.detach().double().cpu(), dim=-1)
        lq = torch.log_softmax(other.detach().double().cpu(), dim=-1)
        out["output_kl"] = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0).mean().item()
    return out


def _attention_flops(args: tuple, kwargs: dict, out_val=None) -> int:
    q, k, v = args[0], args[1], args[2]
    batch_heads = math.prod(q.shape[:-2])
    lq, lk, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    return 2 * batch_heads * lq * lk * (d + dv)


def _block_sparse_flops(args: tuple, kwargs: dict, out_val=None) -> int:
    dense = _attention_flops(args, kwargs)
    block_mask = args[3] if len(args) > 3 else kwargs.get("block_mask")
    if isinstance(block_mask, torch.Tensor) and block_mask.numel():
        return int(dense * block_mask.float().mean().item())
    return dense


def _grouped_gemm_flops(args: tuple, kwargs: dict, out_val=None) -> int:
    x, w = args[0], args[1]  # x [M, K] rows routed to experts, w [E, K, N]: each row meets one expert's matrix
    return 2 * x.shape[0] * x.shape[1] * w.shape[2]


def _vq_argmin_flops(args: tuple, kwargs: dict, out_val=None) -> int:
    x, codebook = args[0], args[1]  # distances of x [N, D] to every code [K, D]: the x @ c^T GEMM
    return 2 * x.shape[0] * codebook.shape[0] * x.shape[1]


def _raw(fn: Callable) -> Callable:
    def formula(*args, out_val=None, **kwargs):
        return fn(args, kwargs, out_val)

    formula._get_raw = True
    return formula


def flop_mapping() -> dict:
    """FlopCounterMode formulas for the attention ops its registry lacks: vopt's opaque attention custom ops (those
    registered) and the CPU flash SDPA kernel that ``F.scaled_dot_product_attention`` dispatches to on CPU."""
    mapping = {}
    for name, fn in (("attention", _attention_flops), ("sage_attention", _attention_flops),
                     ("block_sparse_attention", _block_sparse_flops), ("grouped_gemm", _grouped_gemm_flops),
                     ("vq_argmin", _vq_argmin_flops)):
        packet = getattr(torch.ops.vopt, name, None) if hasattr(torch.ops, "vopt") else None
        if packet is not None:
            mapping[packet] = _raw(fn)  # FlopCounterMode looks formulas up by overload packet
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _raw(_attention_flops)
    return mapping


class _VoptOps(TorchDispatchMode):
    """Records the ``vopt::`` custom ops a call runs (to name those FlopCounterMode cannot count)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "vopt":
            self.seen.add(func._overloadpacket)
        return func(*args, **(kwargs or {}))


def measured_flops(model, inputs) -> tuple:
    """(FLOPs of one forward, names of the vopt custom ops that ran without a formula: counted as 0).

    FlopCounterMode needs parameters without ``requires_grad`` under ``no_grad`` (views of parameters trip its
    autograd bookkeeping); the flags are switched off for the count and restored."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = flop_mapping()
    counter, ops = FlopCounterMode(display=False, custom_mapping=mapping), _VoptOps()
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        with counter, ops:
            call(model, inputs)
    finally:
        for p in params:
            p.requires_grad_(True)
    uncounted = sorted(str(op).replace("vopt.", "vopt::") for op in ops.seen if op not in mapping)
    return float(counter.get_total_flops()), uncounted


def _proc_status_kb(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory(device: torch.device, fn: Callable[[], Any]) -> tuple:
    """(bytes, None) growth of peak memory over ``fn()``, or (None, reason). See the module docstring."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, None
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError as exc:
        fn()
        return None, f"peak RSS cannot be reset here ({exc})"
    before = _proc_status_kb("VmRSS")
    fn()
    peak = _proc_status_kb("VmHWM")
    if before is None or peak is None:
        return None, "/proc/self/status has no VmRSS / VmHWM"
    return max(0, peak - before) * 1024, None


def cache_bytes(cache) -> tuple:
    """(bytes, kind) of a generate() cache."""
    if cache is None:
        return None, "no cache returned"
    from vopt.kvcache import cache_stored_bytes

    return cache_stored_bytes(cache), type(cache).__name__


def generate(model, inputs: dict, new_tokens: int, extra: dict):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  return_dict_in_generate=True, **extra)
    return model.generate(**inputs, **kwargs)


def _generated(out, inputs: dict) -> torch.Tensor:
    seq = out.sequences
    prompt = inputs.get("input_ids")
    if prompt is not None and seq.shape[1] > prompt.shape[1] and torch.equal(seq[:, :prompt.shape[1]], prompt):
        return seq[:, prompt.shape[1]:]
    return seq[:, -min(seq.shape[1], out_len(out)):]


def out_len(out) -> int:
    scores = getattr(out, "scores", None)
    return len(scores) if scores else out.sequences.shape[1]


def _rewrites(opt) -> tuple:
    """(rewritten matches, notes on the passes that rewrote nothing, with their first skip reason)."""
    rep = opt.report
    notes = []
    for name in [p["name"] for p in rep.passes]:
        if not rep.rewritten(name):
            reasons = [m.reason for m in rep.skipped(name) if m.reason]
            notes.append(f"{name} rewrote nothing" + (f" ({reasons[0]})" if reasons else " (no match)"))
    return len(rep.rewritten()), notes


# ---- one row ------------------------------------------------------------------------------------------------------


@dataclass
class Measured:
    metrics: dict = field(default_factory=dict)     #: metric -> (value, unit)
    notes: list = field(default_factory=list)
    status: str = "ok"
    config: dict = field(default_factory=dict)      #: pass name -> its full config (from the optimize report)


class ModelBench:
    """Everything measured for one model: the eager reference first, then each variant against it."""

    def __init__(self, entry, zm, args, device: torch.device, timer: Timer):
        self.entry, self.zm, self.args, self.device, self.timer = entry, zm, args, device, timer
        self.inputs = zm.example_inputs()
        self.is_dict = isinstance(self.inputs, dict)
        self.base_out: Optional[torch.Tensor] = None
        self.base_is_logits = False
        self.base_tokens: Optional[torch.Tensor] = None
        self.base_ttft: Optional[float] = None
        self.trained = entry.name == TRAINED and zm.size == "tiny" and entry.weights is not None
        self.cost = self._cost()

    def _cost(self) -> Optional[Any]:
        import vopt.zoo as zoo

        if self.zm.size not in ("tiny", "full"):
            return None
        try:
            return zoo.cost(self.entry.name, self.zm.size, frames=self.zm.default_frames or None,
                            dtype=next(self.zm.model.parameters()).dtype)
        except Exception as exc:  # noqa: BLE001 - an accounting failure is recorded, not fatal
            logging.getLogger(TOOL).warning("%s: vopt.zoo.cost failed: %s", self.entry.name, exc)
            return None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, v: Variant) -> Measured:
        res = Measured()
        m = res.metrics
        base = self.zm.model
        gen_extra: dict = {}
        model = base
        if v.kind == "compile":
            model = torch.compile(base)
            t0 = time.perf_counter()
            with torch.no_grad():
                call(model, self.inputs)
            self.sync()
            m["compile_s"] = (time.perf_counter() - t0, "s")
        elif v.kind == "hf-quantized-cache":
            backend, _ = quantized_cache_backend()
            gen_extra = {"cache_implementation": "quantized", "cache_config": quantized_cache_config(backend)}
            res.config = {"cache_config": gen_extra["cache_config"]}
        elif v.kind in ("passes", "all"):
            import vopt

            t0 = time.perf_counter()
            cfg = vopt.OptimizeConfig(passes=list(v.passes), pass_configs=pass_configs(self.zm.size, v.passes))
            model = vopt.optimize(base, cfg, example_inputs=self.inputs)
            self.sync()
            m["optimize_s"] = (time.perf_counter() - t0, "s")
            res.config = {p["name"]: p["config"] for p in model.report.passes}
            rewritten, idle = _rewrites(model)
            m["rewrites"] = (rewritten, "matches")
            res.notes += [n[:160] for n in idle]
            if rewritten == 0:
                res.status = "no-op"

        with torch.no_grad():
            out = call(model, self.inputs)
            self.sync()
            tensor = main_tensor(out)
            if v.kind == "eager":
                self.base_out = tensor
                # HF outputs carry .logits; our own generating models return the [B, L, vocab] logits tensor itself
                self.base_is_logits = getattr(out, "logits", None) is not None or (
                    self.zm.generates and tensor is not None and tensor.dim() == 3)
            elif tensor is not None and self.base_out is not None:
                for k, val in output_fidelity(self.base_out, tensor, self.base_is_logits).items():
                    if k == "_note":
                        res.notes.append(val)
                    else:
                        m[k] = (val, "")
            if v.kind != "hf-quantized-cache":
                # A/B: eager is re-timed right before the variant, so slow drift of a shared machine cancels.
                ref = None if v.kind == "eager" else self.timer(lambda: call(base, self.inputs))
                ttft = self.timer(lambda: call(model, self.inputs))
                m["ttft_ms"] = (ttft, "ms")
                if v.kind == "eager":
                    self.base_ttft = ttft
                else:
                    m["eager_ttft_ms_ab"] = (ref, "ms")
                    m["ttft_speedup"] = (ref / ttft, "x")
            if v.kind != "compile":
                try:
                    flops, uncounted = measured_flops(model, self.inputs)
                    m["flops_measured"] = (flops, "FLOP")
                    if uncounted:
                        res.notes.append(f"FLOPs of {', '.join(uncounted)} not counted (opaque op, no formula)")
                except Exception as exc:  # noqa: BLE001 - recorded in the row
                    res.notes.append(f"flop count failed: {type(exc).__name__}: {exc}"[:200])
            else:
                res.notes.append("FLOPs not counted through torch.compile (same math as eager)")

        self._tokens_and_cost(v, model, res, gen_extra)
        if self.trained and v.kind != "compile":
            self._trained_fidelity(v, model, res)
        elif self.trained:
            res.notes.append("held-out accuracy not run for compile (each eval batch shape recompiles)")
        return res

    def _visual_tokens(self, model) -> Optional[float]:
        """Visual tokens per video entering the LLM: the zoo's count, minus what HoliTom merged away (its stats count
        only the tokens it merges: GPT4Scene's BEV image tokens, for one, stay in the zoo's count)."""
        full = None
        if self.zm.visual_tokens is not None and self.zm.default_frames:
            full = float(self.zm.visual_tokens(self.zm.default_frames))
        stats = getattr(model, "vopt_holitom_stats", None)
        if stats is not None and stats.videos:
            merged = (stats.tokens_before - stats.tokens_after) / stats.videos
            return full - merged if full is not None else stats.tokens_after / stats.videos
        return full

    def _tokens_and_cost(self, v: Variant, model, res: Measured, gen_extra: dict) -> None:
        m = res.metrics
        vt = self._visual_tokens(model)
        if vt is not None:
            m["visual_tokens"] = (vt, "tokens")
        llm = self.zm.llm
        if llm is not None and vt is not None:
            from vopt.zoo._cost import paper_prefill_flops

            m["flops_paper"] = (paper_prefill_flops(llm.layers, llm.hidden, llm.intermediate, round(vt)), "FLOP")
        if self.cost is not None and self.cost.prefill_flops is not None:
            m["flops_analytic"] = (self.cost.prefill_flops, "FLOP")
        m["weights_bytes"] = (sum(t.numel() * t.element_size() for t in
                                  list(self.zm.model.parameters()) + list(self.zm.model.buffers())), "bytes")

        n = self.args.decode_tokens
        can_generate = self.zm.generates and self.is_dict and v.kind != "compile"
        if v.kind == "compile" and self.zm.generates:
            res.notes.append("decode not measured for compile (generate recompiles per length)")

        def run_once():
            with torch.no_grad():
                call(model, self.inputs)
                if can_generate:
                    generate(model, self.inputs, 1 + n, gen_extra)
            self.sync()

        if v.kind == "compile":
            mem, why = peak_memory(self.device, lambda: call(model, self.inputs))
        else:
            mem, why = peak_memory(self.device, run_once)
        if mem is not None:
            m["peak_mem_bytes"] = (mem, "bytes")
        elif why:
            res.notes.append(why)
        if not can_generate:
            return
        with torch.no_grad():
            out = generate(model, self.inputs, 1 + n, gen_extra)
            kv, kind = cache_bytes(getattr(out, "past_key_values", None))
            if kv is not None:
                m["kv_bytes"] = (kv, "bytes")
                res.notes.append(f"cache: {kind}")
            tokens = _generated(out, self.inputs)
            if v.kind == "eager":
                self.base_tokens = tokens
            elif self.base_tokens is not None and tokens.shape == self.base_tokens.shape:
                m["gen_token_agreement"] = ((tokens == self.base_tokens).float().mean().item(), "")
            # A/B as for TTFT: eager's generate timings are re-measured right before the variant's.
            ref1, refn = (None, None) if v.kind == "eager" else self._generate_times(self.zm.model, {})
            t1, tn = self._generate_times(model, gen_extra)
        if v.kind == "hf-quantized-cache":
            m["ttft_ms"] = (t1, "ms")
            m["eager_ttft_ms_ab"] = (ref1, "ms")
            m["ttft_speedup"] = (ref1 / t1, "x")
            res.notes.append("TTFT = generate(max_new_tokens=1), vs eager's (the cache is generate's)")
        rate = n / ((tn - t1) / 1e3) if tn > t1 else None
        ref_rate = n / ((refn - ref1) / 1e3) if ref1 is not None and refn > ref1 else None
        if rate is None:
            res.notes.append("decode time below timer resolution")
            return
        m["decode_tok_s"] = (rate, "tok/s")
        if ref_rate is not None:
            m["eager_decode_tok_s_ab"] = (ref_rate, "tok/s")
            m["decode_speedup"] = (rate / ref_rate, "x")

    def _generate_times(self, model, extra: dict) -> tuple:
        """(median ms of generate(1 token), of generate(1 + N tokens))."""
        n = self.args.decode_tokens
        with torch.no_grad():
            return (self.timer(lambda: generate(model, self.inputs, 1, extra)),
                    self.timer(lambda: generate(model, self.inputs, 1 + n, extra)))

    def _trained_fidelity(self, v: Variant, model, res: Measured) -> None:
        import vopt.eval as veval

        m = res.metrics
        n = self.args.fidelity_n
        if n <= 0:
            return
        if v.kind == "eager":
            qa = veval.video_qa(model, n=n, seed=self.args.seed, bootstrap=0)
            m["accuracy"] = (qa.accuracy, "")
            return
        if v.kind == "hf-quantized-cache":
            res.notes.append("held-out QA reads forward logits; a generate-only cache does not change them")
            return
        cmp = veval.compare(self.zm.model, model, n=n, seed=self.args.seed, stages=False)
        m["accuracy"] = (cmp.accuracy_optimized, "")
        m["accuracy_delta"] = (cmp.accuracy_delta, "")
        m["agreement"] = (cmp.agreement, "")
        m["answer_logit_cos"] = (cmp.logit_cos_mean, "")
        m["answer_kl"] = (cmp.kl_mean, "nats")


# ---- the run ------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="output folder (results.csv/.json, table.md, PNG plots)")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty --out")
    p.add_argument("--models", default="all", help="comma list of zoo names, or 'all'")
    p.add_argument("--size", choices=SIZES, default=None, help="tiny (default), medium (random weights), full (GPU)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="fp32 (default on CPU), bf16, fp16")
    p.add_argument("--variants", default=",".join(VARIANT_KINDS),
                   help=f"comma list of variant kinds: {', '.join(VARIANT_KINDS)}")
    p.add_argument("--passes", default="all",
                   help="comma list of pass names whose 'pass:<name>' variants run, or 'all' (the 'all' variant always "
                        "uses every applicable pass)")
    p.add_argument("--compile-models", default=None,
                   help=f"models that get the torch.compile variant: comma list, 'all' or 'none' "
                        f"(default {','.join(DEFAULT_COMPILE)})")
    p.add_argument("--reps", type=int, default=None, help="timed runs per latency (default 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1 CPU)")
    p.add_argument("--decode-tokens", type=int, default=None, help="N decode tokens per generate (default 16 CPU)")
    p.add_argument("--fidelity-n", type=int, default=None,
                   help=f"held-out clips for {TRAINED}'s accuracy / agreement (default 64; 0: skip)")
    p.add_argument("--seed", type=int, default=0, help="held-out split seed")
    p.add_argument("--max-seconds", type=float, default=None, help="stop starting new models after this many seconds")
    p.add_argument("--gpu", action="store_true",
                   help="the tools/gpu_check.sh profile: " + ", ".join(f"{k}={v}" for k, v in GPU_PROFILE.items()))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--update-readme", type=Path, metavar="README",
                   help="rewrite the bench_e2e block of this README from --from DIR's results.json, then exit")
    p.add_argument("--from", dest="from_dir", type=Path, help="results folder for --update-readme")
    args = p.parse_args(argv)
    profile = GPU_PROFILE if args.gpu else dict(device="auto", size="tiny", dtype="fp32", reps=5, warmup=1,
                                                 decode_tokens=16, fidelity_n=64,
                                                 compile_models=",".join(DEFAULT_COMPILE), max_seconds=None)
    for key, value in profile.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.models == "all" and args.gpu:
        args.models = GPU_PROFILE["models"]
    return args


def check_args(args) -> Optional[str]:
    import vopt.zoo as zoo

    kinds = [k for k in args.variants.split(",") if k]
    bad = [k for k in kinds if k not in VARIANT_KINDS]
    if bad:
        return f"--variants: unknown {bad}; accepted: {', '.join(VARIANT_KINDS)}"
    if args.models != "all":
        unknown = [m for m in args.models.split(",") if m not in zoo.names()]
        if unknown:
            return f"--models: unknown {unknown}; accepted: {', '.join(zoo.names())} or 'all'"
    if args.passes != "all":
        from vopt.pass_protocol import registered_passes

        known = set(registered_passes()) | {p for e in zoo.list() for p in e.passes}
        unknown = [p for p in args.passes.split(",") if p not in known]
        if unknown:
            return f"--passes: unknown {unknown}; accepted: {', '.join(sorted(known))} or 'all'"
    for name in ("reps", "warmup", "decode_tokens", "fidelity_n"):
        value = getattr(args, name)
        if value < (1 if name in ("reps", "decode_tokens") else 0):
            return f"--{name.replace('_', '-')} must be >= {1 if name in ('reps', 'decode_tokens') else 0}, got {value}"
    return None


def _progress(total: int, disable: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=TOOL, unit="model", disable=disable, file=sys.stderr, dynamic_ncols=True)


def run(args, device: torch.device, checkpoint: Optional[Callable[[dict, list], None]] = None) -> tuple:
    """Measure every (model, variant); returns (meta, long rows). ``checkpoint(meta, rows)`` runs after each model
    (the outputs so far survive a run killed by a time limit; ``meta["complete"]`` is False until the end)."""
    import vopt.zoo as zoo

    dtype = DTYPES[args.dtype]
    names = zoo.names() if args.models == "all" else args.models.split(",")
    compile_models = set() if args.compile_models == "none" else set(args.compile_models.split(","))
    kinds = set(args.variants.split(","))
    timer = Timer(device, args.warmup, args.reps, cold_l2=False)
    meta = bench_info(device, measurement_mode(device))
    meta.update(size=args.size, dtype=args.dtype, reps=args.reps, warmup=args.warmup, decode_tokens=args.decode_tokens,
                fidelity_n=args.fidelity_n, seed=args.seed, variants=sorted(kinds),
                compile_models=sorted(compile_models), prerequisites={k: list(v) for k, v in PREREQUISITES.items()},
                memory_method=("torch.cuda.max_memory_allocated growth over one prefill + generate"
                               if device.type == "cuda" else
                               "peak RSS growth (VmHWM reset via /proc/self/clear_refs) over one prefill + generate"),
                ttft_method="median forward latency over the example prompt (prefill)",
                decode_method="N / (t(generate 1+N) - t(generate 1)), greedy, min_new_tokens forced")
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        meta["transformers"] = None
    rows: list = []
    start = time.perf_counter()
    with _progress(len(names), args.no_progress) as bar:
        for entry in (zoo.get(name) for name in names):
            if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
                rows += report.not_run_rows(meta, entry.name, args.size, "eager", (),
                                            f"not run: --max-seconds {args.max_seconds:g} spent")
                _tick(bar, entry.name)
                continue
            rows += run_model(entry, args, device, dtype, timer, meta, kinds, compile_models, bar)
            _tick(bar, entry.name)
            if checkpoint is not None:
                checkpoint({**meta, "complete": False, "wall_s": round(time.perf_counter() - start, 1)}, rows)
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    meta["complete"] = True
    return meta, rows


def _tick(bar, label: str) -> None:
    if bar is not None:
        bar.set_postfix_str(label)
        bar.update(1)


def run_model(entry, args, device, dtype, timer, meta, kinds, compile_models, bar) -> list:
    log = logging.getLogger(TOOL)
    try:
        zm = build_model(entry.name, args.size, device, dtype)
    except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the others
        return report.not_run_rows(meta, entry.name, args.size, "eager", (), f"failed: build: {type(exc).__name__}: {exc}")
    if isinstance(zm, str):
        return report.not_run_rows(meta, entry.name, args.size, "eager", (), f"not run: {zm}")
    bench = ModelBench(entry, zm, args, device, timer)
    rows = []
    only = None if args.passes == "all" else set(args.passes.split(","))
    for v in plan_variants(entry, zm, kinds, compile_models, only):
        if bar is not None:
            bar.set_postfix_str(f"{entry.name} {v.name}")
        config = {"pass_configs": pass_configs(args.size, v.passes)} if v.passes else {}
        if v.skip:
            rows += report.not_run_rows(meta, entry.name, zm.size, v.name, v.passes, f"not run: {v.skip}", config)
            continue
        if v.kind != "eager" and bench.base_out is None and bench.base_ttft is None:
            rows += report.not_run_rows(meta, entry.name, zm.size, v.name, v.passes, "not run: the eager baseline failed",
                                        config)
            continue
        try:
            res = bench.measure(v)
        except Exception as exc:  # noqa: BLE001 - recorded as the row's status
            log.warning("%s %s failed: %s: %s", entry.name, v.name, type(exc).__name__, exc)
            rows += report.not_run_rows(meta, entry.name, zm.size, v.name, v.passes,
                                        f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                                        config)
            continue
        if res.config:  # every pass's full config, once per variant (the rows carry this run's overrides)
            meta.setdefault("variant_configs", {})[f"{entry.name}/{v.name}"] = res.config
        rows += report.metric_rows(meta, entry.name, zm.size, v.name, v.passes, res.metrics, res.status,
                                   "; ".join(res.notes), config)
    del bench, zm
    gc.collect()
    return rows


@contextlib.contextmanager
def quiet():
    """Keep the table readable: vopt's per-call eager-fallback warnings, HF deprecations and torch's export / dynamo
    chatter (failed exports print whole graphs) are held at ERROR, Python warnings ignored; all restored afterwards."""
    # torch configures many of its loggers individually (torch._logging), so every existing torch.* logger is held.
    names = ["vopt", "transformers"] + [n for n, lg in logging.root.manager.loggerDict.items()
                                        if isinstance(lg, logging.Logger) and (n == "torch" or n.startswith("torch."))]
    levels = {n: logging.getLogger(n).level for n in names}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for n in names:
                logging.getLogger(n).setLevel(logging.ERROR)
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    if args.update_readme is not None:
        if args.from_dir is None:
            print(f"{TOOL}: --update-readme needs --from DIR (a results folder)", file=sys.stderr)
            return 2
        return report.update_readme(args.update_readme, args.from_dir)
    if args.out is None:
        print(f"{TOOL}: --out DIR is required", file=sys.stderr)
        return 2
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())) and not args.force:
        print(f"{TOOL}: {args.out} exists and is not empty; pass --force to overwrite", file=sys.stderr)
        return 2
    why = check_args(args)
    if why:
        print(f"{TOOL}: {why}", file=sys.stderr)
        return 2
    device = pick_device(TOOL, args.device)
    if device is None:
        return 2
    if args.size == "full" and device.type != "cuda":
        print(f"{TOOL}: --size full needs a GPU (it materializes the published dims)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with quiet():
        meta, rows = run(args, device, lambda m, r: report.write_all(args.out, m, r, plots=False))
    written = report.write_all(args.out, meta, rows, plots=not args.no_plots)
    print(report.markdown_table(meta, rows))
    for path in written:
        print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``sageattention2``: attention -> ``vopt::sage_attention`` (SageAttention2 quantized numerics).

What it does. Every ``aten.scaled_dot_product_attention`` node of a captured stage (and every
``vopt.attention`` node, when the ``sdpa`` pass ran first, and every ``vopt.block_sparse_attention``
node, when the ``ccam`` pass ran first: its mask ``dense & expand(block layout)`` becomes a bool
``attn_mask``, whose fully masked tiles the Triton kernel skips) becomes ``vopt::sage_attention`` with
the same arguments plus a *precision preset* (:data:`vopt.ops.sage_attention.PRESETS`):

* ``int4_fp8``: INT4 per-thread QK with Q smoothing, FP8 PV. Cheapest, least accurate.
* ``int8_fp8_block``: INT8 per-block QK, FP8 PV, two-level accumulation. The Triton kernel's
  numerics, so the only preset that runs on the Triton backend today.
* ``int8_fp8``: INT8 per-thread QK, FP8 PV, two-level accumulation. The SageAttention2 default.
* ``int8_fp16``: INT8 per-thread QK, FP16 PV. The sm80 recipe; more accurate.
* ``exact``: the node is left as it is (exact attention).

(spec shared/specs/attention.md §1; cheapest first, :data:`vopt.ops.sage_attention.COST_ORDER`.)

The op keeps SDPA's semantics (top-left ``is_causal``, boolean/additive masks, GQA, ``scale``)
and dispatches at run time: Triton kernel on CUDA when it supports the call, else the
bit-faithful torch reference (slow; it exists so that CPU runs and tests see exactly the numerics
a GPU kernel must reproduce).

Why it is **not a default pass** (``default = False``): unlike ``sdpa`` it changes the numbers.
Quantized attention is an accuracy/speed trade-off the user opts into, e.g.
``vopt.optimize(model, passes=["canonicalize_attention", "sageattention2"])``.

Skipped, with the reason in the report: ``dropout_p != 0`` (training graph), stages not in
``stages``, head_dim > 256 (outside the quantized kernels' range), and sites whose chosen
precision is ``exact``.

Adaptive mode (``adaptive=True``, spec §1.8). For each attention site the pass picks the
*cheapest* preset of ``candidates`` whose output is close enough to exact attention on **real
inputs**:

1. The stage graph is run once on the inputs of the call that triggered its capture
   (``StageGraph.example_inputs``; give ``vopt.optimize`` ``example_inputs``) by a
   ``torch.fx.Interpreter`` that records each attention node's actual ``(q, k, v, mask,
   is_causal, scale, enable_gqa)``. Inputs are cloned and buffers restored afterwards, so the
   model and the caller's tensors are never modified.
2. For each candidate, in order, the site's output is compared with exact float64 attention on
   the same inputs: cos-sim and rel-L1 = Σ|O−O'|/Σ|O| (the SageAttention papers' metrics), RMSE
   and SQNR (dB). The first candidate with ``cos >= min_cos`` and ``rel_l1 <= max_rel_l1`` wins;
   if none passes, the site stays exact (not rewritten; the reason carries the metrics).
3. The choice goes into ``site_precision`` (site -> preset) and, with its metrics, into the
   match description of the report. Sites already in ``site_precision`` (pinned by the user, or
   calibrated on an earlier specialization of the stage) are not recalibrated.

Without example inputs, adaptive mode skips the sites it would have to calibrate, saying why.
Calibration keeps only each site's metrics, not its tensors, so its memory is one forward pass
plus one site's candidate outputs. A dry run (which runs the pass on a copy of the graph) also
calibrates and fills ``site_precision``.

On CUDA, calls the Triton kernel cannot serve (a preset other than ``int8_fp8_block``, any
``attn_mask``, ``is_causal`` with Lq != Lk, head_dim > 128) run the torch reference, which is slow;
the dispatcher logs each such fallback reason once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx

import vopt.ops  # noqa: F401  (registers torch.ops.vopt.attention / sage_attention)
import vopt.ops.block_sparse_attention  # noqa: F401  (registers torch.ops.vopt.block_sparse_attention)
from vopt.config import VoptConfig, config_field, register_config
from vopt.errors import ConfigError
from vopt.ops import sage_attention as sage_op
from vopt.ops.attention import reference_attention
from vopt.pass_protocol import Match, Pass, PassContext, PassKind, PassResult, StageGraph, register_pass

from ._graph import where
from .sdpa import describe, sdpa_arguments

SDPA = torch.ops.aten.scaled_dot_product_attention.default
VOPT_ATTENTION = torch.ops.vopt.attention.default
SAGE_ATTENTION = torch.ops.vopt.sage_attention.default
BLOCK_SPARSE = torch.ops.vopt.block_sparse_attention.default
_BLOCK_SPARSE_ARGS = ("query", "key", "value", "block_mask", "block_q", "block_k", "dense_mask", "scale")
#: Largest head_dim this pass quantizes (the reference handles any; the Triton kernel <= 128, larger falls back).
MAX_HEAD_DIM = 256
_ATTENTION_TARGETS = (SDPA, VOPT_ATTENTION, BLOCK_SPARSE)
_ARG_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


# ---- config --------------------------------------------------------------------


@register_config
@dataclass
class SageAttention2Config(VoptConfig):
    """Config of the ``sageattention2`` pass."""

    precision: str = config_field(
        sage_op.DEFAULT_PRESET,
        help="Preset for every site when adaptive is false (and for sites not in site_precision): "
        "'int8_fp8_block' (default: per-block INT8 QK + FP8 PV, the only preset a fast kernel -- Triton -- runs "
        "today), 'int4_fp8', 'int8_fp8' (per-thread scales), 'int8_fp16' (these three run on the slow torch "
        "reference until the CUDA kernels exist, issue 6) or 'exact' (leave attention exact).",
    )
    adaptive: bool = config_field(
        False,
        help="Calibrate each site on the stage's real inputs and pick the cheapest of `candidates` that meets "
        "min_cos and max_rel_l1 against exact fp64 attention (spec §1.8); none passing keeps the site exact. "
        "Needs example_inputs (vopt.optimize(..., example_inputs=...)).",
    )
    candidates: list[str] = config_field(
        default_factory=lambda: ["int8_fp8_block"],
        help="Adaptive mode: presets tried in this order, cheapest first; the first that passes both thresholds "
        "wins. Default: only the preset a fast kernel runs, so adaptive mode is an accuracy guard (quantize or keep "
        "exact) that never picks a reference-only preset; add e.g. 'int4_fp8' first to let calibration pick INT4.",
    )
    min_cos: float = config_field(
        0.999, help="Adaptive mode: minimum cosine similarity of a site's flattened output with exact attention."
    )
    max_rel_l1: float = config_field(
        0.05,
        help="Adaptive mode: maximum rel-L1 = sum|O-O'| / sum|O| against exact attention. 0.05, not the spec's "
        "unsourced 0.03: rounding P and V to FP8 E4M3 alone gives rel-L1 ~0.035 on diffuse (Gaussian) attention "
        "(measured for int8 QK + fp8 PV: ~0.035), so 0.03 would reject int8_fp8 everywhere.",
    )
    stages: Optional[list[str]] = config_field(
        None, help="Only rewrite attention in these stages (e.g. ['language_model']); None rewrites every stage."
    )
    site_precision: dict = config_field(
        default_factory=dict,
        help="Site ('stage:module/node' as in the report) -> preset. Pins a site's precision; adaptive calibration "
        "fills in the sites it decides.",
    )

    def validate(self) -> None:
        name = type(self).__name__
        accepted = ", ".join(sage_op.PRESETS)
        if self.precision not in sage_op.PRESETS:
            raise ConfigError(f"{name}.precision={self.precision!r} is not a preset; accepted: {accepted}")
        if not self.candidates:
            raise ConfigError(f"{name}.candidates must list at least one preset ({accepted}), cheapest first")
        for i, c in enumerate(self.candidates):
            if c not in sage_op.PRESETS:
                raise ConfigError(f"{name}.candidates[{i}]={c!r} is not a preset; accepted: {accepted}")
        if len(set(self.candidates)) != len(self.candidates):
            raise ConfigError(f"{name}.candidates={self.candidates} lists a preset twice")
        if not (0.0 < self.min_cos <= 1.0):
            raise ConfigError(f"{name}.min_cos must be in (0, 1], got {self.min_cos}")
        if not (self.max_rel_l1 >= 0.0 and math.isfinite(self.max_rel_l1)):
            raise ConfigError(f"{name}.max_rel_l1 must be a finite number >= 0, got {self.max_rel_l1}")
        if not isinstance(self.site_precision, dict):
            raise ConfigError(f"{name}.site_precision must map site names to presets, got {self.site_precision!r}")
        for site, p in self.site_precision.items():
            if not isinstance(site, str) or p not in sage_op.PRESETS:
                raise ConfigError(
                    f"{name}.site_precision[{site!r}]={p!r} is not a preset; accepted: {accepted}"
                )


# ---- reading attention nodes -------------------------------------------------------


def attention_arguments(node: torch.fx.Node) -> dict:
    """All eight SDPA arguments of an SDPA or ``vopt.attention`` node, by name, defaults filled in.

    A ``vopt.block_sparse_attention`` node (the ``ccam`` pass's) gives its q/k/v/scale, ``attn_mask=None`` and its
    own arguments under ``"block_sparse"`` (its mask is built by :func:`_block_sparse_mask`)."""
    if node.target is BLOCK_SPARSE:
        own = {"block_q": None, "block_k": None, "dense_mask": None, "scale": None}
        own.update(dict(zip(_BLOCK_SPARSE_ARGS, node.args)))
        own.update(node.kwargs)
        out = {"query": own["query"], "key": own["key"], "value": own["value"], "attn_mask": None, "dropout_p": 0.0,
               "is_causal": False, "scale": own["scale"], "enable_gqa": False, "block_sparse": own}
        return out
    out = sdpa_arguments(node)
    out.update(dict(zip(_ARG_NAMES, node.args)))  # vopt.attention nodes may carry scale/enable_gqa positionally
    return out


def _block_sparse_mask(gm: torch.fx.GraphModule, node: torch.fx.Node, own: dict) -> "torch.fx.Node | str":
    """The bool mask [.., Nq, Nk] that gives ``vopt::sage_attention`` the block-sparse op's semantics:
    ``dense_mask & expand(block_mask)``, as a graph node; or the reason it cannot be built.

    The block mask must be a constant of the graph (a ``get_attr``, as the ``ccam`` pass emits); its expansion is
    stored as a buffer of the GraphModule. The sage kernel then skips the dead tiles itself (bool mask -> tile table).
    """
    bm = own["block_mask"]
    if not (isinstance(bm, torch.fx.Node) and bm.op == "get_attr"):
        return "the block mask is computed in the graph, not a constant; kept as vopt::block_sparse_attention"
    qv, kv = own["query"].meta.get("val"), own["key"].meta.get("val")
    if not (isinstance(qv, torch.Tensor) and isinstance(kv, torch.Tensor)):
        return "query/key shapes unknown (no meta['val']); kept as vopt::block_sparse_attention"
    nq, nk = int(qv.shape[-2]), int(kv.shape[-2])
    blocks = getattr(gm, bm.target)
    full = blocks.repeat_interleave(own["block_q"], 0)[:nq].repeat_interleave(own["block_k"], 1)[:nk].bool()
    idx = 0
    while hasattr(gm, f"_sage_block_mask_{idx}"):
        idx += 1
    name = f"_sage_block_mask_{idx}"
    gm.register_buffer(name, full.contiguous(), persistent=False)
    g = gm.graph
    with g.inserting_before(node):
        mask = g.get_attr(name)
        if own["dense_mask"] is not None:
            mask = g.call_function(torch.ops.aten.logical_and.default, (own["dense_mask"], mask))
    return mask


def _head_dim(query) -> Optional[int]:
    val = query.meta.get("val") if isinstance(query, torch.fx.Node) else None
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) else None


# ---- calibration (adaptive mode) -----------------------------------------------------


class _AttentionRecorder(torch.fx.Interpreter):
    """Runs a graph; at each attention node calls ``visit(node_name, runtime SDPA arguments)`` and keeps the result.

    Only ``visit``'s result is kept (not the tensors), so memory stays that of one forward pass.
    """

    def __init__(self, gm: torch.fx.GraphModule, visit, names=None):
        super().__init__(gm)
        self.visit = visit
        self.names = names
        self.records: dict = {}

    def run_node(self, n: torch.fx.Node):
        if n.op == "call_function" and n.target in _ATTENTION_TARGETS and (self.names is None or n.name in self.names):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            values = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
            if n.target is BLOCK_SPARSE:  # the same call as SDPA arguments: mask = dense & expand(block)
                own = {"dense_mask": None, "scale": None, **dict(zip(_BLOCK_SPARSE_ARGS, args)), **kwargs}
                nq, nk = own["query"].shape[-2], own["key"].shape[-2]
                mask = own["block_mask"].repeat_interleave(own["block_q"], 0)[:nq]
                mask = mask.repeat_interleave(own["block_k"], 1)[:, :nk].bool()
                if own["dense_mask"] is not None:
                    mask = mask & own["dense_mask"]
                values.update(query=own["query"], key=own["key"], value=own["value"], attn_mask=mask,
                              scale=own["scale"])
            else:
                values.update(dict(zip(_ARG_NAMES, args)))
                values.update(kwargs)
            self.records[n.name] = self.visit(n.name, values)
        return super().run_node(n)


def _flat_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The graph's placeholder values for a call ``gm(*args, **kwargs)``."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        from torch.fx._pytree import tree_flatten_spec

        flat = list(tree_flatten_spec((args, kwargs), info.in_spec))
    else:
        flat = list(args) + list(kwargs.values())
    n = sum(1 for node in gm.graph.nodes if node.op == "placeholder")
    if len(flat) != n:
        raise ValueError(f"the example inputs give {len(flat)} values for {n} graph inputs")
    return flat


def record_attention_inputs(gm: torch.fx.GraphModule, example_inputs: tuple, visit=None, names=None) -> dict:
    """Run ``gm`` once on ``(args, kwargs)``; return node name -> ``visit(name, runtime SDPA arguments)``.

    ``visit`` defaults to keeping the arguments themselves; ``names`` limits the nodes visited.
    The inputs are cloned and the graph's buffers restored afterwards: nothing the caller owns
    is modified (an exported graph may update buffers in place).
    """
    args, kwargs = example_inputs
    flat = [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in _flat_inputs(gm, args, kwargs)]
    saved = {name: b.detach().clone() for name, b in gm.named_buffers()}
    recorder = _AttentionRecorder(gm, visit or (lambda name, values: values), names)
    try:
        with torch.no_grad():
            recorder.run(*flat)
    finally:
        with torch.no_grad():
            for name, b in gm.named_buffers():
                if name in saved and not torch.equal(b, saved[name]):
                    b.copy_(saved[name])
    return recorder.records


def attention_error(exact: torch.Tensor, approx: torch.Tensor) -> dict:
    """cos-sim, rel-L1, RMSE and SQNR (dB) of ``approx`` against ``exact`` (both flattened, float64)."""
    o, a = exact.detach().double().flatten(), approx.detach().double().flatten()
    err = a - o
    tiny = torch.finfo(torch.float64).tiny
    denom = (o.norm() * a.norm()).item()
    cos = (o @ a).item() / denom if denom > tiny else (1.0 if err.abs().max().item() == 0 else 0.0)
    l1 = o.abs().sum().item()
    rel_l1 = err.abs().sum().item() / l1 if l1 > tiny else (0.0 if err.abs().max().item() == 0 else math.inf)
    noise = (err * err).sum().item()
    signal = (o * o).sum().item()
    sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    rmse = math.sqrt(noise / max(o.numel(), 1))
    return {"cos": cos, "rel_l1": rel_l1, "rmse": rmse, "sqnr_db": sqnr}


def _fmt(m: dict) -> str:
    return f"cos={m['cos']:.6f} rel_l1={m['rel_l1']:.4f} rmse={m['rmse']:.3g} sqnr={m['sqnr_db']:.1f}dB"


def calibrate(inputs: dict, candidates, min_cos: float, max_rel_l1: float) -> tuple:
    """``(chosen preset, {preset: metrics})``: the first candidate passing both thresholds, else ``"exact"``.

    ``inputs`` are one site's runtime SDPA arguments. The exact output is ``vopt::attention``'s
    reference on float64 copies (SDPA semantics); candidates run on the original tensors.
    """
    q, k, v, mask = inputs["query"], inputs["key"], inputs["value"], inputs["attn_mask"]
    common = dict(dropout_p=0.0, is_causal=bool(inputs["is_causal"]), scale=inputs["scale"],
                  enable_gqa=bool(inputs["enable_gqa"]))
    mask64 = mask.double() if isinstance(mask, torch.Tensor) and mask.is_floating_point() else mask
    exact = reference_attention(q.double(), k.double(), v.double(), mask64, **common)
    tried: dict = {}
    for name in candidates:
        if name == "exact":
            return "exact", tried
        with torch.no_grad():
            out = sage_op.run(q, k, v, mask, precision=name, **common)
        tried[name] = attention_error(exact, out)
        if tried[name]["cos"] >= min_cos and tried[name]["rel_l1"] <= max_rel_l1:
            return name, tried
    return "exact", tried


def _padding_note(head_dim: Optional[int], choice: str) -> str:
    """The head_dim padding the Triton kernel would do for this site, as a report note ("" if none)."""
    if head_dim is None or choice != sage_op.DEFAULT_PRESET:
        return ""
    try:
        from vopt.kernels.sage_attention import padded_head_dim
    except ImportError:  # triton missing: no Triton kernel, no padding
        return ""
    padded = padded_head_dim(head_dim)
    if padded == head_dim:
        return ""
    return f"; Triton pads head_dim {head_dim} -> {padded}: {1 - head_dim / padded:.0%} of the QK work wasted"


# ---- the pass --------------------------------------------------------------------------


@register_pass
class SageAttention2Pass(Pass):
    name = "sageattention2"
    summary = "SDPA / vopt::attention -> vopt::sage_attention (INT8/INT4 QK, FP8/FP16 PV; adaptive per site)"
    config_cls = SageAttention2Config
    kind = PassKind.GRAPH
    provides = frozenset({"attention:sage"})
    after = ("canonicalize_attention", "sdpa", "ccam")
    default = False  # changes numerics: opt-in (module docstring)

    def run_graph(self, graph: StageGraph, ctx: PassContext) -> PassResult:
        cfg = self.config
        result = PassResult(self.name, graph.stage)
        g = graph.gm.graph

        # 1. Plan: per attention node, a skip reason, a known preset, or "calibrate".
        plan = []  # (node, args, site, what, reason, choice, note)
        for node in list(g.nodes):
            if node.op != "call_function" or node.target not in _ATTENTION_TARGETS:
                continue
            args = attention_arguments(node)
            site = where(graph.stage, node)
            if node.target is BLOCK_SPARSE:
                what = f"vopt.block_sparse_attention(block {args['block_sparse']['block_q']}x{args['block_sparse']['block_k']})"
            else:
                what = describe(node)
            if node.target is VOPT_ATTENTION:
                what = "vopt.attention" + what[len("sdpa"):]
            head_dim = _head_dim(args["query"])
            reason = choice = None
            note = ""
            if cfg.stages is not None and graph.stage not in cfg.stages:
                reason = f"stage {graph.stage!r} not in SageAttention2Config.stages={cfg.stages}"
            elif args["dropout_p"] != 0.0:
                reason = f"dropout_p={args['dropout_p']} (training graph; vopt::sage_attention is inference-only)"
            elif head_dim is not None and head_dim > MAX_HEAD_DIM:
                reason = f"head_dim {head_dim} > {MAX_HEAD_DIM} (outside the quantized kernels' range; kept exact)"
            elif site in cfg.site_precision:
                choice, note = cfg.site_precision[site], "site_precision"
            elif not cfg.adaptive:
                choice, note = cfg.precision, "precision"
            plan.append([node, args, site, what, reason, choice, note])

        # 2. Adaptive mode: one run of the stage on its real inputs calibrates every undecided site.
        todo = {entry[0].name for entry in plan if entry[4] is None and entry[5] is None}
        if todo:
            calibrated, failure = {}, None
            if graph.example_inputs is None:
                failure = (
                    "adaptive mode needs the stage's real inputs, and this capture has none "
                    "(StageGraph.example_inputs is None); pass example_inputs to vopt.optimize, "
                    "or pin the site in site_precision"
                )
            else:
                def visit(name, values):
                    return calibrate(values, cfg.candidates, cfg.min_cos, cfg.max_rel_l1)

                try:
                    calibrated = record_attention_inputs(graph.gm, graph.example_inputs, visit, todo)
                except Exception as exc:  # the calibration run can fail in many ways; report it
                    failure = f"calibration run failed: {type(exc).__name__}: {str(exc)[:200]}"
            for entry in plan:
                node, site = entry[0], entry[2]
                if node.name not in todo:
                    continue
                if failure is not None:
                    entry[4] = failure
                elif node.name not in calibrated:
                    entry[4] = "calibration run did not reach this node"
                else:
                    choice, tried = calibrated[node.name]
                    cfg.site_precision[site] = choice
                    note = "calibrated"
                    if choice in tried:
                        note += f": {_fmt(tried[choice])}"
                    rejected = [f"{p}: {_fmt(m)}" for p, m in tried.items() if p != choice]
                    if rejected:
                        note += f"; rejected {'; '.join(rejected)}"
                    entry[5] = choice
                    entry[6] = note + f" (thresholds cos>={cfg.min_cos}, rel_l1<={cfg.max_rel_l1})"

        # 3. Rewrite.
        for node, args, site, what, reason, choice, note in plan:
            if reason is None and choice == "exact":
                reason = f"precision 'exact' for this site ({note})"
            if reason is not None:
                result.matches.append(Match(site, what, rewritten=False, reason=reason))
                continue
            kwargs = {name: args[name] for name in _ARG_NAMES[3:]}
            if "block_sparse" in args:  # quantized + masked: the sage kernel skips the dead tiles itself
                mask = _block_sparse_mask(graph.gm, node, args["block_sparse"])
                if isinstance(mask, str):
                    result.matches.append(Match(site, what, rewritten=False, reason=mask))
                    continue
                kwargs["attn_mask"] = mask
                note += "; block-sparse mask as a bool attn_mask (dead tiles skipped by the kernel)"
            note += _padding_note(_head_dim(args["query"]), choice)
            result.matches.append(Match(site, f"{what} -> sage[{choice}] ({note})", rewritten=True))
            kwargs["precision"] = choice
            with g.inserting_after(node):
                new = g.call_function(SAGE_ATTENTION, args=(args["query"], args["key"], args["value"]), kwargs=kwargs)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            g.erase_node(node)
        return result

"""``moe_dispatch``: mixture-of-experts blocks run as sorted-by-expert dispatch with grouped GEMMs.

What it does. A **runtime** pass on vopt's working copy (``vopt.optimize`` never touches the caller's model): it
finds mixture-of-experts blocks in the eager module tree and replaces their dense or per-expert-loop dispatch by

    gate -> top-k -> route (sort the N*k (token, expert) assignments by expert, stable) -> gather the routed rows
    -> one ``vopt::grouped_gemm`` per expert layer over all experts -> scatter-combine with the gate weights (fp32)

(:mod:`vopt.moe`). No per-expert Python loop, and the unselected experts compute nothing (``N * k`` expert rows
instead of ``N * E`` for a dense dispatch). All shapes depend only on the input shapes (the per-expert split lives
inside the opaque op), so the rewritten stage still exports as one graph. Two adapters:

* the zoo's **MoE-VRD** (``vopt.zoo.moe_vrd.MoEVRD``): ``experts`` (a ModuleList of ``RelationExpert``) becomes a
  :class:`vopt.moe.vrd.GroupedRelationExperts` (weights stacked once, ``[E, in, out]``; the three einsum
  "preference" biases become grouped GEMMs of row-wise outer products) and the instance's ``forward`` becomes
  :func:`vopt.moe.vrd.sparse_forward` (an instance attribute; the class is untouched). Same gate, same ``topk``
  call, so ties resolve identically; the output keeps the ``[N, E]`` gate matrix;
* the **common block** (``generic=True``): a module with a linear ``gate``/``router``, ``experts: nn.ModuleList``
  of identical Linear-act-Linear or gated (SwiGLU: ``w1/w3/w2``, ``gate_proj/up_proj/down_proj``) MLPs and a
  ``top_k`` (:func:`vopt.moe.grouped_mlp.describe`); it is replaced in its parent by a
  :class:`vopt.moe.grouped_mlp.SparseMoE`. Its routing convention (softmax over the top-k logits, or softmax over
  all then top-k, renormalized or not) is chosen by running the block on a seeded probe input.

Verification (``verify=True``, default). Before a block is kept rewritten, the original and the rewrite run on a
seeded probe input (``probe_tokens`` rows) and must agree within ``1e-5 * (1 + max|out|)`` in fp32 (fp32
summation order only; ``2e-2`` relative in fp16/bf16); otherwise the block is restored and reported as skipped
with the difference. Meta-device models (full-size zoo builds) cannot run a probe: MoE-VRD is rewritten
structurally (its semantics are known), generic blocks are skipped.

Capacity. ``capacity_factor=None`` (default) keeps every assignment (exact). A factor ``c`` caps each expert at
``ceil(c * N * k / E)`` rows (first choices first, then by token); dropped assignments contribute nothing (a token
that lost every choice gets zeros), which **changes the outputs**; the number dropped by the last eager call is on
the rewritten module (``SparseMoE.dropped``, ``MoEVRD.vopt_moe_dropped``). A capped rewrite is not verified.

Inference only: the rewritten blocks raise in training mode (``vopt::grouped_gemm`` has no autograd; MoE-VRD's
load-balancing loss is a training quantity). Blocks found in training mode are skipped with that reason.

Why **not a default pass** (opt-in, ``passes=["moe_dispatch"]``): it is exact but changes which modules and
parameters the working copy holds (stacked weights), and on CPU the reference backend runs the grouped GEMM as one
matmul per non-empty expert inside the op; the single-launch kernels need a GPU (Triton, CUTLASS).

``moe_detect`` (graph pass, opt-in) finds the dense MoE pattern in captured graphs (a ``topk`` over gate logits
whose indices ``scatter`` into an ``[N, E]`` gate matrix that weights ``E`` stacked per-expert outputs) and
reports each as skipped: a dense dispatch in a graph is not rewritten there (the experts are unrolled, isomorphic
subgraphs; rewriting them into grouped GEMMs is the eager rewrite above, which runs before capture). After
``moe_dispatch`` the pattern is gone (the gate matrix only feeds the output), so nothing is reported.
"""
from __future__ import annotations

import operator
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

import vopt.ops.grouped_gemm  # noqa: F401  (registers torch.ops.vopt.grouped_gemm)
from vopt.config import VoptConfig, config_field, register_config
from vopt.errors import ConfigError
from vopt.moe.grouped_mlp import SparseMoE, describe, match_scoring, probe_input
from vopt.moe.vrd import GroupedRelationExperts, is_moe_vrd, routed_flops, sparse_forward
from vopt.pass_protocol import Match, Pass, PassContext, PassKind, PassResult, StageGraph, register_pass

from ._graph import where

#: Instance attributes set on a rewritten MoEVRD.
CAPACITY_ATTR = "vopt_moe_capacity_factor"
DROPPED_ATTR = "vopt_moe_dropped"


@register_config
@dataclass
class MoEDispatchConfig(VoptConfig):
    """Config of the ``moe_dispatch`` pass."""

    capacity_factor: Optional[float] = config_field(
        None, help="Per-expert capacity factor c (capacity ceil(c * N * k / E) rows); None = no limit (exact). "
        "Assignments over capacity are dropped (changes outputs).")
    verify: bool = config_field(
        True, help="Run each rewritten block and the original on a seeded probe input and keep the rewrite only if "
        "they agree within 1e-5 * (1 + max|out|) (fp32); also picks a generic block's routing convention.")
    probe_tokens: int = config_field(64, help="Rows (tokens / tracklet pairs) of the verification probe.")
    generic: bool = config_field(
        True, help="Also rewrite the common block (linear gate + `experts` ModuleList of MLPs + top_k), not only "
        "the zoo's MoE-VRD.")

    def validate(self) -> None:
        name = type(self).__name__
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"{name}.capacity_factor must be a number > 0 or None (no limit), got "
                              f"{self.capacity_factor!r}")
        if self.probe_tokens < 1:
            raise ConfigError(f"{name}.probe_tokens must be an integer >= 1, got {self.probe_tokens!r}")


def _is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def _max_rel_diff(want, got) -> tuple:
    """``(max |want - got|, max |want|)`` over the float tensors of two outputs (tuples compared leaf by leaf)."""
    a = [want] if isinstance(want, torch.Tensor) else [t for t in want if isinstance(t, torch.Tensor)]
    b = [got] if isinstance(got, torch.Tensor) else [t for t in got if isinstance(t, torch.Tensor)]
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf"), 0.0
    diff = max(((x.float() - y.float()).abs().max().item() for x, y in zip(a, b) if x.numel()), default=0.0)
    scale = max((x.float().abs().max().item() for x in a if x.numel()), default=0.0)
    return diff, scale


def _vrd_probe(model: nn.Module, rows: int) -> dict:
    p = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    x = lambda d: torch.randn(rows, d, generator=g).to(device=p.device, dtype=p.dtype)
    return {"sf": x(model.feature_dim), "of": x(model.feature_dim), "ppf": x(model.geometry_dim),
            "pvf": x(model.pair_visual_dim)}


def _delegate_forward(self, *args, **kwargs):
    return self.vopt_sparse_moe(*args, **kwargs)


@register_pass
class MoEDispatchPass(Pass):
    name = "moe_dispatch"
    config_cls = MoEDispatchConfig
    kind = PassKind.RUNTIME
    provides = frozenset({"moe_sparse_dispatch"})
    default = False
    summary = "MoE blocks (MoE-VRD, ModuleList-of-MLP experts) -> sorted-by-expert dispatch with vopt::grouped_gemm"

    def run_runtime(self, model: Any, ctx: PassContext) -> PassResult:
        result = PassResult(self.name, "model")
        if not isinstance(model, nn.Module):
            return result
        claimed: list = []
        sites: list = []
        for path, mod in model.named_modules():
            if any(c == "" or path.startswith(c + ".") for c in claimed):
                continue  # inside a block already claimed
            if is_moe_vrd(mod):
                sites.append((path, mod, None))
                claimed.append(path)
            elif self.config.generic:
                layout, _why = describe(mod)
                if layout is not None:
                    sites.append((path, mod, layout))
                    claimed.append(path)
        for path, mod, layout in sites:
            label = path or "model"
            if mod.training:
                result.matches.append(Match(label, type(mod).__name__, False,
                                            "module is in training mode; the sparse rewrite is inference-only"))
                continue
            if layout is None:
                result.matches.append(self._rewrite_vrd(label, mod))
            else:
                result.matches.append(self._rewrite_generic(model, path, label, mod, layout))
        return result

    # ---- MoE-VRD ------------------------------------------------------------------------------------------------

    def _rewrite_vrd(self, label: str, mod: nn.Module) -> Match:
        dense, routed = routed_flops(mod, 1)
        what = (f"MoEVRD: {mod.num_experts} relation experts, top-{mod.top_k} ({mod.combine}) -> grouped GEMM "
                f"dispatch; expert FLOPs per pair {dense:.3g} dense -> {routed:.3g} routed")
        verify = self.config.verify and not _is_meta(mod) and self.config.capacity_factor is None
        probe = _vrd_probe(mod, self.config.probe_tokens) if verify else None
        if verify:
            with torch.no_grad():
                want = mod(**probe)
        original = mod.experts
        mod.experts = GroupedRelationExperts(original)
        setattr(mod, CAPACITY_ATTR, self.config.capacity_factor)
        setattr(mod, DROPPED_ATTR, -1)
        mod.forward = types.MethodType(sparse_forward, mod)  # instance attribute: the class is untouched
        if verify:
            with torch.no_grad():
                got = mod(**probe)
            diff, scale = _max_rel_diff(tuple(want)[:4], tuple(got)[:4])
            tol = 1e-5 if want.subject.dtype == torch.float32 else 2e-2   # fp32 summation order / one 16-bit ulp
            if not diff <= tol * (1 + scale):
                mod.experts = original
                del mod.forward
                delattr(mod, CAPACITY_ATTR)
                delattr(mod, DROPPED_ATTR)
                return Match(label, what, False, f"verification failed: max |diff| {diff:.3g} vs max |out| {scale:.3g}")
        return Match(label, what, True, flops_saved=float(dense - routed))

    # ---- the common block ---------------------------------------------------------------------------------------

    def _rewrite_generic(self, root: nn.Module, path: str, label: str, mod: nn.Module, layout) -> Match:
        e = len(layout.second)
        kind = "gated (GLU) MLP" if layout.glu else "MLP"
        what = f"{type(mod).__name__}: {e} {kind} experts, top-{layout.top_k} -> grouped GEMM dispatch"
        if _is_meta(mod):
            return Match(label, what, False, "meta-device parameters: the routing convention cannot be verified")
        if self.config.verify:
            probe = probe_input(mod, layout, self.config.probe_tokens)
            sparse, why = match_scoring(mod, layout, probe, self.config.capacity_factor)
            if sparse is None:
                return Match(label, what, False, why)
        else:
            sparse = SparseMoE(mod, layout, capacity_factor=self.config.capacity_factor).eval()
        what += f" (scoring {sparse.scoring})"
        if path:
            parent_path, _, name = path.rpartition(".")
            setattr(root.get_submodule(parent_path), name, sparse)
        else:  # the block is the root: delegate its forward (an instance attribute; the class is untouched)
            mod.vopt_sparse_moe = sparse
            mod.forward = types.MethodType(_delegate_forward, mod)
        return Match(label, what, True)


# ---- graph side: detect dense MoE dispatch in captured graphs -----------------------------------------------------

_TOPK = torch.ops.aten.topk.default
_SCATTERS = {torch.ops.aten.scatter.src, torch.ops.aten.scatter.value, torch.ops.aten.scatter_add.default}
_PASSTHROUGH = {torch.ops.aten.slice.Tensor, torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default,
                torch.ops.aten.clone.default, torch.ops.aten.contiguous.default}
_STACKS = {torch.ops.aten.stack.default, torch.ops.aten.cat.default}


def _forward(node: torch.fx.Node, depth: int = 4) -> list:
    """``node``'s users, looking through getitem / slice / dtype casts (up to ``depth`` hops)."""
    out = []
    for u in node.users:
        if u.op == "call_function" and (u.target is operator.getitem or u.target in _PASSTHROUGH) and depth > 0:
            out.extend(_forward(u, depth - 1))
        else:
            out.append(u)
    return out


def _flat_args(node: torch.fx.Node) -> list:
    """``node``'s positional arguments with lists flattened one level (``einsum(eq, [a, b])``)."""
    out = []
    for a in node.args:
        out.extend(a if isinstance(a, (list, tuple)) else [a])
    return out


def _is_expert_stack(a, num_experts: Optional[int]) -> bool:
    """Whether ``a`` stacks ``num_experts`` tensors (one output per expert)."""
    return (isinstance(a, torch.fx.Node) and a.op == "call_function" and a.target in _STACKS
            and isinstance(a.args[0], (list, tuple)) and len(a.args[0]) == num_experts)


def dense_moe_sites(gm: torch.fx.GraphModule) -> list:
    """``[(topk node, scatter node, [combine nodes], E)]``: gate matrices from ``topk`` that weight stacked experts."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not _TOPK:
            continue
        idx_users = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem
                     and u.args[1] == 1]
        scatters = [s for u in idx_users for s in _forward(u) if s.op == "call_function" and s.target in _SCATTERS]
        val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        num_experts = int(val.shape[-1]) if isinstance(val, torch.Tensor) else None
        for sc in scatters:
            combines = [u for u in _forward(sc) if u.op == "call_function" and any(
                _is_expert_stack(a, num_experts) for a in _flat_args(u))]
            if combines:
                sites.append((node, sc, combines, num_experts))
    return sites


@register_pass
class MoEDetectPass(Pass):
    name = "moe_detect"
    config_cls = VoptConfig
    kind = PassKind.GRAPH
    after = ("moe_dispatch",)
    default = False
    summary = "report dense MoE dispatch (topk gate matrix weighting E stacked experts) left in captured graphs"

    def run_graph(self, graph: StageGraph, ctx: PassContext) -> PassResult:
        result = PassResult(self.name, graph.stage)
        for topk, _scatter, combines, e in dense_moe_sites(graph.gm):
            k = topk.args[1] if len(topk.args) > 1 else "?"
            what = (f"dense MoE dispatch: topk({k}) over {e} expert logits, gate matrix weights {len(combines)} "
                    "stacked output(s)")
            result.matches.append(Match(
                where(graph.stage, topk), what, False,
                "every expert runs on every row in this graph; sparse dispatch is an eager rewrite: add the runtime "
                "pass 'moe_dispatch' (MoE-VRD and ModuleList-of-MLP experts are rewritten before capture)"))
        return result

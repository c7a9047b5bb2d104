"""``sdpa``: ``aten.scaled_dot_product_attention`` -> ``vopt::attention``.

Every SDPA node of a captured stage is replaced by vopt's attention op with
the same arguments. The op dispatches at run time (CUDA -> Triton ->
reference), so this pass is exact on the reference backend and is where the
faster attention backends plug in. Nodes with ``dropout_p != 0`` (training)
are skipped with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import vopt.ops  # noqa: F401  (registers torch.ops.vopt.attention)
from vopt.config import VoptConfig, config_field, register_config
from vopt.pass_protocol import Match, Pass, PassContext, PassKind, PassResult, StageGraph, register_pass

from ._graph import shape_of, where

SDPA = torch.ops.aten.scaled_dot_product_attention.default


@register_config
@dataclass
class SdpaConfig(VoptConfig):
    """Config of the ``sdpa`` pass."""

    stages: Optional[list[str]] = config_field(
        None, help="Only rewrite attention in these stages (e.g. ['language_model']); None rewrites every stage."
    )


def sdpa_arguments(node: torch.fx.Node) -> dict:
    """The SDPA node's arguments by name, defaults filled in."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    out = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    out.update(dict(zip(names, node.args)))
    out.update(node.kwargs)
    return out


def describe(node: torch.fx.Node) -> str:
    a = sdpa_arguments(node)
    bits = [f"q{shape_of(a['query'])}", f"k{shape_of(a['key'])}"]
    if a["is_causal"]:
        bits.append("causal")
    if a["attn_mask"] is not None:
        bits.append(f"mask{shape_of(a['attn_mask'])}")
    if a["enable_gqa"]:
        bits.append("gqa")
    return "sdpa " + " ".join(bits)


@register_pass
class SdpaPass(Pass):
    name = "sdpa"
    summary = "SDPA nodes -> vopt::attention (dispatched CUDA -> Triton -> exact reference)"
    config_cls = SdpaConfig
    kind = PassKind.GRAPH
    provides = frozenset({"attention:vopt_op"})
    after = ("canonicalize_attention",)

    def run_graph(self, graph: StageGraph, ctx: PassContext) -> PassResult:
        result = PassResult(self.name, graph.stage)
        g = graph.gm.graph
        for node in list(g.nodes):
            if node.op != "call_function" or node.target is not SDPA:
                continue
            args = sdpa_arguments(node)
            reason = None
            if self.config.stages is not None and graph.stage not in self.config.stages:
                reason = f"stage {graph.stage!r} not in SdpaConfig.stages={self.config.stages}"
            elif args["dropout_p"] != 0.0:
                reason = f"dropout_p={args['dropout_p']} (training graph; vopt::attention is inference-only)"
            result.matches.append(Match(where(graph.stage, node), describe(node), rewritten=reason is None, reason=reason))
            if reason is not None:
                continue
            with g.inserting_after(node):
                new = g.call_function(torch.ops.vopt.attention.default, args=node.args, kwargs=dict(node.kwargs))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            g.erase_node(node)
        return result

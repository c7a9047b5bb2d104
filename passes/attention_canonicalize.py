"""``canonicalize_attention``: eager attention spellings -> one SDPA node.

Eager attention (``nn.MultiheadAttention`` with ``need_weights``, HF
``attn_implementation="eager"``, hand-written blocks) exports as

    scores = matmul|bmm(q [* c], transpose(k, -2, -1)) [* c | / c] [+ mask]
             (or baddbmm(mask, q, transpose(k, -2, -1), alpha=c))
    probs  = softmax(scores, -1) [.to(dtype)] [dropout(p, train=False)]
    out    = matmul|bmm(probs, v)

This pass replaces each such chain by ``aten.scaled_dot_product_attention``
with the explicit scale (1.0 when none was applied) and the additive mask, so
the ``sdpa`` pass (and any later attention pass) sees one pattern. A chain whose
probabilities or scores are used elsewhere (attention weights returned), that
applies dropout in training mode, or whose mask dtype SDPA cannot take is
reported as skipped with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vopt.config import VoptConfig, register_config
from vopt.pass_protocol import Match, Pass, PassContext, PassKind, PassResult, StageGraph, register_pass

from ._graph import shape_of, where

aten = torch.ops.aten
MATMULS = {aten.bmm.default, aten.matmul.default}
SOFTMAXES = {aten.softmax.int, aten._softmax.default}
PASS_THROUGH = {aten.dropout.default, aten.to.dtype, aten.clone.default, aten.contiguous.default}
ASSERT_META = aten._assert_tensor_metadata.default
SDPA = aten.scaled_dot_product_attention.default


@register_config
@dataclass
class CanonicalizeAttentionConfig(VoptConfig):
    """Config of the ``canonicalize_attention`` pass (no options yet)."""


def _is(node, targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _live_nodes(graph: torch.fx.Graph) -> set:
    """Nodes whose value reaches the output or a side effect.

    A dead user (e.g. nn.MultiheadAttention's averaged weights nobody reads)
    must not make the probabilities look observed.
    """
    live = set()
    for node in reversed(graph.nodes):
        if node.op == "output" or node.is_impure() or any(u in live for u in node.users):
            live.add(node)
    return live


def _users(node: torch.fx.Node, live: set) -> list:
    """Live users that consume the value (metadata assertions excluded)."""
    return [u for u in node.users if u in live and u.target is not ASSERT_META]


def _scalar_factor(node: torch.fx.Node) -> Optional[float]:
    """``c`` when ``node`` is ``x * c`` or ``x / c`` with a Python number ``c``, else None."""
    if _is(node, {aten.mul.Tensor, aten.mul.Scalar}) and isinstance(node.args[1], (int, float)):
        return float(node.args[1])
    if _is(node, {aten.div.Tensor, aten.div.Scalar}) and isinstance(node.args[1], (int, float)) and node.args[1] != 0:
        return 1.0 / float(node.args[1])
    return None


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


@dataclass
class _Chain:
    out: torch.fx.Node
    query: torch.fx.Node
    key: torch.fx.Node
    value: torch.fx.Node
    mask: Optional[torch.fx.Node]
    scale: float
    nodes: list


def _match(out: torch.fx.Node, live: set) -> "tuple[Optional[_Chain], Optional[str]]":
    """Match the chain ending at ``out``; return (chain, None), (None, skip reason) or (None, None) for no match."""
    probs, value = out.args[0], out.args[1]
    nodes = [out]
    x = probs
    while _is(x, PASS_THROUGH):
        if x.target is aten.dropout.default and len(x.args) > 2 and x.args[2] and x.args[1] > 0:
            return None, f"dropout p={x.args[1]} in training mode"
        nodes.append(x)
        x = x.args[0]
    if not _is(x, SOFTMAXES):
        return None, None
    softmax = x
    scores_val = _val(softmax.args[0])
    dim = softmax.args[1]
    if scores_val is None or dim not in (-1, scores_val.dim() - 1):
        return None, None
    nodes.append(softmax)
    s = softmax.args[0]
    mask, scale = None, None
    if _is(s, {aten.add.Tensor}) and all(isinstance(a, torch.fx.Node) for a in s.args[:2]):
        a, b = s.args[:2]
        # The scores branch is the one that reaches a matmul through an optional scale.
        def reaches_matmul(n):
            return _is(n, MATMULS) or (_scalar_factor(n) is not None and _is(n.args[0], MATMULS))
        if reaches_matmul(a):
            mask = b
        elif reaches_matmul(b):
            mask = a
        else:
            return None, None
        nodes.append(s)
        s = a if mask is b else b
    factor = _scalar_factor(s)
    if factor is not None:
        scale = factor
        nodes.append(s)
        s = s.args[0]
    if _is(s, {aten.baddbmm.default}) and mask is None:
        # nn.MultiheadAttention with a mask: baddbmm(mask, q, k^T, beta=1, alpha=a).
        if s.kwargs.get("beta", 1) != 1:
            return None, None
        alpha = float(s.kwargs.get("alpha", 1))
        scale = alpha if scale is None else scale * alpha
        mask, q, kt = s.args[0], s.args[1], s.args[2]
    elif _is(s, MATMULS):
        q, kt = s.args[0], s.args[1]
    else:
        return None, None
    nodes.append(s)
    if not (_is(kt, {aten.transpose.int}) and _val(kt) is not None):
        return None, "key is not transposed by transpose(-2, -1)"
    nd = _val(kt).dim()
    if {d % nd for d in kt.args[1:3]} != {nd - 2, nd - 1}:
        return None, f"key transposed on dims {kt.args[1:3]}, not the last two"
    key = kt.args[0]
    qfactor = _scalar_factor(q)
    if qfactor is not None and len(_users(q, live)) == 1:
        scale = qfactor if scale is None else scale * qfactor
        nodes.append(q)
        q = q.args[0]
    # Every intermediate must feed only the next step: otherwise the scores or
    # probabilities are observed (attention weights returned) and must stay.
    for n in nodes[1:]:
        if len(_users(n, live)) != 1:
            return None, f"{n.name} has other users (attention weights are used elsewhere)"
    if mask is not None:
        mv, qv = _val(mask), _val(q)
        if mv is not None and qv is not None and mv.dtype not in (torch.bool, qv.dtype):
            return None, f"mask dtype {mv.dtype} differs from query dtype {qv.dtype} (SDPA needs bool or the query dtype)"
    return _Chain(out, q, key, value, mask, 1.0 if scale is None else scale, nodes), None


def _erase_dead(g: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Erase a dead node and its (dead) users first."""
    for u in list(node.users):
        _erase_dead(g, u)
    g.erase_node(node)


@register_pass
class CanonicalizeAttentionPass(Pass):
    name = "canonicalize_attention"
    summary = "eager matmul -> softmax -> matmul attention -> SDPA (so attention passes see one pattern)"
    config_cls = CanonicalizeAttentionConfig
    kind = PassKind.GRAPH
    provides = frozenset({"attention:canonical"})
    before = ("sdpa",)

    def run_graph(self, graph: StageGraph, ctx: PassContext) -> PassResult:
        result = PassResult(self.name, graph.stage)
        g = graph.gm.graph
        live = _live_nodes(g)
        for node in list(g.nodes):
            if not _is(node, MATMULS) or node.graph is not g:
                continue
            chain, reason = _match(node, live)
            if chain is None and reason is None:
                continue
            what = f"matmul-softmax-matmul {shape_of(node)}"
            result.matches.append(Match(where(graph.stage, node), what, rewritten=chain is not None, reason=reason))
            if chain is None:
                continue
            kwargs = {"attn_mask": chain.mask, "scale": chain.scale}
            with g.inserting_before(chain.out):
                sdpa = g.call_function(SDPA, (chain.query, chain.key, chain.value), kwargs)
            sdpa.meta = dict(chain.out.meta)
            chain.out.replace_all_uses_with(sdpa)
            for n in chain.nodes:  # out first, then backwards: each is unused once its user is gone
                for u in [u for u in n.users if u.target is ASSERT_META or u not in live]:
                    _erase_dead(g, u)
                g.erase_node(n)
        return result

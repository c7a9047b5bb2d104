"""MoE-VRD's relation experts as grouped GEMMs over sorted-by-expert rows (:mod:`vopt.zoo.moe_vrd`).

:class:`GroupedRelationExperts` holds the ``E`` experts' weights stacked once (``[E, in, out]`` copies; the experts
are not modified) and runs one :class:`~vopt.zoo.moe_vrd.RelationExpert` body for all experts at once on the routed
rows (rows of expert ``e`` contiguous, ``offsets`` as in ``vopt::grouped_gemm``):

* object head on subject and object features in one grouped GEMM per layer: the rows are interleaved
  ``[sf_0, of_0, sf_1, of_1, ...]`` so expert ``e`` owns rows ``2 offsets[e] : 2 offsets[e+1]``;
* predicate head: three grouped GEMMs (``pvf -> hidden``, ``[hidden, ppf] -> hidden``, ``hidden -> C_p``);
* each refinement step's three "preference" biases, e.g. ``einsum("bp,bo,pos->bs", p, o, po2s_e)``, as a grouped
  GEMM of the row-wise outer product ``(p x o) [rows, P*O]`` with ``po2s_e`` flattened to ``[P*O, S]``.

:func:`sparse_forward` is ``MoEVRD.forward`` with sparse dispatch: the model's own gate (``gate_logits`` and the
same ``topk``), :func:`vopt.moe.routing.route` of the ``N * k`` (pair, expert) assignments, gather, the grouped
expert body, :func:`vopt.moe.routing.combine` with the gate weights (``combine="weighted"``) or ones for the
selected experts (``"unweighted"``). Only the selected experts run (``N * k`` expert rows instead of the dense
``N * E``). Dropout is inactive (inference only: in training mode it raises).
"""
from __future__ import annotations


import torch
from torch import nn

from ..ops.grouped_gemm import grouped_gemm
from .routing import capacity_for, combine, route


def _stack(linears: list) -> nn.Parameter:
    return nn.Parameter(torch.stack([lin.weight.detach().t() for lin in linears]).contiguous(), requires_grad=False)


def _stack_bias(linears: list) -> nn.Parameter:
    return nn.Parameter(torch.stack([lin.bias.detach() for lin in linears]).contiguous(), requires_grad=False)


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise outer product ``[rows, A] x [rows, B] -> [rows, A * B]`` (index ``i * B + j``)."""
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], a.shape[1] * b.shape[1])


class GroupedRelationExperts(nn.Module):
    """``E`` :class:`RelationExpert` s stacked; ``forward(sf, of, ppf, pvf, offsets)`` on rows sorted by expert."""

    def __init__(self, experts: nn.ModuleList):
        super().__init__()
        first = experts[0]
        self.num_experts = len(experts)
        self.steps = first.steps
        obj = [(x.object_predictor[0], x.object_predictor[3]) for x in experts]
        self.obj_w1, self.obj_b1 = _stack([a for a, _ in obj]), _stack_bias([a for a, _ in obj])
        self.obj_w2 = _stack([b for _, b in obj])
        vis = [x.predicate_vis_feat_emb[0] for x in experts]
        self.vis_w, self.vis_b = _stack(vis), _stack_bias(vis)
        feat = [x.predicate_feat_emb[0] for x in experts]
        self.feat_w, self.feat_b = _stack(feat), _stack_bias(feat)
        self.pred_w = _stack([x.predicate_predictor for x in experts])
        p, o = first.po2s.shape[0], first.po2s.shape[1]
        self.num_objects, self.num_predicates = o, p
        # po2s[p, o, s] -> [P*O, S]; sp2o[s, p, o] -> [S*P, O]; so2p[s, o, p] -> [S*O, P] (row index = outer index).
        flat = lambda name, rows: nn.Parameter(torch.stack(
            [getattr(x, name).detach().reshape(rows, -1) for x in experts]).contiguous(), requires_grad=False)
        self.po2s, self.sp2o, self.so2p = flat("po2s", p * o), flat("sp2o", o * p), flat("so2p", o * o)

    def forward(self, sf: torch.Tensor, of: torch.Tensor, ppf: torch.Tensor, pvf: torch.Tensor,
                offsets: torch.Tensor) -> tuple:
        """``(s_prob, o_prob, p_prob)`` of each routed row (rows of expert ``e`` at ``offsets[e]:offsets[e+1]``)."""
        rows = sf.shape[0]
        both = torch.stack((sf, of), dim=1).reshape(2 * rows, sf.shape[1])   # expert e: rows 2*offsets[e]...
        off2 = offsets * 2
        h = torch.relu(grouped_gemm(both, self.obj_w1, off2, self.obj_b1))
        scores = grouped_gemm(h, self.obj_w2, off2).reshape(rows, 2, -1)
        s_score, o_score = scores[:, 0], scores[:, 1]
        v = torch.relu(grouped_gemm(pvf, self.vis_w, offsets, self.vis_b))
        f = torch.relu(grouped_gemm(torch.cat((v, ppf), 1), self.feat_w, offsets, self.feat_b))
        p_score = grouped_gemm(f, self.pred_w, offsets)
        s_prob, o_prob, p_prob = torch.zeros_like(s_score), torch.zeros_like(o_score), torch.zeros_like(p_score)
        for _ in range(self.steps):
            po_bias = grouped_gemm(_outer(p_prob, o_prob), self.po2s, offsets)
            sp_bias = grouped_gemm(_outer(s_prob, p_prob), self.sp2o, offsets)
            s_prob = torch.softmax(s_score + po_bias, dim=1)
            o_prob = torch.softmax(o_score + sp_bias, dim=1)
            so_bias = grouped_gemm(_outer(s_prob, o_prob), self.so2p, offsets)
            p_prob = torch.sigmoid(p_score + so_bias)
        return s_prob, o_prob, p_prob


def is_moe_vrd(module: nn.Module) -> bool:
    """Whether ``module`` is the zoo's ``MoEVRD`` (by class name and the attributes the rewrite reads)."""
    return (type(module).__name__ == "MoEVRD" and isinstance(getattr(module, "experts", None), nn.ModuleList)
            and all(type(x).__name__ == "RelationExpert" for x in module.experts)
            and all(hasattr(module, a) for a in ("gate_logits", "top_k", "num_experts", "combine")))


def sparse_forward(self, sf: torch.Tensor, of: torch.Tensor, ppf: torch.Tensor, pvf: torch.Tensor):
    """``MoEVRD.forward`` with sorted-by-expert dispatch (bound to the instance by the ``moe_dispatch`` pass)."""
    from vopt.zoo.moe_vrd import MoEVRDOutput

    if self.training:
        raise RuntimeError("the moe_dispatch rewrite of MoEVRD is inference-only (vopt::grouped_gemm has no autograd, "
                           "no load-balancing loss); call .eval()")
    for name, x, dim in (("sf", sf, self.feature_dim), ("of", of, self.feature_dim), ("ppf", ppf, self.geometry_dim),
                         ("pvf", pvf, self.pair_visual_dim)):
        if x.dim() != 2 or x.shape[1] != dim or x.shape[0] != sf.shape[0]:
            raise ValueError(f"{name} must be [pairs={sf.shape[0]}, {dim}], got {tuple(x.shape)}")
    logits, _clean, _noise = self.gate_logits(sf)
    # Same top-k call as MoEVRD._gates (k + 1 candidates), so ties resolve identically.
    top_logits, top_idx = logits.topk(min(self.top_k + 1, self.num_experts), dim=1)
    top_idx = top_idx[:, :self.top_k]
    k_gates = torch.softmax(top_logits[:, :self.top_k], dim=1)
    gates = torch.zeros_like(logits).scatter(1, top_idx, k_gates)
    weights = k_gates if self.combine == "weighted" else (k_gates > 0).to(k_gates.dtype)
    cap = capacity_for(sf.shape[0], self.num_experts, self.top_k, self.vopt_moe_capacity_factor)
    r = route(top_idx, weights, self.num_experts, cap)
    if cap is not None and not torch.compiler.is_compiling():
        self.vopt_moe_dropped = int(r.dropped)
    s, o, p = self.experts(sf[r.token], of[r.token], ppf[r.token], pvf[r.token], r.offsets)
    return MoEVRDOutput(combine(s, r), combine(o, r), combine(p, r), gates, None)


def routed_flops(module: nn.Module, pairs: int) -> tuple:
    """``(dense, routed)`` expert FLOPs (2 x multiply-adds of the expert GEMMs) for ``pairs`` tracklet pairs."""
    x = module.experts[0] if isinstance(module.experts, nn.ModuleList) else None
    if x is None:
        raise TypeError("routed_flops needs the original MoEVRD (experts as an nn.ModuleList)")
    f = x.object_predictor[0].in_features
    h = x.object_predictor[0].out_features
    o = x.object_predictor[3].out_features
    pv = x.predicate_vis_feat_emb[0].in_features
    g = x.predicate_feat_emb[0].in_features
    p = x.predicate_predictor.out_features
    per_row = 2 * (2 * (f * h + h * o) + pv * h + g * h + h * p + x.steps * (p * o * o + o * p * o + o * o * p))
    return per_row * pairs * module.num_experts, per_row * pairs * module.top_k


__all__ = ["GroupedRelationExperts", "is_moe_vrd", "sparse_forward", "routed_flops"]

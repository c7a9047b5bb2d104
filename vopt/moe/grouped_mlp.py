"""The common MoE block (a linear gate + ``experts: nn.ModuleList`` of identical MLPs) run as sorted-by-expert dispatch.

:func:`describe` recognises the block: a module with

* a gate ``nn.Linear(d, E)`` named ``gate``, ``router`` or ``gating`` (bias allowed);
* ``experts``: an ``nn.ModuleList`` of ``E`` experts of one structure, each either an ``nn.Sequential`` of
  ``Linear(d, h)``, an activation module, ``Linear(h, d)`` (``nn.Dropout`` layers allowed anywhere), or a gated
  (SwiGLU) MLP ``w2(act(w1 x) * w3 x)`` with ``w1/w3/w2`` (Mixtral), ``gate_proj/up_proj/down_proj`` (Llama MLP) or
  ``fc1/fc2`` + activation (plain MLP) Linear layers, the activation in ``act_fn`` / ``act`` / ``activation``
  (default SiLU);
* ``top_k`` (or ``num_experts_per_tok`` / ``k``): an int in ``[1, E]``.

:class:`SparseMoE` computes the same block as: gate logits, top-k and gate weights (``scoring``: softmax over the
top-k logits, or softmax over all logits then top-k with or without renormalizing), :func:`vopt.moe.routing.route`,
gather the routed rows, ``vopt::grouped_gemm`` for the first layer (``w1`` and ``w3`` fused into one ``[E, d, 2h]``
weight), the activation (and gating), ``vopt::grouped_gemm`` for the second layer, and
:func:`vopt.moe.routing.combine`. The expert weights are stacked once at construction (copies; the experts are not
modified). Which ``scoring`` the original block uses cannot be read from its code, so the ``moe_dispatch`` pass
tries each on a probe input and keeps the one that reproduces the block (:func:`match_scoring`), or skips it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..ops.grouped_gemm import grouped_gemm
from .routing import capacity_for, combine, route

GATE_NAMES = ("gate", "router", "gating")
TOP_K_NAMES = ("top_k", "num_experts_per_tok", "k")
GLU_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))
PLAIN_NAMES = ("fc1", "fc2")
ACT_NAMES = ("act_fn", "act", "activation")
SCORINGS = ("softmax_topk", "softmax_all_renorm", "softmax_all")


@dataclass
class MLPLayout:
    """What :func:`describe` found."""

    gate_name: str
    top_k: int
    glu: bool
    first: list
    """Per expert: the first-layer Linear(s): ``[w1, w3]`` (GLU) or ``[fc1]``."""
    second: list
    """Per expert: the second-layer Linear."""
    act: nn.Module


def _linear_chain(expert: nn.Module) -> Optional[tuple]:
    """``(first Linear, act, second Linear)`` of a Sequential ``Linear, act, Linear`` (Dropout allowed), else None."""
    if not isinstance(expert, nn.Sequential):
        return None
    layers = [m for m in expert if not isinstance(m, nn.Dropout)]
    if len(layers) != 3 or not isinstance(layers[0], nn.Linear) or not isinstance(layers[2], nn.Linear):
        return None
    if isinstance(layers[1], nn.Linear) or any(True for _ in layers[1].parameters()):
        return None
    return layers[0], layers[1], layers[2]


def _act_of(expert: nn.Module) -> nn.Module:
    for name in ACT_NAMES:
        act = getattr(expert, name, None)
        if isinstance(act, nn.Module):
            return act
    return nn.SiLU()


def _expert_layers(expert: nn.Module) -> Optional[tuple]:
    """``(glu, [first Linear(s)], second Linear, act)`` or None."""
    chain = _linear_chain(expert)
    if chain is not None:
        return False, [chain[0]], chain[2], chain[1]
    for a, b, c in GLU_NAMES:
        la, lb, lc = (getattr(expert, n, None) for n in (a, b, c))
        if all(isinstance(m, nn.Linear) for m in (la, lb, lc)):
            return True, [la, lb], lc, _act_of(expert)
    l1, l2 = (getattr(expert, n, None) for n in PLAIN_NAMES)
    if isinstance(l1, nn.Linear) and isinstance(l2, nn.Linear):
        return False, [l1], l2, _act_of(expert)
    return None


def describe(module: nn.Module) -> tuple:
    """``(MLPLayout, None)`` when ``module`` is the common MoE block, else ``(None, why not)``."""
    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.ModuleList) or len(experts) == 0:
        return None, "no non-empty `experts` ModuleList"
    gate_name = next((n for n in GATE_NAMES if isinstance(getattr(module, n, None), nn.Linear)), None)
    if gate_name is None:
        return None, f"no nn.Linear gate named one of {', '.join(GATE_NAMES)}"
    gate = getattr(module, gate_name)
    e = len(experts)
    if gate.out_features != e:
        return None, f"gate has {gate.out_features} outputs but there are {e} experts"
    top_k = next((getattr(module, n) for n in TOP_K_NAMES if isinstance(getattr(module, n, None), int)), None)
    if top_k is None or isinstance(top_k, bool) or not 1 <= top_k <= e:
        return None, f"no integer top-k in [1, {e}] (attribute {' / '.join(TOP_K_NAMES)})"
    layers = [_expert_layers(x) for x in experts]
    if any(lay is None for lay in layers):
        return None, "experts are not Linear-act-Linear or gated (w1/w3/w2) MLPs"
    glu = layers[0][0]
    shapes = {(lay[0], tuple((m.in_features, m.out_features, m.bias is not None) for m in lay[1]),
               (lay[2].in_features, lay[2].out_features, lay[2].bias is not None), type(lay[3]).__name__)
              for lay in layers}
    if len(shapes) != 1:
        return None, "experts differ in structure (layer sizes, biases or activation)"
    d = gate.in_features
    first_in = layers[0][1][0].in_features
    if first_in != d or layers[0][2].out_features != d:
        return None, f"experts map {first_in} -> {layers[0][2].out_features} features but the gate reads {d}"
    return MLPLayout(gate_name, int(top_k), glu, [lay[1] for lay in layers], [lay[2] for lay in layers],
                     layers[0][3]), None


def _stack_weight(linears: list) -> torch.Tensor:
    """``[E, in, out]`` from E Linear layers (``weight`` is ``[out, in]``); a copy."""
    return torch.stack([lin.weight.detach().t() for lin in linears]).contiguous()


def _stack_bias(linears: list) -> Optional[torch.Tensor]:
    if linears[0].bias is None:
        return None
    return torch.stack([lin.bias.detach() for lin in linears]).contiguous()


def _frozen(t: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
    return None if t is None else nn.Parameter(t, requires_grad=False)


class SparseMoE(nn.Module):
    """Sorted-by-expert dispatch of a block :func:`describe` recognised (inference; ``forward(x [..., d])``).

    ``returns_logits``: return ``(out, router_logits [N, E])`` like Mixtral-style blocks, else ``out``.
    ``capacity_factor``: per-expert capacity ``ceil(factor * N * k / E)`` (``None``: no limit, exact); the number of
    assignments dropped by the last eager call is in :attr:`dropped` (``-1`` until one ran, and under tracing).
    """

    def __init__(self, module: nn.Module, layout: MLPLayout, *, scoring: str = "softmax_topk",
                 returns_logits: bool = False, capacity_factor: Optional[float] = None):
        super().__init__()
        if scoring not in SCORINGS:
            raise ValueError(f"SparseMoE: scoring={scoring!r} is invalid; accepted: {', '.join(SCORINGS)}")
        capacity_for(1, 1, 1, capacity_factor)  # validates the factor
        self.gate = copy.deepcopy(getattr(module, layout.gate_name))
        self.act = copy.deepcopy(layout.act)
        self.num_experts = len(layout.second)
        self.top_k = layout.top_k
        self.glu = layout.glu
        self.scoring = scoring
        self.returns_logits = returns_logits
        self.capacity_factor = capacity_factor
        first = layout.first
        if layout.glu:  # one [E, d, 2h] GEMM for w1 and w3
            w_in = torch.cat([_stack_weight([f[0] for f in first]), _stack_weight([f[1] for f in first])], dim=2)
            b1, b3 = _stack_bias([f[0] for f in first]), _stack_bias([f[1] for f in first])
            b_in = None if b1 is None and b3 is None else torch.cat(
                [b1 if b1 is not None else torch.zeros_like(b3), b3 if b3 is not None else torch.zeros_like(b1)], 1)
        else:
            w_in, b_in = _stack_weight([f[0] for f in first]), _stack_bias([f[0] for f in first])
        self.w_in, self.b_in = _frozen(w_in), _frozen(b_in)
        self.w_out, self.b_out = _frozen(_stack_weight(layout.second)), _frozen(_stack_bias(layout.second))
        self.dropped = -1

    def gate_weights(self, logits: torch.Tensor) -> tuple:
        """``(top_idx [N, k], weights [N, k])`` by :attr:`scoring`."""
        if self.scoring == "softmax_topk":
            top_logits, top_idx = logits.topk(self.top_k, dim=-1)
            return top_idx, torch.softmax(top_logits, dim=-1)
        probs = torch.softmax(logits, dim=-1)
        weights, top_idx = probs.topk(self.top_k, dim=-1)
        if self.scoring == "softmax_all_renorm":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return top_idx, weights

    def forward(self, x: torch.Tensor):
        if self.training:
            raise RuntimeError("SparseMoE is inference-only (vopt::grouped_gemm has no autograd); call .eval()")
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        logits = self.gate(x2)
        top_idx, weights = self.gate_weights(logits)
        cap = capacity_for(x2.shape[0], self.num_experts, self.top_k, self.capacity_factor)
        r = route(top_idx, weights, self.num_experts, cap)
        if cap is not None and not torch.compiler.is_compiling():
            self.dropped = int(r.dropped)
        h = grouped_gemm(x2[r.token], self.w_in, r.offsets, self.b_in)
        if self.glu:
            h1, h3 = h.chunk(2, dim=-1)
            h = self.act(h1) * h3
        else:
            h = self.act(h)
        y = grouped_gemm(h.contiguous(), self.w_out, r.offsets, self.b_out)
        out = combine(y, r, x.dtype).reshape(shape)
        return (out, logits) if self.returns_logits else out


def _close(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False
        tol = (1e-5 if a.dtype == torch.float32 else 2e-2) * (1 + a.abs().max().item() if a.numel() else 1)
        return a.numel() == 0 or (a.float() - b.float()).abs().max().item() <= tol
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return all(_close(x, y) for x, y in zip(a, b))
    return False


def match_scoring(module: nn.Module, layout: MLPLayout, probe: torch.Tensor,
                  capacity_factor: Optional[float] = None) -> tuple:
    """``(SparseMoE, None)`` reproducing ``module`` on ``probe`` within fp32 tolerance, else ``(None, why not)``.

    Tries every scoring in :data:`SCORINGS`; the tolerance is ``1e-5 * (1 + max|out|)`` in fp32 (summation order
    only) and ``2e-2 * (1 + max|out|)`` in fp16/bf16.
    """
    with torch.no_grad():
        want, failures = None, []
        for candidate in (probe, probe.reshape(-1, probe.shape[-1])):   # [1, T, d], then [T, d]
            try:
                want = module(candidate)
            except Exception as exc:  # noqa: BLE001 - any failure of the user's forward means "try the next shape"
                failures.append(f"{tuple(candidate.shape)}: {type(exc).__name__}: {exc}")
                continue
            probe = candidate
            break
        if want is None:
            return None, f"the block's forward failed on probe inputs ({'; '.join(failures)})"
        if isinstance(want, tuple) and len(want) == 2 and isinstance(want[0], torch.Tensor):
            returns_logits = True
        elif isinstance(want, torch.Tensor):
            returns_logits = False
        else:
            return None, f"the block returns {type(want).__name__}; supported: a tensor or (out, router_logits)"
        for scoring in SCORINGS:
            sparse = SparseMoE(module, layout, scoring=scoring, returns_logits=returns_logits).eval()
            if _close(want, sparse(probe)):
                sparse.capacity_factor = capacity_factor
                return sparse, None
    return None, f"no scoring in {', '.join(SCORINGS)} reproduces the block on a probe input (custom routing?)"


def probe_input(module: nn.Module, layout: MLPLayout, tokens: int, seed: int = 0) -> torch.Tensor:
    """A seeded ``[1, tokens, d]`` probe in the gate's dtype and device."""
    gate = getattr(module, layout.gate_name)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, gate.in_features, generator=g).to(gate.weight.device, gate.weight.dtype)


def f_act_name(act: nn.Module) -> str:
    """A short name of the activation (for reports)."""
    if isinstance(act, nn.GELU):
        return f"gelu({act.approximate})"
    return type(act).__name__.lower()


__all__ = ["SparseMoE", "MLPLayout", "describe", "match_scoring", "probe_input", "SCORINGS"]

"""Sorted-by-expert routing for mixture-of-experts dispatch: top-k choices -> expert segments -> gate-weighted combine.

Everything here is vectorized torch with shapes fixed by ``(tokens, top_k, experts)``, no host synchronization and
no data-dependent output shapes, so it runs inside ``torch.export`` graphs (the per-expert split is consumed by the
opaque ``vopt::grouped_gemm``).

:func:`route` turns the ``[N, k]`` expert choices and gate weights of ``N`` tokens into ``A = N * k`` assignments
sorted by expert (a stable sort: within an expert, assignments keep their priority order), the ``[E + 1]`` segment
offsets, the inverse permutation and the number of assignments a capacity limit dropped. :func:`combine` sums each
token's ``k`` expert outputs weighted by its gates, in fp32.

Capacity (optional; ``None`` = no limit = exact). With a limit ``C`` each expert keeps its first ``C`` assignments in
priority order: every token's first choice before any second choice (GShard/Switch), and by token index within a
rank. Dropped assignments get the sentinel expert ``E``: they sort after every expert's segment (``offsets[E]`` is
where they start), ``vopt::grouped_gemm`` writes zeros for them and their combine weight is 0. A token whose every
choice was dropped gets a zero output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError


@dataclass
class Routing:
    """Assignments sorted by expert (``A = N * k`` of them, dropped ones last)."""

    token: torch.Tensor
    """``[A]`` int64: the token of each sorted assignment (rows to gather)."""
    expert: torch.Tensor
    """``[A]`` int64: its expert (non-decreasing; ``E`` for dropped assignments)."""
    weight: torch.Tensor
    """``[A]``: its gate weight (0 for dropped assignments), in the gates' dtype."""
    offsets: torch.Tensor
    """``[E + 1]`` int64: expert ``e`` owns sorted rows ``offsets[e]:offsets[e + 1]``; ``offsets[E]`` = kept count."""
    inverse: torch.Tensor
    """``[N, k]`` int64: the sorted row of token ``n``'s ``j``-th choice."""
    dropped: torch.Tensor
    """``[]`` int64: assignments dropped by the capacity limit (0 without one)."""

    @property
    def counts(self) -> torch.Tensor:
        """``[E]`` rows per expert."""
        return self.offsets[1:] - self.offsets[:-1]


def capacity_for(num_tokens: int, num_experts: int, top_k: int, factor: Optional[float]) -> Optional[int]:
    """Per-expert capacity ``ceil(factor * N * k / E)`` (GShard), or ``None`` (no limit) when ``factor`` is ``None``."""
    if factor is None:
        return None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ConfigError(f"capacity_factor must be a number > 0 or None (no limit), got {factor!r}")
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def _check(top_idx: torch.Tensor, top_w: torch.Tensor, num_experts: int, capacity: Optional[int]) -> None:
    if not isinstance(top_idx, torch.Tensor) or top_idx.dim() != 2 or top_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"route: top_idx must be an int32/int64 [N, k] tensor, got "
                        f"{getattr(top_idx, 'dtype', type(top_idx).__name__)} {tuple(getattr(top_idx, 'shape', ()))}")
    if not isinstance(top_w, torch.Tensor) or top_w.shape != top_idx.shape or not top_w.is_floating_point():
        raise ValueError(f"route: top_w must be a floating tensor of top_idx's shape {tuple(top_idx.shape)}, got "
                         f"{tuple(getattr(top_w, 'shape', ()))}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"route: num_experts must be an integer >= 1, got {num_experts!r}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
        raise ValueError(f"route: capacity must be an integer >= 0 or None (no limit), got {capacity!r}")


def route(top_idx: torch.Tensor, top_w: torch.Tensor, num_experts: int, capacity: Optional[int] = None) -> Routing:
    """Sort the ``[N, k]`` expert choices ``top_idx`` (gate weights ``top_w``) by expert; see the module docstring.

    Expert ids outside ``[0, num_experts)`` are not checked here (that would need a host sync); they are treated as
    dropped (``>= E``) or, if negative, clamp into expert 0's segment, so callers pass ``topk`` indices of an
    ``[N, E]`` gate.
    """
    _check(top_idx, top_w, num_experts, capacity)
    n, k = top_idx.shape
    a = n * k
    dev = top_idx.device
    # Priority order: rank-major (every first choice, then every second choice, ...), token order within a rank.
    expert = top_idx.t().reshape(a).to(torch.int64).clamp(0, num_experts)
    token = torch.arange(n, device=dev).repeat(k)
    slot = torch.arange(a, device=dev)                                   # rank * n + token
    weight = top_w.t().reshape(a)
    if capacity is not None:
        order = torch.sort(expert, stable=True).indices
        sorted_e = expert[order]
        first = torch.searchsorted(sorted_e, torch.arange(num_experts + 1, device=dev))
        # Rank of each assignment within its expert: sorted index minus the expert's first sorted index.
        position = torch.empty_like(order).scatter_(0, order, torch.arange(a, device=dev) - first[sorted_e])
        expert = torch.where(position < capacity, expert, torch.full_like(expert, num_experts))
    order = torch.sort(expert, stable=True).indices
    sorted_e = expert[order]
    offsets = torch.searchsorted(sorted_e, torch.arange(num_experts + 1, device=dev))
    kept = sorted_e < num_experts
    inverse = torch.empty_like(order).scatter_(0, order, slot)           # flat slot -> sorted row
    return Routing(
        token=token[order],
        expert=sorted_e,
        weight=torch.where(kept, weight[order], torch.zeros_like(weight[order])),
        offsets=offsets,
        inverse=inverse.reshape(k, n).t(),
        dropped=(a - offsets[num_experts]).to(torch.int64),
    )


def combine(y_sorted: torch.Tensor, routing: Routing, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``[N, C]``: ``sum_j weight(n, j) * y_sorted[inverse[n, j]]`` in fp32 (no atomics: deterministic)."""
    n, k = routing.inverse.shape
    if y_sorted.dim() != 2 or y_sorted.shape[0] != n * k:
        raise ValueError(f"combine: y_sorted must be [N * k = {n * k}, C], got {tuple(y_sorted.shape)}")
    rows = y_sorted.float()[routing.inverse]                              # [N, k, C]
    weights = routing.weight.float()[routing.inverse]                     # [N, k]
    out = rows[:, 0] * weights[:, 0, None]
    for j in range(1, k):                                                 # k terms, in choice order
        out = out + rows[:, j] * weights[:, j, None]
    return out.to(out_dtype or y_sorted.dtype)

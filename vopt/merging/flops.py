"""The LLM prefill FLOPs formula that HoliTom, FastV and DyCoke report (spec ``shared/specs/tokens.md`` §5).

``sum over layers of 4 n d^2 + 2 n^2 d + 2 n d m`` with ``n`` the *visual tokens only*, ``d`` the hidden size and
``m`` the MLP width. It ignores SwiGLU's third matrix, GQA, the text tokens and the LM head, so it is only good for
comparing with published numbers; vopt's exact count is :func:`vopt.zoo.cost` (``FlopCounterMode``).

With ``inner_layer=K`` and ``inner_keep=r`` the layers from ``K`` on see ``ceil(r n)`` tokens (HoliTom's inner-LLM
merging). LLaVA-OV-7B at 32 frames (d 3584, m 18944, 28 layers, 196 tokens/frame): 40.8 TFLOPs unmerged, 3.44 T at
10% retain, 2.82 T (6.9%) with inner merging at K=18, r=0.5 -- the published columns.
"""
from __future__ import annotations

import math
from typing import Optional


def paper_layer_flops(hidden: int, intermediate: int, n: int) -> float:
    """One layer: ``4 n d^2 + 2 n^2 d + 2 n d m``."""
    d, m = hidden, intermediate
    return float(4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


def paper_prefill_flops(layers: int, hidden: int, intermediate: int, n: int, *, inner_layer: Optional[int] = None,
                        inner_keep: float = 1.0) -> float:
    """Prefill FLOPs of ``layers`` LLM layers over ``n`` visual tokens (module docstring)."""
    if inner_layer is None:
        return layers * paper_layer_flops(hidden, intermediate, n)
    if not 0 <= inner_layer <= layers:
        raise ValueError(f"inner_layer must be in [0, layers={layers}], got {inner_layer}")
    if not 0.0 < inner_keep <= 1.0:
        raise ValueError(f"inner_keep must be in (0, 1], got {inner_keep}")
    kept = math.ceil(inner_keep * n)
    return (inner_layer * paper_layer_flops(hidden, intermediate, n)
            + (layers - inner_layer) * paper_layer_flops(hidden, intermediate, kept))

"""Cost accounting of zoo models: parameters, prefill FLOPs, KV-cache bytes.

* **Parameters**: counted on the built model (per stage and total).
* **Prefill FLOPs, exact**: the model's stages run on the meta device under
  ``torch.utils.flop_counter.FlopCounterMode`` (a matmul of [m,k]x[k,n] counts
  2mkn; SDPA counts its two matmuls), so SwiGLU's third matrix, GQA, the vision
  tower, the projector and the LM head are all in.
* **Prefill FLOPs, paper**: the analytic count of HoliTom/FastV/DyCoke over the
  LLM's *visual tokens only*: ``sum_layers 4nd^2 + 2n^2d + 2ndm`` (no SwiGLU
  third matrix, no GQA). It reproduces the published 40.8 TFLOPs of
  LLaVA-OV-7B at 32 frames.
* **KV bytes per token**: ``2 (K and V) x layers x kv_heads x head_dim x
  bytes(dtype)``; per video: times the visual tokens per video.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from ..merging.flops import paper_prefill_flops


@dataclass
class Cost:
    model: str
    size: str
    batch: int
    frames: int
    dtype: str
    params: int
    params_per_stage: dict = field(default_factory=dict)
    prefill_flops: Optional[float] = None
    """Exact (FlopCounterMode) prefill FLOPs, all stages; None when the entry gives no stage calls."""
    prefill_flops_per_stage: dict = field(default_factory=dict)
    prefill_flops_paper: Optional[float] = None
    """HoliTom/FastV analytic LLM FLOPs over the visual tokens (see module docstring)."""
    visual_tokens: Optional[int] = None
    kv_bytes_per_token: Optional[int] = None
    kv_bytes_per_video: Optional[int] = None

    def to_dict(self) -> dict:
        return asdict(self)


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _stage_params(zm) -> dict:
    from ..adapters import find_adapter, get_path

    out = {}
    for spec, path in find_adapter(zm.model).resolve(zm.model):
        out[spec.name] = sum(p.numel() for p in get_path(zm.model, path).parameters())
    return out


def cost(name: str, size: str = "full", *, batch: int = 1, frames: Optional[int] = None,
         dtype: torch.dtype = torch.bfloat16) -> Cost:
    """Cost of zoo model ``name`` (built on the meta device: nothing is allocated)."""
    from . import build

    zm = build(name, size, device="meta", dtype=dtype)
    # A view of a parameter passed on under no_grad trips FlopCounterMode's autograd
    # bookkeeping; nothing here needs gradients (the model is this function's own).
    zm.model.requires_grad_(False)
    frames = zm.default_frames if frames is None else frames
    result = Cost(model=name, size=size, batch=batch, frames=frames, dtype=str(dtype).removeprefix("torch."),
                  params=sum(p.numel() for p in zm.model.parameters()), params_per_stage=_stage_params(zm))
    if zm.stage_calls is not None:
        total = 0.0
        # Fake tensors (over the meta model): HF code treats them as tracing and
        # skips its data-dependent checks, which meta tensors cannot answer.
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            for call in zm.stage_calls(batch, frames):
                args, kwargs = pytree.tree_map_only(torch.Tensor, mode.from_tensor, (call.args, call.kwargs))
                counter = FlopCounterMode(display=False)
                with counter:
                    call.module(*args, **kwargs)
                flops = float(counter.get_total_flops())
                result.prefill_flops_per_stage[call.stage] = result.prefill_flops_per_stage.get(call.stage, 0.0) + flops
                total += flops
        result.prefill_flops = total
    if zm.visual_tokens is not None:
        result.visual_tokens = zm.visual_tokens(frames)
    if zm.llm is not None:
        llm = zm.llm
        result.kv_bytes_per_token = kv_bytes_per_token(llm.layers, llm.kv_heads, llm.head_dim, dtype)
        if result.visual_tokens is not None:
            result.prefill_flops_paper = batch * paper_prefill_flops(llm.layers, llm.hidden, llm.intermediate, result.visual_tokens)
            result.kv_bytes_per_video = result.kv_bytes_per_token * result.visual_tokens
    return result

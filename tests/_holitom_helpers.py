"""Shared by the holitom pass tests (LLaVA-OneVision, Qwen2-VL, Idefics3, stream)."""
from __future__ import annotations

import vopt
from vopt import OptimizeConfig
from vopt.merging import HoliTomConfig
from vopt.passes.holitom import HoliTomPassConfig


def holitom_opt(model, retain: float, **kw):
    """``vopt.optimize(model, passes=["holitom"])`` with ``retain_ratio=retain`` and other pass-config fields."""
    cfg = HoliTomPassConfig(merge=HoliTomConfig(retain_ratio=retain), **kw)
    return vopt.optimize(model, OptimizeConfig(pass_configs={"holitom": cfg}), passes=["holitom"])


class LMInputs:
    """Forward pre-hook on a language model: the inputs_embeds / position_ids / attention_mask of every call."""

    def __init__(self, lm):
        self.calls = []
        self.handle = lm.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append({k: kwargs.get(k) for k in ("inputs_embeds", "position_ids", "attention_mask")})

    def close(self):
        self.handle.remove()

"""Shared by the holitom pass tests (LLaVA-OneVision, Qwen2-VL, Idefics3, stream)."""
from __future__ import annotations

import torch

import vopt
from vopt import OptimizeConfig
from vopt.merging import HoliTomConfig
from vopt.passes.holitom import HoliTomPassConfig


def holitom_opt(model, retain: float, **kw):
    """``vopt.optimize(model, passes=["holitom"])`` with ``retain_ratio=retain`` and other pass-config fields."""
    cfg = HoliTomPassConfig(merge=HoliTomConfig(retain_ratio=retain), **kw)
    return vopt.optimize(model, OptimizeConfig(pass_configs={"holitom": cfg}), passes=["holitom"])


class LMInputs:
    """Forward pre-hook on a language model: the inputs_embeds / position_ids / attention_mask of every call. A
    context manager: ``with LMInputs(lm) as spy:`` removes the hook on exit."""

    def __init__(self, lm):
        self.calls = []
        self.handle = lm.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append({k: kwargs.get(k) for k in ("inputs_embeds", "position_ids", "attention_mask")})

    def close(self):
        self.handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def last_real(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (left or right padding)."""
    return (torch.arange(mask.shape[1])[None] * mask).amax(1)


def assert_retain_1_is_identity(zm, what: tuple, tokens: list) -> None:
    """At retain 1.0 the pass installs (its report names ``what``), every video keeps its ``tokens``, the logits are
    bit-identical to the unmodified model's, and the caller's model is untouched."""
    from vopt.passes.holitom import STATS_ATTR

    opt = holitom_opt(zm.model, 1.0)
    (m,) = opt.report.runtime_results[0].matches
    assert m.rewritten and all(w in m.what for w in what), m.what
    inputs = zm.example_inputs(batch=2)
    with torch.no_grad():
        ref = zm.model(**inputs).logits
        out = opt(**inputs)
    assert out.holitom.tokens_after == out.holitom.tokens_before == tokens
    assert torch.equal(out.logits, ref)
    assert "forward" not in vars(zm.model) and not hasattr(zm.model, STATS_ATTR)

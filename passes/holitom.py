"""``holitom``: HoliTom visual-token merging on unmodified video LLMs (runtime pass; spec
``shared/specs/tokens.md``).

What it does. A **runtime** pass on vopt's working copy (``vopt.optimize`` never touches the caller's model): it
shadows methods **on that instance only** (``forward`` / ``generate`` / ``prefill_frame``; bound methods stored as
instance attributes, ``copy.deepcopy`` rebinds them; transformers and the model classes are never patched) so that
video tokens are merged before they reach the language model (the *outer* stage: :func:`vopt.merging.holitom_merge`,
DP temporal segmentation, temporal merge, DPC-KNN / attention spatial merge to an exact budget), and optionally
inside it (the *inner* stage at decoder layer ``inner_layer``: :mod:`vopt.merging.inner`). What each model family
needs (how its prompt is rebuilt, its positions, padding, ``generate``) is one module of
:mod:`vopt.merging.families`, whose docstring is the reference for that family:

* :mod:`~vopt.merging.families.llava_onevision`: LLaVA-OneVision (outer + inner stages; compact or original
  positions; logits scattered back to the caller's layout);
* :mod:`~vopt.merging.families.qwen2vl`: Qwen2-VL / GPT4Scene (3-D M-RoPE positions computed on the full input and
  gathered for the kept tokens, ``rope_deltas`` fixed; BEV image and caller-protected tokens never merged);
* :mod:`~vopt.merging.families.idefics3`: Idefics3 fed video frames as images (T2Vid);
* :mod:`~vopt.merging.families.stream`: VideoLLM-online's stream (per-frame merging in ``prefill_frame``);
* :mod:`~vopt.merging.families.inner_llm`: the inner-LLM stage (decoder layers ``K..N-1`` wrapped);
* :mod:`~vopt.merging.families.common`: statistics, per-call info (``out.holitom``), shared helpers.

Peers are configs of the same pass: ``merge=HoliTomConfig(method='visionzip' | 'pool')`` and FastV-style inner
pruning (``outer=False, inner_layer=2, inner_merge=False``).

Why **not a default pass**: it drops visual tokens (changes answers). Opt in with
``vopt.optimize(model, OptimizeConfig(pass_configs={"holitom": HoliTomPassConfig(merge=HoliTomConfig(...))}),
passes=["holitom"])``.

Measured (trained tiny ``zoo.build("llava-onevision")``, 8 frames x 4 pooled tokens + newline = 33 video tokens per
clip, ``vopt.eval.compare`` on 64 test clips, baseline accuracy 0.891, tau 0.8, proxy scores; ``tests/
test_holitom_pass.py`` prints it): retain 0.5 -> 787/2112 video tokens kept (37.3%; temporal merging of static
clips leaves fewer survivors than the budget), agreement 0.656 / accuracy delta -0.203 (compact positions), 0.750 /
-0.156 (original positions); retain 0.25 -> 552/2112 (26.1%), 0.594 / -0.266 (compact), 0.750 / -0.219 (original).
Inner stage alone (256 test clips, baseline 0.930; 4-layer LM): K=2 keep 0.5 -> agreement 0.930, delta -0.035 (merge)
/ 0.945, -0.020 (FastV-style prune); K=1 keep 0.25 -> 0.738, -0.184 / 0.738, -0.180; outer retain 0.5 + inner K=2 0.5
-> 0.703, -0.203 (1650 of 8448 video tokens reach layers 2-3). On this tiny model merging is not better than dropping.

Report: one :class:`Match` (``where="model"``, ``what`` = class + config); at the first merged call the match's
``what`` gains the measured token reduction (``first call: video tokens X -> Y``). Running totals are kept on the
working copy as ``model.vopt_holitom_stats`` (:class:`HoliTomStats`). Models that are neither LLaVA-OneVision,
Qwen2-VL, Idefics3 nor a streaming model (section "Streaming") are skipped with the reason.
from __future__ import annotations

import inspect
import math
import types
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch

from vopt.config import VoptConfig, config_field, register_config
from vopt.errors import ConfigError
from vopt.merging import HoliTomConfig, MergeResult, holitom_merge, spatial_merge
from vopt.merging.flops import paper_prefill_flops
from vopt.merging.inner import inner_merge, last_token_importance
from vopt.pass_protocol import Match, Pass, PassContext, PassKind, PassResult, register_pass
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from vopt.config import VoptConfig, config_field, register_config
from vopt.errors import ConfigError
from vopt.merging import HoliTomConfig
from vopt.merging.families import idefics3, llava_onevision, qwen2vl, stream
from vopt.merging.families.common import STATS_ATTR, WRAPPED, HoliTomCallInfo, HoliTomStats, InnerStats
from vopt.merging.families.inner_llm import InnerMergeLayer, install_inner
from vopt.pass_protocol import Match, Pass, PassContext, PassKind, PassResult, register_pass

__all__ = ["HoliTomCallInfo", "HoliTomPass", "HoliTomPassConfig", "HoliTomStats", "InnerMergeLayer", "InnerStats",
           "STATS_ATTR"]

LOGITS_LAYOUTS = ("original", "compact")
POSITION_MODES = ("compact", "original")
SCORE_MODES = ("attention", "proxy")


@register_config
@dataclass
class HoliTomPassConfig(VoptConfig):
    """Config of the ``holitom`` pass."""

    merge: HoliTomConfig = config_field(
        default_factory=HoliTomConfig,
        help="Outer-LLM merging numerics (HoliTomConfig: retain_ratio, token_budget, tau, beta, knn, ...). The "
        "budget applies per video (F frames x n pooled tokens, the newline excluded).")
    logits: str = config_field(
        "original", help="'original' (logits scattered back to the caller's [B, L] layout, so answer positions "
        "from the caller's attention_mask stay valid) or 'compact' (logits of the shortened sequence [B, L'], read "
        "with out.attention_mask).")

    positions: str = config_field(
        "compact", help="'compact' (the LM numbers the shortened sequence 0..L'-1 itself: published HoliTom outer "
        "stage) or 'original' (each kept token keeps the position the unmodified model gives it: text its own, a "
        "merged token its representative's placeholder slot (frame, spatial index), the newline the block's last "
        "slot; gapped, spec R1/R2).")

    scores: str = config_field(
        "attention", help="Token scores for the dynamic tokens' attention selection: 'attention' (the attention each "
        "patch receives in the vision layer that produced the features, pooled like the features; spec §1.1) or "
        "'proxy' (vopt.merging.proxy_scores: feature self-similarity; no vision attention needed).")
    outer: bool = config_field(
        True, help="Run the outer-LLM stage (merge between projector and LLM). False: inner-LLM merging only.")
    inner_layer: Optional[int] = config_field(
        None, help="Inner-LLM merging at this decoder layer, >= 1 (HoliTom's K: 18 of LLaVA-OV-7B's 28 layers); None: "
        "off. Layers from K on see the shortened sequence; the language model then runs eagerly (token choice is data "
        "dependent).")
    inner_keep: float = config_field(
        0.5, help="Fraction of the visual tokens reaching layer K that are kept there (HoliTom: 0.5).")
    inner_queries: int = config_field(
        1, help="Last query positions whose attention (layer K's own q/k projections + RoPE) scores the visual tokens.")
    inner_merge: bool = config_field(
        True, help="True: each dropped visual token is averaged into its most similar kept one (HoliTom). False: "
        "dropped (FastV-style pruning, for comparison).")

    def validate(self) -> None:
        name = type(self).__name__
        if self.inner_layer is not None and (isinstance(self.inner_layer, bool) or not isinstance(self.inner_layer, int)
                                             or self.inner_layer < 1):
            raise ConfigError(f"{name}.inner_layer must be None or an int >= 1 (layer 0's cache must hold every token: "
                              f"its length numbers later positions), got {self.inner_layer!r}")
        if not 0.0 < self.inner_keep <= 1.0:
            raise ConfigError(f"{name}.inner_keep must be in (0, 1], got {self.inner_keep!r}")
        if isinstance(self.inner_queries, bool) or not isinstance(self.inner_queries, int) or self.inner_queries < 1:
            raise ConfigError(f"{name}.inner_queries must be an int >= 1, got {self.inner_queries!r}")
        if not self.outer and self.inner_layer is None:
            raise ConfigError(f"{name}: outer=False and inner_layer=None leave nothing to do")
        if self.scores not in SCORE_MODES:
            raise ConfigError(f"{name}.scores={self.scores!r} is invalid; accepted: {', '.join(SCORE_MODES)}")
        if self.positions not in POSITION_MODES:
            raise ConfigError(f"{name}.positions={self.positions!r} is invalid; accepted: {', '.join(POSITION_MODES)}")
        if not isinstance(self.merge, HoliTomConfig):
            raise ConfigError(f"{name}.merge must be a HoliTomConfig, got {type(self.merge).__name__}")
        if self.logits not in LOGITS_LAYOUTS:
            raise ConfigError(f"{name}.logits={self.logits!r} is invalid; accepted: {', '.join(LOGITS_LAYOUTS)}")



def _supported(model) -> Optional[str]:
    """None when ``model`` is a family this pass can wrap (streams are checked first, separately), else the reason."""
    if qwen2vl.is_qwen2vl(model):
        return qwen2vl.supported(model)
    if idefics3.is_idefics3(model):
        return idefics3.supported(model)
    return llava_onevision.supported(model)


@register_pass
class HoliTomPass(Pass):
    name = "holitom"
    summary = ("HoliTom outer- and inner-LLM video-token merging for LLaVA-OneVision, Qwen2-VL (3-D M-RoPE "
               "positions), Idefics3 (T2Vid: frames as images) and VideoLLM-online's stream (frame by frame); opt-in")
    config_cls = HoliTomPassConfig
    kind = PassKind.RUNTIME
    provides = frozenset({"tokens:holitom_outer"})
    default = False  # drops visual tokens: opt-in

    def run_runtime(self, model: Any, ctx: PassContext) -> PassResult:
        result = PassResult(self.name, "model")
        kind = type(model).__name__
        if stream.is_streaming_model(model):
            return self._run_stream(model, ctx, result, kind)
        reason = _supported(model)
        if reason is None and getattr(vars(model).get("forward"), WRAPPED, False):
            reason = "forward() is already wrapped by holitom"
        if reason is not None:
            result.matches.append(Match("model", kind, rewritten=False, reason=reason))
            return result
        m, cfg = self.config.merge, self.config
        budget = f"token_budget={m.token_budget}" if m.token_budget is not None else f"retain_ratio={m.retain_ratio:g}"
        if qwen2vl.is_qwen2vl(model):
            return self._run_qwen2vl(model, ctx, result, kind, budget)
        if idefics3.is_idefics3(model):
            return self._run_idefics3(model, ctx, result, kind, budget)
        what = kind + (f" {'HoliTom' if m.method == 'holitom' else m.method} outer {budget} tau={m.tau:g} "
                       f"beta={m.beta:g} D={m.dominant_ratio:g} knn={m.knn} rounding={m.budget_rounding.value} "
                       f"positions={cfg.positions} logits={cfg.logits}" if cfg.outer else " HoliTom (no outer stage)")
        return self._install(model, ctx, result, what, llava_onevision.install)

    def _install(self, model: Any, ctx: PassContext, result: PassResult, what: str, install_family) -> PassResult:
        """The family's wrappers (``install_family``) and, with ``inner_layer`` set, the inner stage's layers."""
        cfg = self.config
        match = Match("model", what, rewritten=True)
        if not ctx.dry_run:
            stats = HoliTomStats()
            setattr(model, STATS_ATTR, stats)
            if cfg.inner_layer is not None:
                match.what += "; " + install_inner(model, cfg, stats.inner)
            install_family(model, cfg, match)
        elif cfg.inner_layer is not None:
            match.what += f"; inner K={cfg.inner_layer} keep={cfg.inner_keep:g}"
        result.matches.append(match)
        return result

    def _run_qwen2vl(self, model: Any, ctx: PassContext, result: PassResult, kind: str, budget: str) -> PassResult:
        """Qwen2-VL (:mod:`vopt.merging.families.qwen2vl`): 3-D M-RoPE positions gathered; inner stage optional."""
        m, cfg = self.config.merge, self.config
        if not cfg.outer:
            return self._install(model, ctx, result, f"{kind} HoliTom (no outer stage)", qwen2vl.install)
        why_proxy = qwen2vl.qwen2vl_attention_scores_supported(model) if cfg.scores == "attention" else None
        if cfg.scores != "attention":
            scores = cfg.scores
        elif why_proxy is None:
            scores = "attention (received in the last vision block)"
        else:
            scores = f"proxy (attention unavailable: {why_proxy})"
        what = (f"{kind} {'HoliTom' if m.method == 'holitom' else m.method} outer {budget} tau={m.tau:g} "
                f"beta={m.beta:g} D={m.dominant_ratio:g} knn={m.knn} rounding={m.budget_rounding.value} "
                f"positions=M-RoPE 3-D (model's own, kept gathered) scores={scores} logits={cfg.logits}; video tokens "
                "merged, image (BEV) / text / vision start-end tokens untouched")
        return self._install(model, ctx, result, what, qwen2vl.install)

    def _run_idefics3(self, model: Any, ctx: PassContext, result: PassResult, kind: str, budget: str) -> PassResult:
        """Idefics3 / T2Vid (:mod:`vopt.merging.families.idefics3`): frames fed as images; inner stage optional."""
        m, cfg = self.config.merge, self.config
        if not cfg.outer:
            return self._install(model, ctx, result, f"{kind} HoliTom (no outer stage)", idefics3.install)
        what = (f"{kind} {'HoliTom' if m.method == 'holitom' else m.method} outer {budget} tau={m.tau:g} "
                f"beta={m.beta:g} D={m.dominant_ratio:g} knn={m.knn} rounding={m.budget_rounding.value} "
                f"positions={cfg.positions} scores={cfg.scores} logits={cfg.logits}; each row's images merged as one "
                "video's frames (n <image> tokens each), merged tokens placed in their representative frame's block, "
                "frame wrappers / text kept")
        return self._install(model, ctx, result, what, idefics3.install)

    def _run_stream(self, model: Any, ctx: PassContext, result: PassResult, kind: str) -> PassResult:
        """VideoLLM-online-style streaming (module docstring, "Streaming"): per-frame merging in ``prefill_frame``."""
        m, cfg = self.config.merge, self.config
        if getattr(vars(model).get("prefill_frame"), WRAPPED, False):
            result.matches.append(Match("model", kind, rewritten=False,
                                        reason="prefill_frame() is already wrapped by holitom"))
            return result
        if not cfg.outer:
            what = f"{kind} streaming prefill_frame(): HoliTom (no outer stage: every frame token reaches the LM)"
            return self._install(model, ctx, result, what, stream.install)
        n = model.tokens_per_frame
        k = stream.stream_frame_budget(m, n)
        budget = f"token_budget={m.token_budget}" if m.token_budget is not None else f"retain_ratio={m.retain_ratio:g}"
        what = (f"{kind} streaming prefill_frame(): per-frame HoliTom {budget} -> {k} of {n} tokens per frame (CLS "
                f"kept untouched; temporal: static vs the previous frame's kept tokens, tau={m.tau:g}; spatial: "
                f"DPC-KNN knn={m.knn} {m.cluster_merge.value if hasattr(m.cluster_merge, 'value') else m.cluster_merge}"
                f" merge, beta={m.beta:g}); interval/text never merged; compact positions; state per cache; forward() "
                "(whole-stream embedding) unmerged")
        return self._install(model, ctx, result, what, stream.install)

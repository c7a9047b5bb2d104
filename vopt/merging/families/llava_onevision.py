"""LLaVA-OneVision (the holitom pass's outer stage).

What it does. A **runtime** pass on vopt's working copy (``vopt.optimize`` never touches the caller's model). On a
``LlavaOnevisionForConditionalGeneration`` (or a subclass) it shadows ``forward`` **on that instance only** (a bound
method stored as an instance attribute; ``copy.deepcopy`` rebinds it; transformers and the model class are never
patched). ``model(...)`` and every ``nn.Module.__call__`` reach the wrapper. A call that carries
``pixel_values_videos`` with ``input_ids`` (no ``inputs_embeds``, no image ``pixel_values``, no filled cache) is
rewritten as follows (spec ``shared/specs/tokens.md`` §1, §3 "LlavaOnevision feature-count check", Option A):

(a) the video features are the model's own: ``model.get_video_features(pixel_values_videos, ...).pooler_output``
    (vision tower -> ``vision_feature_layer`` -> projector -> bilinear 2x2 pooling -> one ``image_newline`` appended),
    so before merging the numbers are bit-identical to what the unmodified forward scatters;
(b) per sample, the ``[F*n]`` frame tokens (without the newline) are reshaped to ``[F, n, D]`` and merged by
    :func:`vopt.merging.holitom_merge` with the nested :class:`~vopt.merging.HoliTomConfig`; the newline is kept
    after the merged tokens, where the model places it ("one_token" order, §1.5);
(c) each row is rebuilt as ``text before the video | merged tokens + newline | text after``: ``inputs_embeds`` (text
    embedded by the model's own ``get_input_embeddings()``), ``input_ids`` (fewer video placeholders) and
    ``attention_mask``. Rows of a batch may keep different counts: they are padded to the longest row on the side the
    caller padded (right padding unless every row ends with a real token and some row starts with padding), with the
    text config's ``pad_token_id`` (else 0) embedded and ``attention_mask = 0``; ``labels`` get ``-100``;
(d) the class ``forward`` is called with ``input_ids=None, inputs_embeds=<shortened>, attention_mask=<shortened>`` and
    no ``pixel_values_videos``, so the model's placeholder-count check is never bypassed (it is simply not needed).

Positions (spec §1.5, §3 R1-R3). **Compact**: the language model receives ``position_ids=None``, i.e. it numbers the
shortened sequence ``0..L'-1`` itself, exactly as it numbers an unmerged sequence (``cache_position`` = ``arange(L')``,
physical), which is the published HoliTom outer-stage behaviour (LLaVA-NeXT rebuilds ``inputs_embeds`` with
``position_ids=None``); it is the default (``positions='compact'``). With right padding each row's real tokens are
therefore contiguous from 0; with left padding the positions include the padding, as in the unmodified model.
Caller-supplied ``position_ids`` are passed through only when no row was shortened, and replaced by ``None`` otherwise.
``positions='original'`` (spec R1 "original", R2) instead passes explicit gapped ``position_ids``: every kept token
gets the position the unmodified model gives its slot (text: its own; a merged token: its representative's
placeholder slot ``s + frame*n + spatial``, a temporally merged static token the segment's first frame; the newline:
the block's last slot), taken from the caller's ``position_ids`` or ``arange(L)``; ``cache_position`` stays physical
(R3), so causality is by physical order. With pure selection (no temporal merge, ``dominant_ratio`` = 0) this equals the
unmodified model with the dropped placeholders masked out of ``attention_mask`` (tested). On the trained tiny model it
is markedly more faithful than compact positions (the report's table). In ``generate`` (R4) the gapped ids are
passed as explicit ``position_ids`` (:func:`~.common.generate_positions`: under HF's own padding-aware positions),
which ``generate`` extends by ``last + 1``: decoding continues right after the full prompt's last position (tested
against the merged forward + cached decode steps at ``L, L+1, ...``).

Logits layout (``logits`` option):

* ``'original'`` (default): the logits are scattered back to the caller's sequence layout ``[B, L, V]``: a text token's
  logits sit at its original index, the merged tokens + newline occupy the first ``m+1`` slots of the row's video
  block, the remaining (dropped) placeholder slots and unmapped padding hold zeros. So callers that read the answer at
  ``attention_mask.sum(1) - 1`` of **their own** mask (``vopt.eval`` does, and it checks ``logits.shape[:2] ==
  input_ids.shape``) work unchanged. Only the full-sequence case is remapped (``logits_to_keep=0``).
* ``'compact'``: the logits of the shortened sequence ``[B, L', V]``; read a row's last real token at
  ``out.attention_mask.sum(1) - 1`` (the **new** mask, returned on the output) for right padding.

Either way the output carries ``out.holitom`` (:class:`HoliTomCallInfo`: new ``input_ids`` / ``attention_mask``, the
map ``index[b, j]`` = the caller's position of new token ``j`` (merged tokens + newline: the first slots of the
video block; ``-1`` for added padding), video tokens before/after per row, per-row :class:`~vopt.merging.MergeResult`)
and, in ``'compact'`` layout,
``out.attention_mask`` (a plain attribute: not part of ``to_tuple()``).

Identity: with ``retain_ratio=1.0`` (or ``token_budget >= F*n``) ``holitom_merge`` returns the tokens unchanged, the
rebuilt ``inputs_embeds`` equal the model's own ``masked_scatter`` result, and the logits equal the unmodified model's.

Attention scores (``scores='attention'``, default; spec §1.1): :func:`video_features_and_scores` runs the vision tower
once with ``output_hidden_states``, builds the features exactly as ``get_video_features`` does (projector, bilinear
pooling, newline) and scores each patch by the attention it receives in the layer that produced the selected
features (recomputed from that layer's ``layer_norm1`` / ``q_proj`` / ``k_proj`` on its input hidden state, averaged
over heads and query patches), pooled to the ``n`` tokens per frame with the same bilinear 2x pooling. ``'proxy'``
uses :func:`vopt.merging.proxy_scores` (feature self-similarity) instead. Measured (256 test clips, baseline 0.930):
the two agree to within 0.01 in most settings; at retain 0.25, tau 1.0, original positions attention scores give
agreement 0.879 / delta -0.059 vs the proxy's 0.836 / -0.098; at retain 0.5 the proxy is ahead by <= 0.02.

``generate``: transformers 5.x's ``generate`` precomputes ``mm_encoder_outputs`` and never hands the forward
``pixel_values_videos``, so the ``forward`` wrapper alone would leave generation unmerged (it passes such calls through
unchanged, as it does decode steps with a filled cache). ``generate`` is therefore shadowed too (same instance-only
mechanism): a call with ``input_ids`` + ``pixel_values_videos`` becomes ``generate(inputs_embeds=<shortened>,
attention_mask=<shortened>, ...)`` (spec §3 Option A; compact positions, physical ``cache_position``), which returns
**only the new tokens**. ``positions='original'`` passes the gapped ``position_ids`` too (above). A
right-padded batch generates after its padding, exactly as the unmodified model does with right padding: use left
padding (or batch 1) for generation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional

import torch

from ...pass_protocol import Match
from ..config import HoliTomConfig
from ..holitom import MergeResult, holitom_merge
from .common import (STATS_ATTR, TOKENS_KWARG, cache_filled, forward_merged, generate_positions, left_padded,
                     pad_token_id, received_attention, record_call, shadow_forward, shadow_generate)
from .inner_llm import forward_signature, token_codes

if TYPE_CHECKING:  # annotations only (the pass module imports this one)
    from vopt.passes.holitom import HoliTomPassConfig


@dataclass
class MergedInputs:
    """Output of :func:`merge_video_inputs`."""

    inputs_embeds: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    index: torch.Tensor
    slot: torch.Tensor  #: [B, L'] caller's slot whose position each token takes (-1: added padding)
    labels: Optional[torch.Tensor]
    tokens_before: List[int]
    tokens_after: List[int]
    merges: List[MergeResult]

    @property
    def shortened(self) -> bool:
        return any(a != b for a, b in zip(self.tokens_before, self.tokens_after))


def supported(model) -> Optional[str]:
    """None when ``model`` is a LLaVA-OneVision generation model this pass can wrap, else the reason."""
    try:
        from transformers import LlavaOnevisionForConditionalGeneration
    except ImportError:  # pragma: no cover
        return "transformers has no LlavaOnevisionForConditionalGeneration"
    if not isinstance(model, LlavaOnevisionForConditionalGeneration):
        return (f"{type(model).__name__} is not a LlavaOnevisionForConditionalGeneration, "
                "Qwen2VLForConditionalGeneration or Idefics3ForConditionalGeneration (the pass rebuilds those models' "
                "video-token splice; other families are not supported yet)")
    cfg = model.config
    if not isinstance(getattr(cfg, "video_token_id", None), int):
        return "the model config has no integer video_token_id"
    if getattr(model.model, "image_newline", None) is None:
        return "the model has no image_newline (the one-token video layout is expected)"
    return None


def video_features_and_scores(model, pixel_values_videos: torch.Tensor, vision_feature_layer=None,
                              vision_feature_select_strategy=None, want_scores: bool = True) -> tuple:
    """``(features [B, F*n + 1, D] (newline last), scores [B, F, n] or None)`` for LLaVA-OneVision videos.

    ``features`` are the model's own (its vision tower, ``multi_modal_projector``, ``apply_pooling`` and
    ``image_newline``: what ``get_video_features`` computes). ``scores`` (spec §1.1): the attention each patch
    receives in the vision layer that produced the selected features, pooled to the ``n`` tokens per frame with the
    model's own bilinear 2x pooling. One vision pass serves both. None (then HoliTom uses its feature-only proxy)
    when not wanted, when several feature layers are selected, or when the selected layer is the embeddings."""
    inner = model.model
    cfg = model.config
    vfl = cfg.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    strategy = cfg.vision_feature_select_strategy if vision_feature_select_strategy is None \
        else vision_feature_select_strategy
    if not (want_scores and isinstance(vfl, int)):
        feats = model.get_video_features(pixel_values_videos, vision_feature_layer=vision_feature_layer,
                                         vision_feature_select_strategy=vision_feature_select_strategy,
                                         return_dict=True).pooler_output
        return feats, None
    B, F = pixel_values_videos.shape[:2]
    flat = pixel_values_videos.reshape(B * F, *pixel_values_videos.shape[2:])
    hs = inner.vision_tower(flat, output_hidden_states=True, return_dict=True).hidden_states
    sel = hs[vfl]
    drop = 1 if strategy == "default" else 0
    feats = inner.apply_pooling(inner.multi_modal_projector(sel[:, drop:]))
    n = feats.shape[1]
    newline = inner.image_newline[None, None, :].expand(B, 1, -1).to(feats.device, feats.dtype)
    feats = torch.cat([feats.reshape(B, F * n, -1), newline], dim=1)
    layer_idx = (len(hs) + vfl if vfl < 0 else vfl) - 1    # the encoder layer whose output is hs[vfl]
    tower = inner.vision_tower
    encoder = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
    layers = getattr(encoder, "layers", None)
    if layers is None or layer_idx < 0 or not hasattr(layers[layer_idx], "self_attn"):
        return feats, None
    with torch.no_grad():
        received = received_attention(layers[layer_idx], hs[layer_idx])[:, drop:]         # [BF, P]
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        grid = received.view(B * F, 1, side, side)
        pooled = torch.nn.functional.interpolate(grid, size=[math.ceil(side / 2)] * 2, mode="bilinear")
    return feats, pooled.reshape(B, F, n)


def merge_video_inputs(model, input_ids: torch.Tensor, pixel_values_videos: torch.Tensor,
                       config: HoliTomConfig, attention_mask: Optional[torch.Tensor] = None,
                       labels: Optional[torch.Tensor] = None, vision_feature_layer=None,
                       vision_feature_select_strategy=None, score_mode: str = "attention") -> MergedInputs:
    """Shortened ``inputs_embeds`` / ``input_ids`` / ``attention_mask`` (module docstring, steps a-c).

    ``model``: a LLaVA-OneVision generation model. Each row must hold exactly one contiguous block of
    ``F*n + 1`` video placeholders (``F`` frames of ``n`` pooled tokens, then the newline)."""
    vid = model.config.video_token_id
    B, L = input_ids.shape
    if pixel_values_videos.dim() != 5 or pixel_values_videos.shape[0] != B:
        raise ValueError(f"holitom: pixel_values_videos must be [B={B}, frames, C, H, W], got "
                         f"{tuple(pixel_values_videos.shape)}")
    F = pixel_values_videos.shape[1]
    feats, scores = video_features_and_scores(model, pixel_values_videos, vision_feature_layer,
                                              vision_feature_select_strategy, want_scores=score_mode == "attention")
    embed = model.get_input_embeddings()
    embeds = embed(input_ids)
    feats = feats.to(embeds.device, embeds.dtype)
    total = feats.shape[1]
    if (total - 1) % F:
        raise ValueError(f"holitom: {total - 1} video tokens are not a multiple of {F} frames")
    n = (total - 1) // F
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    rows_e, rows_i, rows_m, rows_x, rows_l, rows_s = [], [], [], [], [], []
    before, after, merges = [], [], []
    for b in range(B):
        pos = (input_ids[b] == vid).nonzero().reshape(-1)
        if pos.numel() != total:
            raise ValueError(f"holitom: row {b} has {pos.numel()} video placeholders, the video has {total} features "
                             f"({F} frames x {n} + newline)")
        s, e = int(pos[0]), int(pos[-1]) + 1
        if e - s != total:
            raise ValueError(f"holitom: row {b}'s video placeholders are not contiguous")
        mr = holitom_merge(feats[b, :F * n].reshape(F, n, -1), config, None if scores is None else scores[b])
        vis = torch.cat([mr.tokens.to(embeds.dtype), feats[b, F * n:]], 0)
        m = vis.shape[0]
        merges.append(mr)
        before.append(total)
        after.append(m)
        ar = torch.arange(L, device=input_ids.device)
        rows_e.append(torch.cat([embeds[b, :s], vis, embeds[b, e:]], 0))
        rows_i.append(torch.cat([input_ids[b, :s], input_ids.new_full((m,), vid), input_ids[b, e:]]))
        rows_m.append(torch.cat([mask[b, :s], mask.new_ones((m,)), mask[b, e:]]))
        rows_x.append(torch.cat([ar[:s], ar[s:s + m], ar[e:]]))  # merged tokens -> first m slots of the block
        rep_slot = s + mr.positions[:, 0].to(ar.device) * n + mr.positions[:, 1].to(ar.device)  # representative's
        rows_s.append(torch.cat([ar[:s], rep_slot, ar[e - 1:e], ar[e:]]))
        if labels is not None:
            rows_l.append(torch.cat([labels[b, :s], labels.new_full((m,), -100), labels[b, e:]]))
    Lp = max(r.shape[0] for r in rows_e)
    left = attention_mask is not None and left_padded(attention_mask)
    pad_id = pad_token_id(model)
    pad_emb = embed(torch.tensor([pad_id], device=input_ids.device)).to(embeds.dtype)[0]

    def pad(rows, value):
        out = []
        for r in rows:
            k = Lp - r.shape[0]
            if k == 0:
                out.append(r)
                continue
            fill = value.expand(k, -1) if r.dim() == 2 else r.new_full((k,), value)
            out.append(torch.cat([fill, r] if left else [r, fill], 0))
        return torch.stack(out)

    new_mask = pad(rows_m, 0)
    return MergedInputs(pad(rows_e, pad_emb), pad(rows_i, pad_id), new_mask, pad(rows_x, -1), pad(rows_s, -1),
                        pad(rows_l, -100) if labels is not None else None, before, after, merges)


def _wrap_generate(model, cfg: HoliTomPassConfig, match: Match) -> None:
    """Shadow ``generate`` on this instance: a call with ``pixel_values_videos`` and ``input_ids`` is turned into
    ``generate(inputs_embeds=<shortened>, attention_mask=<shortened>)`` (spec §3 Option A). transformers 5.x's own
    ``generate`` never reaches the ``forward`` wrapper with ``pixel_values_videos`` (it precomputes
    ``mm_encoder_outputs``), so without this it would run unmerged."""
    def rewrite(self, kwargs):
        ids, pv = kwargs.get("input_ids"), kwargs.get("pixel_values_videos")
        if cfg.inner_layer is not None and isinstance(ids, torch.Tensor):
            # the codes go to every forward of the generation
            kwargs.setdefault(TOKENS_KWARG, token_codes(ids, kwargs.get("attention_mask"), self.config.video_token_id))
        if (not cfg.outer or pv is None or not isinstance(ids, torch.Tensor) or kwargs.get("inputs_embeds") is not None
                or kwargs.get("pixel_values") is not None or kwargs.get("mm_encoder_outputs") is not None):
            return
        with torch.no_grad():
            mi = merge_video_inputs(self, ids, pv, cfg.merge, kwargs.get("attention_mask"), None,
                                    kwargs.get("vision_feature_layer"), kwargs.get("vision_feature_select_strategy"),
                                    cfg.scores)
        pos = kwargs.pop("position_ids", None)
        if cfg.positions == "original":
            kwargs["position_ids"] = generate_positions(mi, ids, kwargs.get("attention_mask"), pos)
        for k in ("input_ids", "pixel_values_videos", "image_sizes_videos"):
            kwargs.pop(k, None)
        kwargs.update(inputs_embeds=mi.inputs_embeds, attention_mask=mi.attention_mask)
        if cfg.inner_layer is not None:
            kwargs[TOKENS_KWARG] = token_codes(mi.input_ids, mi.attention_mask, self.config.video_token_id)
        record_call(self, getattr(self, STATS_ATTR), mi, match)

    shadow_generate(model, "LLaVA-OneVision", rewrite)


def _wrap_forward(model, cfg: HoliTomPassConfig, match: Match) -> None:
    """Shadow ``forward`` on this instance (module docstring)."""
    def forward(self, cls_forward, kwargs):
        stats = getattr(self, STATS_ATTR)
        ids, pv = kwargs.get("input_ids"), kwargs.get("pixel_values_videos")
        if cfg.inner_layer is not None and isinstance(ids, torch.Tensor):
            kwargs.setdefault(TOKENS_KWARG, token_codes(ids, kwargs.get("attention_mask"), self.config.video_token_id))
        if (not cfg.outer or pv is None or not isinstance(ids, torch.Tensor) or kwargs.get("inputs_embeds") is not None
                or kwargs.get("pixel_values") is not None or kwargs.get("mm_encoder_outputs") is not None
                or cache_filled(kwargs.get("cache", kwargs.get("past_key_values")))):
            stats.passthrough += 1
            return cls_forward(self, **kwargs)
        mi = merge_video_inputs(self, ids, pv, cfg.merge, kwargs.get("attention_mask"), kwargs.get("labels"),
                                kwargs.get("vision_feature_layer"), kwargs.get("vision_feature_select_strategy"),
                                cfg.scores)
        kwargs.pop("pixel_values_videos")
        kwargs.pop("image_sizes_videos", None)
        kwargs.update(input_ids=None, inputs_embeds=mi.inputs_embeds, attention_mask=mi.attention_mask)
        if cfg.inner_layer is not None:
            kwargs[TOKENS_KWARG] = token_codes(mi.input_ids, mi.attention_mask, self.config.video_token_id)
        return forward_merged(self, cls_forward, cfg, kwargs, mi, ids, match, stats)

    shadow_forward(model, "LLaVA-OneVision", forward_signature(type(model).forward, cfg), forward)


def install(model, cfg: HoliTomPassConfig, match: Match) -> None:
    """Shadow ``forward`` and ``generate`` on this LLaVA-OneVision instance (module docstring)."""
    _wrap_forward(model, cfg, match)
    _wrap_generate(model, cfg, match)

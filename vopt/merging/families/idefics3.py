"""Idefics3 (``Idefics3ForConditionalGeneration`` and subclasses; the T2Vid zoo model ``zoo.build("t2vid")``: each
sampled frame is one image without splitting, ``<fake_token_around_image> [<global-img>] <image> x n
<fake_token_around_image>`` per frame, ``n = image_seq_len`` = 169 full size, 4 tiny). Same instance-only
``forward`` / ``generate`` shadowing. **Supported**: the outer stage. A call is rewritten when it carries
``input_ids`` + ``pixel_values`` (``[B, F, C, H, W]``, optional ``pixel_attention_mask``), no ``inputs_embeds`` /
``mm_encoder_outputs`` and an empty cache; anything else (text only, decode steps) passes through unchanged.
:func:`merge_idefics3_inputs`:

(a) the features are the model's own ``model.model.get_image_features(...).pooler_output`` (its padding-image filter
    by value: all-zero images are dropped, so row ``b`` has its ``F_b`` real frames; a stage captured by vopt's
    Idefics3 adapter is used as is), spliced by the model's own ``inputs_merger`` (its placeholder-count check
    included), so before merging the embeddings are bit-identical to the unmodified forward's;
(b) each row's ``F_b`` images are **one video** ``[F_b, n, D]`` (its placeholders must be ``F_b`` contiguous blocks
    of ``n``, one per frame, in order), merged by :func:`vopt.merging.holitom_merge` with the pass's ``merge`` config.
    Scores (``scores='attention'``, default): the attention each patch receives in the last SigLIP layer (whose
    post-layernorm output feeds the connector), grouped per token by the connector's own ``pixel_shuffle`` (mean over
    its 2x2 patches); the last layer's input is recomputed by a separate pass through the tower's ``embeddings`` and
    layers ``0..N-2`` (hooks would not fire on a captured vision stage), about one extra vision pass: ``'proxy'``
    avoids it, and is used automatically when a real frame has padded pixels in ``pixel_attention_mask``;
(c) layout (the choice made for frames-as-images): **every non-image token is kept where it is**: each frame's
    ``<fake_token_around_image>`` pair, ``<global-img>`` / timestamp text between frames, the prompt. Each merged token
    is written into the block of its **representative's frame** (a segment's temporally merged static tokens: the
    segment's first frame, spatial clusters: the centre's frame), in HoliTom's output order (static first, then the
    frame's dynamic tokens; that order is already frame-monotonic), filling the block's first slots; the block's other
    slots are dropped. A frame that keeps no token leaves an empty wrapper pair (2 tokens), so the LM still sees the
    frame boundaries and any per-frame text in order. Rows left shorter are gathered (:func:`~.common.gather_kept`) and
    padded on the caller's side (right when unpadded; ``generate`` pads left unless the caller right-padded) with
    ``pad_token_id``, mask 0, ``labels`` -100 at image tokens;
(d) the class ``forward`` runs with ``input_ids=None, inputs_embeds, attention_mask`` and no ``pixel_values`` /
    ``pixel_attention_mask``; positions **compact** (``position_ids=None``: Llama numbers the shortened sequence, as
    the LLaVA-OV path's default; decode steps through ``forward`` with the returned cache continue at ``L'``).
    ``positions='original'`` passes gapped 1-D ``position_ids`` (text its own, a merged token its representative's
    placeholder slot), in ``forward`` and ``generate``.

Logits: ``'original'`` / ``'compact'`` as above; ``out.holitom`` as above. ``generate`` is shadowed:
``generate(inputs_embeds=<shortened>, attention_mask)``, **only the new tokens** returned; ``positions='original'``
adds the gapped ``position_ids`` (:func:`~.common.generate_positions`; decoding continues at the full prompt's
length). Tested (``tests/test_holitom_idefics3.py``): retain 1.0 bit-identical logits, features equal
``get_image_features`` and scores equal the last layer's received attention, wrappers/text kept in order and each
merged token inside its representative frame's wrapper pair, padded batches (left/right; rows with 8 and 4 frames,
padding images) equal rows alone, a ragged unpadded batch (static frames) equals rows alone in forward and generate,
generate equals manual greedy decoding through the merged forward + cache. Measured on the tiny T2Vid model (8 frames
x 4 tokens, 54-token prompt with 16 wrapper tokens): retain 0.25 keeps 8 of 32 image tokens per row, LLM sequence
54 -> 30; retain 0.5 on 8 identical frames keeps 4 (temporal merging). Full size (169 tokens/frame, 24 frames =
4056 image tokens + 48 wrappers): retain 0.25 -> a budget of 1014 image tokens (not run here).

Inner-LLM stage (``inner_layer=K``; :mod:`.inner_llm`): the ``<image>`` tokens the LM receives (outer-merged or
not; wrappers and text excluded) are scored and merged at layer K of the Llama text model with their original
positions (tested against the unmodified model with the dropped tokens masked out of layers ``>= K``: forward,
cached decode step, left-padded ``generate``; padded outer + inner batches equal rows alone).

**Not supported on Idefics3**: images that are split into tiles
(``do_image_splitting=True``: each tile's ``n``-block would be taken as a frame; T2Vid does not split), several
videos or images mixed with a video in one row (all of a row's images are one video).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional

import torch

from ...pass_protocol import Match
from ..config import HoliTomConfig
from ..holitom import MergeResult, holitom_merge
from .common import (STATS_ATTR, TOKENS_KWARG, cache_filled, forward_merged, gather_kept, generate_positions,
                     left_padded, received_attention, record_call, right_padded, shadow_forward, shadow_generate)
from .inner_llm import forward_signature, token_codes

if TYPE_CHECKING:  # annotations only (the pass module imports this one)
    from vopt.passes.holitom import HoliTomPassConfig


#: Keyword arguments that carry the visual inputs of an Idefics3 call (dropped when the call is rewritten).
_IDEFICS3_VISUAL_KWARGS = ("pixel_values", "pixel_attention_mask")


def is_idefics3(model) -> bool:
    try:
        from transformers import Idefics3ForConditionalGeneration
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, Idefics3ForConditionalGeneration)


def supported(model) -> Optional[str]:
    """None when this Idefics3 model can be wrapped, else the reason."""
    if not isinstance(getattr(model.config, "image_token_id", None), int):
        return "the model config has no integer image_token_id"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("get_image_features", "inputs_merger", "connector",
                                                            "vision_model", "image_seq_len")):
        return "the Idefics3 model has no model.get_image_features / inputs_merger / connector / vision_model"
    return None


@dataclass
class Idefics3Merged:
    """Output of :func:`merge_idefics3_inputs` (module docstring, "Idefics3")."""

    inputs_embeds: torch.Tensor              #: [B, L', D]
    input_ids: torch.Tensor                  #: [B, L'] (fewer <image> placeholders, padded with pad_token_id)
    attention_mask: Optional[torch.Tensor]   #: [B, L']; the caller's (possibly None) when nothing was shortened
    index: torch.Tensor                      #: [B, L'] caller's position of each new token (-1: added padding)
    slot: torch.Tensor                       #: [B, L'] caller's slot whose position each token takes (-1: padding)
    labels: Optional[torch.Tensor]
    tokens_before: List[int]                 #: per row (= video), its F*n image tokens
    tokens_after: List[int]
    merges: List[MergeResult]
    frames: List[int]                        #: per row, real frames (images) after the padding images are dropped
    scores: str                              #: 'attention' or 'proxy': what scored the dynamic tokens

    @property
    def shortened(self) -> bool:
        return any(a != b for a, b in zip(self.tokens_before, self.tokens_after))


def idefics3_features_and_scores(model, pixel_values: torch.Tensor, pixel_attention_mask=None,
                                 want_scores: bool = True) -> tuple:
    """``(features: one [F_b*n, D] per row, scores: one [F_b, n] per row or None)`` for Idefics3 frames.

    ``features`` are exactly the model's own ``get_image_features(...).pooler_output`` (padding images, all-zero,
    dropped by value, so row ``b`` holds its ``F_b`` real frames; a captured/exported vision stage is used as is).
    ``scores`` (spec §1.1): the attention each patch receives in the last SigLIP layer (the one whose output,
    post-layernorm, feeds the connector), averaged over heads and query patches and grouped like the features by the
    connector's own ``pixel_shuffle`` (mean over each token's ``scale_factor^2`` patches). The last layer's input is
    recomputed by a separate pass through the tower's own ``embeddings`` and layers ``0..N-2`` (no hooks: a captured
    vision stage fires none), i.e. about one extra vision pass; ``scores='proxy'`` avoids it. None when not wanted or
    when some real image has padded pixels (``pixel_attention_mask``: masked patches are not handled; proxy scores
    are used then)."""
    inner = model.model
    feats = list(inner.get_image_features(pixel_values, pixel_attention_mask, return_dict=True).pooler_output)
    n = inner.image_seq_len
    vm = inner.vision_model
    layers = getattr(getattr(vm, "encoder", None), "layers", None)
    if (not want_scores or layers is None or not len(layers) or not hasattr(layers[-1], "self_attn")
            or not hasattr(vm, "embeddings")):
        return feats, None
    B, F = pixel_values.shape[:2]
    flat = pixel_values.to(dtype=inner.dtype).reshape(B * F, *pixel_values.shape[2:])
    real = (flat == 0.0).sum(dim=(-1, -2, -3)) != flat.shape[1:].numel()      # the model's padding-image filter
    if pixel_attention_mask is not None and not bool(
            pixel_attention_mask.reshape(B * F, -1)[real.to(pixel_attention_mask.device)].bool().all()):
        return feats, None
    x = flat[real]
    p = model.config.vision_config.patch_size
    with torch.no_grad():
        patch_mask = torch.ones(x.shape[0], x.shape[2] // p, x.shape[3] // p, dtype=torch.bool, device=x.device)
        h = vm.embeddings(pixel_values=x, patch_attention_mask=patch_mask)
        for layer in layers[:-1]:
            h = layer(h, None)
        received = received_attention(layers[-1], h)                                  # [sum F_b, P]
        grouped = inner.connector.pixel_shuffle(received[..., None], inner.connector.scale_factor).mean(-1)
    counts = [f.shape[0] // n for f in feats]
    if sum(counts) != grouped.shape[0] or grouped.shape[1] != n:
        return feats, None
    return feats, list(grouped.split(counts))


def merge_idefics3_inputs(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, config: HoliTomConfig, *,
                          pixel_attention_mask=None, attention_mask: Optional[torch.Tensor] = None,
                          labels: Optional[torch.Tensor] = None, left: Optional[bool] = None,
                          score_mode: str = "attention") -> Idefics3Merged:
    """HoliTom outer merging of an Idefics3 call whose images are one video's frames (module docstring, "Idefics3").

    Row ``b``'s ``F_b`` real images are its frames; its ``<image>`` placeholders must form ``F_b`` contiguous blocks
    of ``n = image_seq_len`` (one per frame, in order). The video ``[F_b, n, D]`` is merged by :func:`holitom_merge`;
    each merged token goes into the block of its representative's frame (a segment's temporally merged static tokens:
    its first frame), in HoliTom's output order, filling that block's first slots; the block's other slots are
    dropped. Every other token (each frame's ``<fake_token_around_image>`` wrapper, ``<global-img>`` text, any text
    between frames, the prompt) is kept unchanged; a frame that keeps no token leaves its wrapper empty. Rows left
    shorter are padded on the ``left`` (None: the side the caller padded; right when unpadded)."""
    img = model.config.image_token_id
    B, L = input_ids.shape
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 5 or pixel_values.shape[0] != B:
        raise ValueError(f"holitom: pixel_values must be [B={B}, frames, C, H, W], got "
                         f"{tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else pixel_values!r}")
    inner = model.model
    n = inner.image_seq_len
    feats, scores = idefics3_features_and_scores(model, pixel_values, pixel_attention_mask, score_mode == "attention")
    embeds = inner.get_input_embeddings()(input_ids).to(inner.device)
    # the unmodified forward's splice (its own placeholder-count check included): bit-identical starting point
    merged = inner.inputs_merger(input_ids=input_ids, inputs_embeds=embeds,
                                 image_hidden_states=torch.cat(feats, 0).to(dtype=inner.dtype, device=embeds.device))
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    is_img = input_ids == img
    keep = ~is_img
    new_emb = merged.clone()
    ar = torch.arange(L, device=input_ids.device)
    slot = ar.expand(B, L).clone()
    before, after, merges, frames = [], [], [], []
    for b in range(B):
        F = feats[b].shape[0] // n
        slots_b = is_img[b].nonzero().reshape(-1)
        if slots_b.numel() != F * n or feats[b].shape[0] != F * n:
            raise ValueError(f"holitom: row {b} has {slots_b.numel()} <image> placeholders and {F} real frames of "
                             f"{n} tokens ({feats[b].shape[0]} features)")
        if F == 0:
            before.append(0)
            after.append(0)
            frames.append(0)
            continue
        blocks = slots_b.view(F, n)
        if not bool((blocks[:, -1] - blocks[:, 0] == n - 1).all()):
            raise ValueError(f"holitom: row {b}'s <image> placeholders are not {F} contiguous blocks of {n} "
                             "(one per frame)")
        vfeat = merged[b, slots_b].reshape(F, n, -1)
        mr = holitom_merge(vfeat, config, None if scores is None else scores[b])
        fr = mr.positions[:, 0].to(ar.device)
        order = torch.sort(fr, stable=True).indices   # HoliTom order is already frame-monotonic; kept stable
        fr = fr[order]
        m = fr.numel()
        cnt = torch.bincount(fr, minlength=F)
        start = torch.cumsum(cnt, 0) - cnt
        rank = torch.arange(m, device=ar.device) - start[fr]
        dest = blocks[fr, rank]
        new_emb[b, dest] = mr.tokens[order.to(mr.tokens.device)].to(new_emb.device, new_emb.dtype)
        slot[b, dest] = blocks[fr, mr.positions[order.to(mr.positions.device), 1].to(ar.device)]
        keep[b, dest] = True
        before.append(F * n)
        after.append(m)
        merges.append(mr)
        frames.append(F)
    if left is None:
        left = attention_mask is not None and left_padded(attention_mask)
    idx, out_emb, out_ids, out_mask = gather_kept(model, keep, left, new_emb, input_ids, mask)
    fill, g = idx < 0, idx.clamp(min=0)
    out_slot = slot.gather(1, g).masked_fill(fill, -1)
    out_labels = None
    if labels is not None:
        out_labels = labels.gather(1, g).masked_fill(fill | (out_ids == img), -100)
    shortened = bool((~keep).any())
    return Idefics3Merged(out_emb, out_ids, out_mask if (shortened or attention_mask is not None) else None, idx,
                          out_slot, out_labels, before, after, merges, frames,
                          "attention" if scores is not None else "proxy")


def _idefics3_mergeable(kwargs: dict) -> bool:
    """A prefill this pass rewrites: ``input_ids`` + ``pixel_values``, no embeddings / encoder outputs, no cache."""
    return (isinstance(kwargs.get("input_ids"), torch.Tensor) and isinstance(kwargs.get("pixel_values"), torch.Tensor)
            and kwargs.get("inputs_embeds") is None and kwargs.get("mm_encoder_outputs") is None
            and not cache_filled(kwargs.get("cache", kwargs.get("past_key_values"))))


def _idefics3_merge_call(model, cfg: HoliTomPassConfig, kwargs: dict, labels=None, left=None) -> Idefics3Merged:
    return merge_idefics3_inputs(model, kwargs["input_ids"], kwargs["pixel_values"], cfg.merge,
                                 pixel_attention_mask=kwargs.get("pixel_attention_mask"),
                                 attention_mask=kwargs.get("attention_mask"), labels=labels, left=left,
                                 score_mode=cfg.scores)


def _merges(cfg: HoliTomPassConfig, kwargs: dict) -> bool:
    """Whether the outer stage rewrites this call."""
    return cfg.outer and _idefics3_mergeable(kwargs)


def _inner_codes(model, cfg: HoliTomPassConfig, kwargs: dict, mi: Optional[Idefics3Merged] = None) -> None:
    """With the inner stage on, add the decoder layers' token codes (``<image>`` tokens 1, frame wrappers and text 0,
    padding -1) over the shortened sequence ``mi`` when the outer stage merged, else over the caller's
    ``input_ids`` (kept when the caller already passed codes). Decode steps ignore them."""
    if cfg.inner_layer is None:
        return
    img = model.config.image_token_id
    if mi is not None:
        kwargs[TOKENS_KWARG] = token_codes(mi.input_ids, mi.attention_mask, img)
    elif isinstance(kwargs.get("input_ids"), torch.Tensor):
        kwargs.setdefault(TOKENS_KWARG, token_codes(kwargs["input_ids"], kwargs.get("attention_mask"), img))


def _wrap_forward_idefics3(model, cfg: HoliTomPassConfig, match: Match) -> None:
    """Shadow ``forward`` on this Idefics3 instance (module docstring, "Idefics3")."""
    def forward(self, cls_forward, kwargs):
        stats = getattr(self, STATS_ATTR)
        mi = _idefics3_merge_call(self, cfg, kwargs, kwargs.get("labels")) if _merges(cfg, kwargs) else None
        if mi is None or not sum(mi.tokens_before):   # not a merged prefill, or only padding images
            stats.passthrough += 1
            _inner_codes(self, cfg, kwargs)
            return cls_forward(self, **kwargs)
        ids = kwargs["input_ids"]
        _inner_codes(self, cfg, kwargs, mi)
        for k in _IDEFICS3_VISUAL_KWARGS:
            kwargs.pop(k, None)
        kwargs.update(input_ids=None, inputs_embeds=mi.inputs_embeds, attention_mask=mi.attention_mask)
        return forward_merged(self, cls_forward, cfg, kwargs, mi, ids, match, stats)

    shadow_forward(model, "Idefics3", forward_signature(type(model).forward, cfg), forward)


def _wrap_generate_idefics3(model, cfg: HoliTomPassConfig, match: Match) -> None:
    """Shadow ``generate`` on this Idefics3 instance: a call with ``input_ids`` + ``pixel_values`` becomes
    ``generate(inputs_embeds=<shortened>, attention_mask=<shortened>)`` (compact positions; returns only the new
    tokens). Rows left shorter are padded on the left unless the caller right-padded."""
    def rewrite(self, kwargs):
        if not _merges(cfg, kwargs):
            _inner_codes(self, cfg, kwargs)
            return
        right = right_padded(kwargs.get("attention_mask"))
        with torch.no_grad():
            mi = _idefics3_merge_call(self, cfg, kwargs, left=not right)
        if not sum(mi.tokens_before):   # only padding images: nothing to merge
            _inner_codes(self, cfg, kwargs)
            return
        pos = kwargs.pop("position_ids", None)
        if cfg.positions == "original":
            kwargs["position_ids"] = generate_positions(mi, kwargs["input_ids"], kwargs.get("attention_mask"), pos)
        for k in _IDEFICS3_VISUAL_KWARGS + ("input_ids",):
            kwargs.pop(k, None)
        mask = mi.attention_mask if mi.attention_mask is not None else torch.ones_like(mi.input_ids)
        kwargs.update(inputs_embeds=mi.inputs_embeds, attention_mask=mask)
        _inner_codes(self, cfg, kwargs, mi)
        record_call(self, getattr(self, STATS_ATTR), mi, match)

    shadow_generate(model, "Idefics3", rewrite)


def install(model, cfg: HoliTomPassConfig, match: Match) -> None:
    """Shadow ``forward`` and ``generate`` on this Idefics3 instance (module docstring)."""
    _wrap_forward_idefics3(model, cfg, match)
    _wrap_generate_idefics3(model, cfg, match)

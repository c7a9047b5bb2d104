"""Qwen2-VL (``Qwen2VLForConditionalGeneration`` and subclasses; the GPT4Scene zoo model; spec §3 "Qwen2-VL M-RoPE",
R2-R4). Same instance-only ``forward`` / ``generate`` shadowing. **Supported**: the outer stage. A call is rewritten
when it carries ``input_ids`` + ``pixel_values_videos`` + ``video_grid_thw`` + ``mm_token_type_ids`` (optionally the
image ``pixel_values`` + ``image_grid_thw``), no ``inputs_embeds`` / ``mm_encoder_outputs`` and an empty cache;
anything else (no video, decode steps, ``mm_token_type_ids`` missing: the model itself then raises) passes through
unchanged. :func:`merge_qwen2vl_inputs`:

(a) ``inputs_embeds`` are the model's own (``get_input_embeddings``, ``get_image_features`` /
    ``get_video_features`` scattered with ``masked_scatter`` after the model's placeholder-count check), and the 3-D
    positions are the model's own ``model.get_rope_index`` on the **full** input with the caller's ``attention_mask``
    (a caller's ``position_ids [3|4, B, L]`` are used instead);
(b) each video (``video_grid_thw`` order) is ``t`` frames (the temporal grid) x ``n = h*w/4`` tokens (after the 2x2
    merger), merged by :func:`vopt.merging.holitom_merge`. Scores (``scores='attention'``, default; spec §1.1): the
    attention each patch receives in the varlen ViT's **last block** (full attention within each temporal grid frame,
    2-D rotary q / k), averaged over heads and its frame's query patches, grouped per token like the PatchMerger
    groups patches (mean over each token's ``spatial_merge_size^2`` patches), computed from that block's own
    ``norm1`` / ``attn.qkv`` / rotary on its input, taken by a forward pre-hook during the one
    ``get_video_features`` call (:func:`qwen2vl_video_features_and_scores`; the adapter runs this tower eagerly, a
    captured tower falls back to a second partial pass); ``'proxy'``: feature self-similarity, no extra work. The
    ``m`` merged tokens fill the first ``m`` placeholder slots of the video, each with its
    representative's ``(t, h, w)`` (R2: temporal merge -> first frame of the segment, cluster -> centre); the other
    slots are dropped. **Untouched**: image tokens (GPT4Scene's BEV map is the image: never merged, never a temporal
    neighbour), text (object-ID marker text included), vision start/end ids, and video placeholders marked in the
    optional call keyword ``vopt_holitom_protect`` (``[B, L]`` bool, e.g. the patches carrying object-ID markers): those
    are taken out of every merged token (:func:`_exclude_protected`: other sources renormalized) and kept as themselves
    at their own position, on top of the budget;
(c) the kept tokens are gathered per row in order (one sort per row, no per-token loop): embeddings, ids, mask, token
    types, labels (``-100`` at video tokens) and **positions ``[3, B, L']``** (gapped: text keeps its ids, so the
    last text token keeps the unmodified model's position). Rows left shorter are padded on the caller's padding side
    (right when unpadded; ``generate`` pads left unless the caller right-padded), pad id / type 0 / mask 0 /
    position 0 (what ``get_rope_index`` gives padding);
(d) the class ``forward`` runs with ``input_ids=None, inputs_embeds, attention_mask, position_ids`` (no visual inputs,
    so the placeholder-count check is not needed) and the wrapper sets ``model.model.rope_deltas = max kept position
    + 1 - real tokens of the row`` (R4; ``= max_kept + 1 - L'`` for unpadded rows; HF's own convention), so a later
    decode step through ``forward`` (cache filled, ``attention_mask=None``, as transformers' own Qwen2-VL decode path
    requires) gets position ``cache length + delta = max kept + 1`` in all three rows.

Logits: ``logits='original'`` / ``'compact'`` as above; ``out.holitom`` also carries ``position_ids`` and
``rope_deltas``. ``generate`` is shadowed: ``generate(inputs_embeds=<shortened>, attention_mask, position_ids=<kept
3-D positions>)``; transformers 5.x accepts explicit ``position_ids`` and extends them by ``last + 1`` per step, which
equals ``max_kept + 1`` whenever the prompt ends with text (every chat template; a prompt ending inside a video block
would continue from the last video token's position, as the unmodified model's generate does). It returns **only the
new tokens** (inputs_embeds generation). Use left padding for batched generation (a right-padded caller batch
continues after its padding, as in the unmodified model). Tested (``tests/test_holitom_qwen2vl.py``): retain 1.0 is
bit-identical, kept positions equal ``get_rope_index``'s at the representatives' slots, a decode step runs at
``max_kept + 1`` and equals an uncached manual pass, padded/ragged batches equal rows alone (forward and generate),
generate equals manual greedy decoding through ``rope_deltas``. Measured on the tiny GPT4Scene model (8 frames x 6 +
9 BEV tokens, 67-token prompt): retain 0.25 keeps 12 of 48 video tokens per clip, LLM sequence 67 -> 31.
Inner-LLM stage (``inner_layer=K``; :mod:`.inner_llm`): the video tokens the LM receives (outer-merged or not; the
BEV image and ``vopt_holitom_protect``-ed patches excluded) are scored and merged at layer K with their gathered
M-RoPE tables; decode continues at ``cache length + rope_deltas`` (tested against the unmodified model with the
dropped tokens masked out of layers ``>= K``: forward, cached decode step, left-padded ``generate``).
**Not supported on Qwen2-VL**: ``positions='compact'`` (ignored: positions are always the model's own 3-D ones,
gathered), merging images as frames (GPT4Scene's original feeds the frames as separate images:
image tokens are never merged), Qwen2.5-VL (a different class: skipped), video-less calls (nothing to merge).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional

import torch

from ...pass_protocol import Match
from ..config import HoliTomConfig
from ..holitom import MergeResult, holitom_merge
from .common import (STATS_ATTR, TOKENS_KWARG, HoliTomCallInfo, cache_filled, gather_kept, left_padded, record_call,
                     restore_logits, right_padded, shadow_forward, shadow_generate)
from .inner_llm import forward_signature, token_codes

if TYPE_CHECKING:  # annotations only (the pass module imports this one)
    from vopt.passes.holitom import HoliTomPassConfig


def is_qwen2vl(model) -> bool:
    try:
        from transformers import Qwen2VLForConditionalGeneration
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, Qwen2VLForConditionalGeneration)


#: Keyword arguments that carry the visual inputs of a Qwen2-VL call (dropped when the call is rewritten).
_QWEN2VL_VISUAL_KWARGS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw",
                          "mm_token_type_ids", "second_per_grid_ts")


def supported(model) -> Optional[str]:
    """None when this Qwen2-VL model can be wrapped, else the reason."""
    cfg = model.config
    for name in ("video_token_id", "image_token_id"):
        if not isinstance(getattr(cfg, name, None), int):
            return f"the model config has no integer {name}"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("get_rope_index", "get_video_features", "visual")):
        return "the Qwen2-VL model has no model.get_rope_index / get_video_features / visual"
    return None


@dataclass
class Qwen2VLMerged:
    """Output of :func:`merge_qwen2vl_inputs` (module docstring, "Qwen2-VL")."""

    inputs_embeds: torch.Tensor              #: [B, L', D]
    input_ids: torch.Tensor                  #: [B, L'] (fewer video placeholders, padded with pad_token_id)
    attention_mask: Optional[torch.Tensor]   #: [B, L']; the caller's (possibly None) when nothing was shortened
    position_ids: torch.Tensor               #: [3, B, L'] M-RoPE positions of the kept tokens
    rope_deltas: torch.Tensor                #: [B, 1] max kept position + 1 - real tokens of the row
    index: torch.Tensor                      #: [B, L'] caller's position of each new token (-1: added padding)
    mm_token_type_ids: torch.Tensor          #: [B, L']
    labels: Optional[torch.Tensor]
    tokens_before: List[int]                 #: per video, its t*h*w/4 tokens
    tokens_after: List[int]
    merges: List[MergeResult]

    @property
    def shortened(self) -> bool:
        return any(a != b for a, b in zip(self.tokens_before, self.tokens_after))


def qwen2vl_embeds_and_positions(model, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                                 pixel_values=None, image_grid_thw=None, video_features=None,
                                 video_grid_thw=None, attention_mask=None, position_ids=None) -> tuple:
    """``(inputs_embeds [B, L, D], position_ids [3, B, L])`` exactly as the unmodified ``Qwen2VLModel.forward``
    builds them: the model's own ``get_input_embeddings``, ``get_image_features`` and the given ``video_features``
    (one ``[t*h*w/4, D]`` per video: the model's own ``get_video_features`` output) scattered with ``masked_scatter``
    after its own placeholder-count check, and its own ``get_rope_index`` on the FULL input with the caller's
    ``attention_mask`` (a caller's ``position_ids [3 or 4, B, L]`` are used instead; a leading text row is
    dropped)."""
    inner = model.model
    embeds = model.get_input_embeddings()(input_ids)
    if pixel_values is not None:
        img = torch.cat(inner.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output)
        img = img.to(embeds.device, embeds.dtype)
        img_mask, _ = inner.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=img)
        embeds = embeds.masked_scatter(img_mask, img)
    if video_features is not None:
        flat = torch.cat(video_features).to(embeds.device, embeds.dtype)
        _, vid_mask = inner.get_placeholder_mask(input_ids, inputs_embeds=embeds, video_features=flat)
        embeds = embeds.masked_scatter(vid_mask, flat)
    B, L = input_ids.shape
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 3 and position_ids.shape[-1] == L:
        pos = position_ids[-3:].expand(3, B, L)
    else:
        pos, _ = inner.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
                                      video_grid_thw=video_grid_thw, attention_mask=attention_mask)
    return embeds, pos


def qwen2vl_attention_scores_supported(model) -> Optional[str]:
    """None when :func:`qwen2vl_video_features_and_scores` can compute vision attention scores for this model (its
    tower has ``blocks[-1]`` with ``norm1`` / ``attn.qkv``, the model's own ``apply_rotary_pos_emb_vision`` is
    importable), else the reason (proxy scores are used then)."""
    vis = getattr(getattr(model, "model", None), "visual", None)
    blocks = getattr(vis, "blocks", None)
    if blocks is None or not len(blocks):
        return "the vision tower has no blocks"
    last = blocks[-1]
    if not (hasattr(last, "norm1") and hasattr(getattr(last, "attn", None), "qkv")):
        return "the last vision block has no norm1 / attn.qkv"
    if _vision_rotary() is None:
        return "transformers' qwen2_vl apply_rotary_pos_emb_vision is not importable"
    return None


def _vision_rotary():
    try:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
    except ImportError:  # pragma: no cover
        return None
    return apply_rotary_pos_emb_vision


def _plain(x) -> bool:
    """A real (eager) tensor, not a fake / functional one seen while ``torch.export`` traced the tower."""
    return type(x) is torch.Tensor


def _last_block_inputs_eager(visual, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor) -> tuple:
    """``(hidden_states [P, E], cu_seqlens, (cos, sin))`` that the tower's last block receives, recomputed through the
    tower's own ``patch_embed``, ``rotary_pos_emb`` and blocks ``0..N-2`` (with transformers' own
    ``get_vision_position_ids`` / ``get_vision_attention_seqlens``): the fallback when the forward pre-hook on the last
    block did not fire with real tensors (a captured, exported tower runs no hooks), about one extra vision pass."""
    from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

    x = visual.patch_embed(pixel_values_videos.type(visual.dtype))
    pos = get_vision_position_ids(video_grid_thw, visual.spatial_merge_size)
    cu, max_len = get_vision_attention_seqlens(video_grid_thw, visual.config)
    pe = visual.rotary_pos_emb(x, pos)
    for blk in visual.blocks[:-1]:
        x = blk(x, cu_seqlens=cu, max_seqlen=max_len, position_embeddings=pe)
    return x, cu, pe


def _received_attention_varlen(block, x: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings: tuple,
                               max_bytes: int = 1 << 28) -> torch.Tensor:
    """``[P]``: the attention each patch receives in Qwen2-VL vision ``block`` (input ``x [P, E]``, varlen: full
    attention within each ``cu_seqlens`` segment, i.e. each temporal grid frame), the softmax probabilities
    ``softmax(q k^T * scaling)`` (fp32) averaged over heads and over the query patches of its own segment. q / k come
    from the block's own ``norm1`` and ``attn.qkv``, rotated by transformers' ``apply_rotary_pos_emb_vision`` with the
    block's ``(cos, sin)``, as the block's attention does. Equal-length consecutive segments are processed a few at a
    time (``[c, H, S, S]`` fp32 probabilities kept under ``max_bytes``, at least one segment), never all at once."""
    rotary = _vision_rotary()
    attn = block.attn
    H = attn.num_heads
    cos, sin = position_embeddings
    bounds = cu_seqlens.tolist()
    lens = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    out = []
    i = 0
    while i < len(lens):
        S = lens[i]
        c = max(1, min(max_bytes // max(1, H * S * S * 4), len(lens) - i))
        j = i + 1
        while j < len(lens) and j - i < c and lens[j] == S:
            j += 1
        lo, hi = bounds[i], bounds[j]
        if S == 0:
            i = j
            continue
        P = hi - lo
        qkv = attn.qkv(block.norm1(x[lo:hi])).reshape(P, 3, H, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rotary(qkv[0], qkv[1], cos[lo:hi], sin[lo:hi])                       # [P, H, hd] each
        q = q.reshape(j - i, S, H, -1).transpose(1, 2).float()                     # [c, H, S, hd]
        k = k.reshape(j - i, S, H, -1).transpose(1, 2).float()
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scaling, dim=-1)   # [c, H, S, S]
        out.append(probs.mean(dim=(1, 2)).reshape(-1))
        i = j
    return torch.cat(out) if out else x.new_zeros(0, dtype=torch.float32)


def qwen2vl_video_features_and_scores(model, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor,
                                      want_scores: bool = True) -> tuple:
    """``(features: one [t*n, D] per video, scores: one [t, n] per video or None)`` for a Qwen2-VL call's videos
    (``n = h*w / spatial_merge_size^2`` tokens per temporal grid frame, ``video_grid_thw`` order).

    ``features`` are exactly the model's own ``model.model.get_video_features(...).pooler_output`` (that very call).
    ``scores`` (spec §1.1): the attention each patch receives in the tower's LAST block (whose output the PatchMerger
    turns into the features), i.e. ``softmax(q k^T * scaling)`` of that block's attention (varlen: full attention
    within each temporal grid frame, the 2-D rotary applied to q / k), averaged over heads and over the query
    patches of its frame (:func:`_received_attention_varlen`, a few frames at a time), then grouped to tokens like
    the PatchMerger groups patches: the tower's patch order is block-major, so each token is
    ``spatial_merge_size^2`` consecutive patches, whose scores are averaged. One vision pass: the last block's input
    hidden states, ``cu_seqlens`` and rotary ``(cos, sin)`` are taken by a forward pre-hook on that block during the
    ``get_video_features`` call (vopt's adapter does not export the varlen Qwen2-VL tower: it runs eagerly, so the
    hook fires); if the hook did not see real tensors (a captured tower that exported runs no hooks), the last
    block's input is recomputed by :func:`_last_block_inputs_eager` (a second partial vision pass). Scores are
    computed without autograd. None when not wanted or :func:`qwen2vl_attention_scores_supported` gives a reason."""
    inner = model.model
    if not want_scores or qwen2vl_attention_scores_supported(model) is not None:
        return list(inner.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True).pooler_output), None
    visual = inner.visual
    last = visual.blocks[-1]
    seen: dict = {}

    def grab(module, args, kwargs):
        hs = args[0] if args else kwargs.get("hidden_states")
        seen.update(hs=hs, cu=kwargs.get("cu_seqlens"), pe=kwargs.get("position_embeddings"))

    handle = last.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        feats = list(inner.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True).pooler_output)
    finally:
        handle.remove()
    total = int(video_grid_thw.prod(-1).sum())
    hs, cu, pe = seen.get("hs"), seen.get("cu"), seen.get("pe")
    with torch.no_grad():
        if not (_plain(hs) and hs.shape[0] == total and _plain(cu) and isinstance(pe, (tuple, list))
                and len(pe) == 2 and all(_plain(p) and p.shape[0] == total for p in pe)):
            hs, cu, pe = _last_block_inputs_eager(visual, pixel_values_videos, video_grid_thw)
        received = _received_attention_varlen(last, hs.detach(), cu, tuple(pe))            # [total patches]
    sms2 = visual.spatial_merge_size ** 2
    scores = []
    o = 0
    for t, h, w in video_grid_thw.tolist():
        scores.append(received[o:o + t * h * w].reshape(t, (h * w) // sms2, sms2).mean(-1))
        o += t * h * w
    return feats, scores


def merge_qwen2vl_inputs(model, input_ids: torch.Tensor, config: HoliTomConfig, *, mm_token_type_ids: torch.Tensor,
                         pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor, pixel_values=None,
                         image_grid_thw=None, attention_mask: Optional[torch.Tensor] = None, position_ids=None,
                         labels: Optional[torch.Tensor] = None, left: Optional[bool] = None,
                         protect: Optional[torch.Tensor] = None, score_mode: str = "attention") -> Qwen2VLMerged:
    """HoliTom outer merging of a Qwen2-VL call's videos (module docstring, "Qwen2-VL").

    Each video (in ``video_grid_thw`` order, i.e. row by row as ``get_rope_index`` consumes them) is
    ``t`` frames (the temporal grid) x ``n = h*w/4`` tokens (after the 2x2 merger); :func:`holitom_merge` reduces it
    to ``m`` tokens (dynamic tokens scored by ``score_mode``: ``'attention'``, the attention each token's patches
    receive in the last vision block, :func:`qwen2vl_video_features_and_scores`; ``'proxy'``: feature
    self-similarity), written into the first ``m`` of its placeholder slots with their
    representative's 3-D position (spec R2); its other slots are dropped. Image tokens (GPT4Scene's BEV map), text
    (object-ID marker text included) and the vision start/end ids are never touched; video placeholders where
    ``protect [B, L]`` is True (e.g. the patches that carry GPT4Scene's object-ID markers) are never merged
    (:func:`_exclude_protected`). The kept tokens are gathered per row (:func:`~.common.gather_kept`) with their
    embeddings, ids, mask, token types and 3-D positions; rows left shorter are padded on the ``left`` (None: the side
    the caller padded, right when unpadded)."""
    vid = model.config.video_token_id
    B, L = input_ids.shape
    if protect is not None and (not isinstance(protect, torch.Tensor) or tuple(protect.shape) != (B, L)):
        raise ValueError(f"holitom: {PROTECT_KWARG} must be a [B={B}, L={L}] bool tensor over input_ids, got "
                         f"{tuple(protect.shape) if isinstance(protect, torch.Tensor) else type(protect).__name__}")
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    # the video features (the model's own get_video_features) and their scores from one vision pass
    vids, scores = qwen2vl_video_features_and_scores(model, pixel_values_videos, video_grid_thw,
                                                     score_mode == "attention")
    embeds, pos = qwen2vl_embeds_and_positions(
        model, input_ids, mm_token_type_ids, pixel_values, image_grid_thw, vids, video_grid_thw,
        attention_mask, position_ids)
    is_vid = (input_ids == vid) & (mask != 0)
    keep = torch.ones(B, L, dtype=torch.bool, device=input_ids.device)
    new_emb, new_pos = embeds.clone(), pos.clone()
    grids = video_grid_thw.tolist()
    sms = model.config.vision_config.spatial_merge_size
    before, after, merges = [], [], []
    v = 0
    for b in range(B):
        slots_b = is_vid[b].nonzero().reshape(-1)
        o = 0
        while o < slots_b.numel():
            if v >= len(grids):
                raise ValueError(f"holitom: row {b} has more video placeholders than video_grid_thw describes")
            t, h, w = grids[v]
            n = (h // sms) * (w // sms)
            feats = vids[v].to(embeds.device, embeds.dtype)
            slots = slots_b[o:o + t * n]
            if slots.numel() != t * n or feats.shape[0] != t * n:
                raise ValueError(f"holitom: video {v} (row {b}) has {slots.numel()} placeholders and "
                                 f"{feats.shape[0]} features, expected {t}x{n}")
            mr = holitom_merge(feats.reshape(t, n, -1), config, None if scores is None else scores[v])
            toks, rep_flat = mr.tokens, mr.positions[:, 0] * n + mr.positions[:, 1]
            if protect is not None and bool(protect[b, slots].any()):
                toks, rep_flat = _exclude_protected(mr, feats, protect[b, slots].to(feats.device).bool(), n)
            m = toks.shape[0]
            rep = slots[rep_flat.to(slots.device)]
            new_emb[b, slots[:m]] = toks.to(new_emb.dtype)
            new_pos[:, b, slots[:m]] = pos[:, b, rep]
            keep[b, slots[m:]] = False
            before.append(t * n)
            after.append(m)
            merges.append(mr)
            o += t * n
            v += 1
    if v != len(grids):
        raise ValueError(f"holitom: video_grid_thw describes {len(grids)} videos, the rows hold {v}")
    if left is None:
        left = attention_mask is not None and left_padded(attention_mask)
    idx, out_emb, out_ids, out_mask = gather_kept(model, keep, left, new_emb, input_ids, mask)
    fill, g = idx < 0, idx.clamp(min=0)
    out_types = mm_token_type_ids.gather(1, g).masked_fill(fill, 0)
    out_pos = new_pos.gather(2, g[None].expand(3, *g.shape)).masked_fill(fill[None], 0)
    out_labels = None
    if labels is not None:
        out_labels = labels.gather(1, g).masked_fill(fill | (out_ids == vid), -100)
    real = out_mask != 0
    deltas = (out_pos.masked_fill(~real[None], -1).amax(dim=(0, 2)) + 1 - real.sum(1))[:, None]
    shortened = bool((~keep).any())
    return Qwen2VLMerged(out_emb, out_ids, out_mask if (shortened or attention_mask is not None) else None, out_pos,
                         deltas, idx, out_types, out_labels, before, after, merges)


def _exclude_protected(mr: MergeResult, feats: torch.Tensor, prot: torch.Tensor, n: int) -> tuple:
    """``(tokens [M', D], representative flat index t*n + s [M'])``: ``mr`` with the protected inputs ``prot [t*n]``
    taken out of every merged token (its other sources' weights renormalized; a token made only of protected inputs
    is dropped; a protected representative is replaced by the token's heaviest remaining source, first on ties),
    followed by the protected tokens themselves, unchanged, in raster order (they come on top of the budget)."""
    M = mr.tokens.shape[0]
    owner, src, w0 = mr.source_owner, mr.source_index, mr.source_weight
    hit = prot[src]
    touched = torch.zeros(M, dtype=torch.bool, device=owner.device).index_fill_(0, owner[hit], True)
    w = w0.masked_fill(hit, 0)
    tot = torch.zeros(M, dtype=w.dtype, device=w.device).index_add_(0, owner, w)
    flat = feats.reshape(-1, feats.shape[-1])
    recon = torch.zeros(M, flat.shape[-1], dtype=w.dtype, device=w.device).index_add_(
        0, owner, w[:, None] * flat[src].to(w.dtype)) / tot.clamp_min(torch.finfo(w.dtype).tiny)[:, None]
    tokens = torch.where(touched[:, None], recon.to(mr.tokens.dtype), mr.tokens)
    rep = mr.positions[:, 0] * n + mr.positions[:, 1]
    wm = w0.masked_fill(hit, -1)
    best = torch.full((M,), -1, dtype=w.dtype, device=w.device).scatter_reduce(0, owner, wm, "amax")
    cand = (wm == best[owner]) & ~hit
    first = torch.full((M,), flat.shape[0], dtype=torch.long, device=owner.device).scatter_reduce(
        0, owner[cand], src[cand], "amin")
    rep = torch.where(prot[rep], first, rep)
    alive = tot > 0
    keep_idx = prot.nonzero().reshape(-1)
    return torch.cat([tokens[alive], flat[keep_idx].to(tokens.dtype)]), torch.cat([rep[alive], keep_idx])


def _qwen2vl_mergeable(kwargs: dict) -> bool:
    """A prefill this pass rewrites: ``input_ids`` + videos (+ grids, token types), no embeddings, no cache."""
    ids = kwargs.get("input_ids")
    return (isinstance(ids, torch.Tensor) and kwargs.get("pixel_values_videos") is not None
            and kwargs.get("video_grid_thw") is not None and kwargs.get("mm_token_type_ids") is not None
            and kwargs.get("inputs_embeds") is None and kwargs.get("mm_encoder_outputs") is None
            and not cache_filled(kwargs.get("cache", kwargs.get("past_key_values"))))


#: Optional keyword of a Qwen2-VL call: ``[B, L]`` bool over ``input_ids``, True at video placeholders that must
#: never be merged (GPT4Scene's object-ID marker patches); popped before the model sees the call.
PROTECT_KWARG = "vopt_holitom_protect"


def _qwen2vl_merge_call(model, cfg: HoliTomPassConfig, kwargs: dict, labels=None, left=None) -> Qwen2VLMerged:
    return merge_qwen2vl_inputs(
        model, kwargs["input_ids"], cfg.merge, mm_token_type_ids=kwargs["mm_token_type_ids"],
        pixel_values_videos=kwargs["pixel_values_videos"], video_grid_thw=kwargs["video_grid_thw"],
        pixel_values=kwargs.get("pixel_values"), image_grid_thw=kwargs.get("image_grid_thw"),
        attention_mask=kwargs.get("attention_mask"), position_ids=kwargs.get("position_ids"), labels=labels, left=left,
        protect=kwargs.get(PROTECT_KWARG), score_mode=cfg.scores)


def _inner_codes(model, cfg: HoliTomPassConfig, kwargs: dict, mi: Optional[Qwen2VLMerged] = None) -> None:
    """Pop ``vopt_holitom_protect`` from the call and, with the inner stage on, add the decoder layers' token codes:
    video placeholders 1 unless protected (the BEV image, text and protected patches 0, padding -1), over the
    shortened sequence ``mi`` when the outer stage merged, else over the caller's ``input_ids`` (kept when the caller
    already passed codes). Decode steps ignore them."""
    protect = kwargs.pop(PROTECT_KWARG, None)
    if cfg.inner_layer is None:
        return
    vid = model.config.video_token_id
    if mi is not None:
        if protect is not None:   # the caller's flags, moved to the kept tokens' new places
            protect = protect.gather(1, mi.index.clamp(min=0)) & (mi.index >= 0)
        mask = mi.attention_mask
        kwargs[TOKENS_KWARG] = token_codes(mi.input_ids, mask, vid, protect)
    elif isinstance(kwargs.get("input_ids"), torch.Tensor):
        kwargs.setdefault(TOKENS_KWARG, token_codes(kwargs["input_ids"], kwargs.get("attention_mask"), vid, protect))


def _wrap_forward_qwen2vl(model, cfg: HoliTomPassConfig, match: Match) -> None:
    """Shadow ``forward`` on this Qwen2-VL instance (module docstring, "Qwen2-VL")."""
    def forward(self, cls_forward, kwargs):
        stats = getattr(self, STATS_ATTR)
        if not (cfg.outer and _qwen2vl_mergeable(kwargs)):
            stats.passthrough += 1
            _inner_codes(self, cfg, kwargs)
            return cls_forward(self, **kwargs)
        ids = kwargs["input_ids"]
        mi = _qwen2vl_merge_call(self, cfg, kwargs, kwargs.get("labels"))
        _inner_codes(self, cfg, kwargs, mi)
        for k in _QWEN2VL_VISUAL_KWARGS + (PROTECT_KWARG,):
            kwargs.pop(k, None)
        kwargs.update(input_ids=None, inputs_embeds=mi.inputs_embeds, attention_mask=mi.attention_mask,
                      position_ids=mi.position_ids)
        if mi.labels is not None:
            kwargs["labels"] = mi.labels
        out = cls_forward(self, **kwargs)
        self.model.rope_deltas = mi.rope_deltas   # decode steps: position = cache length + delta (= max kept + 1)
        record_call(self, stats, mi, match)
        restore_logits(out, cfg, ids, mi.index, mi.attention_mask, kwargs.get("logits_to_keep", 0))
        out.holitom = HoliTomCallInfo(mi.input_ids, mi.attention_mask, mi.index, mi.tokens_before, mi.tokens_after,
                                      mi.merges, mi.position_ids, mi.rope_deltas)
        return out

    shadow_forward(model, "Qwen2-VL", forward_signature(type(model).forward, cfg), forward)


def _wrap_generate_qwen2vl(model, cfg: HoliTomPassConfig, match: Match) -> None:
    """Shadow ``generate`` on this Qwen2-VL instance: a call with ``input_ids`` + videos becomes
    ``generate(inputs_embeds=<shortened>, attention_mask=<shortened>, position_ids=<kept 3-D positions>)``;
    transformers extends explicit ``position_ids`` by ``last + 1`` per step (module docstring)."""
    def rewrite(self, kwargs):
        if not (cfg.outer and _qwen2vl_mergeable(kwargs)):
            _inner_codes(self, cfg, kwargs)
            return
        right = right_padded(kwargs.get("attention_mask"))
        with torch.no_grad():  # rows left shorter by merging are padded on the left (generation continues at the end)
            mi = _qwen2vl_merge_call(self, cfg, kwargs, left=not right)
        _inner_codes(self, cfg, kwargs, mi)
        for k in _QWEN2VL_VISUAL_KWARGS + ("input_ids", PROTECT_KWARG):
            kwargs.pop(k, None)
        mask = mi.attention_mask if mi.attention_mask is not None else torch.ones_like(mi.input_ids)
        kwargs.update(inputs_embeds=mi.inputs_embeds, attention_mask=mask, position_ids=mi.position_ids)
        self.model.rope_deltas = mi.rope_deltas
        record_call(self, getattr(self, STATS_ATTR), mi, match)

    shadow_generate(model, "Qwen2-VL", rewrite)


def install(model, cfg: HoliTomPassConfig, match: Match) -> None:
    """Shadow ``forward`` and ``generate`` on this Qwen2-VL instance (module docstring)."""
    _wrap_forward_qwen2vl(model, cfg, match)
    _wrap_generate_qwen2vl(model, cfg, match)

"""``holitom``: HoliTom outer- and inner-LLM visual-token merging on an unmodified LLaVA-OneVision, and outer-LLM
merging on an unmodified Qwen2-VL (GPT4Scene) with its 3-D M-RoPE positions and on an unmodified Idefics3 fed video
frames as images (T2Vid), and per-frame merging in the stream of a streaming model (VideoLLM-online) (runtime pass;
Qwen2-VL, Idefics3 and streaming: see the sections "Qwen2-VL", "Idefics3" and "Streaming" at the end).

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
is markedly more faithful than compact positions (the report's table); ``generate`` continuation with gapped ids is
not handled (R4).

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
**only the new tokens**. ``positions='original'`` raises there (gapped ids + generate, spec R4, not handled). A
right-padded batch generates after its padding, exactly as the unmodified model does with right padding: use left
padding (or batch 1) for generation.

Inner-LLM stage (spec §2; ``inner_layer=K``, off by default; ``outer=False`` runs it alone). Decoder layers ``K..N-1``
of the working copy's language model are replaced by :class:`InnerMergeLayer` wrappers (the ``ModuleList`` entries of
the copy; the classes are untouched). The forward / generate wrappers pass one extra keyword down to the layers,
``vopt_holitom_tokens`` (``[B, L]`` int8: 1 video placeholder, 0 text, -1 padding; added to ``forward``'s signature so
``generate`` forwards it). At a prefill (several tokens and an empty cache *at layer K*), layer K scores the visual
tokens with the attention its own normed ``q``/``k`` projections + RoPE give them from each row's last
``inner_queries`` real tokens (no attention probabilities are requested from the kernel, so SDPA stays), and
:func:`vopt.merging.inner.inner_merge` keeps ``ceil(inner_keep * n)`` per row and averages each dropped token into its
most similar kept one (``inner_merge=False``: FastV-style dropping). Layers ``K..N-1`` then run on the kept tokens with
their *original* RoPE positions and mask rows/columns (gapped, as in the published code); rows that keep different
counts (after the outer stage) are filled with masked filler slots. The last layer maps its output back to the
input length (a dropped position gets its representative's state), so logits keep the layout described above. Decode
steps: positions continue from the full length (HF counts layer 0's cache), and masks lose the dropped columns,
because the caches of layers ``>= K`` hold only the kept tokens. The language model then runs **eagerly** (the
wrapper refuses ``torch.export``: token choice depends on the data; the report shows the reason). Tested: keep=1 is
bit-identical, batch rows (right/left padding, ragged) equal single rows, the scores equal HF eager attention
probabilities, generation's first token equals the merged forward's greedy answer.

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

Qwen2-VL (``Qwen2VLForConditionalGeneration`` and subclasses; the GPT4Scene zoo model; spec §3 "Qwen2-VL M-RoPE",
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
    merger), merged by :func:`vopt.merging.holitom_merge` with **proxy scores** (vision attention scores of the varlen
    ViT are not implemented); the ``m`` merged tokens fill the first ``m`` placeholder slots of the video, each with its
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
**Not supported on Qwen2-VL**: the inner-LLM stage (``inner_layer`` set: the model is skipped with the reason),
``scores='attention'`` (proxy scores are used; reported), ``positions='compact'`` (ignored: positions are always the
model's own 3-D ones, gathered), merging images as frames (GPT4Scene's original feeds the frames as separate images:
image tokens are never merged), Qwen2.5-VL (a different class: skipped), video-less calls (nothing to merge).

Idefics3 (``Idefics3ForConditionalGeneration`` and subclasses; the T2Vid zoo model ``zoo.build("t2vid")``: each
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
    frame boundaries and any per-frame text in order. Rows left shorter are gathered (:func:`_compact_rows`) and
    padded on the caller's side (right when unpadded; ``generate`` pads left unless the caller right-padded) with
    ``pad_token_id``, mask 0, ``labels`` -100 at image tokens;
(d) the class ``forward`` runs with ``input_ids=None, inputs_embeds, attention_mask`` and no ``pixel_values`` /
    ``pixel_attention_mask``; positions **compact** (``position_ids=None``: Llama numbers the shortened sequence, as
    the LLaVA-OV path's default; decode steps through ``forward`` with the returned cache continue at ``L'``).
    ``positions='original'`` passes gapped 1-D ``position_ids`` (text its own, a merged token its representative's
    placeholder slot), forward only.

Logits: ``'original'`` / ``'compact'`` as above; ``out.holitom`` as above. ``generate`` is shadowed:
``generate(inputs_embeds=<shortened>, attention_mask)``, **only the new tokens** returned; ``positions='original'``
raises there. Tested (``tests/test_holitom_idefics3.py``): retain 1.0 bit-identical logits, features equal
``get_image_features`` and scores equal the last layer's received attention, wrappers/text kept in order and each
merged token inside its representative frame's wrapper pair, padded batches (left/right; rows with 8 and 4 frames,
padding images) equal rows alone, a ragged unpadded batch (static frames) equals rows alone in forward and generate,
generate equals manual greedy decoding through the merged forward + cache. Measured on the tiny T2Vid model (8 frames
x 4 tokens, 54-token prompt with 16 wrapper tokens): retain 0.25 keeps 8 of 32 image tokens per row, LLM sequence
54 -> 30; retain 0.5 on 8 identical frames keeps 4 (temporal merging). Full size (169 tokens/frame, 24 frames =
4056 image tokens + 48 wrappers): retain 0.25 -> a budget of 1014 image tokens (not run here). **Not supported on
Idefics3**: the inner-LLM stage (skipped with the reason), images that are split into tiles
(``do_image_splitting=True``: each tile's ``n``-block would be taken as a frame; T2Vid does not split), several
videos or images mixed with a video in one row (all of a row's images are one video), ``positions='original'`` in
``generate``.

Streaming (VideoLLM-online, ``vopt.zoo.videollm_online.VideoLLMOnline``; checked before the classes above). Detected
by the protocol, not the class: callable ``prefill_frame`` / ``frame_embeddings`` / ``new_cache`` / ``extend`` /
``embed_ids``, a ``language_model`` module and integer ``tokens_per_frame`` / ``interval_token_id``. Such a model
prefills each frame as ``[interval id, n frame tokens]`` onto a persistent caller-owned cache (``stream()`` calls
``self.prefill_frame`` frame after frame; ``respond()`` decodes onto the same cache). The pass shadows
``prefill_frame`` **on the working copy only** (instance attribute, as ``vidkv`` shadows ``new_cache``; the class is
never patched): the frame's tokens (the model's own ``frame_embeddings``) are reduced by :func:`stream_frame_merge` to
exactly ``k = ceil(retain_ratio * n)`` tokens (``token_budget``, when set, per frame; clamped to ``[1, n]``), then
``[interval id, k tokens]`` goes through the model's own ``extend``, so positions are the stream's own **compact**
ones (the cache length counts kept tokens; the cache grows by ``1 + k`` per frame). Per frame and row:

* the first token (VideoLLM-online's CLS: SigLIP's MAP-head pooled output) is kept **untouched** and counts in the
  budget: it is the frame's global summary, not a patch (it has no grid position and other statistics, so it would
  distort the clustering and temporal matching of the patch tokens), and the model was trained to read the frame
  from it (it is what carries the frame-level signal for the interval-token "respond now?" decision);
* temporal (HoliTom stage I within the stream's causality: only the past is known, so there is no segment DP): a
  patch token is *static* when its cosine similarity to one of the previous frame's kept patch tokens, or to the
  previous frame's token at the same grid position (HoliTom's ``s[t, n]``), exceeds ``merge.tau``. Its content is
  already in the cache (earlier kept token, alone or inside a cluster mean), so static tokens are dropped first;
* spatial (stage II): the ``k - 1`` slots go to the dynamic tokens, reduced by DPC-KNN density clustering + cluster
  merging (``knn``, ``beta``, ``cluster_merge``; each merged token is a weighted mean of its members, weights summing
  to 1); when fewer than ``k - 1`` tokens are dynamic they are all kept as they are and the static ones fill the
  remaining slots (clustered the same way), so the budget is exact. A repeated frame therefore yields exactly the
  kept tokens of its first occurrence. ``dominant_ratio`` / ``scores`` / ``positions`` / ``logits`` do not apply.

The interval token, text (``prefill_ids``) and answers (``respond``) are never merged. Temporal state is kept **per
cache** (a weak map on the working copy, ``model.vopt_holitom_stream``: cache -> previous frame's kept and unmerged
patch tokens per row), so any fresh cache (``new_cache()``) starts a fresh stream and concurrent streams do not mix;
a call with another batch size restarts the state. ``retain_ratio=1.0`` (``k = n``) calls the class's own
``prefill_frame``: bit-identical to the unmodified stream. ``stats.static_tokens`` counts static tokens. **Not
merged**: ``forward`` (the whole-stream offline embedding path stays unmerged; the match says so). **Not supported on
a stream**: the inner-LLM stage (skipped with the reason). Measured (tiny zoo model, n = 5: CLS + 2x2; 8 random
frames): retain 0.5 keeps 3 of 5 tokens per frame, cache after the frames 48 -> 32; retain 0.25: 2 of 5, 48 -> 24;
a stream of one repeated frame finds all 4 patch tokens of each repeat static, 8 random frames none (0 of 28). Full size (n = 10): retain 0.5 -> 5,
0.25 -> 3, 0.1 -> 1 (CLS only) tokens per frame.
"""
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

#: Marker on the wrapped ``forward`` (idempotence).
_WRAPPED = "_vopt_holitom_wrapped"
#: Instance attribute with the running statistics.
STATS_ATTR = "vopt_holitom_stats"
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
        None, help="Inner-LLM merging at this decoder layer (HoliTom's K: 18 of LLaVA-OV-7B's 28 layers); None: off. "
        "Layers from K on see the shortened sequence; the language model then runs eagerly (token choice is data "
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
                                             or self.inner_layer < 0):
            raise ConfigError(f"{name}.inner_layer must be None or an int >= 0, got {self.inner_layer!r}")
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


@dataclass
class HoliTomStats:
    """Running totals of the merged calls of one working copy (``model.vopt_holitom_stats``)."""

    calls: int = 0
    videos: int = 0
    tokens_before: int = 0   #: video placeholder tokens the unmodified model would have fed the LM (newline included)
    tokens_after: int = 0    #: video tokens the LM actually received (newline included)
    passthrough: int = 0     #: calls forwarded unchanged (no video, images, cache filled, inputs_embeds given)
    paper_flops_before: float = 0.0  #: LLM prefill FLOPs over the video tokens, HoliTom/FastV formula, unmerged
    paper_flops_after: float = 0.0   #: the same over the merged video tokens
    inner: "InnerStats" = field(default_factory=lambda: InnerStats())  #: the inner-LLM stage's totals
    static_tokens: int = 0   #: streaming: frame patch tokens found static against the previous frame's kept ones

    @property
    def paper_flops_fraction(self) -> float:
        """Merged / unmerged LLM prefill FLOPs with the paper's formula (HoliTom reports 6.9% at 10% retain with
        inner merging, 8.4% without: spec tokens.md §5)."""
        return self.paper_flops_after / self.paper_flops_before if self.paper_flops_before else 1.0

    @property
    def kept_fraction(self) -> float:
        return self.tokens_after / self.tokens_before if self.tokens_before else 1.0


@dataclass
class HoliTomCallInfo:
    """What one merged call did (``out.holitom``)."""

    input_ids: torch.Tensor                 #: [B, L'] shortened ids (fewer video placeholders, padded)
    attention_mask: torch.Tensor            #: [B, L'] mask of the shortened sequence
    index: torch.Tensor                     #: [B, L'] caller's position of each new token; -1: added padding
    tokens_before: List[int] = field(default_factory=list)  #: per row, video tokens incl. newline
    tokens_after: List[int] = field(default_factory=list)
    merges: List[MergeResult] = field(default_factory=list)
    #: Qwen2-VL only: ``[3, B, L']`` M-RoPE positions the LM received (a merged token: its representative's
    #: (t, h, w); text and images: their own) and ``[B, 1]`` ``rope_deltas`` set on the model for decoding.
    position_ids: Optional[torch.Tensor] = None
    rope_deltas: Optional[torch.Tensor] = None


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


def _is_qwen2vl(model) -> bool:
    try:
        from transformers import Qwen2VLForConditionalGeneration
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, Qwen2VLForConditionalGeneration)


def _supported(model) -> Optional[str]:
    """None when ``model`` is a LLaVA-OneVision or Qwen2-VL generation model this pass can wrap, else the reason."""
    if _is_qwen2vl(model):
        return _supported_qwen2vl(model)
    if _is_idefics3(model):
        return _supported_idefics3(model)
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


def _pad_id(model) -> int:
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    pad = getattr(text, "pad_token_id", None)
    if not isinstance(pad, int):
        pad = getattr(model.config, "pad_token_id", None)
    return pad if isinstance(pad, int) else 0


def _left_padded(mask: torch.Tensor) -> bool:
    return bool((mask[:, -1] != 0).all()) and bool((mask[:, 0] == 0).any())


def _received_attention(layer, x: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """``[BF, P]``: attention each patch receives in SigLIP encoder ``layer`` (input ``x [BF, P, D]``), the
    softmax probabilities ``softmax(q k^T * scale)`` averaged over heads and query patches (fp32), computed from the
    layer's own ``layer_norm1`` / ``q_proj`` / ``k_proj`` a few frames at a time (``[chunk, H, P, P]`` at most)."""
    attn = layer.self_attn
    split = lambda t: t.view(*t.shape[:2], -1, attn.head_dim).transpose(1, 2).float()
    out = []
    for xs in x.split(chunk):
        h = layer.layer_norm1(xs)
        q, k = split(attn.q_proj(h)), split(attn.k_proj(h))
        out.append(torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1).mean(dim=(1, 2)))
    return torch.cat(out)


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
        received = _received_attention(layers[layer_idx], hs[layer_idx])[:, drop:]         # [BF, P]
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
    left = attention_mask is not None and _left_padded(attention_mask)
    pad_id = _pad_id(model)
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


def _original_positions(mi: MergedInputs, position_ids: Optional[torch.Tensor], shape) -> torch.Tensor:
    """``position_ids [B, L']`` for ``positions='original'``: each token takes the position of its caller slot
    (``mi.slot``) under the caller's ``position_ids`` (default ``arange(L)``, what the unmodified LM uses); added
    padding continues after the row's largest position (padding is masked out anyway)."""
    B, L = shape
    slot = mi.slot
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == L:
        src = position_ids.to(slot.device).expand(B, L)
    else:
        src = torch.arange(L, device=slot.device).expand(B, L)
    pos = src.gather(1, slot.clamp(min=0))
    pad = slot < 0
    if bool(pad.any()):
        nxt = pos.masked_fill(pad, -1).max(1, keepdim=True).values + 1
        pos = torch.where(pad, nxt + pad.long().cumsum(1) - 1, pos)
    return pos


def _cache_filled(cache) -> bool:
    if cache is None:
        return False
    try:
        return int(cache.get_seq_length()) > 0
    except Exception:  # noqa: BLE001 - an unknown cache type: treat as filled (do not merge)
        return True


def _paper_flops(model, tokens: List[int]) -> float:
    """LLM prefill FLOPs over each video's tokens with the HoliTom/FastV formula, summed."""
    text = model.config.get_text_config()
    return sum(paper_prefill_flops(text.num_hidden_layers, text.hidden_size, text.intermediate_size, n)
               for n in tokens)


def _record(model, stats: HoliTomStats, mi: MergedInputs, match: Match) -> None:
    stats.calls += 1
    stats.videos += len(mi.tokens_before)
    stats.tokens_before += sum(mi.tokens_before)
    stats.tokens_after += sum(mi.tokens_after)
    before, after = _paper_flops(model, mi.tokens_before), _paper_flops(model, mi.tokens_after)
    stats.paper_flops_before += before
    stats.paper_flops_after += after
    if stats.calls == 1 and "first call" not in match.what:
        tb, ta = sum(mi.tokens_before), sum(mi.tokens_after)
        match.what += (f"; first call: video tokens {tb} -> {ta} ({ta / tb:.1%} kept, {len(mi.tokens_before)} videos), "
                       f"LLM prefill FLOPs over them (paper formula) {before:.3g} -> {after:.3g} "
                       f"({after / before:.1%})")


def _shadow(model, name: str, fn, doc: str, signature=None) -> None:
    """Install ``fn`` as ``model.<name>`` on this instance only (a bound method in the instance dict; the class and
    transformers untouched; ``copy.deepcopy`` rebinds it), marked as this pass's wrapper."""
    fn.__doc__ = doc
    if signature is not None:
        fn.__signature__ = signature
    setattr(fn, _WRAPPED, True)
    setattr(model, name, types.MethodType(fn, model))


def _right_padded(mask) -> bool:
    """Whether a caller's ``attention_mask`` ends with padding in some row."""
    return isinstance(mask, torch.Tensor) and bool((mask[:, -1] == 0).any())


def _restore_logits(out, cfg: HoliTomPassConfig, ids: torch.Tensor, index: torch.Tensor, attention_mask, keep) -> None:
    """``logits='original'``: scatter the shortened sequence's logits back to the caller's ``[B, L]`` layout (new
    token j of row b at ``index[b, j]``; dropped slots and added padding hold zeros; full-sequence logits only).
    ``logits='compact'``: leave them and expose the new ``attention_mask`` on the output."""
    logits = getattr(out, "logits", None)
    if (cfg.logits == "original" and isinstance(logits, torch.Tensor) and logits.dim() == 3
            and isinstance(keep, int) and keep == 0 and logits.shape[1] == index.shape[1]):
        B, L = ids.shape
        full = logits.new_zeros(B, L, logits.shape[-1])
        ok = index >= 0
        rows = torch.arange(B, device=logits.device)[:, None].expand_as(index)
        full[rows[ok], index[ok]] = logits[ok]
        out.logits = full
    elif cfg.logits == "compact":
        out.attention_mask = attention_mask


def _wrap_generate(model, cfg: HoliTomPassConfig, match: Match) -> None:
    """Shadow ``generate`` on this instance: a call with ``pixel_values_videos`` and ``input_ids`` is turned into
    ``generate(inputs_embeds=<shortened>, attention_mask=<shortened>)`` (spec §3 Option A). transformers 5.x's own
    ``generate`` never reaches the ``forward`` wrapper with ``pixel_values_videos`` (it precomputes
    ``mm_encoder_outputs``), so without this it would run unmerged."""
    previous = vars(model).get("generate")
    cls_generate = type(model).generate

    def generate(self, *args, **kwargs):
        if args and isinstance(args[0], torch.Tensor) and "input_ids" not in kwargs:
            kwargs["input_ids"], args = args[0], args[1:]
        ids, pv = kwargs.get("input_ids"), kwargs.get("pixel_values_videos")
        call = previous if previous is not None else (lambda *a, **k: cls_generate(self, *a, **k))
        if cfg.inner_layer is not None and isinstance(ids, torch.Tensor):
            kwargs.setdefault(TOKENS_KWARG, _token_codes(self, ids, kwargs.get("attention_mask")))  # to every forward
        if (not cfg.outer or pv is None or not isinstance(ids, torch.Tensor) or kwargs.get("inputs_embeds") is not None
                or kwargs.get("pixel_values") is not None or kwargs.get("mm_encoder_outputs") is not None):
            return call(*args, **kwargs)
        if cfg.positions != "compact":
            raise NotImplementedError(
                "holitom: generate() with positions='original' (gapped position ids) is not supported (spec §3 R4); "
                "use HoliTomPassConfig(positions='compact') for generation")
        with torch.no_grad():
            mi = merge_video_inputs(self, ids, pv, cfg.merge, kwargs.get("attention_mask"), None,
                                    kwargs.get("vision_feature_layer"), kwargs.get("vision_feature_select_strategy"),
                                    cfg.scores)
        for k in ("input_ids", "pixel_values_videos", "image_sizes_videos", "position_ids"):
            kwargs.pop(k, None)
        kwargs.update(inputs_embeds=mi.inputs_embeds, attention_mask=mi.attention_mask)
        if cfg.inner_layer is not None:
            kwargs[TOKENS_KWARG] = _token_codes(self, mi.input_ids, mi.attention_mask)
        _record(self, getattr(self, STATS_ATTR), mi, match)
        return call(*args, **kwargs)

    _shadow(model, "generate", generate, "HoliTom-merging ``generate`` (vopt pass 'holitom'): returns only the new "
            f"tokens when it merged (inputs_embeds generation).\n\n{cls_generate.__doc__ or ''}")


def _wrap_forward(model, cfg: HoliTomPassConfig, match: Match) -> None:
    """Shadow ``forward`` on this instance (module docstring)."""
    cls_forward = type(model).forward
    names = [p for p in inspect.signature(cls_forward).parameters if p != "self"]

    def forward(self, *args, **kwargs):
        for name, value in zip(names, args):
            kwargs[name] = value
        stats = getattr(self, STATS_ATTR)
        ids, pv = kwargs.get("input_ids"), kwargs.get("pixel_values_videos")
        if cfg.inner_layer is not None and isinstance(ids, torch.Tensor):
            kwargs.setdefault(TOKENS_KWARG, _token_codes(self, ids, kwargs.get("attention_mask")))
        if (not cfg.outer or pv is None or not isinstance(ids, torch.Tensor) or kwargs.get("inputs_embeds") is not None
                or kwargs.get("pixel_values") is not None or kwargs.get("mm_encoder_outputs") is not None
                or _cache_filled(kwargs.get("cache", kwargs.get("past_key_values")))):
            stats.passthrough += 1
            return cls_forward(self, **kwargs)
        mi = merge_video_inputs(self, ids, pv, cfg.merge, kwargs.get("attention_mask"), kwargs.get("labels"),
                                kwargs.get("vision_feature_layer"), kwargs.get("vision_feature_select_strategy"),
                                cfg.scores)
        kwargs.pop("pixel_values_videos")
        kwargs.pop("image_sizes_videos", None)
        kwargs.update(input_ids=None, inputs_embeds=mi.inputs_embeds, attention_mask=mi.attention_mask)
        if cfg.inner_layer is not None:
            kwargs[TOKENS_KWARG] = _token_codes(self, mi.input_ids, mi.attention_mask)
        if mi.labels is not None:
            kwargs["labels"] = mi.labels
        if cfg.positions == "original":
            kwargs["position_ids"] = _original_positions(mi, kwargs.get("position_ids"), ids.shape)
        elif mi.shortened:
            kwargs["position_ids"] = None
        out = cls_forward(self, **kwargs)
        _record(self, stats, mi, match)
        _restore_logits(out, cfg, ids, mi.index, mi.attention_mask, kwargs.get("logits_to_keep", 0))
        out.holitom = HoliTomCallInfo(mi.input_ids, mi.attention_mask, mi.index, mi.tokens_before,
                                      mi.tokens_after, mi.merges)
        return out

    sig = inspect.signature(cls_forward)  # generate() validates its kwargs against it
    if cfg.inner_layer is not None:  # ... and must let the visual-token mask through to every forward
        params = list(sig.parameters.values())
        extra = inspect.Parameter(TOKENS_KWARG, inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        sig = sig.replace(parameters=params[:at] + [extra] + params[at:])
    _shadow(model, "forward", forward,
            f"HoliTom-merging ``forward`` (vopt pass 'holitom').\n\n{cls_forward.__doc__ or ''}", sig)


# ---- Qwen2-VL (GPT4Scene) outer stage ------------------------------------------------------------------------------

#: Keyword arguments that carry the visual inputs of a Qwen2-VL call (dropped when the call is rewritten).
_QWEN2VL_VISUAL_KWARGS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw",
                          "mm_token_type_ids", "second_per_grid_ts")


def _supported_qwen2vl(model) -> Optional[str]:
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
                                 pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                                 video_grid_thw=None, attention_mask=None, position_ids=None) -> tuple:
    """``(inputs_embeds [B, L, D], position_ids [3, B, L], video features (one [t*h*w/4, D] per video) or None)``
    exactly as the unmodified ``Qwen2VLModel.forward`` builds them: the model's own ``get_input_embeddings``,
    ``get_image_features`` / ``get_video_features`` scattered with ``masked_scatter`` after its own placeholder-count
    check, and its own ``get_rope_index`` on the FULL input with the caller's ``attention_mask`` (a caller's
    ``position_ids [3 or 4, B, L]`` are used instead; a leading text row is dropped)."""
    inner = model.model
    embeds = model.get_input_embeddings()(input_ids)
    if pixel_values is not None:
        img = torch.cat(inner.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output)
        img = img.to(embeds.device, embeds.dtype)
        img_mask, _ = inner.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=img)
        embeds = embeds.masked_scatter(img_mask, img)
    vids = None
    if pixel_values_videos is not None:
        vids = inner.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True).pooler_output
        flat = torch.cat(vids).to(embeds.device, embeds.dtype)
        _, vid_mask = inner.get_placeholder_mask(input_ids, inputs_embeds=embeds, video_features=flat)
        embeds = embeds.masked_scatter(vid_mask, flat)
    B, L = input_ids.shape
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 3 and position_ids.shape[-1] == L:
        pos = position_ids[-3:].expand(3, B, L)
    else:
        pos, _ = inner.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
                                      video_grid_thw=video_grid_thw, attention_mask=attention_mask)
    return embeds, pos, vids


def _compact_rows(keep: torch.Tensor, left: bool) -> torch.Tensor:
    """``index [B, L']``: per row the positions where ``keep [B, L]`` is True, in order, padded with -1 to the
    longest row (``L' = max kept``) on the left (``left``) or on the right. Vectorized (a sort per row)."""
    B, L = keep.shape
    ar = torch.arange(L, device=keep.device)
    counts = keep.sum(1)
    Lp = int(counts.max())
    order = torch.sort(torch.where(keep, ar, L + ar), dim=1).values[:, :Lp]   # kept positions first, in order
    j = torch.arange(Lp, device=keep.device).expand(B, Lp)
    src = j - (Lp - counts)[:, None] if left else j
    valid = (src >= 0) & (src < counts[:, None])
    return torch.where(valid, order.gather(1, src.clamp(0, Lp - 1)), -1)


def merge_qwen2vl_inputs(model, input_ids: torch.Tensor, config: HoliTomConfig, *, mm_token_type_ids: torch.Tensor,
                         pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor, pixel_values=None,
                         image_grid_thw=None, attention_mask: Optional[torch.Tensor] = None, position_ids=None,
                         labels: Optional[torch.Tensor] = None, left: Optional[bool] = None,
                         protect: Optional[torch.Tensor] = None) -> Qwen2VLMerged:
    """HoliTom outer merging of a Qwen2-VL call's videos (module docstring, "Qwen2-VL").

    Each video (in ``video_grid_thw`` order, i.e. row by row as ``get_rope_index`` consumes them) is
    ``t`` frames (the temporal grid) x ``n = h*w/4`` tokens (after the 2x2 merger); :func:`holitom_merge` (proxy
    scores) reduces it to ``m`` tokens, written into the first ``m`` of its placeholder slots with their
    representative's 3-D position (spec R2); its other slots are dropped. Image tokens (GPT4Scene's BEV map), text
    (object-ID marker text included) and the vision start/end ids are never touched; video placeholders where
    ``protect [B, L]`` is True (e.g. the patches that carry GPT4Scene's object-ID markers) are never merged
    (:func:`_exclude_protected`). The kept tokens are gathered
    per row (``_compact_rows``) with their embeddings, ids, mask, token types and 3-D positions; rows left shorter
    are padded on the ``left`` (None: the side the caller padded, right when unpadded)."""
    vid = model.config.video_token_id
    B, L = input_ids.shape
    if protect is not None and (not isinstance(protect, torch.Tensor) or tuple(protect.shape) != (B, L)):
        raise ValueError(f"holitom: {PROTECT_KWARG} must be a [B={B}, L={L}] bool tensor over input_ids, got "
                         f"{tuple(protect.shape) if isinstance(protect, torch.Tensor) else type(protect).__name__}")
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    embeds, pos, vids = qwen2vl_embeds_and_positions(
        model, input_ids, mm_token_type_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
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
            mr = holitom_merge(feats.reshape(t, n, -1), config, None)
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
        left = attention_mask is not None and _left_padded(attention_mask)
    idx = _compact_rows(keep, left)
    fill = idx < 0
    g = idx.clamp(min=0)
    pad_id = _pad_id(model)
    pad_emb = model.get_input_embeddings()(torch.tensor([pad_id], device=input_ids.device)).to(embeds.dtype)[0]
    out_emb = torch.where(fill[..., None], pad_emb, new_emb.gather(1, g[..., None].expand(*g.shape, embeds.shape[-1])))
    out_ids = input_ids.gather(1, g).masked_fill(fill, pad_id)
    out_mask = mask.gather(1, g).masked_fill(fill, 0)
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
            and not _cache_filled(kwargs.get("cache", kwargs.get("past_key_values"))))


#: Optional keyword of a Qwen2-VL call: ``[B, L]`` bool over ``input_ids``, True at video placeholders that must
#: never be merged (GPT4Scene's object-ID marker patches); popped before the model sees the call.
PROTECT_KWARG = "vopt_holitom_protect"


def _qwen2vl_merge_call(model, cfg: HoliTomPassConfig, kwargs: dict, labels=None, left=None) -> Qwen2VLMerged:
    return merge_qwen2vl_inputs(
        model, kwargs["input_ids"], cfg.merge, mm_token_type_ids=kwargs["mm_token_type_ids"],
        pixel_values_videos=kwargs["pixel_values_videos"], video_grid_thw=kwargs["video_grid_thw"],
        pixel_values=kwargs.get("pixel_values"), image_grid_thw=kwargs.get("image_grid_thw"),
        attention_mask=kwargs.get("attention_mask"), position_ids=kwargs.get("position_ids"), labels=labels, left=left,
        protect=kwargs.get(PROTECT_KWARG))


def _wrap_forward_qwen2vl(model, cfg: HoliTomPassConfig, match: Match) -> None:
    """Shadow ``forward`` on this Qwen2-VL instance (module docstring, "Qwen2-VL")."""
    cls_forward = type(model).forward
    names = [p for p in inspect.signature(cls_forward).parameters if p != "self"]

    def forward(self, *args, **kwargs):
        for name, value in zip(names, args):
            kwargs[name] = value
        stats = getattr(self, STATS_ATTR)
        if not _qwen2vl_mergeable(kwargs):
            stats.passthrough += 1
            kwargs.pop(PROTECT_KWARG, None)
            return cls_forward(self, **kwargs)
        ids = kwargs["input_ids"]
        mi = _qwen2vl_merge_call(self, cfg, kwargs, kwargs.get("labels"))
        for k in _QWEN2VL_VISUAL_KWARGS + (PROTECT_KWARG,):
            kwargs.pop(k, None)
        kwargs.update(input_ids=None, inputs_embeds=mi.inputs_embeds, attention_mask=mi.attention_mask,
                      position_ids=mi.position_ids)
        if mi.labels is not None:
            kwargs["labels"] = mi.labels
        out = cls_forward(self, **kwargs)
        self.model.rope_deltas = mi.rope_deltas   # decode steps: position = cache length + delta (= max kept + 1)
        _record(self, stats, mi, match)
        _restore_logits(out, cfg, ids, mi.index, mi.attention_mask, kwargs.get("logits_to_keep", 0))
        out.holitom = HoliTomCallInfo(mi.input_ids, mi.attention_mask, mi.index, mi.tokens_before, mi.tokens_after,
                                      mi.merges, mi.position_ids, mi.rope_deltas)
        return out

    _shadow(model, "forward", forward,
            f"HoliTom-merging ``forward`` (vopt pass 'holitom', Qwen2-VL).\n\n{cls_forward.__doc__ or ''}",
            inspect.signature(cls_forward))


def _wrap_generate_qwen2vl(model, cfg: HoliTomPassConfig, match: Match) -> None:
    """Shadow ``generate`` on this Qwen2-VL instance: a call with ``input_ids`` + videos becomes
    ``generate(inputs_embeds=<shortened>, attention_mask=<shortened>, position_ids=<kept 3-D positions>)``;
    transformers extends explicit ``position_ids`` by ``last + 1`` per step (module docstring)."""
    previous = vars(model).get("generate")
    cls_generate = type(model).generate

    def generate(self, *args, **kwargs):
        if args and isinstance(args[0], torch.Tensor) and "input_ids" not in kwargs:
            kwargs["input_ids"], args = args[0], args[1:]
        call = previous if previous is not None else (lambda *a, **k: cls_generate(self, *a, **k))
        if not _qwen2vl_mergeable(kwargs):
            kwargs.pop(PROTECT_KWARG, None)
            return call(*args, **kwargs)
        right = _right_padded(kwargs.get("attention_mask"))
        with torch.no_grad():  # rows left shorter by merging are padded on the left (generation continues at the end)
            mi = _qwen2vl_merge_call(self, cfg, kwargs, left=not right)
        for k in _QWEN2VL_VISUAL_KWARGS + ("input_ids", PROTECT_KWARG):
            kwargs.pop(k, None)
        mask = mi.attention_mask if mi.attention_mask is not None else torch.ones_like(mi.input_ids)
        kwargs.update(inputs_embeds=mi.inputs_embeds, attention_mask=mask, position_ids=mi.position_ids)
        self.model.rope_deltas = mi.rope_deltas
        _record(self, getattr(self, STATS_ATTR), mi, match)
        return call(*args, **kwargs)

    _shadow(model, "generate", generate, "HoliTom-merging ``generate`` (vopt pass 'holitom', Qwen2-VL): returns only "
            f"the new tokens when it merged (inputs_embeds generation).\n\n{cls_generate.__doc__ or ''}")


# ---- Idefics3 (T2Vid: video frames fed as images) outer stage ------------------------------------------------------

#: Keyword arguments that carry the visual inputs of an Idefics3 call (dropped when the call is rewritten).
_IDEFICS3_VISUAL_KWARGS = ("pixel_values", "pixel_attention_mask")


def _is_idefics3(model) -> bool:
    try:
        from transformers import Idefics3ForConditionalGeneration
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, Idefics3ForConditionalGeneration)


def _supported_idefics3(model) -> Optional[str]:
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
        received = _received_attention(layers[-1], h)                                  # [sum F_b, P]
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
        left = attention_mask is not None and _left_padded(attention_mask)
    idx = _compact_rows(keep, left)
    fill = idx < 0
    g = idx.clamp(min=0)
    pad_id = _pad_id(model)
    pad_emb = model.get_input_embeddings()(torch.tensor([pad_id], device=input_ids.device)).to(merged.dtype)[0]
    out_emb = torch.where(fill[..., None], pad_emb, new_emb.gather(1, g[..., None].expand(*g.shape, merged.shape[-1])))
    out_ids = input_ids.gather(1, g).masked_fill(fill, pad_id)
    out_mask = mask.gather(1, g).masked_fill(fill, 0)
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
            and not _cache_filled(kwargs.get("cache", kwargs.get("past_key_values"))))


def _idefics3_merge_call(model, cfg: HoliTomPassConfig, kwargs: dict, labels=None, left=None) -> Idefics3Merged:
    return merge_idefics3_inputs(model, kwargs["input_ids"], kwargs["pixel_values"], cfg.merge,
                                 pixel_attention_mask=kwargs.get("pixel_attention_mask"),
                                 attention_mask=kwargs.get("attention_mask"), labels=labels, left=left,
                                 score_mode=cfg.scores)


def _wrap_forward_idefics3(model, cfg: HoliTomPassConfig, match: Match) -> None:
    """Shadow ``forward`` on this Idefics3 instance (module docstring, "Idefics3")."""
    cls_forward = type(model).forward
    names = [p for p in inspect.signature(cls_forward).parameters if p != "self"]

    def forward(self, *args, **kwargs):
        for name, value in zip(names, args):
            kwargs[name] = value
        stats = getattr(self, STATS_ATTR)
        if not _idefics3_mergeable(kwargs):
            stats.passthrough += 1
            return cls_forward(self, **kwargs)
        ids = kwargs["input_ids"]
        mi = _idefics3_merge_call(self, cfg, kwargs, kwargs.get("labels"))
        if not sum(mi.tokens_before):   # only padding images: nothing to merge
            stats.passthrough += 1
            return cls_forward(self, **kwargs)
        for k in _IDEFICS3_VISUAL_KWARGS:
            kwargs.pop(k, None)
        kwargs.update(input_ids=None, inputs_embeds=mi.inputs_embeds, attention_mask=mi.attention_mask)
        if mi.labels is not None:
            kwargs["labels"] = mi.labels
        if cfg.positions == "original":
            kwargs["position_ids"] = _original_positions(mi, kwargs.get("position_ids"), ids.shape)
        elif mi.shortened:
            kwargs["position_ids"] = None
        out = cls_forward(self, **kwargs)
        _record(self, stats, mi, match)
        _restore_logits(out, cfg, ids, mi.index, mi.attention_mask, kwargs.get("logits_to_keep", 0))
        new_mask = mi.attention_mask if mi.attention_mask is not None else torch.ones_like(mi.input_ids)
        out.holitom = HoliTomCallInfo(mi.input_ids, new_mask, mi.index, mi.tokens_before, mi.tokens_after, mi.merges)
        return out

    _shadow(model, "forward", forward,
            f"HoliTom-merging ``forward`` (vopt pass 'holitom', Idefics3).\n\n{cls_forward.__doc__ or ''}",
            inspect.signature(cls_forward))


def _wrap_generate_idefics3(model, cfg: HoliTomPassConfig, match: Match) -> None:
    """Shadow ``generate`` on this Idefics3 instance: a call with ``input_ids`` + ``pixel_values`` becomes
    ``generate(inputs_embeds=<shortened>, attention_mask=<shortened>)`` (compact positions; returns only the new
    tokens). Rows left shorter are padded on the left unless the caller right-padded."""
    previous = vars(model).get("generate")
    cls_generate = type(model).generate

    def generate(self, *args, **kwargs):
        if args and isinstance(args[0], torch.Tensor) and "input_ids" not in kwargs:
            kwargs["input_ids"], args = args[0], args[1:]
        call = previous if previous is not None else (lambda *a, **k: cls_generate(self, *a, **k))
        if not _idefics3_mergeable(kwargs):
            return call(*args, **kwargs)
        if cfg.positions != "compact":
            raise NotImplementedError(
                "holitom: generate() with positions='original' (gapped position ids) is not supported on Idefics3 "
                "(spec §3 R4); use HoliTomPassConfig(positions='compact') for generation")
        right = _right_padded(kwargs.get("attention_mask"))
        with torch.no_grad():
            mi = _idefics3_merge_call(self, cfg, kwargs, left=not right)
        if not sum(mi.tokens_before):   # only padding images: nothing to merge
            return call(*args, **kwargs)
        for k in _IDEFICS3_VISUAL_KWARGS + ("input_ids", "position_ids"):
            kwargs.pop(k, None)
        mask = mi.attention_mask if mi.attention_mask is not None else torch.ones_like(mi.input_ids)
        kwargs.update(inputs_embeds=mi.inputs_embeds, attention_mask=mask)
        _record(self, getattr(self, STATS_ATTR), mi, match)
        return call(*args, **kwargs)

    _shadow(model, "generate", generate, "HoliTom-merging ``generate`` (vopt pass 'holitom', Idefics3): returns only "
            f"the new tokens when it merged (inputs_embeds generation).\n\n{cls_generate.__doc__ or ''}")


# ---- inner-LLM stage (spec §2) -------------------------------------------------------------------------------------

#: Keyword the wrappers pass down to the decoder layers: ``[B, L]`` int8 codes of the LM input's tokens,
#: 1 video placeholder, 0 other real token, -1 padding.
TOKENS_KWARG = "vopt_holitom_tokens"


def _token_codes(model, ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    codes = (ids == model.config.video_token_id).to(torch.int8)
    if attention_mask is not None:
        codes = codes.masked_fill(attention_mask == 0, -1)
    return codes


@dataclass
class InnerStats:
    """Running totals of the inner-LLM stage (``model.vopt_holitom_stats.inner``)."""

    prefills: int = 0
    visual_before: int = 0   #: visual tokens reaching layer K (summed over rows and prefills)
    visual_after: int = 0    #: visual tokens kept from layer K on
    skipped: int = 0         #: prefills that reached layer K without visual tokens (nothing merged)
    paper_flops_before: float = 0.0  #: LLM prefill FLOPs over the LM input's visual tokens, paper formula, no inner
    paper_flops_after: float = 0.0   #: the same with layers K..N-1 on the kept tokens


class _InnerState:
    """What one prefill decided at layer K, shared by the wrappers of layers K..N-1 of one model.

    ``phase`` is ``"prefill"`` while the shortened sequence runs through layers K..N-1, ``"decode"`` after it (the
    KV cache of those layers holds only the kept tokens, so later attention masks lose the dropped columns), None
    when the last prefill merged nothing.
    """

    def __init__(self, stats: InnerStats, text_config, layers: int):
        self.stats, self._text_config, self._layers = stats, text_config, layers
        self.clear()

    def clear(self) -> None:
        self.phase: Optional[str] = None
        self.keep_idx: Optional[torch.Tensor] = None   # [B, L'] kept original positions
        self.back: Optional[torch.Tensor] = None       # [B, L] new position representing each original one
        self.full_len = 0
        self.hidden: Optional[torch.Tensor] = None
        self.layer_kwargs: dict = {}
        self.valid: Optional[torch.Tensor] = None      # [B, L'] False at filler slots; None when no row is short
        self.decoded = 0                               # tokens decoded since the prefill

    def start(self, layer: torch.nn.Module, rope, cfg: HoliTomPassConfig, hidden: torch.Tensor,
              tokens: Optional[torch.Tensor], kwargs: dict) -> None:
        """At layer K: a prefill (several tokens, empty cache) with visual tokens is scored and merged."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        B, L, _ = hidden.shape
        # This layer's own cache length: layers < K were already filled by this very prefill.
        if L == 1 or (cache is not None and int(cache.get_seq_length(layer.self_attn.layer_idx)) > 0):
            if self.phase == "prefill":  # an earlier prefill never reached the last layer (an exception)
                self.clear()
            elif self.keep_idx is not None:
                self.phase = "decode"
            return
        self.clear()
        if tokens is None or tuple(tokens.shape) != (B, L) or not bool((tokens == 1).any()):
            self.stats.skipped += 1
            return
        visual, real = tokens == 1, tokens >= 0
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
            raise NotImplementedError(f"holitom inner merging needs a 4-D tensor attention mask or None, got "
                                      f"{type(mask).__name__} (use attn_implementation='sdpa' or 'eager')")
        cos, sin = kwargs["position_embeddings"]
        # The scoring queries: each row's last t real tokens (right padding puts pads last).
        attn, t = layer.self_attn, min(cfg.inner_queries, int(real.sum(1).min()))
        ar = torch.arange(L, device=hidden.device).expand(B, L)
        q_pos = torch.sort(torch.where(real, ar, -1), dim=1).values[:, L - t:]          # [B, t] increasing
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(_take(x, q_pos)).view(B, t, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(B, L, -1, attn.head_dim).transpose(1, 2)
        q = rope(q, q, _take(cos, q_pos), _take(sin, q_pos))[0]
        k = rope(k, k, cos, sin)[1]
        imp = last_token_importance(q, k, real, q_pos)
        im = inner_merge(hidden, imp, visual, cfg.inner_keep, merge=cfg.inner_merge)
        self.stats.prefills += 1
        self.stats.visual_before += im.visual_before
        self.stats.visual_after += im.visual_after
        text, n_layers = self._text_config, self._layers
        for n in visual.sum(1).tolist():
            f = lambda **kw: paper_prefill_flops(n_layers, text.hidden_size, text.intermediate_size, n, **kw)
            self.stats.paper_flops_before += f()
            self.stats.paper_flops_after += f(inner_layer=cfg.inner_layer, inner_keep=cfg.inner_keep)
        self.phase, self.keep_idx, self.back, self.full_len, self.hidden = "prefill", im.keep_idx, im.back, L, im.hidden
        self.valid = im.valid if im.ragged else None
        self.decoded = 0
        idx = im.keep_idx
        self.layer_kwargs = {"position_embeddings": (_take(cos, idx), _take(sin, idx))}
        if kwargs.get("position_ids") is not None:
            self.layer_kwargs["position_ids"] = _take(kwargs["position_ids"], idx)
        if mask is None and self.valid is not None:  # rows of different lengths need an explicit mask
            mask = torch.ones(L, L, dtype=torch.bool, device=hidden.device).tril()[None, None]
        if mask is not None:
            m = mask.expand(B, *mask.shape[1:])
            m = m.gather(2, idx[:, None, :, None].expand(B, m.shape[1], idx.shape[1], m.shape[3]))
            m = m.gather(3, idx[:, None, None, :].expand(B, m.shape[1], idx.shape[1], idx.shape[1]))
            if self.valid is not None:
                # Filler slots: nobody attends to them; each attends only to itself (finite, never read).
                eye = torch.eye(idx.shape[1], dtype=torch.bool, device=m.device)[None, None]
                filler_row, off_on = ~self.valid[:, None, :, None], _off_on(m)
                m = m.masked_fill(~self.valid[:, None, None, :] | filler_row, off_on[0])
                m = m.masked_fill(filler_row & eye, off_on[1])
            self.layer_kwargs["attention_mask"] = m
        else:
            self.layer_kwargs["attention_mask"] = None

    def decode_mask(self, mask, q_len: int):
        """Drop the merged-away prefill columns from a decode step's mask (the cache of layers >= K lacks them)."""
        B = self.keep_idx.shape[0]
        if mask is None:
            if self.valid is None:
                return None
            cols = torch.cat([self.valid, self.valid.new_ones(B, self.decoded + q_len)], 1)
            return cols[:, None, None, :].expand(B, 1, q_len, cols.shape[1])
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
            raise NotImplementedError(f"holitom inner merging needs a 4-D tensor attention mask or None, got "
                                      f"{type(mask).__name__}")
        cols = torch.cat([self.keep_idx, torch.arange(self.full_len, mask.shape[-1], device=mask.device).expand(B, -1)], 1)
        m = mask.expand(B, *mask.shape[1:])
        m = m.gather(3, cols[:, None, None, :].expand(B, m.shape[1], m.shape[2], cols.shape[1]))
        if self.valid is not None:
            filler = torch.cat([~self.valid, self.valid.new_zeros(B, cols.shape[1] - self.valid.shape[1])], 1)
            m = m.masked_fill(filler[:, None, None, :], _off_on(m)[0])
        return m


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t [B or 1, L, ...]`` at positions ``idx [B, n]`` along dim 1: ``[B, n, ...]``."""
    B, n = idx.shape
    t = t.expand(B, *t.shape[1:])
    return t.gather(1, idx.view(B, n, *([1] * (t.dim() - 2))).expand(B, n, *t.shape[2:]))


def _off_on(mask: torch.Tensor) -> tuple:
    """The disallowed / allowed values of a bool or additive float mask."""
    return (False, True) if mask.dtype == torch.bool else (torch.finfo(mask.dtype).min, 0.0)


class InnerMergeLayer(torch.nn.Module):
    """Wraps decoder layer ``i >= K`` of the language model (the working copy's; the class is untouched).

    Layer K merges at a prefill; layers K..N-1 get the kept tokens' RoPE tables, position ids and mask; the last
    layer maps its output back to the full length (a dropped position gets its representative's state), so the LM's
    output and the logits keep the input's layout. Decode steps get masks without the dropped columns.
    """

    def __init__(self, layer: torch.nn.Module, state: _InnerState, rope, cfg: HoliTomPassConfig, *, first: bool,
                 last: bool):
        super().__init__()
        self.layer = layer
        self._state, self._rope, self._cfg, self.first, self.last = state, rope, cfg, first, last

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        if torch.compiler.is_exporting():
            raise RuntimeError("holitom inner merging chooses the kept tokens from the data at every prefill: the "
                               "language model runs eagerly")
        tokens = kwargs.pop(TOKENS_KWARG, None)
        st = self._state
        if self.first:
            st.start(self.layer, self._rope, self._cfg, hidden_states, tokens, kwargs)
            if st.phase == "prefill":
                hidden_states = st.hidden
        if st.phase == "prefill":
            kwargs.update(st.layer_kwargs)
        elif st.phase == "decode":
            kwargs["attention_mask"] = st.decode_mask(kwargs.get("attention_mask"), hidden_states.shape[1])
        out = self.layer(hidden_states, **kwargs)
        if self.last and st.phase == "decode":
            st.decoded += hidden_states.shape[1]
        if self.last and st.phase == "prefill":
            out = out.gather(1, st.back[..., None].expand(*st.back.shape, out.shape[-1]))
            st.phase, st.hidden, st.layer_kwargs = "decode", None, {}
        return out


def _install_inner(model, cfg: HoliTomPassConfig, stats: InnerStats) -> str:
    """Wrap layers K..N-1 of LLaVA-OneVision's language model; returns a description for the report."""
    import importlib

    lm = model.model.language_model
    layers = lm.layers
    n = len(layers)
    if cfg.inner_layer >= n:
        raise ConfigError(f"HoliTomPassConfig.inner_layer={cfg.inner_layer} is out of range: the language model has "
                          f"{n} layers (accepted: 0..{n - 1})")
    attn = layers[cfg.inner_layer].self_attn
    rope = getattr(importlib.import_module(type(attn).__module__), "apply_rotary_pos_emb", None)
    if rope is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "head_dim")):
        raise ConfigError(f"holitom inner merging: {type(attn).__name__} has no q_proj/k_proj/head_dim or its module "
                          "no apply_rotary_pos_emb (Qwen2/Llama-style attention is expected)")
    state = _InnerState(stats, model.config.get_text_config(), n)
    for i in range(cfg.inner_layer, n):
        layers[i] = InnerMergeLayer(layers[i], state, rope, cfg, first=i == cfg.inner_layer, last=i == n - 1)
    how = "merge" if cfg.inner_merge else "prune"
    return (f"inner K={cfg.inner_layer}/{n} keep={cfg.inner_keep:g} ({how}, last {cfg.inner_queries} "
            f"quer{'y' if cfg.inner_queries == 1 else 'ies'} score)")


# ---------------------------------------------------------------------------------------------------------------
# Streaming models (VideoLLM-online): per-frame merging in the stream (module docstring, "Streaming")
#: Instance attribute (working copy) holding the per-cache temporal state of the stream.
STREAM_STATE_ATTR = "vopt_holitom_stream"


def _streaming_model(model) -> bool:
    """True for VideoLLM-online's streaming protocol: callable ``prefill_frame`` / ``frame_embeddings`` /
    ``new_cache`` / ``extend`` / ``embed_ids``, a ``language_model`` module, ``tokens_per_frame`` and
    ``interval_token_id``."""
    return (all(callable(getattr(model, a, None)) for a in ("prefill_frame", "frame_embeddings", "new_cache",
                                                              "extend", "embed_ids"))
            and isinstance(getattr(model, "language_model", None), torch.nn.Module)
            and isinstance(getattr(model, "tokens_per_frame", None), int)
            and isinstance(getattr(model, "interval_token_id", None), int))


def stream_frame_budget(merge: HoliTomConfig, tokens_per_frame: int) -> int:
    """Tokens kept per frame (CLS included): ``ceil(retain_ratio * n)`` (``token_budget``, when set, per frame),
    clamped to ``[1, n]``."""
    n = tokens_per_frame
    k = merge.token_budget if merge.token_budget is not None else math.ceil(merge.retain_ratio * n - 1e-9)
    return max(1, min(n, int(k)))


@dataclass
class StreamFrameMerge:
    """What :func:`stream_frame_merge` did to one frame of one row (patch tokens: the frame without its CLS)."""

    tokens: torch.Tensor   #: [k, D] the kept frame tokens (CLS first, untouched; then the merged patch tokens)
    static: torch.Tensor   #: [n-1] bool: patch token similar (> tau) to a kept patch token of the previous frame
    assign: torch.Tensor   #: [n-1] long: kept patch token (0-based, CLS excluded) each patch joins; -1 dropped
    coeff: torch.Tensor    #: [n-1] its weight in that token (each kept token's weights sum to 1); 0 dropped


def stream_frame_merge(frame: torch.Tensor, prev: Optional[torch.Tensor], k: int, merge: HoliTomConfig,
                       prev_raw: Optional[torch.Tensor] = None) -> StreamFrameMerge:
    """Merge one frame's tokens ``frame [n, D]`` (CLS first) to exactly ``k`` tokens, given the previous frame's
    kept patch tokens ``prev [k', D]`` of the same stream (None: first frame) and optionally its unmerged patch tokens
    ``prev_raw [n-1, D]``.

    1. The CLS (token 0) is kept untouched; the ``k - 1`` other slots go to the ``n - 1`` patch tokens.
    2. Temporal: a patch token whose cosine similarity to some kept patch token of the previous frame exceeds
       ``merge.tau``, or (``prev_raw`` given) to the previous frame's token at the same position (HoliTom's
       ``s[t, n]``), is *static*: that content is already in the cache (the earlier frame's kept token, alone or
       inside a cluster mean), so static tokens are dropped first.
    3. Spatial: when at least ``k - 1`` patch tokens are dynamic, they are reduced to ``k - 1`` tokens by DPC-KNN
       density clustering + cluster merging (``merge.knn``, ``merge.beta``, ``merge.cluster_merge``: every output is
       a weighted mean of its members, weights summing to 1), static tokens are dropped; otherwise every dynamic token
       is kept as it is and the static ones fill the remaining slots, clustered the same way.
    Outputs keep raster order of their representatives within each group (dynamic first, then static fill).
    """
    n, D = frame.shape
    if not 1 <= k <= n:
        raise ValueError(f"stream_frame_merge: k={k} must lie in [1, {n}]")
    patches = frame[1:]
    m, kp = n - 1, k - 1
    dev = frame.device
    assign = torch.full((m,), -1, dtype=torch.long, device=dev)
    coeff = torch.zeros(m, dtype=torch.float32 if frame.dtype != torch.float64 else frame.dtype, device=dev)
    if prev is not None and prev.shape[0] and m:
        x = torch.nn.functional.normalize(patches.to(coeff.dtype), dim=-1)
        p = torch.nn.functional.normalize(prev.to(coeff.dtype), dim=-1)
        static = (x @ p.T).max(dim=-1).values > merge.tau
        if prev_raw is not None and prev_raw.shape[0] == m:
            r = torch.nn.functional.normalize(prev_raw.to(coeff.dtype), dim=-1)
            static |= (x * r).sum(-1) > merge.tau
    else:
        static = torch.zeros(m, dtype=torch.bool, device=dev)
    mode = merge.cluster_merge.value if hasattr(merge.cluster_merge, "value") else str(merge.cluster_merge)
    dyn_idx, sta_idx = (~static).nonzero().flatten(), static.nonzero().flatten()

    def cluster(idx: torch.Tensor, budget: int, offset: int) -> torch.Tensor:
        sm = spatial_merge(patches[idx], budget, method="density", knn=merge.knn, beta=merge.beta, merge_mode=mode)
        hit = sm.assign >= 0
        assign[idx[hit]] = sm.assign[hit] + offset
        coeff[idx] = sm.coeff.to(coeff.dtype)
        return sm.tokens.to(frame.dtype)

    if kp == 0:
        outs = []
    elif dyn_idx.numel() >= kp:
        outs = [cluster(dyn_idx, kp, 0)]
    else:
        d = dyn_idx.numel()
        outs = [cluster(dyn_idx, d, 0), cluster(sta_idx, kp - d, d)]
    tokens = torch.cat([frame[:1]] + outs, dim=0)
    return StreamFrameMerge(tokens, static, assign, coeff)


class _StreamState:
    """Temporal state of the streams of one working copy, **per cache**: a weak map ``cache -> [B] list of the
    previous frame's (kept patch tokens, unmerged patch tokens)``. A cache from ``new_cache()`` (or any other fresh cache) has no entry, so a
    new stream starts fresh; the entry dies with its cache. ``copy.deepcopy`` gives an empty state."""

    def __init__(self):
        import weakref

        self.prev = weakref.WeakKeyDictionary()

    def __deepcopy__(self, memo):
        return _StreamState()


def _wrap_prefill_frame(model, cfg: HoliTomPassConfig, match: Match) -> None:
    """Shadow ``prefill_frame`` on this instance only (``stream()`` calls ``self.prefill_frame``): the frame's
    tokens are merged (:func:`stream_frame_merge`) before ``[interval id, kept tokens]`` is prefilled with the model's
    own ``extend`` (compact positions: the cache length counts kept tokens). Class untouched."""
    merge = cfg.merge
    first = [True]

    @torch.no_grad()
    def prefill_frame(self, frame: torch.Tensor, cache) -> torch.Tensor:
        n = self.tokens_per_frame
        k = stream_frame_budget(merge, n)
        stats: HoliTomStats = getattr(self, STATS_ATTR)
        stats.calls += 1
        stats.videos += frame.shape[0]
        stats.tokens_before += frame.shape[0] * n
        stats.tokens_after += frame.shape[0] * k
        if k >= n:  # nothing to merge: the class's own prefill (bit-identical)
            return type(self).prefill_frame(self, frame, cache)
        feats = self.frame_embeddings(frame)                     # [B, n, D]
        state: _StreamState = getattr(self, STREAM_STATE_ATTR)
        prev = state.prev.get(cache)
        if prev is not None and len(prev) != feats.shape[0]:
            prev = None                                          # another batch size: a different stream
        rows = [stream_frame_merge(feats[b], None if prev is None else prev[b][0], k, merge,
                                   None if prev is None else prev[b][1]) for b in range(feats.shape[0])]
        state.prev[cache] = [(r.tokens[1:], feats[b, 1:]) for b, r in enumerate(rows)]
        stats.static_tokens += sum(int(r.static.sum()) for r in rows)
        if first[0]:
            first[0] = False
            match.what += f"; first frame: tokens {n} -> {k} per frame"
        interval = torch.full((frame.shape[0], 1), self.interval_token_id, dtype=torch.long, device=frame.device)
        embeds = torch.cat([self.embed_ids(interval), torch.stack([r.tokens for r in rows])], dim=1)
        return self.extend(embeds, cache)

    setattr(model, STREAM_STATE_ATTR, _StreamState())
    _shadow(model, "prefill_frame", prefill_frame, "Prefill one frame as [interval id, merged frame tokens] "
            "(installed by the holitom pass: per-frame HoliTom merging in the stream).")


@register_pass
class HoliTomPass(Pass):
    name = "holitom"
    summary = ("HoliTom outer- and inner-LLM video-token merging for LLaVA-OneVision, outer for Qwen2-VL with 3-D "
               "M-RoPE positions (shortened inputs_embeds) and for Idefics3 (T2Vid: frames as images), per-frame "
               "merging in VideoLLM-online's stream; opt-in")
    config_cls = HoliTomPassConfig
    kind = PassKind.RUNTIME
    provides = frozenset({"tokens:holitom_outer"})
    default = False  # drops visual tokens: opt-in

    def run_runtime(self, model: Any, ctx: PassContext) -> PassResult:
        result = PassResult(self.name, "model")
        kind = type(model).__name__
        if _streaming_model(model):
            return self._run_stream(model, ctx, result, kind)
        reason = _supported(model)
        if reason is None and getattr(vars(model).get("forward"), _WRAPPED, False):
            reason = "forward() is already wrapped by holitom"
        if reason is not None:
            result.matches.append(Match("model", kind, rewritten=False, reason=reason))
            return result
        m, cfg = self.config.merge, self.config
        budget = f"token_budget={m.token_budget}" if m.token_budget is not None else f"retain_ratio={m.retain_ratio:g}"
        if _is_qwen2vl(model):
            return self._run_qwen2vl(model, ctx, result, kind, budget)
        if _is_idefics3(model):
            return self._run_idefics3(model, ctx, result, kind, budget)
        what = kind + (f" {'HoliTom' if m.method == 'holitom' else m.method} outer {budget} tau={m.tau:g} beta={m.beta:g} D={m.dominant_ratio:g} knn={m.knn} "
                       f"rounding={m.budget_rounding.value} positions={cfg.positions} logits={cfg.logits}"
                       if cfg.outer else " HoliTom (no outer stage)")
        match = Match("model", what, rewritten=True)
        if not ctx.dry_run:
            stats = HoliTomStats()
            setattr(model, STATS_ATTR, stats)
            if cfg.inner_layer is not None:
                match.what += "; " + _install_inner(model, cfg, stats.inner)
            _wrap_forward(model, cfg, match)
            _wrap_generate(model, cfg, match)
        elif cfg.inner_layer is not None:
            match.what += f"; inner K={cfg.inner_layer} keep={cfg.inner_keep:g}"
        result.matches.append(match)
        return result

    def _run_qwen2vl(self, model: Any, ctx: PassContext, result: PassResult, kind: str, budget: str) -> PassResult:
        """Qwen2-VL (module docstring, "Qwen2-VL"): outer stage only, 3-D M-RoPE positions gathered."""
        m, cfg = self.config.merge, self.config
        if cfg.inner_layer is not None:
            result.matches.append(Match("model", kind, rewritten=False, reason=(
                "the inner-LLM stage (inner_layer) is not supported on Qwen2-VL yet (outer stage only: leave "
                "inner_layer=None)")))
            return result
        what = (f"{kind} {'HoliTom' if m.method == 'holitom' else m.method} outer {budget} tau={m.tau:g} "
                f"beta={m.beta:g} D={m.dominant_ratio:g} knn={m.knn} rounding={m.budget_rounding.value} "
                f"positions=M-RoPE 3-D (model's own, kept gathered) scores=proxy logits={cfg.logits}; video tokens "
                "merged, image (BEV) / text / vision start-end tokens untouched")
        match = Match("model", what, rewritten=True)
        if not ctx.dry_run:
            setattr(model, STATS_ATTR, HoliTomStats())
            _wrap_forward_qwen2vl(model, cfg, match)
            _wrap_generate_qwen2vl(model, cfg, match)
        result.matches.append(match)
        return result

    def _run_idefics3(self, model: Any, ctx: PassContext, result: PassResult, kind: str, budget: str) -> PassResult:
        """Idefics3 / T2Vid (module docstring, "Idefics3"): outer stage only, frames fed as images."""
        m, cfg = self.config.merge, self.config
        reason = None
        if cfg.inner_layer is not None:
            reason = ("the inner-LLM stage (inner_layer) is not supported on Idefics3 yet (outer stage only: leave "
                      "inner_layer=None)")
        elif not cfg.outer:
            reason = "outer=False: only the outer stage is supported on Idefics3, nothing to do"
        if reason is not None:
            result.matches.append(Match("model", kind, rewritten=False, reason=reason))
            return result
        what = (f"{kind} {'HoliTom' if m.method == 'holitom' else m.method} outer {budget} tau={m.tau:g} "
                f"beta={m.beta:g} D={m.dominant_ratio:g} knn={m.knn} rounding={m.budget_rounding.value} "
                f"positions={cfg.positions} scores={cfg.scores} logits={cfg.logits}; each row's images merged as one "
                "video's frames (n <image> tokens each), merged tokens placed in their representative frame's block, "
                "frame wrappers / text kept")
        match = Match("model", what, rewritten=True)
        if not ctx.dry_run:
            setattr(model, STATS_ATTR, HoliTomStats())
            _wrap_forward_idefics3(model, cfg, match)
            _wrap_generate_idefics3(model, cfg, match)
        result.matches.append(match)
        return result

    def _run_stream(self, model: Any, ctx: PassContext, result: PassResult, kind: str) -> PassResult:
        """VideoLLM-online-style streaming (module docstring, "Streaming"): per-frame merging in ``prefill_frame``."""
        m, cfg = self.config.merge, self.config
        reason = None
        if getattr(vars(model).get("prefill_frame"), _WRAPPED, False):
            reason = "prefill_frame() is already wrapped by holitom"
        elif cfg.inner_layer is not None:
            reason = ("the inner-LLM stage (inner_layer) is not supported on a stream (per-frame outer merging only: "
                      "leave inner_layer=None)")
        elif not cfg.outer:
            reason = "outer=False: a stream supports only the outer (per-frame) stage, nothing to do"
        if reason is not None:
            result.matches.append(Match("model", kind, rewritten=False, reason=reason))
            return result
        n = model.tokens_per_frame
        k = stream_frame_budget(m, n)
        budget = f"token_budget={m.token_budget}" if m.token_budget is not None else f"retain_ratio={m.retain_ratio:g}"
        what = (f"{kind} streaming prefill_frame(): per-frame HoliTom {budget} -> {k} of {n} tokens per frame (CLS "
                f"kept untouched; temporal: static vs the previous frame's kept tokens, tau={m.tau:g}; spatial: "
                f"DPC-KNN knn={m.knn} {m.cluster_merge.value if hasattr(m.cluster_merge, 'value') else m.cluster_merge}"
                f" merge, beta={m.beta:g}); interval/text never merged; compact positions; state per cache; forward() "
                "(whole-stream embedding) unmerged")
        match = Match("model", what, rewritten=True)
        if not ctx.dry_run:
            setattr(model, STATS_ATTR, HoliTomStats())
            _wrap_prefill_frame(model, cfg, match)
        result.matches.append(match)
        return result

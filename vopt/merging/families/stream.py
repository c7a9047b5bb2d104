"""Streaming (VideoLLM-online, ``vopt.zoo.videollm_online.VideoLLMOnline``; checked before the classes above). Detected
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
merged**: ``forward`` (the whole-stream offline embedding path stays unmerged; the match says so). The inner-LLM
stage (``inner_layer=K``, :mod:`.inner_llm`) merges each frame's patch tokens again at layer K as the frame is
prefilled (its last token, which scores them and whose logits decide whether to respond, is kept; ``outer=False``
runs it alone). Measured (tiny zoo model, n = 5: CLS + 2x2; 8 random
frames): retain 0.5 keeps 3 of 5 tokens per frame, cache after the frames 48 -> 32; retain 0.25: 2 of 5, 48 -> 24;
a stream of one repeated frame finds all 4 patch tokens of each repeat static, 8 random frames none (0 of 28). Full
size (n = 10): retain 0.5 -> 5, 0.25 -> 3, 0.1 -> 1 (CLS only) tokens per frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from ...pass_protocol import Match
from ..config import HoliTomConfig
from ..holitom import spatial_merge
from .common import STATS_ATTR, HoliTomStats, shadow_method
from .inner_llm import INNER_STATE_ATTR

if TYPE_CHECKING:  # annotations only (the pass module imports this one)
    from vopt.passes.holitom import HoliTomPassConfig


#: Instance attribute (working copy) holding the per-cache temporal state of the stream.
STREAM_STATE_ATTR = "vopt_holitom_stream"


def is_streaming_model(model) -> bool:
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
    previous frame's (kept patch tokens, unmerged patch tokens)``. A cache from ``new_cache()`` (or any other fresh
    cache) has no entry, so a new stream starts fresh; the entry dies with its cache. ``copy.deepcopy`` gives an
    empty state."""

    def __init__(self):
        import weakref

        self.prev = weakref.WeakKeyDictionary()

    def __deepcopy__(self, memo):
        return _StreamState()


def install(model, cfg: HoliTomPassConfig, match: Match) -> None:
    """Shadow ``prefill_frame`` on this instance only (``stream()`` calls ``self.prefill_frame``): the frame's
    tokens are merged (:func:`stream_frame_merge`) before ``[interval id, kept tokens]`` is prefilled with the model's
    own ``extend`` (compact positions: the cache length counts kept tokens). With the inner stage installed, the
    frame's codes (its patch tokens: 1; the interval token and the CLS: 0) are handed to it for this one call (its
    ``pending``), so layer K merges the frame's tokens on top (module docstring). Class untouched."""
    merge = cfg.merge
    first = [True]

    def _prefill(self, frame: torch.Tensor, cache, n: int, k: int) -> torch.Tensor:
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

    @torch.no_grad()
    def prefill_frame(self, frame: torch.Tensor, cache) -> torch.Tensor:
        n = self.tokens_per_frame
        k = stream_frame_budget(merge, n) if cfg.outer else n
        inner = getattr(self, INNER_STATE_ATTR, None)
        if inner is None:
            return _prefill(self, frame, cache, n, k)
        # the inner stage merges this frame's patch tokens at layer K (the interval token and the CLS are not merged)
        codes = torch.ones(frame.shape[0], 1 + k, dtype=torch.int8, device=frame.device)
        codes[:, :2] = 0
        inner.pending = codes
        try:
            return _prefill(self, frame, cache, n, k)
        finally:
            inner.pending = None

    setattr(model, STREAM_STATE_ATTR, _StreamState())
    shadow_method(model, "prefill_frame", prefill_frame, "Prefill one frame as [interval id, merged frame tokens] "
                  "(installed by the holitom pass: per-frame HoliTom merging in the stream).")

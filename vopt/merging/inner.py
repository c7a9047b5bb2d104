"""HoliTom's inner-LLM stage as pure tensor functions (spec ``shared/specs/tokens.md`` §2).

At a layer ``K`` of the language model, the visual tokens with the highest *last-token attention* are kept and
every dropped visual token is merged into its most similar kept visual token. The layer input ``h [B, L, D]``
(the output of layer ``K - 1``) is scored with layer ``K``'s own normed ``q``/``k`` projections and RoPE, from the
last ``t`` query positions only, so the model stays causal and the layer keeps its SDPA path (no attention
probabilities are requested from the attention kernel).

* :func:`last_token_importance`: ``[B, L]`` mean over heads and the last ``t`` queries of ``softmax(q k^T / sqrt(hd))``,
  with masked keys excluded.
* :func:`inner_merge`: top-``ceil(keep * n)`` visual tokens per row (stable order: equal scores keep the earlier
  token), dropped tokens assigned to the kept visual token of highest cosine similarity and averaged in
  (a true weighted mean: each token counts once; sizes from the outer stage are not carried), the shortened
  sequence in original order (``keep_idx``), and ``back`` mapping every original position to the new position that
  now represents it (its own, or its merge target's).

Batch > 1: rows may hold different numbers of visual tokens (e.g. after the outer stage); each keeps
``ceil(keep * n_b)``. Shorter rows are filled at the end up to the longest row with copies of their last kept token,
flagged ``valid = False``: callers must keep those slots out of attention (the HoliTom pass masks their columns).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class InnerMerge:
    """Result of :func:`inner_merge`."""

    hidden: torch.Tensor    #: [B, L', D] shortened hidden states (kept tokens, merged visual ones averaged)
    keep_idx: torch.Tensor  #: [B, L'] original positions of the kept tokens, increasing along each row's valid part
    back: torch.Tensor      #: [B, L] new position representing each original position (never a filler slot)
    valid: torch.Tensor     #: [B, L'] False at the filler slots of rows shorter than the longest
    visual_before: int      #: visual tokens, all rows
    visual_after: int       #: visual tokens kept, all rows

    @property
    def ragged(self) -> bool:
        return not bool(self.valid.all())


def last_token_importance(q: torch.Tensor, k: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                          q_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention the scoring queries pay each key, ``[B, L]`` (fp32).

    ``q [B, H, t, hd]`` (RoPE applied) at positions ``q_pos [B, t]`` (default: the last ``t`` positions), ``k [B,
    Hkv, L, hd]`` (``H`` a multiple of ``Hkv``: GQA), ``key_mask [B, L]`` bool (True: attendable) or None. Each query
    sees the keys up to its own position (causal); the probabilities are averaged over heads and queries.
    """
    B, H, t, hd = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads {H} are not a multiple of key heads {Hkv}")
    if q_pos is None:
        q_pos = torch.arange(L - t, L, device=q.device).expand(B, t)
    kk = k.float().repeat_interleave(H // Hkv, dim=1)
    scores = (q.float() @ kk.transpose(-1, -2)) / math.sqrt(hd)                      # [B, H, t, L]
    allowed = torch.arange(L, device=q.device)[None, None, :] <= q_pos[..., None]      # [B, t, L] causal
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :].bool()
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs.mean(dim=(1, 2))


def inner_merge(hidden: torch.Tensor, importance: torch.Tensor, visual: torch.Tensor, keep: float, *,
                merge: bool = True) -> InnerMerge:
    """Keep the top ``ceil(keep * n)`` visual tokens of each row and merge the others into them (module docstring).

    ``hidden [B, L, D]``, ``importance [B, L]``, ``visual [B, L]`` bool, ``keep`` in (0, 1]. ``merge=False`` drops
    the others instead (FastV-style pruning; ``back`` still maps them to their most similar kept token).
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    B, L, D = hidden.shape
    dev = hidden.device
    visual = visual.bool()
    counts = visual.sum(1)                                                            # [B]
    kept_counts = torch.minimum(counts, torch.ceil(counts.double() * keep).long())
    n, total, kept_total = int(counts.max()), int(counts.sum()), int(kept_counts.sum())
    ar = torch.arange(L, device=dev).expand(B, L)
    if n == 0 or kept_total == total:
        return InnerMerge(hidden, ar.clone(), ar.clone(), torch.ones(B, L, dtype=torch.bool, device=dev), total, total)
    # Visual positions per row, in order, padded to n with the sentinel L: [B, n]; real[b, i] = i < counts[b].
    vis_pos = torch.sort(torch.where(visual, ar, L), dim=1).values[:, :n]
    real = torch.arange(n, device=dev)[None, :] < counts[:, None]
    safe_pos = torch.where(real, vis_pos, 0)
    score = importance.float().gather(1, safe_pos).masked_fill(~real, float("-inf"))
    order = torch.sort(score, dim=1, descending=True, stable=True).indices           # ties: earlier token first
    rank = torch.empty_like(order).scatter(1, order, torch.arange(n, device=dev).expand(B, n))
    chosen = (rank < kept_counts[:, None]) & real
    # Dropped -> most similar kept visual token (cosine on the layer input).
    hv = hidden.gather(1, safe_pos[..., None].expand(B, n, D)).float()
    unit = torch.nn.functional.normalize(hv, dim=-1)
    sim = (unit @ unit.transpose(1, 2)).masked_fill(~chosen[:, None, :], float("-inf"))
    own = torch.arange(n, device=dev).expand(B, n)
    target = torch.where(chosen | ~real, own, sim.argmax(-1))                        # [B, n]
    w = real.float()
    sums = torch.zeros_like(hv).scatter_add(1, target[..., None].expand(B, n, D), hv * w[..., None])
    sizes = torch.zeros(B, n, device=dev).scatter_add(1, target, w)
    merged_vis = (sums / sizes.clamp_min(1)[..., None]).to(hidden.dtype)
    full = hidden
    if merge:
        # Filler entries (not real) scatter into a scratch column L, dropped afterwards.
        dest = torch.where(real, vis_pos, L)[..., None].expand(B, n, D)
        full = torch.cat([hidden, hidden.new_zeros(B, 1, D)], 1).scatter(1, dest, merged_vis)[:, :L]
    # Kept positions: every non-visual token and the chosen visual ones, in original order.
    keep_mask = torch.cat([~visual, visual.new_zeros(B, 1)], 1)
    keep_mask = keep_mask.scatter(1, torch.where(real, vis_pos, L), chosen)[:, :L]    # fillers hit scratch column L
    new_lens = L - counts + kept_counts
    new_len = int(new_lens.max())
    keep_idx = torch.sort(torch.where(keep_mask, ar, ar + L), dim=1).values[:, :new_len]
    valid = keep_idx < L
    last = keep_idx.gather(1, (new_lens - 1)[:, None])
    keep_idx = torch.where(valid, keep_idx, last)
    slots = torch.arange(new_len, device=dev).expand(B, new_len)
    new_pos = torch.full((B, L + 1), -1, dtype=torch.long, device=dev)
    new_pos = new_pos.scatter(1, torch.where(valid, keep_idx, L), slots)[:, :L]
    # A dropped visual token is represented by its target's new position.
    target_orig = safe_pos.gather(1, target)
    back = torch.cat([new_pos, new_pos.new_zeros(B, 1)], 1).scatter(
        1, torch.where(real, vis_pos, L), new_pos.gather(1, target_orig))[:, :L]
    short = full.gather(1, keep_idx[..., None].expand(B, new_len, D))
    return InnerMerge(short, keep_idx, back, valid, total, kept_total)

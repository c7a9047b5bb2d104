"""What the holitom pass's model-family rewrites share: the running statistics, the per-call info on the output,
the instance-only method shadowing, padding tests, the logits scatter back to the caller's layout, row compaction,
and the attention a vision patch receives (spec ``shared/specs/tokens.md`` §1.1).
"""
from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional

import torch

from ...pass_protocol import Match
from ..flops import paper_prefill_flops
from ..holitom import MergeResult

if TYPE_CHECKING:  # annotations only (the pass module imports this one)
    from vopt.passes.holitom import HoliTomPassConfig


#: Marker on the wrapped ``forward`` (idempotence).
WRAPPED = "_vopt_holitom_wrapped"
#: Instance attribute with the running statistics.
STATS_ATTR = "vopt_holitom_stats"


# -------------------------------------------------------------------------------------

#: Keyword the wrappers pass down to the decoder layers: ``[B, L]`` int8 codes of the LM input's tokens,
#: 1 video placeholder, 0 other real token, -1 padding.
TOKENS_KWARG = "vopt_holitom_tokens"


@dataclass
class InnerStats:
    """Running totals of the inner-LLM stage (``model.vopt_holitom_stats.inner``)."""

    prefills: int = 0
    visual_before: int = 0   #: visual tokens reaching layer K (summed over rows and prefills)
    visual_after: int = 0    #: visual tokens kept from layer K on
    skipped: int = 0         #: prefills that reached layer K without visual tokens (nothing merged)
    paper_flops_before: float = 0.0  #: LLM prefill FLOPs over the LM input's visual tokens, paper formula, no inner
    paper_flops_after: float = 0.0   #: the same with layers K..N-1 on the kept tokens


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


def pad_token_id(model) -> int:
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    pad = getattr(text, "pad_token_id", None)
    if not isinstance(pad, int):
        pad = getattr(model.config, "pad_token_id", None)
    return pad if isinstance(pad, int) else 0


def left_padded(mask: torch.Tensor) -> bool:
    return bool((mask[:, -1] != 0).all()) and bool((mask[:, 0] == 0).any())


def received_attention(layer, x: torch.Tensor, chunk: int = 8) -> torch.Tensor:
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


def original_positions(mi, position_ids: Optional[torch.Tensor], shape) -> torch.Tensor:
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


def generate_positions(mi, ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       position_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """``positions='original'`` in ``generate``: :func:`original_positions` under the positions ``generate`` gives
    the unmodified model (the caller's ``position_ids``, else ``attention_mask.cumsum - 1``: padding-aware).
    ``generate`` extends explicit positions by ``last + 1`` per step, so decoding continues right after the prompt's
    last original position, as unmerged (the prompt ends with text; rows are left-padded for generation)."""
    if position_ids is None:
        m = attention_mask if attention_mask is not None else torch.ones_like(ids)
        position_ids = (m.long().cumsum(-1) - 1).masked_fill(m == 0, 0)
    return original_positions(mi, position_ids, ids.shape)


def cache_filled(cache) -> bool:
    if cache is None:
        return False
    try:
        return int(cache.get_seq_length()) > 0
    except Exception:  # noqa: BLE001 - an unknown cache type: treat as filled (do not merge)
        return True


def paper_flops(model, tokens: List[int]) -> float:
    """LLM prefill FLOPs over each video's tokens with the HoliTom/FastV formula, summed."""
    text = model.config.get_text_config()
    return sum(paper_prefill_flops(text.num_hidden_layers, text.hidden_size, text.intermediate_size, n)
               for n in tokens)


def record_call(model, stats: HoliTomStats, mi, match: Match) -> None:
    stats.calls += 1
    stats.videos += len(mi.tokens_before)
    stats.tokens_before += sum(mi.tokens_before)
    stats.tokens_after += sum(mi.tokens_after)
    before, after = paper_flops(model, mi.tokens_before), paper_flops(model, mi.tokens_after)
    stats.paper_flops_before += before
    stats.paper_flops_after += after
    if stats.calls == 1 and "first call" not in match.what:
        tb, ta = sum(mi.tokens_before), sum(mi.tokens_after)
        match.what += (f"; first call: video tokens {tb} -> {ta} ({ta / tb:.1%} kept, {len(mi.tokens_before)} videos), "
                       f"LLM prefill FLOPs over them (paper formula) {before:.3g} -> {after:.3g} "
                       f"({after / before:.1%})")


def shadow_method(model, name: str, fn, doc: str, signature=None) -> None:
    """Install ``fn`` as ``model.<name>`` on this instance only (a bound method in the instance dict; the class and
    transformers untouched; ``copy.deepcopy`` rebinds it), marked as this pass's wrapper."""
    fn.__doc__ = doc
    if signature is not None:
        fn.__signature__ = signature
    setattr(fn, WRAPPED, True)
    setattr(model, name, types.MethodType(fn, model))


def right_padded(mask) -> bool:
    """Whether a caller's ``attention_mask`` ends with padding in some row."""
    return isinstance(mask, torch.Tensor) and bool((mask[:, -1] == 0).any())


def restore_logits(out, cfg: HoliTomPassConfig, ids: torch.Tensor, index: torch.Tensor, attention_mask, keep) -> None:
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


def compact_rows(keep: torch.Tensor, left: bool) -> torch.Tensor:
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


def gather_kept(model, keep: torch.Tensor, left: bool, embeds: torch.Tensor, input_ids: torch.Tensor,
                mask: torch.Tensor) -> tuple:
    """``(index [B, L'], inputs_embeds, input_ids, attention_mask)`` of the tokens where ``keep [B, L]`` is True,
    gathered per row in order (:func:`compact_rows`; ``index`` -1 at added padding); rows left shorter are padded on
    the ``left`` (else right) with the pad token's id and embedding and mask 0."""
    idx = compact_rows(keep, left)
    fill, g = idx < 0, idx.clamp(min=0)
    pad_id = pad_token_id(model)
    pad_emb = model.get_input_embeddings()(torch.tensor([pad_id], device=input_ids.device)).to(embeds.dtype)[0]
    out_emb = torch.where(fill[..., None], pad_emb, embeds.gather(1, g[..., None].expand(*g.shape, embeds.shape[-1])))
    return idx, out_emb, input_ids.gather(1, g).masked_fill(fill, pad_id), mask.gather(1, g).masked_fill(fill, 0)


def shadow_generate(model, family: str, rewrite) -> None:
    """Shadow ``generate`` on this instance: ``rewrite(self, kwargs)`` edits the call's keyword arguments in place (a
    positional ``input_ids`` is moved into them), then the previous instance ``generate`` (else the class's) runs.
    transformers 5.x's own ``generate`` never hands the ``forward`` wrapper the pixel inputs (it precomputes
    ``mm_encoder_outputs``), so a family merges a generation here, turning it into an ``inputs_embeds`` generation
    (which returns only the new tokens)."""
    previous = vars(model).get("generate")
    cls_generate = type(model).generate

    def generate(self, *args, **kwargs):
        if args and isinstance(args[0], torch.Tensor) and "input_ids" not in kwargs:
            kwargs["input_ids"], args = args[0], args[1:]
        rewrite(self, kwargs)
        return previous(*args, **kwargs) if previous is not None else cls_generate(self, *args, **kwargs)

    shadow_method(model, "generate", generate,
                  f"HoliTom-merging ``generate`` (vopt pass 'holitom', {family}): returns only the new tokens when it "
                  f"merged (inputs_embeds generation).\n\n{cls_generate.__doc__ or ''}")


def shadow_forward(model, family: str, signature: inspect.Signature, body) -> None:
    """Shadow ``forward`` on this instance: ``body(self, cls_forward, kwargs)`` runs the call, its positional
    arguments bound to their names first. ``signature`` is what ``generate`` validates its kwargs against."""
    cls_forward = type(model).forward
    names = [p for p in inspect.signature(cls_forward).parameters if p != "self"]

    def forward(self, *args, **kwargs):
        kwargs.update(zip(names, args))
        return body(self, cls_forward, kwargs)

    shadow_method(model, "forward", forward,
                  f"HoliTom-merging ``forward`` (vopt pass 'holitom', {family}).\n\n{cls_forward.__doc__ or ''}",
                  signature)


def forward_merged(model, cls_forward, cfg: HoliTomPassConfig, kwargs: dict, mi, ids: torch.Tensor, match: Match,
                   stats: HoliTomStats):
    """The class ``forward`` on a merged call with 1-D positions (LLaVA-OV, Idefics3; ``kwargs`` already carry the
    shortened ``inputs_embeds`` / ``attention_mask``): ``labels`` and positions (``'original'``: gapped, see
    :func:`original_positions`; else compact, ``None``), then the statistics, the logits layout and ``out.holitom``."""
    if mi.labels is not None:
        kwargs["labels"] = mi.labels
    if cfg.positions == "original":
        kwargs["position_ids"] = original_positions(mi, kwargs.get("position_ids"), ids.shape)
    elif mi.shortened:
        kwargs["position_ids"] = None
    out = cls_forward(model, **kwargs)
    record_call(model, stats, mi, match)
    restore_logits(out, cfg, ids, mi.index, mi.attention_mask, kwargs.get("logits_to_keep", 0))
    mask = mi.attention_mask if mi.attention_mask is not None else torch.ones_like(mi.input_ids)
    out.holitom = HoliTomCallInfo(mi.input_ids, mask, mi.index, mi.tokens_before, mi.tokens_after, mi.merges)
    return out

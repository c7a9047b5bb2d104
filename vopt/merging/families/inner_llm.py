"""Inner-LLM stage of the holitom pass (LLaVA-OneVision, Qwen2-VL / GPT4Scene, Idefics3 / T2Vid, VideoLLM-online's
stream).

Inner-LLM stage (spec §2; ``inner_layer=K``, off by default; ``outer=False`` runs it alone). Decoder layers ``K..N-1``
of the working copy's language model are replaced by :class:`InnerMergeLayer` wrappers (the ``ModuleList`` entries of
the copy; the classes are untouched). The forward / generate wrappers pass one extra keyword down to the layers,
``vopt_holitom_tokens`` (``[B, L]`` int8 from :func:`token_codes`: 1 visual token that may be merged, 0 any other
real token, -1 padding; added to ``forward``'s signature by :func:`forward_signature` so ``generate`` forwards it).
Which tokens are visual is the family's choice: LLaVA-OV's video placeholders; Qwen2-VL's video placeholders (the BEV
image and ``vopt_holitom_protect``-ed patches stay 0: never merged); Idefics3's ``<image>`` tokens (the frames; the
wrapper tokens and text stay 0); a stream's frame patch tokens (handed over per frame, below).

Merging. At a prefill (several tokens and an empty cache *at layer K*), layer K scores the visual tokens with the
attention its own normed ``q``/``k`` projections + RoPE give them from each row's last ``inner_queries`` real tokens
(no attention probabilities are requested from the kernel, so SDPA stays; the scoring queries themselves are never
merged away), and :func:`vopt.merging.inner.inner_merge` keeps ``ceil(inner_keep * n)`` per row and averages each
dropped token into its most similar kept one (``inner_merge=False``: FastV-style dropping). Layers ``K..N-1`` then
run on the kept tokens with their *original* RoPE positions and mask rows/columns (gapped, as in the published code);
rows that keep different counts (after the outer stage) are filled with masked filler slots. The last layer maps its
output back to the input length (a dropped position gets its representative's state), so logits keep the layout
described in the family modules.

Later tokens. The caches of layers ``>= K`` hold only the kept tokens, layer 0's every token: positions continue from
the full length (HF and the stream count layer 0's cache). Each cache object gets a column map (which full positions
its layer-``>= K`` entries are; weakly keyed, so concurrent streams do not mix), and every later call on it (decode
steps, text chunks) gets its mask columns mapped onto those entries. A stream (VideoLLM-online) prefills frame after
frame onto one cache through the model's own ``extend``; its ``prefill_frame`` wrapper hands this stage the frame's
codes for that one call (:attr:`_InnerState.pending`: the frame's patch tokens 1, the interval token and the CLS 0),
so every frame is merged at layer K as it arrives, scored by its last token's attention over the cached entries and
the frame (as the model itself computes it there). The language model then runs **eagerly** (the wrapper refuses
``torch.export``: token choice depends on the data; the report shows the reason). Tested: keep=1 is bit-identical,
batch rows (right/left padding, ragged) equal single rows, the scores equal HF eager attention probabilities, and on
Qwen2-VL, Idefics3 and the stream the logits equal the unmodified model's with the dropped tokens masked out of layers
``>= K`` (forward, decode steps, left-padded ``generate``, frame after frame, a text turn and the reply).

The language model is found as ``model.model.language_model`` (LLaVA-OV, Qwen2-VL), ``model.model.text_model``
(Idefics3) or ``model.language_model.model`` (a stream's ``*ForCausalLM``); its decoder layers must have
Qwen2/Llama-style attention (``q_proj`` / ``k_proj`` / ``head_dim``) and their module an ``apply_rotary_pos_emb``
taking ``cos, sin [B, L, head_dim]``. Qwen2-VL's M-RoPE qualifies: its rotary embedding already folds the three
position rows into one ``[B, L, head_dim]`` table, so gathering the kept tokens' rows of that table keeps each
token's 3-D position; decode steps continue at ``cache length + rope_deltas`` with the cache length of layer 0, as
unmerged. ``K >= 1`` (layer 0's cache must hold every token).
"""
from __future__ import annotations

import copy
import inspect
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from ...errors import ConfigError
from ..flops import paper_prefill_flops
from ..inner import inner_merge, last_token_importance
from .common import TOKENS_KWARG, InnerStats

if TYPE_CHECKING:  # annotations only (the pass module imports this one)
    from vopt.passes.holitom import HoliTomPassConfig


def token_codes(ids: torch.Tensor, attention_mask: Optional[torch.Tensor], visual_id: int,
                protect: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, L]`` int8 codes for the decoder layers: 1 where ``ids == visual_id`` (and not ``protect``), 0 at other
    real tokens, -1 at padding (``attention_mask == 0``)."""
    visual = ids == visual_id
    if protect is not None:
        visual &= ~protect.to(torch.bool)
    codes = visual.to(torch.int8)
    if attention_mask is not None:
        codes = codes.masked_fill(attention_mask == 0, -1)
    return codes


def forward_signature(cls_forward, cfg: HoliTomPassConfig) -> inspect.Signature:
    """``cls_forward``'s signature, plus the keyword-only ``vopt_holitom_tokens`` when the inner stage is on:
    ``generate()`` validates its kwargs against the forward's signature and must let the codes through."""
    sig = inspect.signature(cls_forward)
    if cfg.inner_layer is None:
        return sig
    params = list(sig.parameters.values())
    extra = inspect.Parameter(TOKENS_KWARG, inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    return sig.replace(parameters=params[:at] + [extra] + params[at:])


@dataclass
class _Columns:
    """What the caches of layers ``K..N-1`` hold for one cache object (the merged-away tokens are missing there).

    ``cols [B, C]``: the full-sequence position of each of their first ``C`` entries (filler entries repeat a
    neighbour's); ``valid [B, C]``: False at filler entries (rows of a batch that kept fewer tokens), None when there
    are none; every full position ``>= end`` was appended after the last merge and is present, in order."""

    cols: torch.Tensor
    valid: Optional[torch.Tensor]
    end: int

    def present(self, past: int) -> tuple:
        """``(cols, valid)`` of all entries before a call whose first token is at full position ``past``."""
        B = self.cols.shape[0]
        later = torch.arange(self.end, past, device=self.cols.device).expand(B, -1)
        valid = None if self.valid is None else torch.cat([self.valid, self.valid.new_ones(later.shape)], 1)
        return torch.cat([self.cols, later], 1), valid


@dataclass
class _Call:
    """One forward through layers K..N-1: the keyword arguments they get, and for a merging call its shortened hidden
    states and the map back to the input length."""

    layer_kwargs: dict
    hidden: Optional[torch.Tensor] = None
    back: Optional[torch.Tensor] = None


class _InnerState:
    """Shared by the wrappers of layers K..N-1 of one model: the column map of every cache those layers filled
    (:class:`_Columns`, weakly keyed by the cache object, so concurrent streams do not mix and a cache's entry dies
    with it) and the call in flight.

    A call merges when it brings token codes for exactly its tokens with visual ones among them and either starts an
    empty cache (a prefill: the family wrappers' ``vopt_holitom_tokens``) or was handed codes by a stream
    (:attr:`pending`: a later frame of the same cache). Any other call on a cache that was merged (decode steps,
    text chunks) gets its mask columns mapped to the entries that exist at layers ``>= K``.
    """

    def __init__(self, stats: InnerStats, text_config, layers: int):
        self.stats, self._text_config, self._layers = stats, text_config, layers
        self.caches = weakref.WeakKeyDictionary()
        self.call: Optional[_Call] = None
        #: ``[B, L]`` codes for the next call only (a stream's ``prefill_frame`` hands them over: it calls the LM
        #: through the model's own ``extend``, which passes no extra keyword).
        self.pending: Optional[torch.Tensor] = None

    def __deepcopy__(self, memo):   # a copied model starts with no cache maps (its stats stay tied to its own)
        new = _InnerState(copy.deepcopy(self.stats, memo), self._text_config, self._layers)
        memo[id(self)] = new
        return new

    def start(self, layer: torch.nn.Module, rope, cfg: HoliTomPassConfig, hidden: torch.Tensor,
              tokens: Optional[torch.Tensor], kwargs: dict) -> None:
        """At layer K: decide what this call does (module docstring) and prepare the kwargs of layers K..N-1."""
        self.call = None
        pending, self.pending = self.pending, None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        B, L, _ = hidden.shape
        here = int(cache.get_seq_length(layer.self_attn.layer_idx)) if cache is not None else 0
        past = int(cache.get_seq_length(0)) - L if cache is not None else 0  # full positions before this call
        stored = self.caches.get(cache) if cache is not None else None
        if here == 0 and stored is not None:     # the cache was emptied (reset / a fresh start): forget its map
            del self.caches[cache]
            stored = None
        # the entries layers >= K hold before this call: (full positions, valid) of a merged cache, else all of them
        cols, valid = stored.present(past) if stored is not None else (None, None)
        if cols is not None and cols.shape[1] != here:
            raise RuntimeError(f"holitom inner merging: layer {layer.self_attn.layer_idx}'s cache holds {here} entries "
                               f"but {cols.shape[1]} were expected; the cache was changed outside the model "
                               "(cropped?), which the merged-away columns cannot follow")
        codes = pending if pending is not None else tokens
        visual = codes is not None and tuple(codes.shape) == (B, L) and bool((codes == 1).any())
        if L > 1 and (here == 0 or pending is not None) and not visual:
            self.stats.skipped += 1
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
            raise NotImplementedError(f"holitom inner merging needs a 4-D tensor attention mask or None, got "
                                      f"{type(mask).__name__} (use attn_implementation='sdpa' or 'eager')")
        if not (L > 1 and visual and (here == 0 or pending is not None)):
            if stored is not None:               # later tokens of a merged cache: drop the missing columns
                rows = torch.arange(L, device=hidden.device).expand(B, L)
                m = _layer_mask(mask, rows, torch.cat([cols, past + rows], 1), valid, None, past, L)
                self.call = _Call({"attention_mask": m})
            return
        # A merging call: score the visual tokens from each row's last t real tokens (right padding puts pads last).
        visual, real = codes == 1, codes >= 0
        cos, sin = kwargs["position_embeddings"]
        attn, t = layer.self_attn, min(cfg.inner_queries, int(real.sum(1).min()))
        ar = torch.arange(L, device=hidden.device).expand(B, L)
        q_pos = torch.sort(torch.where(real, ar, -1), dim=1).values[:, L - t:]          # [B, t] increasing
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(_take(x, q_pos)).view(B, t, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(B, L, -1, attn.head_dim).transpose(1, 2)
        q = rope(q, q, _take(cos, q_pos), _take(sin, q_pos))[0]
        k = rope(k, k, cos, sin)[1]
        if cols is None:                         # nothing merged on this cache yet: every earlier entry is there
            cols = torch.arange(past, device=hidden.device).expand(B, past)
        key_mask, earlier = real, _cached_keys(cache, attn.layer_idx, here)
        if earlier is not None:  # a later chunk (a stream's frame): its last token also attends to the cached entries
            seen = torch.ones(B, here, dtype=torch.bool, device=hidden.device) if valid is None else valid.clone()
            if mask is not None:                 # ... that the model's own mask lets its last query see
                row = mask.expand(B, *mask.shape[1:])[:, 0].gather(1, q_pos[:, -1:, None].expand(B, 1, mask.shape[-1]))
                row = row[:, 0].gather(1, cols)
                seen &= row if row.dtype == torch.bool else row == 0
            k, key_mask = torch.cat([earlier.to(k.dtype), k], 2), torch.cat([seen, real], 1)
        imp = last_token_importance(q, k, key_mask, q_pos + here)[:, here:]
        # the scoring queries are never merged away (a stream's frame ends with a visual token, whose logits are read)
        visual = visual.scatter(1, q_pos, False)
        im = inner_merge(hidden, imp, visual, cfg.inner_keep, merge=cfg.inner_merge)
        self._count(visual, cfg, im)
        idx = im.keep_idx
        new_valid = im.valid if im.ragged else None
        if valid is None and new_valid is not None:
            valid = torch.ones(cols.shape, dtype=torch.bool, device=idx.device)
        layer_kwargs = {"position_embeddings": (_take(cos, idx), _take(sin, idx))}
        if kwargs.get("position_ids") is not None:
            layer_kwargs["position_ids"] = _take(kwargs["position_ids"], idx)
        layer_kwargs["attention_mask"] = _layer_mask(mask, idx, torch.cat([cols, past + idx], 1), valid, new_valid,
                                                     past, L)
        self.call = _Call(layer_kwargs, im.hidden, im.back)
        if cache is not None:
            all_valid = None if valid is None and new_valid is None else torch.cat(
                [valid, new_valid if new_valid is not None else torch.ones_like(idx, dtype=torch.bool)], 1)
            self.caches[cache] = _Columns(torch.cat([cols, past + idx], 1), all_valid, past + L)

    def _count(self, visual: torch.Tensor, cfg: HoliTomPassConfig, im) -> None:
        self.stats.prefills += 1
        self.stats.visual_before += im.visual_before
        self.stats.visual_after += im.visual_after
        text, n_layers = self._text_config, self._layers
        for n in visual.sum(1).tolist():
            f = lambda **kw: paper_prefill_flops(n_layers, text.hidden_size, text.intermediate_size, n, **kw)
            self.stats.paper_flops_before += f()
            self.stats.paper_flops_after += f(inner_layer=cfg.inner_layer, inner_keep=cfg.inner_keep)


def _cached_keys(cache, layer_idx: int, here: int) -> Optional[torch.Tensor]:
    """The keys (RoPE applied) that layer ``layer_idx``'s cache holds, ``[B, Hkv, here, hd]``, or None when it holds
    none or is not a transformers layered cache (then a later chunk is scored on its own keys only)."""
    layers = getattr(cache, "layers", None) if here else None
    keys = getattr(layers[layer_idx], "keys", None) if layers is not None and layer_idx < len(layers) else None
    return keys if isinstance(keys, torch.Tensor) and keys.dim() == 4 and keys.shape[2] == here else None


def _layer_mask(mask: Optional[torch.Tensor], rows: torch.Tensor, cols: torch.Tensor,
                col_valid: Optional[torch.Tensor], row_valid: Optional[torch.Tensor], past: int,
                length: int) -> Optional[torch.Tensor]:
    """The 4-D mask of layers >= K for a call whose tokens at chunk positions ``rows [B, q]`` reach them, attending
    to the cache entries at full positions ``cols [B, C + q]`` (the last ``q`` are the call's own).

    ``mask``: the model's mask ``[B|1, H|1, length, past + length]`` over the full sequence (None: causal within the
    call, everything before it allowed). ``col_valid [B, C]``: False at filler entries already in the cache;
    ``row_valid [B, q]``: False at this call's filler slots (nobody attends to them; each attends only to itself:
    finite, never read). None is returned when the model's mask was None and nothing needs masking (SDPA keeps its
    causal fast path)."""
    B, q = rows.shape
    C = cols.shape[1] - q
    if mask is None:
        if row_valid is None and col_valid is None and (C == 0 or q == 1):
            return None
        ar = torch.arange(past + length, device=rows.device)
        chunk = torch.arange(length, device=rows.device)
        mask = ((ar[None, :] < past) | (ar[None, :] - past <= chunk[:, None]))[None, None]   # [1, 1, L, past + L]
    m = mask.expand(B, *mask.shape[1:])
    m = m.gather(2, rows[:, None, :, None].expand(B, m.shape[1], q, m.shape[3]))
    m = m.gather(3, cols[:, None, None, :].expand(B, m.shape[1], q, cols.shape[1]))
    off, on = _off_on(m)
    if col_valid is not None:
        m = m.masked_fill(~torch.cat([col_valid, col_valid.new_ones(B, q)], 1)[:, None, None, :], off)
    if row_valid is not None:
        eye = torch.zeros(q, C + q, dtype=torch.bool, device=m.device)
        eye[:, C:] = torch.eye(q, dtype=torch.bool, device=m.device)
        filler_row = ~row_valid[:, None, :, None]
        m = m.masked_fill(~torch.cat([row_valid.new_ones(B, C), row_valid], 1)[:, None, None, :] | filler_row, off)
        m = m.masked_fill(filler_row & eye[None, None], on)
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
            if st.call is not None and st.call.hidden is not None:
                hidden_states = st.call.hidden
        call = st.call
        if call is not None:
            kwargs.update(call.layer_kwargs)
        out = self.layer(hidden_states, **kwargs)
        if self.last and call is not None:
            if call.back is not None:   # back to the input's length: a dropped token gets its representative's state
                out = out.gather(1, call.back[..., None].expand(*call.back.shape, out.shape[-1]))
            st.call = None
        return out


#: Where the decoder stack lives: LLaVA-OV / Qwen2-VL, Idefics3, a bare ``*ForCausalLM`` as ``language_model``
#: (VideoLLM-online).
_DECODER_PATHS = ("model.language_model", "model.text_model", "language_model.model")

#: Instance attribute (working copy) holding the inner stage's :class:`_InnerState` (a stream hands it its codes).
INNER_STATE_ATTR = "vopt_holitom_inner"


def _decoder(model):
    for path in _DECODER_PATHS:
        m = model
        for name in path.split("."):
            m = getattr(m, name, None)
        if isinstance(getattr(m, "layers", None), torch.nn.ModuleList) and len(m.layers):
            return m
    return None


def install_inner(model, cfg: HoliTomPassConfig, stats: InnerStats) -> str:
    """Wrap layers K..N-1 of the model's language model (module docstring); returns a description for the report."""
    import importlib

    lm = _decoder(model)
    if lm is None:
        raise ConfigError(f"holitom inner merging: {type(model).__name__} has none of "
                          f"{', '.join(p + '.layers' for p in _DECODER_PATHS)} (a decoder-layer ModuleList)")
    layers = lm.layers
    n = len(layers)
    if not 1 <= cfg.inner_layer < n:
        raise ConfigError(f"HoliTomPassConfig.inner_layer={cfg.inner_layer} is out of range: the language model has "
                          f"{n} layers (accepted: 1..{n - 1}; layer 0's cache must hold every token, its length "
                          "numbers the positions of later tokens)")
    attn = layers[cfg.inner_layer].self_attn
    rope = getattr(importlib.import_module(type(attn).__module__), "apply_rotary_pos_emb", None)
    if rope is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "head_dim")):
        raise ConfigError(f"holitom inner merging: {type(attn).__name__} has no q_proj/k_proj/head_dim or its module "
                          "no apply_rotary_pos_emb (Qwen2/Llama-style attention is expected)")
    state = _InnerState(stats, lm.config, n)
    setattr(model, INNER_STATE_ATTR, state)
    for i in range(cfg.inner_layer, n):
        layers[i] = InnerMergeLayer(layers[i], state, rope, cfg, first=i == cfg.inner_layer, last=i == n - 1)
    how = "merge" if cfg.inner_merge else "prune"
    return (f"inner K={cfg.inner_layer}/{n} keep={cfg.inner_keep:g} ({how}, last {cfg.inner_queries} "
            f"quer{'y' if cfg.inner_queries == 1 else 'ies'} score)")

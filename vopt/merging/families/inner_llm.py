"""Inner-LLM stage of the holitom pass (LLaVA-OneVision, Qwen2-VL / GPT4Scene, Idefics3 / T2Vid).

Inner-LLM stage (spec §2; ``inner_layer=K``, off by default; ``outer=False`` runs it alone). Decoder layers ``K..N-1``
of the working copy's language model are replaced by :class:`InnerMergeLayer` wrappers (the ``ModuleList`` entries of
the copy; the classes are untouched). The forward / generate wrappers pass one extra keyword down to the layers,
``vopt_holitom_tokens`` (``[B, L]`` int8 from :func:`token_codes`: 1 visual token that may be merged, 0 any other
real token, -1 padding; added to ``forward``'s signature by :func:`forward_signature` so ``generate`` forwards it).
Which tokens are visual is the family's choice: LLaVA-OV's video placeholders; Qwen2-VL's video placeholders (the BEV
image and ``vopt_holitom_protect``-ed patches stay 0: never merged); Idefics3's ``<image>`` tokens (the frames; the
wrapper tokens and text stay 0).
At a prefill (several tokens and an empty cache *at layer K*), layer K scores the visual
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

The language model is found as ``model.model.language_model`` (LLaVA-OV, Qwen2-VL) or ``model.model.text_model``
(Idefics3); its decoder layers must have Qwen2/Llama-style attention (``q_proj`` / ``k_proj`` / ``head_dim``) and
their module an ``apply_rotary_pos_emb`` taking ``cos, sin [B, L, head_dim]``. Qwen2-VL's M-RoPE qualifies: its
rotary embedding already folds the three position rows into one ``[B, L, head_dim]`` table, so gathering the kept
tokens' rows of that table keeps each token's 3-D position; decode steps continue at ``cache length + rope_deltas``
with the cache length of layer 0 (which holds every token), as unmerged.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import inspect

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
        later = torch.arange(self.full_len, mask.shape[-1], device=mask.device).expand(B, -1)
        cols = torch.cat([self.keep_idx, later], 1)
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


def install_inner(model, cfg: HoliTomPassConfig, stats: InnerStats) -> str:
    """Wrap layers K..N-1 of the model's language model (module docstring); returns a description for the report."""
    import importlib

    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None) or getattr(inner, "text_model", None)
    layers = getattr(lm, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ConfigError(f"holitom inner merging: {type(model).__name__} has no model.language_model.layers or "
                          "model.text_model.layers (a decoder-layer ModuleList is expected)")
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

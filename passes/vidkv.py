"""``vidkv``: generate with a packed VidKV / KIVI KV cache (:class:`vopt.kvcache.cache.VidKVCache`).

What it does. A **runtime** pass on vopt's working copy (``vopt.optimize`` never touches the caller's model). For a
model that can generate (a transformers ``GenerationMixin`` whose ``can_generate()`` is true and whose text config has
``num_hidden_layers``), it

1. attaches a cache factory, :class:`VidKVCacheFactory`, as the instance attribute :data:`FACTORY_ATTR`
   (``model.vopt_vidkv_cache``): ``model.vopt_vidkv_cache(input_ids=...)`` returns a fresh :class:`VidKVCache`
   configured by this pass;
2. wraps ``generate`` **on that instance only** (a bound method stored as an instance attribute, shadowing the class
   method; transformers and the model class are never patched; ``copy.deepcopy`` rebinds it to the copy): when the
   caller passes no ``cache`` / ``past_key_values``, no ``cache_implementation`` and not ``use_cache=False``, it adds
   ``cache=model.vopt_vidkv_cache(input_ids)``, a fresh cache per call, then calls the class's ``generate``. This is
   transformers 5.x's own plug-in path (``generate(cache=...)``, spec ``kvcache.md`` §5), not a patch of
   ``cache_implementation``. A caller-supplied cache always wins. ``optimized.generate(**inputs)`` reaches the
   wrapper through ``OptimizedModel.__getattr__`` (and ``CapturedStage.__getattr__`` when the root is a stage).

Streaming models (VideoLLM-online's protocol: no ``generate``, but ``model.new_cache()`` hands the caller a persistent
cache that ``model.language_model`` extends frame after frame and answer after answer): the pass shadows
``new_cache`` on the working copy instead, so the stream's cache is a fresh :class:`VidKVCache` (append-only packed
blocks, full-precision window, ``protect_first``). Prompt-dependent protection (``protect_text``,
``protect_salient``) and ``fused_decode`` are not applied to a stream (the match says so).

The numerics are the nested :class:`~vopt.kvcache.VidKVConfig` (``mode='recommended'`` by default;
``mode='reference'``; KIVI-2 is ``vidkv=kivi_config()`` or its fields); ``flush`` picks the update policy
(``'append'``, recommended, or the reference's ``'requantize'``). ``residual_length`` is the full-precision
window, ``protect_first`` the number of leading prompt tokens kept in full precision, ``protect_text`` also keeps
every prompt position that is not a video/image placeholder in full precision (positions where any row holds a
non-visual token). Prefill attends to exact K/V (``prefill_exact``), so only decode steps see quantized K/V.

Salient-token protection (spec §1.4, "STP"; :mod:`vopt.kvcache.salience`). ``protect_salient = p > 0`` keeps
``round(p · N_v)`` visual tokens per row in full precision (union over rows: protection is per position; union with
``protect_first`` / ``protect_text``), chosen by ``salience``:

* ``'text_similarity'`` (the reference's score): mean raw dot product of each visual token's LLM input embedding
  (after the projector) with the input embeddings of the text after the video (question + assistant prompt; all
  non-visual tokens when nothing follows the video);
* ``'last_token_attention'``: layer 0's attention of the last prompt token to the visual keys (post-RoPE, averaged
  over heads; layer 0 only, because protection must be decided before layer 0's cache update);
* ``'random'``: seeded random visual tokens (the paper's control, v2 Tab. 3).

*How the embeddings are obtained* (spec §3 "Modality plumbing"): a forward **pre-hook with kwargs on the decoder**
(``model.get_decoder()``, e.g. the Qwen2 ``language_model`` of LLaVA-OneVision), registered on the working copy by
this pass. The multimodal wrapper calls the decoder with ``inputs_embeds`` (visual features already scattered into the
placeholder positions) and ``cache=...``; when that cache carries a salience request (set by the factory from
``input_ids``) and is still empty (the prefill), the hook scores the tokens and calls ``cache.protect(...)`` before any
layer's ``update``. Cost: no extra vision-tower or projector run and no second forward; ``text_similarity`` is one
``[N_v, N_t]`` matmul per row, ``last_token_attention`` one layer-0 RMSNorm + K projection over the prompt and a
Q projection of one token per row (~1/L of a layer's prefill work). The request is consumed once; decode steps and
caches without a request are untouched. A prefill whose ``inputs_embeds`` length differs from ``input_ids`` (e.g.
chunked prefill) gets no salient protection.

Fused decode (``fused_decode=True``, spec §3 "Decode path"). The pass registers ``vopt_vidkv_<inner>`` with
transformers' attention and mask interfaces (``<inner>`` = the text decoder's implementation at pass time, e.g.
``sdpa``, whose mask function it reuses) and switches the working copy's *text* config to it. Caches made by the
factory while that switch holds return a :class:`~vopt.kvcache.cache.PackedKV` handle from single-token decode
updates instead of dequantized K/V, and the attention function computes
:meth:`~vopt.kvcache.cache.VidKVLayer.decode_attention` on the packed codes (keys scored on codes / in the frequency
domain, values contracted on codes: :func:`vopt.kvcache.packed_decode_attention`; no ``[B, H, T, D]`` K/V is formed);
everything else (prefill, other caches) goes to ``<inner>`` unchanged. Same tokens as the dequantizing path (tested).
On CUDA with no attention mask (batch 1 / no padding) a fused kernel runs over the cache's append-only blocks joined
into one container (:meth:`~vopt.kvcache.cache.VidKVLayer.merged_blocks`, re-joined only when a block is added): the
CUDA library's (:mod:`vopt.kvcache.decode_cuda`, split over tokens), else the Triton one
(:mod:`vopt.kernels.vidkv_decode`); otherwise, and on CPU, the torch implementation runs (on CPU it is slower than
dequantize + SDPA at these sizes). Neither fused kernel has run on a GPU yet (the CUDA one runs emulated on the CPU
in the tests).

Why **not a default pass**: KV quantization changes generated tokens after the first one. Opt in with
``vopt.optimize(model, passes=["vidkv"])``.

Report: one :class:`Match` per decoder layer (``language_model.layers.<i>``, ``what`` = the cache settings), or one
skipped match with the reason (no ``generate`` and no streaming ``new_cache``, no ``num_hidden_layers``,
non-full-attention layers).
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Optional

import torch

from vopt.config import VoptConfig, config_field, register_config
from vopt.errors import ConfigError
from vopt.kvcache import VidKVConfig
from vopt.kvcache.cache import FLUSH_POLICIES, PackedKV, VidKVCache
from vopt.kvcache.salience import SALIENCE_METHODS, by_last_token_attention, by_random, by_text_similarity
from vopt.pass_protocol import Match, Pass, PassContext, PassKind, PassResult, register_pass

#: Instance attribute holding the cache factory on the working copy.
FACTORY_ATTR = "vopt_vidkv_cache"
#: Marker on the wrapped ``generate`` (idempotence).
_WRAPPED = "_vopt_vidkv_wrapped"
#: Attribute of a fresh cache holding its pending salience request (consumed by the decoder pre-hook at prefill).
SALIENCE_ATTR = "vopt_salience_request"


@register_config
@dataclass
class VidKVPassConfig(VoptConfig):
    """Config of the ``vidkv`` pass."""

    vidkv: VidKVConfig = config_field(
        default_factory=VidKVConfig,
        help="Quantizer numerics (VidKVConfig): mode 'recommended' (default) or 'reference'; KIVI-2 is "
        "vopt.kvcache.kivi_config().",
    )
    residual_length: int = config_field(128, help="Full-precision window R in tokens (spec §1, default 128).")
    protect_first: int = config_field(
        0, help="Leading prompt tokens kept in full precision forever (e.g. 1: BOS/sink).")
    protect_text: bool = config_field(
        False, help="Also keep every prompt position that is not a video/image placeholder token in full precision."
    )
    flush: str = config_field(
        "append", help="'append' (KIVI-style append-only blocks, key split frozen at the first block; recommended) or "
        "'requantize' (the published VidKV flush: re-quantize the whole cache when the window fills; reproduction).")
    prefill_exact: bool = config_field(True, help="Prefill attends to exact K/V (VidKV and KIVI); decode steps see "
                                       "the quantized cache.")
    protect_salient: float = config_field(
        0.0, help="Share of visual tokens kept in full precision, chosen by `salience` at prefill (0 = off; the "
        "reference STP uses 0.2, at 2 bits rather than full precision).")
    salience: str = config_field(
        "text_similarity", help="'text_similarity' (mean dot product of visual vs question input embeddings, the "
        "reference score), 'last_token_attention' (layer-0 attention of the last prompt token) or 'random' (control).")
    salience_seed: int = config_field(0, help="Seed of salience='random'.")
    fused_decode: bool = config_field(
        False, help="Decode steps attend on the packed codes (vopt.kvcache.packed_decode_attention: no dequantized "
        "K/V) through an attention function this pass installs on the text decoder; False: the cache returns "
        "dequantized K/V to the model's own attention.")

    def validate(self) -> None:
        name = type(self).__name__
        if not isinstance(self.vidkv, VidKVConfig):
            raise ConfigError(f"{name}.vidkv must be a VidKVConfig, got {type(self.vidkv).__name__}")
        for f in ("residual_length", "protect_first"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}.{f} must be an integer >= 0, got {v!r}")
        if self.flush not in FLUSH_POLICIES:
            raise ConfigError(f"{name}.flush must be one of {', '.join(FLUSH_POLICIES)}, got {self.flush!r}")
        p = self.protect_salient
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise ConfigError(f"{name}.protect_salient must be a number in [0, 1] (0 = off), got {p!r}")
        if self.salience not in SALIENCE_METHODS:
            raise ConfigError(f"{name}.salience must be one of {', '.join(SALIENCE_METHODS)}, got {self.salience!r}")
        if isinstance(self.salience_seed, bool) or not isinstance(self.salience_seed, int):
            raise ConfigError(f"{name}.salience_seed must be an integer, got {self.salience_seed!r}")
        if not isinstance(self.fused_decode, bool):
            raise ConfigError(f"{name}.fused_decode must be True or False, got {self.fused_decode!r}")


def _visual_token_ids(config) -> list:
    ids = []
    for attr in ("video_token_id", "image_token_id", "video_token_index", "image_token_index"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    return ids


class VidKVCacheFactory:
    """Builds a fresh :class:`VidKVCache` for one ``generate`` call (:data:`FACTORY_ATTR` on the working copy)."""

    def __init__(self, model_config, cfg: VidKVPassConfig):
        self.model_config = model_config
        self.cfg = cfg
        self.visual_ids = _visual_token_ids(model_config)

    def __call__(self, input_ids: Optional[torch.Tensor] = None) -> VidKVCache:
        c = self.cfg
        protected = None
        if c.protect_text and input_ids is not None and input_ids.dim() == 2:
            visual = torch.isin(input_ids, torch.tensor(self.visual_ids, device=input_ids.device))
            protected = (~visual).any(0)
        text = self.model_config.get_text_config(decoder=True) if hasattr(self.model_config, "get_text_config") \
            else self.model_config
        # Only hand out PackedKV handles while the decoder still runs our attention function (another pass may
        # have switched the implementation since): any other function would receive a handle instead of K/V.
        fused = c.fused_decode and str(getattr(text, "_attn_implementation", "")).startswith(ATTN_PREFIX)
        cache = VidKVCache(self.model_config, c.vidkv, residual_length=c.residual_length,
                           protect_first=c.protect_first, protected=protected, prefill_exact=c.prefill_exact,
                           flush=c.flush, fused_decode=fused)
        if c.protect_salient > 0 and input_ids is not None and input_ids.dim() == 2 and self.visual_ids:
            setattr(cache, SALIENCE_ATTR, SalienceRequest(input_ids, self.visual_ids, c.salience,
                                                          float(c.protect_salient), c.salience_seed))
        return cache


# ---- fused decode: the attention function that reads PackedKV handles ----------------------------------------------

#: Prefix of the attention implementations this pass registers: ``vopt_vidkv_<inner>`` wraps ``<inner>``.
ATTN_PREFIX = "vopt_vidkv_"


def _inner_attention(module, inner: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if inner in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[inner]
    import importlib

    return getattr(importlib.import_module(type(module).__module__), "eager_attention_forward")


def make_attention_forward(inner: str):
    """transformers ``AttentionInterface`` function: decode steps whose cache returned :class:`PackedKV` attend on
    the packed codes (:meth:`VidKVLayer.decode_attention`); everything else goes to the ``inner`` implementation
    unchanged (prefill, non-VidKV caches)."""

    def vidkv_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                scaling: Optional[float] = None, **kwargs):
        if isinstance(key, PackedKV):
            out = key.layer.decode_attention(query, attention_mask, scaling)
            return out.transpose(1, 2).contiguous(), None
        return _inner_attention(module, inner)(module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, **kwargs)

    return vidkv_attention_forward


def install_fused_decode(model) -> Optional[str]:
    """Switch the text decoder's attention to ``vopt_vidkv_<current>`` (registered with transformers' attention and
    mask interfaces, the mask being the current implementation's). Returns None, or why it cannot."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    text = model.config.get_text_config(decoder=True)
    inner = getattr(text, "_attn_implementation", None) or "eager"
    if inner.startswith(ATTN_PREFIX):
        return None
    if inner not in ALL_MASK_ATTENTION_FUNCTIONS and inner != "eager":
        return f"attention implementation {inner!r} has no registered mask function"
    name = ATTN_PREFIX + inner
    AttentionInterface.register(name, make_attention_forward(inner))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    text._attn_implementation_internal = name  # the text config only (not its vision siblings)
    return None


@dataclass
class SalienceRequest:
    """What the decoder pre-hook needs at prefill (stored on a fresh cache as :data:`SALIENCE_ATTR`)."""

    input_ids: torch.Tensor
    visual_ids: list
    method: str
    fraction: float
    seed: int = 0


def _layer0_last_query_keys(decoder, h_in: torch.Tensor, last: int, position_ids: Optional[torch.Tensor]):
    """Layer 0's post-RoPE query of position ``last`` ``[H, D]`` and keys of positions ``0..last`` ``[Hkv, t, D]``
    for one row ``h_in [1, T, d]`` (Llama/Qwen2-style decoders: ``layers[0].input_layernorm``, ``self_attn.q_proj`` /
    ``k_proj``, ``rotary_emb``, the module's ``apply_rotary_pos_emb``)."""
    import sys

    layer = decoder.layers[0]
    attn = layer.self_attn
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    t = last + 1
    h = layer.input_layernorm(h_in[:, :t])
    pos = position_ids[..., :t] if position_ids is not None else torch.arange(t, device=h.device)[None]
    cos, sin = decoder.rotary_emb(h, pos)
    hd = attn.head_dim
    q = attn.q_proj(h[:, -1:]).view(1, 1, -1, hd)
    k = attn.k_proj(h).view(1, t, -1, hd)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    q, _ = rope(q, q, cos[:, -1:], sin[:, -1:])
    _, k = rope(k, k, cos, sin)
    return q[0, :, 0], k[0]


def salient_mask(decoder, inputs_embeds: torch.Tensor, req: SalienceRequest,
                 attention_mask: Optional[torch.Tensor] = None,
                 position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean ``[B, T]``: the salient visual positions of each row (module docstring), from the prefill's
    ``inputs_embeds [B, T, d]`` and ``req.input_ids [B, T]``."""
    ids = req.input_ids.to(inputs_embeds.device)
    B, T = ids.shape
    valid = attention_mask.bool() if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == ids.shape \
        else torch.ones_like(ids, dtype=torch.bool)
    visual = torch.isin(ids, torch.tensor(req.visual_ids, device=ids.device)) & valid
    out = torch.zeros(B, T, dtype=torch.bool, device=ids.device)
    ar = torch.arange(T, device=ids.device)
    for b in range(B):
        vpos = visual[b].nonzero().reshape(-1)
        if vpos.numel() == 0:
            continue
        if req.method == "text_similarity":
            text = valid[b] & ~visual[b] & (ar > vpos[-1])
            if not bool(text.any()):
                text = valid[b] & ~visual[b]
            if not bool(text.any()):
                continue
            e = inputs_embeds[b]
            idx = by_text_similarity(e[vpos], e[text], req.fraction)
        elif req.method == "last_token_attention":
            last = int(valid[b].nonzero().max())
            pid = position_ids[b:b + 1] if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 \
                and position_ids.shape[-1] == T else None
            q, k = _layer0_last_query_keys(decoder, inputs_embeds[b:b + 1], last, pid)
            idx = by_last_token_attention(req.fraction, q_last=q, keys=k, visual_index=vpos,
                                          key_mask=valid[b, : last + 1])
        else:
            idx = by_random(int(vpos.numel()), req.fraction, seed=req.seed)
        out[b, vpos[idx]] = True
    return out


def _as_mask(protected, B: int, T: int, device) -> Optional[torch.Tensor]:
    if protected is None:
        return None
    p = torch.as_tensor(protected, device=device)
    if p.dtype == torch.bool:
        return p if p.shape[-1] == T else None
    m = torch.zeros(T, dtype=torch.bool, device=device)
    m[p.reshape(-1).long()] = True
    return m


def _salience_pre_hook(module, args, kwargs):
    """Decoder forward pre-hook: at the prefill of a cache carrying a :class:`SalienceRequest`, protect the salient
    visual positions (``cache.protect``) before any layer's ``update`` (module docstring)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    req = getattr(cache, SALIENCE_ATTR, None)
    if not isinstance(req, SalienceRequest) or any(layer.is_initialized for layer in cache.layers):
        return None
    setattr(cache, SALIENCE_ATTR, None)  # consumed once
    emb = kwargs.get("inputs_embeds")
    if not isinstance(emb, torch.Tensor) or tuple(emb.shape[:2]) != tuple(req.input_ids.shape):
        return None
    with torch.no_grad():
        mask = salient_mask(module, emb, req, kwargs.get("attention_mask"), kwargs.get("position_ids"))
    B, T = mask.shape
    prev = _as_mask(cache.layers[0].protected, B, T, mask.device)
    cache.protect(mask if prev is None else (mask | prev))
    return None


def _supports_layer0_attention(decoder) -> bool:
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0 or not hasattr(decoder, "rotary_emb"):
        return False
    attn = getattr(layers[0], "self_attn", None)
    return all(hasattr(attn, a) for a in ("q_proj", "k_proj", "head_dim")) and hasattr(layers[0], "input_layernorm")


def _streaming_language_model(model) -> Optional[torch.nn.Module]:
    """The decoder of a streaming model (VideoLLM-online's protocol: ``model.new_cache()`` hands the caller a
    persistent cache that ``model.language_model`` extends frame after frame), or None."""
    lm = getattr(model, "language_model", None)
    if callable(getattr(model, "new_cache", None)) and isinstance(lm, torch.nn.Module) and hasattr(lm, "config"):
        return lm
    return None


def _wrap_new_cache(model) -> None:
    """Shadow ``new_cache`` on this instance: the streaming cache becomes a fresh :class:`VidKVCache` from the factory
    (:data:`FACTORY_ATTR`), so every frame and answer appended to it is stored packed. Class untouched."""

    def new_cache(self):
        return getattr(self, FACTORY_ATTR)()

    new_cache.__doc__ = "A fresh VidKVCache for stream()/respond() (installed by the vidkv pass)."
    setattr(new_cache, _WRAPPED, True)
    model.new_cache = types.MethodType(new_cache, model)


def _wrap_generate(model) -> None:
    """Shadow ``generate`` on this instance with a method that adds ``cache=<fresh VidKVCache>`` (module docstring).

    A bound method (``types.MethodType``), so ``copy.deepcopy`` of the working copy rebinds it to the copy (and to the
    copy's factory); it calls the class's ``generate`` (or an instance-level one that was there before).
    """
    previous = vars(model).get("generate")

    def generate(self, *args, **kwargs):
        supplied = (kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
                    or kwargs.get("cache_implementation") is not None or kwargs.get("use_cache") is False)
        if not supplied:
            ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
            kwargs["cache"] = getattr(self, FACTORY_ATTR)(ids)
        if previous is not None:
            return previous(*args, **kwargs)
        return type(self).generate(self, *args, **kwargs)

    base_doc = type(model).generate.__doc__ or ""
    generate.__doc__ = f"``generate`` with a fresh VidKVCache per call unless a cache is given.\n\n{base_doc}"
    setattr(generate, _WRAPPED, True)
    model.generate = types.MethodType(generate, model)  # instance attribute: the class (and transformers) untouched


@register_pass
class VidKVPass(Pass):
    name = "vidkv"
    summary = "generate() with a packed VidKV / KIVI KV cache (append-only blocks, full-precision window)"
    config_cls = VidKVPassConfig
    kind = PassKind.RUNTIME
    provides = frozenset({"kvcache:vidkv"})
    default = False  # changes generated tokens: opt-in

    def run_runtime(self, model: Any, ctx: PassContext) -> PassResult:
        result = PassResult(self.name, "model")
        kind = type(model).__name__
        can = getattr(model, "can_generate", None)
        streaming = None
        if not callable(getattr(model, "generate", None)) or not (callable(can) and can()):
            streaming = _streaming_language_model(model)
            if streaming is None:
                result.matches.append(Match("model", kind, rewritten=False, reason=(
                    "the model has no transformers generate() and no streaming new_cache() (no KV cache to replace)")))
                return result
        config = streaming.config if streaming is not None else getattr(model, "config", None)
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        n = getattr(text, "num_hidden_layers", None)
        if not isinstance(n, int) or n < 1:
            result.matches.append(Match("model", kind, rewritten=False,
                                        reason="its text config has no num_hidden_layers"))
            return result
        other = sorted(set(getattr(text, "layer_types", None) or ()) - {"full_attention"})
        if other:
            result.matches.append(Match("model", kind, rewritten=False,
                                        reason=f"non-full-attention layers {other} are not supported"))
            return result
        entry = model.new_cache if streaming is not None else model.generate
        if getattr(entry, _WRAPPED, False):
            result.matches.append(Match("model", kind, rewritten=False,
                                        reason=f"{entry.__name__}() is already wrapped"))
            return result
        if streaming is not None:
            return self._run_streaming(model, streaming, n, ctx, result)
        c = self.config
        v = c.vidkv
        what = (f"VidKVLayer mode={v.mode.value} K{v.anomalous_fraction:g}x2bit G={v.key_group_size} "
                f"V={v.value_codec.value}/{v.value_axis.value} R={c.residual_length} protect_first={c.protect_first}"
                f"{' protect_text' if c.protect_text else ''} flush={c.flush}")
        decoder = None
        if c.protect_salient > 0:
            get = getattr(model, "get_decoder", None)
            decoder = get() if callable(get) else None
            reason = None
            if not isinstance(decoder, torch.nn.Module):
                reason = "protect_salient needs model.get_decoder() (the module that receives inputs_embeds)"
            elif not _visual_token_ids(config):
                reason = "protect_salient needs video/image token ids in the model config"
            elif c.salience == "last_token_attention" and not _supports_layer0_attention(decoder):
                reason = ("salience='last_token_attention' needs a Llama/Qwen2-style decoder (layers[0].self_attn."
                          "q_proj/k_proj, input_layernorm, rotary_emb)")
            if reason:
                result.matches.append(Match("model", kind, rewritten=False, reason=reason))
                return result
            what += f" protect_salient={c.protect_salient:g} salience={c.salience}"
        if c.fused_decode:
            what += " fused_decode (attention on packed codes)"
        if not ctx.dry_run:
            if c.fused_decode:
                why = install_fused_decode(model)
                if why:
                    result.matches.append(Match("model", kind, rewritten=False, reason=f"fused_decode: {why}"))
                    return result
            factory = VidKVCacheFactory(config, c)
            setattr(model, FACTORY_ATTR, factory)
            _wrap_generate(model)
            if decoder is not None:
                decoder.register_forward_pre_hook(_salience_pre_hook, with_kwargs=True)
        for i in range(n):
            result.matches.append(Match(f"language_model.layers.{i}", what, rewritten=True))
        return result

    def _run_streaming(self, model, lm, n: int, ctx: PassContext, result: PassResult) -> PassResult:
        """VideoLLM-online-style streaming: ``new_cache()`` returns a VidKVCache (frames and answers append to it).

        Prompt-dependent protection (``protect_text``, ``protect_salient``) needs the prompt ids, which a stream
        does not have up front, and the fused decode attention function is not installed on a bare decoder: those
        options are reported as not applied; the cache itself (append-only packed blocks, full-precision window,
        ``protect_first``) works as with ``generate``.
        """
        c = self.config
        v = c.vidkv
        what = (f"streaming new_cache(): VidKVLayer mode={v.mode.value} K{v.anomalous_fraction:g}x2bit "
                f"G={v.key_group_size} V={v.value_codec.value}/{v.value_axis.value} R={c.residual_length} "
                f"protect_first={c.protect_first} flush={c.flush}")
        ignored = [name for name, on in (("protect_text", c.protect_text), ("protect_salient", c.protect_salient > 0),
                                         ("fused_decode", c.fused_decode)) if on]
        if ignored:
            what += f" (not applied to a stream: {', '.join(ignored)})"
        if not ctx.dry_run:
            setattr(model, FACTORY_ATTR, VidKVCacheFactory(lm.config, c))
            _wrap_new_cache(model)
        for i in range(n):
            result.matches.append(Match(f"language_model.layers.{i}", what, rewritten=True))
        return result

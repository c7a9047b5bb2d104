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

The numerics are the nested :class:`~vopt.kvcache.VidKVConfig` (``mode='recommended'`` by default;
``mode='reference'``; KIVI-2 is ``vidkv=kivi_config()`` or its fields); ``flush`` picks the update policy
(``'append'``, recommended, or the reference's ``'requantize'``). ``residual_length`` is the full-precision
window, ``protect_first`` the number of leading prompt tokens kept in full precision, ``protect_text`` also keeps
every prompt position that is not a video/image placeholder in full precision (positions where any row holds a
non-visual token). Prefill attends to exact K/V (``prefill_exact``), so only decode steps see quantized K/V.

Why **not a default pass**: KV quantization changes generated tokens after the first one. Opt in with
``vopt.optimize(model, passes=["vidkv"])``.

Report: one :class:`Match` per decoder layer (``language_model.layers.<i>``, ``what`` = the cache settings), or one
skipped match with the reason (no ``generate``, no ``num_hidden_layers``, non-full-attention layers).
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Optional

import torch

from vopt.config import VoptConfig, config_field, register_config
from vopt.errors import ConfigError
from vopt.kvcache import VidKVConfig
from vopt.kvcache.cache import FLUSH_POLICIES, VidKVCache
from vopt.pass_protocol import Match, Pass, PassContext, PassKind, PassResult, register_pass

#: Instance attribute holding the cache factory on the working copy.
FACTORY_ATTR = "vopt_vidkv_cache"
#: Marker on the wrapped ``generate`` (idempotence).
_WRAPPED = "_vopt_vidkv_wrapped"


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
        return VidKVCache(self.model_config, c.vidkv, residual_length=c.residual_length,
                          protect_first=c.protect_first, protected=protected, prefill_exact=c.prefill_exact,
                          flush=c.flush)


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
        if not callable(getattr(model, "generate", None)) or not (callable(can) and can()):
            result.matches.append(Match("model", kind, rewritten=False,
                                        reason="the model has no transformers generate() (no KV cache to replace)"))
            return result
        config = getattr(model, "config", None)
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
        if getattr(model.generate, _WRAPPED, False):
            result.matches.append(Match("model", kind, rewritten=False, reason="generate() is already wrapped"))
            return result
        c = self.config
        v = c.vidkv
        what = (f"VidKVLayer mode={v.mode.value} K{v.anomalous_fraction:g}x2bit G={v.key_group_size} "
                f"V={v.value_codec.value}/{v.value_axis.value} R={c.residual_length} protect_first={c.protect_first}"
                f"{' protect_text' if c.protect_text else ''} flush={c.flush}")
        if not ctx.dry_run:
            factory = VidKVCacheFactory(config, c)
            setattr(model, FACTORY_ATTR, factory)
            _wrap_generate(model)
        for i in range(n):
            result.matches.append(Match(f"language_model.layers.{i}", what, rewritten=True))
        return result

"""``sageattention2_hf``: HF transformers attention -> ``vopt::sage_attention`` through ``AttentionInterface``.

What it does. A **runtime** pass (it changes vopt's working copy of the model before capture;
``vopt.optimize`` never touches the caller's model). It switches every transformers sub-model
whose modeling code dispatches attention through ``ALL_ATTENTION_FUNCTIONS.get_interface`` to
the attention implementation :data:`ATTN_NAME` (``"vopt_sage"``), whose function
(:func:`sage_attention_forward`) calls ``torch.ops.vopt.sage_attention`` with a SageAttention2
precision preset (:data:`vopt.ops.sage_attention.PRESETS`). Because the interface call ends in
that custom op, stages captured afterwards contain ``vopt.sage_attention`` nodes, and stages that
fall back to eager (e.g. the Qwen2-VL varlen ViT, which does not export) run the quantized
attention too: the graph pass ``sageattention2`` cannot reach those.

How the switch is made (transformers 5.x, spec shared/specs/attention.md §5):

1. On first use (never at import; idempotent) :func:`register` calls
   ``transformers.AttentionInterface.register("vopt_sage", sage_attention_forward)`` **and**
   ``transformers.masking_utils.AttentionMaskInterface.register("vopt_sage", sdpa_mask)``.
   Without the second, HF's mask creation sees an unknown implementation and skips building the
   mask: padded batches would silently reach attention with ``attention_mask=None``.
2. With ``modules=None`` every outermost ``PreTrainedModel`` of the working copy gets
   ``model.set_attn_implementation("vopt_sage")`` (the public API; it dispatches to all
   sub-models and sub-configs, e.g. LLaVA-OneVision's ``text_config`` and ``vision_config``,
   and warns and skips sub-models that do not use the interface). With ``modules`` (module-path
   prefixes), only the configs that own an attention module under a prefix are switched, the way
   ``set_attn_implementation`` switches a sub-model: ``submodel.get_correct_attn_implementation``
   (validity check) then ``config._attn_implementation_internal = "vopt_sage"`` (the
   non-recursive attribute: the recursive ``_attn_implementation`` setter would also switch the
   config's own sub-configs).
3. Any attention module whose config still is not ``"vopt_sage"`` afterwards (a config no
   ``PreTrainedModel`` owns, e.g. inside a custom wrapper) is switched the same way, if its
   owner supports the interface.

Each switched attention module gets ``module._vopt_sage_precision`` (:data:`PRECISION_ATTR`),
which :func:`sage_attention_forward` reads on every call (falling back to
:data:`vopt.ops.sage_attention.DEFAULT_PRESET`, the config's default, when absent). Attention
modules that share a switched config but lie outside ``modules`` get ``"exact"``, which routes to
transformers' own ``sdpa_attention_forward`` (unchanged numerics) and are reported as skipped.

The attention function follows transformers' ``sdpa_attention_forward`` (5.24) exactly where
semantics are concerned: ``is_causal = is_causal if is_causal is not None else
getattr(module, "is_causal", True)``, then ``is_causal = q_len > 1 and attention_mask is None and
is_causal``; the static-cache prefill crop of K/V to ``q_len``; T5-style ``position_bias`` folded
into the mask; ``softcap`` refused. It honours ``scaling`` and GQA (``enable_gqa`` when
``Hq != Hkv``; K/V are never repeated), ``dropout`` must be 0 (inference only: a clear
``ValueError`` otherwise), and returns ``(out.transpose(1, 2).contiguous(), None)``. Causal masking
is SDPA's top-left alignment, as in HF's sdpa path (the op normalizes it for bottom-right kernels).
head_dim > :data:`~vopt.passes.sageattention2.MAX_HEAD_DIM` stays exact (HF sdpa).

Why **not a default pass**: quantized attention changes the numbers (as ``sageattention2``).
Opt in with ``vopt.optimize(model, passes=["sageattention2_hf"])``.

Ordering: ``before = ("sageattention2",)``. Runtime passes precede graph passes anyway
(the pass manager enforces it); with both in a pipeline the graph pass finds no SDPA left in the
switched models, only the SDPA nodes this pass did not reach.

Report: one :class:`Match` per attention module (module path; ``what`` = class name + preset),
and a skip per sub-model whose class does not support the attention interface (with the reason),
per out-of-scope attention module in a switched config, and per module kept exact for its
head_dim.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

import vopt.ops  # noqa: F401  (registers torch.ops.vopt.sage_attention)
from vopt.config import VoptConfig, config_field, register_config
from vopt.errors import ConfigError
from vopt.ops import sage_attention as sage_op
from vopt.pass_protocol import Match, Pass, PassContext, PassKind, PassResult, register_pass

from .sageattention2 import MAX_HEAD_DIM

#: The attention implementation name registered with transformers' interfaces.
ATTN_NAME = "vopt_sage"
#: Attribute the pass sets on each switched attention module: the preset its calls use.
PRECISION_ATTR = "_vopt_sage_precision"
#: Per-module preset of decoding-phase calls (query length 1); absent = PRECISION_ATTR's.
DECODE_PRECISION_ATTR = "_vopt_sage_decode_precision"
_INTERFACE_MARKERS = ("ALL_ATTENTION_FUNCTIONS", "AttentionInterface")


# ---- config --------------------------------------------------------------------


@register_config
@dataclass
class SageAttention2HFConfig(VoptConfig):
    """Config of the ``sageattention2_hf`` pass."""

    precision: str = config_field(
        sage_op.DEFAULT_PRESET,
        help="Preset of every switched attention module: 'int8_fp8_block' (default; the Triton kernel's numerics), "
        "'int4_fp8', 'int8_fp8', 'int8_fp16' (reference-only today) or 'exact' (transformers' own SDPA).",
    )
    decode_precision: Optional[str] = config_field(
        None,
        help="Preset for decoding-phase calls (one query token against the cache), if it should differ from "
        "`precision` (e.g. 'exact' to keep generation exact while prefill is quantized, or a cheaper preset); "
        "None uses `precision` for both phases.",
    )
    modules: Optional[list[str]] = config_field(
        None,
        help="Module-path prefixes of the working copy (e.g. ['model.language_model']) to restrict the switch to; "
        "None switches the whole model.",
    )

    def validate(self) -> None:
        name = type(self).__name__
        if self.precision not in sage_op.PRESETS:
            raise ConfigError(
                f"{name}.precision={self.precision!r} is not a preset; accepted: {', '.join(sage_op.PRESETS)}"
            )
        if self.decode_precision is not None and self.decode_precision not in sage_op.PRESETS:
            raise ConfigError(f"{name}.decode_precision={self.decode_precision!r} is not a preset; accepted: None, "
                              f"{', '.join(sage_op.PRESETS)}")
        if self.modules is not None:
            if not self.modules:
                raise ConfigError(f"{name}.modules must be None (whole model) or a non-empty list of module-path prefixes")
            for i, m in enumerate(self.modules):
                if not isinstance(m, str) or not m or m.startswith(".") or m.endswith("."):
                    raise ConfigError(
                        f"{name}.modules[{i}]={m!r} is not a module path prefix (e.g. 'model.language_model')"
                    )


# ---- the attention function ------------------------------------------------------


def sage_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    position_bias: Optional[torch.Tensor] = None,
    **kwargs,
) -> tuple:
    """transformers ``AttentionInterface`` function: ``[B, H, N, D]`` inputs -> ``([B, N, Hq, D], None)``.

    Runs ``torch.ops.vopt.sage_attention`` with the preset in ``module._vopt_sage_precision``
    (default :data:`~vopt.ops.sage_attention.DEFAULT_PRESET`); ``"exact"`` and head_dim >
    ``MAX_HEAD_DIM`` delegate to transformers' ``sdpa_attention_forward``. See the module docstring.
    """
    precision = getattr(module, PRECISION_ATTR, None) or sage_op.DEFAULT_PRESET
    if query.shape[2] == 1:  # decoding phase
        precision = getattr(module, DECODE_PRECISION_ATTR, None) or precision
    if precision == "exact" or query.shape[-1] > MAX_HEAD_DIM:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    if dropout:
        raise ValueError(
            f"vopt_sage attention is inference-only: {type(module).__name__} called it with dropout={dropout} "
            "(module in training mode?); call model.eval() or use another attn_implementation for training"
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("vopt_sage attention does not support `softcap` (as transformers' sdpa); use eager attention")
    sage_op.check_preset(precision, what=f"{type(module).__name__}.{PRECISION_ATTR}")

    q_length = query.shape[2]
    # transformers' sdpa_attention_forward, verbatim in effect (5.24):
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if torch.jit.is_tracing() and isinstance(is_causal, torch.Tensor):
        is_causal = is_causal.item()
    kv_length = key.shape[2]
    if is_causal and attention_mask is None and q_length > 1 and kv_length > q_length:
        # empty-StaticCache prefill: top-left causal never sees keys >= q_length
        key = key[:, :, :q_length, :]
        value = value[:, :, :q_length, :]
        if position_bias is not None:
            position_bias = position_bias[:, :, :, :q_length]
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False

    out = torch.ops.vopt.sage_attention(
        query, key, value, attention_mask, 0.0, bool(is_causal), scaling, query.shape[1] != key.shape[1], precision
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register :func:`sage_attention_forward` and ``sdpa_mask`` under :data:`ATTN_NAME` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, sage_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


# ---- finding attention modules -----------------------------------------------------

_USES_INTERFACE: dict = {}


def uses_attention_interface(module: torch.nn.Module) -> bool:
    """Whether ``type(module).forward`` dispatches through transformers' ``AttentionInterface`` (cached per class)."""
    cls = type(module)
    if cls not in _USES_INTERFACE:
        import inspect

        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        _USES_INTERFACE[cls] = any(m in src for m in _INTERFACE_MARKERS) and "get_interface" in src
    return _USES_INTERFACE[cls]


def _in_scope(path: str, prefixes: Optional[list]) -> bool:
    if prefixes is None:
        return True
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def _owner_path(path: str, owners: dict) -> str:
    """The path of the innermost PreTrainedModel containing ``path`` (``owners``: path -> model)."""
    best = None
    for p in owners:
        if p == "" or path == p or path.startswith(p + "."):
            if best is None or len(p) > len(best):
                best = p
    return best


def _can_set(model: Any) -> bool:
    check = getattr(type(model), "_can_set_attn_implementation", None)
    return bool(check()) if check is not None else True


# ---- the pass --------------------------------------------------------------------------


@register_pass
class SageAttention2HFPass(Pass):
    name = "sageattention2_hf"
    summary = "HF AttentionInterface -> vopt::sage_attention (quantized attention in every captured or eager stage)"
    config_cls = SageAttention2HFConfig
    kind = PassKind.RUNTIME
    provides = frozenset({"attention:sage_hf"})
    before = ("sageattention2",)
    default = False  # changes numerics: opt-in (module docstring)

    def run_runtime(self, model: Any, ctx: PassContext) -> PassResult:
        from transformers import PreTrainedModel

        cfg = self.config
        result = PassResult(self.name, "model")
        named = list(model.named_modules())
        owners = {p: m for p, m in named if isinstance(m, PreTrainedModel)}
        if not owners:
            result.matches.append(Match("model", type(model).__name__, rewritten=False,
                                        reason="no transformers PreTrainedModel in the model: nothing to switch"))
            return result
        register()

        # Attention modules (interface users), each with its owner sub-model and the config it reads.
        sites = []  # (path, module, owner_path, config)
        for path, mod in named:
            if isinstance(mod, PreTrainedModel) or not uses_attention_interface(mod):
                continue
            owner = _owner_path(path, owners)
            if owner is None:
                continue
            config = getattr(mod, "config", None)
            if config is None or not hasattr(config, "_attn_implementation_internal"):
                config = owners[owner].config
            sites.append((path, mod, owner, config))

        # Sub-models (distinct configs) that do not support the interface: skipped, with the reason.
        unsupported = {}
        for path, sub in owners.items():
            if not _can_set(sub):
                unsupported[id(sub.config)] = path
                result.matches.append(Match(
                    path or "<root>", type(sub).__name__, rewritten=False,
                    reason=f"{type(sub).__name__} does not support transformers' AttentionInterface (its modeling code "
                    "does not dispatch attention through ALL_ATTENTION_FUNCTIONS); its attention is unchanged"))

        # Which configs to switch.
        wanted = {}  # id(config) -> (config, owner path)
        for path, mod, owner, config in sites:
            if _in_scope(path, cfg.modules) and id(config) not in unsupported:
                wanted.setdefault(id(config), (config, owner))
        if cfg.modules is not None and not any(_in_scope(p, cfg.modules) for p, *_ in sites):
            result.matches.append(Match("model", type(model).__name__, rewritten=False,
                                        reason=f"no attention module under SageAttention2HFConfig.modules={cfg.modules}"))

        if cfg.modules is None:
            # The public API, on each outermost PreTrainedModel (it recurses into sub-models / sub-configs).
            for path, sub in owners.items():
                if _owner_path(path, {p: m for p, m in owners.items() if p != path}) is None and _can_set(sub):
                    sub.set_attn_implementation(ATTN_NAME)
        for config, owner in wanted.values():
            if config._attn_implementation == ATTN_NAME:
                continue
            sub = next((m for m in owners.values() if m.config is config), owners[owner])
            impl = sub.get_correct_attn_implementation(ATTN_NAME) if hasattr(sub, "get_correct_attn_implementation") else ATTN_NAME
            config._attn_implementation_internal = impl

        # Tag each attention module of a switched config with its preset; report.
        for path, mod, owner, config in sites:
            if config._attn_implementation != ATTN_NAME:
                continue  # not switched (unsupported owner: reported above) or out of scope in an unswitched config
            what = type(mod).__name__
            head_dim = getattr(mod, "head_dim", None)
            if not _in_scope(path, cfg.modules):
                setattr(mod, PRECISION_ATTR, "exact")
                result.matches.append(Match(path, what, rewritten=False,
                                            reason=f"outside SageAttention2HFConfig.modules={cfg.modules}; its config is "
                                            "switched, so it runs transformers' SDPA through vopt_sage (exact)"))
            elif isinstance(head_dim, int) and head_dim > MAX_HEAD_DIM:
                setattr(mod, PRECISION_ATTR, "exact")
                result.matches.append(Match(path, what, rewritten=False,
                                            reason=f"head_dim {head_dim} > {MAX_HEAD_DIM} (outside the quantized kernels' "
                                            "range; kept exact: transformers' SDPA)"))
            elif cfg.precision == "exact":
                setattr(mod, PRECISION_ATTR, "exact")
                result.matches.append(Match(path, what, rewritten=False,
                                            reason="SageAttention2HFConfig.precision='exact' (transformers' SDPA)"))
            else:
                setattr(mod, PRECISION_ATTR, cfg.precision)
                phases = f"vopt_sage[{cfg.precision}]"
                if cfg.decode_precision is not None:
                    setattr(mod, DECODE_PRECISION_ATTR, cfg.decode_precision)
                    phases += f", decode: vopt_sage[{cfg.decode_precision}]"
                result.matches.append(Match(path, f"{what} -> {phases}", rewritten=True))
        return result

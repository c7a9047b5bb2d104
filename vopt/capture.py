"""Stage capture: each stage of a model becomes a ``torch.export`` graph.

A :class:`CapturedStage` replaces a stage submodule (vision tower, projector,
language model, or the whole model) in vopt's working copy. On a call it
looks for a captured *specialization* whose signature matches the call: the
same pytree structure, tensor dtypes/devices/shapes and non-tensor values. On a
miss it exports the stage with ``torch.export.export(strict=False)`` on exactly
those inputs, hands the graph to the pass pipeline and runs it.

Why static specializations: HF forwards take ``**kwargs``, for which
``torch.export`` cannot accept ``dynamic_shapes`` (it asks for a tree name it
cannot find), so every distinct input signature is exported once, up to
``CaptureConfig.max_specializations``. Calls beyond that, calls whose export
fails (e.g. a ``DynamicCache`` input or output) and calls with autograd enabled
on trainable inputs run the original eager module; the reason is logged once
and kept in the report. The python glue between stages is the model's own
forward, which keeps running eagerly.

Attributes that are not the stage's own (``.config``, ``.dtype``,
``get_input_embeddings()`` ...) are served by the original eager module, so the
surrounding glue does not notice the replacement.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils import _pytree as pytree

from .config import VoptConfig, config_field, register_config
from .errors import CaptureError, ConfigError
from .pass_protocol import StageGraph

log = logging.getLogger(__name__)


@register_config
@dataclass
class CaptureConfig(VoptConfig):
    """How stages are captured."""

    max_specializations: int = config_field(
        8, help="Distinct input signatures exported per stage; further signatures run eagerly (logged)."
    )
    eager_fallback: bool = config_field(
        True, help="Run a stage eagerly (with the reason in the report) when it cannot be exported; if false, raise CaptureError."
    )

    def validate(self) -> None:
        if self.max_specializations < 1:
            raise ConfigError(f"CaptureConfig.max_specializations must be >= 1, got {self.max_specializations}")


def _leaf_key(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return ("T", leaf.dtype, leaf.device.type, tuple(leaf.shape), leaf.requires_grad)
    if leaf is None or isinstance(leaf, (bool, int, float, str)):
        return ("C", type(leaf).__name__, leaf)
    return ("O", type(leaf).__qualname__, id(leaf))


def signature_key(args: tuple, kwargs: dict) -> tuple:
    """Hashable description of a call: pytree structure plus every leaf's key."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return (str(spec), tuple(_leaf_key(x) for x in leaves))


def describe_signature(args: tuple, kwargs: dict) -> str:
    """Short human description of a call's tensor inputs (for reports)."""
    parts = []
    named = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    for name, value in named:
        if isinstance(value, torch.Tensor):
            parts.append(f"{name}={str(value.dtype).removeprefix('torch.')}{list(value.shape)}")
    return ", ".join(parts)


@dataclass
class Specialization:
    """One exported signature of a stage."""

    key: tuple
    signature: str
    gm: torch.fx.GraphModule
    export_seconds: float


@dataclass
class StageEvent:
    """A capture outcome for the report: exported (with pass results) or eager (with a reason)."""

    stage: str
    role: str
    signature: str
    exported: bool
    reason: Optional[str] = None
    export_seconds: float = 0.0
    pass_results: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["pass_results"] = [r.to_dict() for r in self.pass_results]
        return d


def export_stage(module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    """``torch.export`` a module on these exact inputs; return the runnable graph module."""
    with torch.no_grad():
        ep = torch.export.export(module, args, kwargs, strict=False)
    return ep.module()


class CapturedStage(torch.nn.Module):
    """A stage that runs captured, pass-rewritten graphs (see the module docstring)."""

    def __init__(
        self,
        name: str,
        role: str,
        eager: torch.nn.Module,
        on_capture: Callable,
        config: Optional[CaptureConfig] = None,
    ):
        super().__init__()
        self.eager = eager
        self.stage_name = name
        self.role = role
        self._on_capture = on_capture  # (StageGraph) -> list[PassResult]
        self._config = config or CaptureConfig()
        self._specs: list = []
        self._eager_keys: dict = {}  # signature key -> reason
        self.events: list = []
        # Exported graphs are registered as submodules so .to()/.state_dict() see them;
        # they share parameters with `eager`.
        self.graphs = torch.nn.ModuleList()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            eager = self._modules.get("eager")
            if eager is None:
                raise
            return getattr(eager, name)

    @property
    def specializations(self) -> list:
        return list(self._specs)

    def forward(self, *args, **kwargs):
        key = signature_key(args, kwargs)
        for spec in self._specs:
            if spec.key == key:
                return spec.gm(*args, **kwargs)
        if key in self._eager_keys:
            return self.eager(*args, **kwargs)
        signature = describe_signature(args, kwargs)
        reason = self._refusal(args, kwargs)
        if reason is None:
            t0 = time.perf_counter()
            try:
                gm = export_stage(self.eager, args, kwargs)
            except Exception as exc:  # export failures are many types; all mean "run eager"
                reason = f"torch.export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            else:
                seconds = time.perf_counter() - t0
                graph = StageGraph(
                    self.stage_name, self.role, gm, specialization=len(self._specs), example_inputs=(args, kwargs)
                )
                results = self._on_capture(graph)
                self.graphs.append(gm)
                self._specs.append(Specialization(key, signature, gm, seconds))
                self.events.append(StageEvent(self.stage_name, self.role, signature, True, None, seconds, results))
                return gm(*args, **kwargs)
        if not self._config.eager_fallback:
            raise CaptureError(f"stage {self.stage_name!r} ({signature}) cannot be captured: {reason}")
        self._eager_keys[key] = reason
        self.events.append(StageEvent(self.stage_name, self.role, signature, False, reason))
        log.warning("vopt: stage %r runs eagerly for %s: %s", self.stage_name, signature, reason)
        return self.eager(*args, **kwargs)

    def _refusal(self, args: tuple, kwargs: dict) -> Optional[str]:
        if len(self._specs) >= self._config.max_specializations:
            return f"max_specializations={self._config.max_specializations} reached"
        if torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in pytree.tree_leaves((args, kwargs))
        ):
            return "inputs require grad (vopt graphs are inference-only)"
        return None

"""The pass protocol: what a pass declares, what it returns, and the registry.

A pass is a class with

* ``name``: the registry key (``vopt-compile --passes`` and ``optimize(passes=...)``);
* ``config_cls``: its config dataclass (:class:`~vopt.config.VoptConfig`);
* ``kind``: :attr:`PassKind.GRAPH` passes rewrite a captured stage's
  ``torch.fx.GraphModule`` (``run_graph``); :attr:`PassKind.RUNTIME` passes
  change the working copy of the model before capture (``run_runtime``: a KV
  cache object, an attention interface, token merging glue);
* ``requires`` / ``provides``: facts (strings) it needs from earlier passes and
  those it establishes;
* ``after`` / ``before``: names of passes it must run after / before when both
  are in the pipeline.

Both ``run_*`` methods return a :class:`PassResult`: every match the pass found,
whether it was rewritten, and if not, why. Passes always rewrite; a dry run
(``vopt-compile explain``) is the pass manager running them on a copy.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from .config import VoptConfig
from .errors import ConfigError, UnknownNameError

if TYPE_CHECKING:  # pragma: no cover
    import torch


class PassKind(str, enum.Enum):
    GRAPH = "graph"
    RUNTIME = "runtime"


@dataclass
class Match:
    """One place a pass matched."""

    where: str
    """Stage and node (``language_model:scaled_dot_product_attention_1``) or module path."""
    what: str
    """What was matched, e.g. ``sdpa q[1,4,12,16] causal`` or the module class."""
    rewritten: bool
    reason: Optional[str] = None
    """Why it was not rewritten (``None`` when rewritten)."""
    flops_saved: float = 0.0
    bytes_saved: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PassResult:
    """What one pass did to one stage (graph passes) or to the model (runtime passes)."""

    pass_name: str
    target: str
    """Stage name (graph passes) or ``"model"`` (runtime passes)."""
    matches: list = field(default_factory=list)
    dry_run: bool = False

    @property
    def rewritten(self) -> list:
        return [m for m in self.matches if m.rewritten]

    @property
    def skipped(self) -> list:
        return [m for m in self.matches if not m.rewritten]

    @property
    def modified(self) -> bool:
        return not self.dry_run and bool(self.rewritten)

    def to_dict(self) -> dict:
        return {
            "pass": self.pass_name,
            "target": self.target,
            "dry_run": self.dry_run,
            "matched": len(self.matches),
            "rewritten": len(self.rewritten),
            "skipped": len(self.skipped),
            "flops_saved": sum(m.flops_saved for m in self.matches if m.rewritten),
            "bytes_saved": sum(m.bytes_saved for m in self.matches if m.rewritten),
            "matches": [m.to_dict() for m in self.matches],
        }


@dataclass
class PassContext:
    """What a pass may read while running."""

    dry_run: bool = False
    """Run the passes on a copy and mark the results (the pass manager handles it)."""
    debug: bool = False
    """Lint the graph after every graph pass."""
    facts: set = field(default_factory=set)
    """Facts established so far (``provides`` of the passes that ran)."""


@dataclass
class StageGraph:
    """A captured stage handed to graph passes."""

    stage: str
    role: str
    gm: "torch.fx.GraphModule"
    specialization: int = 0
    example_inputs: Optional[tuple] = None
    """``(args, kwargs)`` of the real call that triggered this capture (``None`` when unknown).

    For passes that calibrate on real activations (``sageattention2`` adaptive mode); they
    must not modify these tensors."""


class Pass:
    """Base class of every pass (see the module docstring)."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = VoptConfig
    kind: ClassVar[PassKind] = PassKind.GRAPH
    requires: ClassVar[frozenset] = frozenset()
    provides: ClassVar[frozenset] = frozenset()
    after: ClassVar[tuple] = ()
    before: ClassVar[tuple] = ()
    default: ClassVar[bool] = True
    """Part of the default pipeline (``optimize(passes=None)``)."""
    summary: ClassVar[str] = ""

    def __init__(self, config: Optional[VoptConfig] = None):
        if config is None:
            config = self.config_cls()
        if not isinstance(config, self.config_cls):
            raise ConfigError(
                f"pass {self.name!r} takes a {self.config_cls.__name__}, got {type(config).__name__}"
            )
        self.config = config

    def run_graph(self, graph: StageGraph, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"pass {self.name!r} is a {self.kind.value} pass")

    def run_runtime(self, model: Any, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"pass {self.name!r} is a {self.kind.value} pass")

    def uuid(self) -> str:
        """Hash of the pass's source and config: changes whenever either does."""
        src = inspect.getsource(inspect.getmodule(type(self)))
        return hashlib.sha256((src + self.config.to_json(sort_keys=True)).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


_PASSES: dict = {}


def register_pass(cls: type) -> type:
    """Class decorator adding a pass to the registry (keyed by ``cls.name``)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _PASSES and _PASSES[cls.name] is not cls:
        raise ValueError(f"a pass named {cls.name!r} is already registered ({_PASSES[cls.name].__name__})")
    _PASSES[cls.name] = cls
    return cls


def registered_passes() -> dict:
    """``{name: pass class}`` for every registered pass (imports :mod:`vopt.passes`)."""
    import vopt.passes  # noqa: F401  (the passes register themselves)

    return dict(_PASSES)


def get_pass(name: str) -> type:
    passes = registered_passes()
    if name not in passes:
        raise UnknownNameError("pass", name, passes)
    return passes[name]

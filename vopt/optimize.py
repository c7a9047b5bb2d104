"""``vopt.optimize(model)``: the user-facing entry point.

1. Copy the model (unless ``inplace=True``): the caller's model is never changed.
2. Pick the model family's adapter (:mod:`vopt.adapters`) and disable the HF
   ``use_cache`` default on the copy (a ``DynamicCache`` cannot be exported).
3. Run the pipeline's runtime passes on the copy.
4. Replace each stage by a :class:`~vopt.capture.CapturedStage`, which exports
   the stage on its first call with a given input signature and runs the
   pipeline's graph passes on the exported graph.
5. With ``example_inputs``, run the copy once so every stage is captured now
   (otherwise on the first real call).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .adapters import StageRole, disable_kv_cache, find_adapter, get_path, set_path
from .capture import CaptureConfig, CapturedStage
from .config import VoptConfig, config_field, register_config
from .errors import ConfigError
from .pass_manager import PassManager
from .pass_protocol import PassContext
from .report import Report


@register_config
@dataclass
class OptimizeConfig(VoptConfig):
    """What ``vopt.optimize`` does."""

    passes: Optional[list[str]] = config_field(
        None, help="Pass names in order; None selects the default pipeline (every default pass, canonical order)."
    )
    pass_configs: dict = config_field(
        default_factory=dict, help="Per-pass configs keyed by pass name (config objects or their dicts)."
    )
    adapter: Optional[str] = config_field(
        None, help="Model-family adapter to use (see vopt-compile list); None picks by model class, 'generic' captures the whole module."
    )
    capture: CaptureConfig = config_field(default_factory=CaptureConfig, help="Stage capture settings.")
    strict: bool = config_field(
        False, help="Raise if any pass skips a match or any stage cannot be captured (instead of reporting it)."
    )
    debug: bool = config_field(False, help="Lint every graph after every pass.")
    dry_run: bool = config_field(False, help="Report what each pass would match and do without changing anything.")

    def validate(self) -> None:
        if not isinstance(self.pass_configs, dict) or not all(isinstance(k, str) for k in self.pass_configs):
            raise ConfigError("OptimizeConfig.pass_configs must map pass names to configs")

    def pass_manager(self) -> PassManager:
        if self.passes is None:
            return PassManager.default(self.pass_configs, strict=self.strict)
        return PassManager.from_names(self.passes, self.pass_configs, strict=self.strict)


class OptimizedModel(torch.nn.Module):
    """The optimized module returned by :func:`optimize`.

    Call it like the original. ``.report`` describes what was captured and
    rewritten; ``.stages`` maps stage names to their :class:`CapturedStage`.
    Other attributes (``.config``, ``.generate`` ...) are the working copy's.
    """

    def __init__(self, module: torch.nn.Module, stages: dict, manager: PassManager, adapter: str, notes: list, runtime_results: list):
        super().__init__()
        self.module = module
        self._stages = stages
        self._manager = manager
        self._adapter = adapter
        self._notes = notes
        self._runtime_results = runtime_results
        self._validation: Optional[dict] = None

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    @property
    def stages(self) -> dict:
        return dict(self._stages)

    @property
    def report(self) -> Report:
        inner = self.module.eager if isinstance(self.module, CapturedStage) else self.module
        return Report(
            model=type(inner).__name__,
            adapter=self._adapter,
            passes=[
                {"name": p.name, "kind": p.kind.value, "uuid": p.uuid(), "config": p.config.to_dict()}
                for p in self._manager.passes
            ],
            notes=list(self._notes),
            runtime_results=list(self._runtime_results),
            stage_events=[ev for st in self._stages.values() for ev in st.events],
            validation=self._validation,
        )

    def set_validation(self, metrics: dict) -> None:
        """Attach validation metrics (e.g. max |Δlogits| vs eager) to the report."""
        self._validation = dict(metrics)

    def run_example(self, example_inputs: Any) -> Any:
        """Run once on ``example_inputs`` (captures every stage it reaches)."""
        args, kwargs = split_inputs(example_inputs)
        with torch.no_grad():
            return self(*args, **kwargs)


def split_inputs(example_inputs: Any) -> tuple:
    """Example inputs as ``(args, kwargs)``: a dict is kwargs, a tuple/list is args, a tensor one arg."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise ConfigError(
        f"example_inputs must be a dict (keyword inputs), a tuple/list (positional inputs) or a tensor, got {type(example_inputs).__name__}"
    )


def optimize(
    model: torch.nn.Module,
    config: Optional[OptimizeConfig] = None,
    *,
    passes: Optional[list] = None,
    example_inputs: Any = None,
    inplace: bool = False,
) -> OptimizedModel:
    """Optimize ``model``; see the module docstring.

    ``passes`` (names or :class:`~vopt.pass_protocol.Pass` instances, in order)
    overrides ``config.passes``. With ``inplace=True``
    the model itself is modified (its stages replaced, ``use_cache`` disabled)
    instead of a deep copy.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimize() expects a torch.nn.Module, got {type(model).__name__}")
    config = OptimizeConfig() if config is None else config
    if not isinstance(config, OptimizeConfig):
        raise TypeError(f"config must be an OptimizeConfig, got {type(config).__name__}")
    if isinstance(model, OptimizedModel):
        raise ConfigError("this model is already optimized by vopt; optimize the original model instead")
    if passes is not None:
        manager = PassManager.from_names(passes, config.pass_configs, strict=config.strict)
        config = dataclasses.replace(config, passes=manager.names)
    else:
        manager = config.pass_manager()
    capture_cfg = config.capture
    if config.strict:
        capture_cfg = dataclasses.replace(capture_cfg, eager_fallback=False)

    work = model if inplace else copy.deepcopy(model)
    work.eval()
    adapter = find_adapter(work, config.adapter)
    notes = disable_kv_cache(work)
    ctx = PassContext(dry_run=config.dry_run, debug=config.debug, facts=set())
    runtime_results = manager.run_runtime(work, ctx)
    facts_after_runtime = set(ctx.facts)

    def on_capture(graph):
        return manager.run_graph(graph, PassContext(dry_run=config.dry_run, debug=config.debug, facts=set(facts_after_runtime)))

    stages = {}
    root = work
    for spec, path in adapter.resolve(work):
        stage = CapturedStage(spec.name, spec.role.value, get_path(work, path), on_capture, capture_cfg)
        stages[spec.name] = stage
        if path == "":
            root = stage
        else:
            set_path(work, path, stage)
    if not stages:
        raise ConfigError(f"adapter {adapter.family!r} found no stage in {type(model).__name__}")
    opt = OptimizedModel(root, stages, manager, adapter.family, notes, runtime_results)
    if example_inputs is not None:
        opt.run_example(example_inputs)  # in strict mode a stage that cannot export raises CaptureError
    return opt


__all__ = ["OptimizeConfig", "OptimizedModel", "optimize", "StageRole"]

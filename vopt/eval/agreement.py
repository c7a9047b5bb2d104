"""Compare an optimized model with its baseline on the synthetic video-QA task, overall and stage by stage.

    base = vopt.zoo.build("llava-onevision").model
    opt = vopt.optimize(base, passes=["sdpa"])
    print(vopt.eval.compare(base, opt).table())

:func:`compare` scores both models on the same clips (as :func:`vopt.eval.scoring.video_qa` does, batch by batch
in lockstep) and reports how far the optimized model's answers and answer-position logits are from the baseline's.
With ``stages=True`` it also hooks both models at the same module paths and measures, per path, how far the
optimized output is from the baseline's, which tells *where* an optimization changes the numbers:

* the stage paths of the baseline's adapter (:func:`vopt.adapters.find_adapter`; e.g. ``model.vision_tower``,
  ``model.multi_modal_projector``, ``model.language_model``);
* every layer of those stages: the children of the first ``nn.ModuleList`` on each branch below a stage (the
  encoder / decoder layers), when the optimized model has a module at the same path;
* ``"logits"``: the answer-position logits, with their KL divergence.

A stage that :func:`vopt.optimize` exported runs as one graph, so its layers are never called as modules: they are
listed in ``unobserved`` with that reason, as is any path that could not be compared.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..adapters import find_adapter, get_path
from ..capture import CapturedStage
from ..errors import ConfigError
from ..report import _table
from . import scoring

__all__ = ["Comparison", "compare"]

#: Key of the whole model's stage (adapter path ``""``) in :attr:`Comparison.stages`.
ROOT_KEY = "<model>"


@dataclass
class Comparison:
    """What :func:`compare` measured (``optimized`` relative to ``baseline``).

    ``agreement``: fraction of identical predicted words. ``accuracy_delta`` = optimized - baseline.
    ``logit_cos_*``: cosine similarity of each sample's answer-position logits; ``kl_*``:
    ``KL(softmax(baseline) || softmax(optimized))`` per sample (nats, float64). ``stages``: path ->
    ``{"cos", "rel_l2"}`` (means over batches; ``rel_l2 = ||o - b|| / ||b||`` of the flattened output), plus
    ``"logits"`` with ``"kl"`` too. ``unobserved``: path -> why it has no numbers. ``baseline_result`` /
    ``optimized_result``: each model's :class:`~vopt.eval.scoring.QAResult`.
    """

    agreement: float
    accuracy_baseline: float
    accuracy_optimized: float
    accuracy_delta: float
    logit_cos_mean: float
    logit_cos_min: float
    kl_mean: float
    kl_max: float
    stages: dict
    unobserved: dict
    n: int
    notes: list = field(default_factory=list)
    baseline_result: Optional[scoring.QAResult] = field(default=None, repr=False, compare=False)
    optimized_result: Optional[scoring.QAResult] = field(default=None, repr=False, compare=False)

    def table(self) -> str:
        """A plain-text report: answers and logits, then one row per stage / layer, then what was not observed."""
        out = [
            f"compare: n={self.n} samples",
            f"answer agreement  {self.agreement:.4f}",
            f"accuracy          baseline {self.accuracy_baseline:.4f}  optimized {self.accuracy_optimized:.4f}  "
            f"delta {self.accuracy_delta:+.4f}",
            f"answer logits     cos mean {self.logit_cos_mean:.6f}  min {self.logit_cos_min:.6f}  "
            f"KL mean {self.kl_mean:.3e}  max {self.kl_max:.3e}",
        ]
        if self.stages:
            rows = [[path, f"{m['cos']:.6f}", f"{m['rel_l2']:.3e}", f"{m['kl']:.3e}" if "kl" in m else ""]
                    for path, m in self.stages.items()]
            out += ["", _table(["stage / layer", "cos", "rel L2", "KL"], rows)]
        if self.unobserved:
            out += ["", "unobserved:"] + [f"  {path}: {reason}" for path, reason in self.unobserved.items()]
        if self.notes:
            out += ["", "notes:"] + [f"  {note}" for note in self.notes]
        return "\n".join(out)

    def to_dict(self) -> dict:
        """JSON-able summary (without the per-model results' logits)."""
        return {
            "n": self.n,
            "agreement": self.agreement,
            "accuracy_baseline": self.accuracy_baseline,
            "accuracy_optimized": self.accuracy_optimized,
            "accuracy_delta": self.accuracy_delta,
            "logit_cos_mean": self.logit_cos_mean,
            "logit_cos_min": self.logit_cos_min,
            "kl_mean": self.kl_mean,
            "kl_max": self.kl_max,
            "stages": {path: dict(m) for path, m in self.stages.items()},
            "unobserved": dict(self.unobserved),
            "notes": list(self.notes),
        }


# -- tensor metrics --------------------------------------------------------------------------------------------------

def _cos_rel(base: torch.Tensor, opt: torch.Tensor) -> tuple:
    """Cosine similarity and relative L2 error of two flattened tensors (float64)."""
    b = base.detach().reshape(-1).double()
    o = opt.detach().reshape(-1).double().to(b.device)
    nb, no = b.norm().item(), o.norm().item()
    if nb == 0.0 and no == 0.0:
        return 1.0, 0.0
    cos = (b @ o).item() / (nb * no) if nb > 0.0 and no > 0.0 else 0.0
    rel = (o - b).norm().item() / nb if nb > 0.0 else math.inf
    return cos, rel


def _logit_metrics(base: torch.Tensor, opt: torch.Tensor) -> dict:
    """Per-sample cos, rel L2 and KL(softmax(base) || softmax(opt)) of ``[n, V]`` logits, as float64 lists."""
    b, o = base.double(), opt.double()
    nb, no = b.norm(dim=-1), o.norm(dim=-1)
    both_zero = (nb == 0) & (no == 0)
    cos = torch.where(nb * no > 0, (b * o).sum(dim=-1) / (nb * no), both_zero.double())
    rel = torch.where(nb > 0, (o - b).norm(dim=-1) / nb, torch.where(both_zero, 0.0, math.inf))
    log_p, log_q = torch.log_softmax(b, dim=-1), torch.log_softmax(o, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0)
    return {"cos": cos.tolist(), "rel_l2": rel.tolist(), "kl": kl.tolist()}


def _main_tensor(output) -> Optional[torch.Tensor]:
    """The tensor a module output stands for: itself, ``.last_hidden_state``, ``.logits``, or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("last_hidden_state", "logits"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)):
        return next((v for v in output if isinstance(v, torch.Tensor)), None)
    return None


# -- which modules to watch ------------------------------------------------------------------------------------------

def _working(model):
    """The module that actually runs: an :class:`~vopt.OptimizedModel`'s ``.module``, else the model."""
    from ..optimize import OptimizedModel

    return model.module if isinstance(model, OptimizedModel) else model


def _find(root, path: str) -> Optional[torch.nn.Module]:
    """The submodule at ``path`` (``""``: root), or None. A CapturedStage serves its eager module's attributes."""
    try:
        return get_path(root, path)
    except AttributeError:
        return None


def _join(path: str, rel: str) -> str:
    return f"{path}.{rel}" if path else rel


def _layer_paths(stage: torch.nn.Module) -> list:
    """Relative paths of the children of the outermost ``nn.ModuleList`` s under ``stage`` (its layers)."""
    if isinstance(stage, CapturedStage):
        stage = stage.eager
    lists, layers = [], []
    for name, module in stage.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or any(name.startswith(p + ".") for p in lists):
            continue
        lists.append(name)
        layers += [_join(name, child) for child, _ in module.named_children()]
    return layers


@dataclass
class _Watch:
    """One path watched in both models."""

    key: str
    path: str
    stage_path: str
    base: torch.nn.Module
    opt: torch.nn.Module
    values: list = field(default_factory=list)   # (cos, rel_l2) per compared call
    calls: dict = field(default_factory=lambda: {"baseline": 0, "optimized": 0})   # in the current batch
    seen: dict = field(default_factory=lambda: {"baseline": 0, "optimized": 0})    # in all batches
    problem: Optional[str] = None


def _watches(baseline, optimized) -> tuple:
    """``([_Watch], {key: reason})``: the stage and layer paths present in both models, and those missing."""
    base_root, opt_root = _working(baseline), _working(optimized)
    watches, missing = [], {}
    for _, path in find_adapter(base_root).resolve(base_root):
        base_stage, opt_stage = _find(base_root, path), _find(opt_root, path)
        if base_stage is None or opt_stage is None:
            which = "baseline" if base_stage is None else "optimized"
            missing[path or ROOT_KEY] = f"no module at this path in the {which} model"
            continue
        watches.append(_Watch(path or ROOT_KEY, path, path, base_stage, opt_stage))
        for rel in _layer_paths(base_stage):
            full = _join(path, rel)
            base_layer, opt_layer = _find(base_root, full), _find(opt_root, full)
            if base_layer is None or opt_layer is None:
                missing[full] = "no module at this path in the optimized model"
            else:
                watches.append(_Watch(full, full, path, base_layer, opt_layer))
    return watches, missing


class _Recorder:
    """Forward hooks on both models; pairs the i-th call of a path in the optimized run with the baseline's i-th."""

    def __init__(self, watches: list):
        self.watches = watches
        self.active: Optional[str] = None          # "baseline" / "optimized" while that model runs
        self.pending: dict = {}                    # key -> baseline outputs of the current batch
        self.notes: list = []
        self.handles: list = []

    def attach(self) -> None:
        for w in self.watches:
            self.handles.append(w.base.register_forward_hook(self._hook(w, "baseline")))
            self.handles.append(w.opt.register_forward_hook(self._hook(w, "optimized")))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, watch: _Watch, side: str):
        def hook(module, args, output):
            # The same module may be watched for both sides (compare(m, m)): record only the running side. Calls
            # while torch.export traces a stage (fake tensors) are not real outputs.
            if self.active != side or torch.compiler.is_exporting() or torch.compiler.is_compiling():
                return
            self._record(watch, side, output)
        return hook

    def _record(self, w: _Watch, side: str, output) -> None:
        index = w.calls[side]
        w.calls[side] += 1
        tensor = _main_tensor(output)
        if tensor is None:
            w.problem = w.problem or f"output is {type(output).__name__}, which holds no tensor to compare"
            return
        if side == "baseline":
            self.pending.setdefault(w.key, []).append(tensor.detach().clone())
            return
        stored = self.pending.get(w.key, [])
        if index >= len(stored) or stored[index] is None:
            return                                  # the call count mismatch is reported by end_batch
        base, stored[index] = stored[index], None   # free the baseline output as soon as it is compared
        if tuple(base.shape) != tuple(tensor.shape):
            w.problem = w.problem or (f"output shapes differ: baseline {list(base.shape)}, "
                                      f"optimized {list(tensor.shape)}")
            return
        w.values.append(_cos_rel(base, tensor))

    def end_batch(self, batch: int) -> None:
        for w in self.watches:
            b, o = w.calls["baseline"], w.calls["optimized"]
            if b and o and b != o:
                self.notes.append(f"{w.key}: called {b} times by the baseline, {o} by the optimized model "
                                  f"in batch {batch}; the first {min(b, o)} calls were compared")
            w.seen = {"baseline": w.seen["baseline"] + b, "optimized": w.seen["optimized"] + o}
            w.calls = {"baseline": 0, "optimized": 0}
        self.pending = {}


def _unobserved_reason(w: _Watch, optimized) -> str:
    seen_base, seen_opt = w.seen["baseline"], w.seen["optimized"]
    if w.problem:
        return w.problem
    if seen_base and not seen_opt:
        stage = _find(_working(optimized), w.stage_path)
        if isinstance(stage, CapturedStage) and w.path != w.stage_path and stage.specializations:
            return (f"inside stage {w.stage_path or ROOT_KEY!r}, which the optimized model runs as an exported "
                    f"graph: its layers are not called as modules")
        return "not called by the optimized model's forward"
    if seen_opt and not seen_base:
        return "not called by the baseline's forward"
    return "not called by either model's forward"


def _mean(values: list) -> float:
    return sum(values) / len(values)


# -- public entry point ----------------------------------------------------------------------------------------------

def compare(baseline, optimized, split: str = "test", n: int = 200, seed: int = 0, *,
            samples: Optional[Sequence] = None, batch_size: int = 64, stages: bool = True) -> Comparison:
    """How far ``optimized`` is from ``baseline`` on ``n`` clips of the synthetic video-QA ``split``.

    Both models see the same batches (``samples`` replaces ``split`` / ``n``; see
    :func:`vopt.eval.scoring.video_qa`) and run in eval mode under ``no_grad`` (mode flags restored afterwards).
    Reports answer agreement, both accuracies and their delta, the cosine similarity and KL divergence of the
    answer-position logits, and with ``stages=True`` per-stage / per-layer cos and relative L2 error (see the
    module docstring). Hooks are removed afterwards, also on error; neither model's parameters are changed.
    Memory: stage metrics keep one batch's baseline outputs of the watched modules until the optimized model has
    produced its own; lower ``batch_size`` for large models.
    """
    scoring._check_model(baseline)
    scoring._check_model(optimized)
    scoring._check_int("batch_size", batch_size, 1)
    scoring._check_int("seed", seed, 0)
    if not isinstance(stages, bool):
        raise ConfigError(f"stages must be True or False, got {stages!r}")
    samples = scoring.qa_samples(split, n, seed, 8, samples)

    watches, missing = _watches(baseline, optimized) if stages else ([], {})
    recorder = _Recorder(watches)
    base_logits, opt_logits = [], []
    try:
        recorder.attach()
        with scoring.inference(baseline), scoring.inference(optimized):
            for batch, chunk in enumerate(scoring.chunks(samples, batch_size)):
                recorder.active = "baseline"
                base_logits.append(scoring.batch_answer_logits(baseline, chunk))
                recorder.active = "optimized"
                opt_logits.append(scoring.batch_answer_logits(optimized, chunk))
                recorder.active = None
                recorder.end_batch(batch)
    finally:
        recorder.active = None
        recorder.detach()

    base_result = scoring.score_qa(samples, torch.cat(base_logits), seed=seed)
    opt_result = scoring.score_qa(samples, torch.cat(opt_logits), seed=seed)
    logit = _logit_metrics(base_result.logits, opt_result.logits)

    stage_metrics, unobserved = {}, dict(missing)
    for w in watches:
        if w.values:
            stage_metrics[w.key] = {"cos": _mean([c for c, _ in w.values]), "rel_l2": _mean([r for _, r in w.values])}
            if w.problem:
                recorder.notes.append(f"{w.key}: some calls not compared: {w.problem}")
        else:
            unobserved[w.key] = _unobserved_reason(w, optimized)
    stage_metrics["logits"] = {"cos": _mean(logit["cos"]), "rel_l2": _mean(logit["rel_l2"]), "kl": _mean(logit["kl"])}

    agreement = _mean([p == q for p, q in zip(base_result.predictions, opt_result.predictions)])
    return Comparison(
        agreement=agreement,
        accuracy_baseline=base_result.accuracy,
        accuracy_optimized=opt_result.accuracy,
        accuracy_delta=opt_result.accuracy - base_result.accuracy,
        logit_cos_mean=_mean(logit["cos"]),
        logit_cos_min=min(logit["cos"]),
        kl_mean=_mean(logit["kl"]),
        kl_max=max(logit["kl"]),
        stages=stage_metrics,
        unobserved=unobserved,
        n=len(samples),
        notes=recorder.notes,
        baseline_result=base_result,
        optimized_result=opt_result,
    )

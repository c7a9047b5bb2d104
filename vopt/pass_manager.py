"""The pass manager: validates the order of a pipeline and runs it.

* ``PassManager.default()`` builds the default pipeline: every registered pass
  with ``default = True``, sorted so every ``after``/``before`` constraint holds
  (ties keep registration order).
* An explicit list keeps the caller's order; :meth:`PassManager.validate`
  raises :class:`~vopt.errors.PassOrderError` naming each broken constraint
  (and the order that would satisfy them) instead of silently reordering.
* Runtime passes change the model before capture, graph passes change each
  captured stage; so a runtime pass may not be listed after a graph pass.
* ``strict=True`` turns any skipped match into a
  :class:`~vopt.errors.StrictModeError`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Iterable, Optional

from .config import VoptConfig
from .errors import ConfigError, PassOrderError, StrictModeError
from .pass_protocol import Pass, PassContext, PassKind, PassResult, StageGraph, get_pass, registered_passes

log = logging.getLogger(__name__)

def _order(passes: list) -> list:
    """Stable topological order of ``passes`` honouring ``after``/``before``."""
    names = [p.name for p in passes]
    preds = {n: set() for n in names}
    for p in passes:
        preds[p.name] |= {a for a in p.after if a in preds}
        for b in p.before:
            if b in preds:
                preds[b].add(p.name)
    out, done = [], set()
    while len(out) < len(passes):
        ready = [p for p in passes if p.name not in done and preds[p.name] <= done]
        if not ready:
            cycle = sorted(n for n in names if n not in done)
            raise PassOrderError(f"passes {cycle} have cyclic after/before constraints")
        out.append(ready[0])
        done.add(ready[0].name)
    return out


class PassManager:
    """An ordered, validated list of pass instances."""

    def __init__(self, passes: Iterable[Pass], *, strict: bool = False):
        self.passes = list(passes)
        self.strict = strict
        self.validate()

    @classmethod
    def default(cls, configs: Optional[dict] = None, *, strict: bool = False) -> "PassManager":
        chosen = [c for c in registered_passes().values() if c.default]
        return cls(_order([_instantiate(c, configs) for c in chosen]), strict=strict)

    @classmethod
    def from_names(cls, names: Iterable[Any], configs: Optional[dict] = None, *, strict: bool = False) -> "PassManager":
        """Build from pass names (or instances), in the given order."""
        passes = []
        for item in names:
            passes.append(item if isinstance(item, Pass) else _instantiate(get_pass(item), configs))
        return cls(passes, strict=strict)

    @property
    def names(self) -> list:
        return [p.name for p in self.passes]

    def validate(self) -> None:
        problems = []
        seen = set()
        for i, p in enumerate(self.passes):
            if p.name in seen:
                problems.append(f"pass {p.name!r} is listed twice")
            seen.add(p.name)
        pos = {p.name: i for i, p in enumerate(self.passes)}
        facts: set = set()
        first_graph = None
        must = []  # (earlier, later) pairs from every after/before, each reported once
        for p in self.passes:
            must += [(a, p.name) for a in p.after] + [(p.name, b) for b in p.before]
        for earlier, later in dict.fromkeys(must):
            if earlier in pos and later in pos and pos[earlier] > pos[later]:
                problems.append(f"{earlier!r} must run before {later!r}")
        for p in self.passes:
            if p.kind is PassKind.GRAPH and first_graph is None:
                first_graph = p.name
            if p.kind is PassKind.RUNTIME and first_graph is not None:
                problems.append(
                    f"runtime pass {p.name!r} is listed after graph pass {first_graph!r} (runtime passes run before capture)"
                )
            missing = set(p.requires) - facts
            for fact in sorted(missing):
                providers = sorted(n for n, c in registered_passes().items() if fact in c.provides)
                problems.append(f"{p.name!r} requires {fact!r}, provided by {providers or 'no registered pass'}, listed before it")
            facts |= set(p.provides)
        if problems:
            hint = ""
            try:
                hint = f"\nan order satisfying after/before: {[q.name for q in _order(self.passes)]}"
            except PassOrderError:
                pass
            raise PassOrderError("invalid pass pipeline:\n  - " + "\n  - ".join(problems) + hint)

    # ---- running --------------------------------------------------------
    # A dry run executes the passes for real on a throwaway copy, so what it
    # reports includes the effect of earlier passes on later ones (a pattern
    # canonicalized by one pass and then matched by the next); the original is
    # left untouched and every result is marked ``dry_run``.
    def run_runtime(self, model: Any, ctx: PassContext) -> list:
        if ctx.dry_run:
            return _mark_dry(self.run_runtime(copy.deepcopy(model), dataclasses.replace(ctx, dry_run=False)))
        results = []
        for p in self.passes:
            if p.kind is PassKind.RUNTIME:
                results.append(self._check(p.run_runtime(model, ctx), ctx, p))
        return results

    def run_graph(self, graph: StageGraph, ctx: PassContext) -> list:
        if ctx.dry_run:
            scratch = dataclasses.replace(graph, gm=copy.deepcopy(graph.gm))
            return _mark_dry(self.run_graph(scratch, dataclasses.replace(ctx, dry_run=False)))
        results = []
        for p in self.passes:
            if p.kind is not PassKind.GRAPH:
                continue
            result = self._check(p.run_graph(graph, ctx), ctx, p)
            if result.modified:
                graph.gm.graph.eliminate_dead_code()
                graph.gm.recompile()
            if ctx.debug:
                graph.gm.graph.lint()
            results.append(result)
        return results

    def _check(self, result: PassResult, ctx: PassContext, p: Pass) -> PassResult:
        ctx.facts |= set(p.provides)
        for m in result.matches:
            log.debug("pass %s at %s: %s%s", p.name, m.where, "rewritten" if m.rewritten else "skipped: ", m.reason or "")
        if self.strict and result.skipped:
            lines = "\n".join(f"  - {m.where}: {m.reason}" for m in result.skipped)
            raise StrictModeError(f"strict mode: pass {p.name!r} skipped {len(result.skipped)} match(es) on {result.target}:\n{lines}")
        return result


def _mark_dry(results: list) -> list:
    for r in results:
        r.dry_run = True
    return results


def _instantiate(cls: type, configs: Optional[dict]) -> Pass:
    cfg = (configs or {}).get(cls.name)
    if cfg is not None and not isinstance(cfg, VoptConfig):
        if isinstance(cfg, dict):
            cfg = cls.config_cls.from_dict(cfg)
        else:
            raise ConfigError(f"config for pass {cls.name!r} must be a {cls.config_cls.__name__} or dict, got {type(cfg).__name__}")
    return cls(cfg)

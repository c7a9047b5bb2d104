"""The glue problem: an engine must run without the model's Python code.

A vopt model is stages (exported graphs) plus the model's own Python forward
between them (the "glue": embedding look-ups, placeholder scatter, top-k frame
selection ...). Two ways to ship that:

* **Route ``whole`` (used).** Export the *whole optimized model* with
  ``torch.export`` (non-strict), which traces through the glue and through
  each :class:`~vopt.capture.CapturedStage` into its pass-rewritten graph, so
  one program holds every stage *and* the glue, with vopt's custom ops as
  opaque calls. The model is wrapped in :class:`FlatModel` first: positional
  tensor inputs in, a flat tuple of tensors out, so loading needs no model
  class (no output dataclass, no pytree registration) and ONNX/AOTI see plain
  tensors. Non-tensor inputs (ints, bools, None) are constants of the engine.
* Route ``staged`` (not used): one program per stage plus a recorded
  dataflow with the glue's tensor ops as tiny exported programs. On the zoo it
  buys nothing. 9 of the 12 tiny zoo models export whole. The other three fail
  on code that a per-stage split cannot export either: ``t2vid`` (Idefics3
  glue drops all-zero padding images by value, a data-dependent shape),
  ``llm4vg`` (its glue checks parsed answer counts on the host), and
  ``gpt4scene`` (the Qwen2-VL vision tower itself splits by
  ``lengths.tolist()``; vopt already runs that stage eagerly). Replaying such
  glue from a recorded trace would bake one input's data-dependent decisions
  into the engine, which is wrong for other inputs. So these models are
  refused with :class:`~vopt.errors.EngineError` naming the model, the export
  failure and, where torch reports it, the source line.

Shapes: stages are captured per static input signature (see
:mod:`vopt.capture`), so the whole-model program is static too. The manifest
records every input's exact shape and :mod:`vopt.engine.load` refuses other
shapes with :class:`~vopt.errors.EngineInputError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import EngineError


@dataclass
class TensorSpec:
    """Name, dtype and shape of one engine input or output (``dynamic``: dims that may vary; empty = static)."""

    name: str
    dtype: str
    shape: list
    dynamic: dict

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "dynamic": dict(self.dynamic)}

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "TensorSpec":
        return cls(name, str(t.dtype).removeprefix("torch."), list(t.shape), {})


def path_name(path: tuple, default: str) -> str:
    """A readable name for a pytree key path: ``('logits',)`` -> ``logits``, ``[0][1]`` -> ``0.1``."""
    parts = []
    for k in path:
        if isinstance(k, pytree.MappingKey):
            parts.append(str(k.key))
        elif isinstance(k, pytree.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, pytree.GetAttrKey):
            parts.append(k.name)
        else:
            parts.append(str(k))
    return ".".join(parts) or default


class FlatModel(torch.nn.Module):
    """``model`` called with flat positional tensors, returning a flat tuple of tensors.

    Built from one example call: its input pytree (args, kwargs) gives the
    input names and the constants (non-tensor leaves), its output pytree the
    output names. The engine's callers pass tensors by those names.
    """

    def __init__(self, model: torch.nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.model = model
        leaves, self._in_spec = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
        self._leaves = [v for _, v in leaves]
        self._tensor_pos = [i for i, v in enumerate(self._leaves) if isinstance(v, torch.Tensor)]
        for i, v in enumerate(self._leaves):
            if not (isinstance(v, torch.Tensor) or v is None or isinstance(v, (bool, int, float, str))):
                raise EngineError(f"input {path_name(leaves[i][0], str(i))!r} is a {type(v).__name__}; engines take "
                                  "tensors and constant None/bool/int/float/str inputs only")
        self.input_specs = [TensorSpec.of(self._input_name(leaves[i][0]), self._leaves[i]) for i in self._tensor_pos]
        self.constants = {self._input_name(leaves[i][0]): v for i, v in enumerate(self._leaves)
                          if i not in set(self._tensor_pos)}
        self.output_specs: list = []
        self._out_paths: list = []

    @staticmethod
    def _input_name(path: tuple) -> str:
        # path[0] selects args (0) or kwargs (1); kwargs are named by their key, args by "argN".
        head, rest = path[0].idx, path[1:]
        name = path_name(rest, "")
        return name if head == 1 else f"arg{name}"

    def example_tensors(self) -> tuple:
        return tuple(self._leaves[i] for i in self._tensor_pos)

    def forward(self, *tensors):
        leaves = list(self._leaves)
        for i, t in zip(self._tensor_pos, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self._in_spec)
        out = self.model(*args, **kwargs)
        return tuple(v for _, v in pytree.tree_flatten_with_path(out)[0] if isinstance(v, torch.Tensor))

    def record_outputs(self, out: Any) -> tuple:
        """Name the tensor leaves of the model's eager output ``out``; return them (flat, in order)."""
        leaves = pytree.tree_flatten_with_path(out)[0]
        names, tensors = [], []
        for path, v in leaves:
            if isinstance(v, torch.Tensor):
                names.append(path_name(path, "output"))
                tensors.append(v)
            elif v is not None:
                raise EngineError(f"model output {path_name(path, 'output')!r} is a {type(v).__name__}; engines return "
                                  "tensors only (a cache or object output cannot cross an export boundary)")
        if not tensors:
            raise EngineError("the model returned no tensor")
        self.output_specs = [TensorSpec.of(n, t) for n, t in zip(names, tensors)]
        return tuple(tensors)


def failure_site(message: str) -> str:
    """``file:line in fn: code`` of the call an export error names ("The following call raised this error")."""
    import re

    m = re.search(r'raised this error:\s*\n\s*File "([^"]+)", line (\d+), in (\S+)\s*\n\s*(.*)', message)
    if not m:
        return ""
    file, line, fn, code = m.groups()
    parts = file.split("/")
    short = "/".join(parts[-3:]) if len(parts) > 3 else file
    return f"{short}:{line} in {fn}: {code.strip()[:160]}"


def export_whole(flat: FlatModel, model_name: str) -> torch.export.ExportedProgram:
    """Route ``whole``: ``torch.export`` the flattened optimized model, glue included; typed error if it cannot."""
    import contextlib
    import io

    noise = io.StringIO()  # a failed export prints the partial graph; the error below says what matters
    try:
        with torch.no_grad(), contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            return torch.export.export(flat, flat.example_tensors(), strict=False)
    except Exception as exc:  # export fails in many ways; each is one reason the engine cannot be built
        first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ""
        where = failure_site(str(exc)) or failure_site(str(exc.__cause__ or ""))
        if where:
            first += f" at {where}"
        raise EngineError(
            f"model {model_name!r}: its Python glue between stages cannot be exported as one program "
            f"({type(exc).__name__}: {first}); no engine format can run it without the model's code. "
            "Data-dependent glue (e.g. filtering inputs by value) is the usual cause; the eager optimized "
            "model (vopt.optimize) still runs it."
        ) from exc

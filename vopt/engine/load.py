"""``vopt.load_engine(path)``: run an engine directory without the model's Python code.

    run = vopt.load_engine("out/llama-pt2")
    outputs = run(input_ids=ids)          # {"logits": tensor}; names and shapes in run.inputs / run.outputs

Loading reads ``manifest.json`` first (:mod:`vopt.engine.manifest`: a missing or
corrupt manifest, or another ``manifest_version``, raises
:class:`~vopt.errors.ManifestError`), then the program with its format's
weights-only loader (:mod:`.pt2`, :mod:`.aoti`, :mod:`.onnx_export`). Nothing
of the model's code is imported; vopt's op registry is (the programs call
``torch.ops.vopt.*``).

Inputs are the model's tensor inputs by name (keyword) or in manifest order
(positional). Each must have the recorded dtype and shape (engines are static:
see :mod:`vopt.engine.glue`), else :class:`~vopt.errors.EngineInputError` says
which input, what was given and what the engine accepts. Constant inputs
(non-tensors baked in at build) may be passed only with their recorded value.
The stage glue is inside the program (route ``whole``), so one call runs the
whole model.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import EngineError, EngineInputError
from .manifest import read_manifest

log = logging.getLogger(__name__)


class Engine:
    """A loaded engine: ``engine(**inputs) -> {output name: tensor}``."""

    def __init__(self, path, device=None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.format = self.manifest["engine_format"]
        self.inputs = self.manifest["inputs"]
        self.outputs = self.manifest["outputs"]
        self.constants = self.manifest.get("constants", {})
        target = self.manifest.get("target", {}).get("device", "cpu")
        self.device = str(device or target)
        self._check_versions()
        programs = self.manifest["programs"]
        if len(programs) != 1:
            raise EngineError(f"{self.path}: manifest lists {len(programs)} programs; this vopt runs single-program "
                              "(route 'whole') engines only")
        file = self.path / programs[0]["file"]
        if not file.is_file():
            raise EngineError(f"{self.path}: program file {programs[0]['file']!r} named in the manifest is missing; "
                              "rebuild the engine")
        self._runner = self._load(file)

    def _check_versions(self) -> None:
        built = self.manifest.get("versions", {}).get("torch")
        if built and built != torch.__version__:
            msg = f"{self.path} was built with torch {built}, this is torch {torch.__version__}"
            if self.format == "aoti":
                raise EngineError(msg + "; an AOTInductor package runs only with the torch that compiled it. Rebuild it")
            log.warning("vopt: %s; it may still load", msg)

    def _load(self, file: Path):
        if self.format == "pt2":
            from . import pt2

            return pt2.load(file)
        if self.format == "aoti":
            from . import aoti

            return aoti.load(file)
        if self.format == "onnx":
            from . import onnx_export

            return onnx_export.load(file, self.device)
        raise EngineError(f"{self.path}: unknown engine_format {self.format!r} in the manifest; accepted: pt2, aoti, onnx")

    def _bind(self, args: tuple, kwargs: dict) -> list:
        names = [s["name"] for s in self.inputs]
        if len(args) > len(names):
            raise EngineInputError(f"engine takes {len(names)} tensor inputs ({', '.join(names)}), got {len(args)} positional")
        bound = dict(zip(names, args))
        for k, v in kwargs.items():
            if k in self.constants:
                if v != self.constants[k]:
                    raise EngineInputError(f"input {k!r} was baked into the engine as {self.constants[k]!r}; got {v!r}")
                continue
            if k not in names:
                raise EngineInputError(f"unknown input {k!r}; the engine takes {', '.join(names)}"
                                       + (f" (constants: {', '.join(self.constants)})" if self.constants else ""))
            if k in bound:
                raise EngineInputError(f"input {k!r} given twice (positionally and by keyword)")
            bound[k] = v
        missing = [n for n in names if n not in bound]
        if missing:
            raise EngineInputError(f"missing input(s) {', '.join(missing)}; the engine takes {', '.join(names)}")
        tensors = []
        for spec in self.inputs:
            t = bound[spec["name"]]
            if not isinstance(t, torch.Tensor):
                raise EngineInputError(f"input {spec['name']!r} must be a tensor, got {type(t).__name__}")
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype != spec["dtype"]:
                raise EngineInputError(f"input {spec['name']!r} has dtype {dtype}; the engine takes {spec['dtype']}")
            if list(t.shape) != list(spec["shape"]):
                raise EngineInputError(f"input {spec['name']!r} has shape {list(t.shape)}; this engine was built for "
                                       f"{spec['shape']} (static shapes: rebuild with example inputs of the new shape)")
            if t.device.type != torch.device(self.device).type:
                raise EngineInputError(f"input {spec['name']!r} is on {t.device}; the engine runs on {self.device}")
            tensors.append(t)
        return tensors

    def run_flat(self, *tensors) -> list:
        """Run on the tensor inputs in manifest order (no checks); the outputs in manifest order."""
        with torch.no_grad():
            out = self._runner(*tensors)
        return list(out)

    def __call__(self, *args, **kwargs) -> dict:
        out = self.run_flat(*self._bind(args, kwargs))
        return {s["name"]: t for s, t in zip(self.outputs, out)}

    def __repr__(self) -> str:
        ins = ", ".join(f"{s['name']}: {s['dtype']}{s['shape']}" for s in self.inputs)
        return f"Engine({str(self.path)!r}, format={self.format}, model={self.manifest.get('model')}, inputs=[{ins}])"


def load_engine(path, device=None) -> Engine:
    """Load the engine directory ``path`` (see the module docstring)."""
    return Engine(path, device)

"""Engines: an optimized model saved so it runs without the model's Python code.

    engine_dir = vopt.engine.build_engine(opt, inputs, "onnx", "out/llama-onnx", model_name="llama")
    run = vopt.load_engine("out/llama-onnx")      # a fresh process needs only vopt (for its op registry)
    outputs = run(**inputs)                       # dict: output name -> tensor

Formats (:data:`FORMATS`): ``pt2`` (``torch.export`` program with vopt's custom
ops, loaded by ``torch.export.load``), ``aoti`` (an AOTInductor package, loaded
by ``torch._inductor.aoti_load_package``) and ``onnx`` (standard ONNX run by
onnxruntime; vopt ops lowered through :mod:`vopt.engine.onnx_registry`).

One concept per module: :mod:`.glue` (how the model's Python glue between
stages becomes part of a program, and the flat input/output specs),
:mod:`.manifest` (the versioned JSON in every engine directory), :mod:`.pt2`,
:mod:`.aoti`, :mod:`.onnx_export` (one per format), :mod:`.onnx_registry` and
:mod:`.onnx_translations` (vopt op -> ONNX lowerings), :mod:`.build`
(export, write, validate, atomic move) and :mod:`.load` (``load_engine``).
Nothing heavy is imported here.
"""
from __future__ import annotations

FORMATS = ("pt2", "aoti", "onnx")


def build_engine(*args, **kwargs):
    """See :func:`vopt.engine.build.build_engine`."""
    from .build import build_engine as _build

    return _build(*args, **kwargs)


def load_engine(path, **kwargs):
    """See :func:`vopt.engine.load.load_engine`."""
    from .load import load_engine as _load

    return _load(path, **kwargs)


__all__ = ["FORMATS", "build_engine", "load_engine"]

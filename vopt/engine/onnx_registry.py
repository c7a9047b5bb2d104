"""Registry of ONNX lowerings for vopt's custom ops (``torch.onnx.export`` ``custom_translation_table``).

An op module (or any module) registers how its op becomes standard ONNX:

    from vopt.engine.onnx_registry import register_onnx_translation, refuse_onnx

    register_onnx_translation("vopt::my_op", lambda: my_onnxscript_function)   # factory: imports onnxscript lazily
    refuse_onnx("vopt::quantized_op", "why no faithful lowering exists")

The factory runs only when an ONNX engine is built, so registering costs
nothing at import. A translation must use standard ONNX ops (default domain)
or onnxruntime contrib ops (``com.microsoft``), never a custom domain that
stock onnxruntime refuses. A vopt op with a refusal, or with no entry, makes
``build --format onnx`` fail with :class:`~vopt.errors.EngineError` naming the
op, the reason and the formats that do work (pt2, aoti).

Translations for the ops that exist today live in :mod:`vopt.engine.onnx_translations`
(imported by the ONNX exporter).
"""
from __future__ import annotations

from typing import Callable

from ..errors import EngineError

_TRANSLATIONS: dict = {}  # op name "ns::op" -> factory returning {overload_name: onnxscript function}
_REFUSALS: dict = {}  # op name -> reason


def register_onnx_translation(op_name: str, factory: Callable[[], object], overload: str = "default") -> None:
    """Register ``factory() -> translation function`` for ``op_name``'s ``overload`` (``"ns::op"``)."""
    if "::" not in op_name:
        raise ValueError(f"op_name must be 'namespace::op', got {op_name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable (returning the translation function), got {type(factory).__name__}")
    _TRANSLATIONS[(op_name, overload)] = factory
    _REFUSALS.pop(op_name, None)


def refuse_onnx(op_name: str, reason: str) -> None:
    """Declare that ``op_name`` has no faithful ONNX lowering, and why."""
    if "::" not in op_name:
        raise ValueError(f"op_name must be 'namespace::op', got {op_name!r}")
    _REFUSALS[op_name] = reason
    for key in [k for k in _TRANSLATIONS if k[0] == op_name]:
        del _TRANSLATIONS[key]


def registered() -> dict:
    """``{"ns::op.overload": "translation" | "refused: reason"}`` (for ``vopt-compile env`` and the manifest)."""
    out = {f"{op}.{ov}": "translation" for op, ov in _TRANSLATIONS}
    out.update({op: f"refused: {why}" for op, why in _REFUSALS.items()})
    return dict(sorted(out.items()))


def translation_table(op_names: set) -> dict:
    """``custom_translation_table`` for the ``ns::op.overload`` names found in a graph.

    Raises :class:`EngineError` for a refused op or one without a translation.
    """
    import torch

    table = {}
    for full in sorted(op_names):
        op_name, _, overload = full.rpartition(".")
        if op_name in _REFUSALS:
            raise EngineError(f"{op_name} cannot be lowered to ONNX: {_REFUSALS[op_name]}. "
                              "Build --format pt2 or aoti for this model/pass, or drop the pass")
        factory = _TRANSLATIONS.get((op_name, overload))
        if factory is None:
            known = ", ".join(f"{o}.{v}" for o, v in sorted(_TRANSLATIONS)) or "(none)"
            raise EngineError(f"{full} has no ONNX translation registered (vopt.engine.onnx_registry); registered: {known}. "
                              "Build --format pt2 or aoti instead, or register one")
        ns, name = op_name.split("::")
        table[getattr(getattr(getattr(torch.ops, ns), name), overload)] = factory()
    return table

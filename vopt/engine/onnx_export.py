"""Format ``onnx``: standard ONNX that stock onnxruntime runs (opset 23).

The exported program goes through ``torch.onnx.export(dynamo=True, opset_version=23)``
with a ``custom_translation_table`` built from :mod:`vopt.engine.onnx_registry`
for the vopt ops (and ``aten._is_all_true``) found in the graph. After export,
every node's domain is checked: only the standard domain and onnxruntime's
``com.microsoft`` contrib ops are accepted, so an engine never depends on a
custom domain stock onnxruntime refuses.

Loading uses ``onnxruntime.InferenceSession`` (CPUExecutionProvider here;
CUDAExecutionProvider first when onnxruntime-gpu has it). Weights are plain
ONNX tensors (external data file next to the model); nothing is unpickled.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from ..errors import EngineError

OPSET = 23
ALLOWED_DOMAINS = ("", "ai.onnx", "com.microsoft")
log = logging.getLogger(__name__)


def ops_needing_translation(ep: torch.export.ExportedProgram) -> set:
    """``ns::op.overload`` names of vopt ops (and ``aten::_is_all_true``) in the program."""
    names = set()
    for node in ep.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
            ns = target.namespace
            name = target._schema.name  # "vopt::attention"
            if ns == "vopt" or name == "aten::_is_all_true":
                names.add(f"{name}.{target._overloadname}")
    return names


def export(ep: torch.export.ExportedProgram, path: Path, input_names: list, output_names: list) -> dict:
    """Write ``path`` (+ its external data); return lowering notes ``{op: how}`` for the manifest."""
    import onnx

    from . import onnx_translations
    from .onnx_registry import translation_table

    onnx_translations.register_all()
    needed = ops_needing_translation(ep)
    table = translation_table(needed)  # raises EngineError for refused / unknown ops
    # The exporter logs a warning per optional torchvision op it cannot register; not ours to show.
    reg_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = reg_log.level
    reg_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(ep, (), dynamo=True, opset_version=OPSET, custom_translation_table=table,
                                        input_names=input_names, output_names=output_names, verbose=False)
        except Exception as exc:  # the exporter raises many types; each is a build failure with its reason
            first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ""
            raise EngineError(f"ONNX export failed: {type(exc).__name__}: {first}") from exc
        finally:
            reg_log.setLevel(level)
    program.save(str(path), external_data=True)
    model = onnx.load(str(path), load_external_data=False)
    bad = sorted({n.domain for n in model.graph.node if n.domain not in ALLOWED_DOMAINS})
    for fn in model.functions:
        bad += sorted({n.domain for n in fn.node if n.domain not in ALLOWED_DOMAINS and n.domain != fn.domain})
    if bad:
        raise EngineError(f"the ONNX graph uses custom domain(s) {bad}, which stock onnxruntime refuses; "
                          f"accepted: standard ONNX and com.microsoft")
    counts = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return {"opset": OPSET, "translated_ops": sorted(needed),
            "attention_nodes": counts.get("Attention", 0), "node_count": len(model.graph.node)}


def providers(device: str) -> list:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise EngineError(f"this engine targets {device} but onnxruntime has no CUDAExecutionProvider "
                              f"(available: {', '.join(available)}); install onnxruntime-gpu (pip install vopt[gpu])")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRunner:
    """Runs an ONNX engine on torch tensors (numpy in between), returning torch tensors."""

    def __init__(self, path: Path, device: str):
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), providers=providers(device))
        except EngineError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise EngineError(f"onnxruntime cannot load {path}: {type(exc).__name__}: {exc}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.device = device

    def __call__(self, *tensors):
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, tensors)}
        try:
            outs = self.session.run(None, feeds)
        except Exception as exc:  # onnxruntime's own exception types
            raise EngineError(f"onnxruntime failed to run the engine: {str(exc).strip().splitlines()[0][:500]}") from None
        return [torch.from_numpy(o).to(self.device) for o in outs]


def load(path: Path, device: str) -> OnnxRunner:
    return OnnxRunner(path, device)

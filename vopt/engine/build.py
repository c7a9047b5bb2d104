"""Build an engine directory from an optimized model: export, write, reload, validate, move into place.

    build_engine(opt, example_inputs, "aoti", "out/llama-aoti", model_name="llama", config=cfg)

Steps (a progress bar on stderr when ``progress=True``):

1. Run the eager optimized model on the example inputs: the reference outputs.
2. Export the whole model, glue included (route ``whole``, :mod:`vopt.engine.glue`).
3. Write the format's file into a fresh temporary directory next to ``out``.
4. Load it back exactly as :func:`vopt.engine.load_engine` does and compare every
   output with the reference: float outputs need
   ``max|engine - eager| <= atol + rtol * max|eager|`` (per output), integer and
   bool outputs must be equal. The inputs and reference outputs are stored in
   ``validation.safetensors`` so ``vopt-compile validate DIR`` can re-run the check.
5. Write ``manifest.json`` and move the directory to ``out`` (replacing an existing
   one only with ``force=True``). A failed validation still writes the engine
   (its manifest says ``passed: false``) so it can be inspected; the caller decides
   the exit code.

Default tolerances (:data:`DEFAULT_ATOL`, :data:`DEFAULT_RTOL`): the engine runs
the same float32 math as the eager optimized model through other kernels
(Inductor's generated C++, onnxruntime's fused Attention/MatMul), which changes
summation order only: measured on the zoo up to 2.3e-6 of the output's magnitude,
so ``rtol=1e-4`` relative to ``max|eager|`` plus ``atol=1e-5`` leaves a >40x margin
and still catches any real error (a wrong mask or scale moves outputs by >1e-2).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ConfigError, EngineError
from . import FORMATS
from .glue import FlatModel, export_whole
from .manifest import write_manifest

DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-4
PROGRAM_FILES = {"pt2": "model.pt2", "aoti": "model.aoti.pt2", "onnx": "model.onnx"}
VALIDATION_FILE = "validation.safetensors"


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"unsupported engine format {fmt!r}; accepted: {', '.join(FORMATS)}")
    return fmt


def compare_outputs(got, ref, names: list, atol: float, rtol: float) -> dict:
    """Per-output comparison (see the module docstring); ``passed`` is True when every output passes."""
    if len(got) != len(ref):
        return {"passed": False, "atol": atol, "rtol": rtol,
                "outputs": [], "error": f"engine returned {len(got)} outputs, expected {len(ref)}"}
    rows = []
    for name, g, r in zip(names, got, ref):
        g = g.detach().cpu()
        r = r.detach().cpu()
        row = {"name": name, "shape": list(r.shape)}
        if tuple(g.shape) != tuple(r.shape):
            row.update(passed=False, error=f"shape {list(g.shape)} != {list(r.shape)}")
        elif r.is_floating_point() or r.is_complex():
            diff = (g.double() - r.double()).abs().max().item() if r.numel() else 0.0
            ref_max = r.double().abs().max().item() if r.numel() else 0.0
            bound = atol + rtol * ref_max
            row.update(max_abs_diff=diff, max_abs_ref=ref_max, bound=bound,
                       passed=bool(diff <= bound))  # NaN diff fails
        else:
            mismatches = int((g != r).sum().item())
            row.update(mismatches=mismatches, passed=mismatches == 0, rule="exact (integer/bool output)")
        rows.append(row)
    return {"passed": all(r["passed"] for r in rows), "atol": atol, "rtol": rtol,
            "rule": "float outputs: max|engine - eager| <= atol + rtol * max|eager|; integer/bool outputs: equal",
            "outputs": rows}


class _Steps:
    """A step progress bar (tqdm on stderr) or nothing."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", leave=True,
                            bar_format="{desc}: {n}/{total} {postfix} [{elapsed}]")

    @contextlib.contextmanager
    def step(self, what: str):
        if self.bar is not None:
            self.bar.set_postfix_str(what)
        yield
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _device_and_dtype(tensors) -> tuple:
    dev = next((t.device for t in tensors), torch.device("cpu"))
    fl = [t.dtype for t in tensors if t.is_floating_point()]
    return dev, (str(fl[0]).removeprefix("torch.") if fl else None)


def _target(device: torch.device, dtype: Optional[str]) -> dict:
    target = {"device": device.type, "dtype": dtype}
    if device.type == "cuda":
        target["gpu"] = torch.cuda.get_device_name(device)
        target["arch"] = "sm_%d%d" % torch.cuda.get_device_capability(device)
    return target


def _stage_summary(report) -> list:
    out = []
    for ev in report.stage_events:
        d = ev.to_dict()
        out.append({"stage": d["stage"], "role": d["role"], "signature": d["signature"], "exported": d["exported"],
                    "reason": d["reason"],
                    "passes": [{k: pr[k] for k in ("pass", "matched", "rewritten", "skipped")} for pr in d["pass_results"]]})
    return out


def write_program(fmt: str, ep, path: Path, flat: FlatModel) -> dict:
    """Write the program in format ``fmt``; return lowering notes for the manifest."""
    if fmt == "pt2":
        from . import pt2

        pt2.save(ep, path)
        return {"ops": "vopt custom ops kept as opaque calls (torch.ops.vopt.*), resolved at load"}
    if fmt == "aoti":
        from . import aoti

        aoti.compile_package(ep, path)
        return {"ops": "vopt custom ops called through AOTInductor's proxy executor (torch.ops.vopt.*), resolved at load"}
    from . import onnx_export

    bf16 = [s.name for s in (*flat.input_specs, *flat.output_specs) if s.dtype == "bfloat16"]
    if bf16:
        raise EngineError(f"ONNX engines exchange tensors with onnxruntime through numpy, which has no bfloat16 "
                          f"({', '.join(bf16)}); build --dtype float16 or float32 for onnx, or use pt2 / aoti")
    return onnx_export.export(ep, path, [s.name for s in flat.input_specs], [s.name for s in flat.output_specs])


def build_engine(
    opt: torch.nn.Module,
    example_inputs: Any,
    fmt: str,
    out: "str | Path",
    *,
    model_name: str = "model",
    config: Any = None,
    force: bool = False,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    progress: bool = False,
    versions: Optional[dict] = None,
) -> dict:
    """Build the ``fmt`` engine of the optimized model ``opt`` into ``out``; return the manifest (dict).

    ``opt`` is a :class:`~vopt.optimize.OptimizedModel` (or any module); ``example_inputs``
    as for :func:`vopt.optimize`. The caller's model and inputs are not modified.
    Raises :class:`~vopt.errors.ConfigError` for a bad format or an existing ``out``
    without ``force``, :class:`~vopt.errors.EngineError` when the model or an op
    cannot be shipped in ``fmt``.
    """
    from ..optimize import split_inputs

    check_format(fmt)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} exists and is not empty; pass --force to overwrite")
    args, kwargs = split_inputs(example_inputs)
    flat = FlatModel(opt, args, kwargs)
    steps = _Steps(4, f"vopt-compile {fmt} {model_name}", progress)
    times = {}
    try:
        with steps.step("eager reference"):
            with torch.no_grad():
                ref = flat.record_outputs(opt(*args, **kwargs))
        with steps.step("torch.export (whole model, glue included)"):
            t0 = time.perf_counter()
            ep = export_whole(flat, model_name)
            times["export_s"] = round(time.perf_counter() - t0, 2)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.vopt-tmp-", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; an engine directory is meant to be shared
        try:
            program = PROGRAM_FILES[fmt]
            what = {"pt2": "torch.export.save", "aoti": "AOTInductor compile (slow)", "onnx": "ONNX export"}[fmt]
            with steps.step(what):
                t0 = time.perf_counter()
                lowering = write_program(fmt, ep, tmp / program, flat)
                times[f"{fmt}_write_s"] = round(time.perf_counter() - t0, 2)
            tensors = flat.example_tensors()
            device, dtype = _device_and_dtype(tensors)
            manifest = _manifest(opt, flat, fmt, program, model_name, config, lowering, device, dtype, versions)
            with steps.step("reload + validate"):
                _save_validation(tmp / VALIDATION_FILE, flat, tensors, ref)
                write_manifest(tmp, manifest)  # the loader reads it
                from .load import load_engine

                engine = load_engine(tmp)
                t0 = time.perf_counter()
                got = engine.run_flat(*tensors)
                times["engine_run_s"] = round(time.perf_counter() - t0, 3)
                validation = compare_outputs(got, ref, [s.name for s in flat.output_specs], atol, rtol)
            manifest["validation"] = {**validation, "against": "eager optimized model (vopt.optimize) on the example inputs"}
            manifest["build_seconds"] = times
            written = write_manifest(tmp, manifest)
            _move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        steps.close()
    return written


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp``: the old directory is renamed aside first and removed only after the move."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.vopt-old-{os.getpid()}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _manifest(opt, flat, fmt, program, model_name, config, lowering, device, dtype, versions) -> dict:
    report = getattr(opt, "report", None)
    stages = _stage_summary(report) if report is not None else []
    exported = sorted({s["stage"] for s in stages if s["exported"]})
    eager = sorted({s["stage"] for s in stages if not s["exported"]})
    if versions is None:
        from ..cli import _versions

        versions = _versions()
    from .. import __version__

    return {
        "engine_format": fmt,
        "model": model_name,
        "route": "whole",
        "route_note": ("the model's forward (glue) and every stage traced into one program; "
                       + (f"stages {eager} ran eagerly in vopt and are traced as plain torch ops" if eager else
                          "every stage kept its pass-rewritten graph")),
        "stages": stages,
        "programs": [{"file": program, "stages": exported + eager, "inputs": "all", "outputs": "all"}],
        "passes": report.passes if report is not None else [],
        "config": config.to_dict() if hasattr(config, "to_dict") else config,
        "versions": {**versions, "vopt": __version__},
        "target": _target(device, dtype),
        "inputs": [s.to_dict() for s in flat.input_specs],
        "outputs": [s.to_dict() for s in flat.output_specs],
        "constants": {k: v for k, v in flat.constants.items()},
        "shapes": "static: the stages are captured per input signature; other shapes are refused at load",
        "lowering": lowering,
        "validation_file": VALIDATION_FILE,
    }


def _save_validation(path: Path, flat: FlatModel, tensors, ref) -> None:
    from safetensors.torch import save_file

    data = {f"input.{s.name}": t.detach().contiguous().cpu() for s, t in zip(flat.input_specs, tensors)}
    data.update({f"output.{s.name}": t.detach().contiguous().cpu() for s, t in zip(flat.output_specs, ref)})
    save_file(data, str(path))


def load_validation(directory: Path, manifest: dict) -> tuple:
    """``(inputs, reference outputs)`` stored at build time (safetensors: no pickle)."""
    from safetensors.torch import load_file

    path = Path(directory) / manifest.get("validation_file", VALIDATION_FILE)
    if not path.is_file():
        raise EngineError(f"{directory} has no {path.name}; rebuild the engine to re-run validation")
    data = load_file(str(path))
    try:
        inputs = [data[f"input.{s['name']}"] for s in manifest["inputs"]]
        outputs = [data[f"output.{s['name']}"] for s in manifest["outputs"]]
    except KeyError as exc:
        raise EngineError(f"{path} lacks tensor {exc}; rebuild the engine") from None
    return inputs, outputs


__all__ = ["DEFAULT_ATOL", "DEFAULT_RTOL", "PROGRAM_FILES", "build_engine", "check_format", "compare_outputs",
           "load_validation"]

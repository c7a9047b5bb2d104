"""``vopt-compile``: build, explain, list, env.

Exit codes (also in ``vopt-compile --help``):

  0  success
  1  unexpected internal error
  2  usage error: bad flag, unknown model/pass/adapter, invalid config
  3  a required kernel backend or the CUDA library is missing
  4  validation failed: the optimized model differs from eager beyond tolerance
  5  strict mode failed: a pass skipped a match or a stage could not be captured

Heavy imports (torch, transformers) happen inside the commands so ``--help`` is fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import typing
from pathlib import Path

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_BACKEND, EXIT_VALIDATION, EXIT_STRICT = 0, 1, 2, 3, 4, 5

EPILOG = """exit codes:
  0 success   1 internal error   2 usage error (bad flag, unknown name, invalid config)
  3 missing kernel backend / CUDA library   4 validation failed   5 strict mode failed"""


class UsageError(Exception):
    """A command-line usage problem (exit code 2)."""


# ---- model loading ----------------------------------------------------------
def load_model(spec: str, inputs_spec: "str | None" = None):
    """Resolve MODEL: a zoo name (tiny size) or ``module:attr``; return (name, model, example_inputs)."""
    import torch

    from . import zoo

    if ":" not in spec:
        try:
            zm = zoo.build(spec, "tiny")
        except KeyError as exc:  # UnknownNameError
            raise UsageError(f"{exc} (or give module:attr)") from None
        return spec, zm.model, zm.example_inputs()
    mod_name, _, attr = spec.partition(":")
    obj = _import_attr(mod_name, attr, "MODEL")
    if callable(obj) and not isinstance(obj, torch.nn.Module):
        obj = obj()
    inputs = None
    if isinstance(obj, tuple) and len(obj) == 2:
        obj, inputs = obj
    if not isinstance(obj, torch.nn.Module):
        raise UsageError(f"MODEL {spec!r} must name an nn.Module, or a callable returning one or (module, example_inputs); got {type(obj).__name__}")
    if inputs_spec:
        mod_name, _, attr = inputs_spec.partition(":")
        inputs = _import_attr(mod_name, attr, "--inputs")
        inputs = inputs() if callable(inputs) else inputs
    if inputs is None:
        raise UsageError(f"MODEL {spec!r} gave no example inputs: return (module, example_inputs) or pass --inputs module:attr")
    return spec, obj, inputs


def _import_attr(mod_name: str, attr: str, what: str):
    if not mod_name or not attr:
        raise UsageError(f"{what} must be 'module:attr', got {mod_name}:{attr}")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise UsageError(f"{what}: cannot import module {mod_name!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UsageError(f"{what}: module {mod_name!r} has no attribute {attr!r}") from None


# ---- config flags generated from OptimizeConfig -----------------------------
_FLAG_FIELDS = ("passes", "adapter", "strict", "debug")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for the simple OptimizeConfig fields, help text taken from the dataclass."""
    from .optimize import OptimizeConfig

    parser.add_argument("--config", metavar="FILE", help="OptimizeConfig as JSON; flags override its fields.")
    fields = {f.name: f for f in dataclasses.fields(OptimizeConfig)}
    for name in _FLAG_FIELDS:
        f = fields[name]
        help_text = f.metadata.get("help")
        if not help_text:
            raise RuntimeError(f"OptimizeConfig.{name} has no help text")
        flag = "--" + name.replace("_", "-")
        tp = typing.get_type_hints(OptimizeConfig)[name]
        if tp is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif "list" in str(tp):
            parser.add_argument(flag, metavar="A,B", type=lambda s: [x for x in s.split(",") if x], default=None,
                                help=help_text + " Comma-separated.")
        else:
            parser.add_argument(flag, default=None, help=help_text)


def config_from_args(args):
    from .optimize import OptimizeConfig

    data = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config {path}: no such file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"--config {path}: not valid JSON ({exc})") from None
    for name in _FLAG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    return OptimizeConfig.from_dict(data)


# ---- commands -------------------------------------------------------------------
def _max_abs_diff(a, b) -> tuple:
    """``(max |a - b|, max |b|)`` over the floating-point leaves of two outputs."""
    import torch
    from torch.utils import _pytree as pytree

    pairs = [(x, y) for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b))
             if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if not pairs:
        raise RuntimeError("the model returned no floating-point tensor to validate")
    diff = max((x.float() - y.float()).abs().max().item() for x, y in pairs)
    return diff, max(y.float().abs().max().item() for _, y in pairs)


def _primary(out):
    return getattr(out, "logits", out)


def _median_ms(fn, repeat: int = 5) -> float:
    import statistics
    import time

    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cmd_build(args) -> int:
    import torch

    from . import optimize
    from .optimize import split_inputs

    config = config_from_args(args)
    config.pass_manager()  # validate pass names and order before building the model
    name, model, inputs = load_model(args.model, args.inputs)
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None and out_dir.exists() and any(out_dir.iterdir()) and not args.force:
        raise UsageError(f"--out {out_dir} exists and is not empty; pass --force to overwrite")
    opt = optimize(model, config, example_inputs=inputs)
    a, kw = split_inputs(inputs)
    with torch.no_grad():
        ref = model(*a, **kw)
        got = opt(*a, **kw)
        diff, ref_max = _max_abs_diff(_primary(got), _primary(ref))
        eager_ms = _median_ms(lambda: model(*a, **kw))
        opt_ms = _median_ms(lambda: opt(*a, **kw))
    bound = args.atol + args.rtol * ref_max
    ok = diff <= bound
    opt.set_validation({"max_abs_diff": f"{diff:.3g}", "atol": args.atol, "rtol": args.rtol,
                        "bound": f"{bound:.3g}", "passed": ok,
                        "eager_ms": f"{eager_ms:.2f}", "optimized_ms": f"{opt_ms:.2f}", "timing": "CPU wall clock, median of 5"})
    report = opt.report
    if args.json:
        print(report.to_json())
    else:
        print(report.table())
        print(f"\nbefore: eager {eager_ms:.2f} ms   after: optimized {opt_ms:.2f} ms   (median of 5, {_device_of(model)})")
        print(f"validation: max |optimized - eager| = {diff:.3g} (bound atol {args.atol:g} + rtol {args.rtol:g} "
              f"x max|eager| {ref_max:.3g} = {bound:.3g}): {'PASS' if ok else 'FAIL'}")
    if out_dir is not None:
        _write_outputs(out_dir, name, config, report)
        print(f"wrote {out_dir}/report.json and {out_dir}/manifest.json", file=sys.stderr)
    return EXIT_OK if ok else EXIT_VALIDATION


def _device_of(model) -> str:
    p = next(model.parameters(), None)
    return "CPU" if p is None or p.device.type == "cpu" else str(p.device)


def _write_outputs(out_dir: Path, name: str, config, report) -> None:
    import tempfile

    from . import __version__

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".vopt-", dir=out_dir.parent))
    (tmp / "report.json").write_text(report.to_json())
    manifest = {"format": "vopt-report", "manifest_version": 1, "model": name, "vopt": __version__,
                "config": config.to_dict(), "passes": report.passes, "versions": _versions()}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def cmd_explain(args) -> int:
    import dataclasses as dc

    from . import optimize

    config = dc.replace(config_from_args(args), dry_run=True)
    config.pass_manager()
    name, model, inputs = load_model(args.model, args.inputs)
    opt = optimize(model, config, example_inputs=inputs)
    report = opt.report
    if args.json:
        print(report.to_json())
    else:
        print(f"explain {name}: what each pass would do (nothing is rewritten)\n")
        print(report.table())
        for p in report.passes:
            print(f"pass {p['name']} ({p['kind']}): config {json.dumps({k: v for k, v in p['config'].items() if k != 'type'})}")
    return EXIT_OK


def cmd_list(args) -> int:
    from . import zoo
    from .adapters import ADAPTERS, GENERIC
    from .pass_protocol import registered_passes

    passes = registered_passes()
    data = {
        "models": [{"name": e.name, "paper": e.paper, "backbone": e.backbone, "stages": list(e.stages), "notes": e.notes,
                    "passes": [{"name": p, "available": p in passes} for p in e.passes]} for e in zoo.list()],
        "passes": [{"name": n, "kind": c.kind.value, "default": c.default, "summary": c.summary} for n, c in passes.items()],
        "adapters": [{"family": a.family, "classes": list(a.model_classes), "stages": [s.name for s in a.stages]} for a in (*ADAPTERS, GENERIC)],
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print("models (vopt-compile build NAME; '*' = pass not implemented yet):")
    for m in data["models"]:
        ps = ", ".join(p["name"] + ("" if p["available"] else "*") for p in m["passes"])
        default = "  (default)" if m["name"] == zoo.DEFAULT_MODEL else ""
        print(f"  {m['name']:<18} {m['backbone']}{default}\n  {'':<18} stages: {', '.join(m['stages'])}; passes: {ps}")
    print("\npasses:")
    for p in data["passes"]:
        print(f"  {p['name']:<24} {p['kind']:<8} {'default' if p['default'] else 'opt-in ':<8} {p['summary']}")
    print("\nadapters:")
    for a in data["adapters"]:
        print(f"  {a['family']:<18} stages: {', '.join(a['stages'])}")
    return EXIT_OK


def _versions() -> dict:
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "triton", "transformers", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "nvidia-cutlass"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def cmd_env(args) -> int:
    import shutil
    import subprocess

    import torch

    from . import cuda_library
    from .dispatch import ENV_VAR, registered_ops
    from . import ops  # noqa: F401  (registers the ops)

    data = {"versions": _versions()}
    gpu = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        gpu["devices"] = [{"name": torch.cuda.get_device_name(i), "capability": "sm_%d%d" % torch.cuda.get_device_capability(i)}
                          for i in range(torch.cuda.device_count())]
    data["gpu"] = gpu
    nvcc = shutil.which("nvcc")
    data["nvcc"] = None
    if nvcc:
        res = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
        data["nvcc"] = {"path": nvcc, "version": (res.stdout.strip().splitlines() or [""])[-1]}
    lib = {"path": str(cuda_library.library_path()) if cuda_library.library_path() else None,
           "unavailable": cuda_library.unavailable_reason()}
    try:
        lib["built_archs"] = cuda_library.built_archs()
        lib["cuda_runtime"] = cuda_library.runtime_version()
    except Exception as exc:  # the library may be missing or unloadable; report, don't fail
        lib["load_error"] = f"{type(exc).__name__}: {exc}"
    data["cuda_library"] = lib
    data["backend_preference"] = os.environ.get(ENV_VAR) or "auto"
    data["ops"] = {name: {b: (why or "available") for b, why in op.backend_status()} for name, op in sorted(registered_ops().items())}
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print("versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v))
    if gpu["cuda_available"]:
        for d in gpu["devices"]:
            print(f"gpu: {d['name']} ({d['capability']})")
    else:
        print(f"gpu: none (torch.cuda.is_available() is False; torch CUDA build: {gpu['torch_cuda']})")
    print(f"nvcc: {data['nvcc']['version'] + ' at ' + data['nvcc']['path'] if data['nvcc'] else 'not found'}")
    print(f"cuda library: {lib['path'] or 'not built'}; archs {lib.get('built_archs', '-')}; "
          f"{'usable' if not lib['unavailable'] else 'unusable: ' + lib['unavailable']}")
    print(f"{ENV_VAR}={data['backend_preference']}")
    print("kernel backends:")
    for name, status in data["ops"].items():
        for backend, why in status.items():
            print(f"  {name:<18} {backend:<10} {why}")
    return EXIT_OK


# ---- parser -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vopt-compile", description="Optimize video LLMs with vopt.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def model_args(p):
        p.add_argument("model", metavar="MODEL", help="a zoo model name (see `vopt-compile list`) or module:attr")
        p.add_argument("--inputs", metavar="module:attr", help="example inputs for a module:attr MODEL (dict of kwargs, tuple of args, or a callable returning one)")
        p.add_argument("--json", action="store_true", help="print the report as JSON")
        add_config_flags(p)

    p = sub.add_parser("build", help="optimize a model, validate it against eager, print the before/after report",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(p)
    p.add_argument("--out", metavar="DIR", help="write report.json and manifest.json here")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")
    p.add_argument("--atol", type=float, default=1e-5,
                   help="absolute part of the allowed max |optimized - eager| on the primary output (default 1e-5)")
    p.add_argument("--rtol", type=float, default=1e-5,
                   help="relative part, times max |eager| (default 1e-5: exact passes in float32 differ from eager "
                        "only by summation order, ~1e-6 of the output's magnitude)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("explain", help="show what each pass would match and do, without rewriting",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("list", help="list zoo models, passes and adapters")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("env", help="versions, GPU/arch, CUDA library and kernel backend availability")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_env)
    return parser


def main(argv=None) -> int:
    from .errors import (BackendUnavailableError, CaptureError, ConfigError, CudaLibraryError, PassOrderError,
                         StrictModeError, UnknownNameError)

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConfigError, UnknownNameError, PassOrderError) as exc:
        print(f"vopt-compile: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (BackendUnavailableError, CudaLibraryError) as exc:
        print(f"vopt-compile: error: {exc}", file=sys.stderr)
        return EXIT_BACKEND
    except (StrictModeError, CaptureError) as exc:
        print(f"vopt-compile: error: {exc}", file=sys.stderr)
        return EXIT_STRICT


if __name__ == "__main__":
    sys.exit(main())

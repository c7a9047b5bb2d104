"""``vopt-compile``: build, explain, validate, bench, list, env.

``build MODEL --format pt2|aoti|onnx --out DIR`` writes an engine directory
(:mod:`vopt.engine`); without ``--format`` it optimizes, validates and writes
only the report (report.json + a ``vopt-report`` manifest.json).

Exit codes (also in ``vopt-compile --help``):

  0  success
  1  unexpected internal error
  2  usage error: bad flag, unknown model/pass/adapter, invalid config
  3  a required kernel backend or the CUDA library is missing
  4  validation failed: the optimized model differs from eager beyond tolerance
  5  strict mode failed: a pass skipped a match or a stage could not be captured
  6  engine unsupported: the model's glue or one of its ops cannot be shipped in the requested format

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

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_BACKEND, EXIT_VALIDATION, EXIT_STRICT, EXIT_ENGINE = 0, 1, 2, 3, 4, 5, 6

EPILOG = """exit codes:
  0 success   1 internal error   2 usage error (bad flag, unknown name, invalid config)
  3 missing kernel backend / CUDA library   4 validation failed   5 strict mode failed
  6 engine unsupported: the model or an op cannot be shipped in that --format (the message says why)"""


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


# ---- config flags generated from the config dataclasses ---------------------
_FLAG_FIELDS = ("passes", "adapter", "strict", "debug")
_SIMPLE = (bool, int, float, str)


def _flag_kind(tp) -> "str | None":
    """How a config field becomes a flag: 'bool', 'int', 'float', 'str', 'list', or None (not flaggable)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return None
        tp = rest[0]
    if tp in _SIMPLE:
        return tp.__name__
    if typing.get_origin(tp) is list and typing.get_args(tp) in ((str,), (int,)):
        return "list"
    return None


def _pass_flag_specs() -> list:
    """``(pass name, field name, kind, help, flag)`` for every simple field of every registered pass config."""
    from .pass_protocol import registered_passes

    specs = []
    for pname, cls in sorted(registered_passes().items()):
        cfg = cls.config_cls
        hints = typing.get_type_hints(cfg)
        for f in dataclasses.fields(cfg):
            if f.name == "version":
                continue
            kind = _flag_kind(hints[f.name])
            if kind is None:
                continue  # nested / dict fields: set them in a --config file
            help_text = f.metadata.get("help")
            if not help_text:
                raise RuntimeError(f"{cfg.__name__}.{f.name} has no help text")
            flag = "--" + pname.replace("_", "-") + "." + f.name.replace("_", "-")
            specs.append((pname, f.name, kind, help_text, flag))
    return specs


def _list_arg(s: str) -> list:
    return [x for x in s.split(",") if x]


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for the simple OptimizeConfig fields and every pass config field, help text taken from the dataclasses."""
    from .optimize import OptimizeConfig

    parser.add_argument("--config", metavar="FILE",
                        help="OptimizeConfig as YAML (.yaml/.yml) or JSON; an optional 'cli' section holds any flag of "
                             "this command by its long name (e.g. format: onnx). Flags given on the command line win.")
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
            parser.add_argument(flag, metavar="A,B", type=_list_arg, default=None, help=help_text + " Comma-separated.")
        else:
            parser.add_argument(flag, default=None, help=help_text)
    groups = {}
    for pname, fname, kind, help_text, flag in _pass_flag_specs():
        if pname not in groups:
            groups[pname] = parser.add_argument_group(f"pass {pname} (set only when the pass runs; same as pass_configs.{pname} in --config)")
        dest = f"pc__{pname}__{fname}"
        if kind == "bool":
            groups[pname].add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind == "list":
            groups[pname].add_argument(flag, dest=dest, metavar="A,B", type=_list_arg, default=None, help=help_text + " Comma-separated.")
        else:
            conv = {"int": int, "float": float, "str": str}[kind]
            groups[pname].add_argument(flag, dest=dest, type=conv, default=None, metavar=kind.upper(), help=help_text)


def read_config_file(path_text: str) -> dict:
    """The dict in a YAML or JSON config file; :class:`UsageError` naming the file and the problem."""
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--config {path}: not valid JSON ({exc}); YAML files must end in .yaml or .yml") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: must hold a mapping (OptimizeConfig fields), got {type(data).__name__}")
    return data


def _config_data(args) -> dict:
    """The config file's data (cached on ``args``), its 'cli' section applied to flags not given on the command line."""
    if getattr(args, "_config_data", None) is not None:
        return dict(args._config_data)
    data = read_config_file(args.config) if getattr(args, "config", None) else {}
    cli_section = data.pop("cli", None) or {}
    if not isinstance(cli_section, dict):
        raise UsageError(f"--config {args.config}: 'cli' must be a mapping of flag names to values")
    defaults = getattr(args, "_defaults", {})
    for key, value in cli_section.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in defaults or dest in ("model", "config", "func", "command"):
            raise UsageError(f"--config {args.config}: 'cli' key {key!r} is not a flag of this command; "
                             f"accepted: {', '.join(sorted(k for k in defaults if not k.startswith(('pc__', '_')) and k not in ('model', 'config', 'func', 'command')))}")
        if getattr(args, dest) == defaults[dest]:  # not given on the command line
            setattr(args, dest, value)
    args._config_data = data
    return dict(data)


def config_from_args(args):
    from .optimize import OptimizeConfig

    data = _config_data(args)
    for name in _FLAG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    pass_configs = data.get("pass_configs")
    for key, value in vars(args).items():
        if key.startswith("pc__") and value is not None:
            _, pname, fname = key.split("__")
            if pass_configs is None:
                pass_configs = data["pass_configs"] = {}
            if not isinstance(pass_configs, dict):
                raise UsageError("pass_configs in --config must be a mapping of pass names to configs")
            entry = pass_configs.setdefault(pname, {})
            if not isinstance(entry, dict):
                raise UsageError(f"--{pname}.* flags need pass_configs.{pname} to be a mapping in --config")
            entry[fname] = value
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


_DTYPES = ("float32", "float16", "bfloat16")


def _place(model, inputs, device: "str | None", dtype: "str | None"):
    """Move the (CLI-built) model and its example inputs to ``--device`` / ``--dtype``."""
    import torch
    from torch.utils import _pytree as pytree

    if device is None and dtype is None:
        return model, inputs
    if dtype is not None and dtype not in _DTYPES:
        raise UsageError(f"--dtype {dtype!r}; accepted: {', '.join(_DTYPES)}")
    if device is not None:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UsageError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda but torch.cuda.is_available() is False")
    else:
        dev = None
    dt = getattr(torch, dtype) if dtype else None
    model = model.to(device=dev, dtype=dt)

    def move(x):
        if not isinstance(x, torch.Tensor):
            return x
        return x.to(device=dev, dtype=dt if (dt is not None and x.is_floating_point()) else x.dtype)

    return model, pytree.tree_map(move, inputs)


# (atol, rtol) of the optimized-vs-eager check and of the engine-vs-optimized check, by the model's float dtype.
_TOLERANCES = {"float32": ((1e-5, 1e-5), (1e-5, 1e-4)), "float16": ((1e-3, 1e-2), (1e-3, 1e-2)),
               "bfloat16": ((1e-2, 5e-2), (1e-2, 5e-2))}


def _resolve_tolerances(args, model) -> None:
    """Fill unset --atol/--rtol/--engine-atol/--engine-rtol from the model's float dtype (see the flags' help)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = str(p.dtype).removeprefix("torch.") if p is not None else "float32"
    (atol, rtol), (eatol, ertol) = _TOLERANCES.get(dtype, _TOLERANCES["float32"])
    for name, value in (("atol", atol), ("rtol", rtol), ("engine_atol", eatol), ("engine_rtol", ertol)):
        if getattr(args, name) is None:
            setattr(args, name, value)


def cmd_build(args) -> int:
    import torch

    from . import optimize
    from .optimize import split_inputs

    config = config_from_args(args)
    config.pass_manager()  # validate pass names and order before building the model
    if args.format is not None:
        from .engine.build import check_format

        check_format(args.format)
        if args.out is None:
            raise UsageError("--format needs --out DIR (the engine directory to write)")
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not args.force:
        raise UsageError(f"--out {out_dir} exists and is not empty; pass --force to overwrite")
    name, model, inputs = load_model(args.model, args.inputs)
    model, inputs = _place(model, inputs, args.device, args.dtype)
    _resolve_tolerances(args, model)
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
    if out_dir is None:
        return EXIT_OK if ok else EXIT_VALIDATION
    if args.format is None:
        _write_outputs(out_dir, name, config, report)
        print(f"wrote {out_dir}/report.json and {out_dir}/manifest.json", file=sys.stderr)
        return EXIT_OK if ok else EXIT_VALIDATION
    from .engine import build_engine

    manifest = build_engine(opt, inputs, args.format, out_dir, model_name=name, config=config, force=True,
                            atol=args.engine_atol, rtol=args.engine_rtol, progress=not args.no_progress,
                            versions=_versions())
    (out_dir / "report.json").write_text(report.to_json())
    engine_ok = manifest["validation"]["passed"]
    if not args.json:
        _print_engine_validation(out_dir, manifest)
    print(f"wrote engine {out_dir} ({args.format}, route {manifest['route']})", file=sys.stderr)
    return EXIT_OK if (ok and engine_ok) else EXIT_VALIDATION


def _print_engine_validation(out_dir, manifest: dict) -> None:
    v = manifest["validation"]
    print(f"\nengine {out_dir} ({manifest['engine_format']}): max |engine - eager optimized| per output "
          f"(bound atol {v['atol']:g} + rtol {v['rtol']:g} x max|eager|):")
    width = max([len(r["name"]) for r in v["outputs"]] + [8])
    for row in v["outputs"]:
        if "max_abs_diff" in row:
            detail = f"{row['max_abs_diff']:.3g} <= {row['bound']:.3g}" if row["passed"] else f"{row['max_abs_diff']:.3g} > {row['bound']:.3g}"
        else:
            detail = row.get("error") or f"{row.get('mismatches', 0)} mismatches (exact)"
        print(f"  {row['name']:<{width}}  {detail:<24} {'PASS' if row['passed'] else 'FAIL'}")
    print(f"engine validation: {'PASS' if v['passed'] else 'FAIL'}")


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


def cmd_validate(args) -> int:
    """Re-run an engine on its stored inputs and compare with the eager optimized outputs recorded at build."""
    from .engine.build import compare_outputs, load_validation
    from .engine.load import load_engine

    engine = load_engine(args.dir)
    inputs, ref = load_validation(engine.path, engine.manifest)
    built = engine.manifest.get("validation", {})
    atol = args.atol if args.atol is not None else built.get("atol", 1e-5)
    rtol = args.rtol if args.rtol is not None else built.get("rtol", 1e-4)
    dev = engine.device
    got = engine.run_flat(*[t.to(dev) for t in inputs])
    result = compare_outputs(got, ref, [s["name"] for s in engine.outputs], atol, rtol)
    result["against"] = "eager optimized outputs recorded at build time (validation.safetensors)"
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_engine_validation(engine.path, {"engine_format": engine.format, "validation": result})
    return EXIT_OK if result["passed"] else EXIT_VALIDATION


def _bench_helpers():
    """tools/bench_kernels.py (Timer, bench_info, fmt, write_json, refuses_overwrite) from the source checkout."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_kernels.py"
    if not path.is_file():
        raise UsageError(f"bench needs vopt's source checkout (tools/bench_kernels.py not found at {path})")
    name = "vopt_tools_bench_kernels"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _rss_mb() -> float:
    import resource

    # ru_maxrss is KiB on Linux: the process's peak resident set so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cmd_bench(args) -> int:
    """Latency (and memory) of an engine vs the eager model it was built from, in one run."""
    import torch

    from .engine.build import load_validation
    from .engine.load import load_engine
    from .optimize import split_inputs

    bk = _bench_helpers()
    engine_dir = Path(args.dir)
    from .engine.manifest import read_manifest

    manifest = read_manifest(engine_dir)
    out = Path(args.out) if args.out else engine_dir / "bench.json"
    if bk.refuses_overwrite("vopt-compile bench", out, args.force):
        return EXIT_USAGE
    device = torch.device(manifest.get("target", {}).get("device", "cpu"))
    timer = bk.Timer(device, warmup=args.warmup, reps=args.reps, cold_l2=False)
    rows = []

    def measure(label, load, note=""):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        rss0 = _rss_mb()
        fn = load()
        with torch.no_grad():
            ms = timer(fn)
        mem = (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else _rss_mb() - rss0
        rows.append({"variant": label, "ms": ms, "memory_mb": mem, "note": note})

    # The eager baseline: the model rebuilt from the manifest's MODEL spec (zoo name or module:attr).
    name, model, inputs = load_model(manifest["model"], args.inputs)
    target = manifest.get("target", {})
    model, inputs = _place(model, inputs, target.get("device"), target.get("dtype"))
    a, kw = split_inputs(inputs)
    measure("eager (original model)", lambda: (lambda: model(*a, **kw)))
    if manifest.get("config"):
        from . import optimize
        from .optimize import OptimizeConfig

        opt_holder = {}

        def load_opt():
            opt_holder["m"] = optimize(model, OptimizeConfig.from_dict(manifest["config"]), example_inputs=inputs)
            return lambda: opt_holder["m"](*a, **kw)

        measure("eager optimized (vopt)", load_opt)
    engine_inputs, _ = load_validation(engine_dir, manifest)
    engine_inputs = [t.to(device) for t in engine_inputs]
    engine_holder = {}

    def load_eng():
        engine_holder["e"] = load_engine(engine_dir)
        return lambda: engine_holder["e"].run_flat(*engine_inputs)

    measure(f"engine ({manifest['engine_format']})", load_eng)
    base = rows[0]["ms"]
    for r in rows:
        r["speedup"] = base / r["ms"] if r["ms"] > 0 else None
    size = sum(f.stat().st_size for f in engine_dir.iterdir() if f.is_file() and f.name.startswith("model"))
    mem_rule = ("CUDA peak allocated during load + runs" if device.type == "cuda" else
                "CPU: growth of the process's peak RSS during load + runs (approximate; the eager model is measured first)")
    info = bk.bench_info(device, bk.measurement_mode(device))
    payload = {"info": info, "engine": str(engine_dir), "model": manifest["model"], "format": manifest["engine_format"],
               "engine_bytes": size, "memory_rule": mem_rule, "reps": args.reps, "warmup": args.warmup, "rows": rows}
    for k, v in info.items():
        print(f"# {k}: {v}")
    print(f"# memory: {mem_rule}; engine files {size / 2**20:.2f} MiB")
    print(f"{'variant':<26} {'ms':>10} {'speedup':>8} {'memory_mb':>10}")
    for r in rows:
        print(f"{r['variant']:<26} {bk.fmt(r['ms'], '10.3f')} {bk.fmt(r['speedup'], '8.2f')} {bk.fmt(r['memory_mb'], '10.1f')}")
    out.parent.mkdir(parents=True, exist_ok=True)
    bk.write_json(out, payload)
    print(f"wrote {out}", file=sys.stderr)
    _plot(out.with_suffix(".png"), payload)
    return EXIT_OK


def _plot(path: Path, payload: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("vopt-compile bench: matplotlib is not installed (pip install vopt[bench]); skipping the plot", file=sys.stderr)
        return
    rows = payload["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    labels = [r["variant"].replace(" (", "\n(") for r in rows]
    axes[0].bar(labels, [r["ms"] for r in rows], color=["tab:gray", "tab:orange", "tab:blue"][-len(rows):])
    axes[0].set_ylabel("latency (ms, median)")
    axes[1].bar(labels, [r["memory_mb"] or 0 for r in rows], color=["tab:gray", "tab:orange", "tab:blue"][-len(rows):])
    axes[1].set_ylabel("memory (MiB)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{payload['model']} {payload['format']} engine vs eager ({payload['info'].get('device')})", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    print(f"wrote {path}", file=sys.stderr)


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
        "engine_formats": {"pt2": "torch.export program (torch.export.load)",
                           "aoti": "AOTInductor package (torch._inductor.aoti_load_package)",
                           "onnx": "standard ONNX opset 23 (onnxruntime)"},
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
    print("\nengine formats (build --format F --out DIR; vopt.load_engine(DIR)):")
    for f, what in data["engine_formats"].items():
        print(f"  {f:<6} {what}")
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
    from .engine import onnx_registry, onnx_translations

    onnx_translations.register_all()
    data["onnx_lowering"] = onnx_registry.registered()
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
    print("onnx lowering (build --format onnx): " + "; ".join(f"{k}: {v.split(':')[0]}" for k, v in data["onnx_lowering"].items()))
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
    p.add_argument("--format", choices=("pt2", "aoti", "onnx"), default=None,
                   help="write an engine of this format to --out: pt2 (torch.export program), aoti (AOTInductor "
                        "package; slow to compile), onnx (standard ONNX, opset 23, for onnxruntime). Without it, "
                        "only the report is written")
    p.add_argument("--out", metavar="DIR", help="the engine directory (or, without --format, where report.json and "
                                                 "manifest.json go); written to a temporary directory, then moved")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")
    p.add_argument("--device", default=None, help="move the model and inputs here first (cpu, cuda, cuda:1); default: where the model is")
    p.add_argument("--dtype", default=None, choices=_DTYPES, help="cast the model and floating inputs first; default: unchanged")
    p.add_argument("--engine-atol", type=float, default=None,
                   help="absolute part of the allowed max |engine - eager optimized| per output "
                        "(default by dtype: float32 1e-5, float16 1e-3, bfloat16 1e-2)")
    p.add_argument("--engine-rtol", type=float, default=None,
                   help="relative part, times max |eager optimized| (default by dtype: float32 1e-4: the engine runs "
                        "the same math through other kernels, which changes summation order only, measured <= 3e-6 "
                        "on the zoo; float16 1e-2 and bfloat16 5e-2: ~10 units of their rounding error, 2^-11 and 2^-8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they go to stderr)")
    p.add_argument("--atol", type=float, default=None,
                   help="absolute part of the allowed max |optimized - eager| on the primary output "
                        "(default by dtype: float32 1e-5, float16 1e-3, bfloat16 1e-2)")
    p.add_argument("--rtol", type=float, default=None,
                   help="relative part, times max |eager| (default by dtype: float32 1e-5: exact passes in float32 "
                        "differ from eager only by summation order, ~1e-6 of the output's magnitude; float16 1e-2, "
                        "bfloat16 5e-2)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("explain", help="show what each pass would match and do, without rewriting",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("validate", help="re-run an engine on its stored inputs and compare with the recorded eager outputs",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", metavar="DIR", help="an engine directory written by build --format")
    p.add_argument("--atol", type=float, default=None, help="override the engine's recorded absolute tolerance")
    p.add_argument("--rtol", type=float, default=None, help="override the engine's recorded relative tolerance (x max|eager|)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("bench", help="latency and memory of an engine vs the eager model (table, JSON, PNG plot)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", metavar="DIR", help="an engine directory written by build --format")
    p.add_argument("--out", metavar="FILE", help="JSON output (default DIR/bench.json); the plot goes next to it (.png)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--reps", type=int, default=10, help="timed runs per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    p.add_argument("--inputs", metavar="module:attr", help="example inputs for a module:attr model (as for build)")
    p.set_defaults(func=cmd_bench)

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

    from .errors import EngineError, EngineInputError, ManifestError

    parser = build_parser()
    args = parser.parse_args(argv)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    args._defaults = {a.dest: a.default for a in sub._actions if a.dest != "help"}
    args._config_data = None
    try:
        return args.func(args)
    except (UsageError, ConfigError, UnknownNameError, PassOrderError, ManifestError, EngineInputError) as exc:
        print(f"vopt-compile: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (BackendUnavailableError, CudaLibraryError) as exc:
        print(f"vopt-compile: error: {exc}", file=sys.stderr)
        return EXIT_BACKEND
    except (StrictModeError, CaptureError) as exc:
        print(f"vopt-compile: error: {exc}", file=sys.stderr)
        return EXIT_STRICT
    except EngineError as exc:
        print(f"vopt-compile: error: {exc}", file=sys.stderr)
        return EXIT_ENGINE


if __name__ == "__main__":
    sys.exit(main())

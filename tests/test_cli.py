"""``vopt-compile`` subcommands, run as a user would (subprocess), and their exit codes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run([sys.executable, "-m", "vopt.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("sub", [[], ["build"], ["explain"], ["list"], ["env"]])
def test_help(sub):
    res = cli(*sub, "--help")
    assert res.returncode == 0, res.stderr
    assert "usage: vopt-compile" in res.stdout
    if sub in (["build"], ["explain"]):
        assert "--strict" in res.stdout and "exit codes" in res.stdout


def test_list_and_json():
    res = cli("list")
    assert res.returncode == 0 and "llava-onevision" in res.stdout and "canonicalize_attention" in res.stdout
    data = json.loads(cli("list", "--json").stdout)
    assert {m["name"] for m in data["models"]} >= {"llava-onevision", "llama"}
    assert {"sdpa", "canonicalize_attention"} <= {p["name"] for p in data["passes"]}


def test_env_reports_backends():
    res = cli("env")
    assert res.returncode == 0, res.stderr
    assert "torch" in res.stdout and "vopt::attention" in res.stdout and "reference" in res.stdout
    data = json.loads(cli("env", "--json").stdout)
    assert data["ops"]["vopt::attention"]["reference"] == "available"
    assert set(data["ops"]["vopt::axpy"]) == {"cuda", "triton", "reference"}


def test_explain_default_model_does_not_rewrite():
    res = cli("explain", "llava-onevision", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    sdpa = [r for r in data["summary"] if r["pass"] == "sdpa"][0]
    assert sdpa["matched"] == 7  # SigLIP: 2 layers + the pooling head; Qwen2: 4 layers
    assert all(pr["dry_run"] for st in data["stages"] for pr in st["pass_results"])


def test_build_writes_outputs_and_refuses_overwrite(tmp_path):
    out = tmp_path / "engine"
    res = cli("build", "llama", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "validation: max |optimized - eager|" in res.stdout and "PASS" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["validation"]["passed"] is True
    assert json.loads((out / "manifest.json").read_text())["model"] == "llama"
    res = cli("build", "llama", "--out", str(out))
    assert res.returncode == 2 and "--force" in res.stderr
    assert cli("build", "llama", "--out", str(out), "--force").returncode == 0


def test_build_module_attr(tmp_path):
    (tmp_path / "mymodel.py").write_text(
        "import torch\n"
        "def make():\n"
        "    m = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()\n"
        "    class W(torch.nn.Module):\n"
        "        def __init__(s):\n"
        "            super().__init__(); s.m = m\n"
        "        def forward(s, x):\n"
        "            return s.m(x, x, x)[0]\n"
        "    return W(), (torch.randn(1, 4, 16),)\n"
        "bare = torch.nn.Linear(2, 2)\n"
    )
    env_cwd = str(tmp_path)
    res = subprocess.run([sys.executable, "-m", "vopt.cli", "build", "mymodel:make"], capture_output=True, text=True,
                         cwd=env_cwd, env={**os.environ, "PYTHONPATH": env_cwd}, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "canonicalize_attention" in res.stdout and "PASS" in res.stdout
    res = subprocess.run([sys.executable, "-m", "vopt.cli", "build", "mymodel:bare"], capture_output=True, text=True,
                         cwd=env_cwd, env={**os.environ, "PYTHONPATH": env_cwd}, timeout=300)
    assert res.returncode == 2 and "no example inputs" in res.stderr


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["build", "no-such-model"], 2, "unknown zoo model 'no-such-model'; accepted: e-vilm, gpt4scene, llama, llava-onevision"),
        (["build", "llama", "--passes", "sdpa,canonicalize_attention"], 2, "must run before"),
        (["build", "llama", "--passes", "sdpaa"], 2, "unknown pass 'sdpaa'"),
        (["build", "llama", "--config", "/nonexistent.json"], 2, "no such file"),
        (["build", "nosuchmodule:x"], 2, "cannot import module 'nosuchmodule'"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_usage_errors(args, code, text):
    res = cli(*args)
    assert res.returncode == code, (res.stdout, res.stderr)
    assert text in res.stderr


def test_config_file_unknown_key(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"stricct": True}))
    res = cli("build", "llama", "--config", str(cfg))
    assert res.returncode == 2 and "stricct" in res.stderr and "valid keys" in res.stderr


def test_backend_missing_exit_code():
    env = {**os.environ, "VOPT_BACKEND": "cuda"}
    res = subprocess.run([sys.executable, "-m", "vopt.cli", "build", "llama"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 3, res.stderr
    assert "no backend of op 'vopt::attention'" in res.stderr


def test_validation_failure_exit_code():
    res = cli("build", "llama", "--atol", "-1")
    assert res.returncode == 4 and "FAIL" in res.stdout


# ---- engines: build --format, validate, bench, config files ----------------------------------


def test_build_engine_validate_and_bench(capsys, tmp_path):
    out = tmp_path / "llama-pt2"
    cfg = tmp_path / "c.yaml"
    # YAML config: OptimizeConfig fields plus a 'cli' section with flags; the command line wins over it.
    cfg.write_text("passes: [canonicalize_attention, sdpa]\n"
                   "pass_configs:\n  sdpa: {stages: [model]}\n"
                   "cli:\n  format: onnx\n  no_progress: true\n")
    res = cli("build", "llama", "--config", str(cfg), "--format", "pt2", "--sdpa.stages", "root,model", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "engine validation: PASS" in res.stdout and "wrote engine" in res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "vopt-engine" and manifest["engine_format"] == "pt2" and manifest["manifest_version"] == 1
    assert manifest["config"]["passes"] == ["canonicalize_attention", "sdpa"]
    assert manifest["config"]["pass_configs"]["sdpa"]["stages"] == ["root", "model"]  # flag over file
    assert manifest["inputs"][0]["name"] == "input_ids" and manifest["validation"]["passed"] is True
    assert (out / "model.pt2").is_file() and (out / "report.json").is_file()

    res = cli("validate", str(out))
    assert res.returncode == 0 and "engine validation: PASS" in res.stdout, res.stderr
    code, stdout, _ = main_in_process(capsys, "validate", str(out), "--atol", "-1", "--rtol", "0")
    assert code == 4 and "FAIL" in stdout

    res = cli("bench", str(out), "--reps", "2", "--warmup", "0")
    assert res.returncode == 0, res.stderr
    assert "engine (pt2)" in res.stdout and "eager (original model)" in res.stdout and "# device:" in res.stdout
    bench = json.loads((out / "bench.json").read_text())
    assert {r["variant"] for r in bench["rows"]} == {"eager (original model)", "eager optimized (vopt)", "engine (pt2)"}
    assert all(r["ms"] > 0 for r in bench["rows"])
    assert (out / "bench.png").is_file() or "matplotlib is not installed" in res.stderr
    code, _, err = main_in_process(capsys, "bench", str(out), "--reps", "1")
    assert code == 2 and "--force" in err


def main_in_process(capsys, *args):
    """Run vopt-compile in this process (fast: no interpreter start-up); return (exit code, stdout, stderr)."""
    from vopt.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["build", "llama", "--format", "trt", "--out", "x"], 2, "invalid choice: 'trt'"),
        (["build", "llama", "--format", "pt2"], 2, "--format needs --out DIR"),
        (["validate", "/nonexistent/engine"], 2, "engine directory '/nonexistent/engine' does not exist"),
        (["validate", "/"], 2, "has no manifest.json; it is not a vopt engine directory"),
        (["bench", "/nonexistent/engine"], 2, "does not exist"),
    ],
)
def test_engine_usage_errors(capsys, args, code, text):
    got, out, err = main_in_process(capsys, *args)
    assert got == code, (out, err)
    assert text in err


def test_engine_config_file_errors(capsys, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("passes: [sdpa\n")
    code, _, err = main_in_process(capsys, "build", "llama", "--config", str(bad_yaml))
    assert code == 2 and "not valid YAML" in err
    bad_cli = tmp_path / "cli.json"
    bad_cli.write_text(json.dumps({"cli": {"format": "trt", "out": str(tmp_path / "o")}}))
    code, _, err = main_in_process(capsys, "build", "llama", "--config", str(bad_cli))
    assert code == 2 and "unsupported engine format 'trt'; accepted: pt2, aoti, onnx" in err
    unknown = tmp_path / "u.json"
    unknown.write_text(json.dumps({"cli": {"fromat": "pt2"}}))
    code, _, err = main_in_process(capsys, "build", "llama", "--config", str(unknown))
    assert code == 2 and "'cli' key 'fromat' is not a flag of this command" in err
    not_mapping = tmp_path / "list.yml"
    not_mapping.write_text("- sdpa\n")
    code, _, err = main_in_process(capsys, "build", "llama", "--config", str(not_mapping))
    assert code == 2 and "must hold a mapping" in err


def test_engine_manifest_version_mismatch(capsys, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "vopt-engine", "manifest_version": 0}))
    code, _, err = main_in_process(capsys, "validate", str(tmp_path))
    assert code == 2 and "manifest_version 0; this vopt reads version 1 only" in err


def test_build_engine_unsupported_glue_exit_code(tmp_path):
    (tmp_path / "ddmodel.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(s):\n"
        "        super().__init__(); s.lin = torch.nn.Linear(4, 4)\n"
        "    def forward(s, x):\n"
        "        return s.lin(x) if x.sum() > 0 else -s.lin(x)\n"
        "def make():\n"
        "    return M().eval(), (torch.ones(2, 4),)\n"
    )
    res = subprocess.run([sys.executable, "-m", "vopt.cli", "build", "ddmodel:make", "--format", "onnx", "--out",
                          str(tmp_path / "e"), "--no-progress"], capture_output=True, text=True, cwd=str(tmp_path),
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=300)
    assert res.returncode == 6, res.stderr
    assert "model 'ddmodel:make': its Python glue between stages cannot be exported" in res.stderr
    assert not (tmp_path / "e").exists()


def test_help_lists_engine_commands_and_pass_flags(capsys):
    code, out, _ = main_in_process(capsys, "--help")
    assert code == 0 and "validate" in out and "bench" in out
    code, out, _ = main_in_process(capsys, "build", "--help")
    assert "--format {pt2,aoti,onnx}" in out and "--sageattention2.precision" in out
    assert "6 engine unsupported" in out

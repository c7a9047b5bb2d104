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

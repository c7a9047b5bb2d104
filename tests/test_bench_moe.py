"""tools/bench_moe.py plumbing on tiny sizes (``--smoke``): rows, FLOP accounting, JSON, overwrite refusal."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_moe", ROOT / "tools" / "bench_moe.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_smoke_run_writes_json_with_exact_rows(tmp_path, capsys):
    out = tmp_path / "moe.json"
    assert _load().main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "NOT a performance measurement" in table and "dense-loop" in table
    data = json.loads(out.read_text())
    meta, rows = data["meta"], data["results"]
    for key in ("device", "torch", "git_sha", "vopt", "mode"):
        assert key in meta
    by = {(r["case"], r["impl"]): r for r in rows}
    assert set(by) == {("moe-vrd-tiny", "dense-loop"), ("moe-vrd-tiny", "vopt-sparse"), ("generic-e4", "dense-loop"),
                       ("generic-e4", "token-loop"), ("generic-e4", "vopt-sparse")}
    for r in rows:
        assert r["ms"] is not None and math.isfinite(r["ms"]) and r["ms"] > 0, r
        # fp32, exact up to summation order: 1e-5 of outputs that are O(1) probabilities / activations.
        assert r["max_diff"] <= 1e-5, r
    for case in ("moe-vrd-tiny", "generic-e4"):
        dense, sparse = by[(case, "dense-loop")], by[(case, "vopt-sparse")]
        # Routed work is k / E of the dense work: top-2 of 4 experts.
        assert sparse["gflop"] == pytest.approx(dense["gflop"] * 2 / 4)
        assert dense["speedup"] == 1.0 and sparse["speedup"] == pytest.approx(dense["ms"] / sparse["ms"])
        assert sparse["backend"].startswith("auto=")


def test_generic_flops_are_hand_computed():
    bench = _load()
    model = bench.GenericMoE(dim=8, ffn=12, experts=3, top_k=2)
    assert model.flops(5) == 2 * 5 * (8 * 12 + 12 * 8)


def test_existing_out_is_refused_without_force(tmp_path):
    out = tmp_path / "moe.json"
    out.write_text("keep me")
    assert _load().main(["--smoke", "--out", str(out)]) == 2
    assert out.read_text() == "keep me"


def test_unknown_case_is_a_usage_error(capsys):
    assert _load().main(["--smoke", "--cases", "moe-vrd-huge"]) == 2
    assert "accepted" in capsys.readouterr().err

"""tools/bench_attention.py in smoke mode (tiny sizes; Triton interpreter without a GPU)."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "tools" / "bench_attention.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_writes_json_with_accurate_rows(tmp_path):
    out = tmp_path / "attn.json"
    assert _load().main(["--smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    meta, rows = data["meta"], data["results"]
    assert meta["complete"] is True
    assert "NOT a performance measurement" in meta["mode"]
    for key in ("device", "torch", "triton", "vopt"):
        assert key in meta
    assert {r["seq"] for r in rows} == {128, 256} and {r["causal"] for r in rows} == {False, True}
    for family in ("sdpa", "vopt-triton"):
        timed = [r for r in rows if r["family"] == family and r["ms"] is not None]
        assert timed, f"no timed {family} rows: {[r['note'] for r in rows if r['family'] == family]}"
        for r in timed:
            assert math.isfinite(r["cos"]) and r["cos"] >= 0.99, r
            assert math.isfinite(r["rel_l1"]) and math.isfinite(r["tops"]) and r["tops"] > 0, r
    # Every case has the SDPA baseline and both vopt variants; sageattn always gets a row.
    for impl in ("sdpa-flash", "vopt-triton", "vopt-triton-kernel"):
        assert sum(r["impl"] == impl and r["ms"] is not None for r in rows) == 4, impl
    assert sum(r["family"] == "sageattn" for r in rows) == 4
    base = [r for r in rows if r["impl"] == "sdpa-flash"]
    assert all(r["speedup"] == pytest.approx(1.0) for r in base)


def test_existing_out_is_refused_without_force(tmp_path, capsys):
    out = tmp_path / "attn.json"
    out.write_text("keep me")
    assert _load().main(["--smoke", "--seqs", "128", "--out", str(out)]) == 2
    assert out.read_text() == "keep me"
    assert "--force" in capsys.readouterr().err

"""tools/bench_vq.py plumbing on a tiny size (Triton in the interpreter without a GPU; seconds)."""
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_vq", ROOT / "tools" / "bench_vq.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_writes_json_with_consistent_rows(tmp_path):
    out = tmp_path / "vq.json"
    assert _load().main(["--smoke", "--data", "gaussian,clustered", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    meta, rows = data["meta"], data["results"]
    assert meta["complete"] is True and "NOT a performance measurement" in meta["mode"]
    for key in ("device", "torch", "triton", "git_sha", "vopt", "baseline", "peak_bytes"):
        assert key in meta
    assert {(r["tokens"], r["codes"], r["dim"]) for r in rows} == {(64, 96, 33)}
    assert {r["data"] for r in rows} == {"gaussian", "clustered"}
    timed = [r for r in rows if r["ms"] is not None]
    impls = {r["impl"] for r in timed}
    assert {"torch-unfused", "vopt-auto", "vopt-reference"} <= impls
    exact = [r for r in timed if not r["impl"].endswith("-rows")]   # fallback="rows" may differ at GEMM-decided rows
    assert all(r["identical"] is True for r in exact), [(r["impl"], r["note"]) for r in exact if not r["identical"]]
    for r in rows:
        if r["ms"] is None:
            assert r["note"], r                           # every untimed row says why
    base = [r for r in timed if r["impl"] == "torch-unfused"]
    assert all(b["speedup"] == 1.0 and b["peak_extra_bytes"] >= 64 * 96 * 4 for b in base)   # it builds [N, K] fp32
    tri = [r for r in timed if r["impl"] == "vopt-triton"]
    if tri:                                               # interpreted: the fused path allocates O(N), not [N, K]
        assert {r["impl"] for r in timed} >= {"vopt-triton-rows"}
        assert all(0.0 <= r["uncertified"] <= 1.0 for r in tri)
        clustered = [r for r in tri if r["data"] == "clustered"]
        assert [r["uncertified"] for r in clustered] == [0.0] and clustered[0]["peak_extra_bytes"] < 64 * 96 * 4
        rows = [r for r in timed if r["impl"] == "vopt-triton-rows"]
        assert all(r["peak_extra_bytes"] < 64 * 96 * 4 for r in rows)


def test_existing_out_is_refused_without_force(tmp_path):
    out = tmp_path / "vq.json"
    out.write_text("keep me")
    assert _load().main(["--smoke", "--out", str(out)]) == 2
    assert out.read_text() == "keep me"


def test_bad_sizes_are_a_usage_error(capsys):
    assert _load().main(["--smoke", "--sizes", "64x96"]) == 2
    assert "NxKxD" in capsys.readouterr().err

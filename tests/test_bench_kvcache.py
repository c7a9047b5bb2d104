"""tools/bench_kvcache.py in smoke mode: memory rows (honest bits per setting), latency rows and fits, --out refusal.

Runtime: ~6 s on 2 shared cores with OMP_NUM_THREADS=1 (two full-size zoo builds on the meta device ~4 s, tiny
latency cases; Triton is skipped on CPU without --interpret).
"""
import importlib.util
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_kvcache", ROOT / "tools" / "bench_kvcache.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_writes_memory_and_latency_json(tmp_path, one_thread):
    bench = _load()
    out = tmp_path / "kv.json"
    assert bench.main(["--smoke", "--device", "cpu", "--rounds", "1", "--reps", "2", "--warmup", "1",
                       "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["complete"] is True and "NOT a performance measurement" in meta["mode"]
    for key in ("device", "torch", "triton", "vopt", "git_sha"):
        assert key in meta

    # Memory: every setting for both models, bits/element from account().
    mem = data["memory"]
    settings = {"fp16", "kivi2-g32", "vidkv-ref-g32", "vidkv-rec-g32", "vidkv-rec-g64"}
    for model in ("llava-onevision", "videollm-online"):
        rows = {r["setting"]: r for r in mem if r["model"] == model}
        assert set(rows) == settings, (model, set(rows))
        assert rows["fp16"]["bits_per_element"] == 16.0 and rows["fp16"]["ratio_vs_fp16"] == 1.0
        assert abs(rows["kivi2-g32"]["bits_per_element"] - 3.0) < 0.01
        assert rows["vidkv-rec-g64"]["bits_per_element"] <= 2.0
        assert 3.2 < rows["vidkv-ref-g32"]["bits_per_element"] < 3.3  # spec §2: 3.25 stored (+ index lists)
        for r in rows.values():
            assert r["bytes_per_video"] > 0 and r["tokens"] > 0
            assert math.isclose(r["ratio_vs_fp16"], rows["fp16"]["bytes_per_video"] / r["bytes_per_video"])
            assert math.isclose(sum(r["bits"].values()), r["bits_per_element"], rel_tol=1e-9)
    ov = {r["setting"]: r for r in mem if r["model"] == "llava-onevision"}
    assert ov["fp16"]["bytes_per_token"] == 57344  # spec §7: 28 L x 4 KV heads x 128 x 2 x 2 B
    assert ov["fp16"]["tokens"] == 6273             # zoo: LLaVA-OV visual tokens at 32 frames

    # Latency: baseline and both packed settings timed at every smoke context, finite fits.
    lat = data["latency"]
    assert {r["context"] for r in lat} == {128, 256}
    for method, setting in [("fp16-sdpa", "fp16"), ("torch-packed", "kivi2-g32"), ("torch-packed", "vidkv-rec-g32"),
                            ("dequant+sdpa", "kivi2-g32"), ("dequant+sdpa", "vidkv-rec-g32")]:
        rs = [r for r in lat if r["method"] == method and r["setting"] == setting]
        assert len(rs) == 2 and all(r["us"] > 0 for r in rs), rs
        assert all(r["max_abs_err"] < 1e-2 for r in rs), rs
        fit = next(f for f in data["fits"] if f["method"] == method and f["setting"] == setting)
        assert math.isfinite(fit["slope_us_per_1k"]) and math.isfinite(fit["intercept_us"]), fit
    assert any(r["method"] == "fp32-sdpa" and r["us"] > 0 for r in lat)
    assert all(r["us"] is None and "interpreter" in r["note"] for r in lat if r["method"] == "triton")

    # An existing --out is refused without --force.
    before = out.read_text()
    assert bench.main(["--smoke", "--no-latency", "--out", str(out)]) == 2
    assert out.read_text() == before

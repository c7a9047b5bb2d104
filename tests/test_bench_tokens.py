"""tools/bench_tokens.py in smoke mode (the trained tiny LLaVA-OneVision, one retain ratio, 1 rep)."""
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_tokens", ROOT / "tools" / "bench_tokens.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_writes_rows_with_tokens_flops_and_fidelity(tmp_path):
    out = tmp_path / "tokens.json"
    assert _load().main(["--smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "NOT a performance measurement" in data["meta"]["mode"] and "torch" in data["meta"]
    rows = {r["method"]: r for r in data["results"]}
    assert set(rows) == {"none", "holitom", "fastv"}
    base, outer, fastv = rows["none"], rows["holitom"], rows["fastv"]
    assert base["ttft_ms"] > 0 and base["video_tokens"] == base["video_tokens_full"] == 33
    # retain 0.25 of 32 frame tokens = 8 (+ newline) at most; temporal merging may leave fewer
    assert 1 < outer["video_tokens"] <= 9 and 0 < outer["paper_flops_frac"] < 0.3
    assert fastv["video_tokens"] == 33 and fastv["video_tokens_inner"] == 9   # ceil(0.25 x 33) from layer 2 of 4
    assert 0.5 < fastv["paper_flops_frac"] < 1
    for r in (outer, fastv):
        assert r["ttft_ms"] > 0 and r["ttft_speedup"] > 0 and 0 <= r["agreement"] <= 1 and r["note"] == ""


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "tokens.json"
    out.write_text("{}")
    assert _load().main(["--smoke", "--out", str(out)]) == 2
    assert out.read_text() == "{}"


def test_tuned_overrides_apply_per_method_and_retain():
    import pytest

    bt = _load()
    tuned = {"holitom": {"tau": 1.0, "positions": "original"}, "holitom@0.1": {"tau": 0.9}, "fastv": {"inner_queries": 4}}
    cfg = bt.method_config("holitom", 0.25, 4, bt.overrides_for(tuned, "holitom", 0.25))
    assert cfg.merge.tau == 1.0 and cfg.positions == "original" and cfg.merge.retain_ratio == 0.25
    assert bt.method_config("holitom", 0.10, 4, bt.overrides_for(tuned, "holitom", 0.10)).merge.tau == 0.9
    fastv = bt.method_config("fastv", 0.15, 4, bt.overrides_for(tuned, "fastv", 0.15))
    assert not fastv.outer and fastv.inner_layer == 2 and fastv.inner_keep == 0.15 and fastv.inner_queries == 4
    assert bt.method_config("pool", 0.1, 4).positions == "compact"          # no overrides: the defaults
    with pytest.raises(ValueError, match="unknown knob"):
        bt.method_config("pool", 0.1, 4, {"temperature": 1.0})

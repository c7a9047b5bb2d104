"""tools/eval_kvcache.py in smoke mode: long-generation agreement, per-token KL and stored bits per cache setting."""
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("eval_kvcache", ROOT / "tools" / "eval_kvcache.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_smoke_rows_are_consistent(tmp_path):
    out = tmp_path / "kv.json"
    settings = "fp,kivi2,vidkv-recommended,vidkv-recommended+text,hf-fp8"
    assert _load().main(["--smoke", "--settings", settings, "--out", str(out)]) == 0
    rows = {r["setting"]: r for r in json.loads(out.read_text())["results"]}
    fp = rows["fp"]
    # the baseline cache against itself: identical tokens and exactly zero KL; fp32 storage
    assert fp["token_agreement"] == 1.0 and fp["exact"] == 1.0 and fp["kl_max"] == 0.0 and fp["bits"] == 32.0
    for name in ("kivi2", "vidkv-recommended", "vidkv-recommended+text", "hf-fp8"):
        r = rows[name]
        assert r["note"] == "" and 0 <= r["token_agreement"] <= 1 and r["kl_mean"] >= 0 and r["kl_max"] >= r["kl_p99"]
        assert r["answer_acc"] == fp["answer_acc"]   # the answer is the prefill's token: vopt prefill attends exact K/V
        assert 0 < r["bits"] < 32                   # the quantized caches really store fewer bits than fp32
    assert rows["kivi2"]["kl_mean"] > 0               # 2-bit keys/values change the decode distributions
    # keeping the text tokens in full precision costs bits
    assert rows["vidkv-recommended+text"]["bits"] > rows["vidkv-recommended"]["bits"]


def test_unknown_setting_is_refused(capsys):
    assert _load().main(["--smoke", "--settings", "fp,int3"]) == 2
    assert "int3" in capsys.readouterr().err

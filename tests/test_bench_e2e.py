"""tools/bench_e2e.py plumbing on one tiny model: long-format CSV/JSON schema, markdown table, plots, output-folder
refusal, the README block rewrite, argument errors, and the measurement helpers against exact references.

Runtime: ~20 s on 2 shared cores with OMP_NUM_THREADS=1 (the tiny Llama: eager, the ``sdpa`` pass, all passes; 1 rep, 4
decode tokens, no compile, no held-out clips). Numbers are not asserted except where they are exact by construction.
"""
import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _load():
    sys.path.insert(0, str(ROOT / "tools"))
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "tools" / "bench_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load()


@pytest.fixture(scope="module")
def result(bench, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("e2e") / "out"
    argv = ["--out", str(out), "--device", "cpu", "--models", "llama", "--variants", "eager,passes,all",
            "--passes", "sdpa", "--reps", "1", "--warmup", "0", "--decode-tokens", "4", "--fidelity-n", "0",
            "--compile-models", "none", "--no-progress"]
    assert bench.main(argv) == 0
    return out


def _csv(out: Path) -> list:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_long_format_csv_and_json(bench, result):
    import _e2e_report as report

    rows = _csv(result)
    assert rows and list(rows[0]) == report.COLUMNS
    data = json.loads((result / "results.json").read_text())
    assert data["columns"] == report.COLUMNS and len(data["rows"]) == len(rows)
    for key in ("device", "torch", "transformers", "vopt", "git_sha", "mode", "memory_method", "size", "reps"):
        assert key in data["meta"], key
    for r in data["rows"]:
        assert r["model"] == "llama" and r["size"] == "tiny" and r["device"] and r["torch"] == torch.__version__
        json.loads(r["config"])  # every row carries its config as JSON
    by = {}
    for r in data["rows"]:
        by.setdefault(r["variant"], {})[r["metric"]] = r
    assert set(by) == {"eager", "pass:sdpa", "all"}
    eager = by["eager"]
    # decode_tok_s = N / (t(1+N) - t(1)): on a loaded machine one rep can come out non-positive, which the bench
    # reports as a note instead of a number.
    assert "decode_tok_s" in eager or "below timer resolution" in eager["ttft_ms"]["note"]
    for metric, unit in (("ttft_ms", "ms"), ("kv_bytes", "bytes"),
                         ("flops_measured", "FLOP"), ("flops_analytic", "FLOP"), ("weights_bytes", "bytes")):
        assert eager[metric]["unit"] == unit and eager[metric]["value"] > 0, metric
        assert eager[metric]["status"] == "ok"
    # The tiny Llama's DynamicCache holds fp32 K and V of every token fed through it: the prompt and the 1 + N
    # generated tokens but the last (returned, never fed back): exact bytes from its config.
    zm = __import__("vopt.zoo", fromlist=["build"]).build("llama")
    cfg = zm.model.config
    tokens = zm.example_inputs()["input_ids"].shape[1] + 1 + 4 - 1
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert eager["kv_bytes"]["value"] == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * tokens * 4
    sdpa = by["pass:sdpa"]
    assert sdpa["ttft_ms"]["status"] in ("ok", "no-op")
    assert sdpa["ttft_ms"]["passes"] == "canonicalize_attention;sdpa"  # the prerequisite is recorded
    assert json.loads(sdpa["ttft_ms"]["config"]) == {"pass_configs": {}}  # this run's overrides: none for sdpa
    full = data["meta"]["variant_configs"]["llama/pass:sdpa"]  # every pass's full config, once per variant
    assert set(full) == {"canonicalize_attention", "sdpa"} and isinstance(full["sdpa"], dict)
    assert json.loads(by["all"]["ttft_ms"]["config"])["pass_configs"]["vidkv"]["residual_length"] == 8
    assert data["meta"]["complete"] is True
    # sdpa's reference backend is exact up to fp32 summation order: cos within 1e-6 of 1 on the next-token logits.
    assert abs(sdpa["output_cos"]["value"] - 1.0) < 1e-6
    assert sdpa["gen_token_agreement"]["value"] == 1.0
    # A/B: the speedup is against eager re-timed right before the variant (recorded in the same row).
    assert sdpa["ttft_speedup"]["value"] == pytest.approx(sdpa["eager_ttft_ms_ab"]["value"] / sdpa["ttft_ms"]["value"])
    # 'all' = every registered pass of the entry, runtime passes first.
    passes = by["all"]["ttft_ms"]["passes"].split(";")
    assert passes[0] == "vidkv" and set(passes) == {"vidkv", "canonicalize_attention", "sdpa", "sageattention2"}


def test_markdown_table_and_plots(result):
    import _e2e_report as report

    table = (result / "table.md").read_text()
    assert "| " + " | ".join(report.TABLE_HEAD) + " |" in table
    lines = [line for line in table.splitlines() if line.startswith("| llama |")]
    assert [line.split("|")[2].strip() for line in lines] == ["eager", "pass:sdpa", "all"]
    assert "- device: " in table and "- torch: " in table
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (pip install matplotlib): plots are not written")
    for name in report.PLOTS:
        data = (result / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name


def test_refuses_non_empty_out_without_force(bench, result):
    before = (result / "results.csv").read_bytes()
    assert bench.main(["--out", str(result), "--models", "llama", "--no-progress"]) == 2
    assert (result / "results.csv").read_bytes() == before


def test_update_readme_rewrites_only_the_block(bench, result, tmp_path):
    import _e2e_report as report

    readme = tmp_path / "README.md"
    head, tail = "# title\n\nbefore the block\n\n", "\n\n## Layout\nafter the block\n"
    readme.write_text(head + report.BEGIN + "\nold generated text\n" + report.END + tail)
    assert bench.main(["--update-readme", str(readme), "--from", str(result)]) == 0
    text = readme.read_text()
    assert text.startswith(head + report.BEGIN) and text.endswith(report.END + tail)
    assert "old generated text" not in text and "| llama |" in text
    rel = Path(os.path.relpath(result, tmp_path)).as_posix()
    for name in report.PLOTS:
        assert f"]({rel}/{name})" in text, name  # image links relative to the README
    again = readme.read_text()
    assert bench.main(["--update-readme", str(readme), "--from", str(result)]) == 0
    assert readme.read_text() == again  # idempotent

    no_markers = tmp_path / "plain.md"
    no_markers.write_text("# nothing to rewrite\n")
    assert bench.main(["--update-readme", str(no_markers), "--from", str(result)]) == 2
    assert no_markers.read_text() == "# nothing to rewrite\n"


@pytest.mark.parametrize("argv", [
    ["--models", "no-such-model"],
    ["--variants", "eager,warp-drive"],
    ["--passes", "no_such_pass"],
    ["--reps", "0"],
    pytest.param(["--size", "full", "--device", "cpu"], id="full-size-needs-a-gpu"),
])
def test_bad_arguments_are_refused(bench, tmp_path, argv):
    assert bench.main(["--out", str(tmp_path / "o"), "--no-progress", *argv]) == 2
    assert not (tmp_path / "o").exists()


def test_output_fidelity_exact_cases(bench):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 11, generator=g)
    same = bench.output_fidelity(x, x.clone(), is_logits=True)
    assert same["output_cos"] == pytest.approx(1.0, abs=1e-12) and same["output_rel_l2"] == 0.0
    assert same["output_kl"] == pytest.approx(0.0, abs=1e-12)
    # Scaling by 3: cos stays 1, rel L2 = |3 - 1| = 2, KL > 0 (a sharper softmax). 3 * x is rounded to float32
    # (relative error <= 2^-24 per element), hence 1e-6.
    scaled = bench.output_fidelity(x, 3 * x, is_logits=True)
    assert scaled["output_cos"] == pytest.approx(1.0, abs=1e-6)
    assert scaled["output_rel_l2"] == pytest.approx(2.0, rel=1e-6)
    assert scaled["output_kl"] > 0
    last_only = x.clone()
    last_only[:, :-1] += 100.0  # earlier positions do not count for logits
    assert bench.output_fidelity(x, last_only, is_logits=True)["output_rel_l2"] == 0.0
    assert "_note" in bench.output_fidelity(x, x[:, :3], is_logits=True)


def test_attention_flops_match_explicit_matmuls(bench):
    """FlopCounterMode counts vopt's opaque attention op and torch's CPU SDPA kernel (absent from its registry) like
    the two explicit matmuls QK^T and PV (odd sizes; GQA counted per query head)."""
    import vopt.ops.attention  # noqa: F401  (registers vopt::attention)
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = torch.randn(1, 3, 7, 16), torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16)
    with FlopCounterMode(display=False) as ref:
        torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    expected = 2 * 3 * 7 * 5 * (16 + 16)
    assert ref.get_total_flops() == expected
    with FlopCounterMode(display=False, custom_mapping=bench.flop_mapping()) as ours:
        torch.ops.vopt.attention(q, k, v)
    assert ours.get_total_flops() == expected
    with FlopCounterMode(display=False, custom_mapping=bench.flop_mapping()) as sdpa:
        F.scaled_dot_product_attention(q, k, v)
    assert sdpa.get_total_flops() == expected
    kg, vg = torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16)  # GQA: 3 query heads share 1 KV head
    with FlopCounterMode(display=False, custom_mapping=bench.flop_mapping()) as gqa:
        torch.ops.vopt.attention(q, kg, vg, enable_gqa=True)
    assert gqa.get_total_flops() == expected


def test_unregistered_pass_gets_a_not_run_variant(bench):
    import vopt.zoo as zoo
    from dataclasses import replace

    entry = replace(zoo.get("llama"), passes=("sdpa", "vidkv", "not_a_registered_pass"))
    zm = zoo.build("llama")
    variants = {v.name: v for v in bench.plan_variants(entry, zm, set(bench.VARIANT_KINDS), {"none"})}
    assert "not registered" in variants["pass:not_a_registered_pass"].skip
    assert variants["pass:sdpa"].passes == ("canonicalize_attention", "sdpa") and variants["pass:sdpa"].skip is None
    assert variants["all"].passes[0] == "vidkv" and "not_a_registered_pass" not in variants["all"].passes
    assert "compile-models" in variants["compile"].skip
    if bench.quantized_cache_backend()[0] is None:
        assert "is installed" in variants["hf-quantized-cache"].skip  # "neither ... nor ... is installed"


def test_gpu_check_runs_the_gpu_profile():
    """tools/gpu_check.sh has a bench-e2e step running the --gpu profile into its output folder, and parses."""
    import subprocess

    script = ROOT / "tools" / "gpu_check.sh"
    text = script.read_text()
    step = next(line for line in text.splitlines() if line.startswith("run_step bench-e2e"))
    assert "tools/bench_e2e.py --gpu" in step and '--out "$OUT/bench_e2e"' in step and "--max-seconds" in step
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0

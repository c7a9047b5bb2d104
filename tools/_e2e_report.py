"""Outputs of ``tools/bench_e2e.py``: long-format rows, CSV/JSON, the markdown table, the plots and the README block.

A row is one (model, variant, metric): ``value`` + ``unit``, the variant's ``status`` ("ok", "no-op", "not run:
...", "failed: ...") and notes, and per row the device, dtype, versions and the pass configs (``config``, JSON).
A variant that did not run has a single row with ``metric == "status"`` and ``value`` None.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import write_json  # noqa: E402

COLUMNS = ["model", "size", "variant", "passes", "metric", "value", "unit", "status", "note",
           "device", "dtype", "torch", "transformers", "vopt", "git_sha", "mode", "config"]
BEGIN, END = "<!-- bench_e2e:begin -->", "<!-- bench_e2e:end -->"
PLOTS = ("speed_vs_fidelity.png", "memory_per_model.png")


# ---- rows ---------------------------------------------------------------------------------------------------------


def _base(meta: dict, model: str, size: str, variant: str, passes: tuple, status: str, note: str,
          config: Optional[dict]) -> dict:
    return {"model": model, "size": size, "variant": variant, "passes": ";".join(passes), "status": status,
            "note": note, "device": meta.get("device"), "dtype": meta.get("dtype"), "torch": meta.get("torch"),
            "transformers": meta.get("transformers"), "vopt": meta.get("vopt"), "git_sha": meta.get("git_sha"),
            "mode": meta.get("mode"), "config": json.dumps(config or {}, sort_keys=True)}


def metric_rows(meta: dict, model: str, size: str, variant: str, passes: tuple, metrics: dict, status: str,
                note: str, config: Optional[dict] = None) -> list:
    """One row per measured metric of a variant (``metrics``: name -> (value, unit))."""
    base = _base(meta, model, size, variant, passes, status, note, config)
    return [{**base, "metric": name, "value": _plain(value), "unit": unit} for name, (value, unit) in metrics.items()]


def not_run_rows(meta: dict, model: str, size: str, variant: str, passes: tuple, status: str,
                 config: Optional[dict] = None) -> list:
    """The single row of a variant that did not run."""
    return [{**_base(meta, model, size, variant, passes, status, "", config), "metric": "status", "value": None,
             "unit": ""}]


def _plain(value):
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    return float(value)


def pivot(rows: list) -> list:
    """[(model, variant) record with the metrics as keys], in the rows' order."""
    out: dict = {}
    for r in rows:
        key = (r["model"], r["variant"])
        rec = out.setdefault(key, {"model": r["model"], "variant": r["variant"], "passes": r["passes"],
                                   "status": r["status"], "note": r["note"], "size": r["size"]})
        if r["metric"] != "status":
            rec[r["metric"]] = r["value"]
    return list(out.values())


# ---- files --------------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(path)


def write_all(out: Path, meta: dict, rows: list, plots: bool = True) -> list:
    """results.csv, results.json, table.md and (matplotlib permitting) the PNG plots; returns the paths written."""
    written = []
    write_csv(out / "results.csv", rows)
    write_json(out / "results.json", {"meta": meta, "columns": COLUMNS, "rows": rows})
    (out / "table.md").write_text(markdown_table(meta, rows) + "\n")
    written += [out / "results.csv", out / "results.json", out / "table.md"]
    if plots:
        why = plot_all(out, rows)
        if why:
            print(f"bench_e2e: plots skipped: {why}", file=sys.stderr)
        else:
            written += [out / p for p in PLOTS]
    return written


# ---- markdown -----------------------------------------------------------------------------------------------------


def _num(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _bytes(v) -> str:
    if v is None:
        return ""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(v) >= scale:
            return f"{v / scale:.1f} {unit}"
    return f"{v:.0f} B"


def _count(v) -> str:
    if v is None:
        return ""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}"


def fidelity_cell(rec: dict) -> str:
    parts = []
    if rec.get("accuracy") is not None:
        acc = f"acc {rec['accuracy']:.3f}"
        if rec.get("accuracy_delta") is not None:
            acc += f" ({rec['accuracy_delta']:+.3f})"
        parts.append(acc)
    if rec.get("agreement") is not None:
        parts.append(f"agree {rec['agreement']:.3f}")
    if rec.get("output_cos") is not None:
        parts.append(f"cos {rec['output_cos']:.6f}")
    if rec.get("output_kl") is not None:
        parts.append(f"KL {rec['output_kl']:.1e}")
    if rec.get("gen_token_agreement") is not None:
        parts.append(f"tokens {rec['gen_token_agreement']:.2f}")
    return ", ".join(parts)


def _status_cell(rec: dict) -> str:
    text = rec["status"] if rec["status"] != "ok" else ""
    if rec.get("note"):
        text = f"{text}; {rec['note']}" if text else rec["note"]
    return text.replace("|", "/")


TABLE_HEAD = ["model", "variant", "passes", "TTFT ms", "TTFT x", "decode tok/s", "decode x", "peak mem", "KV",
              "visual tok", "FLOPs (measured)", "FLOPs (paper)", "fidelity vs eager", "status / notes"]


def table_rows(records: list) -> list:
    out = []
    for rec in records:
        out.append([rec["model"], rec["variant"], rec["passes"].replace(";", ", "), _num(rec.get("ttft_ms"), ".2f"),
                    _num(rec.get("ttft_speedup"), ".2f"), _num(rec.get("decode_tok_s"), ".0f"),
                    _num(rec.get("decode_speedup"), ".2f"), _bytes(rec.get("peak_mem_bytes")),
                    _bytes(rec.get("kv_bytes")), _num(rec.get("visual_tokens"), ".0f"),
                    _count(rec.get("flops_measured")), _count(rec.get("flops_paper")), fidelity_cell(rec),
                    _status_cell(rec)])
    return out


def _md(head: list, rows: list) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def meta_lines(meta: dict) -> list:
    keys = ("complete", "device", "mode", "size", "dtype", "torch", "transformers", "triton", "vopt", "git_sha", "torch_threads",
            "reps", "warmup", "decode_tokens", "fidelity_n", "memory_method", "ttft_method", "decode_method", "wall_s")
    return [f"- {k}: {meta[k]}" for k in keys if k in meta]


def markdown_table(meta: dict, rows: list) -> str:
    """The full table: one line per (model, variant), with the run's device and versions above it."""
    return "\n".join(["# bench_e2e results", ""] + meta_lines(meta) + ["", _md(TABLE_HEAD, table_rows(pivot(rows)))])


# ---- plots --------------------------------------------------------------------------------------------------------


def plot_all(out: Path, rows: list) -> Optional[str]:
    """Write the PNG plots; returns why not (matplotlib missing) or None."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); pip install matplotlib (extra 'bench')"
    records = pivot(rows)
    _speed_vs_fidelity(plt, records, out / PLOTS[0])
    _memory_per_model(plt, records, out / PLOTS[1])
    return None


def _colors(plt, variants: list) -> dict:
    cmap = plt.get_cmap("tab20")
    return {v: cmap(i % 20) for i, v in enumerate(variants)}


def _speed_vs_fidelity(plt, records: list, path: Path) -> None:
    """Left: every model, TTFT speedup vs output error (1 - cos-sim of the next-token logits / main output, log).
    Right: the trained model, TTFT speedup vs held-out answer agreement and generated-token agreement."""
    variants = list(dict.fromkeys(r["variant"] for r in records if r["variant"] != "eager"))
    colors = _colors(plt, variants)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    for variant in variants:
        pts = [(r["ttft_speedup"], max(1.0 - r["output_cos"], 1e-16)) for r in records
               if r["variant"] == variant and r.get("ttft_speedup") is not None and r.get("output_cos") is not None]
        if pts:
            left.scatter([p[0] for p in pts], [p[1] for p in pts], label=variant, color=colors[variant], s=30,
                         alpha=0.85)
        trained = [r for r in records if r["variant"] == variant and r.get("agreement") is not None
                   and r.get("ttft_speedup") is not None]
        for r in trained:
            right.scatter(r["ttft_speedup"], r["agreement"], color=colors[variant], marker="o", s=45, label=variant)
            if r.get("gen_token_agreement") is not None:
                right.scatter(r["ttft_speedup"], r["gen_token_agreement"], color=colors[variant], marker="x", s=45)
    for ax in (left, right):
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("TTFT speedup vs eager (x, log; >1 is faster)")
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("1 - output cos-sim vs eager (log; 1e-16 = exact)")
    left.set_title("every model: speed vs output error, one point per model")
    left.legend(fontsize=7, loc="upper left")
    right.set_ylim(-0.05, 1.05)
    right.set_ylabel("agreement with eager (o: held-out answers, x: generated tokens)")
    right.set_title("trained tiny llava-onevision: speed vs answers")
    handles, labels = right.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    if uniq:
        right.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _memory_per_model(plt, records: list, path: Path) -> None:
    models = list(dict.fromkeys(r["model"] for r in records))
    variants = list(dict.fromkeys(r["variant"] for r in records))
    colors = _colors(plt, variants)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, key, title in ((axes[0], "peak_mem_bytes", "peak memory growth over prefill + generate (log)"),
                           (axes[1], "kv_bytes", "KV-cache bytes after generate")):
        width = 0.8 / max(1, len(variants))
        for j, variant in enumerate(variants):
            xs, vals = [], []
            for i, m in enumerate(models):
                rec = next((r for r in records if r["model"] == m and r["variant"] == variant), {})
                if rec.get(key):
                    xs.append(i + j * width)
                    vals.append(rec[key] / 1024)
            if xs:
                ax.bar(xs, vals, width, label=variant, color=colors[variant])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))])
        ax.set_xticklabels(models, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("KiB")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_yscale("log")
    handles, labels = [], []
    for ax in axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    axes[1].legend(handles, labels, fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- README block -------------------------------------------------------------------------------------------------


HEADLINE_HEAD = ["model", "TTFT eager ms", "TTFT all passes", "decode tok/s eager", "decode all passes",
                 "KV eager -> all", "visual tokens eager -> all", "fidelity of all passes", "all passes"]


def headline(meta: dict, rows: list) -> list:
    """Per model, every applicable pass together vs eager."""
    records = pivot(rows)
    out = []
    for model in dict.fromkeys(r["model"] for r in records):
        eager = next((r for r in records if r["model"] == model and r["variant"] == "eager"), None)
        all_ = next((r for r in records if r["model"] == model and r["variant"] == "all"), None)
        if eager is None:
            continue
        a = all_ or {}
        x = lambda key: f" ({a[key]:.2f}x)" if a.get(key) is not None else ""
        kv = f"{_bytes(eager.get('kv_bytes'))} -> {_bytes(a.get('kv_bytes'))}" if eager.get("kv_bytes") else ""
        vt = f"{_num(eager.get('visual_tokens'), '.0f')} -> {_num(a.get('visual_tokens'), '.0f')}" \
            if eager.get("visual_tokens") is not None else ""
        status = a.get("status", "not run") if all_ is not None else "not run"
        out.append([model, _num(eager.get("ttft_ms"), ".2f"),
                    (_num(a.get("ttft_ms"), ".2f") + x("ttft_speedup")) if a.get("ttft_ms") is not None else status,
                    _num(eager.get("decode_tok_s"), ".0f"),
                    (_num(a.get("decode_tok_s"), ".0f") + x("decode_speedup")) if a.get("decode_tok_s") else "",
                    kv, vt, fidelity_cell(a), a.get("passes", "").replace(";", ", ")])
    return out


def readme_block(meta: dict, rows: list, results_dir: Path, readme: Path) -> str:
    rel = Path(os.path.relpath(results_dir.resolve(), readme.resolve().parent)).as_posix()
    trained = [r for r in pivot(rows) if r["model"] == "llava-onevision"]
    lines = [
        BEGIN,
        f"<!-- generated by: python tools/bench_e2e.py --update-readme {readme.name} --from {rel} (do not edit) -->",
        "",
        f"Measured on {meta.get('device')} ({meta.get('mode')}), size `{meta.get('size')}`, {meta.get('dtype')}, "
        f"torch {meta.get('torch')}, transformers {meta.get('transformers')}, vopt {meta.get('vopt')} "
        f"({meta.get('git_sha')}); {meta.get('reps')} timed reps, {meta.get('decode_tokens')} decode tokens, "
        f"{meta.get('fidelity_n')} held-out clips; wall {meta.get('wall_s')} s. Every model, every pass alone, "
        f"torch.compile and transformers' quantized cache: [`{rel}/table.md`]({rel}/table.md) "
        f"(long format: `results.csv` / `results.json`).",
        "",
        "All applicable passes together vs the eager model (x: speedup vs the eager model re-timed right before "
        "the variant, A/B; >1 is faster). " + (
            "CPU timings of tiny models on a shared machine are noisy and dominated by per-call overhead: variants "
            "that rewrote nothing (`no-op` in the full table) show the noise floor and vopt's capture overhead; "
            "vopt's CPU kernels are the exact torch references, not fast paths."
            if meta.get("device", "").startswith("CPU") else ""),
        "",
        _md(HEADLINE_HEAD, headline(meta, rows)),
        "",
    ]
    if trained:
        lines += ["The trained tiny LLaVA-OneVision, every variant (accuracy / agreement on held-out clips):", "",
                  _md(TABLE_HEAD, table_rows(trained)), ""]
    lines += [f"![speed vs fidelity]({rel}/{PLOTS[0]})", "", f"![memory per model]({rel}/{PLOTS[1]})", "", END]
    return "\n".join(lines)


def update_readme(readme: Path, results_dir: Path) -> int:
    """Replace the text between the bench_e2e markers of ``readme`` (markers kept); nothing else changes."""
    src = results_dir / "results.json"
    if not src.is_file():
        print(f"bench_e2e: {src} not found (run the benchmark with --out {results_dir} first)", file=sys.stderr)
        return 2
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        print(f"bench_e2e: {readme} needs exactly one {BEGIN} ... {END} block", file=sys.stderr)
        return 2
    payload = json.loads(src.read_text())
    block = readme_block(payload["meta"], payload["rows"], results_dir, readme)
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + block + tail
    if new != text:
        tmp = readme.with_name(readme.name + ".tmp")
        tmp.write_text(new)
        tmp.replace(readme)
    print(f"bench_e2e: updated the {BEGIN} block of {readme}")
    return 0

"""The optimization report: what was captured, what each pass matched and did.

Printable as a table (``str(report)``) and serialisable to JSON
(``report.to_json()``). Savings are the passes' own estimates (FLOPs, bytes).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional



def _fmt_count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _table(headers: list, rows: list) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


@dataclass
class Report:
    model: str
    adapter: str
    passes: list
    """``[{"name", "kind", "uuid", "config"}]`` in pipeline order."""
    notes: list = field(default_factory=list)
    runtime_results: list = field(default_factory=list)
    stage_events: list = field(default_factory=list)
    validation: Optional[dict] = None

    @property
    def pass_results(self) -> list:
        out = list(self.runtime_results)
        for ev in self.stage_events:
            out.extend(ev.pass_results)
        return out

    def rewritten(self, pass_name: Optional[str] = None) -> list:
        """Every rewritten match (optionally of one pass)."""
        return [m for r in self.pass_results if pass_name in (None, r.pass_name) for m in r.rewritten]

    def skipped(self, pass_name: Optional[str] = None) -> list:
        return [m for r in self.pass_results if pass_name in (None, r.pass_name) for m in r.skipped]

    def summary(self) -> list:
        """One row per pass: totals over all stages and specializations."""
        rows = []
        for p in self.passes:
            results = [r for r in self.pass_results if r.pass_name == p["name"]]
            matches = [m for r in results for m in r.matches]
            done = [m for m in matches if m.rewritten]  # in a dry run: would be rewritten
            rows.append(
                {
                    "pass": p["name"],
                    "kind": p["kind"],
                    "matched": len(matches),
                    "rewritten": len(done),
                    "skipped": len(matches) - len(done),
                    "flops_saved": sum(m.flops_saved for m in done),
                    "bytes_saved": sum(m.bytes_saved for m in done),
                }
            )
        return rows

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "adapter": self.adapter,
            "passes": self.passes,
            "notes": self.notes,
            "summary": self.summary(),
            "stages": [ev.to_dict() for ev in self.stage_events],
            "runtime_results": [r.to_dict() for r in self.runtime_results],
            "validation": self.validation,
        }

    def to_json(self, **kw) -> str:
        kw.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kw, default=str)

    def table(self) -> str:
        out = [f"vopt report: {self.model} (adapter: {self.adapter})"]
        if self.stage_events:
            rows = [
                [ev.stage, ev.role, ev.signature or "-", f"exported ({ev.export_seconds:.2f} s)" if ev.exported else f"eager: {ev.reason}"]
                for ev in self.stage_events
            ]
            out += ["", _table(["stage", "role", "inputs", "capture"], rows)]
        else:
            out += ["", "(no stage captured yet: stages are captured on the first call)"]
        rows = [
            [r["pass"], r["kind"], r["matched"], r["rewritten"], r["skipped"], _fmt_count(r["flops_saved"]), _fmt_count(r["bytes_saved"])]
            for r in self.summary()
        ]
        out += ["", _table(["pass", "kind", "matched", "rewritten", "skipped", "est. FLOPs saved", "est. bytes saved"], rows)]
        details = []
        for r in self.pass_results:
            for m in r.matches:
                state = ("would rewrite" if r.dry_run else "rewritten") if m.rewritten else f"skipped: {m.reason}"
                details.append([r.pass_name, m.where, m.what, state])
        if details:
            out += ["", _table(["pass", "where", "what", "result"], details)]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    __str__ = table

"""LLM4VG's text side: the per-second prompt, span parsing, and the Charades-STA metrics.

* :func:`build_prompt`: per-second yes/no answers -> ``"t=0: no, t=1: yes, ..."`` in a grounding question.
* :func:`parse_spans`: an LLM's free-text answer -> ``[(start, end), ...]`` seconds; never raises on garbled text.
* :func:`temporal_iou`, :func:`recall_at_1`, :func:`mean_iou`, :func:`charades_sta_metrics`: R@1 at IoU
  0.3/0.5/0.7 and mIoU over the top-1 span, as Charades-STA reports them.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

#: The IoU thresholds Charades-STA reports R@1 at.
CHARADES_IOUS = (0.3, 0.5, 0.7)

_NUM = r"(\d+(?::\d{1,2}){0,2}(?:\.\d+)?)"          # 7, 7.5, 1:05, 0:01:05.5
_UNIT = r"(?:\s*(?:s|sec|secs|second|seconds)\b)?"
_LABEL = r"(?:time|second|seconds|timestamp|point)?\s*(?:[:=]|is|at|of)?\s*"
_SPAN_RE = re.compile(
    # "start: 3, end: 7", "start time is 3 seconds and the end time is 7"
    rf"\bstart(?:s|ing)?\s*{_LABEL}{_NUM}{_UNIT}[^\d]{{0,40}}?\bend(?:s|ing)?\s*{_LABEL}{_NUM}"
    # "from 3 to 7 seconds", "3-7", "3s - 7s", "between 3 and 7", "00:03 to 00:07", "t=3 to t=7"
    rf"|{_NUM}{_UNIT}\s*(?:-|–|—|~|\bto\b|\band\b|\buntil\b|\btill\b|\bthrough\b)\s*(?:t\s*=\s*)?{_NUM}"
    # "[3, 7]", "(3.0, 7.5)"
    rf"|[\[(]\s*{_NUM}{_UNIT}\s*,\s*{_NUM}{_UNIT}\s*[\])]",
    re.IGNORECASE,
)


def _seconds(token: str) -> float:
    """``"7.5"`` -> 7.5; ``"1:05"`` -> 65.0; ``"1:02:03"`` -> 3723.0."""
    value = 0.0
    for part in token.split(":"):
        value = value * 60.0 + float(part)
    return value


def parse_spans(text) -> list:
    """Every ``(start, end)`` span (seconds, ``start <= end``) in an LLM answer, in order of appearance.

    Understands "from 3 to 7 seconds", "3-7", "3s - 7s", "between 3 and 7",
    "start: 3, end: 7", "start time is 3 ... end time is 7", "[3, 7]",
    "00:03 to 00:07". Reversed spans are put in order. Anything else (missing,
    garbled, not a string) gives ``[]``; it never raises.
    """
    if not isinstance(text, str):
        return []
    spans = []
    for m in _SPAN_RE.finditer(text):
        start, end = (g for g in m.groups() if g is not None)
        a, b = _seconds(start), _seconds(end)
        if math.isfinite(a) and math.isfinite(b):
            spans.append((min(a, b), max(a, b)))
    return spans


def build_prompt(query: str, answers: Sequence[bool]) -> str:
    """The LLM prompt: one yes/no answer per second, then the grounding question."""
    seconds = ", ".join(f"t={i}: {'yes' if a else 'no'}" for i, a in enumerate(answers))
    return (f"A video is described second by second; each line says whether \"{query}\" is visible. {seconds}. "
            f"When does \"{query}\" start and end? Answer in the form \"from <start> to <end> seconds\".")


def _span(value, what: str) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{what} must be a (start, end) pair, got {value!r}")
    start, end = float(value[0]), float(value[1])
    if not (math.isfinite(start) and math.isfinite(end)) or start > end:
        raise ValueError(f"{what} must have finite start <= end, got {value!r}")
    return start, end


def temporal_iou(a, b) -> float:
    """Intersection over union of two ``(start, end)`` spans; two identical zero-length spans give 1.0."""
    (s1, e1), (s2, e2) = _span(a, "a"), _span(b, "b")
    inter = max(0.0, min(e1, e2) - max(s1, s2))
    union = (e1 - s1) + (e2 - s2) - inter
    if union == 0.0:
        return 1.0 if (s1, e1) == (s2, e2) else 0.0
    return inter / union


def _top1(prediction) -> Optional[tuple]:
    """The top-1 span of one query's prediction: a span, a ranked list of spans, or empty/None (no answer)."""
    if prediction is None or (isinstance(prediction, (tuple, list)) and len(prediction) == 0):
        return None
    if isinstance(prediction, (tuple, list)) and len(prediction) == 2 and all(isinstance(x, (int, float)) for x in prediction):
        return tuple(prediction)
    return tuple(prediction[0])


def _top1_ious(pred_spans: Sequence, gt_spans: Sequence) -> list:
    if len(pred_spans) != len(gt_spans):
        raise ValueError(f"pred_spans and gt_spans must have one entry per query: {len(pred_spans)} != {len(gt_spans)}")
    if not gt_spans:
        raise ValueError("gt_spans is empty: no query to score")
    ious = []
    for i, (pred, gt) in enumerate(zip(pred_spans, gt_spans)):
        top = _top1(pred)
        ious.append(0.0 if top is None else temporal_iou(top, _span(gt, f"gt_spans[{i}]")))
    return ious


def recall_at_1(pred_spans: Sequence, gt_spans: Sequence, iou: float) -> float:
    """Fraction of queries whose top-1 span reaches ``iou`` with the ground truth (no prediction = miss)."""
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou must lie in (0, 1], got {iou!r}")
    ious = _top1_ious(pred_spans, gt_spans)
    return sum(v >= iou for v in ious) / len(ious)


def mean_iou(pred_spans: Sequence, gt_spans: Sequence) -> float:
    """Mean top-1 IoU over the queries (no prediction counts 0)."""
    ious = _top1_ious(pred_spans, gt_spans)
    return sum(ious) / len(ious)


def charades_sta_metrics(pred_spans: Sequence, gt_spans: Sequence) -> dict:
    """``{"R@1,IoU=0.3": ..., "R@1,IoU=0.5": ..., "R@1,IoU=0.7": ..., "mIoU": ...}``."""
    out = {f"R@1,IoU={t}": recall_at_1(pred_spans, gt_spans, t) for t in CHARADES_IOUS}
    out["mIoU"] = mean_iou(pred_spans, gt_spans)
    return out

"""Score a model on the synthetic video task: QA accuracy with bootstrap CIs, temporal-grounding R@1 / mIoU.

    result = vopt.eval.video_qa(model)          # 200 test clips, 50 per question type
    print(result.table())                       # accuracy, 95 % CI, per question type with chance level
    g = vopt.eval.grounding(model)              # two-step greedy decode of "<start frame> <end frame>"
    print(g.table())

``model`` is any callable taking the keyword inputs ``input_ids``, ``attention_mask`` and ``pixel_values_videos``
(an HF ``LlavaOnevisionForConditionalGeneration``, a :class:`vopt.OptimizedModel` wrapping one, or a plain
``nn.Module``) and returning ``[B, L, V]`` logits, as a tensor or as an object with ``.logits``. Batches come from
:func:`vopt.eval.video_task.to_model_inputs` (right-padded, so a row's logits do not depend on its batch); the
video placeholder id and the patch size come from ``model.config`` (``video_token_index``,
``vision_config.patch_size``) when it has them, else 501 and 8 (the tiny zoo model's).

Scoring is strict: the prediction is the argmax over the model's *whole* vocabulary at the answer position, so the
model must emit the answer word itself; no restriction to the question type's candidate answers. (Grounding, whose
answers are frame numbers, restricts each of its two decode steps to the frame words; see :func:`grounding`.)

Models run under ``torch.no_grad()`` in eval mode: every submodule's train/eval flag is saved, the model is put in
eval mode, and the flags are restored afterwards (also on error). Parameters are never changed.

Confidence intervals are percentile bootstraps over samples, drawn from a ``numpy.random.Generator`` seeded by
``seed`` (one independent stream per statistic), so a result is a deterministic function of its arguments.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..report import _table
from ..zoo._llm4vg_text import temporal_iou
from . import video_task as vt

__all__ = ["GroundingResult", "QAResult", "TypeScore", "bootstrap_ci", "grounding", "video_qa"]

#: Placeholder id and patch size used when ``model.config`` does not name them (the tiny zoo model's values).
DEFAULT_VIDEO_TOKEN_ID = 501
DEFAULT_PATCH_SIZE = 8

_BOOTSTRAP_CHUNK = 4_000_000  # resampled values held in memory at once


# -- results ---------------------------------------------------------------------------------------------------------

def _fmt_ci(ci: tuple) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


@dataclass
class TypeScore:
    """Accuracy of one question type: ``ci`` is the bootstrap CI, ``chance`` 1 / (size of its answer vocabulary)."""

    accuracy: float
    ci: tuple
    n: int
    chance: float

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "ci": list(self.ci), "n": self.n, "chance": self.chance}


@dataclass
class QAResult:
    """What :func:`video_qa` measured.

    ``per_type`` maps a question type's name (``"moved_left"`` ...) to its :class:`TypeScore`, in
    :class:`~vopt.eval.video_task.QuestionType` order, for the types present. ``predictions`` are the predicted
    words (an id outside the task vocabulary reads ``"<id N>"``), ``answers`` the true ones, ``correct`` whether
    they match; ``logits`` is the ``[n, V]`` float32 CPU tensor of answer-position logits.
    """

    accuracy: float
    ci: tuple
    n: int
    per_type: dict
    predictions: list
    correct: list
    logits: torch.Tensor = field(repr=False, compare=False)
    answers: list = field(default_factory=list, repr=False)
    confidence: float = 0.95

    def table(self) -> str:
        """A plain-text table: overall accuracy and CI, then one row per question type with its chance level."""
        pct = f"{self.confidence * 100:g}% CI"
        rows = [[name, s.n, f"{s.accuracy:.3f}", _fmt_ci(s.ci), f"{s.chance:.3f}"] for name, s in self.per_type.items()]
        rows.append(["all", self.n, f"{self.accuracy:.3f}", _fmt_ci(self.ci), ""])
        head = f"video QA: n={self.n}, accuracy {self.accuracy:.3f} {_fmt_ci(self.ci)} ({pct})"
        return head + "\n\n" + _table(["question type", "n", "accuracy", pct, "chance"], rows)

    def to_dict(self, per_sample: bool = True) -> dict:
        """JSON-able summary (everything but ``logits``; the per-clip lists only if ``per_sample``)."""
        out = {
            "accuracy": self.accuracy,
            "ci": list(self.ci),
            "confidence": self.confidence,
            "n": self.n,
            "per_type": {name: s.to_dict() for name, s in self.per_type.items()},
        }
        if per_sample:
            out.update(predictions=list(self.predictions), answers=list(self.answers),
                       correct=[bool(c) for c in self.correct])
        return out


@dataclass
class GroundingResult:
    """What :func:`grounding` measured.

    ``metrics``: ``R@1,IoU=0.3/0.5/0.7`` and ``mIoU`` (see :func:`vopt.eval.video_task.grounding_metrics`);
    ``miou_ci``: bootstrap CI of the mIoU; ``spans``: predicted ``(start, end)`` in seconds, ``frames`` the same as
    inclusive frame indices; ``ious``: each sample's IoU with its ground truth.
    """

    metrics: dict
    n: int
    spans: list
    miou_ci: tuple = (float("nan"), float("nan"))
    frames: list = field(default_factory=list, repr=False)
    ious: list = field(default_factory=list, repr=False)
    confidence: float = 0.95

    def table(self) -> str:
        """A plain-text table of R@1 at each IoU threshold and the mIoU with its CI."""
        pct = f"{self.confidence * 100:g}% CI"
        rows = [[name, f"{value:.3f}", _fmt_ci(self.miou_ci) if name == "mIoU" else ""]
                for name, value in self.metrics.items()]
        return f"grounding: n={self.n}\n\n" + _table(["metric", "value", pct], rows)

    def to_dict(self, per_sample: bool = True) -> dict:
        """JSON-able summary (the per-clip lists only if ``per_sample``)."""
        out = {"metrics": dict(self.metrics), "miou_ci": list(self.miou_ci), "confidence": self.confidence,
               "n": self.n}
        if per_sample:
            out.update(spans=[list(s) for s in self.spans], frames=[list(f) for f in self.frames],
                       ious=list(self.ious))
        return out


# -- validation ------------------------------------------------------------------------------------------------------

def _check_int(name: str, value, minimum: int, maximum: Optional[int] = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if not ok or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ConfigError(f"{name} must be an integer {bound}, got {value!r}")


def _check_confidence(confidence) -> None:
    if not isinstance(confidence, (int, float)) or isinstance(confidence, bool) or not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be a number strictly between 0 and 1 (e.g. 0.95), got {confidence!r}")


def _check_split(split) -> None:
    if split not in vt.SPLITS:
        raise ConfigError(f"split must be one of {', '.join(vt.SPLITS)}, got {split!r}")


def _check_model(model) -> None:
    if not callable(model):
        raise ConfigError(f"model must be a callable (an nn.Module) taking input_ids, attention_mask and "
                          f"pixel_values_videos, got {type(model).__name__}")


def _check_samples(samples, kind: type) -> list:
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence) or not samples \
            or not all(isinstance(s, kind) for s in samples):
        raise ConfigError(f"samples must be a non-empty sequence of {kind.__name__} "
                          f"(from vopt.eval.video_task), got {type(samples).__name__}")
    return list(samples)


def qa_samples(split: str, n: int, seed: int, frames: int, samples: Optional[Sequence]) -> list:
    """The samples :func:`video_qa` scores: ``samples`` if given, else ``make_split(split, n, seed, frames)``."""
    if samples is not None:
        return _check_samples(samples, vt.VideoQASample)
    _check_split(split)
    _check_int("n", n, 1)
    _check_int("seed", seed, 0)
    _check_int("frames", frames, 7)
    return vt.make_split(split, n, seed=seed, frames=frames)


# -- running a model -------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def inference(model):
    """``torch.no_grad()`` with ``model`` in eval mode; every submodule's train/eval flag is restored on exit.

    The flags are set directly rather than with ``model.eval()``: a stage captured by ``torch.export`` refuses
    ``.train()``/``.eval()`` calls, and an exported graph's behaviour is fixed at capture time anyway.
    """
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    flags = [m.training for m in modules]
    try:
        for m in modules:
            m.training = False
        with torch.no_grad():
            yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


def _model_ids(model) -> tuple:
    """``(video_token_id, patch_size)`` from ``model.config``, else the defaults."""
    cfg = getattr(model, "config", None)
    video = getattr(cfg, "video_token_index", None)
    patch = getattr(getattr(cfg, "vision_config", None), "patch_size", None)
    video = video if isinstance(video, int) and not isinstance(video, bool) else DEFAULT_VIDEO_TOKEN_ID
    patch = patch if isinstance(patch, int) and not isinstance(patch, bool) else DEFAULT_PATCH_SIZE
    return video, patch


def _placement(model) -> tuple:
    """``(device of the first parameter, dtype of the first floating parameter)``; CPU / None where there is none."""
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    device = params[0].device if params else torch.device("cpu")
    dtype = next((p.dtype for p in params if p.is_floating_point()), None)
    return device, dtype


def model_inputs(model, samples: Sequence) -> dict:
    """``to_model_inputs(samples)`` with ``model``'s placeholder id and patch size, on its device and dtype."""
    video_token_id, patch_size = _model_ids(model)
    inputs = vt.to_model_inputs(samples, video_token_id=video_token_id, patch_size=patch_size)
    device, dtype = _placement(model)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if dtype is not None:
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
    return inputs


def forward_logits(model, inputs: dict) -> torch.Tensor:
    """``model(**inputs)``'s ``[B, L, V]`` logits (the output itself or its ``.logits``)."""
    out = model(**inputs)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    expected = tuple(inputs["input_ids"].shape)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != expected:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(out).__name__
        raise TypeError(f"the model must return [batch, length, vocab] logits (a tensor or an object with .logits) "
                        f"for input_ids of shape {list(expected)}, got {got}")
    return logits


def _rows(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return logits[torch.arange(logits.shape[0], device=logits.device), positions.to(logits.device)]


def batch_answer_logits(model, samples: Sequence) -> torch.Tensor:
    """``[len(samples), V]`` float32 CPU logits at each row's answer position (one forward; no grad/mode handling)."""
    inputs = model_inputs(model, samples)
    logits = forward_logits(model, inputs)
    return _rows(logits, vt.answer_positions(inputs["attention_mask"])).float().cpu()


def chunks(items: Sequence, size: int):
    """Consecutive slices of ``items`` of length ``size`` (the last may be shorter)."""
    for i in range(0, len(items), size):
        yield items[i:i + size]


# -- statistics ------------------------------------------------------------------------------------------------------

def bootstrap_ci(values, *, bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0,
                 stream: int = 0) -> tuple:
    """Percentile-bootstrap CI of the mean of ``values``: ``bootstrap`` resamples with replacement.

    The generator is ``numpy.random.default_rng(SeedSequence(seed, spawn_key=(stream,)))``: deterministic, and
    independent across ``stream`` numbers. ``bootstrap=0`` returns ``(mean, mean)``.
    """
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if bootstrap == 0:
        return mean, mean
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))
    n = len(values)
    rows = max(1, _BOOTSTRAP_CHUNK // n)
    means = np.concatenate([values[rng.integers(0, n, size=(min(rows, bootstrap - i), n))].mean(axis=1)
                            for i in range(0, bootstrap, rows)])
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def score_qa(samples: Sequence, logits: torch.Tensor, *, bootstrap: int = 1000, confidence: float = 0.95,
             seed: int = 0) -> QAResult:
    """A :class:`QAResult` from answer-position ``logits`` (``[n, V]``): argmax over the whole vocabulary."""
    pred_ids = logits.argmax(dim=-1).tolist()
    predictions = [vt.ID_TO_WORD.get(i, f"<id {i}>") for i in pred_ids]
    correct = [p == s.answer_id for p, s in zip(pred_ids, samples)]
    acc = sum(correct) / len(correct)
    ci = bootstrap_ci(correct, bootstrap=bootstrap, confidence=confidence, seed=seed, stream=0)
    per_type = {}
    for k, qtype in enumerate(vt.QuestionType, start=1):
        hits = [c for c, s in zip(correct, samples) if s.question_type is qtype]
        if hits:
            per_type[qtype.value] = TypeScore(
                accuracy=sum(hits) / len(hits),
                ci=bootstrap_ci(hits, bootstrap=bootstrap, confidence=confidence, seed=seed, stream=k),
                n=len(hits),
                chance=1.0 / len(vt.ANSWERS[qtype]),
            )
    return QAResult(acc, ci, len(samples), per_type, predictions, correct, logits,
                    answers=[s.answer for s in samples], confidence=float(confidence))


# -- public entry points ---------------------------------------------------------------------------------------------

def video_qa(model, split: str = "test", n: int = 200, seed: int = 0, *, samples: Optional[Sequence] = None,
             batch_size: int = 64, bootstrap: int = 1000, confidence: float = 0.95, frames: int = 8) -> QAResult:
    """Accuracy of ``model`` on ``n`` clips of the synthetic video-QA ``split`` (see the module docstring).

    ``samples`` (a list of :class:`~vopt.eval.video_task.VideoQASample`) replaces ``split`` / ``n`` / ``frames``;
    ``seed`` picks the clips (when generated) and seeds the bootstrap. The prediction is the argmax over the full
    vocabulary at :func:`~vopt.eval.video_task.answer_positions`: the model must emit the answer word itself.
    ``bootstrap`` resamples (0: no CI, ``ci == (accuracy, accuracy)``) give the ``confidence`` interval overall
    and per question type. The model runs in eval mode under ``no_grad``; its mode flags are restored afterwards.
    """
    _check_model(model)
    _check_int("batch_size", batch_size, 1)
    _check_int("bootstrap", bootstrap, 0)
    _check_confidence(confidence)
    _check_int("seed", seed, 0)
    samples = qa_samples(split, n, seed, frames, samples)
    with inference(model):
        logits = torch.cat([batch_answer_logits(model, chunk) for chunk in chunks(samples, batch_size)])
    return score_qa(samples, logits, bootstrap=bootstrap, confidence=confidence, seed=seed)


def grounding(model, split: str = "test", n: int = 100, seed: int = 0, *, samples: Optional[Sequence] = None,
              batch_size: int = 64, fps: float = 1.0, frames: int = 8, bootstrap: int = 1000,
              confidence: float = 0.95) -> GroundingResult:
    """Temporal grounding of ``model`` on ``n`` "when does the <colour> shape appear / move ?" clips.

    Two-step greedy decode, each step an argmax restricted to the frame words ``FRAME_WORDS[:frames]``: the logits
    at the last real position give the start frame; that word is written after it (position ``answer + 1``, mask
    extended; rows are right-padded so this never overwrites a token) and a second forward gives the end frame
    there. If end < start the two are swapped. The span in seconds is ``(start / fps, (end + 1) / fps)``.

    ``samples`` (a list of :class:`~vopt.eval.video_task.GroundingSample`) replaces ``split`` / ``n`` / ``fps`` /
    ``frames``: the frame count is read from the clips and each sample's own ``fps`` is used. Metrics are
    :func:`~vopt.eval.video_task.grounding_metrics` (R@1 at IoU 0.3/0.5/0.7, mIoU) plus a percentile-bootstrap
    CI of the mIoU (``bootstrap`` resamples, 0 for none, seeded by ``seed``).
    """
    _check_model(model)
    _check_int("batch_size", batch_size, 1)
    _check_int("bootstrap", bootstrap, 0)
    _check_confidence(confidence)
    _check_int("seed", seed, 0)
    if samples is not None:
        samples = _check_samples(samples, vt.GroundingSample)
        frames = samples[0].video.shape[0]
        _check_int("frames (of the samples' clips)", frames, 2, len(vt.FRAME_WORDS))
    else:
        _check_split(split)
        _check_int("n", n, 1)
        _check_int("frames", frames, 2, len(vt.FRAME_WORDS))
        if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not math.isfinite(fps) or fps <= 0:
            raise ConfigError(f"fps must be a positive finite number, got {fps!r}")
        samples = vt.make_grounding_split(split, n, seed=seed, fps=fps, frames=frames)
    frame_ids = torch.tensor([vt.VOCAB[w] for w in vt.FRAME_WORDS[:frames]])

    pairs = []
    with inference(model):
        for chunk in chunks(samples, batch_size):
            pairs.extend(_decode_span(model, chunk, frame_ids))
    pairs = [(min(s, e), max(s, e)) for s, e in pairs]
    spans = [(s / sample.fps, (e + 1) / sample.fps) for (s, e), sample in zip(pairs, samples)]
    ious = [temporal_iou(p, sample.span) for p, sample in zip(spans, samples)]
    metrics = vt.grounding_metrics(spans, samples)
    miou_ci = bootstrap_ci(ious, bootstrap=bootstrap, confidence=confidence, seed=seed)
    return GroundingResult(metrics, len(samples), spans, miou_ci, pairs, ious, float(confidence))


def _decode_span(model, samples: Sequence, frame_ids: torch.Tensor) -> list:
    """``[(start_frame, end_frame)]`` (unordered) by two restricted greedy steps (see :func:`grounding`)."""
    inputs = model_inputs(model, samples)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pos = vt.answer_positions(mask)
    frame_ids = frame_ids.to(ids.device)
    start = _restricted_argmax(_rows(forward_logits(model, inputs), pos), frame_ids)
    rows = torch.arange(ids.shape[0], device=ids.device)
    longer_ids = torch.full((ids.shape[0], ids.shape[1] + 1), vt.PAD_ID, dtype=ids.dtype, device=ids.device)
    longer_mask = torch.zeros_like(longer_ids, dtype=mask.dtype)
    longer_ids[:, :-1], longer_mask[:, :-1] = ids, mask
    longer_ids[rows, pos + 1] = frame_ids[start]
    longer_mask[rows, pos + 1] = 1
    step2 = dict(inputs, input_ids=longer_ids, attention_mask=longer_mask)
    end = _restricted_argmax(_rows(forward_logits(model, step2), pos + 1), frame_ids)
    return list(zip(start.tolist(), end.tolist()))


def _restricted_argmax(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Index into ``token_ids`` (on its device) of the largest of ``logits[:, token_ids]``."""
    return logits.index_select(-1, token_ids.to(logits.device)).argmax(dim=-1).to(token_ids.device)

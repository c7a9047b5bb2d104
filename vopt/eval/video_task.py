"""A deterministic synthetic video-QA task (and a temporal-grounding variant) for fidelity checks.

Clips are ``[T, 3, H, W]`` float32 tensors in ``[0, 1]`` (default T=8, H=W=32: the tiny LLaVA-OneVision vision
tower's image size with patch 8). The background is black; 1-3 flat-coloured shapes (squares or discs, exact RGB
colours from :data:`COLOURS`, no anti-aliasing) each live in their own horizontal lane, so they never overlap.
Horizontal motion wraps around the frame edges (a torus), which keeps every shape's position uniform in *every*
single frame: no frame on its own tells which shape moves, or which way. :func:`to_model_inputs` applies the SigLIP
normalisation ``(x - 0.5) / 0.5`` (values in ``[-1, 1]``) unless ``normalize=False``.

Other sizes (``height`` / ``width``) keep the shapes' pixel sizes (5-8 px) and speeds (2-3 px per frame); the three
lanes grow with the frame. At 64x64 (the ``tiny64`` LLaVA-OneVision: 8x8 patches, 4x4 pooled 16-pixel tokens per
frame) about 80 % of the pooled cells are black background in every frame: the redundancy of a real video's static
scene, which token merging exploits; at 32x32 about 40 % are.

Question types (:class:`QuestionType`), each with a 4-word answer vocabulary (uniform chance 1/4):

* ``moved_left``: "which colour moved left ?" -- 2-3 shapes; exactly one moves left, the others move right or stay
  (2-3 pixels per frame: a quarter of a pooled 16-pixel visual token over a step, enough for a tiny model to see).
  Answer: a colour. A guess among the colours on screen scores 1/(number of shapes), 5/12 on average.
* ``appeared_first``: "which colour appeared first ?" -- 2-3 static shapes appear at distinct frames >= 1 and stay;
  the first frame is empty, the last shows them all. Answer: a colour.
* ``blink_count``: "how many times did the <colour> shape blink ?" -- the target and 0-2 distractors blink (one
  invisible frame each, never the first or last frame). Answer: "0".."3".
* ``color_at_end``: "which colour was present at the end ?" -- 1-3 shapes whose colours are drawn independently of
  the answer; all but one disappear and the survivor may change colour, so the first frame says nothing about it.
  Answer: a colour.

Splits (:func:`make_split`) are balanced (question types cycle; answers cycle within each type, so counts differ by
at most one) and disjoint by construction: a clip's split is a function of its pixels (a hash bucket), and the
generator redraws a clip until it falls in the requested split. Every random draw comes from a
``numpy.random.Generator`` seeded by ``(seed, split, index)``; nothing touches a global RNG.

:func:`make_grounding_split` gives "when does the <colour> shape appear / move ?" clips with a ground-truth span in
seconds (frame ``i`` covers ``[i / fps, (i + 1) / fps)``); :func:`grounding_metrics` scores predicted spans with
the Charades-STA R@1 / mIoU of :mod:`vopt.zoo._llm4vg_text`.
"""
from __future__ import annotations

import hashlib
import math
import types
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..zoo._llm4vg_text import charades_sta_metrics

#: Colour name -> RGB in [0, 1]. Exact values, so a pixel's colour is unambiguous.
COLOURS = types.MappingProxyType({
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
})
COLOUR_NAMES = tuple(COLOURS)
BLINK_ANSWERS = ("0", "1", "2", "3")
#: Frame-number words: a grounding answer is "<start frame> <end frame>" (inclusive; clips have <= 8 frames).
FRAME_WORDS = ("0", "1", "2", "3", "4", "5", "6", "7")

_SPECIAL = ("<pad>", "<bos>")
_WORDS = ("which", "colour", "moved", "left", "appeared", "first", "how", "many", "times", "did", "the", "shape",
          "blink", "was", "present", "at", "end", "when", "does", "appear", "move", "?")

#: The task's token vocabulary: word -> id. Ids are small (< 64), far below the tiny model's vocab (512) and its
#: image/video placeholders (500/501), which are never emitted.
VOCAB = types.MappingProxyType({w: i for i, w in enumerate(
    _SPECIAL + _WORDS + COLOUR_NAMES + BLINK_ANSWERS + FRAME_WORDS[len(BLINK_ANSWERS):])})
#: Id -> word.
ID_TO_WORD = types.MappingProxyType({i: w for w, i in VOCAB.items()})
PAD_ID = VOCAB["<pad>"]
BOS_ID = VOCAB["<bos>"]

SPLITS = ("train", "val", "test")
#: Hash buckets (out of 20) of each split: train 70 %, val 15 %, test 15 %.
_SPLIT_BUCKETS = {"train": range(0, 14), "val": range(14, 17), "test": range(17, 20)}
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_MAX_ATTEMPTS = 10_000
_N_LANES = 3


class QuestionType(str, Enum):
    """The four temporal question types."""

    MOVED_LEFT = "moved_left"
    APPEARED_FIRST = "appeared_first"
    BLINK_COUNT = "blink_count"
    COLOR_AT_END = "color_at_end"


#: Question type -> its answer vocabulary (strings; each is a key of :data:`VOCAB`).
ANSWERS = types.MappingProxyType({
    QuestionType.MOVED_LEFT: COLOUR_NAMES,
    QuestionType.APPEARED_FIRST: COLOUR_NAMES,
    QuestionType.BLINK_COUNT: BLINK_ANSWERS,
    QuestionType.COLOR_AT_END: COLOUR_NAMES,
})


class GroundingQuery(str, Enum):
    """What a grounding question asks the span of."""

    APPEAR = "appear"
    MOVE = "move"


def words(token_ids) -> str:
    """Token ids of ``VOCAB`` as space-separated text."""
    return " ".join(ID_TO_WORD[i] for i in token_ids)


@dataclass
class VideoQASample:
    """One clip, its question and answer. ``video`` is ``[T, 3, H, W]`` float32 in ``[0, 1]``."""

    video: torch.Tensor
    question_type: QuestionType
    question_tokens: list
    answer: str
    answer_id: int
    meta: dict = field(default_factory=dict)

    @property
    def question(self) -> str:
        """The question as text."""
        return words(self.question_tokens)


@dataclass
class GroundingSample:
    """One clip and a "when does the <colour> shape appear / move ?" query.

    ``frames`` is the inclusive ``(start_frame, end_frame)``; ``span`` the same in seconds,
    ``(start_frame / fps, (end_frame + 1) / fps)``.
    """

    video: torch.Tensor
    query: GroundingQuery
    colour: str
    question_tokens: list
    frames: tuple
    span: tuple
    fps: float
    meta: dict = field(default_factory=dict)

    @property
    def question(self) -> str:
        """The question as text."""
        return words(self.question_tokens)

    @property
    def answer_tokens(self) -> list:
        """The answer a model is trained to emit: ``[<start frame word>, <end frame word>]``."""
        if max(self.frames) >= len(FRAME_WORDS):
            raise ConfigError(f"grounding answers are frame words 0..{len(FRAME_WORDS) - 1}; this clip's span "
                              f"{self.frames} needs more (make the split with frames <= {len(FRAME_WORDS)})")
        return [VOCAB[FRAME_WORDS[f]] for f in self.frames]


@dataclass
class _Shape:
    """A shape's track: one x and one colour index (None = invisible) per frame; fixed lane row ``y``."""

    kind: str
    size: int
    y: int
    xs: list
    colours: list


# -- validation ------------------------------------------------------------------------------------------------------

def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_common(name: str, n: int, seed: int, frames: int, height: int, width: int, min_frames: int) -> None:
    if name not in SPLITS:
        raise ConfigError(f"split name must be one of {', '.join(SPLITS)}, got {name!r}")
    _check_int("n", n, 0)
    _check_int("seed", seed, 0)
    _check_int("frames", frames, min_frames)
    _check_int("height", height, 24)
    _check_int("width", width, 16)


# -- drawing ---------------------------------------------------------------------------------------------------------

def _new_shape(rng: np.random.Generator, lane: int, frames: int, height: int, width: int) -> _Shape:
    lane_h = height // _N_LANES
    size = int(rng.integers(5, min(8, lane_h) + 1))
    y = lane * lane_h + int(rng.integers(0, lane_h - size + 1))
    x0 = int(rng.integers(0, width))
    kind = "square" if rng.random() < 0.5 else "disc"
    return _Shape(kind, size, y, [x0] * frames, [None] * frames)


def _set_motion(shape: _Shape, velocity: int, width: int, start: int = 0, stop: Optional[int] = None) -> None:
    """Move ``velocity`` pixels per frame (wrapping) between frames ``start`` and ``stop`` (inclusive)."""
    stop = len(shape.xs) - 1 if stop is None else stop
    x = shape.xs[start]
    for t in range(start + 1, len(shape.xs)):
        if t <= stop:
            x = (x + velocity) % width
        shape.xs[t] = x


def _render(shapes: Sequence[_Shape], frames: int, height: int, width: int) -> np.ndarray:
    video = np.zeros((frames, 3, height, width), dtype=np.float32)
    for s in shapes:
        if s.kind == "square":
            mask = np.ones((s.size, s.size), dtype=bool)
        else:
            c = (s.size - 1) / 2.0
            yy, xx = np.mgrid[0:s.size, 0:s.size]
            mask = (yy - c) ** 2 + (xx - c) ** 2 <= (s.size / 2.0) ** 2
        rows = np.arange(s.y, s.y + s.size)
        for t in range(frames):
            if s.colours[t] is None:
                continue
            cols = (s.xs[t] + np.arange(s.size)) % width
            rgb = COLOURS[COLOUR_NAMES[s.colours[t]]]
            for ch in range(3):
                plane = video[t, ch]
                block = plane[np.ix_(rows, cols)]
                block[mask] = rgb[ch]
                plane[np.ix_(rows, cols)] = block
    return video


def _bucket(video: np.ndarray) -> int:
    digest = hashlib.blake2b(np.round(video * 255).astype(np.uint8).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 20


def _tokens(*words: str) -> list:
    return [VOCAB[w] for w in words]


# -- question generators: each builds shapes for a given answer ----------------------------------------------------

def _distinct_colours(rng: np.random.Generator, k: int, include: Optional[int] = None) -> list:
    """``k`` distinct colour indices in random order; ``include`` (if given) is among them."""
    if include is None:
        return [int(c) for c in rng.permutation(len(COLOUR_NAMES))[:k]]
    others = [int(c) for c in rng.permutation([c for c in range(len(COLOUR_NAMES)) if c != include])[:k - 1]]
    out = others + [include]
    return [out[i] for i in rng.permutation(k)]


def _moved_left(rng, answer: int, frames, height, width):
    n = int(rng.integers(2, 4))
    colours = _distinct_colours(rng, n, include=answer)
    lanes = rng.permutation(_N_LANES)[:n]
    shapes, velocities = [], {}
    for colour, lane in zip(colours, lanes):
        s = _new_shape(rng, int(lane), frames, height, width)
        speed = int(rng.integers(2, 4))
        velocity = -speed if colour == answer else (speed if rng.random() < 0.5 else 0)
        _set_motion(s, velocity, width)
        s.colours = [colour] * frames
        shapes.append(s)
        velocities[COLOUR_NAMES[colour]] = velocity
    meta = {"n_shapes": n, "velocities": velocities}
    return shapes, _tokens("which", "colour", "moved", "left", "?"), COLOUR_NAMES[answer], meta


def _appeared_first(rng, answer: int, frames, height, width):
    n = int(rng.integers(2, 4))
    colours = _distinct_colours(rng, n, include=answer)
    onsets = sorted(int(t) for t in rng.choice(np.arange(1, frames), size=n, replace=False))
    others = [c for c in colours if c != answer]
    order = [answer] + [others[i] for i in rng.permutation(len(others))]
    onset_of = dict(zip(order, onsets))
    lanes = rng.permutation(_N_LANES)[:n]
    shapes = []
    for colour, lane in zip(colours, lanes):
        s = _new_shape(rng, int(lane), frames, height, width)
        s.colours = [colour if t >= onset_of[colour] else None for t in range(frames)]
        shapes.append(s)
    meta = {"n_shapes": n, "onsets": {COLOUR_NAMES[c]: t for c, t in onset_of.items()}}
    return shapes, _tokens("which", "colour", "appeared", "first", "?"), COLOUR_NAMES[answer], meta


def _blink_frames(rng, count: int, frames: int) -> list:
    """``count`` non-adjacent frames in ``1 .. frames - 2`` (each one invisible frame = one blink)."""
    candidates = np.arange(1, frames - 1)
    while True:
        picked = sorted(int(t) for t in rng.choice(candidates, size=count, replace=False))
        if all(b - a >= 2 for a, b in zip(picked, picked[1:])):
            return picked


def _blink_count(rng, answer: int, frames, height, width):
    n = int(rng.integers(1, 4))
    colours = _distinct_colours(rng, n)
    target = colours[int(rng.integers(0, n))]
    lanes = rng.permutation(_N_LANES)[:n]
    shapes, blinks = [], {}
    for colour, lane in zip(colours, lanes):
        s = _new_shape(rng, int(lane), frames, height, width)
        count = answer if colour == target else int(rng.integers(0, len(BLINK_ANSWERS)))
        off = set(_blink_frames(rng, count, frames))
        s.colours = [None if t in off else colour for t in range(frames)]
        blinks[COLOUR_NAMES[colour]] = sorted(off)
        shapes.append(s)
    meta = {"n_shapes": n, "target": COLOUR_NAMES[target], "blink_frames": blinks}
    tokens = _tokens("how", "many", "times", "did", "the", COLOUR_NAMES[target], "shape", "blink", "?")
    return shapes, tokens, BLINK_ANSWERS[answer], meta


def _color_at_end(rng, answer: int, frames, height, width):
    n = int(rng.integers(1, 4))
    colours = _distinct_colours(rng, n)              # independent of the answer: the first frame says nothing
    survivor = int(rng.integers(0, n))
    lanes = rng.permutation(_N_LANES)[:n]
    shapes, meta = [], {"n_shapes": n, "initial": [COLOUR_NAMES[c] for c in colours]}
    for i, (colour, lane) in enumerate(zip(colours, lanes)):
        s = _new_shape(rng, int(lane), frames, height, width)
        if i == survivor:
            change = int(rng.integers(1, frames)) if colour != answer else frames
            s.colours = [colour if t < change else answer for t in range(frames)]
            meta["change_frame"] = change if change < frames else None
        else:
            gone = int(rng.integers(1, frames))
            s.colours = [colour if t < gone else None for t in range(frames)]
        shapes.append(s)
    return shapes, _tokens("which", "colour", "was", "present", "at", "the", "end", "?"), COLOUR_NAMES[answer], meta


_GENERATORS = {
    QuestionType.MOVED_LEFT: _moved_left,
    QuestionType.APPEARED_FIRST: _appeared_first,
    QuestionType.BLINK_COUNT: _blink_count,
    QuestionType.COLOR_AT_END: _color_at_end,
}


def _rng(seed: int, task: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(task, _SPLIT_CODE[split], index)))


def _draw_in_split(build, rng, split: str, frames: int, height: int, width: int):
    """Redraw ``build(rng)`` until the rendered clip's hash bucket belongs to ``split``."""
    for attempt in range(_MAX_ATTEMPTS):
        shapes, *rest = build(rng)
        video = _render(shapes, frames, height, width)
        bucket = _bucket(video)
        if bucket in _SPLIT_BUCKETS[split]:
            return video, shapes, rest, {"bucket": bucket, "attempt": attempt}
    raise RuntimeError(f"no clip fell in split {split!r} after {_MAX_ATTEMPTS} draws")  # practically unreachable


def split_of(video: torch.Tensor) -> str:
    """The split a clip belongs to (a function of its pixels): "train", "val" or "test"."""
    bucket = _bucket(np.asarray(video, dtype=np.float32))
    return next(name for name, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def make_split(name: str, n: int, seed: int = 0, frames: int = 8, height: int = 32, width: int = 32,
               question_types: Optional[Sequence] = None) -> list:
    """``n`` :class:`VideoQASample` of split ``name`` ("train", "val" or "test"); same arguments -> same samples.

    Question types cycle in the order of ``question_types`` (default: all four); within each type the answers cycle
    through its vocabulary, so per-type and per-answer counts differ by at most one. ``frames`` must be >= 7 (three
    blinks need six frames between a visible first and last frame).
    """
    _check_common(name, n, seed, frames, height, width, min_frames=7)
    qtypes = list(QuestionType) if question_types is None else [_question_type(q) for q in question_types]
    if not qtypes:
        raise ConfigError("question_types must name at least one of " + ", ".join(q.value for q in QuestionType))
    seen = {q: 0 for q in qtypes}
    samples = []
    for i in range(n):
        qtype = qtypes[i % len(qtypes)]
        answers = ANSWERS[qtype]
        answer = seen[qtype] % len(answers)
        seen[qtype] += 1
        gen = _GENERATORS[qtype]
        video, _, (tokens, answer_str, meta), extra = _draw_in_split(
            lambda r: gen(r, answer, frames, height, width), _rng(seed, 0, name, i), name, frames, height, width)
        meta.update(extra, index=i, seed=seed, split=name)
        samples.append(VideoQASample(torch.from_numpy(video), qtype, tokens, answer_str, VOCAB[answer_str], meta))
    return samples


def _question_type(value) -> QuestionType:
    try:
        return QuestionType(value)
    except ValueError:
        raise ConfigError(f"question type must be one of {', '.join(q.value for q in QuestionType)}, "
                          f"got {value!r}") from None


# -- grounding -------------------------------------------------------------------------------------------------------

def _grounding_clip(rng, query: GroundingQuery, frames: int, height: int, width: int):
    n = int(rng.integers(1, 4))
    colours = _distinct_colours(rng, n)
    lanes = rng.permutation(_N_LANES)[:n]
    shapes, spans = [], []
    for colour, lane in zip(colours, lanes):
        s = _new_shape(rng, int(lane), frames, height, width)
        start = int(rng.integers(0, frames - 1))
        stop = int(rng.integers(start + 1, frames))
        if query is GroundingQuery.APPEAR:
            s.colours = [colour if start <= t <= stop else None for t in range(frames)]
        else:                                       # visible throughout, moving only from frame start to stop
            speed = int(rng.integers(2, 4)) * (1 if rng.random() < 0.5 else -1)
            _set_motion(s, speed, width, start, stop)
            s.colours = [colour] * frames
        shapes.append(s)
        spans.append((start, stop))
    target = int(rng.integers(0, n))
    return shapes, colours[target], spans[target], {"n_shapes": n}


def make_grounding_split(name: str, n: int, seed: int = 0, fps: float = 1.0, frames: int = 8, height: int = 32,
                         width: int = 32) -> list:
    """``n`` :class:`GroundingSample` of split ``name``: queries alternate "appear" / "move".

    For "appear" the target shape is visible exactly during its span (others have their own spans); for "move" it is
    visible throughout and moves (2-3 pixels per frame, wrapping) from ``start_frame`` to ``end_frame``.
    """
    _check_common(name, n, seed, frames, height, width, min_frames=2)
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not math.isfinite(fps) or fps <= 0:
        raise ConfigError(f"fps must be a positive finite number, got {fps!r}")
    queries = list(GroundingQuery)
    samples = []
    for i in range(n):
        query = queries[i % len(queries)]
        video, _, (colour, (start, stop), meta), extra = _draw_in_split(
            lambda r: _grounding_clip(r, query, frames, height, width), _rng(seed, 1, name, i), name, frames,
            height, width)
        meta.update(extra, index=i, seed=seed, split=name)
        word = COLOUR_NAMES[colour]
        tokens = _tokens("when", "does", "the", word, "shape", query.value, "?")
        samples.append(GroundingSample(torch.from_numpy(video), query, word, tokens, (start, stop),
                                       (start / fps, (stop + 1) / fps), float(fps), meta))
    return samples


def grounding_metrics(pred_spans: Sequence, samples: Sequence) -> dict:
    """R@1 at IoU 0.3/0.5/0.7 and mIoU of ``pred_spans`` (seconds; one per sample) against ``samples``' spans."""
    return charades_sta_metrics(pred_spans, [s.span for s in samples])


# -- model inputs ----------------------------------------------------------------------------------------------------

def video_token_count(frames: int, image_size: int, patch_size: int) -> int:
    """LLaVA-OneVision's video placeholder count: ``frames * ceil(grid / 2) ** 2 + 1`` (2x2 pooling + newline)."""
    _check_int("frames", frames, 1)
    _check_int("image_size", image_size, 1)
    _check_int("patch_size", patch_size, 1)
    if image_size % patch_size:
        raise ConfigError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    return frames * math.ceil(image_size // patch_size / 2) ** 2 + 1


def to_model_inputs(samples: Sequence, video_token_id: int = 501, tokens_per_video: Optional[int] = None,
                    patch_size: int = 8, normalize: bool = True) -> dict:
    """A batch for the LLaVA-OneVision model: ``input_ids``, ``attention_mask``, ``pixel_values_videos``.

    Each row is ``[<bos>, video placeholders..., question tokens...]``, right-padded with ``PAD_ID`` (the mask is 0
    there), so a row's logits do not depend on the rest of the batch; read the answer at
    :func:`answer_positions`. ``tokens_per_video`` defaults to :func:`video_token_count` of the clips' shape and
    ``patch_size``. ``normalize`` maps pixels to ``[-1, 1]`` as SigLIP's processor does (mean 0.5, std 0.5).
    Works for :class:`VideoQASample` and :class:`GroundingSample` alike.
    """
    if not samples:
        raise ConfigError("samples must be a non-empty sequence of VideoQASample or GroundingSample")
    shapes = {tuple(s.video.shape) for s in samples}
    if len(shapes) != 1:
        raise ConfigError(f"samples must share one clip shape, got {sorted(shapes)}")
    frames, _, height, width = shapes.pop()
    if height != width:
        raise ConfigError(f"clips must be square for the vision tower, got {height}x{width}")
    n_video = video_token_count(frames, height, patch_size) if tokens_per_video is None else tokens_per_video
    _check_int("tokens_per_video", n_video, 1)
    _check_int("video_token_id", video_token_id, 0)
    rows = [[BOS_ID] + [video_token_id] * n_video + list(s.question_tokens) for s in samples]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, :len(r)] = 1
    video = torch.stack([s.video for s in samples])
    if normalize:
        video = (video - 0.5) / 0.5
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values_videos": video}


def answer_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of each row's last real token (where the answer's logits are read)."""
    return attention_mask.sum(dim=1) - 1

"""vopt.eval.scoring: video-QA accuracy with bootstrap CIs and two-step grounding decode.

The oracles read the *pixels* of ``pixel_values_videos`` (un-normalised with ``x * 0.5 + 0.5``) and the question
tokens of ``input_ids``: they know nothing of the generator, so a perfect score checks the whole batching /
answer-position / scoring path as well as the task's answers.
"""
import json
import types

import numpy as np
import pytest
import torch

import vopt.eval
from vopt import zoo
from vopt.errors import ConfigError
from vopt.eval import scoring
from vopt.eval import video_task as vt
from vopt.eval.video_task import QuestionType as Q

V = 64                       # the oracles' vocabulary: every task word id is below it
VIDEO_TOKEN = 501
ID = vt.VOCAB


@pytest.fixture(scope="module")
def qa32():
    return vt.make_split("test", 32, seed=0)


@pytest.fixture(scope="module")
def ground16():
    return vt.make_grounding_split("test", 16, seed=0, fps=2.0)


@pytest.fixture(scope="module")
def tiny():
    return zoo.build("llava-onevision", pretrained=False).model


# -- pixel oracles ----------------------------------------------------------------------------------------------------

def colour_masks(video: torch.Tensor) -> dict:
    """Colour name -> [T, H, W] bool mask of pixels of that colour (``video`` in [0, 1])."""
    v = video.numpy()
    return {name: np.all(np.abs(v - np.asarray(rgb, dtype=np.float32)[None, :, None, None]) < 1e-3, axis=1)
            for name, rgb in vt.COLOURS.items()}


def visible(mask) -> np.ndarray:
    return mask.any(axis=(1, 2))


def drift(mask) -> int:
    """Summed circular x-shift that best aligns the mask with the next frame."""
    total = 0
    for a, b in zip(mask[:-1], mask[1:]):
        overlaps = {dx: (np.roll(a, dx, axis=1) & b).sum() for dx in range(-3, 4)}
        total += max(overlaps, key=overlaps.get)
    return total


def qa_answer(video, question: list) -> str:
    m = colour_masks(video)
    last = video.shape[0] - 1
    on_screen = lambda t: [c for c in m if m[c][t].any()]
    if ID["moved"] in question:
        return next(c for c in on_screen(0) if drift(m[c]) < 0)
    if ID["appeared"] in question:
        return min(on_screen(last), key=lambda c: int(np.argmax(visible(m[c]))))
    if ID["blink"] in question:
        target = next(c for c in vt.COLOURS if ID[c] in question)
        seen = visible(m[target])
        return str(int(np.sum(seen[:-1] & ~seen[1:])))
    return on_screen(last)[0]


def true_frames(video, question: list) -> tuple:
    mask = colour_masks(video)[next(c for c in vt.COLOURS if ID[c] in question)]
    if ID["appear"] in question:
        shown = np.nonzero(visible(mask))[0]
        return int(shown.min()), int(shown.max())
    moved = np.nonzero([not np.array_equal(a, b) for a, b in zip(mask[:-1], mask[1:])])[0] + 1
    return int(moved.min() - 1), int(moved.max())


def rows(input_ids, attention_mask, pixel_values_videos):
    """Per row: (position of the last real token, its tokens without <bos> / video placeholders, clip in [0, 1])."""
    for b in range(input_ids.shape[0]):
        pos = int(attention_mask[b].sum()) - 1
        tokens = [t for t in input_ids[b, :pos + 1].tolist() if t not in (vt.BOS_ID, VIDEO_TOKEN)]
        yield b, pos, tokens, pixel_values_videos[b] * 0.5 + 0.5


class QAOracle(torch.nn.Module):
    """One-hot logits on the answer computed from the pixels, at the answer position (elsewhere zero)."""

    def forward(self, input_ids, attention_mask, pixel_values_videos):
        logits = torch.zeros(*input_ids.shape, V)
        for b, pos, tokens, video in rows(input_ids, attention_mask, pixel_values_videos):
            logits[b, pos, ID[qa_answer(video, tokens)]] = 1.0
        return types.SimpleNamespace(logits=logits)


class AlwaysRed(torch.nn.Module):
    def forward(self, input_ids, attention_mask, pixel_values_videos):
        logits = torch.zeros(*input_ids.shape, V)
        logits[..., ID["red"]] = 1.0
        return logits                                   # a bare tensor is accepted too


class GroundingOracle(torch.nn.Module):
    """Step 1 (last token "?"): the true start frame's word; step 2 (last token a frame word): the end frame's."""

    def forward(self, input_ids, attention_mask, pixel_values_videos):
        logits = torch.zeros(*input_ids.shape, V)
        for b, pos, tokens, video in rows(input_ids, attention_mask, pixel_values_videos):
            start, end = true_frames(video, tokens)
            frame = start if tokens[-1] == ID["?"] else end
            logits[b, pos, ID[vt.FRAME_WORDS[frame]]] = 1.0
        return types.SimpleNamespace(logits=logits)


class FixedFrames(torch.nn.Module):
    """Says ``first`` then ``second`` whatever the clip; a non-frame word ("red") always scores highest."""

    def __init__(self, first: int, second: int):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, input_ids, attention_mask, pixel_values_videos):
        logits = torch.zeros(*input_ids.shape, V)
        logits[..., ID["red"]] = 10.0
        for b, pos, tokens, _ in rows(input_ids, attention_mask, pixel_values_videos):
            frame = self.first if tokens[-1] == ID["?"] else self.second
            logits[b, pos, ID[vt.FRAME_WORDS[frame]]] = 1.0
        return types.SimpleNamespace(logits=logits)


# -- video QA ---------------------------------------------------------------------------------------------------------

def test_pixel_oracle_scores_one_on_every_type(qa32):
    result = vopt.eval.video_qa(QAOracle(), samples=qa32, batch_size=5)    # 7 batches, the last one short
    assert result.accuracy == 1.0 and result.ci == (1.0, 1.0) and result.n == 32
    assert set(result.per_type) == {q.value for q in Q}
    assert all(s.accuracy == 1.0 and s.n == 8 and s.chance == 0.25 for s in result.per_type.values())
    assert result.predictions == [s.answer for s in qa32] and all(result.correct)
    assert result.logits.shape == (32, V) and result.logits.dtype == torch.float32


def test_always_red_scores_the_fraction_of_red_answers(qa32):
    result = vopt.eval.video_qa(AlwaysRed(), samples=qa32)
    for q in Q:
        answers = [s.answer for s in qa32 if s.question_type is q]
        assert result.per_type[q.value].accuracy == answers.count("red") / len(answers)
    assert result.accuracy == sum(s.answer == "red" for s in qa32) / 32
    assert result.per_type["blink_count"].accuracy == 0.0 and set(result.predictions) == {"red"}


def test_bootstrap_ci_contains_accuracy_is_deterministic_and_shrinks_with_n():
    small = vopt.eval.video_qa(AlwaysRed(), n=8, seed=1)
    large = vopt.eval.video_qa(AlwaysRed(), n=32, seed=1)
    for r in (small, large):
        assert r.ci[0] <= r.accuracy <= r.ci[1]
        assert all(s.ci[0] <= s.accuracy <= s.ci[1] for s in r.per_type.values())
    again = vopt.eval.video_qa(AlwaysRed(), n=32, seed=1)
    assert again.ci == large.ci and again.to_dict() == large.to_dict()
    assert large.ci[1] - large.ci[0] < small.ci[1] - small.ci[0]
    narrower = vopt.eval.video_qa(AlwaysRed(), n=32, seed=1, confidence=0.5)
    assert narrower.ci[1] - narrower.ci[0] < large.ci[1] - large.ci[0]
    none = vopt.eval.video_qa(AlwaysRed(), n=8, seed=1, bootstrap=0)
    assert none.ci == (none.accuracy, none.accuracy)


def test_bootstrap_ci_matches_normal_approximation():
    values = np.r_[np.ones(300), np.zeros(700)]
    lo, hi = scoring.bootstrap_ci(values, bootstrap=2000, seed=0)
    half = 1.96 * np.sqrt(0.3 * 0.7 / 1000)          # tolerance: bootstrap noise with 2000 resamples, ~0.003
    assert abs(lo - (0.3 - half)) < 0.006 and abs(hi - (0.3 + half)) < 0.006


def test_tiny_model_logits_match_direct_forward_and_mode_is_restored(tiny):
    samples = vt.make_split("val", 8, seed=2)
    tiny.train()
    try:
        result = vopt.eval.video_qa(tiny, samples=samples, batch_size=3)
        assert tiny.training and all(m.training for m in tiny.modules())
    finally:
        tiny.eval()
    with torch.no_grad():
        inputs = vt.to_model_inputs(samples)
        direct = tiny(**inputs).logits
    expected = direct[torch.arange(8), vt.answer_positions(inputs["attention_mask"])]
    torch.testing.assert_close(result.logits, expected, atol=1e-5, rtol=0)
    assert result.predictions == [vt.ID_TO_WORD.get(i, f"<id {i}>") for i in expected.argmax(-1).tolist()]
    assert "question type" in result.table() and "chance" in result.table()
    data = json.loads(json.dumps(result.to_dict()))
    assert "logits" not in data and data["n"] == 8 and set(data["per_type"]) == {q.value for q in Q}


# -- grounding --------------------------------------------------------------------------------------------------------

def test_grounding_oracle_is_perfect(ground16):
    result = vopt.eval.grounding(GroundingOracle(), samples=ground16, batch_size=6)
    assert result.metrics == {"R@1,IoU=0.3": 1.0, "R@1,IoU=0.5": 1.0, "R@1,IoU=0.7": 1.0, "mIoU": 1.0}
    assert result.miou_ci == (1.0, 1.0) and result.n == 16
    assert result.frames == [g.frames for g in ground16] and result.spans == [g.span for g in ground16]


def test_grounding_fixed_whole_clip_span_gives_computable_iou(ground16):
    result = vopt.eval.grounding(FixedFrames(0, 7), samples=ground16)
    assert result.spans == [(0.0, 4.0)] * 16                            # fps 2: 8 frames are 4 seconds
    ious = [(g.frames[1] - g.frames[0] + 1) / 8 for g in ground16]       # the ground truth lies inside the clip
    assert result.ious == pytest.approx(ious)
    assert result.metrics["mIoU"] == pytest.approx(np.mean(ious))
    assert result.metrics["R@1,IoU=0.5"] == pytest.approx(np.mean([i >= 0.5 for i in ious]))
    assert result.miou_ci[0] <= result.metrics["mIoU"] <= result.miou_ci[1]


def test_grounding_swaps_end_before_start_and_ignores_non_frame_words():
    result = vopt.eval.grounding(FixedFrames(6, 2), n=4, seed=1)       # fps 1
    assert result.frames == [(2, 6)] * 4 and result.spans == [(2.0, 7.0)] * 4


def test_grounding_runs_on_tiny_model(tiny):
    result = vopt.eval.grounding(tiny, n=4, fps=2.0)
    for (s, e), (a, b) in zip(result.frames, result.spans):
        assert 0 <= s <= e <= 7 and (a, b) == (s / 2.0, (e + 1) / 2.0)
    assert "mIoU" in result.table() and json.dumps(result.to_dict())


# -- arguments --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    ({"n": 0}, "n"), ({"batch_size": 0}, "batch_size"), ({"confidence": 1.0}, "confidence"),
    ({"confidence": 0}, "confidence"), ({"bootstrap": -1}, "bootstrap"), ({"split": "dev"}, "split"),
    ({"seed": -1}, "seed"), ({"samples": []}, "samples"), ({"frames": 4}, "frames"),
])
def test_video_qa_argument_errors(kwargs, name):
    with pytest.raises(ConfigError, match=rf"^{name}\b"):
        vopt.eval.video_qa(AlwaysRed(), **kwargs)


@pytest.mark.parametrize("kwargs, name", [
    ({"n": 0}, "n"), ({"frames": 9}, "frames"), ({"fps": 0}, "fps"), ({"split": "dev"}, "split"),
    ({"samples": vt.make_split("test", 1)}, "samples"), ({"batch_size": 0}, "batch_size"),
])
def test_grounding_argument_errors(kwargs, name):
    with pytest.raises(ConfigError, match=rf"^{name}\b"):
        vopt.eval.grounding(AlwaysRed(), **kwargs)


def test_bad_model_output_and_non_callable():
    with pytest.raises(ConfigError, match="^model"):
        vopt.eval.video_qa("model", n=1)
    with pytest.raises(TypeError, match="logits"):
        vopt.eval.video_qa(lambda **kw: {"scores": 1}, n=1)

"""vopt.eval.video_task: determinism, disjoint balanced splits, answers recomputed from pixels, no first-frame
shortcut, model inputs the tiny LLaVA-OneVision accepts, and valid grounding spans."""
import hashlib
from collections import Counter

import numpy as np
import pytest
import torch

from vopt import zoo
from vopt.errors import ConfigError
from vopt.eval import video_task as vt
from vopt.eval.video_task import QuestionType as Q

N = 400          # 100 per question type: a chance-level accuracy has a standard deviation of about 0.05


@pytest.fixture(scope="module")
def test_split():
    return vt.make_split("test", N, seed=0)


@pytest.fixture(scope="module")
def grounding():
    return vt.make_grounding_split("val", 60, seed=3, fps=2.0)


# -- a pixel-based oracle, independent of the generator's internals -----------------------------------------------

def colour_masks(video) -> dict:
    """Colour name -> [T, H, W] bool mask of pixels of exactly that colour."""
    v = video.numpy()
    return {name: np.all(v == np.asarray(rgb, dtype=np.float32)[None, :, None, None], axis=1)
            for name, rgb in vt.COLOURS.items()}


def present(masks: dict, t: int) -> list:
    return [c for c, m in masks.items() if m[t].any()]


def horizontal_drift(mask) -> int:
    """Sum over consecutive frames of the circular x-shift that best aligns a shape's mask with the next frame."""
    total = 0
    for a, b in zip(mask[:-1], mask[1:]):
        overlaps = {dx: (np.roll(a, dx, axis=1) & b).sum() for dx in range(-3, 4)}
        total += max(overlaps, key=overlaps.get)
    return total


def oracle(sample) -> str:
    m = colour_masks(sample.video)
    T = sample.video.shape[0]
    if sample.question_type is Q.MOVED_LEFT:
        left = [c for c in present(m, 0) if horizontal_drift(m[c]) < 0]
        return left[0] if len(left) == 1 else "?"
    if sample.question_type is Q.APPEARED_FIRST:
        onset = {c: int(np.argmax(m[c].any(axis=(1, 2)))) for c in present(m, T - 1)}
        return min(onset, key=onset.get)
    if sample.question_type is Q.BLINK_COUNT:
        target = next(vt.ID_TO_WORD[i] for i in sample.question_tokens if vt.ID_TO_WORD[i] in vt.COLOURS)
        visible = m[target].any(axis=(1, 2))
        return str(int(np.sum(visible[:-1] & ~visible[1:])))
    end = present(m, T - 1)
    return end[0] if len(end) == 1 else "?"


def first_frame_guesses(sample) -> dict:
    """Heuristics that see only the first frame: name -> predicted answer."""
    m = colour_masks(sample.video)
    cols = present(m, 0)
    if not cols:
        return {"constant": vt.ANSWERS[sample.question_type][0]}
    left = {c: np.nonzero(m[c][0].any(axis=0))[0].min() for c in cols}
    top = {c: np.nonzero(m[c][0].any(axis=1))[0].min() for c in cols}
    area = {c: m[c][0].sum() for c in cols}
    guesses = {"leftmost": min(left, key=left.get), "rightmost": max(left, key=left.get),
               "topmost": min(top, key=top.get), "largest": max(area, key=area.get)}
    if sample.question_type is Q.BLINK_COUNT:
        guesses = {"n_shapes-1": str(len(cols) - 1), "n_shapes": str(len(cols) % 4), "constant": "0"}
    return guesses


# -- determinism, ranges, vocabulary --------------------------------------------------------------------------------

def test_same_seed_same_samples_and_other_seed_differs():
    a, b, c = (vt.make_split("val", 12, seed=s) for s in (5, 5, 6))
    for x, y in zip(a, b):
        assert torch.equal(x.video, y.video) and x.question_tokens == y.question_tokens and x.answer == y.answer
    assert any(not torch.equal(x.video, z.video) for x, z in zip(a, c))
    g1, g2 = vt.make_grounding_split("train", 6, seed=1), vt.make_grounding_split("train", 6, seed=1)
    assert all(torch.equal(x.video, y.video) and x.span == y.span for x, y in zip(g1, g2))


def test_shapes_ranges_and_vocabulary(test_split):
    for s in test_split[:40]:
        assert s.video.shape == (8, 3, 32, 32) and s.video.dtype == torch.float32
        assert 0.0 <= s.video.min() and s.video.max() <= 1.0
        assert s.answer in vt.ANSWERS[s.question_type] and vt.VOCAB[s.answer] == s.answer_id
        assert all(0 <= i < 500 for i in s.question_tokens)
    assert max(vt.VOCAB.values()) < 500 and len(set(vt.VOCAB.values())) == len(vt.VOCAB)


def test_splits_are_disjoint_and_content_defined():
    def digests(samples):
        return {hashlib.sha1(s.video.numpy().tobytes()).hexdigest() for s in samples}

    splits = {name: vt.make_split(name, 80, seed=0) for name in vt.SPLITS}
    hashes = {name: digests(samples) for name, samples in splits.items()}
    assert not (hashes["train"] & hashes["val"]) and not (hashes["train"] & hashes["test"])
    assert not (hashes["val"] & hashes["test"])
    assert all(vt.split_of(s.video) == name for name, samples in splits.items() for s in samples)


def test_balance_per_type_and_answer(test_split):
    # tolerance: exact up to one sample (types cycle, answers cycle within a type)
    types = Counter(s.question_type for s in test_split)
    assert set(types) == set(Q) and max(types.values()) - min(types.values()) <= 1
    for q in Q:
        answers = Counter(s.answer for s in test_split if s.question_type is q)
        assert set(answers) == set(vt.ANSWERS[q]) and max(answers.values()) - min(answers.values()) <= 1


# -- answers follow from the pixels; the first frame alone is at chance ---------------------------------------------

def test_answers_match_pixel_oracle(test_split):
    wrong = [(i, s.question_type.value, s.answer, oracle(s)) for i, s in enumerate(test_split) if oracle(s) != s.answer]
    assert not wrong, wrong[:5]


def test_first_frame_cannot_beat_chance(test_split):
    for q in (Q.MOVED_LEFT, Q.COLOR_AT_END, Q.BLINK_COUNT, Q.APPEARED_FIRST):
        samples = [s for s in test_split if s.question_type is q]
        if q is Q.MOVED_LEFT:   # any guess among the colours on screen: 1 / number of shapes
            chance = np.mean([1.0 / len(present(colour_masks(s.video), 0)) for s in samples])
        else:
            chance = 1.0 / len(vt.ANSWERS[q])
        for name in first_frame_guesses(samples[0]):
            acc = np.mean([first_frame_guesses(s).get(name) == s.answer for s in samples])
            assert acc <= chance + 0.15, (q.value, name, acc, chance)
    assert all(s.video[0].max() == 0 for s in test_split if s.question_type is Q.APPEARED_FIRST)


# -- model inputs -----------------------------------------------------------------------------------------------------

def test_to_model_inputs_feeds_tiny_llava_onevision(test_split):
    batch = test_split[:4]                        # four question types: rows of different lengths
    inputs = vt.to_model_inputs(batch)
    n_video = vt.video_token_count(8, 32, 8)
    assert n_video == 8 * 4 + 1
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert inputs["pixel_values_videos"].shape == (4, 8, 3, 32, 32)
    assert inputs["pixel_values_videos"].min() >= -1 and inputs["pixel_values_videos"].max() <= 1
    assert ((ids == 501).sum(dim=1) == n_video).all() and not (ids == 500).any()
    assert mask.sum(dim=1).tolist() == [1 + n_video + len(s.question_tokens) for s in batch]
    assert (ids[mask == 0] == vt.PAD_ID).all()

    model = zoo.build("llava-onevision").model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        alone = model(**vt.to_model_inputs(batch[:1])).logits
    assert logits.shape == (4, ids.shape[1], 512)
    pos = vt.answer_positions(mask)
    assert torch.allclose(logits[0, pos[0]], alone[0, -1], atol=1e-5)   # right padding: rows do not interact


def test_invalid_arguments_raise_typed_errors():
    with pytest.raises(ConfigError, match="train, val, test"):
        vt.make_split("dev", 4)
    with pytest.raises(ConfigError, match="frames"):
        vt.make_split("train", 4, frames=4)
    with pytest.raises(ConfigError, match="moved_left"):
        vt.make_split("train", 4, question_types=["count"])
    with pytest.raises(ConfigError, match="fps"):
        vt.make_grounding_split("train", 4, fps=0)
    with pytest.raises(ConfigError, match="non-empty"):
        vt.to_model_inputs([])
    with pytest.raises(ConfigError, match="patch_size"):
        vt.video_token_count(8, 32, 7)


# -- grounding ------------------------------------------------------------------------------------------------------

def test_grounding_spans_valid_and_match_pixels(grounding):
    assert Counter(g.query for g in grounding) == {vt.GroundingQuery.APPEAR: 30, vt.GroundingQuery.MOVE: 30}
    for g in grounding:
        T = g.video.shape[0]
        start, end = g.frames
        assert 0 <= start < end <= T - 1
        assert g.span == (start / 2.0, (end + 1) / 2.0) and 0 <= g.span[0] < g.span[1] <= T / 2.0
        assert all(0 <= i < 500 for i in g.question_tokens) and g.colour in g.question
        m = colour_masks(g.video)[g.colour]
        if g.query is vt.GroundingQuery.APPEAR:
            visible = np.nonzero(m.any(axis=(1, 2)))[0]
            assert (visible.min(), visible.max()) == (start, end) and len(visible) == end - start + 1
        else:
            moved = np.nonzero([not np.array_equal(a, b) for a, b in zip(m[:-1], m[1:])])[0] + 1
            assert (moved.min() - 1, moved.max()) == (start, end)


def test_grounding_metrics_reuse_charades_metrics(grounding):
    perfect = vt.grounding_metrics([g.span for g in grounding], grounding)
    assert perfect == {"R@1,IoU=0.3": 1.0, "R@1,IoU=0.5": 1.0, "R@1,IoU=0.7": 1.0, "mIoU": 1.0}
    whole = vt.grounding_metrics([(0.0, g.video.shape[0] / g.fps) for g in grounding], grounding)
    assert whole["mIoU"] < 0.8 and whole["R@1,IoU=0.7"] < 1.0


def test_64x64_clips_keep_pixel_scale_lanes_and_answers():
    """The tiny64 model's clips: the same task at H=W=64. Shapes keep their 5-8 px size and 2-3 px/frame motion (a
    quarter of a 16-px pooled token per step at either size), the three lanes span the taller frame, the answers
    still follow from the pixels, and most 16x16 pooled cells are background (the redundancy token merging needs)."""
    samples = vt.make_split("val", 80, seed=0, height=64, width=64)
    rows_hit = np.zeros(64, dtype=bool)
    for s in samples:
        assert s.video.shape == (8, 3, 64, 64) and s.video.dtype == torch.float32
        assert oracle(s) == s.answer, (s.question_type.value, s.answer, oracle(s))
        masks = colour_masks(s.video)
        rows_hit |= s.video.sum(dim=(0, 1, 3)).numpy() > 0
        if s.question_type is Q.MOVED_LEFT:
            assert set(s.meta["velocities"].values()) <= {-3, -2, 0, 2, 3}
        if s.question_type in (Q.MOVED_LEFT, Q.APPEARED_FIRST):       # distinct colours: one shape per colour
            for m in masks.values():
                for t in range(8):
                    if m[t].any():
                        assert 5 <= np.ptp(np.nonzero(m[t].any(axis=1))[0]) + 1 <= 8
    lane = 64 // 3
    assert all(rows_hit[k * lane:(k + 1) * lane].any() for k in range(3)) and not rows_hit[3 * lane:].any()
    cells = torch.stack([s.video for s in samples]).sum(dim=2).reshape(-1, 4, 16, 4, 16).amax(dim=(2, 4))
    assert (cells > 0).float().mean() < 0.3
    g = vt.make_grounding_split("val", 8, seed=0, height=64, width=64)
    assert all(x.video.shape == (8, 3, 64, 64) and max(x.frames) < 8 for x in g)
    inputs = vt.to_model_inputs(samples[:2])
    assert vt.video_token_count(8, 64, 8) == 8 * 16 + 1
    assert ((inputs["input_ids"] == 501).sum(dim=1) == 8 * 16 + 1).all()

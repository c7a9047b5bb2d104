"""The zoo's trained tiny video model and the harness that uses it: would a pass that broke answers be caught?

Thresholds come from ``vopt/zoo/weights/llava-onevision-tiny.json`` (the training run's held-out numbers) minus a
margin: a 200-clip split has a 95 % bootstrap CI of about +-3 points overall and +-6 per question type, so the
bounds below hold for any healthy model and fail for a model that lost what it learned.
"""
import pytest
import torch

import vopt
import vopt.eval
from vopt import zoo
from vopt.errors import ConfigError
from vopt.pass_protocol import Match, Pass, PassKind, PassResult

N_QA = 200
N_GROUNDING = 100


@pytest.fixture(scope="module")
def trained():
    return zoo.build(zoo.DEFAULT_MODEL).model


@pytest.fixture(scope="module")
def baseline_qa(trained):
    return vopt.eval.video_qa(trained, n=N_QA)


def test_default_model_ships_trained_weights(trained):
    random = zoo.build(zoo.DEFAULT_MODEL, pretrained=False).model
    a, b = trained.state_dict(), random.state_dict()
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert zoo.get(zoo.DEFAULT_MODEL).weights is not None


def test_pretrained_true_without_weights_is_an_error():
    with pytest.raises(ConfigError, match="pretrained=True"):
        zoo.build("llama", pretrained=True)
    with pytest.raises(ConfigError, match="pretrained=True"):
        zoo.build(zoo.DEFAULT_MODEL, size="full", pretrained=True)


def test_build_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.build("llama")
    assert torch.equal(torch.rand(3), expected)


def test_trained_model_answers_held_out_questions(baseline_qa):
    # Full-split accuracy is in the README (tools/eval_video_qa.py --full); 0.85 leaves room for the CI of 200 clips.
    assert baseline_qa.accuracy >= 0.85, baseline_qa.table()
    for name, score in baseline_qa.per_type.items():
        # every type clearly above chance (1/4): the harness measures temporal reasoning, not a prior. The weakest
        # type (blink_count, ~0.72 on 250 clips) has a 95 % CI of about +-0.12 at 50 clips: 0.55 keeps it safe.
        assert score.accuracy >= score.chance + 0.30, (name, baseline_qa.table())


def test_random_weights_score_near_chance():
    random = zoo.build(zoo.DEFAULT_MODEL, pretrained=False).model
    result = vopt.eval.video_qa(random, n=N_QA, bootstrap=0)
    assert result.accuracy <= 0.4  # chance is 0.25 (and an untrained model mostly emits non-answer words: lower)


def test_trained_model_grounds_better_than_the_whole_clip(trained):
    result = vopt.eval.grounding(trained, n=N_GROUNDING, bootstrap=0)
    # Predicting the whole clip (frames 0..7) scores mIoU ~0.45 on this split (mean span length / 8); the trained
    # model must beat it clearly.
    whole = sum((s.frames[1] - s.frames[0] + 1) / 8 for s in vopt.eval.video_task.make_grounding_split("test", N_GROUNDING))
    assert result.metrics["mIoU"] >= whole / N_GROUNDING + 0.15, result.table()


class _UniformAttention(Pass):
    """A broken "optimization": every SDPA of the language model attends uniformly (scale ~0)."""

    name, kind = "test_uniform_attention", PassKind.GRAPH

    def run_graph(self, graph, ctx):
        result = PassResult(self.name, graph.stage)
        if graph.stage != "language_model":
            return result
        for node in graph.gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.aten.scaled_dot_product_attention.default:
                node.kwargs = {**node.kwargs, "scale": 1e-9}
                result.matches.append(Match(f"{graph.stage}:{node.name}", "sdpa scale -> 1e-9", rewritten=True))
        return result


def test_exact_pass_keeps_every_answer(trained, baseline_qa):
    optimized = vopt.optimize(trained, passes=["sdpa"])
    cmp = vopt.eval.compare(trained, optimized, n=N_QA)
    assert cmp.agreement == 1.0 and cmp.accuracy_delta == 0.0
    assert cmp.logit_cos_min >= 0.99999 and cmp.kl_max <= 1e-6
    assert cmp.accuracy_baseline == baseline_qa.accuracy


def test_corrupted_attention_is_caught(trained, baseline_qa):
    optimized = vopt.optimize(trained, passes=[_UniformAttention()])
    cmp = vopt.eval.compare(trained, optimized, n=N_QA)  # stages are captured (and corrupted) on the first call
    rewritten = optimized.report.rewritten("test_uniform_attention")
    assert len(rewritten) >= 4 and len({m.where for m in rewritten}) == 4  # 4 decoder layers (per specialization)
    assert cmp.accuracy_delta <= -0.3, cmp.table()
    assert cmp.agreement <= 0.6 and cmp.kl_mean >= 0.5, cmp.table()
    # the damage is attributed to the language model, not the vision tower
    assert cmp.stages["model.vision_tower"]["cos"] >= 0.99999


def test_tiny64_size_ships_its_own_trained_weights():
    """``build("llava-onevision", "tiny64")``: 64x64 frames, 16 pooled tokens per frame (129 video tokens at 8
    frames), weights trained at 64x64 (tools/train_video_qa.py --size tiny64); the default build is unchanged."""
    entry = zoo.get("llava-onevision")
    assert entry.sizes == ("tiny", "tiny64", "full") and zoo.get("llama").sizes == ("tiny", "full")
    zm = zoo.build("llava-onevision", "tiny64")
    assert zm.model.config.vision_config.image_size == 64 and zm.visual_tokens(8) == 129
    assert zoo.build("llava-onevision").model.config.vision_config.image_size == 32
    random = zoo.build("llava-onevision", "tiny64", pretrained=False).model.state_dict()
    assert any(not torch.equal(v, random[k]) for k, v in zm.model.state_dict().items())
    inputs = zm.example_inputs(batch=1, frames=8)
    assert int((inputs["input_ids"] == zm.model.config.video_token_index).sum()) == 129
    samples = vopt.eval.video_task.make_split("test", 64, seed=0, height=64, width=64)
    assert vopt.eval.video_qa(zm.model, samples=samples, bootstrap=0).accuracy >= 0.7
    with pytest.raises(ConfigError, match=r"accepted: \['tiny', 'tiny64', 'full'\]"):
        zoo.build("llava-onevision", "huge")

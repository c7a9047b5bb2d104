"""vopt.eval.compare: agreement, logit cos / KL and per-stage attribution on the tiny LLaVA-OneVision."""
import copy
import json

import pytest
import torch

import vopt
import vopt.eval
from vopt import zoo
from vopt.errors import ConfigError
from vopt.eval import video_task as vt

N = 8
STAGES = ("model.vision_tower", "model.multi_modal_projector", "model.language_model")
VISION_LAYERS = tuple(f"model.vision_tower.encoder.layers.{i}" for i in range(2))
LM_LAYERS = tuple(f"model.language_model.layers.{i}" for i in range(4))


@pytest.fixture(scope="module")
def base():
    return zoo.build("llava-onevision", pretrained=False).model


@pytest.fixture(scope="module")
def samples():
    return vt.make_split("test", N, seed=0)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def no_hooks(model):
    """No forward hook of vopt.eval.agreement is left (HF installs its own output-capturing hooks lazily)."""
    return not any(h.__module__ == "vopt.eval.agreement" for m in model.modules() for h in m._forward_hooks.values())


def test_model_against_itself(base, samples):
    before = snapshot(base)
    c = vopt.eval.compare(base, base, samples=samples, batch_size=3)
    assert c.n == N and c.agreement == 1.0 and c.accuracy_delta == 0.0
    assert c.accuracy_baseline == c.accuracy_optimized
    assert c.logit_cos_mean == pytest.approx(1.0, abs=1e-6) and c.logit_cos_min == pytest.approx(1.0, abs=1e-6)
    assert c.kl_mean == pytest.approx(0.0, abs=1e-6) and c.kl_max == pytest.approx(0.0, abs=1e-6)
    assert list(c.stages) == [STAGES[0], *VISION_LAYERS, STAGES[1], STAGES[2], *LM_LAYERS, "logits"]
    for path, m in c.stages.items():
        assert m["cos"] == pytest.approx(1.0, abs=1e-6) and m["rel_l2"] == pytest.approx(0.0, abs=1e-6), path
    assert c.stages["logits"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert not c.unobserved and not c.notes
    assert_unchanged(base, before)
    assert no_hooks(base)


def test_perturbed_projector_is_attributed_to_projector_and_lm(base, samples):
    perturbed = copy.deepcopy(base)
    weight = perturbed.model.multi_modal_projector.linear_1.weight
    with torch.no_grad():
        weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    before_base, before_pert = snapshot(base), snapshot(perturbed)
    c = vopt.eval.compare(base, perturbed, samples=samples)
    for path in (STAGES[0], *VISION_LAYERS):                        # upstream of the change: identical
        assert c.stages[path]["cos"] == pytest.approx(1.0, abs=1e-9) and c.stages[path]["rel_l2"] == 0.0
    for path in (STAGES[1], STAGES[2], *LM_LAYERS, "logits"):       # the projector and everything after it
        assert c.stages[path]["cos"] < 0.999 and c.stages[path]["rel_l2"] > 1e-3, path
    assert c.kl_mean > 0 and c.logit_cos_min < 1
    assert_unchanged(base, before_base)
    assert_unchanged(perturbed, before_pert)
    assert no_hooks(base) and no_hooks(perturbed)


def test_optimized_model_exported_stages_hide_their_layers(base, samples):
    opt = vopt.optimize(base, passes=["sdpa"])
    c = vopt.eval.compare(base, opt, samples=samples)
    assert c.agreement == 1.0 and c.accuracy_delta == 0.0 and c.kl_max < 1e-6
    for path in STAGES:                                              # stage outputs are always observed
        assert c.stages[path]["cos"] == pytest.approx(1.0, abs=1e-5) and c.stages[path]["rel_l2"] < 1e-4
    exported = {ev.stage for ev in opt.report.stage_events if ev.exported}
    for stage, layers in (("vision_tower", VISION_LAYERS), ("language_model", LM_LAYERS)):
        for path in layers:                       # every layer is either compared or explained, never both
            assert (path in c.stages) != (path in c.unobserved)
            if stage in exported:
                assert "exported graph" in c.unobserved[path]
            else:
                assert c.stages[path]["cos"] == pytest.approx(1.0, abs=1e-5)
    assert "unobserved" in c.table() or not c.unobserved
    data = json.loads(json.dumps(c.to_dict()))
    assert set(data["stages"]) == set(c.stages) and data["unobserved"] == c.unobserved
    assert no_hooks(base) and no_hooks(opt.module)


def test_model_captured_ahead_with_example_inputs(base, samples):
    """Exported stages refuse .eval()/.train(): compare must still run (it sets the mode flags directly)."""
    zm = zoo.build("llava-onevision", pretrained=False)
    opt = vopt.optimize(base, passes=["sdpa"], example_inputs=zm.example_inputs())
    c = vopt.eval.compare(base, opt, samples=samples)
    assert c.agreement == 1.0 and c.kl_max < 1e-6


def test_stages_false_reports_logits_only(base, samples):
    c = vopt.eval.compare(base, base, samples=samples[:4], stages=False)
    assert list(c.stages) == ["logits"] and not c.unobserved and c.agreement == 1.0


def test_hooks_are_removed_when_the_model_fails(base, samples):
    class Broken(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner.model                                 # same stage paths as the baseline

        def forward(self, **inputs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        vopt.eval.compare(base, Broken(base), samples=samples[:4])
    assert no_hooks(base)


@pytest.mark.parametrize("kwargs, name", [
    ({"n": 0}, "n"), ({"batch_size": 0}, "batch_size"), ({"split": "dev"}, "split"), ({"samples": []}, "samples"),
    ({"stages": "yes"}, "stages"), ({"seed": -1}, "seed"),
])
def test_argument_errors(base, kwargs, name):
    with pytest.raises(ConfigError, match=rf"^{name}\b"):
        vopt.eval.compare(base, base, **kwargs)

"""``vopt.optimize`` end to end on tiny Llama and tiny LLaVA-OneVision.

Done criterion of the foundation: logits equal the original's within 1e-5
(float32; the passes are exact and the reference attention computes in float32)
and the report lists every rewritten attention node.
"""
import copy

import pytest
import torch

import vopt
from vopt import zoo
from vopt.capture import CapturedStage
from vopt.errors import CaptureError, ConfigError

ATOL = 1e-5
RTOL = 1e-5  # exact passes differ from eager only by fp32 summation order (~1e-6 of the logits' magnitude)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return zoo.build("llama")


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    return zoo.build("llava-onevision")


def logits_error(a, b, inputs, atol=ATOL):
    """max |a - b| of the logits over the allowed ``atol + RTOL * max |b|``: <= 1 passes."""
    with torch.no_grad():
        ref = b(**inputs).logits
        return (a(**inputs).logits - ref).abs().max().item() / (atol + RTOL * ref.abs().max().item())


def test_llama_logits_match_and_report(llama):
    inputs = llama.example_inputs()
    opt = vopt.optimize(llama.model, example_inputs=inputs)
    assert logits_error(opt, llama.model, inputs) <= 1
    report = opt.report
    rewritten = report.rewritten("sdpa")
    assert [m.where for m in rewritten] == [
        "model:model.layers.0.self_attn/scaled_dot_product_attention",
        "model:model.layers.1.self_attn/scaled_dot_product_attention_1",
    ]
    gm = opt.stages["model"].specializations[0].gm
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.vopt.attention.default) == 2
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    text = str(report)
    assert "sdpa" in text and "rewritten" in text and "model.layers.1.self_attn" in text
    assert report.to_dict()["summary"][-1]["rewritten"] == 2


def test_llava_onevision_stages_logits_and_report(llava):
    inputs = llava.example_inputs(frames=4)
    opt = vopt.optimize(llava.model, example_inputs=inputs)
    assert logits_error(opt, llava.model, inputs) <= 1
    events = {ev.stage: ev for ev in opt.report.stage_events}
    assert set(events) == {"vision_tower", "projector", "language_model"}
    assert all(ev.exported for ev in events.values())
    where = [m.where for m in opt.report.rewritten("sdpa")]
    assert sum(w.startswith("vision_tower:encoder.layers.") for w in where) == 2
    assert sum(w.startswith("language_model:layers.") for w in where) == 4
    # SigLIP's pooling head is nn.MultiheadAttention: canonicalized, then rewritten too.
    assert [m.where.split("/")[0] for m in opt.report.rewritten("canonicalize_attention")] == ["vision_tower:head.attention"]
    assert len(where) == 7
    # A new input signature (more frames) is captured as a second specialization and still exact.
    more = llava.example_inputs(frames=2, seed=1)
    assert logits_error(opt, llava.model, more) <= 1
    assert len(opt.stages["vision_tower"].specializations) == 2


def test_caller_model_is_not_mutated(llava):
    model = llava.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    use_cache = model.config.text_config.use_cache
    vopt.optimize(model, example_inputs=llava.example_inputs())
    assert [type(m) for m in model.modules()] == types
    assert model.config.text_config.use_cache == use_cache
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inplace_modifies_the_model(llama):
    model = copy.deepcopy(llama.model)
    opt = vopt.optimize(model, inplace=True)
    assert opt.module.eager is model
    with pytest.raises(ConfigError, match="already optimized"):
        vopt.optimize(opt)


def test_lazy_capture_and_generate(llava):
    opt = vopt.optimize(llava.model)  # no example inputs: captured on the first call
    assert opt.report.stage_events == []
    assert "captured on the first call" in str(opt.report)
    inputs = llava.example_inputs()
    with torch.no_grad():
        out = opt.generate(**inputs, max_new_tokens=3, do_sample=False)
        ref = llava.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.tolist() == ref.tolist()
    # generate passes a DynamicCache: the LM stage runs eagerly and the report says why.
    eager = [ev for ev in opt.report.stage_events if not ev.exported]
    assert eager and all(ev.stage == "language_model" and "DynamicCache" in ev.reason for ev in eager)


def test_strict_mode_refuses_eager_fallback(llava):
    cfg = vopt.OptimizeConfig(strict=True)
    opt = vopt.optimize(llava.model, cfg, example_inputs=llava.example_inputs())
    with pytest.raises(CaptureError, match="language_model"):
        with torch.no_grad():
            opt.generate(**llava.example_inputs(), max_new_tokens=2, do_sample=False)


def test_max_specializations_falls_back_with_reason(llama):
    cfg = vopt.OptimizeConfig(capture=vopt.CaptureConfig(max_specializations=1))
    opt = vopt.optimize(llama.model, cfg, example_inputs=llama.example_inputs(seq_len=5))
    assert logits_error(opt, llama.model, llama.example_inputs(seq_len=7)) <= 1
    reasons = [ev.reason for ev in opt.report.stage_events if not ev.exported]
    assert reasons == ["max_specializations=1 reached"]


def test_stage_wrapper_serves_attributes(llava):
    opt = vopt.optimize(llava.model)
    stage = opt.stages["language_model"]
    assert isinstance(stage, CapturedStage)
    assert stage.config is stage.eager.config
    assert opt.get_input_embeddings() is stage.eager.get_input_embeddings()


def test_pass_selection_and_stage_filter(llava):
    cfg = vopt.OptimizeConfig(passes=["sdpa"], pass_configs={"sdpa": {"stages": ["language_model"]}})
    opt = vopt.optimize(llava.model, cfg, example_inputs=llava.example_inputs())
    assert [p["name"] for p in opt.report.passes] == ["sdpa"]
    assert all(m.where.startswith("language_model:") for m in opt.report.rewritten("sdpa"))
    assert all("not in SdpaConfig.stages" in m.reason for m in opt.report.skipped("sdpa"))


def test_report_json_round_trip(llama):
    import json

    opt = vopt.optimize(llama.model, example_inputs=llama.example_inputs())
    data = json.loads(opt.report.to_json())
    assert data["adapter"] == "generic" and data["stages"][0]["exported"]
    assert data["stages"][0]["pass_results"][-1]["rewritten"] == 2


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        vopt.optimize("model")
    with pytest.raises(ConfigError, match="example_inputs must be"):
        vopt.optimize(torch.nn.Linear(2, 2), example_inputs=3)
    with pytest.raises(KeyError, match="adapter 'nope'"):
        vopt.optimize(torch.nn.Linear(2, 2), vopt.OptimizeConfig(adapter="nope"))


def test_generic_module_and_positional_inputs():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    m, x = Block().eval(), torch.randn(2, 5, 16)
    opt = vopt.optimize(m, example_inputs=(x,))
    torch.testing.assert_close(opt(x), m(x), atol=ATOL, rtol=0)
    assert len(opt.report.rewritten("sdpa")) == 1


@pytest.mark.gpu
def test_llama_on_gpu_matches_eager():
    """The pipeline on a CUDA device (fp32): vopt::attention dispatches on GPU tensors."""
    zm = zoo.build("llama", device="cuda")
    inputs = zm.example_inputs()
    opt = vopt.optimize(zm.model, example_inputs=inputs)
    assert logits_error(opt, zm.model, inputs, atol=1e-4) <= 1  # GPU SDPA kernels differ from the fp32 reference by ~1e-6
    assert len(opt.report.rewritten("sdpa")) == 2


def test_runtime_pass_runs_before_capture_and_reports(llama):
    from vopt.pass_protocol import Match, Pass, PassKind, PassResult

    class TagModules(Pass):
        name, kind, provides = "tag_modules", PassKind.RUNTIME, frozenset({"tagged"})

        def run_runtime(self, model, ctx):
            model.vopt_tag = "seen"
            return PassResult(self.name, "model", [Match("model", type(model).__name__, rewritten=True)])

    opt = vopt.optimize(llama.model, passes=[TagModules(), "sdpa"], example_inputs=llama.example_inputs())
    assert opt.module.eager.vopt_tag == "seen" and not hasattr(llama.model, "vopt_tag")
    report = opt.report
    assert [p["name"] for p in report.passes] == ["tag_modules", "sdpa"]
    assert [r.pass_name for r in report.runtime_results] == ["tag_modules"]
    assert report.summary()[0]["rewritten"] == 1 and "tag_modules" in str(report)


def test_optimized_graph_re_exports_with_the_vopt_op(llama):
    """The custom op's fake implementation lets torch.export see through it (engines build on this)."""
    inputs = llama.example_inputs()
    opt = vopt.optimize(llama.model, example_inputs=inputs)
    gm = opt.stages["model"].specializations[0].gm
    ep = torch.export.export(gm, (), inputs, strict=False)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.vopt.attention.default) == 2
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(**inputs).logits, llama.model(**inputs).logits, atol=ATOL, rtol=0)

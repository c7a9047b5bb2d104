"""The ``sageattention2_hf`` runtime pass: HF ``AttentionInterface`` -> ``vopt::sage_attention``.

Measured on this CPU (default preset int8_fp8_block, float32, tiny zoo models with random weights,
PADDED batches: row 1 left-padded):

* llama (batch 2, 10 tokens, 3 padded): logits cos 0.99967 on non-padded positions, max|Δ| 0.017
  (max|logit| 0.63); llava-onevision (batch 2, 2 frames, 2 padded): cos 0.99958, max|Δ| 0.027;
  gpt4scene (visual stage eager, LLM captured): cos 0.99992; MiniLM (real weights, 16 padded
  sentences): fidelity cos_min 0.99981, top-1 agreement 1.0. Asserted: cos >= 0.999.
* Padding leak. Changing the padded tokens' ids moves non-padded logits by 0.0 with
  precision='exact' (bit-identical) and by up to 0.0024 (llama) with the quantized preset, vs 0.57
  when those tokens are NOT masked. The op neutralizes keys that no query sees
  (``vopt.ops.sage_attention.neutralize_hidden_keys``: 0.015 before), but HF's SDPA mask lets
  fully padded query rows attend to every key, so padded keys stay "seen" and still enter the
  per-(batch, head) quantization statistics. Asserted: exact -> 0; quantized -> <= 0.1 x the
  unmasked change and cos >= 0.999 between the two runs.
"""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import vopt
from vopt import zoo
from vopt.errors import ConfigError, PassOrderError
from vopt.optimize import OptimizeConfig
from vopt.pass_protocol import PassContext, PassKind
from vopt.passes import sageattention2_hf as H
from vopt.passes.sageattention2_hf import ATTN_NAME, PRECISION_ATTR, SageAttention2HFConfig, SageAttention2HFPass

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the quantized reference's tiny matmuls

SAGE = torch.ops.vopt.sage_attention.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.delenv("VOPT_BACKEND", raising=False)


def cos(a, b) -> float:
    return F.cosine_similarity(a.detach().double().flatten(), b.detach().double().flatten(), dim=0).item()


def _padded(inputs: dict, n_pad: int) -> tuple:
    """(inputs with row 1 left-padded by n_pad, the same with different ids at the padded positions, mask)."""
    mask = torch.ones_like(inputs["input_ids"])
    mask[1, :n_pad] = 0
    padded = dict(inputs, attention_mask=mask)
    ids = padded["input_ids"].clone()
    ids[1, :n_pad] = (ids[1, :n_pad] + 7) % 400 + 1
    return padded, dict(padded, input_ids=ids), mask.bool()


def _optimize(model, inputs, precision=None, **cfg):
    configs = {} if precision is None and not cfg else {
        "sageattention2_hf": SageAttention2HFConfig(**({"precision": precision} if precision else {}), **cfg)}
    return vopt.optimize(model, OptimizeConfig(pass_configs=configs), passes=["sageattention2_hf"], example_inputs=inputs)


def _graph_ops(opt) -> dict:
    """stage -> (#vopt.sage_attention nodes, #SDPA nodes) over its captured graphs."""
    out = {}
    for name, stage in opt.stages.items():
        nodes = [n for sp in stage.specializations for n in sp.gm.graph.nodes]
        out[name] = (sum(n.target is SAGE for n in nodes), sum(n.target is SDPA for n in nodes))
    return out


def _assert_caller_untouched(model, impls):
    for cfg, impl in impls:
        assert cfg._attn_implementation == impl
    assert not any(hasattr(m, PRECISION_ATTR) for m in model.modules())


# ---- config and registration ----------------------------------------------------------------


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"SageAttention2HFConfig\.precision='fast'.*accepted"):
        SageAttention2HFConfig(precision="fast")
    with pytest.raises(ConfigError, match=r"SageAttention2HFConfig\.modules must be None"):
        SageAttention2HFConfig(modules=[])
    with pytest.raises(ConfigError, match=r"SageAttention2HFConfig\.modules\[1\]=''"):
        SageAttention2HFConfig(modules=["model", ""])
    with pytest.raises(ConfigError, match="takes a SageAttention2HFConfig"):
        SageAttention2HFPass(vopt.config.VoptConfig())
    cfg = SageAttention2HFConfig(precision="int8_fp16", modules=["model.language_model"])
    assert SageAttention2HFConfig.from_json(cfg.to_json()) == cfg
    assert SageAttention2HFConfig().precision == vopt.ops.sage_attention.DEFAULT_PRESET


def test_pass_is_registered_opt_in_runtime_and_ordered():
    cls = vopt.registered_passes()["sageattention2_hf"]
    assert cls is SageAttention2HFPass and cls.default is False and cls.kind is PassKind.RUNTIME
    assert cls.before == ("sageattention2",)
    assert "sageattention2_hf" not in vopt.pass_manager.PassManager.default().names
    with pytest.raises(PassOrderError, match="'sageattention2_hf' must run before 'sageattention2'"):
        vopt.optimize(zoo.build("llama").model, passes=["sageattention2", "sageattention2_hf"])


def test_import_registers_nothing():
    code = ("import vopt, vopt.passes; from transformers import AttentionInterface; "
            "from transformers.masking_utils import AttentionMaskInterface; "
            f"assert {ATTN_NAME!r} not in AttentionInterface._global_mapping; "
            f"assert {ATTN_NAME!r} not in AttentionMaskInterface._global_mapping; "
            "vopt.passes.sageattention2_hf.register(); vopt.passes.sageattention2_hf.register(); "
            f"assert AttentionInterface._global_mapping[{ATTN_NAME!r}] is vopt.passes.sageattention2_hf.sage_attention_forward")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- the attention function --------------------------------------------------------------------


class _Attn(torch.nn.Module):
    def __init__(self, precision=None, is_causal=None):
        super().__init__()
        self.num_key_value_groups = 2  # transformers' sdpa needs it for GQA; vopt_sage reads the shapes
        if precision is not None:
            setattr(self, PRECISION_ATTR, precision)
        if is_causal is not None:
            self.is_causal = is_causal


def test_attention_function_matches_the_hf_sdpa_contract():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, 16, generator=gen)
    k, v = torch.randn(2, 2, 8, 16, generator=gen), torch.randn(2, 2, 8, 16, generator=gen)  # GQA, not expanded
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool).tril()
    mask[1, :, :, :3] = False
    mask[1, :, :3, 0] = True  # no fully masked row
    scaling = 0.3

    def op(m, causal, precision="int8_fp16", qq=q):
        return torch.ops.vopt.sage_attention(qq, k, v, m, 0.0, causal, scaling, True, precision).transpose(1, 2)

    # is_causal resolved exactly like transformers' sdpa_attention_forward
    cases = [  # (module, attention_mask, is_causal passed, q, causal the op must get)
        (_Attn("int8_fp16"), None, None, q, True),                  # no module.is_causal -> True
        (_Attn("int8_fp16", is_causal=False), None, None, q, False),  # vision / encoder modules
        (_Attn("int8_fp16", is_causal=False), None, True, q, True),   # an explicit flag wins
        (_Attn("int8_fp16"), mask, None, q, False),                 # a mask -> never causal
        (_Attn("int8_fp16"), None, True, q[:, :, :1], False),       # one query row -> never causal
    ]
    for module, m, flag, qq, causal in cases:
        out, weights = H.sage_attention_forward(module, qq, k, v, m, scaling=scaling, is_causal=flag)
        assert weights is None and out.shape == (2, qq.shape[2], 4, 16) and out.is_contiguous()
        assert torch.equal(out, op(m, causal, qq=qq)), (flag, causal)
        exact, _ = sdpa_attention_forward(module, qq, k, v, m, scaling=scaling, is_causal=flag)
        assert cos(out, exact) >= 0.999
    # the scaling is honoured (a different scale gives a different result)
    out, _ = H.sage_attention_forward(_Attn("int8_fp16"), q, k, v, mask, scaling=scaling)
    assert not torch.allclose(out, H.sage_attention_forward(_Attn("int8_fp16"), q, k, v, mask, scaling=1.0)[0])
    # 'exact' delegates to transformers' SDPA, bit for bit; no attribute -> the default preset
    module = _Attn("exact", is_causal=True)
    assert torch.equal(H.sage_attention_forward(module, q, k, v, mask, scaling=scaling)[0],
                       sdpa_attention_forward(module, q, k, v, mask, scaling=scaling)[0])
    assert torch.equal(H.sage_attention_forward(_Attn(), q, k, v, mask, scaling=scaling)[0],
                       op(mask, False, vopt.ops.sage_attention.DEFAULT_PRESET))
    # inference only; unknown presets named
    with pytest.raises(ValueError, match="inference-only.*dropout=0.1"):
        H.sage_attention_forward(_Attn(), q, k, v, None, dropout=0.1)
    with pytest.raises(ValueError, match=f"{PRECISION_ATTR}='fast'"):
        H.sage_attention_forward(_Attn("fast"), q, k, v, None)


# ---- tiny zoo models, padded batches -----------------------------------------------------------


def test_llama_padded_batch():
    m = zoo.build("llama", pretrained=False).model.eval()
    inputs, changed, valid = _padded(zoo.build("llama", pretrained=False).example_inputs(batch=2, seq_len=10), 3)
    with torch.no_grad():
        ref = m(**inputs).logits
    opt = _optimize(m, inputs)
    _assert_caller_untouched(m, [(m.config, "sdpa")])
    assert opt.config._attn_implementation == ATTN_NAME
    with torch.no_grad():
        out, out_changed = opt(**inputs).logits, opt(**changed).logits
        unmasked = [opt(**dict(x, attention_mask=torch.ones_like(x["attention_mask"]))).logits for x in (inputs, changed)]
    assert cos(ref[valid], out[valid]) >= 0.999
    # padding does not leak beyond quantization-statistics noise (module docstring)
    leak, real = (out[valid] - out_changed[valid]).abs().max(), (unmasked[0][valid] - unmasked[1][valid]).abs().max()
    assert leak <= 0.1 * real and cos(out[valid], out_changed[valid]) >= 0.999
    # the captured stage holds the op, no SDPA
    assert _graph_ops(opt) == {"model": (2, 0)}
    (result,) = opt.report.runtime_results
    assert [(x.where, x.what, x.rewritten) for x in result.matches] == [
        (f"model.layers.{i}.self_attn", "LlamaAttention -> vopt_sage[int8_fp8_block]", True) for i in range(2)]

    exact = _optimize(m, inputs, precision="exact")
    with torch.no_grad():
        e, e_changed = exact(**inputs).logits, exact(**changed).logits
    assert torch.equal(e[valid], ref[valid]) and torch.equal(e[valid], e_changed[valid])


def test_llava_onevision_padded_batch_switches_text_and_vision():
    zm = zoo.build("llava-onevision", pretrained=False)
    m = zm.model.eval()
    inputs, changed, valid = _padded(zm.example_inputs(batch=2, frames=2), 2)
    with torch.no_grad():
        ref = m(**inputs).logits
    opt = _optimize(m, inputs)
    _assert_caller_untouched(m, [(m.config, "sdpa"), (m.config.text_config, "sdpa"), (m.config.vision_config, "sdpa")])
    assert opt.config.text_config._attn_implementation == opt.config.vision_config._attn_implementation == ATTN_NAME
    with torch.no_grad():
        out, out_changed = opt(**inputs).logits, opt(**changed).logits
        unmasked = [opt(**dict(x, attention_mask=torch.ones_like(x["attention_mask"]))).logits for x in (inputs, changed)]
    assert cos(ref[valid], out[valid]) >= 0.999
    leak, real = (out[valid] - out_changed[valid]).abs().max(), (unmasked[0][valid] - unmasked[1][valid]).abs().max()
    assert leak <= 0.1 * real and cos(out[valid], out_changed[valid]) >= 0.999
    ops = _graph_ops(opt)
    assert ops["vision_tower"] == (2, 0) and ops["language_model"] == (4, 0)
    rewritten = [x.where for x in opt.report.runtime_results[0].rewritten]
    assert len(rewritten) == 6 and sum("vision_tower" in w for w in rewritten) == 2


def test_eager_fallback_stage_gets_quantized_attention(monkeypatch):
    # gpt4scene's Qwen2-VL ViT does not export (varlen attention) and runs eagerly: the graph pass cannot
    # reach it, the interface does.
    calls = []
    real = H.sage_attention_forward

    def spy(module, query, key, value, attention_mask, **kw):
        calls.append(type(module).__name__)
        return real(module, query, key, value, attention_mask, **kw)

    monkeypatch.setattr(H, "sage_attention_forward", spy)
    try:
        zm = zoo.build("gpt4scene", pretrained=False)
        m = zm.model.eval()
        inputs = zm.example_inputs(batch=1, frames=2)
        with torch.no_grad():
            ref = m(**inputs).logits
        opt = _optimize(m, inputs)
        with torch.no_grad():
            out = opt(**inputs).logits
    finally:
        monkeypatch.undo()
        H.register()
    assert cos(ref, out) >= 0.999
    events = {ev.stage: ev for ev in opt.report.stage_events}
    assert events["visual"].exported is False and events["language_model"].exported is True
    assert "VisionAttention" in calls  # the eager ViT ran through vopt_sage
    rewritten = {x.where: x.what for x in opt.report.runtime_results[0].rewritten}
    assert rewritten["model.visual.blocks.0.attn"] == "VisionAttention -> vopt_sage[int8_fp8_block]"
    assert _graph_ops(opt)["language_model"] == (2, 0)


def test_mask_registration_delivers_the_padding_mask(monkeypatch):
    masks = []
    real = H.sage_attention_forward

    def spy(module, query, key, value, attention_mask, **kw):
        masks.append(attention_mask)
        return real(module, query, key, value, attention_mask, **kw)

    zm = zoo.build("llama", pretrained=False)
    inputs, _, _ = _padded(zm.example_inputs(batch=2, seq_len=6), 2)
    from transformers import AttentionInterface

    monkeypatch.setattr(H, "sage_attention_forward", spy)
    try:
        work = copy.deepcopy(zm.model).eval()
        SageAttention2HFPass().run_runtime(work, PassContext())
        with torch.no_grad():
            work(**inputs)
            assert len(masks) == 2 and all(x is not None and x.dtype == torch.bool and x.dim() == 4 for x in masks)
            assert not masks[0][1, 0, :, :2].any()  # padded keys hidden from every query of row 1
            masks.clear()
            work(input_ids=inputs["input_ids"])  # unpadded: None (causality from is_causal)
            assert masks == [None, None]
            masks.clear()
            # Without AttentionMaskInterface.register, the same padded batch reaches attention with mask=None.
            AttentionInterface.register("vopt_sage_nomask_test", spy)
            work.set_attn_implementation("vopt_sage_nomask_test")
            work(**inputs)
            assert masks == [None, None]
    finally:
        AttentionInterface._global_mapping.pop("vopt_sage_nomask_test", None)
        monkeypatch.undo()
        H.register()


def test_modules_restriction_and_unsupported_submodel(monkeypatch):
    model = zoo.build("llava-onevision", pretrained=False).model.eval()
    work = copy.deepcopy(model)
    res = SageAttention2HFPass(SageAttention2HFConfig(modules=["model.language_model.layers.0", "model.language_model.layers.1"])
                               ).run_runtime(work, PassContext())
    assert work.config.vision_config._attn_implementation == "sdpa"
    assert work.config.text_config._attn_implementation == ATTN_NAME
    assert [x.where for x in res.rewritten] == ["model.language_model.layers.0.self_attn", "model.language_model.layers.1.self_attn"]
    assert {x.where for x in res.skipped} == {"model.language_model.layers.2.self_attn", "model.language_model.layers.3.self_attn"}
    assert all("outside SageAttention2HFConfig.modules" in x.reason for x in res.skipped)
    assert getattr(work.model.language_model.layers[3].self_attn, PRECISION_ATTR) == "exact"

    none = SageAttention2HFPass(SageAttention2HFConfig(modules=["nowhere"])).run_runtime(copy.deepcopy(model), PassContext())
    assert not none.rewritten and "no attention module under" in none.skipped[0].reason

    # A sub-model class that does not use the attention interface is skipped with the reason.
    from transformers import SiglipVisionModel

    monkeypatch.setattr(SiglipVisionModel, "_can_set_attn_implementation", classmethod(lambda cls: False))
    work = copy.deepcopy(model)
    res = SageAttention2HFPass().run_runtime(work, PassContext())
    assert work.config.vision_config._attn_implementation == "sdpa"
    assert work.config.text_config._attn_implementation == ATTN_NAME
    (skip,) = res.skipped
    assert skip.where == "model.vision_tower" and skip.what == "SiglipVisionModel" and "does not support" in skip.reason
    assert len(res.rewritten) == 4 and all("language_model" in x.where for x in res.rewritten)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_minilm_fidelity():
    from vopt.eval import minilm

    try:
        model, tok = minilm.load_minilm()
    except minilm.MiniLMUnavailableError as exc:
        pytest.skip(str(exc))
    batch = dict(tok(minilm.SENTENCES, padding=True, return_tensors="pt"))
    assert (batch["attention_mask"] == 0).any()  # padded
    opt = vopt.optimize(model, passes=["sageattention2_hf"], example_inputs=batch)
    f = minilm.fidelity(model, opt, tok)
    print("MiniLM sageattention2_hf fidelity:", f)
    assert f["cos_min"] >= 0.999
    assert model.config._attn_implementation == "sdpa" and opt.config._attn_implementation == ATTN_NAME
    assert len(opt.report.runtime_results[0].rewritten) == 6
    assert sum(ops[0] for ops in _graph_ops(opt).values()) == 6


def test_decode_phase_precision():
    """decode_precision: one-token (decoding-phase) calls use their own preset; prefill keeps `precision`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vopt.passes.sageattention2_hf import DECODE_PRECISION_ATTR

    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(1, 2, 9, 16, generator=gen), torch.randn(1, 2, 9, 16, generator=gen)
    mod = _Attn("int8_fp8_block")
    setattr(mod, DECODE_PRECISION_ATTR, "exact")
    decode_q, prefill_q = torch.randn(1, 4, 1, 16, generator=gen), torch.randn(1, 4, 9, 16, generator=gen)
    got, _ = H.sage_attention_forward(mod, decode_q, k, v, None)
    want, _ = sdpa_attention_forward(mod, decode_q, k, v, None)
    assert torch.equal(got, want)
    got, _ = H.sage_attention_forward(mod, prefill_q, k, v, None)
    quant = torch.ops.vopt.sage_attention(prefill_q, k, v, None, 0.0, True, None, True, "int8_fp8_block")
    assert torch.equal(got, quant.transpose(1, 2).contiguous())
    # the pass tags modules and says so in the report
    zm = zoo.build("llama", pretrained=False)
    opt = _optimize(zm.model, zm.example_inputs(), decode_precision="exact")
    (result,) = opt.report.runtime_results
    assert all(m.what.endswith("vopt_sage[int8_fp8_block], decode: vopt_sage[exact]") for m in result.matches)
    with pytest.raises(ConfigError, match="decode_precision='fp2' is not a preset"):
        SageAttention2HFConfig(decode_precision="fp2")

"""The zoo: every entry builds tiny and full, runs, captures and optimizes.

The matrix test runs every tiny model through forward (+ generate where it
applies), ``vopt.optimize`` with the default passes, and checks the optimized
outputs equal eager within 1e-5 + 1e-5 x max|output| (float32; the shipped passes are exact). Add
new passes to ``PASS_SETS`` as they land.
"""
import math

import pytest
import torch
from torch.utils import _pytree as pytree

import vopt
from vopt import zoo
from vopt.errors import ConfigError, UnknownNameError

NAMES = zoo.names()
PASS_SETS = {"default": None, "sdpa-only": ["sdpa"], "moe": ["moe_dispatch", "moe_detect"], "vq_lookup": ["vq_lookup"]}
ATOL = 1e-5
RTOL = 1e-5  # exact passes differ from eager only by fp32 summation order (~1e-6 of the output's magnitude)


def float_leaves(out):
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor) and x.is_floating_point()]


def call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


@pytest.mark.parametrize("passes", sorted(PASS_SETS))
@pytest.mark.parametrize("name", NAMES)
def test_tiny_forward_capture_optimize(name, passes):
    zm = zoo.build(name)
    inputs = zm.example_inputs()
    with torch.no_grad():
        ref = call(zm.model, inputs)
    opt = vopt.optimize(zm.model, passes=PASS_SETS[passes], example_inputs=inputs)
    with torch.no_grad():
        got = call(opt, inputs)
    ref_leaves, got_leaves = float_leaves(ref), float_leaves(got)
    assert ref_leaves and len(ref_leaves) == len(got_leaves)
    for r, g in zip(ref_leaves, got_leaves):
        assert r.shape == g.shape
        assert (r - g).abs().max().item() <= ATOL + RTOL * r.abs().max().item()
    report = opt.report
    assert report.stage_events, "no stage was captured"
    for ev in report.stage_events:
        assert ev.exported or ev.reason
    assert set(zoo.get(name).stages) >= {ev.stage for ev in report.stage_events}
    assert str(report)


@pytest.mark.parametrize("name", [n for n in NAMES])
def test_tiny_generate_where_it_applies(name):
    zm = zoo.build(name)
    if not zm.generates:
        pytest.skip(f"{name} does not generate")
    inputs = zm.example_inputs()
    with torch.no_grad():
        out = zm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[-1] >= 3


@pytest.mark.parametrize("name", NAMES)
def test_full_size_builds_on_meta_and_costs(name):
    zm = zoo.build(name, "full")
    params = list(zm.model.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    c = zoo.cost(name)
    assert c.params == sum(p.numel() for p in params)
    if zm.stage_calls is not None:
        assert c.prefill_flops > 0 and set(c.prefill_flops_per_stage)


def test_entries_describe_themselves():
    for e in zoo.list():
        assert e.paper and e.backbone and e.stages and e.passes


def test_llava_onevision_7b_cost_matches_hand_computation():
    """LLaVA-OV-7B at 32 frames, hand-computed from the published dimensions (models.md, tokens.md)."""
    c = zoo.cost("llava-onevision", frames=32)
    # Tokens: SigLIP 384/14 -> 27x27 = 729 patches, 2x2 bilinear pooling -> 14x14 = 196 per frame, + 1 newline.
    n = 32 * math.ceil(27 / 2) ** 2 + 1
    assert c.visual_tokens == n == 6273
    # KV cache: Qwen2-7B, 28 layers x 4 KV heads x head_dim 128, K and V, bf16 -> 56 KiB per token.
    assert c.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2 == 56 * 1024
    assert c.kv_bytes_per_video == 56 * 1024 * 6273
    # HoliTom/FastV FLOPs over the visual tokens (the newline counted): the published 40.8 TFLOPs.
    d, m, L = 3584, 18944, 28
    assert abs(c.prefill_flops_paper - L * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)) < 1
    assert round(c.prefill_flops_paper / 1e12, 1) == 40.8
    # Exact LLM prefill (6273 visual + 6 text tokens): q,o d x d; k,v d x 512 (4 KV heads x 128); SwiGLU 3 x d x m;
    # attention QK^T and PV: 2 x 2 x seq^2 x d (causality not discounted).
    seq = n + 6
    linear = 2 * seq * (2 * d * d + 2 * d * 512 + 3 * d * m)
    attention = 4 * seq * seq * d
    assert c.prefill_flops_per_stage["language_model"] == pytest.approx(L * (linear + attention), rel=1e-6)
    # Parameters of Qwen2-7B: untied embeddings and LM head (152064 x 3584), q/k/v biases, RMSNorm weights.
    per_layer = (d * d + d) + 2 * (d * 512 + 512) + d * d + 3 * d * m + 2 * d
    llm = 2 * 152064 * d + L * per_layer + d
    assert c.params_per_stage["language_model"] + 152064 * d == llm  # the LM head is outside the LM stage
    assert 8.0e9 < c.params < 8.1e9


def test_errors_list_what_is_accepted():
    with pytest.raises(UnknownNameError) as e:
        zoo.build("llava-twovision")
    assert "llava-onevision" in str(e.value)
    with pytest.raises(ConfigError, match=r"accepted: \['tiny', 'full'\]"):
        zoo.build("llama", "huge")
    zm = zoo.build("llava-onevision")
    with pytest.raises(ConfigError, match="frames must be a positive integer"):
        zm.example_inputs(frames=0)


def test_evilm_tokenizer_codes_identical_under_every_pass_set():
    """E-ViLM's forward never calls its VQ tokenizer: the matrix above cannot see vq_lookup's effect, this does."""
    zm = zoo.build("e-vilm")
    pixels = zm.example_inputs(batch=2)["pixel_values"]
    want = zm.model.tokenize_video(pixels)
    for passes in PASS_SETS.values():
        opt = vopt.optimize(zm.model, passes=passes)
        assert torch.equal(opt.tokenize_video(pixels), want)

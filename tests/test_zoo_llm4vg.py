"""LLM4VG zoo entry: span parsing, temporal IoU and Charades-STA metrics, the VQA -> prompt -> LLM glue, dims."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vopt import zoo
from vopt.errors import ConfigError
from vopt.zoo.llm4vg import (LLM4VG, LLM4VGTokens, build_prompt, charades_sta_metrics, mean_iou, parse_spans,
                             recall_at_1, temporal_iou)


@pytest.fixture(scope="module")
def tiny():
    return zoo.build("llm4vg")


# -- parse_spans ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,spans", [
    ("from 3 to 7 seconds", [(3, 7)]),
    ("The person opens the door from 3.5s to 7.25s.", [(3.5, 7.25)]),
    ("3-7", [(3, 7)]),
    ("3 - 7 s", [(3, 7)]),
    ("3–7", [(3, 7)]),
    ("start: 3, end: 7", [(3, 7)]),
    ("Start=2 End=9", [(2, 9)]),
    ("The start time is 3 seconds and the end time is 7 seconds.", [(3, 7)]),
    ("It starts at 4 and ends at 11", [(4, 11)]),
    ("[3, 7]", [(3, 7)]),
    ("(3.0, 7.5)", [(3, 7.5)]),
    ("between 3 and 7", [(3, 7)]),
    ("t=3 to t=7", [(3, 7)]),
    ("00:03 to 00:07", [(3, 7)]),
    ("1:02:03 - 1:02:10", [(3723, 3730)]),
    ("from 7 to 3", [(3, 7)]),                             # reversed: put in order
    ("from 1 to 2, and again from 5 to 6.5", [(1, 2), (5, 6.5)]),
    ("", []),
    ("I don't know.", []),
    ("t=0: no, t=1: yes, t=2: yes", []),                   # the prompt's own answers are no span
    ("start: , end: ???", []),
    ("-- :: [ , ] 3 to", []),
    (None, []),
    (42, []),
])
def test_parse_spans_formats(text, spans):
    assert parse_spans(text) == [(float(a), float(b)) for a, b in spans]


FORMATS = [
    "from {a} to {b} seconds", "{a}-{b}", "{a} - {b}", "{a}s to {b}s", "start: {a}, end: {b}", "Start time: {a}. End time: {b}.",
    "The event starts at {a} seconds and ends at {b} seconds.", "[{a}, {b}]", "({a}, {b})", "between {a} and {b}",
    "Answer: {a} to {b}", "t={a} to t={b}",
]
times = st.decimals(min_value=0, max_value=9999, places=2, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(times, times), min_size=1, max_size=3), st.sampled_from(FORMATS), st.sampled_from(["; ", " and then ", ". Also "]))
def test_parse_spans_round_trips(spans, fmt, sep):
    text = sep.join(fmt.format(a=a, b=b) for a, b in spans)
    expected = [(min(float(a), float(b)), max(float(a), float(b))) for a, b in spans]
    assert parse_spans(text) == expected


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_parse_spans_never_raises_on_garbage(text):
    for start, end in parse_spans(text):
        assert 0 <= start <= end and math.isfinite(end)


def test_prompt_lists_one_answer_per_second_and_holds_no_span():
    prompt = build_prompt("person opens a door", [False, True, True, False])
    assert "t=0: no, t=1: yes, t=2: yes, t=3: no" in prompt
    assert parse_spans(prompt) == []


# -- temporal IoU and the Charades-STA metrics -----------------------------------------------------------------------

@pytest.mark.parametrize("a,b,iou", [
    ((0, 5), (6, 9), 0.0),           # disjoint
    ((0, 5), (5, 9), 0.0),           # touching
    ((0, 10), (2, 4), 0.2),          # nested
    ((2, 4), (0, 10), 0.2),
    ((3, 7), (3, 7), 1.0),           # identical
    ((0, 4), (2, 6), 2 / 6),         # partial
    ((1.5, 2.5), (2.0, 4.0), 0.5 / 2.5),
    ((3, 3), (3, 3), 1.0),           # identical zero-length
    ((3, 3), (0, 10), 0.0),          # zero-length inside
    ((3, 3), (4, 4), 0.0),
])
def test_temporal_iou_edge_cases(a, b, iou):
    assert temporal_iou(a, b) == pytest.approx(iou)
    assert temporal_iou(b, a) == pytest.approx(iou)


def test_recall_and_mean_iou_hand_computed():
    gt = [(0, 10), (5, 15), (0, 1), (2, 4)]
    # top-1 IoUs: 1 (exact); 5/15 (only the first ranked span counts); 0 (no answer); 1/2.
    pred = [[(0, 10)], [(10, 20), (5, 15)], [], (3, 4)]
    assert recall_at_1(pred, gt, 0.3) == 3 / 4
    assert recall_at_1(pred, gt, 0.5) == 2 / 4
    assert recall_at_1(pred, gt, 0.7) == 1 / 4
    assert mean_iou(pred, gt) == pytest.approx((1 + 1 / 3 + 0 + 0.5) / 4)
    m = charades_sta_metrics(pred, gt)
    assert m == {"R@1,IoU=0.3": 0.75, "R@1,IoU=0.5": 0.5, "R@1,IoU=0.7": 0.25, "mIoU": pytest.approx(0.4583333)}
    assert recall_at_1([parse_spans("from 0 to 10 seconds")], [(0, 10)], 1.0) == 1.0


def test_metric_errors():
    with pytest.raises(ValueError, match="one entry per query"):
        recall_at_1([[(0, 1)]], [(0, 1), (1, 2)], 0.5)
    with pytest.raises(ValueError, match="iou must lie in"):
        recall_at_1([[(0, 1)]], [(0, 1)], 0.0)
    with pytest.raises(ValueError, match="no query"):
        mean_iou([], [])
    with pytest.raises(ValueError, match="start <= end"):
        temporal_iou((5, 1), (0, 1))
    with pytest.raises(TypeError, match="pair"):
        mean_iou([[(0, 1)]], [(0, 1, 2)])


# -- the model ---------------------------------------------------------------------------------------------------------

def test_tiny_shapes_and_one_batched_vqa_call(tiny):
    m = tiny.model
    inputs = tiny.example_inputs(batch=2, frames=8)
    calls = []
    handle = m.vqa.vision_model.register_forward_hook(lambda mod, args, out: calls.append(out.last_hidden_state.shape[0]))
    try:
        with torch.no_grad():
            logits = m(**inputs)
    finally:
        handle.remove()
    assert logits.shape == (2, inputs["input_ids"].shape[1], 512)
    assert calls == [16]                                           # 2 videos x 8 frames, one VQA batch
    assert inputs["input_ids"].shape[1] == 6 + 8 * 5 + 4


def test_vqa_answers_fill_the_prompt_slots(tiny, monkeypatch):
    m, tok = tiny.model, tiny.model.tokens
    inputs = tiny.example_inputs(frames=6)
    margins = torch.tensor([[-1.0, 2.0, 0.5, -0.1, 3.0, -4.0]])
    monkeypatch.setattr(m, "frame_margins", lambda *a, **k: margins)
    seen = []
    handle = m.llm.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    try:
        with torch.no_grad():
            m(**inputs)
    finally:
        handle.remove()
    slots = inputs["input_ids"] == tok.llm_slot
    filled = seen[0][slots].tolist()
    assert filled == [tok.llm_no, tok.llm_yes, tok.llm_yes, tok.llm_no, tok.llm_yes, tok.llm_no]
    assert torch.equal(seen[0][~slots], inputs["input_ids"][~slots])   # everything else untouched


def test_frame_margins_are_the_vqa_yes_minus_no_logit(tiny):
    m = tiny.model
    inputs = tiny.example_inputs(frames=4, seed=1)
    with torch.no_grad():
        margins = m.frame_margins(inputs["pixel_values"], inputs["vqa_input_ids"])
        one = m.vqa(pixel_values=inputs["pixel_values"][0, 2:3], input_ids=inputs["vqa_input_ids"]).logits[0, -1]
    assert margins.shape == (1, 4)
    assert margins[0, 2].item() == pytest.approx((one[m.tokens.vqa_yes] - one[m.tokens.vqa_no]).item(), abs=1e-5)


def test_generate_and_ground(tiny):
    m = tiny.model
    inputs = tiny.example_inputs()
    out = m.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)

    class Decoder:
        def decode(self, ids, skip_special_tokens=True):
            assert len(ids) == 4
            return "The door opens from 2 to 5 seconds."

    spans = m.ground(Decoder(), inputs["pixel_values"], inputs["input_ids"], inputs["vqa_input_ids"], max_new_tokens=4)
    assert spans == [[(2.0, 5.0)]]


def test_full_dims():
    zm = zoo.build("llm4vg", "full")
    llm, vqa = zm.model.llm.config, zm.model.vqa.config
    # Vicuna-7B / Llama-2-7B: MHA, 512 KiB of bf16 KV per token.
    assert (llm.num_hidden_layers, llm.hidden_size, llm.num_attention_heads, llm.num_key_value_heads) == (32, 4096, 32, 32)
    assert (llm.intermediate_size, llm.vocab_size) == (11008, 32000)
    assert 2 * zm.llm.layers * zm.llm.kv_heads * zm.llm.head_dim * 2 == 512 * 1024
    d, f, V = 4096, 11008, 32000
    assert sum(p.numel() for p in zm.model.llm.parameters()) == 2 * V * d + 32 * (4 * d * d + 3 * d * f + 2 * d) + d == 6_738_415_616
    # BLIP-2 OPT-2.7B: EVA ViT-g, 32 queries, OPT 32 layers x 2560.
    assert (vqa.vision_config.hidden_size, vqa.vision_config.num_hidden_layers, vqa.num_query_tokens) == (1408, 39, 32)
    assert (vqa.text_config.num_hidden_layers, vqa.text_config.hidden_size, vqa.text_config.ffn_dim) == (32, 2560, 10240)
    assert zm.default_frames == 30 and zm.visual_tokens(30) == 210


def test_errors(tiny):
    m = tiny.model
    inputs = tiny.example_inputs(frames=4)
    with pytest.raises(ValueError, match="one answer slot per frame"):
        m.fill_answers(inputs["input_ids"], torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, frames"):
        m.frame_margins(inputs["pixel_values"][0], inputs["vqa_input_ids"])
    with pytest.raises(ConfigError, match="frames must be a positive integer"):
        tiny.example_inputs(frames=0)
    with pytest.raises(ConfigError, match="llm_slot"):
        LLM4VG(m.vqa.config, m.llm.config, LLM4VGTokens(1, 2, 3, 4, 10_000))
    assert parse_spans("from 3 to 7") == [(3.0, 7.0)]

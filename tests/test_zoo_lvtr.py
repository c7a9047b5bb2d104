"""LVTR zoo entry: span range, key-padding masks, SDPA export, full dims."""
import pytest
import torch

from vopt import zoo
from vopt.errors import ConfigError


@pytest.fixture(scope="module")
def tiny():
    return zoo.build("lvtr")


def run(zm, inputs):
    with torch.no_grad():
        return zm.model(**inputs)


def test_tiny_shapes_and_spans_in_unit_interval(tiny):
    out = run(tiny, tiny.example_inputs(batch=3, seed=1))
    q = 10 * 2                                               # 10 queries per sentence x 2 sentences
    assert out.spans.shape == (3, q, 2) and out.class_logits.shape == (3, q, 2)
    assert (out.spans > 0).all() and (out.spans < 1).all()
    assert (out.class_logits.abs() <= 1 + 1e-5).all()        # cosine similarities
    assert tiny.default_frames == 16 and tiny.visual_tokens(16) == 16


def test_padded_frames_do_not_change_outputs(tiny):
    inputs = tiny.example_inputs(valid_frames=10)
    assert inputs["frame_mask"][0].tolist() == [True] * 10 + [False] * 6
    ref = run(tiny, inputs)
    noisy = dict(inputs, frame_features=inputs["frame_features"].clone())
    noisy["frame_features"][:, 10:] = 50 * torch.randn(1, 6, 512)
    got = run(tiny, noisy)
    torch.testing.assert_close(got.spans, ref.spans, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.class_logits, ref.class_logits, atol=1e-6, rtol=0)
    # A change to a *valid* frame does change them (the check above can fail).
    valid_changed = dict(inputs, frame_features=noisy["frame_features"].clone())
    valid_changed["frame_features"][:, 3] = 50 * torch.randn(1, 512)   # (a constant shift would vanish in the input LN)
    assert not torch.allclose(run(tiny, valid_changed).spans, ref.spans, atol=1e-4)


def test_padded_video_equals_the_unpadded_one(tiny):
    padded = tiny.example_inputs(valid_frames=10)
    short = {"frame_features": padded["frame_features"][:, :10], "frame_mask": padded["frame_mask"][:, :10],
             "sentence_features": padded["sentence_features"]}
    a, b = run(tiny, padded), run(tiny, short)
    torch.testing.assert_close(a.spans, b.spans, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.class_logits, b.class_logits, atol=1e-5, rtol=1e-5)


def test_padded_sentences_are_masked(tiny):
    inputs = tiny.example_inputs()
    mask = torch.tensor([[True, False]])
    ref = run(tiny, dict(inputs, sentence_mask=mask))
    changed = dict(inputs, sentence_mask=mask, sentence_features=inputs["sentence_features"].clone())
    changed["sentence_features"][:, 1] = 50 * torch.randn(512)
    got = run(tiny, changed)
    torch.testing.assert_close(got.spans, ref.spans, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.class_logits[..., 0], ref.class_logits[..., 0], atol=1e-6, rtol=0)


def test_attention_exports_as_sdpa_nodes_only(tiny):
    inputs = tiny.example_inputs(valid_frames=12)
    ep = torch.export.export(tiny.model, (), inputs, strict=False)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    # 2 encoder self-attentions + 2 x (decoder self + cross) attention, no matmul-softmax-matmul left.
    assert targets.count(torch.ops.aten.scaled_dot_product_attention.default) == 2 + 2 * 2
    assert torch.ops.aten._softmax.default not in targets and torch.ops.aten.softmax.int not in targets
    out = ep.module()(**inputs)
    torch.testing.assert_close(out.spans, run(tiny, inputs).spans)


def test_example_input_errors_name_the_argument(tiny):
    with pytest.raises(ConfigError, match="valid_frames"):
        tiny.example_inputs(valid_frames=17)
    with pytest.raises(ConfigError, match="valid_frames"):
        tiny.example_inputs(valid_frames=0)
    with pytest.raises(ConfigError, match="frames"):
        tiny.example_inputs(frames=0)
    with pytest.raises(ValueError, match="frame_features"):
        tiny.model(torch.randn(16, 512), torch.ones(1, 16, dtype=torch.bool), torch.randn(1, 2, 512))


def test_full_size_dims_are_the_published_ones():
    zm = zoo.build("lvtr", "full")
    m = zm.model
    assert all(p.device.type == "meta" for p in m.parameters())
    # d 256, 8 heads x 32, FFN 1024, 4 post-norm encoder + 4 decoder layers, 40 queries (10 x 4 sentences).
    assert m.d_model == 256 and len(m.encoder) == 4 and len(m.decoder) == 4 and m.num_queries == 40
    attn = m.encoder[0].self_attn
    assert attn.num_heads == 8 and attn.head_dim == 32
    assert m.encoder[0].ffn[0].out_features == 1024 and m.decoder[0].ffn[0].out_features == 1024
    assert m.input_vid_proj[2].in_features == 512 and m.input_vid_proj[2].out_features == 256
    assert m.input_txt_proj[2].in_features == 512
    inputs = zm.example_inputs()
    assert inputs["frame_features"].shape == (1, 64, 512) and inputs["sentence_features"].shape == (1, 4, 512)
    assert zm.default_frames == 64                           # + 4 sentences = 68 encoder tokens

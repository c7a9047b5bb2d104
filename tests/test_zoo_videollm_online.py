"""VideoLLM-online zoo entry: CLS + pooled frame tokens, streaming prefill on a persistent cache == offline prefill."""
import pytest
import torch

import vopt
from vopt import zoo
from vopt.errors import ConfigError

HALF_PROMPT = 3                      # example prompts: 3 text ids, the frames, 3 text ids


@pytest.fixture(scope="module")
def tiny():
    return zoo.build("videollm-online")


def test_full_size_dims():
    zm = zoo.build("videollm-online", "full")
    m = zm.model
    vc, tc = m.vision.config, m.language_model.config
    assert (vc.num_hidden_layers, vc.hidden_size, vc.num_attention_heads, vc.intermediate_size) == (24, 1024, 16, 4096)
    assert vc.hidden_size // vc.num_attention_heads == 64 and (vc.image_size // vc.patch_size) ** 2 == 576
    assert isinstance(m.vision.head.attention, torch.nn.MultiheadAttention)                              # the MAP head gives the CLS token
    assert [(l.in_features, l.out_features) for l in m.connector if isinstance(l, torch.nn.Linear)] == [(1024, 4096), (4096, 4096)]
    assert (tc.num_hidden_layers, tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads) == (32, 4096, 32, 8)
    assert (tc.intermediate_size, tc.vocab_size) == (14336, 128256)
    assert m.tokens_per_frame == 10 == 1 + 3 * 3 and m.interval_token_id == 11
    assert zm.default_frames == 1200 and zm.visual_tokens(1200) == 12000
    c = zoo.cost("videollm-online")
    assert c.kv_bytes_per_token == 128 * 1024
    assert c.params_per_stage["connector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert c.params_per_stage["language_model"] == 8_030_261_248                 # Llama-3-8B
    assert 3.0e8 < c.params_per_stage["vision"] < 3.3e8                          # SigLIP-L vision tower (with head)


def test_frame_tokens_are_cls_then_pooled_patches(tiny):
    m = tiny.model
    assert m.tokens_per_frame == 5 and tiny.visual_tokens(8) == 40
    frames = tiny.example_inputs(frames=3)["pixel_values_videos"][0]
    with torch.no_grad():
        got = m.frame_embeddings(frames)
        out = m.vision(pixel_values=frames)
        grid = out.last_hidden_state.reshape(3, 4, 4, 64)
        pooled = torch.stack([grid[:, i:i + 2, j:j + 2].mean((1, 2)) for i in (0, 2) for j in (0, 2)], dim=1)
        want = m.connector(torch.cat([out.pooler_output[:, None], pooled], dim=1))
    assert got.shape == (3, 5, 128) and torch.allclose(got, want, atol=1e-6)


def test_streaming_prefill_equals_full_prefill(tiny):
    m = tiny.model
    inputs = tiny.example_inputs(frames=6)
    ids, video = inputs["input_ids"], inputs["pixel_values_videos"]
    stride = 1 + m.tokens_per_frame                                               # interval id + frame tokens
    with torch.no_grad():
        offline = m(ids[:, :HALF_PROMPT + 6 * stride], video)
    cache = m.new_cache()
    m.prefill_ids(ids[:, :HALF_PROMPT], cache)
    assert cache.get_seq_length() == HALF_PROMPT
    for i, logits in enumerate(m.stream(video, cache)):
        assert cache.get_seq_length() == HALF_PROMPT + (i + 1) * stride
        assert (logits - offline[:, HALF_PROMPT + (i + 1) * stride - 1]).abs().max() <= 1e-4
    assert (logits - offline[:, -1]).abs().max() <= 1e-4
    # Frames from an iterator (a camera) give the same result.
    cache2 = m.new_cache()
    m.prefill_ids(ids[:, :HALF_PROMPT], cache2)
    last = list(m.stream((f for f in video.unbind(1)), cache2))[-1]
    assert torch.equal(last, logits)


def test_respond_decodes_greedily_onto_the_cache(tiny):
    m = tiny.model
    inputs = tiny.example_inputs(frames=2)
    ids, video = inputs["input_ids"], inputs["pixel_values_videos"]
    prefix = ids[:, :HALF_PROMPT + 2 * (1 + m.tokens_per_frame)]
    cache = m.new_cache()
    m.prefill_ids(ids[:, :HALF_PROMPT], cache)
    logits = list(m.stream(video, cache))[-1]
    start = cache.get_seq_length()
    new = m.respond(logits, cache, max_new_tokens=3, eos_token_id=-1)
    assert new.shape == (1, 3) and cache.get_seq_length() == start + 3
    with torch.no_grad():                                                          # offline greedy reference
        seq = prefix
        for _ in range(3):
            seq = torch.cat([seq, m(seq, video)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(new, seq[:, prefix.shape[1]:])


def test_should_respond_threshold(tiny):
    m = tiny.model
    logits = torch.zeros(2, 512)
    logits[0, m.interval_token_id] = 20.0                                         # p(interval) ~ 1: keep watching
    assert m.should_respond(logits).tolist() == [False, True]
    assert m.should_respond(logits, threshold=1.1).tolist() == [True, True]


def test_streaming_on_the_optimized_copy(tiny):
    inputs = tiny.example_inputs(frames=2)
    opt = vopt.optimize(tiny.model, example_inputs=inputs)
    assert all(ev.exported for ev in opt.report.stage_events)
    cache, ref_cache = opt.new_cache(), tiny.model.new_cache()
    got = list(opt.stream(inputs["pixel_values_videos"], cache))[-1]
    ref = list(tiny.model.stream(inputs["pixel_values_videos"], ref_cache))[-1]
    assert (got - ref).abs().max() <= 1e-5
    lm_events = [ev for ev in opt.report.stage_events if ev.stage == "language_model" and not ev.exported]
    assert lm_events and all(ev.reason for ev in lm_events)                       # the cached calls ran eagerly


def test_tiny_generate(tiny):
    inputs = tiny.example_inputs(batch=2, frames=3)
    out = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 3)


def test_errors(tiny):
    m = tiny.model
    with pytest.raises(ConfigError, match="frames"):
        tiny.example_inputs(frames=0)
    inputs = tiny.example_inputs(frames=2)
    with pytest.raises(ValueError, match="placeholders"):
        m(inputs["input_ids"], torch.cat([inputs["pixel_values_videos"]] * 2, dim=1))
    with pytest.raises(ValueError, match="pixel_values_videos"):
        m(inputs["input_ids"], inputs["pixel_values_videos"][0])
    with pytest.raises(ValueError, match="frames tensor"):
        next(m.stream(inputs["pixel_values_videos"][0], m.new_cache()))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        m.respond(torch.zeros(1, 512), m.new_cache(), max_new_tokens=0)

"""SeViLA zoo entry: published dims, the localizer -> top-k -> answerer chain, token ids, errors."""
import pytest
import torch

from vopt import zoo
from vopt.errors import ConfigError
from vopt.zoo._sevila_modules import SeViLATokens


@pytest.fixture(scope="module")
def tiny():
    return zoo.build("sevila")


@pytest.fixture(scope="module")
def full():
    return zoo.build("sevila", "full")


def test_full_dims_are_the_published_ones(full):
    m = full.model
    v, q, t = m.vision.config, m.localizer_qformer.qformer.config, m.t5.config
    # EVA-CLIP ViT-g/14 at 224 px (LAVIS: 40 layers minus the last): 16x16 patches + CLS = 257 tokens per frame.
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1408, 6144, 39, 16)
    assert v.hidden_size // v.num_attention_heads == 88
    assert (v.image_size // v.patch_size) ** 2 + 1 == 257
    # HF's Blip2VisionConfig defaults are EVA-g's.
    import transformers as T
    d = T.Blip2VisionConfig()
    assert (d.hidden_size, d.intermediate_size, d.num_hidden_layers, d.num_attention_heads, d.image_size, d.patch_size) == (1408, 6144, 39, 16, 224, 14)
    # Q-Former: BERT-base, cross-attention every 2nd layer onto the 1408-wide features, 32 queries, projection to 2048.
    assert (q.hidden_size, q.num_hidden_layers, q.num_attention_heads, q.cross_attention_frequency, q.encoder_hidden_size) == (768, 12, 12, 2, 1408)
    for bridge in (m.localizer_qformer, m.answerer_qformer):
        assert bridge.query_tokens.shape == (1, 32, 768)
        assert (bridge.projection.in_features, bridge.projection.out_features) == (768, 2048)
        assert sum(layer.has_cross_attention for layer in bridge.qformer.encoder.layer) == 6
    # Flan-T5-XL.
    assert (t.d_model, t.d_kv, t.num_heads, t.num_layers, t.num_decoder_layers, t.d_ff, t.vocab_size) == (2048, 64, 32, 24, 24, 5120, 32128)
    assert t.is_gated_act and t.dense_act_fn.startswith("gelu")
    assert (m.num_keyframes, full.default_frames, full.visual_tokens(32)) == (4, 32, 128)
    # KV per token of the T5 decoder (bf16): 24 layers x 32 heads x 64, K and V = 192 KiB.
    assert 2 * full.llm.layers * full.llm.kv_heads * full.llm.head_dim * 2 == 192 * 1024


def test_full_parameter_counts(full):
    m = full.model
    w, mlp, P = 1408, 6144, 257
    # norms, qkv with bias (EVA learns q and v biases only, k's is 0; HF stores all three), projection, MLP
    layer = 4 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * mlp + mlp) + (mlp * w + w)
    vit = (3 * 14 * 14 * w + w) + w + P * w + 39 * layer
    assert sum(p.numel() for p in m.vision.parameters()) == vit == 985_949_440
    d, f, V = 2048, 5120, 32128
    attn = 4 * d * d
    enc = 24 * (attn + 3 * d * f + 2 * d) + d
    dec = 24 * (2 * attn + 3 * d * f + 3 * d) + d
    rel = 2 * 32 * 32                                  # relative-position buckets x heads, encoder and decoder
    assert sum(p.numel() for p in m.t5.parameters()) == V * d + enc + dec + rel   # lm_head tied in transformers 5.x
    a, b = (sum(p.numel() for p in br.parameters()) for br in (m.localizer_qformer, m.answerer_qformer))
    assert a == b and 100e6 < a < 115e6                # query path of BLIP-2's Q-Former (~107M) + queries + projection
    assert 3.9e9 < sum(p.numel() for p in m.parameters()) < 4.1e9


def test_tiny_shapes(tiny):
    inputs = tiny.example_inputs(batch=2, frames=8)
    with torch.no_grad():
        out = tiny.model(**inputs)
    assert out.frame_scores.shape == (2, 8) and out.answer_logits.shape == (2, 5)
    assert out.keyframes.shape == (2, 2) and out.keyframes.dtype == torch.long
    assert (out.keyframes[:, 0] < out.keyframes[:, 1]).all()        # temporal order


def test_frame_scores_are_the_yes_logit_and_frames_are_independent(tiny):
    m = tiny.model
    inputs = tiny.example_inputs(frames=8, seed=3)
    calls = []
    handle = m.t5.register_forward_hook(lambda mod, args, kwargs_out: calls.append(kwargs_out.logits))
    try:
        with torch.no_grad():
            out = m(**inputs)
    finally:
        handle.remove()
    assert len(calls) == 2 and calls[0].shape[0] == 8                 # the 8 localizer passes are ONE batched T5 call
    assert torch.equal(out.frame_scores, calls[0][:, 0, m.tokens.yes_token_id].view(1, 8))
    assert torch.equal(out.answer_logits, calls[1][:, 0, list(m.tokens.answer_token_ids)])
    assert out.frame_scores.std() > 1e-3                              # the frames are told apart
    with torch.no_grad():
        feats = m.vision(pixel_values=inputs["pixel_values"].flatten(0, 1)).last_hidden_state.unflatten(0, (1, 8))
        one = m.localize(feats[:, 5:6], inputs["loc_input_ids"], inputs["loc_attention_mask"])
    assert torch.allclose(one[0, 0], out.frame_scores[0, 5], atol=1e-5)


@pytest.mark.parametrize("scores,expected", [
    ([0.0, 5.0, 1.0, 2.0, 9.0, -1.0, 0.5, 3.0], [4, 1]),
    ([9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 8.0], [0, 7]),
    ([-5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0], [6, 7]),
])
def test_keyframes_are_the_top_scored_frames(tiny, scores, expected):
    """Set the localizer's "yes" logits through a hook on the T5 and check what the answerer receives."""
    m = tiny.model
    inputs = tiny.example_inputs(frames=8)
    yes = m.tokens.yes_token_id

    def set_yes_logits(mod, args, kwargs, out):
        if out.logits.shape[0] == 8:                                  # the localizer's batched call (answerer: batch 1)
            out.logits[:, 0, yes] = torch.tensor(scores)
        return out

    seen = []
    hooks = [m.t5.register_forward_hook(set_yes_logits, with_kwargs=True),
             m.answerer_qformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))]
    try:
        with torch.no_grad():
            out = m(**inputs)
            feats = m.vision(pixel_values=inputs["pixel_values"][0]).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    assert out.frame_scores.tolist() == [scores]
    assert out.keyframes.tolist() == [sorted(expected)]
    assert torch.equal(seen[0], feats[sorted(expected)])              # the answerer sees exactly those frames


def test_the_two_qformers_have_distinct_weights(tiny):
    loc, ans = tiny.model.localizer_qformer, tiny.model.answerer_qformer
    loc_params = {id(p) for p in loc.parameters()}
    assert not loc_params & {id(p) for p in ans.parameters()}
    assert not torch.equal(loc.query_tokens, ans.query_tokens)
    assert not torch.equal(loc.projection.weight, ans.projection.weight)


class _WordTokenizer:
    """A whitespace tokenizer with a fixed vocabulary (stands in for the Flan-T5 tokenizer)."""

    pad_token_id = 0

    def __init__(self, words):
        self.vocab = {w: i for i, w in enumerate(["<pad>", *words])}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab[w] for w in text.replace(":", " :").split()]}


def test_token_ids_come_from_the_tokenizer():
    tok = _WordTokenizer(["Frame", ":", "yes", "no", "A", "B", "C", "D", "E", "1", "2", "3", "4"])
    ids = SeViLATokens.from_tokenizer(tok, num_keyframes=4)
    v = tok.vocab
    assert ids.yes_token_id == v["yes"]
    assert ids.answer_token_ids == tuple(v[c] for c in "ABCDE")
    assert ids.frame_prefix_ids == (v["Frame"], v[":"])
    assert ids.keyframe_prefix_ids[2] == (v["Frame"], v["3"], v[":"])
    ids.validate(len(v), 4)
    tok.vocab["yes"] = None
    tok.__class__ = type("Split", (_WordTokenizer,), {"__call__": lambda self, text, add_special_tokens=False: {"input_ids": [1, 2] if text == "yes" else [1]}})
    with pytest.raises(ValueError, match="'yes' must be one token"):
        SeViLATokens.from_tokenizer(tok, num_keyframes=4)


def test_custom_token_ids_are_used():
    tokens = SeViLATokens.reserved(256, 2)
    custom = SeViLATokens(yes_token_id=200, answer_token_ids=(201, 202, 203), frame_prefix_ids=tokens.frame_prefix_ids,
                          keyframe_prefix_ids=tokens.keyframe_prefix_ids)
    zm = zoo.get("sevila").build("tiny", torch.device("cpu"), torch.float32, tokens=custom)
    inputs = zm.example_inputs()
    assert int(inputs["loc_input_ids"].max()) < 200
    with torch.no_grad():
        out = zm.model(**inputs)
    assert out.answer_logits.shape == (1, 3)


def test_errors():
    zm = zoo.build("sevila")
    with pytest.raises(ConfigError, match="frames must be at least num_keyframes=2"):
        zm.example_inputs(frames=1)
    with pytest.raises(ConfigError, match="batch must be a positive integer"):
        zm.example_inputs(batch=0)
    inputs = zm.example_inputs()
    inputs["pixel_values"] = inputs["pixel_values"][:, :1]
    with pytest.raises(ValueError, match="fewer than num_keyframes"):
        zm.model(**inputs)
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, frames"):
        zm.model(**{**inputs, "pixel_values": inputs["pixel_values"][0]})
    bad = SeViLATokens.reserved(256, 2)
    with pytest.raises(ConfigError, match="must lie in"):
        bad.validate(100, 2)
    with pytest.raises(ConfigError, match="needs 3 prefixes"):
        bad.validate(256, 3)

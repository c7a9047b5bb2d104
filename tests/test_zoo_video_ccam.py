"""Video-CCAM zoo entry: the causal cross-attention mask, the projector, causality end to end, full dims."""
import pytest
import torch

from vopt import zoo
from vopt.errors import ConfigError
from vopt.zoo import _ccam_projector
from vopt.zoo._ccam_projector import CCAMProjector, ccam_last_frame, ccam_mask


def allowed_frames(mask_row: torch.Tensor, tokens_per_frame: int) -> list:
    """Frames a query may attend to, checking that each frame is all-or-nothing."""
    per_frame = mask_row.view(-1, tokens_per_frame)
    assert (per_frame.all(1) | ~per_frame.any(1)).all(), "a frame is partially visible"
    return per_frame.all(1).nonzero().flatten().tolist()


@pytest.mark.parametrize("rule", ["ceil", "floor"])
def test_query_group_g_sees_exactly_frames_0_to_g_when_t_divides_q(rule):
    q, t, p = 64, 8, 3
    mask = ccam_mask(q, t, p, rule=rule)
    assert mask.shape == (q, t * p) and mask.dtype == torch.bool
    for i in range(q):
        g = i // (q // t)                              # query group of query i
        assert allowed_frames(mask[i], p) == list(range(g + 1))


@pytest.mark.parametrize("rule", ["ceil", "floor"])
@pytest.mark.parametrize("q,t,p", [(10, 3, 2), (64, 6, 4), (4, 10, 1), (7, 7, 2), (5, 1, 3), (1024, 96, 1)])
def test_mask_properties_for_any_t(rule, q, t, p):
    mask = ccam_mask(q, t, p, rule=rule)
    assert mask.shape == (q, t * p)
    last = ccam_last_frame(q, t, rule)
    assert last.shape == (q,)
    assert (last >= 0).all() and (last <= t - 1).all()
    assert (last[1:] >= last[:-1]).all(), "later queries must see at least the frames earlier ones see"
    for i in range(q):
        frames = allowed_frames(mask[i], p)
        assert frames == list(range(int(last[i]) + 1))  # a prefix of frames: frame 0 always, nothing after g(i)
    if rule == "ceil":
        assert int(last[-1]) == t - 1, "the last query sees the whole video"
    if t == 1:
        assert mask.all()


def test_rules_differ_only_when_t_does_not_divide_q():
    assert torch.equal(ccam_last_frame(64, 8, "ceil"), ccam_last_frame(64, 8, "floor"))
    ceil, floor = ccam_last_frame(10, 4, "ceil"), ccam_last_frame(10, 4, "floor")
    assert ceil.tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert floor.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]


def test_per_video_frame_counts_mask_padding_and_use_each_videos_own_groups():
    q, t, p = 12, 6, 2
    counts = torch.tensor([6, 4, 1])
    mask = ccam_mask(q, t, p, frames_per_video=counts)
    assert mask.shape == (3, q, t * p)
    for b, n in enumerate(counts.tolist()):
        own = ccam_mask(q, n, p)                                 # the unpadded video's mask
        assert torch.equal(mask[b, :, : n * p], own)
        assert not mask[b, :, n * p:].any()                      # padded frames are never attended


def test_mask_errors_name_the_argument():
    with pytest.raises(ConfigError, match="rule"):
        ccam_mask(8, 2, 4, rule="round")
    with pytest.raises(ConfigError, match="num_frames"):
        ccam_mask(8, 0, 4)
    with pytest.raises(ConfigError, match="tokens_per_frame"):
        ccam_mask(8, 2, 0)
    with pytest.raises(ConfigError, match="num_queries"):
        ccam_mask(0, 2, 4)
    with pytest.raises(ConfigError, match="frames_per_video"):
        ccam_mask(8, 2, 4, frames_per_video=torch.ones(2, 2, dtype=torch.long))


def small_projector(**kw):
    torch.manual_seed(0)
    return CCAMProjector(num_queries=12, hidden_size=32, cross_hidden_size=24, num_heads=4, intermediate_size=64,
                         output_size=40, **kw).eval()


def test_projector_outputs_num_queries_tokens_for_any_frame_count():
    proj = small_projector()
    with torch.no_grad():
        for t in (1, 3, 5, 12, 17):
            assert proj(torch.randn(2, t, 9, 24)).shape == (2, 12, 40)


def test_projector_padded_video_equals_unpadded():
    proj = small_projector()
    short = torch.randn(1, 4, 9, 24)
    padded = torch.cat([short, 100 * torch.randn(1, 3, 9, 24)], dim=1)
    with torch.no_grad():
        ref = proj(short)
        got = proj(padded, frames_per_video=torch.tensor([4]))
        unmasked = proj(padded)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked, ref, atol=1e-3)


def test_projector_cross_attention_exports_as_one_masked_sdpa_node():
    proj = small_projector()
    ep = torch.export.export(proj, (torch.randn(1, 3, 9, 24),), strict=False)
    sdpa = [n for n in ep.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 1
    mask = sdpa[0].args[3] if len(sdpa[0].args) > 3 else sdpa[0].kwargs["attn_mask"]
    assert mask.meta["val"].dtype == torch.bool and tuple(mask.meta["val"].shape) == (12, 27)
    assert not [n for n in ep.graph.nodes if n.target == torch.ops.aten._softmax.default]


def test_projector_rejects_bad_config_and_input():
    with pytest.raises(ConfigError, match="num_heads"):
        CCAMProjector(8, 30, 16, 4, 32, 16)
    with pytest.raises(ConfigError, match="mask_rule"):
        CCAMProjector(8, 32, 16, 4, 32, 16, mask_rule="nearest")
    with pytest.raises(ValueError, match="visual_features"):
        small_projector()(torch.randn(2, 9, 24))


@pytest.fixture(scope="module")
def tiny():
    return zoo.build("video-ccam")


def test_tiny_shapes(tiny):
    inputs = tiny.example_inputs(batch=2)
    b, t = 2, 8
    assert inputs["pixel_values_videos"].shape == (b, t, 3, 32, 32)
    assert (inputs["input_ids"] == tiny.model.video_token_id).sum() == b * 64
    with torch.no_grad():
        logits = tiny.model(**inputs)
        feats = tiny.model.video_features(inputs["pixel_values_videos"])
    assert logits.shape == (b, 64 + 6, 512)
    assert feats.shape == (b, 64, 64)
    assert tiny.visual_tokens(8) == tiny.visual_tokens(32) == 64


@pytest.mark.parametrize("masked", [True, False])
def test_changing_the_last_frame_leaves_the_first_query_group_unchanged(tiny, masked, monkeypatch):
    """Causality end to end: frame T-1 never reaches query group 0, nor the LLM positions up to it."""
    if not masked:  # the same check without the mask must fail: the test can detect a broken mask
        monkeypatch.setattr(_ccam_projector, "ccam_mask",
                            lambda q, t, p, **kw: torch.ones(q, t * p, dtype=torch.bool))
    inputs = tiny.example_inputs()
    changed = dict(inputs, pixel_values_videos=inputs["pixel_values_videos"].clone())
    changed["pixel_values_videos"][:, -1] = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    group = 64 // 8                                          # queries per frame
    with torch.no_grad():
        f0, f1 = (tiny.model.video_features(x["pixel_values_videos"]) for x in (inputs, changed))
        l0, l1 = tiny.model(**inputs), tiny.model(**changed)
    first_video_pos = int((inputs["input_ids"][0] == tiny.model.video_token_id).nonzero()[0])
    upto = first_video_pos + group                           # text before the video + query group 0
    assert not torch.allclose(f0[:, -group:], f1[:, -group:], atol=1e-4)   # the last group sees frame T-1
    if masked:
        torch.testing.assert_close(f0[:, :group], f1[:, :group], atol=1e-6, rtol=0)
        torch.testing.assert_close(l0[:, :upto], l1[:, :upto], atol=1e-6, rtol=0)
    else:
        assert not torch.allclose(f0[:, :group], f1[:, :group], atol=1e-4)


def test_placeholder_count_mismatch_and_bad_inputs_raise(tiny):
    inputs = tiny.example_inputs()
    with pytest.raises(ValueError, match="placeholders"):
        tiny.model(input_ids=inputs["input_ids"][:, :-5].clone().fill_(3), pixel_values_videos=inputs["pixel_values_videos"])
    with pytest.raises(ValueError, match="pixel_values_videos"):
        tiny.model(input_ids=inputs["input_ids"], pixel_values_videos=inputs["pixel_values_videos"][0])
    with pytest.raises(ConfigError, match="frames"):
        tiny.example_inputs(frames=0)
    with pytest.raises(ConfigError, match="batch"):
        tiny.example_inputs(batch=-1)


def test_full_size_dims_are_the_published_ones():
    zm = zoo.build("video-ccam", "full")
    m = zm.model
    assert all(p.device.type == "meta" for p in m.parameters())
    # SigLIP-SO400M-384: 27 layers, 1152 wide, 16 heads x 72, MLP 4304, 384 px / patch 14 -> 27 x 27 = 729 tokens.
    v = m.vision.config
    assert (v.num_hidden_layers, v.hidden_size, v.num_attention_heads, v.intermediate_size) == (27, 1152, 16, 4304)
    assert v.hidden_size // v.num_attention_heads == 72
    assert (v.image_size // v.patch_size) ** 2 == 729
    # CCAM projector (7B-v1.2 projector_config): 1024 queries, width 1024, 16 heads, SwiGLU 4096, 1152 -> 3584.
    p = m.projector
    assert tuple(p.queries.shape) == (1024, 1024) and p.num_heads == 16 and p.head_dim == 64
    assert tuple(p.k_proj.weight.shape) == (1024, 1152) and tuple(p.v_proj.weight.shape) == (1024, 1152)
    assert tuple(p.gate_proj.weight.shape) == (4096, 1024) and tuple(p.down_proj.weight.shape) == (1024, 4096)
    assert tuple(p.out_proj.weight.shape) == (3584, 1024)
    # Qwen2.5-7B: 28 layers, 3584 wide, 28 heads / 4 KV, MLP 18944, rope theta 1e6.
    t = m.language_model.config
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size) == \
        (28, 3584, 28, 4, 18944)
    assert t.rope_parameters["rope_theta"] == 1e6 and t.vocab_size == 152064
    assert zm.llm.head_dim == 128 and zm.default_frames == 16
    assert zm.visual_tokens(16) == zm.visual_tokens(96) == 1024     # constant for any T
    n_vision = sum(x.numel() for x in m.vision.parameters())
    n_lm = sum(x.numel() for x in m.language_model.parameters())
    assert 4.2e8 < n_vision < 4.3e8                                 # SigLIP-SO400M vision tower (with its head)
    assert 7.6e9 < n_lm < 7.62e9                                    # Qwen2.5-7B: 7.61 B

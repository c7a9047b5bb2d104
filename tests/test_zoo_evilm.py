"""E-ViLM zoo entry: the VQ lookup, the QA forward, masked video modelling, assumed full dims, errors."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vopt import zoo
from vopt.errors import ConfigError
from vopt.zoo.evilm import VectorQuantizer, fixed_ratio_mask


@pytest.fixture(scope="module")
def tiny():
    return zoo.build("e-vilm")


def brute_force(x, codebook):
    """argmin over explicit squared distances (materializes N x K x D)."""
    return ((x[:, None, :] - codebook[None, :, :]) ** 2).sum(-1).argmin(dim=1)


@pytest.mark.parametrize("seed", range(5))
def test_vq_lookup_equals_brute_force_on_random_data(seed):
    gen = torch.Generator().manual_seed(seed)
    vq = VectorQuantizer(64, 16).double()
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(64, 16, generator=gen, dtype=torch.float64))
    x = torch.randn(3, 50, 16, generator=gen, dtype=torch.float64)
    ids = vq(x)
    assert ids.shape == (3, 50) and ids.dtype == torch.long
    assert torch.equal(ids.flatten(), brute_force(x.reshape(-1, 16), vq.codebook.detach()))
    assert torch.equal(vq.lookup(ids), vq.codebook.detach()[ids])


def test_vq_lookup_ties_and_duplicated_codes_pick_the_first_code():
    vq = VectorQuantizer(5, 2)
    codebook = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [4.0, 4.0]])   # code 3 duplicates code 1
    with torch.no_grad():
        vq.codebook.copy_(codebook)
    x = torch.tensor([
        [2.0, 0.0],    # exactly codes 1 and 3 -> 1
        [1.0, 0.0],    # equidistant from 0, 1 and 3 -> 0
        [1.0, 1.0],    # equidistant from 0, 1, 2, 3 -> 0
        [2.0, 1.0],    # equidistant from 1 and 3 only -> 1
        [3.0, 3.0],    # nearest 4
        [0.0, 1.0],    # equidistant from 0 and 2 -> 0
    ])
    assert vq(x).tolist() == [1, 0, 0, 1, 4, 0]
    assert torch.equal(vq(x), brute_force(x, codebook))


def test_vq_lookup_never_materializes_the_differences():
    """No intermediate of the lookup is N x K x D (or larger): the distances are one GEMM."""
    n, k, d = 40, 32, 24
    vq = VectorQuantizer(k, d)
    sizes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                sizes.append(out.numel())
            return out

    with torch.no_grad(), Record():
        vq(torch.randn(n, d))
    assert sizes and max(sizes) <= n * k < n * k * d


def test_tokenize_video_gives_code_ids_in_range(tiny):
    m = tiny.model
    inputs = tiny.example_inputs(batch=2)
    codes = m.tokenize_video(inputs["pixel_values"])
    assert codes.shape == (2, tiny.visual_tokens(4)) == (2, 32)
    assert codes.dtype == torch.long and 0 <= int(codes.min()) and int(codes.max()) < 128
    feats = m.vq_tokenizer.projection(m.vq_tokenizer.encoder(pixel_values=inputs["pixel_values"]).last_hidden_state)
    assert torch.equal(codes.flatten(), brute_force(feats.detach().reshape(-1, 32), m.vq_tokenizer.quantizer.codebook.detach()))


def test_qa_logits_shape_and_padding_mask(tiny):
    m = tiny.model
    inputs = tiny.example_inputs(batch=2)
    with torch.no_grad():
        logits = m(**inputs)
        assert logits.shape == (2, 16)
        # A right-padded question gives the same answer logits as the unpadded one.
        short = {k: v[:1] for k, v in inputs.items()}
        short["input_ids"], short["attention_mask"] = short["input_ids"][:, :5], short["attention_mask"][:, :5]
        padded = {k: v[:1].clone() for k, v in inputs.items()}
        padded["input_ids"][:, 5:] = 0
        padded["attention_mask"][:, 5:] = 0
        assert torch.allclose(m(**short), m(**padded), atol=1e-5)


def test_masked_video_modelling(tiny):
    m = tiny.model
    pixel_values = tiny.example_inputs(batch=2)["pixel_values"]
    mask = fixed_ratio_mask(2, 32, 0.5, torch.Generator().manual_seed(0))
    assert mask.sum(dim=1).tolist() == [16, 16]
    with torch.no_grad():
        # With nothing masked, the MVM path is the video encoder's own forward.
        clear = m.masked_video_logits(pixel_values, torch.zeros(2, 32, dtype=torch.bool))
        assert torch.allclose(clear, m.mvm_head(m.video_encoder(pixel_values=pixel_values).last_hidden_state), atol=1e-5)
        masked = m.masked_video_logits(pixel_values, mask)
    assert masked.shape == (2, 32, 128)
    assert not torch.allclose(masked[mask], clear[mask])
    loss = m.mvm_loss(pixel_values, mask)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_full_dims_are_the_assumed_ones():
    zm = zoo.build("e-vilm", "full")
    m = zm.model
    v, t = m.video_encoder.config, m.text_encoder.config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (768, 12, 12, 3072)
    assert (v.num_frames, v.image_size, v.patch_size, v.tubelet_size) == (16, 224, 16, 2)
    assert zm.visual_tokens(16) == (16 // 2) * (224 // 16) ** 2 == 1568
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size) == (768, 12, 12, 30522)
    assert len(m.fusion.layers) == 4
    assert tuple(m.vq_tokenizer.quantizer.codebook.shape) == (8192, 256)
    assert m.qa_head[-1].out_features == 1500
    # VideoMAE-B: 86.2M parameters (patch embedding 2 x 16 x 16 x 3 -> 768, 12 ViT-B layers, final LN).
    w = 768
    layer = 4 * w + (3 * w * w + 2 * w) + (w * w + w) + 2 * (w * 4 * w) + 5 * w   # norms, qkv (q/v bias), proj, MLP
    assert sum(p.numel() for p in m.video_encoder.parameters()) == (2 * 16 * 16 * 3 * w + w) + 12 * layer + 2 * w
    assert "assumption" in zoo.get("e-vilm").notes


def test_errors(tiny):
    with pytest.raises(ConfigError, match="frames must equal num_frames=4"):
        tiny.example_inputs(frames=8)
    with pytest.raises(ConfigError, match="batch must be a positive integer"):
        tiny.example_inputs(batch=0)
    with pytest.raises(ConfigError, match="num_codes must be a positive integer"):
        VectorQuantizer(0, 8)
    with pytest.raises(ValueError, match="code_dim=8"):
        VectorQuantizer(4, 8)(torch.randn(3, 7))
    with pytest.raises(ConfigError, match="ratio must lie in"):
        fixed_ratio_mask(1, 8, 1.0)

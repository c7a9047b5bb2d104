"""``vopt::attention`` reference backend vs float64 SDPA, including adversarial inputs.

Tolerances:
* float32 inputs: the reference computes in float32; vs a float64 SDPA the error
  is float32 rounding over <= 1024 keys: max abs error <= 2e-5 for O(1) inputs
  (observed ~1e-6), and <= 1e-4 with 50x outlier channels (larger logits).
* float16/bfloat16 inputs: FlashAttention's rule: the error vs float64 must be
  at most twice PyTorch's own SDPA error in the same dtype, plus one output ulp
  (both round the output once to the low-precision dtype).
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import vopt.ops  # noqa: F401
from vopt.errors import BackendUnavailableError
from vopt.ops.attention import reference_attention

ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def sdpa64(q, k, v, **kw):
    m = kw.get("attn_mask")
    if m is not None and m.is_floating_point():
        kw = {**kw, "attn_mask": m.double()}
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)


def check(q, k, v, atol32=2e-5, **kw):
    out = torch.ops.vopt.attention(q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:-1], v.shape[-1])
    exact = sdpa64(q, k, v, **kw)
    err = (out.double() - exact).abs().max().item()
    if q.dtype == torch.float32:
        assert err <= atol32, err
    else:
        torch_err = (F.scaled_dot_product_attention(q, k, v, **kw).double() - exact).abs().max().item()
        bound = 2 * torch_err + ULP[q.dtype] * max(1.0, exact.abs().max().item())
        assert err <= bound, (err, torch_err)


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_basic_and_causal(dtype, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (rand(2, 4, 33, 64, dtype=dtype, gen=g) for _ in range(3))
    check(q, k, v, is_causal=causal)


def test_gqa_and_cross_lengths():
    g = torch.Generator().manual_seed(1)
    q, k, v = rand(1, 8, 17, 32, gen=g), rand(1, 2, 45, 32, gen=g), rand(1, 2, 45, 48, gen=g)
    check(q, k, v, enable_gqa=True)
    check(q, k, v, enable_gqa=True, is_causal=True)


def test_outlier_channels():
    g = torch.Generator().manual_seed(2)
    q, k, v = rand(1, 2, 64, 64, gen=g), rand(1, 2, 64, 64, gen=g), rand(1, 2, 64, 64, gen=g)
    k[..., 5] += 50.0  # the per-channel key outliers seen in real LLMs
    q[..., 5] *= 3.0
    check(q, k, v, atol32=1e-4)


def test_all_equal_rows_and_zero_queries():
    q = torch.zeros(1, 2, 16, 32)
    k = torch.ones(1, 2, 16, 32)
    v = torch.randn(1, 2, 16, 32)
    check(q, k, v)
    out = torch.ops.vopt.attention(q, k, v)
    torch.testing.assert_close(out, v.mean(dim=-2, keepdim=True).expand_as(out), atol=1e-6, rtol=0)


def test_padding_masks_including_fully_masked_rows():
    g = torch.Generator().manual_seed(3)
    q, k, v = rand(2, 2, 12, 16, gen=g), rand(2, 2, 20, 16, gen=g), rand(2, 2, 20, 16, gen=g)
    keep = torch.ones(2, 1, 12, 20, dtype=torch.bool)
    keep[0, :, :, 15:] = False  # right padding of keys
    keep[1, :, 3] = False  # a row with every key masked
    check(q, k, v, attn_mask=keep)
    assert torch.ops.vopt.attention(q, k, v, attn_mask=keep)[1, :, 3].abs().max() == 0  # as torch CPU SDPA
    additive = torch.zeros(2, 1, 12, 20).masked_fill(~keep, float("-inf"))
    additive[0] += torch.randn(12, 20, generator=g)  # a relative-position-like bias
    check(q, k, v, attn_mask=additive)


def test_long_sequence():
    g = torch.Generator().manual_seed(4)
    q, k, v = rand(1, 1, 1024, 16, gen=g), rand(1, 1, 1024, 16, gen=g), rand(1, 1, 1024, 16, gen=g)
    check(q, k, v, is_causal=True)


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 2), hk=st.integers(1, 3), rep=st.integers(1, 3), lq=st.integers(1, 24), lk=st.integers(1, 24),
    d=st.sampled_from([8, 16, 40, 64]), causal=st.booleans(), scale=st.one_of(st.none(), st.floats(0.01, 2.0)),
    seed=st.integers(0, 2**16),
)
def test_property_matches_float64(b, hk, rep, lq, lk, d, causal, scale, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = rand(b, hk * rep, lq, d, gen=g), rand(b, hk, lk, d, gen=g), rand(b, hk, lk, d, gen=g)
    check(q, k, v, is_causal=causal, scale=scale, enable_gqa=rep > 1)


def test_inputs_not_mutated_and_output_fresh():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    copies = [t.clone() for t in (q, k, v)]
    out = torch.ops.vopt.attention(q, k, v)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), copies))
    assert out.is_contiguous()


def test_bad_inputs_raise_typed_errors():
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        reference_attention(q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match="dropout_p must be 0.0"):
        reference_attention(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="head_dim"):
        reference_attention(q, torch.randn(1, 4, 5, 4), q)
    with pytest.raises(TypeError, match="attn_mask must be bool or floating point"):
        reference_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.int64))


def test_forced_unavailable_backend(monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", "triton")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(BackendUnavailableError, match="triton: not implemented for this op"):
        torch.ops.vopt.attention(q, q, q)


def test_opcheck():
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    torch.library.opcheck(torch.ops.vopt.attention.default, (q, k, v), {"is_causal": True, "enable_gqa": True})
    mask = torch.rand(6, 6) > 0.5
    torch.library.opcheck(torch.ops.vopt.attention.default, (q, q, q, mask))

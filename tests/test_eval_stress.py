"""vopt.eval.stress: determinism, shapes (GQA), each kind has its statistic, typed errors, and
vopt::attention matches a float64 SDPA on every kind."""
import pytest
import torch
import torch.nn.functional as F

import vopt.ops  # noqa: F401  (registers torch.ops.vopt.attention)
from vopt.errors import ConfigError
from vopt.eval.stress import LONG_SEQUENCE_KV_LEN, StressKind, attention_stress_inputs

SMALL = dict(batch=2, heads=4, kv_heads=2, q_len=16, kv_len=256, head_dim=32)


def excess_kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    z = (x - x.mean()) / x.std()
    return float(z.pow(4).mean() - 3.0)


def channel_std(x: torch.Tensor) -> torch.Tensor:
    """Per-(head, channel) std over batch and tokens, [H, D]."""
    return x.double().transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1]).std(dim=1)


@pytest.mark.parametrize("kind", list(StressKind))
def test_deterministic_and_seed_dependent(kind):
    a = attention_stress_inputs(kind, **SMALL, seed=3)
    b = attention_stress_inputs(kind.value, **SMALL, seed=3)
    c = attention_stress_inputs(kind, **SMALL, seed=4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[2], c[2])


@pytest.mark.parametrize("kind", list(StressKind))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_shapes_dtypes_gqa(kind, dtype):
    q, k, v = attention_stress_inputs(kind, batch=2, heads=6, kv_heads=3, q_len=5, kv_len=7, head_dim=16, dtype=dtype)
    assert q.shape == (2, 6, 5, 16) and k.shape == (2, 3, 7, 16) and v.shape == (2, 3, 7, 16)
    assert q.dtype == k.dtype == v.dtype == dtype
    assert all(torch.isfinite(t).all() for t in (q, k, v))


def test_default_lengths():
    q, k, _ = attention_stress_inputs("gaussian", q_len=8)
    assert q.shape == (1, 4, 8, 64) and k.shape == (1, 4, 8, 64)          # kv_len defaults to q_len, kv_heads to heads
    for kind in ("long_sequence", "mixed"):
        _, k, _ = attention_stress_inputs(kind, q_len=8)
        assert k.shape[-2] == LONG_SEQUENCE_KV_LEN >= 4096
    _, k, _ = attention_stress_inputs("long_sequence", q_len=8, kv_len=100)  # overridable
    assert k.shape[-2] == 100


def test_gaussian_is_plain():
    q, k, v = attention_stress_inputs("gaussian", **SMALL)
    for t in (q, k, v):
        assert abs(t.mean().item()) < 0.05 and abs(t.std().item() - 1) < 0.05
        assert abs(excess_kurtosis(t)) < 0.2   # 2^15+ samples: sample excess kurtosis of a Gaussian is ~0 +- 0.03


@pytest.mark.parametrize("kind", ["k_channel_bias", "mixed"])
def test_k_channel_bias(kind):
    _, k, _ = attention_stress_inputs(kind, **SMALL)
    mean = k.double().mean(dim=(0, 2))           # [Hkv, D] per-channel mean over batch and tokens
    # Gaussian: |mean| ~ 1/sqrt(512) ~ 0.04 and std 1. With the bias the typical |mean| is ~6x the std.
    assert (mean.abs().median() / channel_std(k).median()).item() > 2.0
    _, g, _ = attention_stress_inputs("gaussian", **SMALL)
    assert g.double().mean(dim=(0, 2)).abs().max().item() < 0.3


@pytest.mark.parametrize("kind, which", [("k_outlier_channels", 1), ("q_outliers", 0), ("mixed", 0), ("mixed", 1)])
def test_outlier_channels(kind, which):
    t = attention_stress_inputs(kind, **SMALL)[which]
    std = channel_std(t)                                  # [H, D]
    ratio = std.max(dim=-1).values / std.median(dim=-1).values
    assert (ratio > 8).all(), ratio                       # 10x / 20x outliers; a Gaussian gives ~1.2
    assert ((std > 5 * std.median(dim=-1, keepdim=True).values).sum(-1) <= t.shape[-1] // 16).all()  # only a few
    g = attention_stress_inputs("gaussian", **SMALL)[which]
    gs = channel_std(g)
    assert (gs.max(dim=-1).values / gs.median(dim=-1).values < 2.5).all()   # Q has only 32 samples per channel


@pytest.mark.parametrize("kind", ["heavy_tailed_v", "mixed"])
def test_heavy_tailed_v(kind):
    _, _, v = attention_stress_inputs(kind, **SMALL)
    # Student-t(3) has infinite kurtosis; a sample of 2^15 gives excess kurtosis well above 3 (Gaussian: ~0).
    assert excess_kurtosis(v) > 3.0
    assert v.abs().max().item() > 10.0


def test_all_equal_rows():
    q, k, v = attention_stress_inputs("all_equal_rows", **SMALL)
    assert torch.equal(k, k[:, :, :1].expand_as(k))          # every key row identical per (batch, head)
    assert not torch.equal(v, v[:, :, :1].expand_as(v))
    out = torch.ops.vopt.attention(q, k, v, enable_gqa=True)  # all scores tie: uniform attention = mean of V
    expected = v.mean(dim=2, keepdim=True).repeat_interleave(2, dim=1).expand_as(out)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)  # float32 sum of 256 values


def test_mixed_repeats_leading_keys():
    _, k, _ = attention_stress_inputs("mixed", **SMALL)
    assert torch.equal(k[:, :, :16], k[:, :, :1].expand(-1, -1, 16, -1))
    assert not torch.equal(k[:, :, 16], k[:, :, 0])


@pytest.mark.parametrize("kind", list(StressKind))
def test_vopt_attention_matches_float64_sdpa(kind):
    kv_len = None if kind in (StressKind.LONG_SEQUENCE, StressKind.MIXED) else 256
    q, k, v = attention_stress_inputs(kind, batch=1, heads=4, kv_heads=2, q_len=16, kv_len=kv_len, head_dim=32)
    out = torch.ops.vopt.attention(q, k, v, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    # float32 softmax and a float32 sum of up to 4096 products: relative error ~1e-6 of the largest |v|.
    atol = 1e-5 * v.abs().max().item()
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("kwargs, name", [
    (dict(kind="nope"), "kind"),
    (dict(kind=3), "kind"),
    (dict(kind="gaussian", batch=0), "batch"),
    (dict(kind="gaussian", heads=2.0), "heads"),
    (dict(kind="gaussian", kv_heads=3), "kv_heads"),
    (dict(kind="gaussian", kv_heads=0), "kv_heads"),
    (dict(kind="gaussian", q_len=True), "q_len"),
    (dict(kind="gaussian", kv_len=-1), "kv_len"),
    (dict(kind="gaussian", head_dim=0), "head_dim"),
    (dict(kind="gaussian", dtype=torch.int8), "dtype"),
    (dict(kind="gaussian", seed="0"), "seed"),
])
def test_bad_arguments(kwargs, name):
    kind = kwargs.pop("kind")
    with pytest.raises(ConfigError, match=name) as info:
        attention_stress_inputs(kind, **kwargs)
    assert isinstance(info.value, ValueError)
    if name == "kind":
        assert "k_channel_bias" in str(info.value) and "mixed" in str(info.value)

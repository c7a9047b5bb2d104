"""Tests of vopt.kvcache: bit packing, VidKV/KIVI quantizers, stored-bits accounting (spec shared/specs/kvcache.md).

Measured relative errors (||deq - x|| / ||x||, seed 0, B1 H2 T256 D64, G=32), used for the bounds below:

    setting            keys N(0,1)  keys + 4 outlier channels x20   values N(0,1)
    reference (K1.5)   0.612        0.411                           0.467 (ternary, no scale, gamma 0.5)
    recommended (K1.5) 0.501        0.405                           0.428 (ternary, LS scale, gamma 0.7)
    KIVI-2             0.393        0.401                           0.392 (2-bit per token)
    rec., fraction 0   0.593        0.594 (normal channels 2.16)    -
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vopt.errors import ConfigError
from vopt.kvcache import (
    KVQuantMode,
    VidKVConfig,
    account,
    dequantize_keys,
    dequantize_values,
    kivi_config,
    pack_bits,
    pack_trits,
    quantize_keys,
    quantize_values,
    unpack_bits,
    unpack_trits,
)
from vopt.kvcache.quantizers import _inverse_coefficients, _real_coefficients, ternary_codes, ternary_scale


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


REF = VidKVConfig(mode="reference")
REC = VidKVConfig()
KIVI = kivi_config()


# ---------------------------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(0, 3), min_size=0, max_size=2),
    length=st.integers(0, 70),
    bits=st.sampled_from([1, 2, 4, 8]),
    word=st.sampled_from([torch.int32, torch.uint8]),
    seed=st.integers(0, 2**16),
)
def test_pack_bits_round_trip(lead, length, bits, word, seed):
    shape = (*lead, length)
    codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(seed))
    before = codes.clone()
    words = pack_bits(codes, bits, word_dtype=word)
    per = (32 if word == torch.int32 else 8) // bits
    assert words.dtype == word
    assert words.shape == (*lead, math.ceil(length / per))
    assert torch.equal(unpack_bits(words, bits, length).long(), codes)
    assert torch.equal(codes, before)


def test_pack_bits_layout_and_sign_bit():
    # code i at bits [2i, 2i+2): 1 | 2<<2 | 3<<4 = 57
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [57]
    # 16 codes of 3 fill all 32 bits: the int32 word is -1 and unpacks back
    w = pack_bits(torch.full((16,), 3), 2)
    assert w.tolist() == [-1]
    assert unpack_bits(w, 2, 16).tolist() == [3] * 16
    with pytest.raises(ValueError, match="2-bit codes"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_bits(torch.tensor([1]), 3)


@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(0, 3), max_size=2), length=st.integers(0, 53), seed=st.integers(0, 2**16))
def test_pack_trits_round_trip(lead, length, seed):
    trits = torch.randint(-1, 2, (*lead, length), generator=torch.Generator().manual_seed(seed)).to(torch.int8)
    before = trits.clone()
    packed = pack_trits(trits)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, math.ceil(length / 5))
    assert torch.equal(unpack_trits(packed, length), trits)
    assert torch.equal(trits, before)


def test_pack_trits_base3_layout():
    # digits (q+1) = 2,1,0,2,2 -> 2 + 1*3 + 0*9 + 2*27 + 2*81 = 221 (< 243)
    assert pack_trits(torch.tensor([1, 0, -1, 1, 1])).tolist() == [221]
    assert pack_trits(torch.ones(5, dtype=torch.int8)).tolist() == [242]
    with pytest.raises(ValueError, match="trits"):
        pack_trits(torch.tensor([2]))


# ---------------------------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------------------------
OUTLIERS = [3, 17, 40, 60]


def _outlier_keys():
    k = _randn(1, 2, 256, 64)
    k[..., OUTLIERS] *= 20
    return k


@pytest.mark.parametrize("cfg, bound", [(REF, 0.65), (REC, 0.53), (KIVI, 0.42)], ids=["reference", "recommended", "kivi"])
def test_key_error_gaussian(cfg, bound):
    k = _randn(1, 2, 256, 64)
    assert _rel(dequantize_keys(quantize_keys(k, cfg)), k) < bound


def test_recommended_keys_beat_reference():
    k = _randn(1, 2, 256, 64)
    assert _rel(dequantize_keys(quantize_keys(k, REC)), k) < _rel(dequantize_keys(quantize_keys(k, REF)), k) - 0.05


def test_anomalous_channels_protect_outliers():
    k = _outlier_keys()
    normal = [c for c in range(64) if c not in OUTLIERS]
    with_2bit = quantize_keys(k, VidKVConfig(anomalous_fraction=4 / 64))
    only_1bit = quantize_keys(k, VidKVConfig(anomalous_fraction=0.0))
    # the range ranking picks exactly the outlier channels, per head
    assert with_2bit.anomalous_idx.shape == (1, 2, 4)
    assert with_2bit.anomalous_idx.tolist() == [[OUTLIERS, OUTLIERS]]
    d2, d1 = dequantize_keys(with_2bit), dequantize_keys(only_1bit)
    # outlier channels: 2-bit per channel (0.40) beats the FFT-1-bit path (0.43) ...
    assert _rel(d2[..., OUTLIERS], k[..., OUTLIERS]) < 0.42 < _rel(d1[..., OUTLIERS], k[..., OUTLIERS])
    # ... and above all keeps the outliers out of the FFT, which otherwise smears them over every channel (0.59 vs 2.16)
    assert _rel(d2[..., normal], k[..., normal]) < 0.65
    assert _rel(d1[..., normal], k[..., normal]) > 1.5
    assert _rel(d2, k) < 0.75 * _rel(d1, k)


def _frequency_domain_keys(T=64, D=16):
    """Keys whose rfft coefficients (the D reals stored) are exactly ±1: a 1-bit ±s code reconstructs them exactly."""
    signs = torch.where(_randn(1, 1, T, D, seed=3) >= 0, 1.0, -1.0)
    nc = D // 2 + 1
    imag = torch.zeros(1, 1, T, nc)
    imag[..., 1: nc - 1] = signs[..., nc:]
    return torch.fft.irfft(torch.complex(signs[..., :nc], imag), n=D, dim=-1)


def test_rfft_sign_round_trip_is_exact_on_pm_s_spectra():
    k = _frequency_domain_keys()
    pk = quantize_keys(k, VidKVConfig(anomalous_fraction=0.0))
    # rfft stores exactly D reals per token (DC/Nyquist imaginary parts, always 0, are dropped)
    assert pk.easy.shape == (1, 1, 2, 16, 32)
    assert torch.allclose(pk.easy.scale.float(), torch.ones(1, 1, 2, 16))
    assert torch.allclose(dequantize_keys(pk), k, atol=1e-5)
    # the reference stores 2*D interleaved re/im reals (Hermitian-redundant), decoded to {0, s}: not exact
    ref = quantize_keys(k, VidKVConfig(mode="reference", anomalous_fraction=0.0))
    assert ref.easy.shape == (1, 1, 2, 32, 32)
    assert _rel(dequantize_keys(ref), k) > 0.3


@pytest.mark.parametrize("De", range(1, 13))
def test_real_coefficients_are_invertible(De):
    x = _randn(3, De, seed=De)
    r = _real_coefficients(x, reference=False)
    assert r.shape == (3, De)  # rfft: exactly De reals, odd and even
    assert torch.allclose(_inverse_coefficients(r, De, reference=False), x, atol=1e-5)
    rr = _real_coefficients(x, reference=True)
    assert rr.shape == (3, 2 * De)  # full fft, re/im interleaved
    assert torch.allclose(_inverse_coefficients(rr, De, reference=True), x, atol=1e-5)


def test_reference_sign_code_loses_negative_coefficients():
    # constant -1 channels: the only nonzero FFT coefficient is a negative DC. {0, s} decodes it to 0; ±s keeps it.
    k = -torch.ones(1, 1, 32, 8)
    assert torch.equal(dequantize_keys(quantize_keys(k, VidKVConfig(mode="reference", anomalous_fraction=0))),
                       torch.zeros_like(k))
    assert torch.allclose(dequantize_keys(quantize_keys(k, VidKVConfig(anomalous_fraction=0))), k, atol=1e-6)


def test_layer_split_is_pooled_head_split_is_batch_independent():
    k = _randn(2, 2, 64, 32)
    k[0, 1, :, 5] *= 30  # one head of one sample has an outlier channel
    ref = quantize_keys(k, VidKVConfig(mode="reference", anomalous_fraction=1 / 32))
    assert ref.anomalous_idx.tolist() == [5]  # one index vector for the whole layer
    alone = dequantize_keys(quantize_keys(k[1:], REC))
    batched = dequantize_keys(quantize_keys(k, REC))[1:]
    assert torch.equal(alone, batched)


def test_keys_tail_dtype_and_storage():
    k = _randn(1, 2, 70, 16).to(torch.bfloat16)
    before = k.clone()
    pk = quantize_keys(k, REC)
    out = dequantize_keys(pk)
    assert torch.equal(k, before)
    assert out.dtype == torch.bfloat16 and out.shape == k.shape
    assert pk.tail.dtype == torch.float16 and pk.tail.shape == (1, 2, 6, 16)
    assert torch.equal(out[:, :, 64:], k[:, :, 64:].to(torch.float16).to(torch.bfloat16))
    # nothing full precision is kept besides the tail: packed words, fp16 metadata, int16 indices
    assert pk.anomalous.words.dtype == pk.easy.words.dtype == torch.int32
    assert pk.anomalous.scale.dtype == pk.anomalous.zero.dtype == pk.easy.scale.dtype == torch.float16
    assert pk.easy.zero is None and pk.anomalous_idx.dtype == torch.int16


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 80), D=st.integers(1, 20),
    frac=st.sampled_from([0.0, 0.3, 0.5, 1.0]), mode=st.sampled_from(["reference", "recommended"]),
    G=st.sampled_from([4, 16, 32]), seed=st.integers(0, 2**16),
)
def test_any_shape_round_trips_with_fp16_tail(B, H, T, D, frac, mode, G, seed):
    cfg = VidKVConfig(mode=mode, anomalous_fraction=frac, key_group_size=G, value_group_size=G)
    k, v = _randn(B, H, T, D, seed=seed), _randn(B, H, T, D, seed=seed + 1)
    dk, dv = dequantize_keys(quantize_keys(k, cfg)), dequantize_values(quantize_values(v, cfg))
    assert dk.shape == dv.shape == k.shape and dk.dtype == dv.dtype == torch.float32
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()
    Tq = T - T % G
    assert torch.equal(dk[:, :, Tq:], k[:, :, Tq:].half().float())
    assert torch.equal(dv[:, :, Tq:], v[:, :, Tq:].half().float())
    if Tq:
        assert _rel(dk[:, :, :Tq], k[:, :, :Tq]) < 1.25  # worst of 1500 random cases 0.93 (tiny groups, reference {0, s})
    assert account(quantize_keys(k, cfg)).elements == k.numel()


# ---------------------------------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg, bound",
    [(REF, 0.50), (REC, 0.45), (KIVI, 0.42), (VidKVConfig(value_axis="token"), 0.45)],
    ids=["reference", "recommended", "kivi", "recommended-per-token"],
)
def test_value_error_gaussian(cfg, bound):
    v = _randn(1, 2, 256, 64, seed=1)
    assert _rel(dequantize_values(quantize_values(v, cfg)), v) < bound


def test_ternary_codes_threshold_and_scale():
    g = torch.tensor([[2.0, -1.0, 0.25, 0.75]])  # mean|v| = 1
    q = ternary_codes(g, 0.7)  # t = 0.7
    assert q.tolist() == [[1, -1, 0, 1]]
    assert ternary_scale(g, q).tolist() == [1.25]  # (2 + 1 + 0.75) / 3: LS scale of fixed codes
    assert ternary_codes(torch.tensor([[1.0, -1.0, 1.0, -1.0]]), 1.0).tolist() == [[0, 0, 0, 0]]  # |x| == t -> 0
    assert ternary_scale(torch.ones(1, 4), torch.zeros(1, 4, dtype=torch.int8)).tolist() == [0.0]


def test_ternary_values_end_to_end():
    # one channel, one group of 4 tokens: [2, -1, 0.25, 0.75]
    v = torch.tensor([2.0, -1.0, 0.25, 0.75]).reshape(1, 1, 4, 1)
    rec = quantize_values(v, VidKVConfig(value_group_size=4))
    assert rec.codes.words.dtype == torch.uint8 and rec.codes.codes().flatten().tolist() == [1, -1, 0, 1]
    assert dequantize_values(rec).flatten().tolist() == [1.25, -1.25, 0.0, 1.25]
    ref = quantize_values(v, VidKVConfig(mode="reference", value_group_size=4))  # gamma 0.5, no scale
    assert ref.codes.words.dtype == torch.int32 and ref.codes.codes().flatten().tolist() == [2, 0, 1, 2]
    assert dequantize_values(ref).flatten().tolist() == [1.0, -1.0, 0.0, 1.0]
    assert ref.codes.scale.tolist() == [[[[1.0]]]] and ref.codes.zero.tolist() == [[[[-1.0]]]]  # stored, as published


def test_value_storage_options():
    v = _randn(1, 2, 64, 16, seed=4)
    base3 = quantize_values(v, REC)
    two_bit = quantize_values(v, VidKVConfig(trit_packing="2bit"))
    assert two_bit.codes.zero is None and two_bit.codes.words.dtype == torch.int32  # no unused zero point stored
    assert torch.equal(dequantize_values(base3), dequantize_values(two_bit))
    assert two_bit.nbytes()["codes"] == 2 * 64 * 16 * 2 // 8 and base3.nbytes()["codes"] == math.ceil(2 * 64 * 16 / 5)
    bf = quantize_values(v, VidKVConfig(metadata_dtype="bfloat16"))
    assert bf.codes.scale.dtype == torch.bfloat16
    no_scale = quantize_values(v, VidKVConfig(value_scale=False))
    assert no_scale.codes.scale is None and no_scale.nbytes()["scales"] == 0
    assert set(dequantize_values(no_scale).unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_value_axis_token_needs_divisible_head_dim():
    with pytest.raises(ConfigError, match="value_group_size"):
        quantize_values(torch.zeros(1, 1, 4, 48), kivi_config(group_size=32))


# ---------------------------------------------------------------------------------------------------------------
# KIVI
# ---------------------------------------------------------------------------------------------------------------
def test_kivi_hand_computed_2bit_asymmetric():
    cfg = kivi_config(group_size=4)
    # keys: per channel over 4 tokens. channel 0: [0, .375, 2, 3] -> mn 0, s 1, codes [0,0,2,3] -> [0,0,2,3]
    #                                   channel 1: [-1, .5, 1, 5] -> mn -1, s 2, (x-mn)/s [0,.75,1,3] -> [0,1,1,3] -> [-1,1,1,5]
    k = torch.tensor([[0.0, -1.0], [0.375, 0.5], [2.0, 1.0], [3.0, 5.0]]).reshape(1, 1, 4, 2)
    k = torch.cat([k, k], dim=-1)  # D = 4: channels 2, 3 repeat 0, 1
    pk = quantize_keys(k, cfg)
    assert pk.anomalous_idx is None and pk.easy is None
    expect = torch.tensor([[0.0, -1.0], [0.0, 1.0], [2.0, 1.0], [3.0, 5.0]]).reshape(1, 1, 4, 2)
    assert torch.equal(dequantize_keys(pk), torch.cat([expect, expect], dim=-1))
    # values: per token over G = 4 channels. token 0: [0, -1, 0, -1] -> mn -1, s 1/3; codes [3, 0, 3, 0]
    pv = quantize_values(k, cfg)
    assert pv.codes.shape == (1, 1, 4, 1, 4)
    assert pv.codes.codes()[0, 0, 0, 0].tolist() == [3, 0, 3, 0]
    assert pv.codes.zero[0, 0, :, 0].tolist() == [-1.0, 0.375, 1.0, 3.0]
    # token 3: [3, 5, 3, 5] -> mn 3, s 2/3 (fp16), codes [0, 3, 0, 3] -> [3, 3 + 3*fp16(2/3), ...]
    s = torch.tensor(2 / 3).half().float()
    assert dequantize_values(pv)[0, 0, 3].tolist() == [3.0, (3 + 3 * s).item(), 3.0, (3 + 3 * s).item()]


# ---------------------------------------------------------------------------------------------------------------
# accounting
# ---------------------------------------------------------------------------------------------------------------
def test_account_exact_bytes_constructed_case():
    """B1 H2 T70 D16, G32: 64 tokens quantized (2 groups), 6 in the fp16 tail, 10-token fp16 window."""
    k, v = _randn(1, 2, 70, 16), _randn(1, 2, 70, 16, seed=1)
    win_k, win_v = torch.zeros(1, 2, 10, 16, dtype=torch.float16), torch.zeros(1, 2, 10, 16, dtype=torch.float16)
    tail = 2 * 6 * 16 * 2  # 384 B per tensor
    groups = 2 * 2  # heads x token groups
    # recommended: k = 8 anomalous channels (2-bit), 8 easy -> 8 rfft reals (1-bit), per-head int16 indices
    acc = account(quantize_keys(k, REC), quantize_values(v, REC), full_precision=[win_k, win_v])
    assert acc.codes == (2 * 64 * 8 * 2) // 8 + (2 * 64 * 8) // 8 + math.ceil(2 * 64 * 16 / 5)  # 256 + 128 + 410
    assert acc.scales == groups * 8 * 2 * 2 + groups * 8 * 2 + groups * 16 * 2  # Q2 s+mn, sign s, ternary s
    assert acc.indices == 2 * 8 * 2
    assert acc.unquantized == 2 * tail
    assert acc.full_precision == 2 * 640
    assert acc.elements == 2 * (2 * 70 * 16) + 2 * (2 * 10 * 16)
    assert acc.total_bytes == 794 + 320 + 32 + 768 + 1280
    assert acc.bits_per_element == pytest.approx(8 * 3194 / 5120)
    assert sum(acc.bits().values()) == pytest.approx(acc.bits_per_element)
    # reference: 2*8 interleaved fft reals with s and zero mn; one layer-wide index vector; 2-bit ternary + s, mn
    ref = account(quantize_keys(k, REF), quantize_values(v, REF))
    assert ref.codes == 256 + (2 * 64 * 16) // 8 + (2 * 64 * 16 * 2) // 8
    assert ref.scales == groups * 8 * 4 + groups * 16 * 4 + groups * 16 * 4
    assert ref.indices == 8 * 2
    d = ref.to_dict()
    assert d["total_bytes"] == ref.total_bytes and "codes" in ref.table()


def _bits(cfg, B=1, H=4, T=4096, D=128):
    k, v = _randn(B, H, T, D), _randn(B, H, T, D, seed=1)
    return account(quantize_keys(k, cfg)), account(quantize_values(v, cfg))


def test_bits_per_element_realistic_shape():
    """B1 H4 T4096 D128 (no partial group, no window). Spec §2 predicts the reference and KIVI numbers."""
    idx = 4 * 64 * 2 * 8 / (4 * 4096 * 128)  # per-head int16 indices, per key element
    ak, av = _bits(REC)  # G = 32 everywhere, ternary values with a scale
    assert ak.bits_per_element == pytest.approx(1.5 + 0.75 + idx)  # 2.25 + indices (spec: "honest 2.25")
    n = 4 * 4096 * 128
    assert av.bits_per_element == pytest.approx(8 * math.ceil(n / 5) / n + 0.5)  # 5 trits/byte (1 padded) + fp16 s / 32
    assert (ak + av).bits_per_element == pytest.approx(2.176, abs=1e-3)  # > 2.0 with a value scale at G = 32
    # settings within 2.0 stored bits, metadata included
    for cfg in (VidKVConfig(value_scale=False), VidKVConfig(key_group_size=64, value_group_size=64),
                VidKVConfig(anomalous_fraction=0.25)):
        ak, av = _bits(cfg)
        assert (ak + av).bits_per_element <= 2.0, cfg
    rk, rv = _bits(REF)
    assert rk.bits_per_element == pytest.approx(3.5, abs=1e-3)  # spec §2: 3.5
    assert rv.bits_per_element == pytest.approx(3.0)  # spec §2: 3.0
    assert (rk + rv).bits_per_element == pytest.approx(3.25, abs=1e-3)
    kk, kv = _bits(KIVI)
    assert kk.bits_per_element == kv.bits_per_element == pytest.approx(3.0)


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mode": "bogus"}, "mode"),
        ({"anomalous_fraction": 1.5}, "anomalous_fraction"),
        ({"key_group_size": 0}, "key_group_size"),
        ({"value_group_size": -1}, "value_group_size"),
        ({"value_gamma": -0.1}, "value_gamma"),
        ({"value_axis": "diagonal"}, "value_axis"),
        ({"mode": "reference", "value_scale": True}, "value_scale"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        VidKVConfig(**kwargs)


def test_config_mode_defaults_and_round_trip():
    assert (REF.value_gamma, REF.value_scale, REF.channel_split.value, REF.trit_packing.value) == (0.5, False, "layer", "2bit")
    assert (REC.value_gamma, REC.value_scale, REC.channel_split.value, REC.trit_packing.value) == (0.7, True, "head", "base3")
    assert REF.mode is KVQuantMode.REFERENCE
    for cfg in (REF, REC, KIVI):
        assert VidKVConfig.from_dict(cfg.to_dict()) == cfg
        assert all(VidKVConfig.field_help().values())


@pytest.mark.parametrize("cfg", [REF, REC, KIVI], ids=["reference", "recommended", "kivi"])
def test_inputs_never_mutated(cfg):
    k, v = _outlier_keys().half(), _randn(1, 2, 256, 64, seed=2).half()
    kb, vb = k.clone(), v.clone()
    dequantize_keys(quantize_keys(k, cfg))
    dequantize_values(quantize_values(v, cfg))
    assert torch.equal(k, kb) and torch.equal(v, vb)

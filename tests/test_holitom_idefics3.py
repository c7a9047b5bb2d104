"""The ``holitom`` runtime pass on Idefics3 (the tiny T2Vid zoo model: 8 frames fed as 8 images, 4 ``<image>`` tokens
each between ``<fake_token_around_image>`` wrappers): the frames of a row are merged as one video, merged tokens go
into their representative frame's block, wrappers and text are kept, compact positions, padded batches, generate."""
from __future__ import annotations

import pytest
import torch

from _holitom_helpers import LMInputs, assert_retain_1_is_identity, holitom_opt, last_real
import vopt
from vopt import zoo
from vopt.optimize import OptimizeConfig
from vopt.merging.families.common import received_attention
from vopt.merging.families.idefics3 import idefics3_features_and_scores
from vopt.passes.holitom import STATS_ATTR, HoliTomPassConfig

N = 4   # tokens per frame of the tiny model (4x4 patches, pixel shuffle x2)


@pytest.fixture(scope="module")
def zm():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    z = zoo.build("t2vid", size="tiny")
    z.model.eval()
    yield z
    torch.set_num_threads(n)


_opt = holitom_opt  # retain ratio first, then HoliTomPassConfig fields


def _batch(rows: list, side: str) -> dict:
    """Pad single-row inputs (different lengths / frame counts) into one batch: ids pad 0 with mask 0 on ``side``,
    missing frames as all-zero padding images (dropped by value by the model)."""
    L = max(r["input_ids"].shape[1] for r in rows)
    F = max(r["pixel_values"].shape[1] for r in rows)
    ids, mask, pv = [], [], []
    for r in rows:
        k = L - r["input_ids"].shape[1]
        z = torch.zeros(1, k, dtype=torch.long)
        cat = (lambda a, p: torch.cat([p, a] if side == "left" else [a, p], 1))
        ids.append(cat(r["input_ids"], z))
        mask.append(cat(torch.ones_like(r["input_ids"]), z))
        p = r["pixel_values"]
        pv.append(torch.cat([p, p.new_zeros(1, F - p.shape[1], *p.shape[2:])], 1))
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(mask), "pixel_values": torch.cat(pv)}


def test_retain_1_is_identical_to_the_unmodified_model(zm):
    assert_retain_1_is_identity(zm, ("Idefics3ForConditionalGeneration", "positions=compact"), [32, 32])


def test_fewer_tokens_wrappers_and_text_kept_merged_tokens_in_their_frames(zm):
    cfg = zm.model.config
    img, wrap = cfg.image_token_id, 501
    opt = _opt(zm.model, 0.25)
    inputs = zm.example_inputs(batch=2, seed=3)
    ids = inputs["input_ids"]
    L = ids.shape[1]
    with LMInputs(opt.module.model.text_model) as spy, torch.no_grad():
        out = opt(**inputs)
    info = out.holitom
    call = spy.calls[0]
    embeds = call["inputs_embeds"]
    print(f"\nIdefics3 tiny T2Vid, retain 0.25: LLM sequence {L} -> {embeds.shape[1]} tokens per row; image tokens "
          f"{info.tokens_before} -> {info.tokens_after} (8 frames x {N}); frame wrappers 16 per row kept")
    assert info.tokens_before == [32, 32] and info.tokens_after == [8, 8]
    assert embeds.shape[1] == L - (32 - 8) and call["position_ids"] is None               # compact positions
    with torch.no_grad():
        feats, _ = idefics3_features_and_scores(zm.model, inputs["pixel_values"], want_scores=False)
        text = zm.model.get_input_embeddings()(ids)
    for b in range(2):
        new_ids, idx = info.input_ids[b], info.index[b]
        other = new_ids != img
        assert torch.equal(idx[other], (ids[b] != img).nonzero().reshape(-1))     # every non-image token, in order
        assert torch.equal(embeds[b, other], text[b, idx[other]])
        assert int((new_ids == wrap).sum()) == 16
        mr = info.merges[b]
        vis = new_ids == img
        assert torch.equal(embeds[b, vis], mr.tokens)                              # HoliTom order kept
        # each merged token sits inside its representative frame's wrapper pair
        frame_of_slot = torch.cumsum((ids[b] == wrap).long(), 0) // 2             # frame f's block: 2f+1 wrappers
        assert torch.equal(frame_of_slot[idx[vis]], mr.positions[:, 0])
        assert bool((ids[b, idx[vis]] == img).all())
    stats = getattr(opt.module, STATS_ATTR)
    assert stats.tokens_before == 64 and stats.tokens_after == 16
    (m,) = opt.report.runtime_results[0].matches
    assert "first call: video tokens 64 -> 16" in m.what


def test_features_are_the_models_own_and_scores_the_last_vision_layers(zm):
    inputs = zm.example_inputs(batch=2, seed=1)
    layer = zm.model.model.vision_model.encoder.layers[-1]
    seen = []
    h = layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            own = zm.model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
    finally:
        h.remove()
    with torch.no_grad():
        feats, scores = idefics3_features_and_scores(zm.model, inputs["pixel_values"])
        ref = received_attention(layer, seen[0])                                  # [16 frames, 16 patches]
    assert all(torch.equal(a, b) for a, b in zip(feats, own))
    # pixel shuffle groups each token's 2x2 patches: token (i, j) of the 2x2 grid <- patches (2i..2i+1, 2j..2j+1)
    grid = ref.view(16, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(16, 4, 4).mean(-1)
    torch.testing.assert_close(torch.cat(scores), grid, atol=1e-6, rtol=1e-6)
    assert scores[0].shape == (8, N)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_of_two_equals_each_row_alone(zm, side):
    opt = _opt(zm.model, 0.25)
    r0 = zm.example_inputs(batch=1, frames=8, seed=0)
    r1 = zm.example_inputs(batch=1, frames=4, seed=1)   # fewer frames: shorter row, padding images
    batch = _batch([r0, r1], side)
    with torch.no_grad():
        out = opt(**batch)
        alone = [opt(**r) for r in (r0, r1)]
    info = out.holitom
    assert info.tokens_before == [32, 16] and info.tokens_after == [8, 4]
    last = last_real(batch["attention_mask"])
    for b, a in enumerate(alone):
        torch.testing.assert_close(out.logits[b, last[b]], a.logits[0, -1], atol=1e-5, rtol=1e-5)
        assert torch.equal(info.input_ids[b, info.attention_mask[b] != 0], a.holitom.input_ids[0])
    new_mask = info.attention_mask
    assert bool((new_mask[:, -1] == 1).all()) if side == "left" else bool((new_mask[:, 0] == 1).all())


def test_generate_returns_new_tokens_like_manual_greedy_decoding(zm):
    opt = _opt(zm.model, 0.25)
    model = opt.module
    r0 = zm.example_inputs(batch=1, frames=8, seed=0)
    r1 = zm.example_inputs(batch=1, frames=4, seed=1)
    batch = _batch([r0, r1], "left")
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert gen.shape == (2, 3)                                        # inputs_embeds generation: new tokens only
        assert getattr(model, STATS_ATTR).tokens_after == 12
        for b, r in enumerate((r0, r1)):
            out = model(**r, use_cache=True)                              # merged prefill, then compact decoding
            toks = [out.logits[:, -1].argmax(-1, keepdim=True)]
            cache = out.cache
            for _ in range(2):
                step = model(input_ids=toks[-1], cache=cache, use_cache=True)
                cache = step.cache
                toks.append(step.logits[:, -1].argmax(-1, keepdim=True))
            assert torch.equal(gen[b], torch.cat(toks, 1)[0]), b
    # positions='original': the same continuation at the full prompt's positions L, L+1, ... (1-D, gapped prompt)
    orig = _opt(zm.model, 0.25, positions="original").module
    L = r0["input_ids"].shape[1]
    with torch.no_grad():
        gen = orig.generate(**r0, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
        out = orig(**r0, use_cache=True)
        logits, cache = [out.logits[:, L - 1]], out.cache
        for i in range(2):
            tok = logits[-1].argmax(-1, keepdim=True)
            step = orig(input_ids=tok, cache=cache, position_ids=torch.tensor([[L + i]]), use_cache=True)
            logits.append(step.logits[:, -1])
    for got, want in zip(gen.logits, logits):   # fp32, same kernels on the same shapes: 1e-5
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_original_positions_are_the_representatives_slots(zm):
    cfg = zm.model.config
    opt = _opt(zm.model, 0.25, positions="original")
    inputs = zm.example_inputs(batch=1, seed=2)
    ids = inputs["input_ids"][0]
    with LMInputs(opt.module.model.text_model) as spy, torch.no_grad():
        out = opt(**inputs)
    pos = spy.calls[0]["position_ids"][0]
    info = out.holitom
    vis = info.input_ids[0] == cfg.image_token_id
    assert torch.equal(pos[~vis], info.index[0, ~vis])                   # text / wrappers: their own positions
    blocks = (ids == cfg.image_token_id).nonzero().reshape(-1).view(8, N)
    mr = info.merges[0]
    assert torch.equal(pos[vis], blocks[mr.positions[:, 0], mr.positions[:, 1]])


def test_unsupported_calls_pass_through_and_the_inner_stage_installs(zm):
    opt = _opt(zm.model, 0.25)
    ids = zm.example_inputs(batch=1)["input_ids"][:, :3]                   # text only
    with torch.no_grad():
        out = opt(input_ids=ids)
        ref = zm.model(input_ids=ids)
    assert torch.equal(out.logits, ref.logits) and not hasattr(out, "holitom")
    assert getattr(opt.module, STATS_ATTR).passthrough == 1
    inner = vopt.optimize(zm.model, OptimizeConfig(pass_configs={"holitom": HoliTomPassConfig(inner_layer=1)}),
                          passes=["holitom"])
    (m,) = inner.report.runtime_results[0].matches
    assert m.rewritten and "inner K=1/" in m.what     # tests/test_holitom_inner_families.py checks what it does


def test_unpadded_batch_that_merges_unevenly_generates_like_rows_alone(zm):
    """Row 1's frames are identical (temporal merging leaves 4 tokens, under the budget of 16), so an unpadded batch
    becomes ragged: forward pads the shorter row on the right, generate on the left, and each row equals itself
    alone."""
    opt = _opt(zm.model, 0.5)
    model = opt.module
    inputs = zm.example_inputs(batch=2, seed=2)
    inputs["pixel_values"][1] = inputs["pixel_values"][1, :1].expand(8, -1, -1, -1)
    rows = [{k: v[b:b + 1] for k, v in inputs.items()} for b in range(2)]
    with torch.no_grad():
        out = model(**inputs)
        assert out.holitom.tokens_after == [16, 4]
        assert bool((out.holitom.attention_mask[1, -12:] == 0).all())      # forward: right padding (unpadded caller)
        for b, r in enumerate(rows):
            a = model(**r)
            n_real = int(out.holitom.attention_mask[b].sum())
            torch.testing.assert_close(out.logits[b, -1], a.logits[0, -1],
                                       atol=1e-5, rtol=1e-5)
            assert n_real == a.holitom.input_ids.shape[1]
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        for b, r in enumerate(rows):
            assert torch.equal(gen[b], model.generate(**r, max_new_tokens=3, do_sample=False)[0]), b


def test_pixel_attention_mask_is_accepted_and_padded_pixels_fall_back_to_proxy_scores(zm):
    opt = _opt(zm.model, 0.25)
    inputs = zm.example_inputs(batch=1, seed=4)
    B, F, _, H, W = inputs["pixel_values"].shape
    pam = torch.ones(B, F, H, W, dtype=torch.bool)
    with torch.no_grad():
        a = opt(**inputs)
        b = opt(**inputs, pixel_attention_mask=pam)
        assert torch.equal(a.logits, b.logits)
        pam[0, 0, :, W // 2:] = False                                       # a real frame with padded pixels
        _, scores = idefics3_features_and_scores(zm.model, inputs["pixel_values"], pam)
    assert scores is None

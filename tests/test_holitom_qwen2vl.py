"""The ``holitom`` runtime pass on Qwen2-VL (the tiny GPT4Scene zoo model: 8 frames x 6 tokens as one video, a 9-token
BEV image): outer merging of the video tokens with the model's own 3-D M-RoPE positions gathered, ``rope_deltas``
fixed for decoding, padded batches, BEV/text untouched."""
from __future__ import annotations

import pytest
import torch

from _holitom_helpers import LMInputs, assert_retain_1_is_identity, holitom_opt, last_real
import vopt
from vopt import zoo
from vopt.merging import HoliTomConfig
from vopt.optimize import OptimizeConfig
from vopt.passes.holitom import STATS_ATTR, HoliTomPassConfig


@pytest.fixture(scope="module")
def zm():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    z = zoo.build("gpt4scene")
    z.model.eval()
    yield z
    torch.set_num_threads(n)


_opt = holitom_opt  # retain ratio first, then HoliTomPassConfig fields


def _batch(rows: list, side: str) -> dict:
    """Pad single-row example inputs (possibly of different lengths) into one batch (pad id 0, type 0, mask 0)."""
    L = max(r["input_ids"].shape[1] for r in rows)
    out = {"input_ids": [], "mm_token_type_ids": [], "attention_mask": []}
    for r in rows:
        k = L - r["input_ids"].shape[1]
        z = torch.zeros(1, k, dtype=torch.long)
        cat = (lambda a, p: torch.cat([p, a] if side == "left" else [a, p], 1))
        out["input_ids"].append(cat(r["input_ids"], z))
        out["mm_token_type_ids"].append(cat(r["mm_token_type_ids"], z))
        out["attention_mask"].append(cat(torch.ones_like(r["input_ids"]), z))
    out = {k: torch.cat(v) for k, v in out.items()}
    for k in ("pixel_values_videos", "video_grid_thw", "pixel_values", "image_grid_thw"):
        out[k] = torch.cat([r[k] for r in rows])
    return out


def test_retain_1_is_identical_to_the_unmodified_model(zm):
    assert_retain_1_is_identity(zm, ("Qwen2VLForConditionalGeneration", "M-RoPE"), [48, 48])


def test_kept_positions_are_the_models_own_3d_positions(zm):
    cfg = zm.model.config
    opt = _opt(zm.model, 0.25)
    inputs = zm.example_inputs(batch=2)
    ids = inputs["input_ids"]
    # the reference: the model's own get_rope_index on the full input, computed independently of the pass
    ref, ref_delta = zm.model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                                   image_grid_thw=inputs["image_grid_thw"],
                                                   video_grid_thw=inputs["video_grid_thw"])
    with LMInputs(opt.module.model.language_model) as spy, torch.no_grad():
        out = opt(**inputs)
    info = out.holitom
    pos = info.position_ids
    assert torch.equal(spy.calls[0]["position_ids"], pos)                 # what the LM received
    B, Lp = info.index.shape
    assert pos.shape == (3, B, Lp) and Lp == ids.shape[1] - (48 - 12)
    n = 6
    for b in range(B):
        vslots = (ids[b] == cfg.video_token_id).nonzero().reshape(-1)
        mr = info.merges[b]
        rep = vslots[mr.positions[:, 0] * n + mr.positions[:, 1]]       # representative's slot (frame, spatial)
        new_vid = (info.input_ids[b] == cfg.video_token_id).nonzero().reshape(-1)
        assert new_vid.numel() == mr.tokens.shape[0] == 12
        assert torch.equal(pos[:, b, new_vid], ref[:, b, rep])           # a merged token: its representative's (t,h,w)
        other = info.input_ids[b] != cfg.video_token_id
        assert torch.equal(pos[:, b, other], ref[:, b, info.index[b, other]])   # text / BEV: their own
        # positions are gapped: the text after the video keeps its id, so decoding continues where it would have
        assert int(pos[:, b].max()) == int(ref[:, b].max())
    assert torch.equal(info.rope_deltas, pos.amax(dim=(0, 2))[:, None] + 1 - Lp)
    assert torch.equal(info.rope_deltas, ref_delta + (48 - 12))
    assert torch.equal(opt.module.model.rope_deltas, info.rope_deltas)


def test_decode_step_continues_at_max_kept_plus_1(zm):
    opt = _opt(zm.model, 0.25)
    model = opt.module
    inputs = zm.example_inputs(batch=1, seed=3)
    with LMInputs(model.model.language_model) as spy, torch.no_grad():
        out = model(**inputs, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=nxt, cache=out.cache, use_cache=True)
    pre, dec = spy.calls
    pos = pre["position_ids"]
    max_kept = int(pos.max())
    assert torch.equal(dec["position_ids"], torch.full((3, 1, 1), max_kept + 1))
    assert int(model.model.rope_deltas) == max_kept + 1 - pos.shape[-1]
    # manual computation: the whole shortened prefill + the new token in one uncached pass, explicit positions
    with torch.no_grad():
        embeds = torch.cat([pre["inputs_embeds"], model.get_input_embeddings()(nxt)], 1)
        full_pos = torch.cat([pos, torch.full((3, 1, 1), max_kept + 1)], -1)
        h = zm.model.model.language_model(inputs_embeds=embeds, position_ids=full_pos, use_cache=False)
        manual = zm.model.lm_head(h.last_hidden_state[:, -1])
    torch.testing.assert_close(step.logits[:, -1], manual, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_of_two_equals_each_row_alone(zm, side):
    opt = _opt(zm.model, 0.25)
    r0 = zm.example_inputs(batch=1, frames=8, seed=0)
    r1 = zm.example_inputs(batch=1, frames=4, seed=1)   # shorter: fewer frames, so different kept counts too
    batch = _batch([r0, r1], side)
    with torch.no_grad():
        out = opt(**batch)
        alone = [opt(**r) for r in (r0, r1)]
    info = out.holitom
    assert info.tokens_before == [48, 24] and info.tokens_after == [12, 6]
    last = last_real(batch["attention_mask"])
    for b, a in enumerate(alone):
        torch.testing.assert_close(out.logits[b, last[b]], a.logits[0, -1], atol=1e-5, rtol=1e-5)
        # the row's kept positions and rope delta equal the single row's
        real = info.attention_mask[b] != 0
        assert torch.equal(info.position_ids[:, b, real], a.holitom.position_ids[:, 0])
        assert torch.equal(info.rope_deltas[b], a.holitom.rope_deltas[0])
    # padding stays on the caller's side
    new_mask = info.attention_mask
    assert bool((new_mask[:, -1] == 1).all()) if side == "left" else bool((new_mask[:, 0] == 1).all())


def test_bev_image_and_text_tokens_are_never_merged(zm):
    cfg = zm.model.config
    opt = _opt(zm.model, 0.1)
    inputs = zm.example_inputs(batch=2, seed=5)
    ids = inputs["input_ids"]
    with LMInputs(opt.module.model.language_model) as spy, torch.no_grad():
        out = opt(**inputs)
    info = out.holitom
    embeds = spy.calls[0]["inputs_embeds"]
    with torch.no_grad():
        bev = torch.cat(zm.model.model.get_image_features(inputs["pixel_values"],
                                                          inputs["image_grid_thw"]).pooler_output).view(2, 9, -1)
        text = zm.model.get_input_embeddings()(ids)
    for b in range(2):
        img = info.input_ids[b] == cfg.image_token_id
        assert int(img.sum()) == 9
        assert torch.equal(embeds[b, img], bev[b])                        # BEV tokens: the model's own features
        non_vid = ids[b] != cfg.video_token_id
        kept = info.index[b][info.input_ids[b] != cfg.video_token_id]
        assert torch.equal(kept, non_vid.nonzero().reshape(-1))           # every non-video token kept, in order
        txt = (info.input_ids[b] != cfg.video_token_id) & (info.input_ids[b] != cfg.image_token_id)
        assert torch.equal(embeds[b, txt], text[b, info.index[b, txt]])   # text (markers, vision start/end) as is
        assert int((info.input_ids[b] == cfg.video_token_id).sum()) == info.tokens_after[b] == 5


def test_fewer_tokens_reach_the_llm_at_retain_025(zm):
    opt = _opt(zm.model, 0.25)
    inputs = zm.example_inputs(batch=2, seed=7)
    L = inputs["input_ids"].shape[1]
    with LMInputs(opt.module.model.language_model) as spy, torch.no_grad():
        opt(**inputs)
    seen = spy.calls[0]["inputs_embeds"].shape[1]
    stats = getattr(opt.module, STATS_ATTR)
    print(f"\nQwen2-VL tiny GPT4Scene, retain 0.25: LLM sequence {L} -> {seen} tokens per row; video tokens "
          f"{stats.tokens_before} -> {stats.tokens_after} over {stats.videos} videos (BEV 9 per row untouched); "
          f"paper-formula LLM FLOPs fraction {stats.paper_flops_fraction:.3f}")
    assert stats.tokens_before == 96 and stats.tokens_after == 24
    assert seen == L - (48 - 12)
    (m,) = opt.report.runtime_results[0].matches
    assert "first call: video tokens 96 -> 24" in m.what


def test_generate_merges_and_continues_like_manual_decoding(zm):
    opt = _opt(zm.model, 0.25)
    model = opt.module
    r0 = zm.example_inputs(batch=1, frames=8, seed=0)
    r1 = zm.example_inputs(batch=1, frames=4, seed=1)
    batch = _batch([r0, r1], "left")
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert gen.shape == (2, 3)                                        # inputs_embeds generation: new tokens only
        assert getattr(model, STATS_ATTR).tokens_after == 18
        for b, r in enumerate((r0, r1)):
            # manual greedy decoding of the row alone: merged prefill, then decode steps through rope_deltas
            out = model(**r, use_cache=True)
            toks = [out.logits[:, -1].argmax(-1, keepdim=True)]
            cache = out.cache
            for _ in range(2):
                step = model(input_ids=toks[-1], cache=cache, use_cache=True)
                cache = step.cache
                toks.append(step.logits[:, -1].argmax(-1, keepdim=True))
            assert torch.equal(gen[b], torch.cat(toks, 1)[0]), b


def test_unsupported_calls_pass_through_and_the_inner_stage_installs(zm):
    opt = _opt(zm.model, 0.25)
    inputs = zm.example_inputs(batch=1)
    no_video = {k: v for k, v in inputs.items() if k not in ("pixel_values_videos", "video_grid_thw")}
    no_video["input_ids"] = no_video["input_ids"][:, :5]
    no_video["mm_token_type_ids"] = no_video["mm_token_type_ids"][:, :5]
    no_video.pop("pixel_values"), no_video.pop("image_grid_thw")
    with torch.no_grad():
        out = opt(**no_video)
        ref = zm.model(**no_video)
    assert torch.equal(out.logits, ref.logits) and not hasattr(out, "holitom")
    assert getattr(opt.module, STATS_ATTR).passthrough == 1
    inner = vopt.optimize(zm.model, OptimizeConfig(pass_configs={"holitom": HoliTomPassConfig(inner_layer=1)}),
                          passes=["holitom"])
    (m,) = inner.report.runtime_results[0].matches
    assert m.rewritten and "inner K=1/" in m.what     # tests/test_holitom_inner_families.py checks what it does


def test_unpadded_batch_that_merges_unevenly_generates_like_rows_alone(zm):
    """Row 1's frames are identical (temporal merging leaves 6 tokens, under the budget of 24), so an unpadded batch
    becomes ragged: generate pads the shorter row on the left, and each row generates what it generates alone."""
    opt = _opt(zm.model, 0.5)
    model = opt.module
    inputs = zm.example_inputs(batch=2, seed=2)
    per_video = inputs["pixel_values_videos"].shape[0] // 2
    frame = per_video // 8
    static = inputs["pixel_values_videos"][per_video:per_video + frame].repeat(8, 1)
    inputs["pixel_values_videos"] = torch.cat([inputs["pixel_values_videos"][:per_video], static])
    rows = [{k: (v[b:b + 1] if k in ("input_ids", "mm_token_type_ids", "video_grid_thw", "image_grid_thw") else v)
             for k, v in inputs.items()} for b in range(2)]
    for b, r in enumerate(rows):
        r["pixel_values_videos"] = inputs["pixel_values_videos"][b * per_video:(b + 1) * per_video]
        r["pixel_values"] = inputs["pixel_values"][b * 36:(b + 1) * 36]
    with torch.no_grad():
        out = model(**inputs)
        assert out.holitom.tokens_after == [24, 6]
        assert int(out.holitom.attention_mask[1].sum()) == out.holitom.index.shape[1] - 18
        assert bool((out.holitom.attention_mask[1, -18:] == 0).all())     # forward: right padding (unpadded caller)
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        for b, r in enumerate(rows):
            assert torch.equal(gen[b], model.generate(**r, max_new_tokens=3, do_sample=False)[0]), b


def test_compact_logits_layout(zm):
    opt = _opt(zm.model, 0.25, logits="compact")
    inputs = zm.example_inputs(batch=2, seed=4)
    with torch.no_grad():
        out = opt(**inputs)
        orig = _opt(zm.model, 0.25)(**inputs)
    Lp = out.holitom.index.shape[1]
    assert out.logits.shape[:2] == (2, Lp) and out.attention_mask.shape == (2, Lp)
    torch.testing.assert_close(out.logits[:, -1], orig.logits[:, -1], atol=1e-6, rtol=0)


def test_protected_marker_tokens_are_never_merged(zm):
    """``vopt_holitom_protect`` marks video placeholders (GPT4Scene's object-ID marker patches) that reach the LM as
    themselves, at their own 3-D position, whatever the budget; forward and generate accept it."""
    from vopt.merging.families.qwen2vl import PROTECT_KWARG

    cfg = zm.model.config
    opt = _opt(zm.model, 0.1)
    inputs = zm.example_inputs(batch=1, seed=6)
    ids = inputs["input_ids"]
    vslots = (ids[0] == cfg.video_token_id).nonzero().reshape(-1)
    marked = vslots[torch.tensor([2, 6 * 3 + 5, 6 * 7])]                 # (frame 0, 2), (frame 3, 5), (frame 7, 0)
    protect = torch.zeros_like(ids, dtype=torch.bool)
    protect[0, marked] = True
    ref, _ = zm.model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                           image_grid_thw=inputs["image_grid_thw"],
                                           video_grid_thw=inputs["video_grid_thw"])
    with LMInputs(opt.module.model.language_model) as spy, torch.no_grad():
        plain = opt(**inputs)
        out = opt(**inputs, **{PROTECT_KWARG: protect})
        gen = opt.generate(**inputs, **{PROTECT_KWARG: protect}, max_new_tokens=2, do_sample=False)
    with torch.no_grad():
        feats = torch.cat(zm.model.model.get_video_features(inputs["pixel_values_videos"],
                                                            inputs["video_grid_thw"]).pooler_output)
    # a merged token made only of protected inputs is dropped (with attention scores a marked patch can be a dominant
    # dynamic token on its own): the survivors come first, then the 3 protected tokens
    mr = out.holitom.merges[0]
    prot_flat = torch.zeros(48, dtype=torch.bool)
    prot_flat[marked - vslots[0]] = True
    alive = int(torch.zeros(5, dtype=torch.long).index_add_(0, mr.source_owner,
                                                             (~prot_flat[mr.source_index]).long()).gt(0).sum())
    assert plain.holitom.tokens_after == [5] and out.holitom.tokens_after == [alive + 3] and alive >= 4
    embeds, pos = spy.calls[1]["inputs_embeds"][0], out.holitom.position_ids[:, 0]
    vid_new = (out.holitom.input_ids[0] == cfg.video_token_id).nonzero().reshape(-1)
    for k, slot in enumerate(marked):
        j = vid_new[alive + k]                                              # after the merged tokens, raster order
        assert torch.equal(embeds[j], feats[slot - vslots[0]])
        assert torch.equal(pos[:, j], ref[:, 0, slot])
    # the merged tokens' positions never repeat a protected token's position
    merged_pos = {tuple(p) for p in pos[:, vid_new[:alive]].T.tolist()}
    assert not merged_pos & {tuple(ref[:, 0, s].tolist()) for s in marked}
    assert gen.shape == (1, 2)


def test_exclude_protected_renormalizes_the_other_sources():
    from vopt.merging import holitom_merge
    from vopt.merging.families.qwen2vl import _exclude_protected

    torch.manual_seed(0)
    T, N, D = 4, 6, 8
    base = torch.randn(1, N, D)
    video = base + 0.05 * torch.randn(T, N, D)                              # mostly static: temporal merges happen
    video[2:] += torch.randn(2, N, D)
    mr = holitom_merge(video, HoliTomConfig(retain_ratio=0.25))
    prot = torch.zeros(T * N, dtype=torch.bool)
    prot[mr.source_index[:3]] = True                                       # sources of the first output token(s)
    toks, rep = _exclude_protected(mr, video, prot, N)
    flat = video.reshape(T * N, D)
    n_prot = int(prot.sum())
    assert torch.equal(toks[-n_prot:], flat[prot]) and torch.equal(rep[-n_prot:], prot.nonzero().reshape(-1))
    expect = []
    for o in range(mr.tokens.shape[0]):                                    # reference, one output token at a time
        sel = (mr.source_owner == o) & ~prot[mr.source_index]
        if not bool(sel.any()):
            continue
        w = mr.source_weight[sel]
        if bool(sel.sum() == (mr.source_owner == o).sum()):
            expect.append(mr.tokens[o])
        else:
            expect.append((w[:, None] * flat[mr.source_index[sel]]).sum(0) / w.sum())
    torch.testing.assert_close(toks[:-n_prot], torch.stack(expect), atol=1e-6, rtol=1e-6)
    assert not bool(prot[rep[:-n_prot]].any())


def _random_videos(seed: int, grids: list, zm) -> tuple:
    """Fresh random ``pixel_values_videos [sum t*h*w, C*tp*p*p]`` for ``grids`` (rows ``(t, h, w)`` in patches)."""
    vc = zm.model.config.vision_config
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grids, dtype=torch.long)
    rows = int(grid.prod(-1).sum())
    return torch.randn(rows, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2, generator=g), grid


def _eager_last_block_probs(visual, pixel_values_videos, grid) -> list:
    """The softmax probabilities ``[1, H, S, S]`` (one per temporal grid frame) that transformers' own
    ``eager_attention_forward`` computes in the LAST block of a copy of ``visual`` run with an eager attention
    implementation (registered through transformers' ``AttentionInterface``, which calls the eager function
    unchanged and records its weights)."""
    import copy

    from transformers import AttentionInterface
    from transformers.models.qwen2_vl.modeling_qwen2_vl import eager_attention_forward

    ref = copy.deepcopy(visual)
    target = ref.blocks[-1].attn
    probs = []

    def eager_recording(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out, w = eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        if module is target:
            probs.append(w.detach())
        return out, w

    AttentionInterface.register("vopt_test_eager_probs", eager_recording)
    ref.config._attn_implementation = "vopt_test_eager_probs"
    assert target.config is ref.config
    with torch.no_grad():
        ref(pixel_values_videos.type(ref.dtype), grid_thw=grid)
    return probs


def test_video_features_are_the_models_own_and_scores_the_last_vision_blocks_received_attention(zm):
    """Fresh random videos with t >= 2 and h != w (two grids, so cu_seqlens has segments of two lengths)."""
    from vopt.merging.families.qwen2vl import (_last_block_inputs_eager, _received_attention_varlen,
                                               qwen2vl_video_features_and_scores)

    model = zm.model
    sms = model.config.vision_config.spatial_merge_size
    grids = [[3, 4, 6], [2, 6, 4], [2, 2, 8]]                              # (t, h, w) in patches
    pv, grid = _random_videos(11, grids, zm)
    with torch.no_grad():
        own = model.model.get_video_features(pv, grid, return_dict=True).pooler_output
        feats, scores = qwen2vl_video_features_and_scores(model, pv, grid, True)
        feats_p, none = qwen2vl_video_features_and_scores(model, pv, grid, False)
    assert none is None and len(feats) == len(own) == len(scores) == 3
    for f, fp, o in zip(feats, feats_p, own):
        assert torch.equal(f, o) and torch.equal(fp, o)                    # bit-identical features
    # reference: HF's eager attention probabilities of the last block, averaged over heads and query patches of each
    # frame, then grouped like the PatchMerger (sms^2 consecutive patches, block-major order) and averaged
    probs = _eager_last_block_probs(model.model.visual, pv, grid)
    assert len(probs) == sum(t for t, _, _ in grids)                         # one segment per temporal grid frame
    received = torch.cat([p[0].float().mean(dim=(0, 1)) for p in probs])
    o = 0
    for v, (t, h, w) in enumerate(grids):
        n = h * w // sms ** 2
        ref = received[o:o + t * h * w].reshape(t, n, sms ** 2).mean(-1)
        o += t * h * w
        assert scores[v].shape == (t, n) and scores[v].dtype == torch.float32
        # fp32 throughout on both sides; the only difference is the summation order of the head / query means
        # (and of the matmul reduction), a few ulps of values <= 1: 1e-6 absolute is ~10x that
        torch.testing.assert_close(scores[v], ref, atol=1e-6, rtol=0)
        # sanity: a frame's received attention sums to 1 over its patches, so its tokens' means sum to 1 / sms^2
        torch.testing.assert_close(scores[v].sum(-1), torch.full((t,), 1.0 / sms ** 2), atol=1e-5, rtol=0)
    # the hook path (one vision pass) and the fallback (last block's input recomputed eagerly) agree bit for bit
    with torch.no_grad():
        x, cu, pe = _last_block_inputs_eager(model.model.visual, pv, grid)
        fallback = _received_attention_varlen(model.model.visual.blocks[-1], x, cu, pe)
        # and chunking (one frame at a time vs several) does not change the scores
        one = _received_attention_varlen(model.model.visual.blocks[-1], x, cu, pe, max_bytes=1)
    assert fallback.shape == (int(grid.prod(-1).sum()),)
    grouped = fallback.reshape(-1, sms ** 2).mean(-1)       # every video's h*w is a multiple of sms^2: same groups
    assert torch.equal(grouped, torch.cat([s.reshape(-1) for s in scores]))
    torch.testing.assert_close(one, fallback, atol=1e-7, rtol=0)


def test_report_says_which_scores_are_used(zm):
    (m,) = _opt(zm.model, 0.25).report.runtime_results[0].matches
    assert "scores=attention" in m.what and "proxy" not in m.what
    (m,) = _opt(zm.model, 0.25, scores="proxy").report.runtime_results[0].matches
    assert "scores=proxy" in m.what


def test_attention_scores_drive_the_merge_and_differ_from_proxy(zm):
    """The pass's merges equal holitom_merge fed the last block's received attention (computed here on the unmodified
    model), and on these inputs the attention-selected tokens differ from the proxy-selected ones."""
    from vopt.merging import holitom_merge
    from vopt.merging.families.qwen2vl import qwen2vl_video_features_and_scores

    cfg = HoliTomConfig(retain_ratio=0.25)
    inputs = zm.example_inputs(batch=2, seed=8)
    with torch.no_grad():
        att = _opt(zm.model, 0.25)(**inputs).holitom
        prx = _opt(zm.model, 0.25, scores="proxy")(**inputs).holitom
        feats, scores = qwen2vl_video_features_and_scores(zm.model, inputs["pixel_values_videos"],
                                                          inputs["video_grid_thw"], True)
    differ = 0
    for v, (t, h, w) in enumerate(inputs["video_grid_thw"].tolist()):
        n = h * w // 4
        exp_att = holitom_merge(feats[v].reshape(t, n, -1), cfg, scores[v])
        exp_prx = holitom_merge(feats[v].reshape(t, n, -1), cfg, None)
        assert torch.equal(att.merges[v].positions, exp_att.positions)
        assert torch.equal(att.merges[v].tokens, exp_att.tokens)
        assert torch.equal(prx.merges[v].positions, exp_prx.positions)
        differ += int(not torch.equal(exp_att.positions, exp_prx.positions))
    print(f"\nattention vs proxy scores: selected tokens differ in {differ} of {len(feats)} videos")
    assert differ >= 1

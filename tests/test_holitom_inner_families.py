"""The ``holitom`` pass's inner-LLM stage on Qwen2-VL (the tiny GPT4Scene model: M-RoPE) and Idefics3 (the tiny
T2Vid model: frames as images), checked against an independent reference.

The reference for FastV-style pruning at layer K (``inner_merge=False``): the kept visual tokens are the top
``ceil(keep * n)`` by the **eager** attention probabilities (HF's own ``output_attentions``) of each row's last real
token at layer K, averaged over heads; the reference logits come from the **unmodified** model whose layers ``>= K``
get a 4-D mask in which no query attends to a dropped visual token (causal and padding as usual), every token at
its own original position. So a wrong position (RoPE table gathered wrongly, M-RoPE rows mixed), a non-causal
shortened layer, or a decode step whose position / cache columns are off gives different logits.
Tolerances: fp32 throughout; the pass computes the kept tokens' attention on a gathered (shorter) sequence, the
reference on the full masked one, so sums differ in order only: atol 2e-5 on logits of magnitude ~1.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from _holitom_helpers import holitom_opt, last_real
from vopt import zoo
from vopt.passes.holitom import STATS_ATTR

ATOL = 2e-5


@pytest.fixture(scope="module", params=["gpt4scene", "t2vid"])
def zm(request):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    z = zoo.build(request.param)
    z.model.eval()
    yield z
    torch.set_num_threads(n)


def _layers(model):
    inner = model.model
    return (getattr(inner, "language_model", None) or inner.text_model).layers


def _visual_id(model) -> int:
    """The tokens the inner stage may merge: Qwen2-VL's video placeholders (not the BEV image), Idefics3's frames."""
    cfg = model.config
    return cfg.video_token_id if hasattr(cfg, "video_token_id") else cfg.image_token_id


def _pad(inputs: dict, extra: int, side: str) -> dict:
    """Row 1 gets ``extra`` more text tokens (copies of its last ones), row 0 is padded (id 0, mask 0) on ``side``."""
    ids = inputs["input_ids"]
    B, L = ids.shape
    tail = ids[:, -extra:]
    grown = torch.cat([ids, tail], 1)
    z = torch.zeros(1, extra, dtype=torch.long)
    row0 = torch.cat([z, ids[:1]] if side == "left" else [ids[:1], z], 1)
    out = dict(inputs)
    out["input_ids"] = torch.cat([row0, grown[1:]])
    one = torch.ones(1, L, dtype=torch.long)
    m0 = torch.cat([z, one] if side == "left" else [one, z], 1)
    out["attention_mask"] = torch.cat([m0, torch.ones(B - 1, L + extra, dtype=torch.long)])
    if "mm_token_type_ids" in inputs:
        t = inputs["mm_token_type_ids"]
        t0 = torch.cat([z, t[:1]] if side == "left" else [t[:1], z], 1)
        out["mm_token_type_ids"] = torch.cat([t0, torch.cat([t, t[:, -extra:]], 1)[1:]])
    return out


def _row(inputs: dict, b: int, zm) -> dict:
    """Row ``b`` of a padded batch alone, padding removed."""
    keep = inputs["attention_mask"][b].bool()
    out = {}
    for k, v in inputs.items():
        if k in ("input_ids", "attention_mask", "mm_token_type_ids"):
            out[k] = v[b:b + 1][:, keep]
        elif k in ("pixel_values", "pixel_attention_mask") and zm.name == "t2vid":
            out[k] = v[b:b + 1]
        elif k in ("video_grid_thw", "image_grid_thw"):
            out[k] = v[b:b + 1]
        elif k == "pixel_values_videos":
            out[k] = v.view(inputs["input_ids"].shape[0], -1, v.shape[-1])[b]
        elif k == "pixel_values":   # Qwen2-VL: flattened patches of every row's image
            out[k] = v.view(inputs["input_ids"].shape[0], -1, v.shape[-1])[b]
        else:
            out[k] = v
    return out


def _eager_kept(model, inputs: dict, K: int, keep: float) -> torch.Tensor:
    """``[B, L]`` bool: False at the visual tokens an eager-attention FastV would drop at layer K."""
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    with torch.no_grad():
        att = m(**inputs, output_attentions=True).attentions[K]           # [B, H, L, L]
    ids = inputs["input_ids"]
    B, L = ids.shape
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    imp = att[torch.arange(B), :, last_real(mask), :].mean(1)           # [B, L]
    kept = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):
        vis = ((ids[b] == _visual_id(model)) & (mask[b] != 0)).nonzero().flatten()
        top = vis[imp[b, vis].topk(math.ceil(keep * vis.numel())).indices]
        kept[b, vis] = False
        kept[b, top] = True
    return kept


def _masked_reference(model, inputs: dict, K: int, kept: torch.Tensor) -> torch.Tensor:
    """Logits of the unmodified model whose layers >= K never attend to a dropped token (``kept`` False)."""
    ids = inputs["input_ids"]
    B, L = ids.shape
    mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None] & mask[:, None, :] & kept[:, None, :]
    allowed |= torch.eye(L, dtype=torch.bool)[None]                      # a dropped row sees itself (unused)
    add = torch.zeros(B, 1, L, L).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)

    def pre(module, args, kwargs):
        kwargs["attention_mask"] = add
        return args, kwargs

    layers = _layers(model)
    handles = [layers[i].register_forward_pre_hook(pre, with_kwargs=True) for i in range(K, len(layers))]
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("side", ["none", "right", "left"])
def test_inner_pruning_equals_the_masked_unmodified_model(zm, side):
    K, keep = 1, 0.5
    inputs = zm.example_inputs(batch=2)
    if side != "none":
        inputs = _pad(inputs, 3, side)
    kept = _eager_kept(zm.model, inputs, K, keep)
    ref = _masked_reference(zm.model, inputs, K, kept)
    opt = holitom_opt(zm.model, 1.0, outer=False, inner_layer=K, inner_keep=keep, inner_merge=False)
    (m,) = opt.report.runtime_results[0].matches
    assert m.rewritten and "inner K=1/" in m.what and "prune" in m.what
    with torch.no_grad():
        out = opt(**inputs)
    st = getattr(opt.module, STATS_ATTR).inner
    n_vis = int(((inputs["input_ids"] == _visual_id(zm.model)) & inputs.get(
        "attention_mask", torch.ones_like(inputs["input_ids"])).bool()).sum())
    assert st.prefills == 1 and st.visual_before == n_vis and st.visual_after == n_vis - int((~kept).sum())
    real = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool() & kept   # kept real positions
    torch.testing.assert_close(out.logits[real], ref[real], rtol=0, atol=ATOL)


def test_inner_decode_step_continues_at_the_right_position(zm):
    """One cached decode step after an inner-pruned prefill equals the masked reference on prompt + that token
    (Qwen2-VL: position = cache length + rope_deltas over layer 0's full cache; layers >= K hold only the kept
    tokens)."""
    K, keep = 1, 0.5
    inputs = zm.example_inputs(batch=1)
    kept = _eager_kept(zm.model, inputs, K, keep)
    opt = holitom_opt(zm.model, 1.0, outer=False, inner_layer=K, inner_keep=keep, inner_merge=False)
    with torch.no_grad():
        out = opt(**inputs, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        cache = out.cache
        assert cache.get_seq_length(0) == inputs["input_ids"].shape[1]
        assert cache.get_seq_length(K) == int(kept.sum())                 # layers >= K: kept tokens only
        step = opt(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1]
    ref = _masked_reference(zm.model, _extend(inputs, nxt), K, torch.cat([kept, torch.ones_like(nxt).bool()], 1))
    torch.testing.assert_close(step, ref[:, -1], rtol=0, atol=ATOL)


def _extend(inputs: dict, new: torch.Tensor) -> dict:
    """The prompt followed by the text tokens ``new [B, n]``."""
    out = dict(inputs, input_ids=torch.cat([inputs["input_ids"], new], 1))
    for k, fill in (("mm_token_type_ids", 0), ("attention_mask", 1)):
        if k in inputs:
            out[k] = torch.cat([inputs[k], torch.full_like(new, fill)], 1)
    return out


def test_inner_generate_on_a_left_padded_batch_equals_the_masked_reference(zm):
    """generate() on a left-padded batch: every step's logits equal the masked reference on the prompt + the tokens
    so far (decode masks must lose the dropped columns of layers >= K, padding stays masked)."""
    K, keep, steps = 1, 0.5, 3
    inputs = _pad(zm.example_inputs(batch=2, seed=2), 3, "left")
    kept = _eager_kept(zm.model, inputs, K, keep)
    opt = holitom_opt(zm.model, 1.0, outer=False, inner_layer=K, inner_keep=keep, inner_merge=False)
    with torch.no_grad():
        gen = opt.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                           return_dict_in_generate=True, output_logits=True)
    new = gen.sequences[:, -steps:]
    for j in range(steps):
        grown = _extend(inputs, new[:, :j])
        ref = _masked_reference(zm.model, grown, K, torch.cat([kept, torch.ones_like(new[:, :j]).bool()], 1))
        torch.testing.assert_close(gen.logits[j], ref[:, -1], rtol=0, atol=ATOL)


@pytest.mark.parametrize("side", ["right", "left"])
def test_outer_plus_inner_merging_batch_equals_rows_alone(zm, side):
    """Outer merging leaves rows of different lengths; inner merging then keeps different counts per row (masked
    filler slots). Each row of the padded batch equals the row alone (its real positions' logits)."""
    inputs = _pad(zm.example_inputs(batch=2, seed=3), 3, side)
    opt = holitom_opt(zm.model, 0.5, inner_layer=1, inner_keep=0.5)
    with torch.no_grad():
        out = opt(**inputs)
        rows = [opt(**_row(inputs, b, zm)) for b in range(2)]
    assert getattr(opt.module, STATS_ATTR).inner.prefills == 3
    mask = inputs["attention_mask"].bool()
    for b, r in enumerate(rows):
        # merged slots of the video block carry logits in 'original' layout; dropped slots are zeros in both
        torch.testing.assert_close(out.logits[b][mask[b]], r.logits[0], rtol=0, atol=ATOL)


def test_inner_merge_generate_first_token_equals_forward(zm):
    inputs = zm.example_inputs(batch=2, seed=1)
    opt = holitom_opt(zm.model, 0.5, inner_layer=1, inner_keep=0.5)
    with torch.no_grad():
        greedy = opt(**inputs).logits[:, -1].argmax(-1)
        gen = opt.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.equal(gen[:, 0], greedy)

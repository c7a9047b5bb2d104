"""The ``ccam`` graph pass: CCAM-masked projector cross-attention -> ``vopt::block_sparse_attention``."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

import vopt
from vopt import zoo
from vopt.capture import export_stage
from vopt.errors import ConfigError
from vopt.ops.ccam_mask import CCAMMask
from vopt.pass_manager import PassManager
from vopt.pass_protocol import PassContext, StageGraph
from vopt.passes.ccam import CCAMConfig, CCAMPass

SDPA = torch.ops.aten.scaled_dot_product_attention.default
BLOCK_SPARSE = torch.ops.vopt.block_sparse_attention.default


def call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def leaves(out):
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor) and x.is_floating_point()]


def assert_close(ref, got):
    for r, g in zip(leaves(ref), leaves(got), strict=True):
        tol = 1e-5 + 1e-5 * float(r.abs().max())
        assert float((r - g).abs().max()) <= tol


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


# ---- a toy projector: learnable queries cross-attend to T*P frame tokens, plus a self-attention ----------


class ToyProjector(torch.nn.Module):
    def __init__(self, nq=12, dim=32, heads=2, mask=None, self_attention=True):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.self_attention = heads, self_attention
        self.queries = torch.nn.Parameter(torch.randn(nq, dim))
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.sq, self.sk, self.sv = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.mask = mask                       # a constant bool [Q, K] mask, or None

    def _h(self, x):
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, frames):                 # [B, T, P, dim]
        b, t, p, d = frames.shape
        kv = frames.reshape(b, t * p, d)
        x = self.queries.unsqueeze(0).expand(b, -1, -1)
        if self.self_attention:
            x = x + F.scaled_dot_product_attention(self._h(self.sq(x)), self._h(self.sk(x)), self._h(self.sv(x))) \
                .transpose(1, 2).reshape(b, -1, d)
        mask = None if self.mask is None else self.mask.to(frames.device)
        out = F.scaled_dot_product_attention(self._h(self.q(x)), self._h(self.k(kv)), self._h(self.v(kv)), attn_mask=mask)
        return out.transpose(1, 2).reshape(b, -1, d)


def run_pass(module, inputs, cfg, stage="projector", role="projector"):
    gm = export_stage(module, inputs, {})
    result = CCAMPass(cfg).run_graph(StageGraph(stage, role, gm), PassContext())
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, result


FRAMES = torch.randn(2, 4, 6, 32, generator=torch.Generator().manual_seed(1))     # B=2, T=4, P=6


# ---- Video-CCAM: the model's own mask -> exact ---------------------------------------------------------


def test_video_ccam_projector_rewritten_and_exact():
    zm = zoo.build("video-ccam")
    inputs = zm.example_inputs()
    before = copy.deepcopy(zm.model.state_dict())
    with torch.no_grad():
        ref = call(zm.model, inputs)
    cfg = CCAMConfig(block_q=16, block_k=16)
    opt = vopt.optimize(zm.model, passes=["canonicalize_attention", CCAMPass(cfg)], example_inputs=inputs)
    with torch.no_grad():
        got = call(opt, inputs)
    assert_close(ref, got)
    done = opt.report.rewritten("ccam")
    assert len(done) == 1 and done[0].where.startswith("projector:")
    # tiny: 64 queries, T=8 frames x P=16 tokens, ceil form; tiles 16x16
    want = CCAMMask(64, 8, 16, "ceil").skipped_fraction(16, 16)
    assert 0.3 < want < 0.5
    assert f"T=8 P=16 form=ceil" in done[0].what and f"skipped {want:.1%}" in done[0].what
    assert done[0].flops_saved > 0
    assert not opt.report.skipped("ccam")              # the projector's only attention is the CCAM site
    gms = [gm for st in opt.stages.values() for gm in st.graphs]
    proj = [t for st_name, st in opt.stages.items() if st_name == "projector" for gm in st.graphs for t in targets(gm)]
    assert BLOCK_SPARSE in proj and SDPA not in proj
    assert any(SDPA in targets(gm) for gm in gms)       # other stages untouched
    # the caller's model is untouched
    assert all(torch.equal(v, zm.model.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        assert_close(ref, call(zm.model, inputs))


def test_video_ccam_default_blocks_and_report_text():
    zm = zoo.build("video-ccam")
    inputs = zm.example_inputs()
    opt = vopt.optimize(zm.model, passes=["canonicalize_attention", "ccam"], example_inputs=inputs)
    done = opt.report.rewritten("ccam")
    assert len(done) == 1 and "tiles 64x64" in done[0].what   # 64 queries x 128 keys: 2 tiles, none dead
    with torch.no_grad():
        assert_close(call(zm.model, inputs), call(opt, inputs))


# ---- existing mode on the toy projector ------------------------------------------------------------------


def test_existing_mode_recognises_either_form_and_skips_self_attention():
    for form, t in (("ceil", 4), ("floor", 4), ("ceil", 5), ("floor", 5)):
        p = 6 * 4 // t if 24 % t == 0 else None
        if p is None:
            continue
        mask = CCAMMask(12, t, p, form).dense()
        m = ToyProjector(mask=mask).eval()
        with torch.no_grad():
            ref = m(FRAMES)
        gm, r = run_pass(m, (FRAMES,), CCAMConfig(block_q=16, block_k=16))
        assert len(r.rewritten) == 1 and BLOCK_SPARSE in targets(gm)
        with torch.no_grad():
            assert_close(ref, gm(FRAMES))
        (self_site,) = r.skipped
        assert "not cross-attention" in self_site.reason and "self-attention" in self_site.reason


def test_existing_mode_skips_non_ccam_and_unmasked_cross_attention():
    mask = CCAMMask(12, 4, 6).dense().flip(0)                    # not monotone in queries: not CCAM
    _, r = run_pass(ToyProjector(mask=mask, self_attention=False).eval(), (FRAMES,), CCAMConfig())
    assert not r.rewritten and "no CCAM mask" in r.skipped[0].reason
    _, r = run_pass(ToyProjector(self_attention=False).eval(), (FRAMES,), CCAMConfig())
    assert not r.rewritten and "no attn_mask" in r.skipped[0].reason and "apply" in r.skipped[0].reason
    # a stage without the projector role is not searched at all
    _, r = run_pass(ToyProjector(mask=CCAMMask(12, 4, 6).dense()).eval(), (FRAMES,), CCAMConfig(), role="language")
    assert not r.matches


# ---- apply mode: imposes the mask (changes the model) ---------------------------------------------------


def test_apply_mode_equals_dense_masked_model_and_is_causal():
    m = ToyProjector().eval()
    cfg = CCAMConfig(mode="apply", tokens_per_frame=6, block_q=16, block_k=16)
    with torch.no_grad():
        ref = m(FRAMES)
    gm, r = run_pass(m, (FRAMES,), cfg)
    assert len(r.rewritten) == 1 and "apply: CCAM Q=12 T=4 P=6" in r.rewritten[0].what
    with torch.no_grad():
        got = gm(FRAMES)
        masked = ToyProjector(mask=CCAMMask(12, 4, 6).dense()).eval()(FRAMES)   # same seed -> same weights
    assert float((got - ref).abs().max()) > 1e-3                               # the model changed
    assert_close(masked, got)                                                  # ... into the dense-masked one
    # causality: perturbing frames 2..3 leaves the query groups that see only frames 0..1 unchanged
    g = CCAMMask(12, 4, 6).last_frame()
    early = g <= 1
    pert = FRAMES.clone()
    pert[:, 2:] += torch.randn_like(pert[:, 2:])
    with torch.no_grad():
        got2 = gm(pert)
    assert early.any() and (~early).any()
    assert torch.allclose(got2[:, early], got[:, early], atol=1e-6)
    assert float((got2[:, ~early] - got[:, ~early]).abs().max()) > 1e-3


def test_apply_mode_frames_field_and_mismatched_key_length():
    gm, r = run_pass(ToyProjector(self_attention=False).eval(), (FRAMES,), CCAMConfig(mode="apply", frames=4, form="floor"))
    assert len(r.rewritten) == 1 and "T=4 P=6 form=floor" in r.rewritten[0].what
    _, r = run_pass(ToyProjector(self_attention=False).eval(), (FRAMES,), CCAMConfig(mode="apply", tokens_per_frame=5))
    assert not r.rewritten and "tokens_per_frame=5" in r.skipped[0].reason


def test_apply_on_sevila_qformer_skips_with_reasons():
    """SeViLA's Q-Formers see one frame per call (frames are batched): T=1, CCAM would be full attention."""
    zm = zoo.build("sevila")
    inputs = zm.example_inputs()
    cfg = CCAMConfig(mode="apply", tokens_per_frame=17)
    opt = vopt.optimize(zm.model, passes=["canonicalize_attention", CCAMPass(cfg)], example_inputs=inputs)
    skipped = opt.report.skipped("ccam")
    assert not opt.report.rewritten("ccam") and skipped
    assert {m.where.split(":")[0] for m in skipped} == {"localizer_qformer", "answerer_qformer"}
    assert any("T=1" in m.reason for m in skipped)
    assert any("not cross-attention" in m.reason for m in skipped)
    with torch.no_grad():
        assert_close(call(zm.model, inputs), call(opt, inputs))


# ---- config and ordering --------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,field", [
    (dict(mode="both"), "mode"),
    (dict(mode="apply"), "tokens_per_frame"),
    (dict(form="round"), "form"),
    (dict(tokens_per_frame=0), "tokens_per_frame"),
    (dict(frames=-2), "frames"),
    (dict(block_q=0), "block_q"),
])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        CCAMConfig(**kw)


def test_registered_opt_in_and_ordered_before_attention_rewrites():
    assert "ccam" not in PassManager.default().names
    pm = PassManager.from_names(["canonicalize_attention", "ccam", "sdpa", "sageattention2"])
    assert pm.names.index("ccam") == 1
    with pytest.raises(Exception, match="ccam"):
        PassManager.from_names(["sdpa", "ccam"])


def test_lvtr_decoder_sites_classified_and_skipped_with_reasons():
    """LVTR (one 'whole' stage, so configured by name): self-attention skipped; decoder cross-attention has an
    input-dependent additive key-padding mask over frames + sentences, so neither mode rewrites it."""
    zm = zoo.build("lvtr")
    inputs = zm.example_inputs()
    for cfg, why in ((CCAMConfig(stages=["model"]), "depends on the stage's inputs"),
                     (CCAMConfig(stages=["model"], mode="apply", tokens_per_frame=1), "not bool")):
        opt = vopt.optimize(zm.model, passes=[CCAMPass(cfg)], example_inputs=inputs)
        skipped = opt.report.skipped("ccam")
        assert not opt.report.rewritten("ccam")
        cross = [m for m in skipped if ".cross_attn/" in m.where]
        selfs = [m for m in skipped if ".self_attn/" in m.where]
        assert len(cross) == 2 and all(why in m.reason for m in cross)
        assert len(selfs) == 4 and all("not cross-attention" in m.reason for m in selfs)


# ---- composition with sageattention2: quantized + masked ---------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
def test_sageattention2_quantizes_the_block_sparse_site_with_the_same_mask(adaptive):
    """ccam -> sageattention2: the block-sparse site becomes vopt::sage_attention with attn_mask = dense & expanded
    block layout, which is the model's own CCAM mask: the result equals sageattention2 alone on the dense-masked
    SDPA (same quantized numerics, same mask; the Triton kernel skips the dead tiles of that bool mask)."""
    from vopt.passes.ccam import CCAMPass
    from vopt.passes.sageattention2 import SageAttention2Config, SageAttention2Pass

    zm = zoo.build("video-ccam")
    inputs = zm.example_inputs()
    sage = lambda: SageAttention2Pass(SageAttention2Config(adaptive=adaptive, candidates=["int8_fp8_block"],
                                                           min_cos=0.9, stages=["projector"]))
    both = vopt.optimize(zm.model, passes=["canonicalize_attention", CCAMPass(CCAMConfig(block_q=16, block_k=16)),
                                           sage()], example_inputs=inputs)
    alone = vopt.optimize(zm.model, passes=["canonicalize_attention", sage()], example_inputs=inputs)
    with torch.no_grad():
        ref, got, want = call(zm.model, inputs), call(both, inputs), call(alone, inputs)
    for g, w in zip(leaves(got), leaves(want), strict=True):
        assert torch.equal(g, w)
    assert any(float((r - g).abs().max()) > 0 for r, g in zip(leaves(ref), leaves(got)))  # it is quantized
    done = both.report.rewritten("sageattention2")
    assert len(done) == 1 and "vopt.block_sparse_attention(block 16x16)" in done[0].what
    proj = [t for name, st in both.stages.items() if name == "projector" for gm in st.graphs for t in targets(gm)]
    assert torch.ops.vopt.sage_attention.default in proj and BLOCK_SPARSE not in proj


def test_sageattention2_keeps_a_block_sparse_site_with_a_computed_layout():
    """A block layout computed in the graph (not a constant) cannot be expanded at pass time: skipped, reason given."""
    from vopt.passes.sageattention2 import SageAttention2Pass

    class Computed(torch.nn.Module):
        def forward(self, q, k, v, bm):
            return torch.ops.vopt.block_sparse_attention(q, k, v, bm > 0, 16, 16)

    q = k = v = torch.randn(1, 2, 32, 16)
    gm = export_stage(Computed(), (q, k, v, torch.ones(2, 2)), {})
    result = SageAttention2Pass().run_graph(StageGraph("s", "projector", gm), PassContext())
    assert not result.rewritten and "not a constant" in result.skipped[0].reason

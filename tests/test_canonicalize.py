"""``canonicalize_attention``: eager matmul-softmax-matmul spellings become one SDPA node."""
import pytest
import torch

import vopt
from vopt.capture import export_stage
from vopt.pass_manager import PassManager
from vopt.pass_protocol import PassContext, StageGraph

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def run(module, args, passes=("canonicalize_attention",)):
    gm = export_stage(module, args, {})
    results = PassManager.from_names(list(passes)).run_graph(StageGraph("s", "whole", gm), PassContext())
    return gm, results[0]


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


class MHA(torch.nn.Module):
    def __init__(self, need_weights, use_weights=False, mask=False):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.need_weights, self.use_weights, self.mask = need_weights, use_weights, mask

    def forward(self, x):
        mask = torch.triu(torch.full((x.shape[1], x.shape[1]), float("-inf")), 1) if self.mask else None
        out, w = self.mha(x, x, x, need_weights=self.need_weights, attn_mask=mask)
        return out + w.sum() if self.use_weights else out


@pytest.mark.parametrize("mask", [False, True])
def test_mha_with_dead_weights_is_rewritten(mask):
    torch.manual_seed(0)
    m, x = MHA(need_weights=True, mask=mask).eval(), torch.randn(2, 7, 32)
    gm, res = run(m, (x,))
    assert len(res.rewritten) == 1 and count(gm, SDPA) == 1
    assert count(gm, torch.ops.aten.softmax.int) == 0
    torch.testing.assert_close(gm(x), m(x), atol=1e-5, rtol=0)


def test_mha_with_used_weights_is_skipped_with_reason():
    m, x = MHA(need_weights=True, use_weights=True).eval(), torch.randn(2, 7, 32)
    gm, res = run(m, (x,))
    assert len(res.skipped) == 1 and "used elsewhere" in res.skipped[0].reason
    assert count(gm, SDPA) == 0
    torch.testing.assert_close(gm(x), m(x))


def test_hf_eager_attention_llama_matches_and_then_sdpa_rewrites():
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, attn_implementation="eager", use_cache=False)
    model = T.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 9))
    opt = vopt.optimize(model, example_inputs={"input_ids": ids})
    report = opt.report
    assert len(report.rewritten("canonicalize_attention")) == 2
    assert len(report.rewritten("sdpa")) == 2
    with torch.no_grad():
        diff = (opt(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5, diff


def test_dry_run_changes_nothing():
    m, x = MHA(need_weights=True).eval(), torch.randn(1, 5, 32)
    gm = export_stage(m, (x,), {})
    before = str(gm.graph)
    res = PassManager.from_names(["canonicalize_attention"]).run_graph(StageGraph("s", "whole", gm), PassContext(dry_run=True))
    assert len(res[0].rewritten) == 1 and not res[0].modified
    assert str(gm.graph) == before

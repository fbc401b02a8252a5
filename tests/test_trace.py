"""Reading the forward: torch.fx and the runtime recorder agree; roles, orientation, coverage."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import toy_models as toys

from pathway.errors import TraceError
from pathway.inputs import derive_inputs
from pathway.modules import find_blocks, plain_names
from pathway.trace import analyse, read_fx, read_runtime


def uses_of(model, reader: str, inputs=None):
    ops, consts = read_fx(model) if reader == "fx" else read_runtime(model, inputs)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    return analyse(ops, consts, shapes, plain_names(model))


@pytest.mark.parametrize("make, inputs", [
    (toys.timm_vit, torch.randn(1, 3, 32, 32)),
    (toys.tv_vit, torch.randn(1, 3, 32, 32)),
    (toys.FunctionalNet, toys.tokens(1)),
])
def test_fx_and_runtime_recorder_give_the_same_uses(make, inputs):
    model = make()
    fx_uses, fx_seq, fx_touched, fx_hidden = uses_of(model, "fx")
    rt_uses, rt_seq, rt_touched, rt_hidden = uses_of(model, "runtime", inputs)
    assert fx_hidden == rt_hidden == []
    assert [u.name for u in fx_uses] == [u.name for u in rt_uses]
    assert [(u.role, u.transposed, u.shape) for u in fx_uses] == [(u.role, u.transposed, u.shape) for u in rt_uses]
    def heads(uses):
        return [(u.heads, u.kv_heads, u.layout) for u in uses]

    assert heads(fx_uses) == heads(rt_uses)
    assert fx_seq == rt_seq and fx_touched == rt_touched
    # siblings: the same grouping of input activations on both sides
    def group(uses):
        return [sorted(u.name for u in uses if u.input == x) for x in dict.fromkeys(u.input for u in uses)]

    assert group(fx_uses) == group(rt_uses)


def test_timm_roles_and_order():
    uses, *_ = uses_of(toys.timm_vit(depth=1), "fx")
    assert [(u.name, u.role) for u in uses] == [
        ("patch_embed.proj.weight", None), ("blocks.0.attn.qkv.weight", "qkv"), ("blocks.0.attn.proj.weight", "o"),
        ("blocks.0.mlp.fc1.weight", None), ("blocks.0.mlp.fc2.weight", None), ("head.weight", None)]
    assert uses[0].kind == "conv" and uses[0].shape == (64, 3, 16, 16)


def test_mha_composite_gives_in_proj_then_out_proj():
    uses, *_ = uses_of(toys.tv_vit(depth=1), "fx")
    names = [(u.name.split(".")[-2:], u.role) for u in uses]
    assert (["self_attention", "in_proj_weight"], "qkv") in names
    assert (["out_proj", "weight"], "o") in names


def test_bert_qkv_are_siblings_with_roles():
    model = toys.hf_bert(depth=1)
    inputs, source = derive_inputs(model)
    assert "input_ids" in inputs and "Hugging Face" in source
    uses, *_ = uses_of(model, "runtime", inputs)
    attention = [u for u in uses if ".attention." in u.name and u.kind == "linear"]
    assert [u.role for u in attention] == ["q", "k", "v", "o"]
    assert len({u.input for u in attention[:3]}) == 1


def test_videomae_roles_come_from_dataflow_not_execution_order():
    model = toys.hf_videomae(depth=1)
    inputs, _ = derive_inputs(model)
    uses, *_ = uses_of(model, "runtime", inputs)
    attention = [u for u in uses if ".attention.attention." in u.name]
    assert [u.name.split(".")[-2] for u in attention] == ["key", "value", "query"]   # execution order
    assert [u.role for u in attention] == ["k", "v", "q"]                           # dataflow roles


def test_gpt2_conv1d_is_read_transposed():
    model = toys.hf_gpt2(depth=1)
    uses, *_ = uses_of(model, "runtime", derive_inputs(model)[0])
    c_attn = next(u for u in uses if u.name.endswith("c_attn.weight"))
    assert c_attn.transposed and c_attn.role == "qkv"
    assert c_attn.shape == (192, 64)                # canonical [out, in]; stored [64, 192]
    assert tuple(model.h[0].attn.c_attn.weight.shape) == (64, 192)


def test_fx_fails_on_data_dependent_branch_and_recorder_reports_the_path_taken():
    model = toys.BranchNet()
    with pytest.raises(torch.fx.proxy.TraceError, match="control flow"):
        read_fx(model)
    x = toys.tokens(1)
    _, _, touched, _ = uses_of(model, "runtime", x)
    expert_used = {n for n in touched if n.startswith("experts.")}
    assert len(expert_used) == 2     # one expert's weight and bias; the other never ran
    assert {n.split(".")[1] for n in expert_used} in ({"0"}, {"1"})


def test_blocks_found_without_name_conventions():
    assert find_blocks(toys.timm_vit(depth=3)) == ["blocks.0", "blocks.1", "blocks.2"]
    assert find_blocks(toys.tv_vit(depth=2)) == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    assert find_blocks(toys.hf_gpt2(depth=2)) == ["h.0", "h.1"]
    assert find_blocks(toys.SharedNet()) == []


def test_heads_and_row_layout_come_from_the_views_after_each_projection():
    vit_uses, *_ = uses_of(toys.timm_vit(depth=1), "fx")              # reshape(B, N, 3, heads, head_dim)
    assert (vit_uses[1].role, vit_uses[1].heads, vit_uses[1].layout) == ("qkv", 4, "")
    gqa = toys.GQANet(dim=64, depth=1)
    gqa_uses, *_ = uses_of(gqa, "runtime", torch.randn(1, 5, 8))     # view(b, n, heads, head_dim) each
    assert [(u.role, u.heads) for u in gqa_uses[1:4]] == [("q", 4), ("k", 2), ("v", 2)]
    for split, layout in (("chunk", ""), ("slice", ""), ("narrow", ""), ("index_select", None)):
        uses, *_ = uses_of(toys.SlicedQKVNet(depth=1, split=split), "runtime", torch.randn(1, 5, 8))
        assert (uses[1].role, uses[1].layout) == ("qkv", layout), split


@pytest.mark.parametrize("reader", ["fx", "runtime"])
def test_fused_parts_read_in_another_order_leave_the_layout_unread(reader):
    right, *_ = uses_of(toys.SlicedQKVNet(depth=1, split="chunk"), reader, torch.randn(1, 5, 8))
    swapped, *_ = uses_of(toys.SlicedQKVNet(depth=1, split="chunk", order="kvq"), reader, torch.randn(1, 5, 8))
    assert right[1].layout == "" and swapped[1].layout is None
    assert swapped[1].layout_note == "its rows reach attention as rows 0:64 -> k, rows 64:128 -> v, rows 128:192 -> q"


def test_the_runtime_recorder_gives_back_every_modules_own_mode():
    """fx cannot trace BranchNet, so plan runs it in eval(); a submodule the user left in eval stays in eval."""
    import pathway

    target, aux = toys.BranchNet(), toys.BranchNet()
    target.train()
    target.blocks[0].eval()
    aux.eval()
    aux.blocks[1].train()
    before = [[m.training for m in model.modules()] for model in (target, aux)]
    report = pathway.plan(target, aux, target_inputs=toys.tokens(1), aux_inputs=toys.tokens(1), allow_partial=True)
    assert report.target_reader.startswith("runtime recorder")
    assert [[m.training for m in model.modules()] for model in (target, aux)] == before


class SummedWeightNet(nn.Module):
    """Each block's fc reads ``W + B @ A`` (a LoRA-style sum written by hand), named so A sorts first."""

    def __init__(self, dim: int = 16, rank: int = 2, same_shape: bool = False):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))
        for fc in self.fc:
            fc.a = nn.Parameter(torch.randn(dim if same_shape else rank, dim) * 0.1)
            fc.b = nn.Parameter(torch.randn(dim, rank if not same_shape else dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc in self.fc:
            x = F.linear(x, fc.weight + fc.b @ fc.a, fc.bias)
        return x


def test_a_weight_summed_from_several_parameters_is_the_one_of_its_shape_or_refused():
    uses, *_ = uses_of(SummedWeightNet(), "runtime", toys.tokens(1, features=16))
    assert [u.name for u in uses] == ["fc.0.weight", "fc.1.weight"]       # not fc.0.a, first by name
    with pytest.raises(TraceError, match=r"several parameters \(fc\.0\.a, fc\.0\.b, fc\.0\.weight\) of shape "
                                         r"\[16, 16\]"):
        uses_of(SummedWeightNet(same_shape=True), "runtime", toys.tokens(1, features=16))

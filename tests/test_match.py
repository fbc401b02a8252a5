"""Pairing across codebases, depth policies, shared weights, and the errors that guard them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import toy_models as toys

import pathway
from pathway.inject import materialise
from pathway.match import map_blocks
from pathway.modules import plain_parameters


def pair_map(report) -> dict[str, tuple[tuple[str, ...], str]]:
    return {p.target: (p.aux, p.transform) for p in report.pairs}


def built(report, aux) -> dict[str, torch.Tensor]:
    params = plain_parameters(aux)
    return {p.target: materialise(p, params) for p in report.pairs}


def test_timm_to_timm_pairs_by_name():
    report = pathway.plan(toys.timm_vit(depth=3), toys.timm_vit(depth=3, classes=0))
    assert report.strategy == "name" and report.coverage == (12, 12)
    assert all(p.aux == (p.target,) and p.transform == "identity" for p in report.pairs)
    assert "torch.fx" in report.target_reader


def test_timm_vit_from_hf_bert_concatenates_split_qkv():
    target, aux = toys.timm_vit(depth=2), toys.hf_bert(depth=2)
    report = pathway.plan(target, aux)
    assert report.strategy == "graph" and report.coverage == (8, 8)
    pairs = pair_map(report)
    q, k, v = (f"encoder.layer.1.attention.self.{r}.weight" for r in ("query", "key", "value"))
    assert pairs["blocks.1.attn.qkv.weight"] == ((q, k, v), "concat_out[q,k,v]")
    assert pairs["blocks.1.attn.proj.weight"][0] == ("encoder.layer.1.attention.output.dense.weight",)
    assert pairs["blocks.1.mlp.fc1.weight"][0] == ("encoder.layer.1.intermediate.dense.weight",)
    assert pairs["blocks.1.mlp.fc2.weight"][0] == ("encoder.layer.1.output.dense.weight",)
    tensors, bert = built(report, aux), aux.encoder.layer[1].attention.self
    expected = torch.cat([bert.query.weight, bert.key.weight, bert.value.weight])
    assert torch.equal(tensors["blocks.1.attn.qkv.weight"], expected)
    assert "runtime recorder on input_ids" in report.aux_reader


def test_hf_bert_from_timm_splits_fused_qkv():
    target, aux = toys.hf_bert(depth=2), toys.timm_vit(depth=2)
    report = pathway.plan(target, aux)
    tensors = built(report, aux)
    qkv = aux.blocks[0].attn.qkv.weight
    for i, role in enumerate(("query", "key", "value")):
        name = f"encoder.layer.0.attention.self.{role}.weight"
        assert pair_map(report)[name][1].startswith("split_out")
        assert torch.equal(tensors[name], qkv[64 * i: 64 * (i + 1)])


def test_timm_vit_from_torchvision_mha():
    target, aux = toys.timm_vit(depth=2), toys.tv_vit(depth=2)
    report = pathway.plan(target, aux, segments=("pre", "body", "post"))
    pairs = pair_map(report)
    layer = "encoder.layers.encoder_layer_1"
    assert pairs["blocks.1.attn.qkv.weight"] == ((f"{layer}.self_attention.in_proj_weight",), "identity")
    assert pairs["blocks.1.attn.proj.weight"][0] == (f"{layer}.self_attention.out_proj.weight",)
    assert pairs["blocks.1.mlp.fc1.weight"][0] == (f"{layer}.mlp.0.weight",)
    assert pairs["blocks.1.mlp.fc2.weight"][0] == (f"{layer}.mlp.3.weight",)
    assert pairs["head.weight"][0] == ("heads.head.weight",)        # exact-shape pre/post pairing


def test_timm_vit_from_videomae_orders_by_dataflow():
    target, aux = toys.timm_vit(depth=2), toys.hf_videomae(depth=2)
    report = pathway.plan(target, aux)
    attn = aux.encoder.layer[0].attention.attention
    expected = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])
    assert torch.equal(built(report, aux)["blocks.0.attn.qkv.weight"], expected)
    assert report.coverage == (8, 8)


@pytest.mark.parametrize("make_aux", [toys.hf_ast, toys.hf_vit])
def test_timm_vit_from_hf_audio_and_image_transformers(make_aux):
    report = pathway.plan(toys.timm_vit(depth=2), make_aux(depth=2))
    assert report.coverage == (8, 8)
    assert pair_map(report)["blocks.0.attn.qkv.weight"][1] == "concat_out[q,k,v]"


def test_gpt2_conv1d_target_gets_transposed_aux():
    target, aux = toys.hf_gpt2(depth=2), toys.hf_bert(depth=2)
    report = pathway.plan(target, aux)
    assert report.coverage == (8, 8)
    tensors = built(report, aux)
    bert = aux.encoder.layer[0].attention.self
    expected = torch.cat([bert.query.weight, bert.key.weight, bert.value.weight]).t()    # [in, out] storage
    assert torch.equal(tensors["h.0.attn.c_attn.weight"], expected)
    assert pair_map(report)["h.0.mlp.c_fc.weight"][1] == "transpose"


def test_tied_aux_lm_head_is_not_a_body_weight():
    report = pathway.plan(toys.hf_gpt2(depth=2), toys.hf_gpt2(depth=2, lm_head=True))
    assert report.coverage == (8, 8)
    assert not any("lm_head" in n or "wte" in n for p in report.pairs for n in p.aux)


@pytest.mark.parametrize("policy, expected", [
    ("uniform", [0, 3]), ("first", [0, 1]), ("last", [2, 3]), ("every_k", [0, 2]), ("reversed", [3, 0])])
def test_depth_policies(policy, expected):
    assert map_blocks(2, 4, policy) == expected
    report = pathway.plan(toys.timm_vit(depth=2), toys.timm_vit(depth=4), depth=policy)
    assert report.block_map == expected
    assert pair_map(report)["blocks.1.mlp.fc1.weight"][0] == (f"blocks.{expected[1]}.mlp.fc1.weight",)


def test_equal_depth_policy_refuses_a_depth_mismatch():
    with pytest.raises(pathway.DepthMismatchError, match="depth='uniform'"):
        pathway.plan(toys.timm_vit(depth=2), toys.timm_vit(depth=4))


def test_reversed_order_for_the_paper_ablation():
    report = pathway.plan(toys.timm_vit(depth=3), toys.timm_vit(depth=3), depth="reversed")
    assert pair_map(report)["blocks.0.attn.qkv.weight"][0] == ("blocks.2.attn.qkv.weight",)


def test_shallower_aux_leaves_target_blocks_unpaired_and_connect_refuses():
    target, aux = toys.timm_vit(depth=3), toys.timm_vit(depth=2)
    report = pathway.plan(target, aux, depth="first")
    assert report.coverage == (8, 12) and all("no aux block" in why for why in report.unpaired.values())
    with pytest.raises(pathway.CoverageError, match="allow_partial=True"):
        pathway.connect(target, aux, depth="first")
    assert not pathway.is_connected(target)                   # nothing half-applied
    pathway.connect(target, aux, depth="first", allow_partial=True)
    assert len(pathway.lambdas(target)) == 8


def test_shared_target_layer_cannot_take_two_aux_layers():
    with pytest.raises(pathway.CompetingPairsError, match="block.qkv.weight"):
        pathway.plan(toys.SharedNet(times=2), toys.FunctionalNet(depth=2))


def test_shared_layers_on_both_sides_unroll_and_pair():
    report = pathway.plan(toys.SharedNet(times=2), toys.SharedNet(times=2))
    assert report.depth == (2, 2) and report.coverage == (4, 4)
    assert "shared_block" in report.flags


def test_include_exclude_and_overrides():
    target, aux = toys.timm_vit(depth=2), toys.timm_vit(depth=2)
    report = pathway.plan(target, aux, include=[r"\.attn\."])
    assert {p.target.split(".")[-2] for p in report.pairs} == {"qkv", "proj"}
    assert len(report.excluded) == 4 and report.coverage == (4, 4)
    report = pathway.plan(target, aux, exclude=["fc2"], pairs={"blocks.0.mlp.fc1": "blocks.1.mlp.fc1.weight"})
    assert pair_map(report)["blocks.0.mlp.fc1.weight"] == (("blocks.1.mlp.fc1.weight",), "override")
    assert not any("fc2" in p.target for p in report.pairs)


def test_shape_mismatch_names_layers_and_shapes():
    with pytest.raises(pathway.ShapeMismatchError, match=r"blocks.0.attn.qkv.weight \[192, 64\].*\[96, 32\]"):
        pathway.plan(toys.timm_vit(dim=64), toys.timm_vit(dim=32))
    with pytest.raises(pathway.NoPairsError):
        pathway.plan(toys.timm_vit(dim=64), toys.timm_vit(dim=32), on_shape_mismatch="skip")
    narrow_mlp = toys.timm_vit(dim=64, mlp_ratio=2.0)
    report = pathway.plan(toys.timm_vit(dim=64), narrow_mlp, on_shape_mismatch="skip")
    assert {p.target.split(".")[-2] for p in report.pairs} == {"qkv", "proj"}
    assert len(report.unpaired) == 4 and all("shapes differ" in why for why in report.unpaired.values())


def test_group_sizes_that_do_not_add_up():
    # fused qkv [192, 64] <- q [64] + k [32] + v [32] of grouped-query attention
    with pytest.raises(pathway.GroupSizeError, match="group sizes do not add up"):
        pathway.plan(toys.timm_vit(dim=64), toys.GQANet(dim=64))


def test_errors_for_bad_use():
    model = toys.timm_vit()
    with pytest.raises(pathway.SelfConnectionError):
        pathway.plan(model, model)
    with pytest.raises(pathway.DeviceMismatchError, match=r"aux.to\(torch.float32\)"):
        pathway.plan(model, toys.timm_vit().double())
    with pytest.raises(pathway.OptionError, match="unknown option"):
        pathway.plan(model, toys.timm_vit(), lamda_init=0.1)
    with pytest.raises(pathway.OptionError, match="depth='diagonal'|depth"):
        pathway.plan(model, toys.timm_vit(), depth="diagonal")
    with pytest.raises(pathway.NoPairsError):
        pathway.plan(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))
    with pytest.raises(pathway.TraceError, match="aux_inputs"):
        pathway.plan(toys.timm_vit(), toys.BranchNet(dim=64), aux_inputs=torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("option, value, message", [
    ("freeze_target", "false", r"freeze_target='false' must be True or False, not a str"),
    ("train_lambda", 0, r"train_lambda=0 must be True or False, not a int"),
    ("allow_partial", None, r"allow_partial=None must be True or False"),
    ("lambda_init", float("nan"), r"lambda_init=nan is not a finite number"),
    ("lambda_init", float("inf"), r"lambda_init=inf is not a finite number"),
    ("lambda_init", True, r"lambda_init=True must be a number"),
    ("exclude", [3], r"pattern 3 is not a string"),
])
def test_option_types_and_values_are_checked_by_name(option, value, message):
    target, aux = toys.FunctionalNet(), toys.FunctionalNet()
    with pytest.raises(pathway.OptionError, match=message) as caught:
        pathway.connect(target, aux, **{option: value})
    assert "lower the" not in str(caught.value) and not pathway.is_connected(target)


@pytest.mark.parametrize("side", ["target", "aux"])
@pytest.mark.parametrize("how", ["parametrization", "hook"])
def test_weight_norm_is_named_with_the_fix(side, how):
    """weight_norm makes each weight a tensor computed from g and v: named, not '0 body blocks'."""
    models = {"target": toys.FunctionalNet(), "aux": toys.FunctionalNet()}
    layer = models[side].blocks[1].fc1
    if how == "hook":
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(layer)
        fix, named = r"remove_weight_norm\(module\)", r"torch\.nn\.utils\.weight_norm \(hook\)"
    else:
        torch.nn.utils.parametrizations.weight_norm(layer)
        fix, named = r"remove_parametrizations\(module, 'weight'\)", r"torch\.nn\.utils\.parametrizations\.weight_norm"
    with pytest.raises(pathway.TraceError, match=rf"the {side} model computes 1 weight\(s\).*{named}: "
                                                 rf"blocks\.1\.fc1\.weight.*{fix}"):
        pathway.plan(models["target"], models["aux"], target_inputs=toys.tokens(1), aux_inputs=toys.tokens(1))


def test_report_reads_well_and_is_plain_data():
    report = pathway.plan(toys.timm_vit(depth=2), toys.hf_bert(depth=2))
    text = str(report)
    assert "VisionTransformer <- BertModel" in text and "8/8" in text
    assert "blocks.0.attn.qkv.weight" in text and "attention.self.{query,key,value}.weight" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["coverage"] == [8, 8] and len(data["pairs"]) == 8


def test_overrides_survive_exclude_and_replace_shape_mismatches():
    report = pathway.plan(toys.timm_vit(), toys.timm_vit(), exclude=[r"blocks\.0\."],
                          pairs={"blocks.0.attn.qkv": "blocks.1.attn.qkv.weight"})   # a module name
    assert pair_map(report)["blocks.0.attn.qkv.weight"] == (("blocks.1.attn.qkv.weight",), "override")
    assert "blocks.0.attn.qkv.weight" not in report.excluded
    # the fixes a ShapeMismatchError suggests work: leave the layers out, or pair them by hand
    target, narrow = toys.timm_vit(), toys.timm_vit(mlp_ratio=1.0)
    left = pathway.plan(target, narrow, exclude=[r"\.mlp\."]).pairs
    assert {p.target.split(".")[-2] for p in left} == {"qkv", "proj"}
    by_hand = {f"blocks.{i}.mlp.fc1.weight": [f"blocks.{i}.mlp.fc1.weight"] * 4 for i in range(2)}
    report = pathway.plan(target, narrow, pairs=by_hand, exclude=[r"\.fc2\."])
    assert pair_map(report)["blocks.1.mlp.fc1.weight"][1] == "override concat_out[4]"


def test_an_override_does_not_hide_competition_elsewhere():
    with pytest.raises(pathway.CompetingPairsError, match="block.qkv.weight"):
        pathway.plan(toys.SharedNet(times=2), toys.FunctionalNet(depth=2),
                     pairs={"block.fc1.weight": "blocks.0.fc1.weight"})


def test_unpaired_weights_outside_the_body_do_not_block_connect():
    target = toys.timm_vit(classes=10)
    report = pathway.connect(target, toys.timm_vit(classes=0), segments=("body", "post"))
    assert report.coverage == (8, 8) and "head.weight" in report.unpaired_outside_body


def test_derived_inputs_follow_timm_img_size():
    from pathway.inputs import derive_inputs

    inputs, source = derive_inputs(toys.timm_vit())
    assert inputs.shape == (1, 3, 32, 32) and "patch_embed" in source


def test_a_tied_lm_head_is_reported():
    report = pathway.plan(toys.hf_gpt2(lm_head=True), toys.hf_gpt2(), segments=("body", "post"))
    tied = "transformer.wte.weight is used as embedding first and later as linear"
    assert any(f.startswith(tied) for f in report.flags)


def test_apply_layout_regroups_per_head_rows_both_ways():
    from pathway.report import Pair
    from pathway.units import apply_layout

    heads, dim = 4, 2
    split = torch.arange(3 * heads * dim).float().unsqueeze(1)          # rows [q | k | v], heads of `dim` rows
    interleaved = split.view(3, heads, dim, 1).transpose(0, 1).reshape(-1, 1)
    to_heads = Pair("t", ("a",), "heads", out_slice=(0, 24), layout=("heads", ""), heads=(heads, heads))
    from_heads = Pair("t", ("a",), "heads", out_slice=(8, 16), layout=("", "heads"), heads=(heads, heads))
    assert torch.equal(apply_layout(to_heads, split), interleaved)
    assert torch.equal(apply_layout(from_heads, interleaved), split[8:16])     # k of every head, in head order


def test_unequal_per_head_split_pairs_q_k_v_by_the_widths_the_graph_shows():
    """LeViT-style qkv: ``view(B, N, heads, -1).split([24, 24, 48], dim=3)`` per head, not equal thirds."""
    fused, split = toys.UnequalHeadsNet(), toys.UnequalHeadsNet(fused=False)
    x = toys.tokens(1)
    for reader in ("fx", "runtime"):
        report = pathway.plan(fused, split, tracer=reader, target_inputs=x, aux_inputs=x)
        pair = next(p for p in report.pairs if p.target == "blocks.0.qkv.weight")
        assert pair.layout == ("heads:24,24,48", "") and pair.transform.endswith("to_heads[4 x q,k,v 24,24,48]")
    per_head = built(report, split)["blocks.0.qkv.weight"].view(4, 96, 64)
    aux = plain_parameters(split)
    for role, (lo, hi) in zip("qkv", ((0, 24), (24, 48), (48, 96))):
        assert torch.equal(per_head[:, lo:hi], aux[f"blocks.0.{role}.weight"].view(4, hi - lo, 64)), role
    back = built(pathway.plan(split, fused, target_inputs=x, aux_inputs=x), fused)     # split target <- fused aux
    qkv = plain_parameters(fused)["blocks.0.qkv.weight"].view(4, 96, 64)
    assert torch.equal(back["blocks.0.v.weight"], qkv[:, 48:].reshape(192, 64))
    by_hand = {"aux": [f"blocks.0.{r}.weight" for r in "qkv"], "layout": "heads:24,24,48", "heads": 4}
    hand = pathway.plan(fused, split, pairs={"blocks.0.qkv.weight": by_hand}, target_inputs=x, aux_inputs=x)
    assert torch.equal(built(hand, split)["blocks.0.qkv.weight"], per_head.reshape(384, 64))
    with pytest.raises(pathway.OptionError, match=r"384 rows cannot be 4 heads of \(q, k, v\) laid out as 'heads:24"):
        pathway.plan(fused, split, pairs={"blocks.0.qkv.weight": {**by_hand, "layout": "heads:24,24,24"}},
                     target_inputs=x, aux_inputs=x)


def test_equal_row_totals_with_other_q_k_v_widths_are_refused():
    """qkv [96, 32] as 4 heads of q, k 4 wide and v 16 wide <- timm's [q | k | v] of 32 each: same shape."""
    target, aux = toys.UnequalHeadsNet(dim=32, key_dim=4, value_dim=16), toys.timm_vit(dim=32)
    with pytest.raises(pathway.GroupSizeError, match=r"blocks\.0\.qkv\.weight \[96, 32\] holds q, k, v rows "
                                                     r"16/16/64, aux blocks\.0\.attn\.qkv\.weight \[96, 32\] holds "
                                                     r"32/32/32"):
        pathway.plan(target, aux, exclude=[r"proj"])
    with pytest.raises(pathway.ShapeMismatchError, match=r"per head with unequal widths \(heads:4,4,16 / \)"):
        pathway.plan(target, toys.timm_vit(dim=64), exclude=[r"proj"], on_shape_mismatch="select")


class GatedMLP(nn.Module):
    """A SwiGLU MLP with names that say nothing: ``c((act(gate) * up))``, up computed first if asked."""

    def __init__(self, dim: int, hidden: int, up_first: bool = True, act: bool = True):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.up_first, self.act = up_first, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up_first:                   # a is up, b the gate
            up, gate = self.a(x), self.b(x)
        else:                               # a is the gate, b up
            gate, up = self.a(x), self.b(x)
        return self.c((F.silu(gate) if self.act else gate) * up)


class GatedBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: type[nn.Module], **options):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = mlp(dim, 4 * dim, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class GatedNet(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2, mlp: type[nn.Module] | None = None,
                 **options):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(GatedBlock(dim, heads, mlp or GatedMLP, **options) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x.mean(1)


@pytest.mark.parametrize("tracer", ["fx", "runtime"])
@pytest.mark.parametrize("up_first", [True, False], ids=["up first", "gate first"])
def test_plain_fc1_takes_the_up_projection_the_dataflow_shows(tracer, up_first):
    target, aux = toys.timm_vit(dim=64, heads=4), GatedNet(up_first=up_first)
    report = pathway.plan(target, aux, tracer=tracer, aux_inputs=toys.tokens(features=8))
    assert report.coverage == (8, 8) and report.aux_reader.startswith("torch.fx" if tracer == "fx" else "runtime")
    up, gate = ("a", "b") if up_first else ("b", "a")
    fc1 = next(p for p in report.pairs if p.target == "blocks.1.mlp.fc1.weight")
    assert fc1.aux == (f"blocks.1.mlp.{gate}.weight", f"blocks.1.mlp.{up}.weight")   # (gate, up), not execution order
    assert fc1.flags == ("gated",) and fc1.transform == "gated[up] rows 256:512"
    assert torch.equal(built(report, aux)["blocks.1.mlp.fc1.weight"], aux.get_parameter(f"blocks.1.mlp.{up}.weight"))
    assert f"blocks.1.mlp.{gate}.weight" in report.unused_aux and f"blocks.1.mlp.{up}.weight" not in report.unused_aux


def test_an_unreadable_gate_falls_back_to_execution_order_flagged():
    aux = GatedNet(up_first=True, act=False)        # a bilinear product: neither path passes an activation
    report = pathway.plan(toys.timm_vit(dim=64, heads=4), aux, gated_mlp="gate")
    fc1 = next(p for p in report.pairs if p.target == "blocks.0.mlp.fc1.weight")
    assert fc1.aux == ("blocks.0.mlp.a.weight", "blocks.0.mlp.b.weight") and fc1.out_slice == (0, 256)
    assert set(fc1.flags) == {"gated", "order_by_execution"} and "order_by_execution" in report.flags
    assert "order_by_execution" in str(report)


class NamedBilinearMLP(nn.Module):
    """``down(up(x) * gate(x))`` named as Llama names them, up computed first, no activation."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up_proj, self.gate_proj = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up_proj(x)
        return self.down_proj(up * self.gate_proj(x))


def test_an_unreadable_gate_is_told_by_known_names_before_execution_order():
    report = pathway.plan(toys.timm_vit(dim=64, heads=4), GatedNet(mlp=NamedBilinearMLP))
    fc1 = next(p for p in report.pairs if p.target == "blocks.0.mlp.fc1.weight")
    assert fc1.aux == ("blocks.0.mlp.gate_proj.weight", "blocks.0.mlp.up_proj.weight")
    assert set(fc1.flags) == {"gated", "order_by_name"} and fc1.out_slice == (256, 512)

"""Shape policies: weight selection from a wider aux (whole heads, GQA, gated MLP), depth policies, refusals.

Aux weights are filled with codes (``row * 1000 + column`` of the aux tensor) so that every element
of a selected tensor says where in the aux model it came from.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import toy_models as toys

import pathway
from pathway.shapes import NarrowAuxError, select_pairs, uniform_indices


def coded(weight: torch.Tensor) -> None:
    """weight[r, c] = r * 1000 + c: each element names its own aux row and column."""
    rows, cols = weight.shape
    with torch.no_grad():
        weight.copy_(torch.arange(rows)[:, None] * 1000.0 + torch.arange(cols)[None, :])


def origin(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux rows, aux columns) a coded-and-selected tensor came from."""
    return (tensor // 1000).long(), (tensor % 1000).long()


def aux_tensors(model) -> dict[str, torch.Tensor]:
    return {name: p.aux_weight.detach() for name, _, _, (p, *_) in pathway.modules.pathway_sites(model)}


def test_uniform_indices_follow_xu_et_al():
    assert uniform_indices(12, 6).tolist() == [0, 2, 4, 6, 8, 10]            # a multiple: every k-th
    assert uniform_indices(10, 4).tolist() == [0, 3, 6, 9]                   # else evenly spaced, rounded
    assert uniform_indices(7, 7).tolist() == list(range(7))
    with pytest.raises(NarrowAuxError, match="narrower"):
        uniform_indices(4, 6)


def test_vit_s_from_vit_b_keeps_heads_whole_and_folds_exactly():
    # ViT-S <- ViT-B in miniature: 4 heads x 16 <- 8 heads x 16, width 64 <- 128, MLP 256 <- 512
    target, aux = toys.timm_vit(dim=64, heads=4), toys.timm_vit(dim=128, heads=8, classes=0)
    for block in aux.blocks:
        for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            coded(layer.weight)
    report = pathway.connect(target, aux, on_shape_mismatch="select")
    assert report.coverage == (8, 8)
    transforms = {p.target: p.transform for p in report.pairs}
    assert transforms["blocks.0.attn.qkv.weight"] == "select[heads 4/8, width 64/128] 25% of aux"
    assert transforms["blocks.0.mlp.fc1.weight"] == "select[256x64/512x128] 25% of aux"
    built = aux_tensors(target)
    rows, cols = origin(built["blocks.0.attn.qkv.weight"])
    part, head = rows // 128, (rows % 128) // 16            # aux qkv rows are [q | k | v], 8 heads of 16 each
    assert (rows == rows[:, :1]).all() and part[:, 0].tolist() == [0] * 64 + [1] * 64 + [2] * 64   # q, k, v in order
    heads = head[:, 0].view(3, 4, 16)
    assert (heads == heads[0, :, :1]).all()                 # target head i: its q, k and v rows share one aux head
    assert heads[0, :, 0].tolist() == [0, 2, 4, 6]
    residual = cols[0]                                      # the columns chosen for the residual stream
    assert residual.tolist() == list(range(0, 128, 2)) and (cols == residual).all()
    proj_rows, proj_cols = origin(built["blocks.0.attn.proj.weight"])
    assert (proj_rows[:, 0] == residual).all()              # proj writes the channels qkv reads
    assert ((proj_cols[0] // 16).view(4, 16) == heads[0, :, :1]).all()   # and reads the heads qkv made
    fc1_rows, fc1_cols = origin(built["blocks.0.mlp.fc1.weight"])
    fc2_rows, fc2_cols = origin(built["blocks.0.mlp.fc2.weight"])
    assert (fc1_cols[0] == residual).all() and (fc2_rows[:, 0] == residual).all()
    assert (fc1_rows[:, 0] == fc2_cols[0]).all()            # the same hidden units in and out

    x = torch.randn(2, 3, 32, 32)
    for scale in pathway.lambdas(target).values():
        scale.data.uniform_(-1e-6, 1e-6)                    # coded aux values are large; keep outputs finite
    target.eval()
    with torch.no_grad():
        connected = target(x)
        pathway.fold(target)
        assert torch.allclose(target(x), connected, atol=1e-5, rtol=1e-5)


def test_vit_from_llama_expands_grouped_kv_heads():
    from transformers import LlamaConfig, LlamaModel

    target = toys.timm_vit(dim=64, heads=4)        # 4 heads x 16
    aux = LlamaModel(LlamaConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=6,
                                 num_key_value_heads=2, vocab_size=100, max_position_embeddings=64))
    attn = aux.layers[0].self_attn                 # 6 q heads, 2 kv heads of 16: each kv head serves 3 q heads
    for layer in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
        coded(layer.weight)
    report = pathway.connect(target, aux, on_shape_mismatch="select", allow_partial=True)
    pairs = {p.target: p for p in report.pairs}
    qkv = pairs["blocks.0.attn.qkv.weight"]
    assert qkv.aux == tuple(f"layers.0.self_attn.{r}_proj.weight" for r in "qkv") and "gqa" in qkv.flags
    assert qkv.transform == "select[heads 4/6, width 64/96, kv heads x3] 80% of aux"
    rows, cols = origin(aux_tensors(target)["blocks.0.attn.qkv.weight"])
    q_heads = (rows[:64, 0] // 16).view(4, 16)
    k_heads, v_heads = (rows[64:128, 0] // 16).view(4, 16), (rows[128:, 0] // 16).view(4, 16)
    assert (q_heads == q_heads[:, :1]).all() and q_heads[:, 0].tolist() == [0, 2, 3, 5]
    assert (k_heads[:, 0] == q_heads[:, 0] // 3).all() and (v_heads == k_heads).all()   # the kv head each q head reads
    assert (cols == uniform_indices(96, 64)).all()
    proj_cols = origin(aux_tensors(target)["blocks.0.attn.proj.weight"])[1][0]
    assert ((proj_cols // 16).view(4, 16) == q_heads).all()
    assert pairs["blocks.0.mlp.fc2.weight"].aux == ("layers.0.mlp.down_proj.weight",)


def test_plain_fc1_takes_up_or_gate_of_a_gated_mlp():
    from transformers import LlamaConfig, LlamaModel

    target = toys.timm_vit(dim=64, heads=4)
    aux = LlamaModel(LlamaConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=6,
                                 num_key_value_heads=2, vocab_size=100, max_position_embeddings=64))
    fc2 = next(p for p in pathway.plan(target, aux, on_shape_mismatch="select", allow_partial=True).pairs
               if p.target == "blocks.1.mlp.fc2.weight")
    gate, up = "layers.1.mlp.gate_proj.weight", "layers.1.mlp.up_proj.weight"
    fc1 = dataclasses.replace(fc2, target="blocks.1.mlp.fc1.weight", aux=(gate, up), aux_transposed=(False, False))
    for choice, name in (("up", up), ("gate", gate)):
        selected = select_pairs([fc1], target, aux, gated=choice)["blocks.1.mlp.fc1.weight"]
        assert selected.aux == (name,)
        assert selected.transform == f"select[{choice} of a gated MLP, 256x64/384x96] 44.4% of aux"
        weight = aux.get_parameter(name)
        expected = weight[uniform_indices(384, 256)][:, uniform_indices(96, 64)]
        assert torch.equal(selected.apply(weight), expected)
    swapped = dataclasses.replace(fc1, aux=(up, gate))        # names decide, not the order
    assert select_pairs([swapped], target, aux)["blocks.1.mlp.fc1.weight"].aux == (up,)


@pytest.mark.parametrize("policy, blocks", [("first", [0, 1]), ("last", [2, 3]), ("uniform", [0, 3]),
                                            ("every_k", [0, 2]), ("reversed", [3, 0])])
def test_deeper_and_wider_aux_under_each_depth_policy(policy, blocks):
    target, aux = toys.timm_vit(depth=2, dim=32, heads=2), toys.timm_vit(depth=4, dim=64, heads=4, classes=0)
    report = pathway.connect(target, aux, on_shape_mismatch="select", depth=policy)
    assert report.block_map == blocks
    built = aux_tensors(target)
    for i, j in enumerate(blocks):
        pair = next(p for p in report.pairs if p.target == f"blocks.{i}.mlp.fc2.weight")
        assert pair.aux == (f"blocks.{j}.mlp.fc2.weight",)
        expected = aux.blocks[j].mlp.fc2.weight[uniform_indices(64, 32)][:, uniform_indices(256, 128)]
        assert torch.equal(built[pair.target], expected)


def test_narrower_aux_is_refused_with_the_fix():
    target, aux = toys.timm_vit(dim=64, heads=4), toys.timm_vit(dim=32, heads=2, classes=0)
    with pytest.raises(NarrowAuxError, match=r"narrower than the target's .*target block 0 <- aux block 0.*skip"):
        pathway.connect(target, aux, on_shape_mismatch="select")
    assert not pathway.is_connected(target)                   # refused before anything changed
    narrow_mlp = toys.timm_vit(dim=64, heads=4, classes=0, mlp_ratio=2.0)
    with pytest.raises(NarrowAuxError, match=r"dim 0 size is 128, narrower than the target's 256 \(blocks.0.mlp.fc1"):
        pathway.connect(target, narrow_mlp, on_shape_mismatch="select")


def test_gpt2_conv1d_target_from_wider_gpt2():
    target, aux = toys.hf_gpt2(dim=32, heads=2), toys.hf_gpt2(dim=64, heads=4)
    report = pathway.connect(target, aux, on_shape_mismatch="select")
    assert report.coverage == (8, 8) and all(p.transform.startswith("select[") for p in report.pairs)
    built = aux_tensors(target)["h.0.attn.c_attn.weight"]        # stored [in, out] on both sides
    rows = torch.cat([part * 64 + uniform_indices(4, 2)[:, None].mul(16).add(torch.arange(16)).flatten()
                      for part in range(3)])
    assert torch.equal(built, aux.h[0].attn.c_attn.weight[uniform_indices(64, 32)][:, rows])
    ids = torch.randint(0, 100, (1, 8))
    for scale in pathway.lambdas(target).values():
        scale.data.fill_(0.3)
    target.eval()
    with torch.no_grad():
        connected = target(ids).last_hidden_state
        pathway.fold(target)
        assert torch.allclose(target(ids).last_hidden_state, connected, atol=1e-5)


def test_split_q_k_v_target_from_a_wider_fused_aux():
    target, aux = toys.hf_bert(dim=32, heads=2), toys.timm_vit(dim=64, heads=4, classes=0)
    report = pathway.connect(target, aux, on_shape_mismatch="select")
    assert report.coverage == (12, 12)
    built, qkv = aux_tensors(target), aux.blocks[0].attn.qkv.weight
    for part, role in enumerate(("query", "key", "value")):       # heads 0 and 2 of q, of k, of v
        rows = torch.cat([part * 64 + head * 16 + torch.arange(16) for head in (0, 2)])
        assert torch.equal(
            built[f"encoder.layer.0.attention.self.{role}.weight"], qkv[rows][:, uniform_indices(64, 32)]
        )


def test_per_head_interleaved_aux_is_regrouped_before_selection():
    from transformers import GPTNeoXConfig, GPTNeoXModel

    target = toys.timm_vit(dim=32, heads=2)
    aux = GPTNeoXModel(GPTNeoXConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                     intermediate_size=256, vocab_size=100))
    report = pathway.connect(target, aux, on_shape_mismatch="select")
    assert report.coverage == (8, 8) and report.pairs[0].layout == ("", "heads")
    fused = aux.layers[0].attention.query_key_value.weight        # rows [head, (q, k, v), head_dim]
    rows = torch.cat([head * 48 + part * 16 + torch.arange(16) for part in range(3) for head in (0, 2)])
    assert torch.equal(aux_tensors(target)["blocks.0.attn.qkv.weight"], fused[rows][:, uniform_indices(64, 32)])


def test_a_selected_connection_saves_and_loads(tmp_path):
    target, aux = toys.timm_vit(dim=32, heads=2), toys.timm_vit(dim=64, heads=4, classes=0)
    pathway.connect(target, aux, on_shape_mismatch="select")
    for scale in pathway.lambdas(target).values():
        scale.data.fill_(0.5)
    pathway.save(target, tmp_path / "connected.safetensors")
    fresh = toys.timm_vit(dim=32, heads=2)
    pathway.load(fresh, tmp_path / "connected.safetensors")
    transforms = {p.transform for *_, pathways in pathway.modules.pathway_sites(fresh) for p in pathways}
    assert all(t.startswith("select[") for t in transforms)
    x = torch.randn(2, 3, 32, 32)
    target.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), target(x))


# ----------------------------------------------------------------------------- timm ViT <- Llama (GQA + SwiGLU)


def llama(hidden: int = 96, intermediate: int = 384, heads: int = 6, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                                  num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=100,
                                  max_position_embeddings=64))


def body_weights(model) -> list[str]:
    return [n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2]


@pytest.mark.parametrize("choice", ["up", "gate"])
def test_vit_from_llama_gqa_swiglu_pairs_every_body_weight(choice):
    target, aux = toys.timm_vit(dim=64, heads=4), llama()
    body = body_weights(target)                      # qkv, proj, fc1, fc2 of both blocks
    for layer in aux.layers:          # up coded r*1000+c, gate the negative minus 1: each says where it came from
        coded(layer.mlp.up_proj.weight)
        coded(layer.mlp.down_proj.weight)
        coded(layer.mlp.gate_proj.weight)
        with torch.no_grad():
            layer.mlp.gate_proj.weight.neg_().sub_(1)
    options = {"on_shape_mismatch": "select"} | ({"gated_mlp": "gate"} if choice == "gate" else {})
    planned = pathway.plan(target, aux, **options)
    fc1 = next(p for p in planned.pairs if p.target == "blocks.1.mlp.fc1.weight")
    assert fc1.aux == (f"layers.1.mlp.{choice}_proj.weight",) and {"gated", "shape_mismatch"} <= set(fc1.flags)
    assert "order_by_execution" not in fc1.flags      # the dataflow showed which projection passes through SiLU
    assert fc1.transform == f"select[{choice} of a gated MLP, 256x64/384x96] 44.4% of aux"
    assert all(p.transform.startswith("select[") for p in planned.pairs)
    other = "gate" if choice == "up" else "up"
    assert planned.unused_aux == [f"layers.{i}.mlp.{other}_proj.weight" for i in range(2)]
    assert f"[select[{choice} of a gated MLP" in str(planned)

    report = pathway.connect(target, aux, **options)     # no allow_partial: every body weight paired
    assert report.coverage == (8, 8) and sorted(p.target for p in report.pairs) == sorted(body)
    assert [(p.target, p.aux, p.transform) for p in report.pairs] == [
        (p.target, p.aux, p.transform) for p in planned.pairs]     # connect makes the selection plan showed
    built = aux_tensors(target)
    for i in range(2):
        mlp = aux.layers[i].mlp
        source = mlp.up_proj.weight if choice == "up" else mlp.gate_proj.weight
        expected = source[uniform_indices(384, 256)][:, uniform_indices(96, 64)]
        assert torch.equal(built[f"blocks.{i}.mlp.fc1.weight"], expected)
        fc1_rows, fc1_cols = origin(built[f"blocks.{i}.mlp.fc1.weight"].abs() - int(choice == "gate"))
        fc2_rows, fc2_cols = origin(built[f"blocks.{i}.mlp.fc2.weight"])
        assert (fc1_rows[:, 0] == fc2_cols[0]).all()        # fc2 reads the hidden units fc1 took
        assert (fc1_cols[0] == fc2_rows[:, 0]).all() and (fc1_cols[0] == uniform_indices(96, 64)).all()


def test_vit_from_llama_gqa_swiglu_lambda_zero_and_fold():
    target, aux = toys.timm_vit(dim=64, heads=4).eval(), llama()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = target(x)
    pathway.connect(target, aux, on_shape_mismatch="select")
    assert len(pathway.lambdas(target)) == 8
    with torch.no_grad():
        assert torch.equal(target(x), before)                # lambda 0 leaves the outputs unchanged
        for scale in pathway.lambdas(target).values():
            scale.uniform_(-0.5, 0.5)
        connected = target(x)
        assert not torch.allclose(connected, before)
        pathway.fold(target)
        torch.testing.assert_close(target(x), connected, rtol=1e-4, atol=1e-5)


def test_vit_from_an_equally_wide_llama_takes_up_rows_without_selection():
    target, aux = toys.timm_vit(dim=64, heads=4), llama(hidden=64, intermediate=256, heads=4, kv_heads=4)
    report = pathway.connect(target, aux)                # on_shape_mismatch="error": nothing needs selecting
    assert report.coverage == (8, 8)
    fc1 = next(p for p in report.pairs if p.target == "blocks.0.mlp.fc1.weight")
    assert fc1.aux == ("layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight")
    assert fc1.transform == "gated[up] rows 256:512" and fc1.flags == ("gated",)
    assert torch.equal(aux_tensors(target)["blocks.0.mlp.fc1.weight"], aux.layers[0].mlp.up_proj.weight)
    gate = pathway.plan(toys.timm_vit(dim=64, heads=4), aux, gated_mlp="gate")
    fc1 = next(p for p in gate.pairs if p.target == "blocks.0.mlp.fc1.weight")
    assert fc1.transform == "gated[gate] rows 0:256" and fc1.out_slice == (0, 256)
    assert "layers.0.mlp.up_proj.weight" in gate.unused_aux and "layers.0.mlp.gate_proj.weight" not in gate.unused_aux
    with pytest.raises(pathway.OptionError, match=r"gated_mlp='down' is not one of \['up', 'gate'\]"):
        pathway.plan(toys.timm_vit(dim=64, heads=4), aux, gated_mlp="down")


def test_a_gated_target_from_a_plain_aux_is_refused_with_the_fix():
    target, aux = llama(hidden=64, intermediate=256, heads=4, kv_heads=4), toys.timm_vit(dim=64, heads=4, classes=0)
    with pytest.raises(pathway.GroupSizeError, match=r"the target's gated MLP layers.0.mlp.gate_proj.weight\+"
                                                     r"layers.0.mlp.up_proj.weight .*not guessed.*pairs="):
        pathway.plan(target, aux)
    report = pathway.plan(target, aux, on_shape_mismatch="select", allow_partial=True)
    assert report.coverage == (10, 14) and all("gated MLP" in why for why in report.unpaired.values())


def test_mismatched_overrides_are_selected_under_select():
    target, aux = toys.timm_vit(dim=32, heads=2), toys.timm_vit(dim=64, heads=4, classes=0)
    pairs = {"blocks.0.mlp.fc1.weight": "blocks.1.mlp.fc1.weight"}
    with pytest.raises(pathway.ShapeMismatchError, match=r"cannot take rows 0:256 of aux.*on_shape_mismatch='select'"):
        pathway.plan(target, aux, pairs=pairs, on_shape_mismatch="skip")     # only "select" bridges shapes
    report = pathway.connect(target, aux, pairs=pairs, on_shape_mismatch="select")
    fc1 = next(p for p in report.pairs if p.target == "blocks.0.mlp.fc1.weight")
    assert fc1.aux == ("blocks.1.mlp.fc1.weight",) and {"override", "shape_mismatch"} <= set(fc1.flags)
    assert fc1.transform == "select[128x32/256x64] 25% of aux"
    expected = aux.blocks[1].mlp.fc1.weight[uniform_indices(256, 128)][:, uniform_indices(64, 32)]
    assert torch.equal(aux_tensors(target)["blocks.0.mlp.fc1.weight"], expected)
    with pytest.raises(pathway.OptionError, match="takes whole aux weights, not rows"):
        pathway.plan(toys.timm_vit(dim=32, heads=2), aux, on_shape_mismatch="select",
                     pairs={"blocks.0.mlp.fc1.weight": {"aux": "blocks.1.mlp.fc1.weight", "rows": [0, 200]}})


def test_plan_shows_the_selection_and_refuses_a_narrower_aux():
    report = pathway.plan(toys.timm_vit(dim=32, heads=2), toys.timm_vit(dim=64, heads=4, classes=0),
                          on_shape_mismatch="select")
    assert {p.target: p.transform for p in report.pairs}["blocks.0.attn.qkv.weight"] == \
        "select[heads 2/4, width 32/64] 25% of aux"
    assert "select[" in str(report)
    with pytest.raises(NarrowAuxError, match="narrower"):
        pathway.plan(toys.timm_vit(dim=64, heads=4), toys.timm_vit(dim=32, heads=2, classes=0),
                     on_shape_mismatch="select")


def test_the_core_exports_its_errors_and_the_lazy_reader():
    from pathway import errors, shapes, source

    assert pathway.LayoutError is errors.LayoutError and pathway.NarrowAuxError is shapes.NarrowAuxError
    assert pathway.open_aux is source.open_aux and pathway.AuxSource is source.AuxSource
    assert pathway.SourceError is source.SourceError
    assert all(issubclass(e, pathway.PathwayError) for e in (pathway.LayoutError, pathway.NarrowAuxError,
                                                             pathway.SourceError))


def test_gated_mlp_from_a_wider_gated_mlp_takes_gate_from_gate_and_up_from_up():
    target, aux = llama(hidden=64, intermediate=256, heads=4, kv_heads=4), llama()
    report = pathway.connect(target, aux, on_shape_mismatch="select")
    assert report.coverage == (14, 14)
    built, rows, cols = aux_tensors(target), uniform_indices(384, 256), uniform_indices(96, 64)
    for part in ("gate", "up"):
        assert torch.equal(built[f"layers.1.mlp.{part}_proj.weight"],
                           aux.get_parameter(f"layers.1.mlp.{part}_proj.weight")[rows][:, cols])
    assert torch.equal(built["layers.1.mlp.down_proj.weight"], aux.layers[1].mlp.down_proj.weight[cols][:, rows])


def test_a_plain_fc1_as_wide_as_gate_and_up_together_is_not_their_concatenation():
    # fc1 [256, 64] has the rows of gate + up [128, 64] each; only a fused [gate | up] (Phi-3) takes both
    target, aux = toys.timm_vit(dim=64, heads=4), llama(hidden=64, intermediate=128, heads=4, kv_heads=4)
    with pytest.raises(pathway.ShapeMismatchError, match=r"fc1.weight \[256, 64\] <- aux layers.0.mlp.up_proj.weight "
                                                         r"\[128, 64\], the up projection of the gated MLP"):
        pathway.plan(target, aux)
    with pytest.raises(pathway.GroupSizeError, match=r"gated MLP .*<- aux blocks.0.mlp.fc1.weight \[256, 64\].*"
                                                     r"not guessed"):
        pathway.plan(llama(hidden=64, intermediate=128, heads=4, kv_heads=4), toys.timm_vit(dim=64, heads=4))


def test_a_fused_gate_up_projection_and_a_plain_fc1_are_not_paired_by_guess():
    from transformers import Phi3Config, Phi3Model

    phi3 = Phi3Model(Phi3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                intermediate_size=256, vocab_size=100, pad_token_id=0))   # gate_up_proj [512, 64]
    with pytest.raises(pathway.GroupSizeError, match=r"fc1.weight \[256, 64\] <- aux layers.0.mlp.gate_up_proj.weight "
                                                     r"\[512, 64\]: the aux weight holds a gated MLP's gate and up"):
        pathway.plan(toys.timm_vit(dim=64, heads=4), phi3)
    report = pathway.plan(toys.timm_vit(dim=64, heads=4), phi3, on_shape_mismatch="select", allow_partial=True)
    assert sorted(report.unpaired) == ["blocks.0.mlp.fc1.weight", "blocks.1.mlp.fc1.weight"]   # not selected across
    assert all("not guessed" in why for why in report.unpaired.values())                      # gate and up rows

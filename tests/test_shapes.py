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

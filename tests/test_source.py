"""A big aux from disk: built on the meta device, only the matched tensors read, equal to the aux in memory."""

from __future__ import annotations

import pytest
import torch
import toy_models as toys
from safetensors.torch import save_file

import pathway
from pathway.modules import pathway_sites
from pathway.source import SourceError, open_aux


def llama(depth: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=depth,
                                        num_attention_heads=6, num_key_value_heads=2, vocab_size=100,
                                        max_position_embeddings=64))


def aux_tensors(model) -> dict[str, torch.Tensor]:
    return {name: p.aux_weight.detach() for name, _, _, (p, *_) in pathway_sites(model)}


@pytest.mark.parametrize("shard", ["100KB", None])
def test_lazy_connect_from_a_directory_equals_connect_from_memory(tmp_path, shard):
    lm = llama()
    lm.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
    in_memory, from_disk = toys.timm_vit(dim=64, heads=4), toys.timm_vit(dim=64, heads=4)
    from_disk.load_state_dict(in_memory.state_dict())
    options = {"on_shape_mismatch": "select"}  # every body weight pairs: fc1 <- up of the gated MLP
    expected = pathway.connect(in_memory, lm.model, **options)
    source = open_aux(tmp_path)
    assert next(source.model.parameters()).device.type == "meta"
    report = pathway.connect(from_disk, source, **options)
    assert [(p.target, p.aux, p.transform) for p in report.pairs] == \
           [(p.target, p.aux, p.transform) for p in expected.pairs]
    built, reference = aux_tensors(from_disk), aux_tensors(in_memory)
    assert built.keys() == reference.keys() and all(torch.equal(built[k], reference[k]) for k in built)
    # a plain fc1 pairs with (gate, up) and takes up's rows (gated_mlp="up"): the gate is never read
    used = [n for n in dict.fromkeys(n for p in report.pairs for n in p.aux) if ".gate_proj." not in n]
    assert source.tensors_read == used                        # each matched tensor read once, nothing else
    assert "layers.0.mlp.gate_proj.weight" not in source.tensors_read
    # only the rows the selection keeps are read (fp32, inputs 96 wide, up/down 384): q 4 of 6 heads (64 rows),
    # k and v both kv heads (32 rows each), o and down 64 of 96 rows, up 256 of 384 rows; per layer:
    assert source.bytes_read == 2 * 4 * (64 * 96 + 2 * 32 * 96 + 64 * 96 + 256 * 96 + 64 * 384)
    assert source.bytes_read < source.nbytes(used) < source.nbytes(source.keys)
    line = source.describe_reads(used)
    assert line.startswith(f"reads {len(used)} of {len(source.keys)} aux tensors from {tmp_path}")


def test_plan_and_connect_take_a_path(tmp_path):
    lm = llama()
    lm.save_pretrained(tmp_path, max_shard_size="100KB")
    target = toys.timm_vit(dim=64, heads=4)
    report = pathway.plan(target, str(tmp_path), on_shape_mismatch="select")
    assert report.aux == "LlamaModel" and len(report.pairs) == 8
    pathway.connect(target, tmp_path, on_shape_mismatch="select")
    q = lm.model.layers[1].self_attn.q_proj.weight
    built = aux_tensors(target)["blocks.1.attn.qkv.weight"]
    assert torch.equal(built[:16], q[:16, torch.linspace(0, 95, 64).round().long()])   # head 0 of q, selected


def test_single_file_with_an_architecture(tmp_path):
    aux = toys.timm_vit(dim=64, heads=4, classes=0)
    file = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in aux.state_dict().items()}, str(file))
    with torch.device("meta"):
        skeleton = toys.timm_vit(dim=64, heads=4, classes=0)
    source = open_aux(file, architecture=skeleton)
    target = toys.timm_vit(dim=64, heads=4)
    pathway.connect(target, source)
    assert source.tensors_read == [f"blocks.{i}.{n}.weight" for i in range(2)
                                   for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert torch.equal(aux_tensors(target)["blocks.1.mlp.fc2.weight"], aux.blocks[1].mlp.fc2.weight)


def test_sources_that_cannot_be_read_lazily_are_named(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_aux(tmp_path / "missing")
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(SourceError, match="pass the architecture"):
        open_aux(tmp_path / "w.safetensors")
    with pytest.raises(SourceError, match="not a readable safetensors file"):
        open_aux(tmp_path / "w.safetensors", architecture=toys.timm_vit())
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(SourceError, match="only safetensors files can be read tensor by tensor"):
        open_aux(tmp_path / "w.pt", architecture=toys.timm_vit())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(SourceError, match="converted to safetensors"):
        open_aux(bin_dir)
    other = tmp_path / "other.safetensors"
    save_file({"unrelated.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(SourceError, match="is it the right architecture"):
        open_aux(other, architecture=toys.timm_vit())


def test_engine_checkpoint_read_into_the_engine_model_built_on_meta(tmp_path):
    from pathway.train.config import load_recipe
    from pathway.train.model import build_adapter, build_transformer

    def recipe(dim: int, heads: int):
        return load_recipe("recipes/demo/image.yaml", [f"model.embed_dim={dim}", f"model.num_heads={heads}",
                                                       "model.depth=2", "pathway.on_shape_mismatch=select"])

    small, wide = recipe(32, 2), recipe(64, 4)
    adapter = build_adapter(wide, need_data=False)
    aux = build_transformer(wide, adapter)
    file = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in aux.state_dict().items()}, str(file),
              metadata={"format": "pathway", "layout": "TransformerModel"})
    source = open_aux(file, architecture=lambda: build_transformer(wide, adapter, aux=True))
    target = build_transformer(small, build_adapter(small, need_data=False))
    report = pathway.connect(target, source, **small.connect_options())
    assert report.coverage == (8, 8) and len(source.tensors_read) == 8
    expected = aux.blocks[1].mlp.fc2.weight[torch.arange(0, 64, 2)][:, torch.arange(0, 256, 2)]
    assert torch.equal(aux_tensors(target)["blocks.1.mlp.fc2.weight"], expected)


def test_sliced_reads_of_a_per_head_interleaved_aux_equal_whole_reads(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXModel

    aux = GPTNeoXModel(GPTNeoXConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=6,
                                     vocab_size=100, max_position_embeddings=64))
    aux.save_pretrained(tmp_path)
    in_memory, from_disk = toys.timm_vit(dim=64, heads=4), toys.timm_vit(dim=64, heads=4)
    from_disk.load_state_dict(in_memory.state_dict())
    pathway.connect(in_memory, aux, on_shape_mismatch="select")       # whole tensors, selected in memory
    source = open_aux(tmp_path)
    report = pathway.connect(from_disk, source, on_shape_mismatch="select")
    assert report.pairs[0].layout == ("", "heads")                     # query_key_value: [head, (q, k, v), 16]
    built, reference = aux_tensors(from_disk), aux_tensors(in_memory)
    assert built.keys() == reference.keys() and all(torch.equal(built[k], reference[k]) for k in built)
    # 4 of 6 heads of q, k and v; 64 of 96 rows of dense and dense_4h_to_h, 256 of 384 of dense_h_to_4h
    kept_rows = 3 * 64 * 96 + 64 * 96 + 256 * 96 + 64 * 384
    assert source.bytes_read == 2 * 4 * kept_rows < source.nbytes(source.tensors_read)
    name = "layers.0.mlp.dense_h_to_4h.weight"
    rows = torch.tensor([0, 1, 2, 5, 9, 10, 383])
    whole = dict(aux.named_parameters())[name].detach()
    assert torch.equal(source.read([name], rows={name: rows})[name], whole[rows])

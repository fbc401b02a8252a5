"""pathway.save / load: the errors a user sees, the provenance record, and saving a frozen aux by reference."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from toy_models import hf_bert, timm_vit

import pathway
from pathway import provenance


def _connected(**options):
    torch.manual_seed(0)
    target = timm_vit(depth=2, dim=32, heads=2)
    pathway.connect(target, timm_vit(depth=2, dim=32, heads=2, classes=0), lambda_init=0.1, **options)
    return target


def test_load_of_a_garbage_file_names_it(tmp_path):
    garbage = tmp_path / "weights.safetensors"
    garbage.write_bytes(b"not a safetensors file" * 8)
    with pytest.raises(pathway.PathwayError, match=r"weights\.safetensors is not a safetensors file") as e:
        pathway.load(timm_vit(depth=2, dim=32, heads=2), garbage)
    print(e.value)
    with pytest.raises(pathway.PathwayError, match=r"missing\.safetensors does not exist"):
        pathway.load(timm_vit(depth=2, dim=32, heads=2), tmp_path / "missing.safetensors")


def test_save_into_a_missing_folder_names_the_folder(tmp_path):
    with pytest.raises(pathway.PathwayError, match=r"the folder .*nope does not exist; create it first") as e:
        pathway.save(_connected(), tmp_path / "nope" / "run.safetensors")
    print(e.value)
    assert not (tmp_path / "nope").exists()


def test_connected_state_without_pairing_says_fold_or_connect_first(tmp_path):
    model = _connected()
    file = tmp_path / "state.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    with pytest.raises(pathway.PathwayError, match="Either fold first .* or connect first") as e:
        pathway.load(timm_vit(depth=2, dim=32, heads=2), file)
    print(e.value)


def test_save_refuses_non_finite_weights_by_name(tmp_path):
    model = _connected()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.bias[3] = float("nan")
    with pytest.raises(pathway.NonFiniteError, match=r"blocks\.1\.mlp\.fc2\.bias \(1 of 32\)") as e:
        pathway.save(model, tmp_path / "run.safetensors")
    print(e.value)
    assert not (tmp_path / "run.safetensors").exists()


def test_saved_and_folded_files_carry_provenance_and_still_load_plain(tmp_path):
    model = _connected()
    pathway.lambdas(model)["blocks.0.attn.qkv.weight"].data.fill_(0.25)
    pathway.save(model, tmp_path / "run.safetensors", recipe={"optim": {"lr": 1e-3}})
    record = provenance.read(tmp_path / "run.safetensors")
    assert record["pathway_version"] == pathway.__version__ and record["recipe"] == {"optim": {"lr": 1e-3}}
    assert record["target"]["class"].endswith("VisionTransformer") and len(record["pairs"]) == 8
    qkv = next(p for p in record["pairs"] if p["target"] == "blocks.0.attn.qkv.weight")
    aux_qkv = model.blocks[0].attn.qkv.parametrizations.weight[0].aux_weight
    assert qkv["lambda"] == 0.25 and qkv["aux_sha256"] == provenance.sha256_tensor(aux_qkv)

    record = provenance.capture(model, recipe="demo")          # before fold: the pairs go with it
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        connected = model.eval()(x)
        pathway.fold(model)
    file = tmp_path / "folded.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file),
              metadata=provenance.metadata(record))
    plain = timm_vit(depth=2, dim=32, heads=2).eval()
    plain.load_state_dict(load_file(str(file)), strict=True)    # a reader that ignores metadata: the plain model
    with torch.no_grad():
        assert torch.allclose(plain(x), connected, atol=1e-5)
    text = provenance.describe(provenance.read(file))
    print(text)
    assert "blocks.0.attn.qkv.weight" in text and "lambda +0.25" in text and "recipe  \"demo\"" in text
    with pytest.raises(pathway.NotConnectedError, match="before pathway.fold"):
        provenance.capture(model)


def test_inspect_prints_the_record(tmp_path, capsys):
    from pathway.train.cli import main

    pathway.save(_connected(), tmp_path / "run.safetensors")
    assert main(["inspect", str(tmp_path / "run.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "written by pathway" in out and "pairs (8)" in out


@pytest.fixture
def aux_folder(tmp_path):
    torch.manual_seed(1)
    folder = tmp_path / "bert"
    hf_bert(depth=2, dim=32, heads=2).save_pretrained(folder)
    return folder


def test_frozen_aux_saved_by_reference_loads_lazily_and_checks_the_hash(tmp_path, aux_folder):
    torch.manual_seed(0)
    model = timm_vit(depth=2, dim=32, heads=2)
    pathway.connect(model, pathway.open_aux(aux_folder), train_aux=False, lambda_init=0.3)
    with torch.no_grad():
        model.blocks[0].attn.proj.parametrizations.weight.original.add_(0.01)   # "trained" target weights
    file = tmp_path / "run.safetensors"
    pathway.save(model, file, aux_reference=aux_folder)
    full = tmp_path / "full.safetensors"
    pathway.save(model, full)
    assert not any(k.endswith("aux_weight") for k in load_file(str(file)))
    assert file.stat().st_size < 0.8 * full.stat().st_size
    spec = json.loads(__import__("safetensors").safe_open(str(file), "pt").metadata()["pathway"])
    assert set(spec["aux_reference"]["files"]) == {"model.safetensors"}

    x = torch.randn(2, 3, 32, 32)
    loaded = pathway.load(timm_vit(depth=2, dim=32, heads=2), file)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert pathway.lambdas(loaded)["blocks.1.mlp.fc1.weight"].item() == pytest.approx(0.3)

    other = tmp_path / "other"
    torch.manual_seed(2)
    hf_bert(depth=2, dim=32, heads=2).save_pretrained(other)
    with pytest.raises(pathway.PathwayError, match=r"trained on aux file model\.safetensors with sha256") as e:
        pathway.load(timm_vit(depth=2, dim=32, heads=2), file, aux_reference=other)
    print(e.value)
    with pytest.raises(pathway.PathwayError, match="gives other pathways .* pass load\\(\\) the connect options"):
        pathway.load(timm_vit(depth=2, dim=32, heads=2), file, include=[r"\.mlp\."], allow_partial=True)


def test_aux_reference_refuses_a_trained_aux(tmp_path, aux_folder):
    model = timm_vit(depth=2, dim=32, heads=2)
    pathway.connect(model, pathway.open_aux(aux_folder))
    with pytest.raises(pathway.PathwayError, match="connect with train_aux=False to save by reference"):
        pathway.save(model, tmp_path / "run.safetensors", aux_reference=aux_folder)


def test_a_model_restored_by_load_refuses_pickling_by_name(tmp_path):
    """pathway.load attaches pathways the way connect does, so torch.save(model) says what to do."""
    import io

    file = tmp_path / "run.safetensors"
    pathway.save(_connected(), file)
    restored = pathway.load(timm_vit(depth=2, dim=32, heads=2), file)
    with pytest.raises(pathway.PicklingError, match=r"pathway\.fold\(model\) first"):
        torch.save(restored, io.BytesIO())

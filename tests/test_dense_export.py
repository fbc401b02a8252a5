"""A folded image ViT written in detectron2 ViTDet's and mmsegmentation MAE's backbone keys (Table 1, dense)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pathway.adapters.heads import ClassificationHead
from pathway.tokenizers.image_patch import ImagePatchTokenizer
from pathway.train.model import TransformerModel
from pathway.train.official.dense_export import main, to_dense
from pathway.train.official.layouts import CheckpointError

D, DEPTH, GRID = 32, 2, 4  # 64-pixel images, 16-pixel patches: a 4 x 4 grid


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A run's model.safetensors: TransformerModel keys, class token folded, a norm and a classifier."""
    torch.manual_seed(0)
    model = TransformerModel(ImagePatchTokenizer(16 * GRID, 16, 3, D), ClassificationHead(D, 10), D, DEPTH, 2,
                             cls_token=True)
    path = tmp_path_factory.mktemp("run") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def block_keys(root: str, parts: tuple[str, ...]) -> set[str]:
    return {f"{root}{i}.{p}.{kind}" for i in range(DEPTH) for p in parts for kind in ("weight", "bias")}


def test_vitdet_keys_shapes_and_values(model_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "vitdet.pth"
    assert main([str(model_file), "--layout", "vitdet", "--out", str(out)]) == 0
    assert "pretraining image size 64 (ViTDet: pretrain_img_size=64)" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert saved["__author__"] == "pathway"  # detectron2's own checkpoint container (detection_checkpoint.py)
    sd, ours = saved["model"], load_file(str(model_file))
    net = "backbone.net."
    parts = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    assert set(sd) == {f"{net}patch_embed.proj.weight", f"{net}patch_embed.proj.bias", f"{net}pos_embed"} | \
        block_keys(f"{net}blocks.", parts)
    assert sd[f"{net}patch_embed.proj.weight"].shape == (D, 3, 16, 16)
    assert sd[f"{net}pos_embed"].shape == (1, 1 + GRID * GRID, D)  # pretrain_use_cls_token=True
    assert torch.equal(sd[f"{net}pos_embed"][:, 1:], ours["tokenizer.pos_embed"])
    assert not sd[f"{net}pos_embed"][:, 0].any()
    assert sd[f"{net}blocks.1.attn.qkv.weight"].shape == (3 * D, D)
    assert torch.equal(sd[f"{net}blocks.1.mlp.fc2.weight"], ours["blocks.1.mlp.fc2.weight"])


def test_mmseg_mae_keys_shapes_and_values(model_file: Path, tmp_path: Path):
    out = tmp_path / "mmseg.pth"
    assert main([str(model_file), "--layout", "mmseg_mae", "--out", str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    ours = load_file(str(model_file))
    parts = ("ln1", "attn.qkv", "attn.proj", "ln2", "ffn.layers.0.0", "ffn.layers.1")
    gammas = {f"layers.{i}.gamma_{k}" for i in range(DEPTH) for k in (1, 2)}
    assert set(sd) == {"patch_embed.projection.weight", "patch_embed.projection.bias", "cls_token", "pos_embed"} | \
        block_keys("layers.", parts) | gammas
    assert sd["pos_embed"].shape == (1, 1 + GRID * GRID, D) and sd["cls_token"].shape == (1, 1, D)
    # the folded class token keeps its position; cls_token + pos_embed[:, 0] is ours again
    assert torch.equal(sd["cls_token"] + sd["pos_embed"][:, :1], ours["cls_token"])
    assert torch.equal(sd["layers.0.ffn.layers.0.0.weight"], ours["blocks.0.mlp.fc1.weight"])
    assert torch.equal(sd["layers.0.ln2.bias"], ours["blocks.0.norm2.bias"])
    assert all(sd[g].shape == (D,) and bool((sd[g] == 1).all()) for g in gammas)
    prefixed = to_dense(ours, "mmseg_mae", prefix="backbone.")  # beit2mmseg.py's keys, for load_from
    assert set(prefixed.state) == {f"backbone.{k}" for k in sd}
    assert set(prefixed.left_out) == {"norm.weight", "norm.bias", "head.fc.weight", "head.fc.bias"}


def test_unfolded_or_non_image_weights_are_refused(model_file: Path, tmp_path: Path, capsys):
    ours = load_file(str(model_file))
    unfolded = {**ours, "blocks.0.attn.qkv.parametrizations.weight.original": ours["blocks.0.attn.qkv.weight"]}
    with pytest.raises(CheckpointError, match="pathway fold"):
        to_dense(unfolded, "vitdet")
    points = {k: v for k, v in ours.items() if not k.startswith("tokenizer.")}
    with pytest.raises(CheckpointError, match="not an image ViT"):
        to_dense(points, "mmseg_mae")
    with pytest.raises(CheckpointError, match="are incomplete"):
        to_dense({k: v for k, v in ours.items() if k != "blocks.1.attn.proj.bias"}, "vitdet")
    assert main([str(tmp_path / "missing.safetensors"), "--layout", "vitdet", "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err

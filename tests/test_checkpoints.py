"""Official checkpoint layouts load into the engine model: every tensor lands where it should.

Each test writes a synthetic checkpoint with exactly the official keys and shapes (small widths: D=64,
depth 2, 2 heads) in the official file format (`.pth` with `model` + `args` Namespace, Point-MAE's
`base_model`, safetensors), loads it through `pathway.train.official.layouts` into a real `TransformerModel` built
from the real tokenizers and heads, and compares values. The MAE and timm cases also compare the whole
forward with timm's own `VisionTransformer` carrying the same weights. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import Tensor

from pathway.adapters.heads import ClassificationHead
from pathway.tokenizers.image_patch import ImagePatchTokenizer
from pathway.tokenizers.patch import PatchTokenizer
from pathway.tokenizers.point_group import PointGroupTokenizer
from pathway.tokenizers.pos_embed import resample_pos_embed, sinusoid_table
from pathway.train.model import TransformerModel
from pathway.train.official.layouts import (
    CheckpointError,
    detect_format,
    load_checkpoint,
    load_state_dict,
    read_checkpoint,
)

D, DEPTH, HEADS = 64, 2, 2
torch.manual_seed(0)


def rand(*shape: int) -> Tensor:
    return torch.randn(*shape)


def timm_blocks(prefix: str = "blocks.", depth: int = DEPTH, dim: int = D, qkv_bias: bool = True,
                q_v_bias: bool = False) -> dict[str, Tensor]:
    """The timm / MAE / Point-MAE / VideoMAE block keys (VideoMAE: qkv without bias + q_bias, v_bias)."""
    sd = {}
    for i in range(depth):
        p = f"{prefix}{i}."
        sd |= {p + "norm1.weight": rand(dim), p + "norm1.bias": rand(dim), p + "attn.qkv.weight": rand(3 * dim, dim)}
        if qkv_bias:
            sd[p + "attn.qkv.bias"] = rand(3 * dim)
        if q_v_bias:
            sd |= {p + "attn.q_bias": rand(dim), p + "attn.v_bias": rand(dim)}
        sd |= {p + "attn.proj.weight": rand(dim, dim), p + "attn.proj.bias": rand(dim),
               p + "norm2.weight": rand(dim), p + "norm2.bias": rand(dim),
               p + "mlp.fc1.weight": rand(4 * dim, dim), p + "mlp.fc1.bias": rand(4 * dim),
               p + "mlp.fc2.weight": rand(dim, 4 * dim), p + "mlp.fc2.bias": rand(dim)}
    return sd


def mae_pretrain_sd(in_chans: int = 3, grid: tuple[int, int] = (2, 2), dec: int = 32) -> dict[str, Tensor]:
    """facebookresearch/mae models_mae.MaskedAutoencoderViT (and AudioMAE's, with in_chans=1)."""
    n = grid[0] * grid[1]
    sd = {"cls_token": rand(1, 1, D), "pos_embed": rand(1, n + 1, D),
          "patch_embed.proj.weight": rand(D, in_chans, 16, 16), "patch_embed.proj.bias": rand(D)}
    sd |= timm_blocks() | {"norm.weight": rand(D), "norm.bias": rand(D)}
    sd |= {"decoder_embed.weight": rand(dec, D), "decoder_embed.bias": rand(dec), "mask_token": rand(1, 1, dec),
           "decoder_pos_embed": rand(1, n + 1, dec), "decoder_norm.weight": rand(dec), "decoder_norm.bias": rand(dec),
           "decoder_pred.weight": rand(16 * 16 * in_chans, dec), "decoder_pred.bias": rand(16 * 16 * in_chans)}
    sd |= timm_blocks("decoder_blocks.", depth=1, dim=dec)
    return sd


def save_mae_pth(path: Path, sd: dict[str, Tensor], **args) -> Path:
    """As MAE's util/misc.save_model: model, optimizer, epoch, scaler, args (an argparse.Namespace)."""
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799, "scaler": {},
                "args": argparse.Namespace(model="mae_vit_base_patch16", **args)}, path)
    return path


def image_model(img: int = 32, cls_token: bool = True, classes: int = 10) -> TransformerModel:
    return TransformerModel(ImagePatchTokenizer(img, 16, 3, D), ClassificationHead(D, classes), D, DEPTH, HEADS,
                            cls_token=cls_token)


def assert_blocks_equal(model: TransformerModel, sd: dict[str, Tensor], prefix: str = "blocks.") -> None:
    msd = model.state_dict()
    for key, value in sd.items():
        if key.startswith(prefix) and not key.endswith(("q_bias", "v_bias")):
            torch.testing.assert_close(msd["blocks." + key[len(prefix):]], value, rtol=0, atol=0, msg=key)


def test_mae_pretrain_pth_lands_and_matches_timm_forward(tmp_path):
    import timm.models.vision_transformer as tvit

    sd = mae_pretrain_sd()
    path = save_mae_pth(tmp_path / "mae_pretrain.pth", sd, input_size=32)
    model = image_model()
    report = load_checkpoint(model, path)

    assert report.format == "mae" and report.ok
    assert report.args["input_size"] == 32  # the Namespace came through the allow-list
    msd = model.state_dict()
    torch.testing.assert_close(msd["tokenizer.proj.weight"], sd["patch_embed.proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(msd["tokenizer.proj.bias"], sd["patch_embed.proj.bias"], rtol=0, atol=0)
    torch.testing.assert_close(msd["tokenizer.pos_embed"], sd["pos_embed"][:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(msd["cls_token"], sd["cls_token"] + sd["pos_embed"][:, :1], rtol=0, atol=0)
    torch.testing.assert_close(msd["norm.weight"], sd["norm.weight"], rtol=0, atol=0)
    assert_blocks_equal(model, sd)
    assert set(report.left_at_init) == {k for k in msd if k.startswith("head.")}
    assert {k for k in sd if k.startswith(("decoder", "mask_token"))} == set(report.dropped)

    # The whole encoder computes what timm's ViT (MAE's base class) computes with the original weights.
    ref = tvit.VisionTransformer(img_size=32, patch_size=16, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                                 num_classes=0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    ref.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)[0], ref.forward_features(x), rtol=1e-5, atol=1e-5)


def test_timm_safetensors_with_prefixes_and_resampled_grid(tmp_path):
    import timm.models.vision_transformer as tvit
    from safetensors.torch import save_file

    ref = tvit.VisionTransformer(img_size=32, patch_size=16, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                                 num_classes=10)
    sd = {"_orig_mod.module." + k: v.clone() for k, v in ref.state_dict().items()}  # compiled + DDP prefixes
    path = tmp_path / "vit.safetensors"
    save_file(sd, str(path))
    clean = ref.state_dict()

    model = image_model(img=64)  # 4x4 grid; the file has 2x2
    report = load_checkpoint(model, path, ignore=[r"^head\."])
    assert report.format == "timm" and report.ok
    assert any("resampled grid (2, 2) -> (4, 4)" in n for n in report.notes)
    msd = model.state_dict()
    expected = resample_pos_embed(clean["pos_embed"][:, 1:], (2, 2), (4, 4))
    torch.testing.assert_close(msd["tokenizer.pos_embed"], expected, rtol=0, atol=0)
    torch.testing.assert_close(msd["cls_token"], clean["cls_token"] + clean["pos_embed"][:, :1], rtol=0, atol=0)
    assert_blocks_equal(model, clean)
    assert set(report.left_at_init) == {k for k in msd if k.startswith("head.")}
    assert set(report.dropped) == {"head.weight", "head.bias"}


def test_cls_token_dropped_and_reported_when_model_pools(tmp_path):
    sd = mae_pretrain_sd()
    model = image_model(cls_token=False)
    report = load_checkpoint(model, save_mae_pth(tmp_path / "m.pth", sd))
    assert report.ok and "cls_token" in report.dropped and "cls_token" not in model.state_dict()
    torch.testing.assert_close(model.state_dict()["tokenizer.pos_embed"], sd["pos_embed"][:, 1:], rtol=0, atol=0)


def test_timm_same_grid_forward_equal(tmp_path):
    import timm.models.vision_transformer as tvit

    ref = tvit.VisionTransformer(img_size=32, patch_size=16, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=0)
    path = tmp_path / "vit.pth"
    torch.save(ref.state_dict(), path)
    model = image_model()
    load_checkpoint(model, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)[0], ref.forward_features(x), rtol=1e-5, atol=1e-5)


def test_mae_global_pool_finetune_head_goes_to_classification_head(tmp_path):
    sd = {k: v for k, v in mae_pretrain_sd().items() if not k.startswith(("decoder", "mask_token"))}
    sd.pop("norm.weight"), sd.pop("norm.bias")  # MAE models_vit with global_pool deletes `norm`, adds `fc_norm`
    sd |= {"fc_norm.weight": rand(D), "fc_norm.bias": rand(D), "head.weight": rand(10, D), "head.bias": rand(10)}
    model = image_model()
    report = load_checkpoint(model, save_mae_pth(tmp_path / "ft.pth", sd), strict=False)
    msd = model.state_dict()
    if "head.norm.weight" in msd:
        torch.testing.assert_close(msd["head.norm.weight"], sd["fc_norm.weight"], rtol=0, atol=0)
    torch.testing.assert_close(msd["head.fc.weight"], sd["head.weight"], rtol=0, atol=0)
    assert report.missing == ["norm.weight", "norm.bias"]  # honest: MAE's fine-tune has no pre-pool norm


def test_audio_mae_one_channel_and_time_frequency_grid(tmp_path):
    sd = mae_pretrain_sd(in_chans=1, grid=(8, 8))  # 128 frames x 128 mel bins -> (8 time, 8 freq) patches
    path = save_mae_pth(tmp_path / "audiomae.pth", sd, model_name="mae_vit_base_patch16", audio_exp=True)
    model = TransformerModel(PatchTokenizer((64, 128), (16, 16), 1, D), ClassificationHead(D, 5), D, DEPTH, HEADS,
                             cls_token=True)  # 64 frames: (4, 8) patches
    report = load_checkpoint(model, path)
    assert report.format == "audio_mae" and report.ok
    msd = model.state_dict()
    torch.testing.assert_close(msd["tokenizer.proj.weight"], sd["patch_embed.proj.weight"], rtol=0, atol=0)
    expected = resample_pos_embed(sd["pos_embed"][:, 1:], (8, 8), (4, 8))
    torch.testing.assert_close(msd["tokenizer.pos_embed"], expected, rtol=0, atol=0)
    torch.testing.assert_close(msd["cls_token"], sd["cls_token"] + sd["pos_embed"][:, :1], rtol=0, atol=0)
    assert_blocks_equal(model, sd)


def videomae_pretrain_sd(dec: int = 32) -> dict[str, Tensor]:
    """MCG-NJU/VideoMAE modeling_pretrain.PretrainVisionTransformer: encoder.* (no pos table stored), decoder.*."""
    sd = {"encoder.patch_embed.proj.weight": rand(D, 3, 2, 16, 16), "encoder.patch_embed.proj.bias": rand(D)}
    sd |= timm_blocks("encoder.blocks.", qkv_bias=False, q_v_bias=True)
    sd |= {"encoder.norm.weight": rand(D), "encoder.norm.bias": rand(D),
           "encoder_to_decoder.weight": rand(dec, D), "mask_token": rand(1, 1, dec),
           "decoder.norm.weight": rand(dec), "decoder.norm.bias": rand(dec),
           "decoder.head.weight": rand(3 * 2 * 16 * 16, dec), "decoder.head.bias": rand(3 * 2 * 16 * 16)}
    return sd | timm_blocks("decoder.blocks.", depth=1, dim=dec, qkv_bias=False, q_v_bias=True)


def test_video_mae_q_v_bias_fused_and_fixed_table(tmp_path):
    sd = videomae_pretrain_sd()
    path = save_mae_pth(tmp_path / "videomae.pth", sd, num_frames=4, tubelet_size=2)
    model = TransformerModel(PatchTokenizer((4, 32, 32), (2, 16, 16), 3, D),
                             ClassificationHead(D, 7), D, DEPTH, HEADS)
    report = load_checkpoint(model, path)
    assert report.format == "video_mae" and report.ok
    msd = model.state_dict()
    torch.testing.assert_close(msd["tokenizer.proj.weight"], sd["encoder.patch_embed.proj.weight"], rtol=0, atol=0)
    for i in range(DEPTH):
        p = f"encoder.blocks.{i}.attn."
        fused = torch.cat([sd[p + "q_bias"], torch.zeros(D), sd[p + "v_bias"]])
        torch.testing.assert_close(msd[f"blocks.{i}.attn.qkv.bias"], fused, rtol=0, atol=0)
    assert_blocks_equal(model, sd, prefix="encoder.blocks.")
    torch.testing.assert_close(msd["norm.weight"], sd["encoder.norm.weight"], rtol=0, atol=0)
    torch.testing.assert_close(msd["tokenizer.pos_embed"], sinusoid_table(8, D), rtol=0, atol=0)
    assert "encoder_to_decoder.weight" in report.dropped and "decoder.head.weight" in report.dropped


def point_encoder_sd(prefix: str, dim: int = D) -> dict[str, Tensor]:
    """Point-MAE models/Point_MAE.py Encoder (mini-PointNet), pos_embed MLP, TransformerEncoder, norm."""
    sd = {}
    for conv, (cin, mid, cout) in {"first_conv": (3, 128, 256), "second_conv": (512, 512, dim)}.items():
        p = f"{prefix}encoder.{conv}."
        sd |= {p + "0.weight": rand(mid, cin, 1), p + "0.bias": rand(mid),
               p + "1.weight": rand(mid), p + "1.bias": rand(mid), p + "1.running_mean": rand(mid),
               p + "1.running_var": rand(mid).abs(), p + "1.num_batches_tracked": torch.tensor(7),
               p + "3.weight": rand(cout, mid, 1), p + "3.bias": rand(cout)}
    sd |= {f"{prefix}pos_embed.0.weight": rand(128, 3), f"{prefix}pos_embed.0.bias": rand(128),
           f"{prefix}pos_embed.2.weight": rand(dim, 128), f"{prefix}pos_embed.2.bias": rand(dim)}
    sd |= timm_blocks(f"{prefix}blocks.blocks.", qkv_bias=False)  # Point-MAE's qkv has no bias
    return sd | {f"{prefix}norm.weight": rand(dim), f"{prefix}norm.bias": rand(dim)}


def point_model(cls_token: bool = True) -> TransformerModel:
    return TransformerModel(PointGroupTokenizer(8, 4, 3, D), ClassificationHead(D, 5), D, DEPTH, HEADS,
                            cls_token=cls_token)


def check_point_encoder(model: TransformerModel, sd: dict[str, Tensor], prefix: str) -> None:
    msd = model.state_dict()
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest in ("cls_token", "cls_pos"):
            continue  # folded: checked by the caller
        if rest.startswith("encoder."):
            target = "tokenizer." + rest[len("encoder."):]
        elif rest.startswith("pos_embed."):
            target = "tokenizer." + rest
        elif rest.startswith("blocks.blocks."):
            target = rest[len("blocks."):]
        else:
            target = rest
        torch.testing.assert_close(msd[target], value, rtol=0, atol=0, msg=key)
    for i in range(DEPTH):
        assert torch.equal(msd[f"blocks.{i}.attn.qkv.bias"], torch.zeros(3 * D))


@pytest.mark.parametrize("wrap", ["", "module."])
def test_point_mae_pretrain_base_model(tmp_path, wrap):
    sd = point_encoder_sd("MAE_encoder.")
    sd |= {"mask_token": rand(1, 1, D), "decoder_pos_embed.0.weight": rand(128, 3),
           "decoder_pos_embed.0.bias": rand(128),
           "decoder_pos_embed.2.weight": rand(D, 128), "decoder_pos_embed.2.bias": rand(D),
           "MAE_decoder.norm.weight": rand(D), "MAE_decoder.norm.bias": rand(D),
           "increase_dim.0.weight": rand(3 * 4, D, 1), "increase_dim.0.bias": rand(3 * 4)}
    sd |= timm_blocks("MAE_decoder.blocks.blocks.", depth=1, qkv_bias=False)
    path = tmp_path / "pointmae.pth"  # tools/builder.save_checkpoint
    torch.save({"base_model": {wrap + k: v for k, v in sd.items()}, "optimizer": {}, "epoch": 300,
                "metrics": {}, "best_metrics": {}}, path)
    model = point_model()
    report = load_checkpoint(model, path)
    assert report.format == "point_mae" and report.ok
    check_point_encoder(model, sd, "MAE_encoder.")
    assert "cls_token" in report.left_at_init  # the pretraining encoder has no cls token (as Point-MAE's own load)
    assert any("zero-filled" in n for n in report.notes)
    assert {k for k in sd if not k.startswith("MAE_encoder.")} == set(report.dropped)


def test_point_mae_finetuned_cls_pos_folded_and_head_listed(tmp_path):
    sd = point_encoder_sd("") | {"cls_token": rand(1, 1, D), "cls_pos": rand(1, 1, D)}
    head = {"cls_head_finetune.0.weight": rand(256, 2 * D), "cls_head_finetune.0.bias": rand(256)}
    path = tmp_path / "ft.pth"
    torch.save({"base_model": sd | head, "epoch": 1}, path)
    model = point_model()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, path)
    assert "cls_head_finetune.0.weight (-> head.mlp.0.weight)" in str(err.value)
    report = load_checkpoint(model, path, ignore=[r"^cls_head_finetune\."])
    assert report.ok
    check_point_encoder(model, sd, "")
    torch.testing.assert_close(model.state_dict()["cls_token"], sd["cls_token"] + sd["cls_pos"], rtol=0, atol=0)


def hf_vit_legacy_sd() -> dict[str, Tensor]:
    """Hugging Face ViTForImageClassification as stored in Hub safetensors (transformers <= 4 names)."""
    sd = {"vit.embeddings.cls_token": rand(1, 1, D), "vit.embeddings.position_embeddings": rand(1, 5, D),
          "vit.embeddings.patch_embeddings.projection.weight": rand(D, 3, 16, 16),
          "vit.embeddings.patch_embeddings.projection.bias": rand(D),
          "vit.layernorm.weight": rand(D), "vit.layernorm.bias": rand(D),
          "vit.pooler.dense.weight": rand(D, D), "vit.pooler.dense.bias": rand(D)}
    for i in range(DEPTH):
        p = f"vit.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            sd |= {f"{p}attention.attention.{name}.weight": rand(D, D), f"{p}attention.attention.{name}.bias": rand(D)}
        sd |= {p + "attention.output.dense.weight": rand(D, D), p + "attention.output.dense.bias": rand(D),
               p + "intermediate.dense.weight": rand(4 * D, D), p + "intermediate.dense.bias": rand(4 * D),
               p + "output.dense.weight": rand(D, 4 * D), p + "output.dense.bias": rand(D),
               p + "layernorm_before.weight": rand(D), p + "layernorm_before.bias": rand(D),
               p + "layernorm_after.weight": rand(D), p + "layernorm_after.bias": rand(D)}
    return sd


def test_hf_vit_safetensors_qkv_fused(tmp_path):
    from safetensors.torch import save_file

    sd = hf_vit_legacy_sd()
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    model = image_model()
    report = load_checkpoint(model, path)
    assert report.format == "hf_vit" and report.ok
    msd = model.state_dict()
    for i in range(DEPTH):
        p = f"vit.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            qkv = torch.cat([sd[f"{p}attention.attention.{n}.{kind}"] for n in ("query", "key", "value")])
            torch.testing.assert_close(msd[f"blocks.{i}.attn.qkv.{kind}"], qkv, rtol=0, atol=0)
            for src, dst in (("attention.output.dense", "attn.proj"), ("intermediate.dense", "mlp.fc1"),
                             ("output.dense", "mlp.fc2"), ("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
                torch.testing.assert_close(msd[f"blocks.{i}.{dst}.{kind}"], sd[f"{p}{src}.{kind}"], rtol=0, atol=0)
    torch.testing.assert_close(msd["norm.bias"], sd["vit.layernorm.bias"], rtol=0, atol=0)
    torch.testing.assert_close(msd["tokenizer.pos_embed"], sd["vit.embeddings.position_embeddings"][:, 1:],
                               rtol=0, atol=0)
    assert set(report.dropped) == {"pooler.dense.weight", "pooler.dense.bias"}


def test_hf_vit_transformers5_layout_matches_hf_forward():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                 intermediate_size=4 * D, image_size=32, patch_size=16, layer_norm_eps=1e-6,
                                 hidden_act="gelu", add_pooling_layer=False)
    hf = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    model = image_model()
    report = load_checkpoint(model, hf.state_dict())
    assert report.format == "hf_vit" and report.ok
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)[0], hf(pixel_values=x).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- errors


def test_missing_unexpected_and_mismatched_are_named_and_nothing_is_written(tmp_path):
    sd = mae_pretrain_sd()
    del sd["blocks.1.mlp.fc2.weight"]
    sd["blocks.0.ls1.gamma"] = rand(D)  # timm layer scale: the engine has none
    sd["blocks.0.mlp.fc1.weight"] = rand(3 * D, D)
    path = save_mae_pth(tmp_path / "bad.pth", sd)
    model = image_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, path)
    msg = str(err.value)
    assert "missing from the checkpoint (1): blocks.1.mlp.fc2.weight" in msg
    assert "unexpected in the checkpoint (1): blocks.0.ls1.gamma" in msg
    assert "blocks.0.mlp.fc1.weight checkpoint (192, 64) vs model (256, 64)" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # validated before writing

    report = load_checkpoint(model, path, strict=False)
    assert report.missing == ["blocks.1.mlp.fc2.weight"]
    assert report.unexpected == {"blocks.0.ls1.gamma": "blocks.0.ls1.gamma"}
    assert report.mismatched == {"blocks.0.mlp.fc1.weight": ((192, 64), (256, 64))}
    torch.testing.assert_close(model.state_dict()["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])


class NotAllowed:  # any class other than argparse.Namespace must be refused by the reader
    pass


def test_only_namespace_is_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": mae_pretrain_sd(), "args": NotAllowed()}, path)
    with pytest.raises(CheckpointError, match="does not unpickle freely"):
        read_checkpoint(path)


def test_format_detection_override_and_unknown_layout(tmp_path):
    sd = mae_pretrain_sd()
    assert detect_format(sd) == "mae"
    assert detect_format({k: v for k, v in sd.items() if not k.startswith(("decoder", "mask"))}) == "timm"
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout; formats known: mae, audio_mae"):
        detect_format({"foo.weight": rand(2)})
    model = image_model()
    path = save_mae_pth(tmp_path / "m.pth", sd)
    assert load_checkpoint(model, path, format="timm", ignore=["^decoder", "^mask_token"]).format == "timm"
    with pytest.raises(CheckpointError, match="unknown format 'bogus'"):
        load_checkpoint(model, path, format="bogus")


def test_load_state_dict_gives_engine_names_for_the_engine(tmp_path):
    sd = videomae_pretrain_sd()
    tensors = load_state_dict(save_mae_pth(tmp_path / "v.pth", sd, num_frames=4, tubelet_size=2), modality="video")
    assert "blocks.0.attn.qkv.bias" in tensors and "tokenizer.proj.weight" in tensors
    assert not any(k.startswith(("encoder", "decoder", "mask_token")) or k.endswith("q_bias") for k in tensors)


@pytest.mark.parametrize("name, content, message", [
    ("bad.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "cannot read it as safetensors"),
    ("bad.pth", b"not a zip at all", "cannot read it as a torch checkpoint"),
])
def test_unreadable_checkpoint_files_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as err:
        read_checkpoint(path)
    assert str(path) in str(err.value)


def test_engine_loads_an_official_pth_with_args_under_format_auto(tmp_path):
    from pathway.train.model import init_from_checkpoint

    sd = mae_pretrain_sd()
    path = save_mae_pth(tmp_path / "mae.pth", sd, input_size=32)
    model = image_model()
    account = init_from_checkpoint(model, path, "auto")
    assert "format mae" in account
    assert_blocks_equal(model, sd)
    aux = image_model()
    assert "format mae" in init_from_checkpoint(aux, path, "auto", body_only=True)
    assert_blocks_equal(aux, sd)


def test_mae_global_pool_finetune_evaluates_exactly_as_its_own_model(tmp_path):
    """pathway eval on an MAE-style fine-tuned file (fc_norm after the pool, no norm): the recipe's
    model.fc_norm model holds every tensor and computes what the official architecture computes."""
    import timm.models.vision_transformer as tvit

    from pathway.train.config import load_recipe
    from pathway.train.evaluate import load_run_model
    from pathway.train.model import build_adapter

    official = tvit.VisionTransformer(img_size=32, patch_size=16, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                                      num_classes=10, global_pool="avg", fc_norm=True, class_token=True,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    path = tmp_path / "mae_finetuned.pth"
    torch.save({"model": official.state_dict(), "epoch": 99}, path)  # MAE's misc.save_model container
    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(root / "recipes/paper/imagenet_mae_baseline.yaml",
                         [f"model.embed_dim={D}", f"model.depth={DEPTH}", f"model.num_heads={HEADS}",
                          "data.options.img_size=32", "data.num_classes=10", "data.root="])
    adapter = build_adapter(recipe, need_data=False)
    model = load_run_model(recipe, path, adapter).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official(x), rtol=1e-5, atol=1e-5)


def test_point_mae_positions_reach_every_block_as_in_its_encoder(tmp_path):
    """Point-MAE's TransformerEncoder adds the position embedding before every block (x = block(x + pos)), the
    class token's cls_pos too; a pos_every_block model loaded from its file computes the same."""
    sd = point_encoder_sd("", dim=D)
    sd |= {"cls_token": rand(1, 1, D), "cls_pos": rand(1, 1, D)}
    torch.save({"base_model": sd}, tmp_path / "point.pth")
    model = TransformerModel(PointGroupTokenizer(8, 8, 3, D), ClassificationHead(D, 10), D, DEPTH, HEADS,
                             cls_token=True, pos_every_block=True).eval()
    load_checkpoint(model, tmp_path / "point.pth", format="point_mae")
    x = torch.randn(2, 64, 3)
    with torch.no_grad():
        out = model.tokenizer.encode(x)
        tokens = out.tokens - out.pos  # the group tokens before any position
        pos = torch.cat([sd["cls_pos"].expand(2, -1, -1), out.pos.expand(2, -1, -1)], dim=1)
        h = torch.cat([sd["cls_token"].expand(2, -1, -1), tokens], dim=1)
        for block in model.blocks:
            h = block(h + pos)
        torch.testing.assert_close(model.forward_features(x)[0], model.norm(h), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Point-MAE fine-tuned classifiers (PointTransformer, models/Point_MAE.py:421-548): cls_head_finetune


def point_mae_finetuned_sd(num_classes: int, prefix: str = "") -> dict[str, Tensor]:
    """A fine-tuned ``PointTransformer`` state dict (Point-MAE models/Point_MAE.py:436-469): encoder, cls_token,
    cls_pos, pos_embed, blocks.blocks.N (qkv without bias), norm, and cls_head_finetune, a Sequential whose
    Linears are at 0, 4, 8 and BatchNorms (with running statistics) at 1, 5."""
    sd = point_encoder_sd(prefix) | {f"{prefix}cls_token": rand(1, 1, D), f"{prefix}cls_pos": rand(1, 1, D)}
    for idx, (cin, cout) in {0: (2 * D, 256), 4: (256, 256), 8: (256, num_classes)}.items():
        sd |= {f"{prefix}cls_head_finetune.{idx}.weight": rand(cout, cin) / cin**0.5,
               f"{prefix}cls_head_finetune.{idx}.bias": rand(cout)}
    for idx in (1, 5):
        p = f"{prefix}cls_head_finetune.{idx}."
        sd |= {p + "weight": rand(256), p + "bias": rand(256), p + "running_mean": rand(256),
               p + "running_var": rand(256).abs() + 0.5, p + "num_batches_tracked": torch.tensor(1234)}
    return sd


def point_mae_classifier(num_classes: int, cls_token: bool = True) -> TransformerModel:
    from pathway.adapters.heads import PointMAEClassificationHead

    return TransformerModel(PointGroupTokenizer(8, 4, 3, D), PointMAEClassificationHead(D, num_classes), D, DEPTH,
                            HEADS, cls_token=cls_token, pos_every_block=True)


def point_mae_head_by_hand(sd: dict[str, Tensor], tokens: Tensor) -> Tensor:
    """Point_MAE.py:546-547 and the Sequential of :459-469 in eval mode, written out from the file's tensors."""
    h = torch.cat([tokens[:, 0], tokens[:, 1:].max(1)[0]], dim=-1)
    for lin, bn in ((0, 1), (4, 5)):
        h = h @ sd[f"cls_head_finetune.{lin}.weight"].double().T + sd[f"cls_head_finetune.{lin}.bias"].double()
        p = f"cls_head_finetune.{bn}."
        h = (h - sd[p + "running_mean"].double()) / torch.sqrt(sd[p + "running_var"].double() + 1e-5)
        h = torch.relu(h * sd[p + "weight"].double() + sd[p + "bias"].double())  # Dropout(0.5): identity in eval
    return h @ sd["cls_head_finetune.8.weight"].double().T + sd["cls_head_finetune.8.bias"].double()


def point_mae_body_by_hand(sd: dict[str, Tensor], groups: Tensor, pos: Tensor) -> Tensor:
    """PointTransformer.forward (Point_MAE.py:536-545) from the file's tensors: [cls_token, groups] with
    [cls_pos, pos] added before every block (TransformerEncoder, :162-165), Block :143-146 with Attention
    :113-125 (qkv without bias), the final norm. nn.LayerNorm's eps there is 1e-5; the engine's is timm's 1e-6."""
    def t(key: str) -> Tensor:
        return sd[key].double()

    def ln(x: Tensor, key: str) -> Tensor:
        return torch.nn.functional.layer_norm(x, (D,), t(key + ".weight"), t(key + ".bias"), eps=1e-5)

    b = groups.shape[0]
    x = torch.cat([t("cls_token").expand(b, -1, -1), groups], dim=1)
    pos = torch.cat([t("cls_pos").expand(b, -1, -1), pos.expand(b, -1, -1)], dim=1)
    for i in range(DEPTH):
        p = f"blocks.blocks.{i}."
        x = x + pos
        n = x.shape[1]
        qkv = ln(x, p + "norm1") @ t(p + "attn.qkv.weight").T  # qkv_bias=False
        qkv = qkv.reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (D // HEADS) ** -0.5).softmax(dim=-1)
        x = x + (attn @ qkv[2]).transpose(1, 2).reshape(b, n, D) @ t(p + "attn.proj.weight").T + t(p + "attn.proj.bias")
        h = torch.nn.functional.gelu(ln(x, p + "norm2") @ t(p + "mlp.fc1.weight").T + t(p + "mlp.fc1.bias"))
        x = x + h @ t(p + "mlp.fc2.weight").T + t(p + "mlp.fc2.bias")
    return ln(x, "norm")


@pytest.mark.parametrize("wrap", ["", "module."])  # nn.DataParallel's prefix (runner_finetune.py:93)
def test_point_mae_finetuned_classifier_loads_whole_and_computes_its_head(tmp_path, wrap):
    sd = point_mae_finetuned_sd(7)
    path = tmp_path / "ckpt-best.pth"  # tools/builder.save_checkpoint: {"base_model": model.state_dict(), ...}
    torch.save({"base_model": {wrap + k: v for k, v in sd.items()}, "optimizer": {}, "epoch": 250,
                "metrics": {"acc": 93.8}, "best_metrics": {"acc": 93.8}}, path)
    model = point_mae_classifier(7)
    report = load_checkpoint(model, path, allow_missing=())  # strict, and nothing may be left at init
    assert report.format == "point_mae" and report.ok
    assert not report.left_at_init and not report.missing and not report.unexpected and not report.dropped
    msd = model.state_dict()
    assert set(report.loaded) == set(msd)
    head = {k: v for k, v in sd.items() if k.startswith("cls_head_finetune.")}
    check_point_encoder(model, {k: v for k, v in sd.items() if k not in head}, "")
    assert len(head) == 16
    for key, value in head.items():
        torch.testing.assert_close(msd["head.mlp." + key[len("cls_head_finetune."):]], value, rtol=0, atol=0, msg=key)
    assert int(msd["head.mlp.5.num_batches_tracked"]) == 1234
    torch.testing.assert_close(msd["cls_token"], sd["cls_token"] + sd["cls_pos"], rtol=0, atol=0)
    torch.testing.assert_close(msd["cls_pos"], sd["cls_pos"], rtol=0, atol=0)

    model = model.double().eval()
    x = torch.randn(3, 64, 3, dtype=torch.float64)
    with torch.no_grad():
        tokens, out = model.forward_features(x)
        logits = model(x)
        # the head on the engine's own tokens, by hand: exact up to float64 rounding
        torch.testing.assert_close(logits, point_mae_head_by_hand(sd, tokens), rtol=1e-10, atol=1e-10)
        # the whole PointTransformer forward by hand, from the grouped points: equal up to LayerNorm's eps
        groups = out.tokens - out.pos  # Encoder(neighborhood), before any position (Point_MAE.py:534)
        reference = point_mae_head_by_hand(sd, point_mae_body_by_hand(sd, groups, out.pos))
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert logits.shape == (3, 7) and logits.abs().max() > 0.1


def test_point_mae_head_refuses_a_model_without_cls_token_and_a_linear_head_names_the_fix(tmp_path):
    from pathway.adapters.point import PointAdapter
    from pathway.errors import OptionError

    sd = point_mae_finetuned_sd(5)
    path = tmp_path / "ft.pth"
    torch.save({"base_model": sd}, path)
    model = point_mae_classifier(5, cls_token=False)
    with pytest.raises(OptionError, match=r"reads the class token .*set model.cls_token: true"):
        model(torch.randn(2, 64, 3))
    with pytest.raises(CheckpointError, match=r"data.options.head: pointmae"):
        load_checkpoint(point_model(), path)  # the Linear head has no place for cls_head_finetune
    with pytest.raises(OptionError, match=r"head='mlp' is not one of \['linear', 'pointmae', 'probe'\]"):
        PointAdapter.spec(5, head="mlp")
    assert type(PointAdapter.spec(5).head(D)).__name__ == "ClassificationHead"  # the default is unchanged
    assert type(PointAdapter.spec(5, head="pointmae").head(D)).__name__ == "PointMAEClassificationHead"


def test_pathway_eval_of_a_point_mae_finetuned_file(tmp_path):
    """``pathway eval recipes/paper/modelnet40_pointmae_baseline.yaml --weights ckpt-best.pth`` at test sizes:
    the recipe's Point-MAE head takes the whole file, and the metrics are those of the loaded model."""
    from pathway.train.config import load_recipe
    from pathway.train.evaluate import evaluate_weights
    from pathway.train.metrics import MetricAccumulator
    from pathway.train.model import build_adapter
    from pathway.train.official.fixtures import MODELNET_CLASSES, write_dataset

    data = write_dataset("modelnet40", tmp_path / "modelnet40")
    sd = point_mae_finetuned_sd(len(MODELNET_CLASSES), prefix="module.")  # DataParallel, as Point-MAE saves it
    weights = tmp_path / "ckpt-best.pth"
    torch.save({"base_model": sd, "optimizer": {}, "epoch": 250, "metrics": {}, "best_metrics": {}}, weights)
    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(root / "recipes/paper/modelnet40_pointmae_baseline.yaml",
                         [f"data.root={data}", "data.options.num_points=64", "data.options.num_groups=8",
                          "data.options.group_size=4", "data.batch_size=16", "data.num_workers=0",
                          f"model.embed_dim={D}", f"model.depth={DEPTH}", f"model.num_heads={HEADS}",
                          "aux.num_heads=2", "model.checkpoint=", "train.device=cpu",
                          "data.options.test_votes=1"])  # one view per cloud here: the votes are tested on their own
    assert recipe.data.options["head"] == "pointmae" and recipe.model.cls_token and recipe.model.pos_every_block
    metrics = evaluate_weights(recipe, weights)

    model = point_mae_classifier(len(MODELNET_CLASSES))
    model.tokenizer = build_adapter(recipe).tokenizer(D)  # 8 groups of 4, as the recipe (same keys and shapes)
    load_checkpoint(model, weights, allow_missing=())
    model.eval()
    test = build_adapter(recipe).dataset("test", train=False)
    acc, losses = MetricAccumulator("top1"), []
    with torch.no_grad():
        for i in range(len(test)):
            x, y = test[i]
            logits = model(x[None])
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor([y])).item())
            acc.add(logits, torch.tensor([y]))
    assert len(test) == 2 * len(MODELNET_CLASSES)
    assert metrics["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert metrics["top1"] == pytest.approx(acc.compute()["top1"])

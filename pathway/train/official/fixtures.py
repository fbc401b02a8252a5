"""Tiny data sets in the paper's official layouts and checkpoint files in the official key layouts.

``pathway train RECIPE --rehearse`` (``pathway/train/jobs/rehearse.py``) runs a paper recipe for real on what
this module writes, so the readers, loaders and checkpoint converters meet the same folders, file
formats and key names as on the GPU node:

=================  ===========================================================================================
layout             what is written (a few items per split, real file formats)
=================  ===========================================================================================
``imagenet``       ``{train,val}/<wnid>/<wnid>_<n>.JPEG``: JPEGs of varied sizes, RGB, grey and CMYK
``kinetics400``    ``{train,val}.csv`` (``path,label``) + ``videos_{train,val}/<label>/<ytid>_<start>_<end>.mp4``
``audioset``       ``class_labels_indices.csv`` (``index,mid,display_name``), ``{balanced_train,eval}.csv``
                   (``path,labels``, several quoted mids per clip) + ``audio/<ytid>_<start>.wav`` (stereo, 32 kHz)
``shapenetpart``   ``shapenetcore_partanno_segmentation_benchmark_v0_normal``: ``synsetoffset2category.txt``,
                   ``train_test_split/shuffled_{train,val,test}_file_list.json``, ``<synset>/<id>.txt``
                   (``x y z nx ny nz label``, the benchmark's global part ids)
``partnet``        ``data_v0``: ``stats/train_val_test_split/<Category>.{train,val,test}.json``,
                   ``stats/merging_hierarchy_mapping/<Category>.txt``, ``stats/after_merging_label_ids/
                   <Category>-level-3.txt``, ``data_v0/<anno_id>/result.json`` (the part tree) +
                   ``point_sample/sample-points-all-{pts-nor-rgba,label}-10000.txt`` (a leaf id per point)
``modelnet40``     ``{train,test}/<class>/<class>_<n>.txt`` (``x,y,z,nx,ny,nz``)
=================  ===========================================================================================

Checkpoints (:func:`write_checkpoint`) are written from a model of the rehearsal's sizes, renamed to the
official keys of each code base, with the official containers and the pretraining-only tensors that the
loader must drop: MAE ``{"model"}`` encoder; AudioMAE ``{"model", "args"}`` with its decoder; VideoMAE
``{"model": encoder.* + decoder.*}`` with ``q_bias``/``v_bias`` and no position table; Point-MAE
``{"base_model": MAE_encoder.* + MAE_decoder.*}`` without qkv biases; M2PT model-zoo aux files in timm's
``vit_base_patch16_224`` layout (224-pixel position table, 1000-class head).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["LAYOUTS", "layout_of", "write_dataset", "CHECKPOINT_WRITERS", "write_checkpoint"]

COMPLETE = ".complete"

# ShapeNetPart: (category, synset, global part ids), as in the benchmark's synsetoffset2category.txt and the
# part-id ranges every ShapeNetPart code base (PointNet++, Point-MAE segmentation/dataset.py) hard-codes.
SHAPENET_PARTS = (("Airplane", "02691156", (0, 1, 2, 3)), ("Bag", "02773838", (4, 5)),
                  ("Chair", "03001627", (12, 13, 14, 15)), ("Mug", "03797390", (36, 37)))
IMAGENET_WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361")
KINETICS_LABELS = ("abseiling", "air drumming", "answering questions", "applauding")
AUDIOSET_CLASSES = (("/m/09x0r", "Speech"), ("/m/05zppz", "Male speech, man speaking"),
                    ("/m/02zsn", "Female speech, woman speaking"), ("/m/04rlf", "Music"), ("/m/0jbk", "Animal"))
MODELNET_CLASSES = ("airplane", "bathtub", "bed", "bench")
# The rehearsal's PartNet part tree, as data_v0's result.json stores one: (id, name, children); a leaf has objs.
# The merging table renames one node and leaves one leaf off level 3 (its points are "other", label 0).
PARTNET_TREE = (1, "chair", ((2, "chair_back", ((3, "back_surface", ()), (4, "back_frame", ()))),
                             (5, "chair_seat", ()),
                             (6, "chair_base", ((7, "leg", ()), (8, "foot", ())))))
PARTNET_MERGING = {"chair/chair_base/leg": "chair/chair_base/regular_leg_base/leg"}
PARTNET_LEVEL3 = ("chair/chair_back/back_surface", "chair/chair_back/back_frame", "chair/chair_seat",
                  "chair/chair_base/regular_leg_base/leg")


# ---------------------------------------------------------------------------------------------------------
# Data sets


def _cloud(n: int, rng: np.random.Generator, parts: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points on a noisy ellipsoid, their normals, and one part label per slab along the y axis."""
    p = rng.standard_normal((n, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    normals = p.copy()
    p = p * rng.uniform(0.3, 1.0, 3) + rng.normal(0, 0.01, (n, 3))
    edges = np.quantile(p[:, 1], np.linspace(0, 1, len(parts) + 1)[1:-1])
    labels = np.asarray(parts)[np.searchsorted(edges, p[:, 1])]
    return p.astype(np.float32), normals.astype(np.float32), labels


def write_imagenet(root: Path, rng: np.random.Generator, per_class: dict[str, int]) -> None:
    from PIL import Image

    for split, count in per_class.items():
        for wnid in IMAGENET_WNIDS:
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = (int(v) for v in rng.integers(24, 97, 2))
                img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                mode = ("RGB", "L", "CMYK")[i % 3]  # ImageNet holds grey and CMYK JPEGs among the RGB ones
                img.convert(mode).save(folder / f"{wnid}_{i + 1}.JPEG", quality=90)


def _write_mp4(path: Path, frames: int, height: int, width: int, rng: np.random.Generator) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for t in range(frames):
            frame = np.roll(base, 2 * t, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_kinetics400(root: Path, rng: np.random.Generator, per_class: dict[str, int]) -> None:
    for split, count in per_class.items():
        rows = []
        for label in KINETICS_LABELS:
            for i in range(count):
                ytid = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789_-"), 11))
                rel = Path(f"videos_{split}") / label / f"{ytid}_{i * 10:06d}_{i * 10 + 10:06d}.mp4"
                _write_mp4(root / rel, int(rng.integers(12, 40)), 32 + 8 * (i % 2), (40, 56, 64)[i % 3], rng)
                rows.append((str(rel), label))
        with (root / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label"])
            writer.writerows(rows)


def write_audioset(root: Path, rng: np.random.Generator, per_split: dict[str, int]) -> None:
    import soundfile as sf

    root.mkdir(parents=True, exist_ok=True)
    with (root / "class_labels_indices.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "mid", "display_name"])
        writer.writerows((i, mid, name) for i, (mid, name) in enumerate(AUDIOSET_CLASSES))
    mids = [mid for mid, _ in AUDIOSET_CLASSES]
    sr = 32000  # AudioSet sources come at several rates; the adapter resamples to 16 kHz
    for split, count in per_split.items():
        rows = []
        for i in range(count):
            k = 1 + i % 3  # one to three labels per clip; every class occurs in every split
            labels = [mids[(i + j) % len(mids)] for j in range(k)]
            t = np.arange(int(sr * rng.uniform(0.6, 1.2))) / sr
            wave = sum(np.sin(2 * np.pi * 220 * (1 + mids.index(m)) * t) for m in labels) / k
            stereo = np.stack([wave, wave * 0.8], axis=1) + 0.01 * rng.standard_normal((len(t), 2))
            rel = Path("audio") / f"{split}_{i:03d}_{int(rng.integers(0, 300)) * 1000}.wav"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(root / rel), stereo.astype(np.float32), sr)
            rows.append((str(rel), ",".join(labels)))
        with (root / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f, quoting=csv.QUOTE_MINIMAL)
            writer.writerow(["path", "labels"])
            writer.writerows(rows)


def write_shapenetpart(root: Path, rng: np.random.Generator, per_split: dict[str, int], points: int = 400) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "synsetoffset2category.txt").write_text("".join(f"{c}\t{s}\n" for c, s, _ in SHAPENET_PARTS))
    (root / "train_test_split").mkdir(exist_ok=True)
    for split, count in per_split.items():
        listing = []
        for k, (_, synset, parts) in enumerate(SHAPENET_PARTS):
            for _ in range(count + k % 2):  # unequal categories: instance and class mIoU differ
                shape_id = "".join(rng.choice(list("0123456789abcdef"), 32))
                xyz, normals, labels = _cloud(points, rng, parts)
                (root / synset).mkdir(exist_ok=True)
                np.savetxt(root / synset / f"{shape_id}.txt", np.column_stack([xyz, normals, labels]),
                           fmt=["%.6f"] * 6 + ["%d"])
                listing.append(f"shape_data/{synset}/{shape_id}")
        (root / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(json.dumps(listing))


def _partnet_node(node: tuple) -> dict:
    node_id, name, children = node
    if not children:
        return {"id": node_id, "name": name, "text": name, "objs": [f"original-{node_id}"]}
    return {"id": node_id, "name": name, "text": name, "children": [_partnet_node(c) for c in children]}


def _partnet_paths(node: tuple, prefix: str = "") -> list[tuple[str, int, bool]]:
    """(path, id, is leaf) of every node of the tree."""
    node_id, name, children = node
    path = f"{prefix}/{name}" if prefix else name
    return [(path, node_id, not children)] + [row for c in children for row in _partnet_paths(c, path)]


def write_partnet(root: Path, rng: np.random.Generator, per_split: dict[str, int], category: str = "Chair",
                  points: int = 400) -> None:
    stats = root / "stats"
    for folder in ("train_val_test_split", "merging_hierarchy_mapping", "after_merging_label_ids"):
        (stats / folder).mkdir(parents=True, exist_ok=True)
    nodes = _partnet_paths(PARTNET_TREE)
    (stats / "merging_hierarchy_mapping" / f"{category}.txt").write_text(
        "".join(f"{path} {PARTNET_MERGING.get(path, path)}\n" for path, _, _ in nodes))
    (stats / "after_merging_label_ids" / f"{category}-level-3.txt").write_text(
        "".join(f"{i + 10} {path} leaf\n" for i, path in enumerate(PARTNET_LEVEL3)))
    leaves = tuple(node_id for _, node_id, leaf in nodes if leaf)
    anno = 1000
    for split, count in per_split.items():
        entries = []
        for _ in range(count):
            anno += int(rng.integers(1, 50))
            folder = root / "data_v0" / str(anno)
            (folder / "point_sample").mkdir(parents=True, exist_ok=True)
            (folder / "result.json").write_text(json.dumps([_partnet_node(PARTNET_TREE)]))
            xyz, normals, leaf_ids = _cloud(points, rng, leaves)
            rgba = np.column_stack([rng.integers(0, 256, (points, 3)), np.ones(points)])
            np.savetxt(folder / "point_sample" / "sample-points-all-pts-nor-rgba-10000.txt",
                       np.column_stack([xyz, normals, rgba]), fmt=["%.6f"] * 6 + ["%d"] * 3 + ["%.1f"])
            np.savetxt(folder / "point_sample" / "sample-points-all-label-10000.txt", leaf_ids, fmt="%d")
            entries.append({"anno_id": str(anno), "model_id": "".join(rng.choice(list("0123456789abcdef"), 32))})
        (stats / "train_val_test_split" / f"{category}.{split}.json").write_text(json.dumps(entries))


def write_modelnet40(root: Path, rng: np.random.Generator, per_class: dict[str, int], points: int = 400) -> None:
    for split, count in per_class.items():
        for c, name in enumerate(MODELNET_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                xyz, normals, _ = _cloud(points, rng, (0,))
                xyz[:, c % 3] *= 2.0  # the class shows in the shape
                np.savetxt(folder / f"{name}_{i + 1:04d}.txt", np.column_stack([xyz, normals]), fmt="%.6f",
                           delimiter=",")


# layout -> (writer, items per class / category / split, the splits a recipe may name)
LAYOUTS: dict[str, tuple[Callable[..., None], dict[str, int]]] = {
    "imagenet": (write_imagenet, {"train": 6, "val": 2}),
    "kinetics400": (write_kinetics400, {"train": 5, "val": 1}),
    "audioset": (write_audioset, {"balanced_train": 20, "eval": 6}),
    "shapenetpart": (write_shapenetpart, {"train": 3, "val": 1, "test": 2}),
    "partnet": (write_partnet, {"train": 16, "val": 3, "test": 4}),
    "modelnet40": (write_modelnet40, {"train": 5, "test": 2}),
}


def layout_of(adapter: str, options: dict) -> str:
    """The official layout a recipe's adapter and options read."""
    if adapter == "image":
        return "imagenet"
    if adapter == "video":
        return "kinetics400"
    if adapter == "audio":
        return "audioset"
    if adapter == "point":
        return "modelnet40"
    if adapter == "point_part":
        layout = options.get("layout", "folders")
        if layout in ("shapenetpart", "partnet"):
            return layout
    raise ValueError(f"no rehearsal data layout for adapter {adapter!r} with options {options}; "
                     f"known layouts: {', '.join(LAYOUTS)}")


def write_dataset(layout: str, root: Path, *, seed: int = 0, **kwargs) -> Path:
    """Write ``layout``'s tiny data set into ``root`` once (a ``.complete`` marker makes later calls free)."""
    root = Path(root)
    if (root / COMPLETE).is_file():
        return root
    writer, sizes = LAYOUTS[layout]
    writer(root, np.random.default_rng(seed), sizes, **kwargs)
    (root / COMPLETE).write_text(layout + "\n")
    return root


# ---------------------------------------------------------------------------------------------------------
# Checkpoints in the official key layouts


def _rename(sd: dict[str, Tensor], swaps: tuple[tuple[str, str], ...]) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        for old, new in swaps:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value.clone()
    return out


def _vit_blocks(prefix: str, depth: int, dim: int, generator: torch.Generator,
                qkv_bias: bool = True) -> dict[str, Tensor]:
    """Random tensors under timm/MAE Block keys (decoders of the pretraining files)."""
    sd = {}
    for i in range(depth):
        p = f"{prefix}{i}."
        shapes = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
                  "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,), "norm2.weight": (dim,),
                  "norm2.bias": (dim,), "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
                  "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,)}
        if qkv_bias:
            shapes["attn.qkv.bias"] = (3 * dim,)
        sd |= {p + k: torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()}
    return sd


def _body(model_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Blocks and the norm after them (which pretraining files always hold, also for a ``model.fc_norm`` model)."""
    body = {k: v.clone() for k, v in model_sd.items() if k.startswith(("blocks.", "norm."))}
    if "norm.weight" not in body:
        dim = model_sd["blocks.0.norm1.weight"].shape[0]
        body |= {"norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim)}
    return body


def _with_cls_position(model_sd: dict[str, Tensor], g: torch.Generator) -> dict[str, Tensor]:
    """MAE-family files keep a cls token and its position in front of the patch positions."""
    dim = model_sd["tokenizer.proj.weight"].shape[0]
    pos = model_sd["tokenizer.pos_embed"]
    return {"cls_token": torch.randn(1, 1, dim, generator=g) * 0.02,
            "pos_embed": torch.cat([torch.zeros(1, 1, dim), pos.clone()], dim=1)}


def mae_encoder(model_sd: dict[str, Tensor], g: torch.Generator) -> dict:
    """MAE's released ``mae_pretrain_vit_base.pth``: ``{"model": encoder}`` (cls token, fixed sin-cos table)."""
    patch = {k: v for k, v in model_sd.items() if k.startswith("tokenizer.proj.")}
    sd = _with_cls_position(model_sd, g) | _rename(patch, (("tokenizer.proj.", "patch_embed.proj."),))
    return {"model": sd | _body(model_sd)}


def audio_mae_pretrain(model_sd: dict[str, Tensor], g: torch.Generator, decoder_dim: int = 16) -> dict:
    """AudioMAE's ``pretrained.pth`` (main_pretrain.py's save_model): encoder + decoder, args Namespace."""
    sd = mae_encoder(model_sd, g)["model"]
    n, patch = sd["pos_embed"].shape[1], sd["patch_embed.proj.weight"].shape[-1]
    sd |= {"mask_token": torch.zeros(1, 1, decoder_dim),
           "decoder_embed.weight": torch.randn(decoder_dim, sd["blocks.0.norm1.weight"].shape[0], generator=g) * 0.02,
           "decoder_embed.bias": torch.zeros(decoder_dim), "decoder_pos_embed": torch.zeros(1, n, decoder_dim),
           "decoder_norm.weight": torch.ones(decoder_dim), "decoder_norm.bias": torch.zeros(decoder_dim),
           "decoder_pred.weight": torch.randn(patch * patch, decoder_dim, generator=g) * 0.02,
           "decoder_pred.bias": torch.zeros(patch * patch)}
    sd |= _vit_blocks("decoder_blocks.", 1, decoder_dim, g)
    return {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 32, "scaler": {},
            "args": argparse.Namespace(model="mae_vit_base_patch16", audio_exp=True, mask_ratio=0.8)}


def video_mae_pretrain(model_sd: dict[str, Tensor], g: torch.Generator, decoder_dim: int = 16) -> dict:
    """VideoMAE ``checkpoint.pth`` of run_mae_pretraining.py: ``{"model": encoder.* + decoder.*}``; the qkv
    Linear has no bias but ``q_bias``/``v_bias``; the sin-cos table is not a tensor of the module."""
    enc = {k: v for k, v in _body(model_sd).items() if k.startswith("norm.")}
    for key, value in model_sd.items():
        if key.startswith("tokenizer.proj."):
            enc["encoder.patch_embed.proj." + key[len("tokenizer.proj."):]] = value.clone()
        elif re.match(r"blocks\.\d+\.attn\.qkv\.bias$", key):
            q, _, v = value.chunk(3)
            enc["encoder." + key.replace("qkv.bias", "q_bias")] = q.clone()
            enc["encoder." + key.replace("qkv.bias", "v_bias")] = v.clone()
        elif key.startswith("blocks."):
            enc["encoder." + key] = value.clone()
    patch = model_sd["tokenizer.proj.weight"]
    out_dim = patch[0].numel()
    dec = {"encoder_to_decoder.weight": torch.randn(decoder_dim, patch.shape[0], generator=g) * 0.02,
           "mask_token": torch.zeros(1, 1, decoder_dim), "decoder.norm.weight": torch.ones(decoder_dim),
           "decoder.norm.bias": torch.zeros(decoder_dim),
           "decoder.head.weight": torch.randn(out_dim, decoder_dim, generator=g) * 0.02,
           "decoder.head.bias": torch.zeros(out_dim)}
    dec |= _vit_blocks("decoder.blocks.", 1, decoder_dim, g, qkv_bias=False)
    return {"model": enc | dec, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799, "scaler": {},
            "args": argparse.Namespace(model="pretrain_videomae_base_patch16_224", num_frames=16, tubelet_size=2)}


def point_mae_pretrain(model_sd: dict[str, Tensor], g: torch.Generator) -> dict:
    """Point-MAE ``ckpt-last.pth`` (tools/builder.py save_checkpoint): ``{"base_model": Point_MAE}``; its
    Attention has ``qkv_bias=False``; no cls token in the pretraining encoder."""
    swaps = (("tokenizer.first_conv.", "MAE_encoder.encoder.first_conv."),
             ("tokenizer.second_conv.", "MAE_encoder.encoder.second_conv."),
             ("tokenizer.pos_embed.", "MAE_encoder.pos_embed."), ("blocks.", "MAE_encoder.blocks.blocks."),
             ("norm.", "MAE_encoder.norm."))
    keep = {k: v for k, v in model_sd.items() if k.startswith(tuple(s for s, _ in swaps))
            and not re.match(r"blocks\.\d+\.attn\.qkv\.bias$", k)}
    sd = _rename(keep, swaps)
    dim = model_sd["blocks.0.norm1.weight"].shape[0]
    sd |= {"mask_token": torch.zeros(1, 1, dim), "decoder_pos_embed.0.weight": torch.randn(128, 3, generator=g) * 0.02,
           "decoder_pos_embed.0.bias": torch.zeros(128),
           "decoder_pos_embed.2.weight": torch.randn(dim, 128, generator=g) * 0.02,
           "decoder_pos_embed.2.bias": torch.zeros(dim), "MAE_decoder.norm.weight": torch.ones(dim),
           "MAE_decoder.norm.bias": torch.zeros(dim),
           "increase_dim.0.weight": torch.randn(96, dim, 1, generator=g) * 0.02,
           "increase_dim.0.bias": torch.zeros(96)}
    sd |= _vit_blocks("MAE_decoder.blocks.blocks.", 1, dim, g, qkv_bias=False)
    return {"base_model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 300, "metrics": {},
            "best_metrics": {}}


def m2pt_aux(model_sd: dict[str, Tensor], g: torch.Generator) -> dict:
    """An M2PT model-zoo aux file ({Point,Video,Audio,Image}_ViT_B16.pth): timm ``vit_base_patch16_224`` keys
    (image patch embedding, 14 x 14 + 1 positions, 1000-class head) at the rehearsal's width; only the
    blocks take part in the pathway."""
    dim = model_sd["blocks.0.norm1.weight"].shape[0]
    sd = {"cls_token": torch.randn(1, 1, dim, generator=g) * 0.02,
          "pos_embed": torch.randn(1, 197, dim, generator=g) * 0.02,
          "patch_embed.proj.weight": torch.randn(dim, 3, 16, 16, generator=g) * 0.02,
          "patch_embed.proj.bias": torch.zeros(dim),
          "head.weight": torch.randn(1000, dim, generator=g) * 0.02, "head.bias": torch.zeros(1000)}
    return {"model": sd | _body(model_sd)}


CHECKPOINT_WRITERS: dict[str, Callable[[dict[str, Tensor], torch.Generator], dict]] = {
    "mae": mae_encoder, "audio_mae": audio_mae_pretrain, "video_mae": video_mae_pretrain,
    "point_mae": point_mae_pretrain, "timm": m2pt_aux,
}


def _videomae_blocks(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """VideoMAE's attention: a qkv Linear without bias, ``q_bias`` and ``v_bias`` (k's bias is fixed at zero; a
    bias on k adds the same amount to every score of a query, which softmax ignores, so dropping it is exact)."""
    out = {}
    for key, value in sd.items():
        if re.match(r"blocks\.\d+\.attn\.qkv\.bias$", key):
            q, _, v = value.chunk(3)
            out[key.replace("qkv.bias", "q_bias")], out[key.replace("qkv.bias", "v_bias")] = q.clone(), v.clone()
        else:
            out[key] = value.clone()
    return out


def official_finetuned(fmt: str, model_sd: dict[str, Tensor]) -> dict:
    """A fine-tuned model of the official code base of ``fmt``, from a ``model.fc_norm`` TransformerModel's state
    dict (a run's ``model.safetensors``): MAE / AudioMAE ``models_vit.VisionTransformer(global_pool=True)``
    (``cls_token``, ``pos_embed`` with its cls slot, ``fc_norm``, ``head``; no ``norm``), VideoMAE
    ``modeling_finetune.VisionTransformer(use_mean_pooling=True)`` (no cls token, fixed position table not
    stored, ``q_bias``/``v_bias``, ``fc_norm``, ``head``); as their ``save_model`` writes it, ``{"model": ...}``."""
    from .layouts import engine_to_timm

    if "head.fc_norm.weight" not in model_sd:
        raise ValueError("official_finetuned: the model has no fc_norm head (model.fc_norm: true)")
    sd = engine_to_timm(model_sd)
    if fmt in ("mae", "audio_mae"):
        if "cls_token" not in sd:  # models_vit always has one; a cls-less engine model gets an unused one
            dim = sd["fc_norm.weight"].shape[0]
            sd["cls_token"] = torch.zeros(1, 1, dim)
        sd["pos_embed"] = torch.cat([torch.zeros_like(sd["pos_embed"][:, :1]), sd["pos_embed"]], dim=1)
        return {"model": sd}
    if fmt == "video_mae":
        sd.pop("pos_embed", None)
        return {"model": _videomae_blocks(sd)}
    raise ValueError(f"no official fine-tuned layout written for format {fmt!r} (mae, audio_mae, video_mae)")


def write_checkpoint(fmt: str, model_sd: dict[str, Tensor], path: Path, seed: int = 0) -> Path:
    """Save ``model_sd`` (a TransformerModel's state dict) under ``fmt``'s official keys and container."""
    if fmt not in CHECKPOINT_WRITERS:
        raise ValueError(f"no official-layout writer for checkpoint format {fmt!r}; "
                         f"known: {', '.join(CHECKPOINT_WRITERS)}")
    g = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(CHECKPOINT_WRITERS[fmt](model_sd, g), path)
    return path

"""The folded ViT backbone in the key layouts of the dense-prediction code bases behind Table 1's dense columns.

The paper's COCO (Mask R-CNN) and ADE20K (UperNet) numbers start from an ImageNet-fine-tuned, folded ViT-B: a
plain ViT whose patch embedding, position table and blocks initialise the detector's or segmenter's backbone.
This module writes a run's ``model.safetensors`` (TransformerModel keys, after ``pathway.fold``) as the file
each code base's model definition loads, with no conversion step on their side:

``vitdet``: detectron2's ViTDet, ``SimpleFeaturePyramid(net=ViT(...))`` (facebookresearch/detectron2 02b5c4e,
  ``detectron2/modeling/backbone/vit.py:232-360``, ``configs/common/models/mask_rcnn_vitdet.py:17-43``):
  ``{"model": {"backbone.net.<key>": tensor}, "__author__": "pathway"}`` with ``patch_embed.proj`` (Conv2d),
  ``pos_embed [1, 1 + N, D]`` (``pretrain_use_cls_token=True``: row 0 is a class position the ViT drops,
  ``get_abs_pos``; written as zeros) and ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``.
  Set ``train.init_checkpoint`` to the file; no ``matching_heuristics`` needed (``checkpoint/
  detection_checkpoint.py:99-111``). ViTDet's ``attn.rel_pos_h/w`` are zero-initialised there and not written.
``mmseg_mae``: mmsegmentation's ``MAE`` backbone (BEiT layers; open-mmlab/mmsegmentation ``mmseg/models/
  backbones/mae.py``, ``beit.py``; the config ``configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py``):
  ``patch_embed.projection``, ``cls_token``, ``pos_embed [1, 1 + N, D]`` (resized by the backbone's
  ``resize_abs_pos_embed`` when the crop differs), ``layers.{i}.{ln1, attn.qkv, attn.proj, ln2, ffn.layers.0.0,
  ffn.layers.1}`` (the renaming of ``tools/model_converters/beit2mmseg.py``) and ``layers.{i}.gamma_{1,2}`` as
  ones (layer scale 1: the same function whatever ``init_values`` the config sets). The backbone's own
  ``init_weights`` reads these keys unprefixed (``pretrained=FILE``); ``--prefix backbone.`` writes them as
  ``beit2mmseg.py`` does, for ``load_from``.

Our class token is folded (``cls_token + pos[:, 0]``, docs/checkpoints.md), so ``cls_token`` carries its
position and ``pos_embed[:, 0]`` is zero. The final ``norm`` and the classifier are left out: neither backbone
has them (mmseg's ``final_norm`` is off in the MAE config). ::

    python -m pathway.train.official.dense_export runs/paper/imagenet_mae_point/model.safetensors --layout vitdet \\
        --out m2pt_point_vitdet.pth
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .layouts import CheckpointError

__all__ = ["DENSE_LAYOUTS", "DenseExport", "to_dense", "export_dense"]

BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
MMSEG_PARTS = {"norm1": "ln1", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "norm2": "ln2",
               "mlp.fc1": "ffn.layers.0.0", "mlp.fc2": "ffn.layers.1"}
DENSE_LAYOUTS = ("vitdet", "mmseg_mae")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_LEFT_OUT = {"norm.": "the final norm: neither backbone has one", "head.": "the classifier",
             "cls_pos": "Point-MAE's class position (not an image backbone)"}


@dataclass
class DenseExport:
    """What was written: the key map's result, the tensors left out (and why), the grid and width."""

    state: dict[str, Tensor]
    left_out: dict[str, str] = field(default_factory=dict)
    grid: tuple[int, int] = (0, 0)
    patch: int = 0
    dim: int = 0
    depth: int = 0


def _body(state: Mapping[str, Tensor]) -> DenseExport:
    """Check ``state`` is a folded image ViT in TransformerModel keys; sort its tensors into what the backbones
    take and what they do not."""
    if any(".parametrizations." in k for k in state):
        raise CheckpointError("the weights still carry pathway parametrizations (aux weights, lambda): export a "
                              "folded model, a run's model.safetensors or the output of `pathway fold`")
    proj = state.get("tokenizer.proj.weight")
    pos = state.get("tokenizer.pos_embed")
    if proj is None or proj.ndim != 4 or pos is None or pos.ndim != 3:
        raise CheckpointError("not an image ViT in TransformerModel keys: expected tokenizer.proj.weight [D, C, p, p] "
                              "and tokenizer.pos_embed [1, N, D] (a run of the image adapter's model.safetensors)")
    side = math.isqrt(pos.shape[1])
    if side * side != pos.shape[1]:
        raise CheckpointError(f"tokenizer.pos_embed has {pos.shape[1]} positions, not a square grid: both backbones "
                              f"take a square pretraining grid")
    out = DenseExport({}, grid=(side, side), patch=proj.shape[-1], dim=proj.shape[0])
    depth = 0
    for key in state:
        m = _BLOCK_KEY.match(key)
        if m and m.group(2) in BLOCK_PARTS:
            depth = max(depth, int(m.group(1)) + 1)
        elif not (key.startswith("tokenizer.") or key == "cls_token"):
            reason = next((why for prefix, why in _LEFT_OUT.items() if key.startswith(prefix)), None)
            if reason is None:
                raise CheckpointError(f"{key}: no counterpart in the dense backbones and not a known leave-out; a "
                                      f"block with more than {BLOCK_PARTS} (layer scale, register tokens) is not a "
                                      f"plain ViT")
            out.left_out[key] = reason
    missing = [f"blocks.{i}.{part}.{kind}" for i in range(depth) for part in BLOCK_PARTS for kind in ("weight", "bias")
               if f"blocks.{i}.{part}.{kind}" not in state]
    if not depth or missing:
        raise CheckpointError(f"the blocks are incomplete: missing {missing[:4] or 'every block'} (the dense backbones "
                              f"need qkv with its bias, proj, both norms and both MLP layers in every block)")
    out.depth = depth
    return out


def _positions_with_class_row(state: Mapping[str, Tensor]) -> Tensor:
    """``[1, 1 + N, D]``: a zero row for the class position (folded into ``cls_token``), then ours."""
    pos = state["tokenizer.pos_embed"]
    return torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)


def to_dense(state: Mapping[str, Tensor], layout: str, prefix: str | None = None) -> DenseExport:
    """``state`` (TransformerModel keys) -> ``layout``'s backbone keys, under ``prefix`` (the layout's default:
    ``backbone.net.`` for vitdet, none for mmseg_mae)."""
    if layout not in DENSE_LAYOUTS:
        raise CheckpointError(f"dense layout {layout!r} is not one of {DENSE_LAYOUTS}")
    out = _body(state)
    put = out.state
    if layout == "vitdet":
        prefix = "backbone.net." if prefix is None else prefix
        put[f"{prefix}patch_embed.proj.weight"] = state["tokenizer.proj.weight"]
        put[f"{prefix}patch_embed.proj.bias"] = state["tokenizer.proj.bias"]
        put[f"{prefix}pos_embed"] = _positions_with_class_row(state)
        if "cls_token" in state:
            out.left_out["cls_token"] = "ViTDet's ViT has no class token"
        names = {part: part for part in BLOCK_PARTS}
    else:
        prefix = prefix or ""
        put[f"{prefix}patch_embed.projection.weight"] = state["tokenizer.proj.weight"]
        put[f"{prefix}patch_embed.projection.bias"] = state["tokenizer.proj.bias"]
        put[f"{prefix}pos_embed"] = _positions_with_class_row(state)
        # no class token in our model: a zero one (mmseg's MAE always prepends one; the heads never read it)
        put[f"{prefix}cls_token"] = state.get("cls_token", torch.zeros(1, 1, out.dim))
        names = MMSEG_PARTS
    block_root = "blocks." if layout == "vitdet" else "layers."
    for i in range(out.depth):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                put[f"{prefix}{block_root}{i}.{theirs}.{kind}"] = state[f"blocks.{i}.{ours}.{kind}"]
        if layout == "mmseg_mae":
            for gamma in ("gamma_1", "gamma_2"):
                put[f"{prefix}layers.{i}.{gamma}"] = torch.ones(out.dim)
    out.state = {k: v.detach().clone().contiguous() for k, v in put.items()}
    return out


def read_engine_state(path: Path) -> dict[str, Tensor]:
    """A run's ``model.safetensors`` (or a ``pathway fold`` output) in TransformerModel keys."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found: pass a run's model.safetensors or the output of `pathway fold`")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors file in TransformerModel keys (a run's "
                              f"model.safetensors, or `pathway fold CHECKPOINT OUT.safetensors`)")
    from safetensors.torch import load_file

    return load_file(str(path))


def export_dense(src: str | Path, layout: str, out: str | Path, prefix: str | None = None) -> DenseExport:
    """Write ``src`` (TransformerModel keys) as ``layout``'s backbone file ``out`` (a torch ``.pth``)."""
    result = to_dense(read_engine_state(Path(src)), layout, prefix)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": result.state, "__author__": "pathway"} if layout == "vitdet" else result.state
    torch.save(payload, out)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pathway.train.official.dense_export",
                                     description="write a folded ViT as detectron2 ViTDet's or mmsegmentation MAE's "
                                                 "backbone file")
    parser.add_argument("model", help="a run's model.safetensors (TransformerModel keys, folded)")
    parser.add_argument("--layout", required=True, choices=DENSE_LAYOUTS)
    parser.add_argument("--out", required=True, help="the .pth file to write")
    parser.add_argument("--prefix", default=None, help="key prefix (vitdet: backbone.net.; mmseg_mae: none, or "
                                                       "backbone. for load_from)")
    args = parser.parse_args(argv)
    try:
        result = export_dense(args.model, args.layout, args.out, args.prefix)
    except CheckpointError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    size = result.grid[0] * result.patch
    print(f"wrote {args.out}: {len(result.state)} tensors, depth {result.depth}, width {result.dim}, patch "
          f"{result.patch}, pretraining image size {size} (ViTDet: pretrain_img_size={size}); left out: "
          + (", ".join(f"{k} ({why})" for k, why in result.left_out.items()) or "nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

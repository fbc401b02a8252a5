"""Official checkpoint layouts -> the engine's `TransformerModel` (docs/contracts.md section 4).

The paper's target and auxiliary weights come from five code bases with five key layouts (the mapping of
each, with file references, is in `docs/checkpoints.md`):

    format      file                                     recognised by (sentinel keys)
    mae         MAE `.pth` {"model", "args": Namespace}  `patch_embed.proj.weight` [D, 3, p, p] + decoder keys
                                                         or `args`
    audio_mae   AudioMAE `.pth` (same layout, 1 channel) `patch_embed.proj.weight` [D, 1, p, p]
    video_mae   VideoMAE `.pth`                          `attn.q_bias` or a 5-D `patch_embed.proj.weight`
    point_mae   Point-MAE `.pth` {"base_model"}          `MAE_encoder.*`, `base_model.*`, `blocks.blocks.N`,
                                                         `encoder.first_conv`
    timm        timm ViT (`.safetensors` / `.pth`); also the M2PT model-zoo files (timm `vit_base_patch16_224`)
    hf_vit      Hugging Face ViT / ViTMAE safetensors      `embeddings.patch_embeddings.projection.weight`

Loading follows timm's `checkpoint_filter_fn`: read the file (safetensors, or `torch.load(weights_only=True)`
with `argparse.Namespace` allow-listed, nothing else), unwrap `model` / `base_model` / `module` / `state_dict`,
strip `_orig_mod.` and `module.` prefixes, detect the format, rename through a swaps table, fix the tensors
that differ in kind (cls position folded into `cls_token`, q/k/v fused, VideoMAE `q_bias`/`v_bias` -> one qkv
bias with zeros for k), fit them to the model (position embeddings resampled to the model's grid), then
compare the exact key sets before anything is written: missing, unexpected and mismatched keys are named in
a `CheckpointError` (or returned in a `LoadReport` with `strict=False`). Pretraining-only tensors (MAE
decoders, mask tokens, HF pooler) are dropped and listed in the report, never silently.

Example:
    >>> report = load_checkpoint(model, "mae_pretrain_vit_base.pth")   # format detected: mae
    >>> print(report)                                                   # loaded / dropped / left at init
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pathway.errors import PathwayError

__all__ = [
    "FORMATS",
    "CheckpointError",
    "LoadReport",
    "read_checkpoint",
    "detect_format",
    "load_checkpoint",
    "load_state_dict",
    "TIMM_VIT_KEYS",
    "ENGINE_BODY",
    "engine_to_timm",
    "is_engine_layout",
]

FORMATS = ("mae", "audio_mae", "video_mae", "point_mae", "timm", "hf_vit")

# Containers the official training scripts wrap the weights in, tried in this order.
_WRAPPER_KEYS = ("model", "base_model", "module", "state_dict")
# Prefixes added by DDP / torch.compile / DeepSpeed around a whole model.
_STRIP_PREFIXES = ("_orig_mod.", "module.")

# Tensors only used by a pretraining objective (decoders, mask tokens, poolers): dropped and reported.
_PRETRAIN_ONLY = {
    "mae": ("decoder_", "mask_token"),
    "audio_mae": ("decoder_", "mask_token"),
    "video_mae": ("decoder.", "encoder_to_decoder.", "mask_token"),
    "point_mae": ("MAE_decoder.", "decoder_pos_embed.", "increase_dim.", "mask_token"),
    "timm": (),
    "hf_vit": ("decoder.", "pooler.", "embeddings.mask_token"),
}

# The engine's TransformerModel keys and timm VisionTransformer keys (MAE's and AudioMAE's are timm's), prefix
# for prefix: the one table that loading reads right to left and the timm export (export.py) left to right. A
# key's rest is kept. cls_token and pos_embed also differ in content: loading folds a cls position
# (`_cls_and_pos`). MAE global-pool fine-tunes' `fc_norm.*` is the head's LayerNorm of a `model.fc_norm` model.
TIMM_VIT_KEYS = (
    ("tokenizer.proj.", "patch_embed.proj."),
    ("tokenizer.pos_embed", "pos_embed"),
    ("cls_token", "cls_token"),
    ("blocks.", "blocks."),
    ("norm.", "norm."),
    ("head.fc_norm.", "fc_norm."),  # global-pool fine-tunes (MAE, AudioMAE; VideoMAE's use_mean_pooling)
    ("head.fc.", "head."),
)
ENGINE_BODY = "blocks."  # the repeated blocks: all that an aux model of another modality contributes
_VIT_SWAPS = tuple((theirs, ours) for ours, theirs in TIMM_VIT_KEYS)
_POINT_SWAPS = (
    ("encoder.first_conv.", "tokenizer.first_conv."),
    ("encoder.second_conv.", "tokenizer.second_conv."),
    ("pos_embed.", "tokenizer.pos_embed."),
    ("blocks.blocks.", "blocks."),
    # PointTransformer.cls_head_finetune (Point-MAE models/Point_MAE.py:459-469) is, index for index, the `mlp` of
    # the point adapter's head "pointmae" (adapters/heads.py PointMAEClassificationHead)
    ("cls_head_finetune.", "head.mlp."),
)
_HF_SWAPS = (  # Hugging Face ViT, both the file layout (<= 4.x) and the transformers 5 module layout
    ("embeddings.patch_embeddings.projection.", "tokenizer.proj."),
    ("layernorm.", "norm."),
    ("classifier.", "head."),
)
_HF_BLOCK_SWAPS = (
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("attention.output.dense.", "attn.proj."),
    ("attention.o_proj.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
)
_HF_QKV = {  # per-block q/k/v names of the two HF layouts -> slot in the fused timm qkv
    "attention.attention.query.": 0, "attention.attention.key.": 1, "attention.attention.value.": 2,
    "attention.q_proj.": 0, "attention.k_proj.": 1, "attention.v_proj.": 2,
}

# Keys the engine may lack in a checkpoint without it being an error: a new task head is expected.
DEFAULT_ALLOW_MISSING = ("head.",)


class CheckpointError(PathwayError):
    """A checkpoint cannot be read, recognised or fitted to the model; the message names the keys."""


@dataclass
class LoadReport:
    """What `load_checkpoint` did, key by key (engine names unless said otherwise).

    Attributes:
        format: the layout used (detected or given).
        source: file path, or "<state_dict>".
        loaded: engine keys written from the checkpoint.
        missing: engine keys the checkpoint does not provide and that are not allowed to be missing.
        left_at_init: engine keys not in the checkpoint but allowed (new head, cls token of a cls-less format).
        unexpected: engine-name -> source-name of checkpoint tensors the model has no place for.
        mismatched: engine key -> (checkpoint shape, model shape).
        dropped: source key -> reason, for pretraining-only tensors discarded on purpose.
        notes: conversions applied (cls position folded, q/k/v fused, pos-embed resampled, zero-filled biases).
        args: the `argparse.Namespace` stored in the file, as a dict, when there is one.
    """

    format: str
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    left_at_init: list[str] = field(default_factory=list)
    unexpected: dict[str, str] = field(default_factory=dict)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    args: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> str:
        lines = []
        if self.missing:
            lines.append(f"  missing from the checkpoint ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            items = [k if k == s else f"{s} (-> {k})" for k, s in self.unexpected.items()]
            lines.append(f"  unexpected in the checkpoint ({len(items)}): {', '.join(items)}")
        if self.mismatched:
            items = [f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, (a, b) in self.mismatched.items()]
            lines.append(f"  shape mismatch ({len(items)}): {'; '.join(items)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        lines = [f"LoadReport(format={self.format}, source={self.source}): {len(self.loaded)} tensors loaded"]
        if self.left_at_init:
            lines.append(f"  left at init ({len(self.left_at_init)}): {', '.join(self.left_at_init)}")
        if self.dropped:
            reasons: dict[str, list[str]] = {}
            for key, why in self.dropped.items():
                reasons.setdefault(why, []).append(key)
            for why, keys in reasons.items():
                lines.append(f"  dropped ({why}): {len(keys)} tensors, e.g. {', '.join(keys[:3])}")
        lines.extend(f"  note: {n}" for n in self.notes)
        if not self.ok:
            lines.append(self.problems())
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Reading


def load_error(err: Exception) -> str:
    """What ``torch.load(weights_only=True)`` found wrong in a file, without torch's advice to load it with
    ``weights_only=False`` (which runs any code the file holds)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    elif text.startswith("Weights only load failed"):
        text = "it pickles objects beyond tensors and plain containers"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first.split('. Please')[0][:200]}"  # not torch's advice to allow the class


def _torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)` with exactly one extra class allowed: MAE-family `args` Namespaces."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError (a RuntimeError subclass varies by version)

        if "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path}: the file pickles Python objects beyond tensors and argparse.Namespace, and pathway does "
                f"not unpickle freely. Re-save its state dict (torch.save(ckpt['model'], ...)) or convert it to "
                f"safetensors.\nTorch said: {load_error(err)}"
            ) from err
        raise CheckpointError(f"{path}: cannot read it as a torch checkpoint (corrupt, truncated or not a "
                              f"checkpoint): {load_error(err)}") from err


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Read a checkpoint file into a flat `{name: tensor}` dict (wrappers unwrapped, prefixes stripped).

    Returns:
        The state dict and the stored `args` Namespace as a dict (None when absent).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError, or OSError
            raise CheckpointError(f"{path}: cannot read it as safetensors (corrupt or truncated): {err}") from err
        return _strip_prefixes(tensors), None
    return _unwrap(_torch_load(path), str(path))


def _unwrap(obj: Any, where: str) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    args = None
    if isinstance(obj, Mapping):
        ns = obj.get("args")
        if isinstance(ns, argparse.Namespace):
            args = dict(vars(ns))
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        top = sorted(obj.keys())[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{where}: no state dict found (looked for a dict of tensors at the top or under "
            f"{', '.join(repr(k) for k in _WRAPPER_KEYS)}); top level has: {top}"
        )
    return _strip_prefixes(dict(obj)), args


def _strip_prefixes(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# Detection


def detect_format(sd: Mapping[str, Tensor], args: Mapping[str, Any] | None = None) -> str:
    """Name the layout of a (prefix-stripped) state dict from sentinel keys; see the module docstring."""
    keys = list(sd)
    if any(k.startswith(("MAE_encoder.", "base_model.", "blocks.blocks.", "encoder.first_conv.")) for k in keys):
        return "point_mae"
    if any("embeddings.patch_embeddings.projection.weight" in k for k in keys):
        return "hf_vit"
    proj_keys = ("patch_embed.proj.weight", "encoder.patch_embed.proj.weight", "backbone.patch_embed.proj.weight")
    proj = next((sd[k] for k in proj_keys if k in sd), None)
    if any(k.endswith(".attn.q_bias") for k in keys) or (proj is not None and proj.ndim == 5):
        return "video_mae"
    if proj is not None and proj.ndim == 4:
        if proj.shape[1] == 1:
            return "audio_mae"
        if args is not None or any(k.startswith(("decoder_", "mask_token")) for k in keys):
            return "mae"
        return "timm"
    raise CheckpointError(
        f"unrecognised checkpoint layout; formats known: {', '.join(FORMATS)}. "
        f"First keys: {', '.join(keys[:10])}. Pass format=... if you know the layout."
    )


# ---------------------------------------------------------------------------------------------------------
# Conversion to engine names


@dataclass
class _Converted:
    tensors: dict[str, Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # engine key -> source key(s)
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    pos_prefix_folded: bool = False

    def put(self, key: str, value: Tensor, source: str) -> None:
        self.tensors[key] = value
        self.origin[key] = source


def _swap(key: str, swaps: Sequence[tuple[str, str]]) -> str | None:
    for old, new in swaps:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def engine_to_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """TransformerModel keys -> timm VisionTransformer keys (``TIMM_VIT_KEYS``); an unmapped key is an error."""
    out = {}
    for key, value in state.items():
        theirs = _swap(key, TIMM_VIT_KEYS)
        if theirs is None:
            raise CheckpointError(f"{key}: no timm VisionTransformer counterpart in TIMM_VIT_KEYS")
        out[theirs] = value
    return out


_ENGINE_KEY = re.compile(r"^(tokenizer\.|blocks\.\d+\.|norm\.|head\.|cls_token$|cls_pos$)")


def is_engine_layout(keys: Sequence[str]) -> bool:
    """Keys of the engine's own TransformerModel (``pathway pretrain``'s encoder, a run's model.safetensors)."""
    return any(k.startswith("tokenizer.") for k in keys) and all(_ENGINE_KEY.match(k) for k in keys)


def _drop_pretrain_only(sd: dict[str, Tensor], fmt: str, out: _Converted) -> dict[str, Tensor]:
    keep = {}
    for key, value in sd.items():
        if key.startswith(_PRETRAIN_ONLY[fmt]):
            out.dropped[key] = "pretraining only (decoder / mask token / pooler)"
        else:
            keep[key] = value
    return keep


def _cls_and_pos(out: _Converted, cls: Tensor | None, pos: Tensor | None, n_prefix: int, src: str) -> None:
    """cls_token + pos[:, :1] is a constant token: fold it; the patch positions become tokenizer.pos_embed."""
    if pos is not None:
        if n_prefix and cls is not None:
            out.put("cls_token", cls + pos[:, :n_prefix], f"cls_token + {src}[:, :1]")
            out.notes.append(f"cls position embedding ({src}[:, 0]) folded into cls_token")
            out.pos_prefix_folded = True
        elif cls is not None:
            out.put("cls_token", cls, "cls_token")
        out.put("tokenizer.pos_embed", pos[:, n_prefix:], f"{src}[:, {n_prefix}:]")
    elif cls is not None:
        out.put("cls_token", cls, "cls_token")


def _convert_vit(sd: dict[str, Tensor], fmt: str, model_n: int | None) -> _Converted:
    out = _Converted()
    sd = _drop_pretrain_only(sd, fmt, out)
    cls, pos = sd.pop("cls_token", None), sd.pop("pos_embed", None)
    n_prefix = 1 if cls is not None else 0
    if fmt == "timm" and cls is not None and pos is not None:
        # timm `no_embed_class` models keep no cls position: the grid alone fills pos_embed
        n = pos.shape[1]
        if n == model_n or (_is_square(n) and not _is_square(n - 1)):
            n_prefix = 0
    _cls_and_pos(out, cls, pos, n_prefix, "pos_embed")
    for key, value in sd.items():
        out.put(_swap(key, _VIT_SWAPS) or key, value, key)
    return out


def _convert_video_mae(sd: dict[str, Tensor]) -> _Converted:
    out = _Converted()
    sd = _drop_pretrain_only(sd, "video_mae", out)
    renamed = {}
    for key, value in sd.items():  # pretraining files nest the encoder; fine-tunes of it may say backbone
        for prefix in ("encoder.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        renamed[key] = value
    if "cls_token" in renamed:
        raise CheckpointError("video_mae: VideoMAE has no cls token, but the checkpoint holds one; pass format=")
    pos = renamed.pop("pos_embed", None)
    if pos is not None:  # use_learnable_pos_emb=True fine-tunes: patch positions only
        out.put("tokenizer.pos_embed", pos, "pos_embed")
    fused = set()
    for key in list(renamed):
        if key.endswith(".attn.q_bias"):
            base = key[: -len("q_bias")]
            q, v = renamed.pop(key), renamed.pop(base + "v_bias")
            out.put(base + "qkv.bias", torch.cat([q, torch.zeros_like(q), v]), f"{base}q_bias + 0 + {base}v_bias")
            fused.add(base)
    if fused:
        out.notes.append(f"q_bias/v_bias fused into attn.qkv.bias with zeros for k ({len(fused)} blocks)")
    for key, value in renamed.items():
        out.put(_swap(key, _VIT_SWAPS) or key, value, key)
    return out


def _convert_point_mae(sd: dict[str, Tensor]) -> _Converted:
    out = _Converted()
    renamed = {}
    for key, value in sd.items():  # as Point-MAE's load_model_from_ckpt: encoder of the pretraining model
        for prefix in ("MAE_encoder.", "base_model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        renamed[key] = value
    renamed = _drop_pretrain_only(renamed, "point_mae", out)
    cls, cls_pos = renamed.pop("cls_token", None), renamed.pop("cls_pos", None)
    if cls is not None and cls_pos is not None:
        out.put("cls_token", cls + cls_pos, "cls_token + cls_pos")
        out.put("cls_pos", cls_pos, "cls_pos")  # a pos_every_block model adds it again before every block
        out.notes.append("cls_pos folded into cls_token")
        out.pos_prefix_folded = True
    elif cls is not None:
        out.put("cls_token", cls, "cls_token")
    elif cls_pos is not None:
        raise CheckpointError("point_mae: checkpoint has cls_pos but no cls_token")
    for key, value in renamed.items():
        out.put(_swap(key, _POINT_SWAPS) or key, value, key)
    return out


def _convert_hf_vit(sd: dict[str, Tensor]) -> _Converted:
    out = _Converted()
    sd = {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in sd.items()}
    sd = _drop_pretrain_only(sd, "hf_vit", out)
    cls = sd.pop("embeddings.cls_token", None)
    pos = sd.pop("embeddings.position_embeddings", None)
    _cls_and_pos(out, cls, pos, 1 if cls is not None else 0, "embeddings.position_embeddings")
    qkv: dict[tuple[str, str], dict[int, tuple[str, Tensor]]] = {}
    block = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.*)$")
    for key, value in sd.items():
        m = block.match(key)
        if m is None:
            out.put(_swap(key, _HF_SWAPS) or key, value, key)
            continue
        idx, rest = m.groups()
        slot = next(((name, s) for name, s in _HF_QKV.items() if rest.startswith(name)), None)
        if slot is not None:
            name, s = slot
            qkv.setdefault((idx, rest[len(name):]), {})[s] = (key, value)
            continue
        new = _swap(rest, _HF_BLOCK_SWAPS)
        out.put(f"blocks.{idx}.{new}" if new else key, value, key)
    for (idx, param), parts in qkv.items():
        if set(parts) != {0, 1, 2}:
            have = ", ".join(k for k, _ in parts.values())
            raise CheckpointError(f"hf_vit: block {idx} {param} has only {have}; query, key and value are all needed")
        out.put(f"blocks.{idx}.attn.qkv.{param}", torch.cat([parts[s][1] for s in range(3)]),
                " + ".join(parts[s][0] for s in range(3)))
    if qkv:
        out.notes.append("query/key/value fused into attn.qkv")
    return out


def _convert(sd: dict[str, Tensor], fmt: str, args: Mapping[str, Any] | None,
             model_n: int | None) -> tuple[str, _Converted]:
    if fmt == "auto":
        fmt = detect_format(sd, args)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; choose one of: auto, {', '.join(FORMATS)}")
    if fmt in ("mae", "audio_mae", "timm"):
        return fmt, _convert_vit(dict(sd), fmt, model_n)
    if fmt == "video_mae":
        return fmt, _convert_video_mae(dict(sd))
    if fmt == "point_mae":
        return fmt, _convert_point_mae(dict(sd))
    return fmt, _convert_hf_vit(dict(sd))


# ---------------------------------------------------------------------------------------------------------
# Position embeddings


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _tokenizer_grid(model: nn.Module) -> tuple[int, ...] | None:
    """The patch grid of the model's tokenizer (patch tokenizers have one; point groups have none)."""
    grid = getattr(getattr(model, "tokenizer", None), "grid", None)
    return tuple(int(g) for g in grid) if grid is not None else None


def _default_grid(n: int, fmt: str, args: Mapping[str, Any] | None, frames: int | None) -> tuple[int, ...] | None:
    if fmt == "audio_mae":  # 128 mel bins / 16 = 8 frequency patches; time x frequency, time first
        return (n // 8, 8) if n % 8 == 0 else None
    if fmt == "video_mae":
        if frames is None and args and args.get("num_frames") and args.get("tubelet_size"):
            frames = int(args["num_frames"]) // int(args["tubelet_size"])
        if frames and n % frames == 0 and _is_square(n // frames):
            side = math.isqrt(n // frames)
            return (frames, side, side)
        return None
    return (math.isqrt(n),) * 2 if _is_square(n) else None


def _resample(pos: Tensor, src: tuple[int, ...], dst: tuple[int, ...]) -> Tensor:
    """[1, prod(src), D] -> [1, prod(dst), D] with the tokenizers' shared rule (bicubic 2-D, trilinear 3-D)."""
    from pathway.tokenizers.pos_embed import resample_pos_embed

    return resample_pos_embed(pos, src, dst)


# ---------------------------------------------------------------------------------------------------------
# Loading into a model


def _model_keys(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The model's state dict and aliases `x.weight` -> `x.parametrizations.weight.original` (connected models)."""
    sd = model.state_dict()
    alias = {}
    for key in sd:
        m = re.match(r"^(.*)parametrizations\.([^.]+)\.original$", key)
        if m:
            alias[m.group(1) + m.group(2)] = key
    return sd, alias


# Official heads -> the adapters' ClassificationHead (adapters/heads.py), a Linear `head.fc` after the model's
# own `norm` (a `model.fc_norm` model's head holds `fc_norm` and `fc`, TIMM_VIT_KEYS renames both).
_HEAD_ALIASES = (("head.", "head.fc."),)


def _place(key: str, model_sd: Mapping[str, Tensor], alias: Mapping[str, str]) -> str | None:
    """The model key a converted tensor goes to: same name, a parametrized original, or a head alias."""
    candidates = [key] + [new + key[len(old):] for old, new in _HEAD_ALIASES if key.startswith(old)]
    for cand in candidates:
        cand = alias.get(cand, cand)
        if cand in model_sd:
            return cand
    return None


def load_state_dict(path: str | Path, format: str = "auto", modality: str = "") -> dict[str, Tensor]:
    """Read an official checkpoint and return its tensors under engine names, without a model.

    Renames, folds the cls position, fuses q/k/v and VideoMAE's q/v biases, drops pretraining-only tensors.
    Fitting to a model (pos-embed resampling, zero qkv bias of Point-MAE, exact key checks) needs the model:
    prefer `load_checkpoint(model, path)`, which does all of it and reports.

    Args:
        path: checkpoint file.
        format: "auto" or one of `FORMATS`.
        modality: the checkpoint's modality ("image", "audio", "video", "point"), named in errors when the
            keys match no known layout; the layout itself is always recognised from the keys.
    """
    sd, args = read_checkpoint(path)
    try:
        _, conv = _convert(sd, format, args, None)
    except CheckpointError as err:
        if modality:
            raise CheckpointError(f"{path} ({modality} checkpoint): {err}") from None
        raise
    return conv.tensors


def load_checkpoint(
    model: nn.Module,
    source: str | Path | Mapping[str, Tensor],
    *,
    format: str = "auto",
    strict: bool = True,
    ignore: Sequence[str] = (),
    allow_missing: Sequence[str] = DEFAULT_ALLOW_MISSING,
    only: str = "",
    source_grid: Sequence[int] | None = None,
    target_grid: Sequence[int] | None = None,
    args: Mapping[str, Any] | None = None,
) -> LoadReport:
    """Load an official checkpoint into an engine model (contracts.md section 4), in place.

    Args:
        model: the engine `TransformerModel` (or any module with its key layout). Compiled models are unwrapped.
        source: a checkpoint file (`.safetensors`, `.pth`/`.pt`) or a state dict.
        format: "auto" (sentinel keys) or one of `FORMATS`.
        strict: raise `CheckpointError` naming every missing, unexpected and mis-shaped key; when False, load
            what fits and return the problems in the report.
        ignore: regexes on *source* keys to drop on purpose (e.g. `["^head\\."]` for a new class count).
        allow_missing: engine-key prefixes that may be absent (default: the task head).
        only: an engine-key prefix: load and require only those tensors (``ENGINE_BODY`` for an aux model,
            whose tokenizer, norm and head are never used); the rest of the file is reported as dropped.
        source_grid: patch grid of the checkpoint's position embedding when it cannot be inferred
            (e.g. `(64, 8)` for AudioMAE 1024 frames x 128 mel bins, `(8, 14, 14)` for VideoMAE).
        target_grid: the model's grid, when its tokenizer exposes none (`grid`).
        args: the file's stored `args` when `source` is a state dict already read with `read_checkpoint`
            (format detection uses them); ignored for a file, whose own `args` are read.

    Returns:
        A `LoadReport`; `strict=True` guarantees `report.ok`.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if isinstance(source, (str, Path)):
        sd, args = read_checkpoint(source)
        where = str(source)
    else:
        sd, where = _strip_prefixes(source), "<state_dict>"
    model_sd, alias = _model_keys(model)
    model_pos = model_sd.get("tokenizer.pos_embed")
    model_n = model_pos.shape[1] if model_pos is not None and model_pos.ndim == 3 else None
    fmt, conv = _convert(sd, format, args, model_n)
    report = LoadReport(format=fmt, source=where, dropped=dict(conv.dropped), notes=list(conv.notes), args=args)

    patterns = [re.compile(p) for p in ignore]
    final: dict[str, Tensor] = {}
    for key, value in conv.tensors.items():
        src = conv.origin[key]
        if any(p.search(src) or p.search(key) for p in patterns):
            report.dropped[src] = "ignored by request"
            continue
        if not key.startswith(only):
            report.dropped[src] = f"outside {only}* (only those are loaded)"
            continue
        target = _place(key, model_sd, alias)
        if target is None and key.startswith("norm.") and "head.fc_norm.weight" in model_sd:
            report.dropped[src] = ("the model pools before its LayerNorm (model.fc_norm, MAE's global pool): the "
                                   "norm after the blocks is not used, as in MAE's fine-tuning (models_vit.py)")
            continue
        if target is None and key == "cls_pos":
            report.dropped[src] = "folded into cls_token (the model adds positions once, model.pos_every_block false)"
            continue
        if target is None and key == "cls_token":
            report.dropped["cls_token"] = f"the model has no cls token (global pooling); was {src}"
            report.notes = [n for n in report.notes if "folded into cls_token" not in n]
            continue
        if target is None:
            report.unexpected[key] = src
            continue
        want = model_sd[target]
        value = _fit(key, value, want, fmt, args, model, source_grid, target_grid, report)
        if value is None:
            continue
        final[target] = value.to(want.dtype)

    # tensors a checkpoint may legitimately not carry, filled with their exact equivalent
    for key, want in model_sd.items():
        if key in final:
            continue
        m = re.match(r"^(blocks\.\d+\.attn\.qkv\.)bias$", key)
        qkv_weight = None if m is None else alias.get(m.group(1) + "weight", m.group(1) + "weight")
        if qkv_weight is not None and qkv_weight in final:
            final[key] = torch.zeros_like(want)
            report.notes.append(f"{key}: checkpoint has no qkv bias (qkv_bias=False): zero-filled, same function")
        elif (key == "tokenizer.pos_embed" and fmt == "video_mae" and want.ndim == 3
              and not any(p.search(key) for p in patterns)):
            from pathway.tokenizers.pos_embed import sinusoid_table

            final[key] = sinusoid_table(want.shape[1], want.shape[2]).to(want.dtype)
            report.notes.append("tokenizer.pos_embed: VideoMAE stores no position table; filled with its fixed "
                                "1-D sin-cos table (get_sinusoid_encoding_table)")

    parametrization_internal = re.compile(r"\.parametrizations\.[^.]+\.\d+\.")
    allowed = tuple(allow_missing) + (("cls_token", "cls_pos") if fmt in ("video_mae", "point_mae") else ())
    for key in model_sd:
        if key in final or key in report.mismatched or parametrization_internal.search(key) or not key.startswith(only):
            continue
        (report.left_at_init if key.startswith(allowed) else report.missing).append(key)
    if not conv.pos_prefix_folded and "cls_token" in final and "tokenizer.pos_embed" in final:
        report.notes.append("cls_token loaded as is (the checkpoint keeps no cls position)")

    if strict and not report.ok:
        hint = ""
        if fmt == "point_mae" and any(k.startswith("head.mlp.") for k in report.unexpected):
            hint = ("The file's classifier is Point-MAE's fine-tuning MLP cls_head_finetune: build the model with the "
                    "point adapter's head 'pointmae' (data.options.head: pointmae, with model.cls_token: true) to "
                    "load it, or pass ignore=[r'^cls_head_finetune\\.'] to leave it out.\n")
        raise CheckpointError(
            f"checkpoint {where} (format {fmt}) does not fit {type(model).__name__}:\n{report.problems()}\n{hint}"
            f"Pass ignore=[regex, ...] to drop checkpoint keys on purpose, allow_missing=[prefix, ...] for model "
            f"keys to leave at init, or strict=False to load what fits and get this as a report."
        )
    result = model.load_state_dict(final, strict=False)
    if result.unexpected_keys:  # cannot happen: final only holds model keys
        raise CheckpointError(f"internal: unexpected keys after fitting: {result.unexpected_keys}")
    report.loaded = sorted(final)
    return report


def _fit(
    key: str, value: Tensor, want: Tensor, fmt: str, args: Mapping[str, Any] | None, model: nn.Module,
    source_grid: Sequence[int] | None, target_grid: Sequence[int] | None, report: LoadReport,
) -> Tensor | None:
    """Make one tensor the model's shape (resample a pos-embed, 1x1 conv <-> linear) or record the mismatch."""
    if value.shape == want.shape:
        return value
    if key == "tokenizer.pos_embed" and value.ndim == 3 and want.ndim == 3 and value.shape[-1] == want.shape[-1]:
        frames = None
        dst = tuple(target_grid) if target_grid else _tokenizer_grid(model)
        if dst is not None and len(dst) == 3:
            frames = dst[0]
        src = tuple(source_grid) if source_grid else _default_grid(value.shape[1], fmt, args, frames)
        if dst is None:
            dst = _default_grid(want.shape[1], fmt, args, frames if fmt == "video_mae" else None)
            if dst is None and src is not None and len(src) == 3 and want.shape[1] % src[0] == 0:
                dst = _default_grid(want.shape[1], fmt, args, src[0])
        if src is None or dst is None or math.prod(src) != value.shape[1] or math.prod(dst) != want.shape[1]:
            report.mismatched[key] = (tuple(value.shape), tuple(want.shape))
            report.notes.append(f"{key}: cannot infer the grids ({value.shape[1]} -> {want.shape[1]} tokens); "
                                f"pass source_grid= / target_grid=")
            return None
        report.notes.append(f"{key}: resampled grid {src} -> {dst}")
        return _resample(value, src, dst)
    if value.numel() == want.numel() and value.squeeze().shape == want.squeeze().shape and value.ndim != want.ndim:
        report.notes.append(f"{key}: reshaped {tuple(value.shape)} -> {tuple(want.shape)} (1x1 conv <-> linear)")
        return value.reshape(want.shape)
    report.mismatched[key] = (tuple(value.shape), tuple(want.shape))
    return None

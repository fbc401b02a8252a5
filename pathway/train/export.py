"""Saving the folded model: our own keys always, and the target library's own keys where one exists.

After ``pathway.fold`` the model is the plain target architecture. ``model.safetensors`` holds it in
TransformerModel keys (loadable by ``model.load_state_dict(strict=True)`` and as a ``pathway``
checkpoint). For the image adapter the same weights are also written in timm ``VisionTransformer``
keys (``model_timm.safetensors``) with the exact ``timm.create_model`` arguments beside them
(``model_timm.json``), so the result is usable without this library::

    model = timm.create_model("vit_base_patch16_224", pretrained=False, **json.load(open("model_timm.json"))["kwargs"])
    model.load_state_dict(safetensors.torch.load_file("model_timm.safetensors"), strict=True)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pathway.errors import PathwayError

from .official.layouts import engine_to_timm

__all__ = ["NonFiniteWeightsError", "timm_vit_kwargs", "provenance_metadata", "save_folded"]


class NonFiniteWeightsError(PathwayError):
    """The weights to export hold NaN or inf: nothing is written."""


def timm_vit_kwargs(model: nn.Module, adapter: Any) -> dict[str, Any]:
    """``timm.create_model`` kwargs that rebuild ``model`` (image adapter) as a VisionTransformer.

    Our body is ``norm`` after the blocks, then the head mean-pools the patch tokens (timm's
    ``global_pool="avg"`` with ``fc_norm=False``) or reads the class token (``global_pool="token"``);
    our class token carries no position of its own (``no_embed_class=True``).
    """
    o = adapter.options
    cls = model.cls_token is not None
    fc_norm = isinstance(model.norm, nn.Identity)  # model.fc_norm: pooled, then normalised (MAE's global pool)
    return dict(
        img_size=o["img_size"], patch_size=o["patch_size"], in_chans=o["in_chans"], num_classes=adapter.num_classes,
        embed_dim=model.embed_dim, depth=model.depth, num_heads=model.num_heads, mlp_ratio=model.mlp_ratio,
        global_pool="token" if cls and not fc_norm else "avg", fc_norm=fc_norm, class_token=cls, no_embed_class=True,
        pos_embed=o.get("pos_embed", "learn"),
    )


def provenance_metadata(model: nn.Module, recipe: Any) -> dict[str, str]:
    """The provenance record of a connected ``model`` (read before it is folded: the pairs and lambdas), its
    recipe and its aux checkpoint, as safetensors metadata: ``pathway inspect`` prints it from the folded file,
    a reader that ignores metadata still gets the plain model."""
    from pathway import provenance

    record = provenance.capture(model, recipe=recipe.to_dict())
    record["aux"] = [aux_checkpoint_identity(recipe.aux)] if recipe.aux.checkpoint else []
    return provenance.metadata(record)


def aux_checkpoint_identity(aux: Any) -> dict[str, Any]:
    """The recipe's aux checkpoint (``aux`` is its ``AuxConfig``) as the provenance records it: the path, the
    format, the architecture the engine built for it, and the sha256 of the file (of each file of a Hugging Face
    directory). A file no longer there (a checkpoint folded elsewhere) is recorded by its path alone; each pair
    still carries the sha256 of the aux tensor it held."""
    from pathway.provenance import sha256_file

    path = Path(aux.checkpoint)
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path] if path.is_file() else []
    if aux.checkpoint_format == "transformers":
        config = path / "config.json"
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        architecture = {"class": "transformers.AutoModel", **({"model_type": model_type} if model_type else {})}
    else:
        architecture = {"class": "pathway.train.model.TransformerModel"}
    return {"architecture": architecture, "path": str(path), "format": aux.checkpoint_format,
            "files": {f.name: sha256_file(f) for f in files}}


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_folded(model: nn.Module, adapter: Any, run_dir: Path, log: Callable[[str], None] = print,
                metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write the (folded) model; for images also in timm keys, checked by loading it into timm. Weights holding
    NaN or inf are refused (:class:`NonFiniteWeightsError`), not exported. ``metadata`` (the provenance record,
    :func:`provenance_metadata`) goes into every file written."""
    from safetensors.torch import save_file

    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise NonFiniteWeightsError(f"{len(bad)} of {len(model.state_dict())} tensors hold NaN or inf (e.g. "
                                    f"{', '.join(bad[:3])}); no model file was written. The training diverged: lower "
                                    f"the lr (optim.blr / optim.lr) or set optim.clip_grad")
    out: dict[str, Any] = {}
    path = run_dir / "model.safetensors"
    extra = metadata or {}
    save_file(_contiguous(model.state_dict()), str(path),
              metadata={**extra, "format": "pathway", "layout": "TransformerModel"})
    out["model"] = str(path)
    log(f"saved folded model: {path}")
    if getattr(adapter, "name", "") != "image":
        return out
    beyond_linear = [k for k in model.state_dict()
                     if k.startswith("head.") and not k.startswith(("head.fc.", "head.fc_norm."))]
    if beyond_linear:  # e.g. the linear-probe head's BatchNorm: timm's VisionTransformer head is one Linear
        log(f"no timm export: timm's VisionTransformer head is a single Linear, this head also has "
            f"{', '.join(beyond_linear[:3])}; model.safetensors holds the model")
        return out
    kwargs = timm_vit_kwargs(model, adapter)
    timm_path = run_dir / "model_timm.safetensors"
    save_file(_contiguous(engine_to_timm(model.state_dict())), str(timm_path), metadata={**extra, "format": "timm"})
    (run_dir / "model_timm.json").write_text(json.dumps({"model": "vit_base_patch16_224", "kwargs": kwargs}, indent=2))
    out["timm_model"] = str(timm_path)
    out["timm_max_abs_diff"] = check_timm_export(model, timm_path, kwargs)
    log(f"saved timm VisionTransformer weights: {timm_path} (strict load ok, max |timm - ours| "
        f"{out['timm_max_abs_diff']:.3g})")
    return out


@torch.no_grad()
def check_timm_export(model: nn.Module, path: Path, kwargs: dict[str, Any]) -> float:
    """Load the export into a fresh timm model with ``strict=True`` and compare outputs on a random batch."""
    import timm
    from safetensors.torch import load_file

    vit = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)
    vit.load_state_dict(load_file(str(path)), strict=True)
    vit.eval()
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.randn(2, kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"],
                    generator=torch.Generator().manual_seed(0))
    diff = (vit(x).float() - model(x.to(device)).float().cpu()).abs().max().item()
    model.train(was)
    return diff

"""Saving and loading connected models without the aux model object.

``save`` writes the connected ``state_dict`` as safetensors (tied tensors stored once) with the
pairing in the file's metadata; ``load`` re-creates the pathways on a plain target from that
metadata and loads every tensor, so a run can be resumed or folded later.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .errors import NotConnectedError, PathwayError
from .inject import is_connected
from .layer import PathwayWeight
from .modules import owners, pathway_sites

FORMAT_VERSION = 1


def _spec(model: nn.Module) -> list[dict]:
    sites, seen = [], set()
    for name, module, tensor_name, pathways in pathway_sites(model):
        if id(pathways[0]) in seen:
            continue
        seen.add(id(pathways[0]))
        sites.append({"weight": name, "pathways": [{
            "aux_shape": list(p.aux_weight.shape), "scale_shape": list(p.scale.shape),
            "train_aux": p.aux_weight.requires_grad, "train_lambda": p.scale.requires_grad,
            "source": p.source, "transform": p.transform, "target_requires_grad": p.target_requires_grad,
            "target_frozen": not module.parametrizations[tensor_name].original.requires_grad,
        } for p in pathways]})
    return sites


def save(model: nn.Module, path: str | Path) -> None:
    """Write a connected model (weights, aux weights, lambdas, pairing) to a safetensors file."""
    model = getattr(model, "_orig_mod", model)   # torch.compile wrapper: store the user's own keys
    if not is_connected(model):
        raise NotConnectedError(f"{type(model).__name__} is not connected; save a plain model with "
                                f"safetensors.torch.save_model instead")
    from safetensors.torch import save_model  # imported here: ``import pathway`` loads torch alone

    metadata = {"pathway": json.dumps({"version": FORMAT_VERSION, "sites": _spec(model)})}
    save_model(model, str(path), metadata=metadata)


def load(target: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Re-create the pathways stored in ``path`` on the plain ``target`` and load every tensor."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if "pathway" not in metadata:
        raise PathwayError(f"{path} holds no pathway metadata; it was not written by pathway.save")
    spec = json.loads(metadata["pathway"])
    if spec.get("version") != FORMAT_VERSION:
        raise PathwayError(f"{path} uses pathway format {spec.get('version')}; this version reads {FORMAT_VERSION}")
    if is_connected(target):
        raise PathwayError("load() rebuilds the pathways itself: pass the plain target model, as before connect")
    for site in spec["sites"]:
        try:
            sites = owners(target, site["weight"])
        except KeyError as e:
            raise PathwayError(f"{path} has a pathway on '{site['weight']}', which {type(target).__name__} lacks: "
                               f"load into the same architecture it was saved from") from e
        module, tensor_name = sites[0]
        weight = getattr(module, tensor_name)
        for p in site["pathways"]:
            if list(weight.shape) != p["aux_shape"]:
                raise PathwayError(f"'{site['weight']}' is {list(weight.shape)} here but {p['aux_shape']} in {path}")
            pathway = PathwayWeight(torch.zeros(p["aux_shape"], dtype=weight.dtype, device=weight.device),
                                    tuple(p["scale_shape"]), 0.0, p["train_aux"], p["train_lambda"], p["source"],
                                    p["transform"], p["target_requires_grad"])
            for owner, name in sites:
                parametrize.register_parametrization(owner, name, pathway)
        module.parametrizations[tensor_name].original.requires_grad_(not site["pathways"][-1]["target_frozen"])
    load_model(target, str(path), strict=strict)
    return target

"""What made a model file: the record a folded or saved ``.safetensors`` carries in its metadata.

A folded model is a plain model; nothing in its tensors says which aux, which pairs or which lambdas
went into it. :func:`capture` reads that from the connected model *before* ``fold`` (afterwards the
pathways are gone): the pathway version, the target and aux identity (architecture, files and the
sha256 of each aux file, or of each aux tensor as the pathway holds it), every pair with its
transform, each lambda, the recipe if one is given, and the date. :func:`metadata` turns the record
into the one metadata entry safetensors allows (strings only), which readers that ignore metadata
never see, so the file still loads as the plain model. ``pathway inspect FILE`` prints it
(:func:`read` and :func:`describe`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import NotConnectedError, PathwayError
from .modules import pathway_sites
from .version import __version__

KEY = "pathway_provenance"
_CHUNK = 1 << 22


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a whole file, read in 4 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tensor(tensor: torch.Tensor) -> str:
    """The sha256 of a tensor's dtype, shape and values (so bf16 and fp32 copies, or a transpose, differ)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    header = f"{tensor.dtype} {tuple(tensor.shape)}".encode()
    return hashlib.sha256(header + data.numpy().tobytes()).hexdigest()


def model_identity(model: nn.Module) -> dict[str, Any]:
    """The class, and the library's own name where the model carries one (timm, Hugging Face)."""
    from torch.nn.utils import parametrize

    model = getattr(model, "_orig_mod", model)
    kind = parametrize.type_before_parametrizations(model)
    out: dict[str, Any] = {"class": f"{kind.__module__}.{kind.__qualname__}"}
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        out["timm"] = cfg["architecture"]
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None):
        out["model_type"] = config.model_type
        if getattr(config, "_name_or_path", ""):
            out["name_or_path"] = config._name_or_path
    return out


def aux_identity(aux: Any) -> dict[str, Any]:
    """An aux as given to ``connect``: a model, a path or an :class:`~pathway.source.AuxSource`.

    Files are hashed whole (the file the run read from, whatever part of it was read).
    """
    if isinstance(aux, (str, os.PathLike)):
        from .source import open_aux
        aux = open_aux(aux)
    if isinstance(aux, nn.Module):
        return {"architecture": model_identity(aux)}
    keys = getattr(aux, "keys", None)
    if not isinstance(keys, dict):
        raise PathwayError(f"aux identity: give the aux model, its path or pathway.open_aux(...), not "
                           f"{type(aux).__name__}")
    files = sorted({str(file) for file, _ in keys.values()})
    return {"architecture": model_identity(aux.model), "path": str(aux.path),
            "files": {Path(f).name: sha256_file(f) for f in files}}


def _lambda_value(scale: torch.Tensor) -> float | list[float]:
    values = scale.detach().float().cpu()
    return values.item() if values.dim() == 0 else values.reshape(-1).tolist()


def capture(model: nn.Module, aux: Any | Iterable[Any] | None = None, recipe: Any = None) -> dict[str, Any]:
    """The provenance record of a connected ``model``, read before it is folded.

    Args:
        model: the connected model.
        aux: what was passed to ``connect`` (a model, a path, an ``AuxSource``, or a list of them):
            adds its architecture and the sha256 of its files. Without it each pair still carries
            the sha256 of the aux tensor it holds.
        recipe: the run's recipe (a dict, or anything ``json`` can write through ``str``), if any.

    Raises:
        NotConnectedError: ``model`` carries no pathway (a folded model tells nothing: capture first).
    """
    sites = list(pathway_sites(model))
    if not sites:
        raise NotConnectedError(f"{type(model).__name__} carries no pathway: capture the provenance before "
                                f"pathway.fold(model), while the pairs and lambdas are still there")
    pairs, seen = [], set()
    for name, _, _, pathways in sites:
        if id(pathways[0]) in seen:     # a tied weight: one entry
            continue
        seen.add(id(pathways[0]))
        for index, p in enumerate(pathways):
            pairs.append({"target": name, "pathway": index, "aux": p.source, "transform": p.transform,
                          "lambda": _lambda_value(p.scale), "aux_dtype": str(p.aux_weight.dtype).removeprefix("torch."),
                          "aux_trained": p.aux_weight.requires_grad, "aux_sha256": sha256_tensor(p.aux_weight)})
    auxes = [] if aux is None else list(aux) if isinstance(aux, (list, tuple)) else [aux]

    record: dict[str, Any] = {
        "pathway_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "target": model_identity(model),
        "aux": [aux_identity(a) for a in auxes],
        "pairs": pairs,
    }
    if recipe is not None:
        record["recipe"] = recipe
    return record


def metadata(record: dict[str, Any]) -> dict[str, str]:
    """The record as a safetensors metadata entry (``{KEY: json}``); merge it into the file's metadata."""
    return {KEY: json.dumps(record, default=str, sort_keys=True)}


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance record stored in a ``.safetensors`` file.

    Raises:
        PathwayError: the file is not safetensors, or carries no record (written by a plain
            ``save_file``, or before pathway wrote records).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise PathwayError(f"{path}: not a readable safetensors file ({e})") from e
    if KEY not in meta:
        raise PathwayError(f"{path} carries no pathway provenance (metadata keys: {sorted(meta) or 'none'}): it was "
                           f"written without pathway.provenance (a plain save_file, or an older pathway)")
    return json.loads(meta[KEY])


def describe(record: dict[str, Any]) -> str:
    """The record as text for a terminal (``pathway inspect FILE``)."""
    target = record["target"]
    lines = [f"written by pathway {record['pathway_version']} on {record['date']}",
             f"target  {target.get('timm') or target.get('name_or_path') or target['class']} ({target['class']})"]
    for aux in record["aux"] or [{}]:
        arch = aux.get("architecture", {})
        where = f" from {aux['path']}" if aux.get("path") else ""
        name = arch.get("timm") or arch.get("model_type") or arch.get("class", "not recorded")
        lines.append(f"aux     {name}{where}")
        lines += [f"          {name}  sha256 {digest}" for name, digest in aux.get("files", {}).items()]
    lines.append(f"pairs ({len(record['pairs'])}):")
    width = max((len(p["target"]) for p in record["pairs"]), default=0)
    for p in record["pairs"]:
        lam = p["lambda"]
        shown = f"{lam:+.6g}" if isinstance(lam, float) else f"{len(lam)} channels, mean {sum(lam) / len(lam):+.6g}"
        lines.append(f"  {p['target']:<{width}} <- {p['aux']}  [{p['transform']}]  lambda {shown}  "
                     f"aux sha256 {p['aux_sha256'][:12]}")
    if "recipe" in record:
        lines.append("recipe  " + json.dumps(record["recipe"], default=str, sort_keys=True))
    return "\n".join(lines)

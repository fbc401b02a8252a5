"""Saving and loading connected models without the aux model object.

``save`` writes the connected ``state_dict`` as safetensors (tied tensors stored once) with the
pairing and the provenance record (:mod:`pathway.provenance`) in the file's metadata; ``load``
re-creates the pathways on a plain target from that metadata and loads every tensor, so a run can
be resumed or folded later.

With a frozen aux, ``save(..., aux_reference=AUX)`` leaves the aux tensors out (they are the aux
file's, unchanged) and writes the aux's path and the sha256 of its files instead; ``load`` connects
the target to that aux again (reading only the matched tensors), checks every rebuilt aux tensor
against the sha256 recorded for it, and loads what trained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import provenance
from .errors import NonFiniteError, NotConnectedError, PathwayError
from .inject import is_connected
from .layer import PathwayWeight, attach_pathway
from .modules import owners, pathway_sites

FORMAT_VERSION = 1
_AUX_KEY = ".aux_weight"


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


def _check_folder(path: Path) -> None:
    if not path.parent.is_dir():
        raise PathwayError(f"cannot write {path}: the folder {path.parent} does not exist; create it first "
                           f"(Path('{path.parent}').mkdir(parents=True))")


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    bad = [f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()})" for name, t in state.items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteError(f"{path} not written: {len(bad)} tensor(s) hold NaN or inf: {', '.join(bad[:8])}"
                             f"{' ...' if len(bad) > 8 else ''}. The run diverged (lower the learning rate, check "
                             f"the loss); save a checkpoint from before it")


def _frozen_aux_reference(model: nn.Module, reference: Any) -> dict[str, Any]:
    """The aux reference entry; refuses a trained aux by name (its tensors are no longer the file's)."""
    trained = [name for name, _, _, pathways in pathway_sites(model) if any(p.aux_weight.requires_grad
                                                                                for p in pathways)]
    if trained:
        raise PathwayError(f"aux_reference: the aux weights of {len(trained)} pathway(s) train "
                           f"({', '.join(trained[:3])}{' ...' if len(trained) > 3 else ''}), so they are no "
                           f"longer the aux file's; connect with train_aux=False to save by reference, or save "
                           f"without aux_reference")
    identity = provenance.aux_identity(reference)
    if "files" not in identity:
        raise PathwayError("aux_reference must be the aux's path (a Hugging Face folder or a safetensors file) or "
                           "pathway.open_aux(path), not a model in memory: the file is what load reads again")
    identity["path"] = str(Path(identity["path"]).resolve())
    return identity


def save(model: nn.Module, path: str | Path, *, aux: Any = None, recipe: Any = None,
         aux_reference: str | os.PathLike | Any | None = None) -> None:
    """Write a connected model (weights, aux weights, lambdas, pairing, provenance) to a safetensors file.

    Args:
        aux: what was passed to ``connect`` (recorded in the provenance: architecture, file sha256).
        recipe: the run's recipe, recorded in the provenance.
        aux_reference: the aux's path (or ``open_aux(path)``) when the aux is frozen: the aux tensors
            are left out of the file and read again from there by :func:`load`.

    Raises:
        NotConnectedError: ``model`` is plain. PathwayError: the folder of ``path`` does not exist,
        or ``aux_reference`` with a trained aux. NonFiniteError: a tensor holds NaN or inf.
    """
    model = getattr(model, "_orig_mod", model)   # torch.compile wrapper: store the user's own keys
    if not is_connected(model):
        raise NotConnectedError(f"{type(model).__name__} is not connected; save a plain model with "
                                f"safetensors.torch.save_model instead")
    from safetensors.torch import save_file, save_model  # imported here: ``import pathway`` loads torch alone

    path = Path(path)
    _check_folder(path)
    state = model.state_dict()
    _check_finite(state, path)
    spec: dict[str, Any] = {"version": FORMAT_VERSION, "sites": _spec(model)}
    if aux_reference is not None:
        spec["aux_reference"] = _frozen_aux_reference(model, aux_reference)
        aux = aux_reference if aux is None else aux
    metadata = {"pathway": json.dumps(spec), **provenance.metadata(provenance.capture(model, aux, recipe))}
    if aux_reference is None:
        save_model(model, str(path), metadata=metadata)
        return
    kept, stored = {}, set()
    for name, tensor in state.items():     # trained tensors only; tied aliases once; plain effective copies left out
        if name.endswith(_AUX_KEY) or id(tensor) in stored or _is_effective_copy(name, state):
            continue
        stored.add(id(tensor))
        kept[name] = tensor.detach().contiguous()
    save_file(kept, str(path), metadata=metadata)


def _is_effective_copy(name: str, state: dict[str, torch.Tensor]) -> bool:
    owner, _, tensor = name.rpartition(".")
    return f"{owner + '.' if owner else ''}parametrizations.{tensor}.original" in state


def _read_metadata(path: Path) -> tuple[dict[str, str], list[str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise PathwayError(f"{path} does not exist (or is not a file): give the .safetensors file pathway.save wrote")
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}, list(f.keys())
    except (SafetensorError, OSError) as e:
        raise PathwayError(f"{path} is not a safetensors file pathway can read ({e}): give the file "
                           f"pathway.save wrote; a torch.save checkpoint loads with torch.load") from e


def load(target: nn.Module, path: str | Path, strict: bool = True, *, aux_reference: str | os.PathLike | None = None,
         **connect_options: Any) -> nn.Module:
    """Re-create the pathways stored in ``path`` on the plain ``target`` and load every tensor.

    A file saved with ``aux_reference`` connects ``target`` to the recorded aux again (or to
    ``aux_reference`` here, when the aux moved), with ``connect_options`` as given to the first
    ``connect``, and refuses by name when an aux file or a rebuilt aux tensor differs from the record.
    """
    path = Path(path)
    metadata, keys = _read_metadata(path)
    if "pathway" not in metadata:
        connected_keys = [k for k in keys if ".parametrizations." in f".{k}"]
        if connected_keys:
            raise PathwayError(f"{path} holds a connected model's state ({connected_keys[0]}, ...) without pathway's "
                               f"metadata, so the pairing is unknown. Either fold first (pathway.fold(model), then "
                               f"save: a plain model loads it) or connect first (pathway.connect(plain, aux) with the "
                               f"same aux and options, then model.load_state_dict(...)); pathway.save keeps "
                               f"the pairing")
        raise PathwayError(f"{path} holds no pathway metadata; it was not written by pathway.save (a plain model "
                           f"file loads with safetensors.torch.load_model)")
    spec = json.loads(metadata["pathway"])
    if spec.get("version") != FORMAT_VERSION:
        raise PathwayError(f"{path} uses pathway format {spec.get('version')}; this version reads {FORMAT_VERSION}")
    if is_connected(target):
        raise PathwayError("load() rebuilds the pathways itself: pass the plain target model, as before connect")
    if "aux_reference" in spec:
        _connect_from_reference(target, path, spec, metadata, aux_reference, connect_options)
    else:
        if connect_options or aux_reference is not None:
            raise PathwayError(f"{path} holds its aux tensors: load(target, path) takes no aux_reference or "
                               f"connect options ({sorted(connect_options) or 'aux_reference'})")
        _rebuild(target, path, spec)
    from safetensors.torch import load_file, load_model

    if "aux_reference" not in spec:
        load_model(target, str(path), strict=strict)
        return target
    state = load_file(str(path))
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(_AUX_KEY)]
    if strict and (missing or unexpected):
        raise PathwayError(f"{path} does not fit {type(target).__name__}: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}; load into the architecture it was saved from")
    return target


def _rebuild(target: nn.Module, path: Path, spec: dict[str, Any]) -> None:
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
                attach_pathway(owner, name, pathway)
        module.parametrizations[tensor_name].original.requires_grad_(not site["pathways"][-1]["target_frozen"])


def _connect_from_reference(target: nn.Module, path: Path, spec: dict[str, Any], metadata: dict[str, str],
                            override: str | os.PathLike | None, options: dict[str, Any]) -> None:
    """Connect ``target`` to the referenced aux again; every aux file and rebuilt tensor checked by sha256."""
    from .inject import connect
    from .source import open_aux

    reference = spec["aux_reference"]
    where = Path(override) if override is not None else Path(reference["path"])
    if not where.exists():
        raise PathwayError(f"{path} reads its aux from {where}, which does not exist: pass load(..., "
                           f"aux_reference='<where the aux is now>')")
    source = open_aux(where)
    found = provenance.aux_identity(source)["files"]
    for name, digest in reference["files"].items():
        if found.get(name) != digest:
            raise PathwayError(f"{path} was trained on aux file {name} with sha256 {digest[:16]}..., but {where} "
                               f"holds {'no ' + name if name not in found else 'sha256 ' + found[name][:16] + '...'}: "
                               f"give the aux file it was saved with (aux_reference=...)")
    first = spec["sites"][0]["pathways"][0] if spec["sites"] else {}
    options = {"train_aux": False, "train_lambda": first.get("train_lambda", True), **options}
    connect(target, source, **options)
    recorded = {(p["target"], p["pathway"]): p for p in json.loads(metadata[provenance.KEY])["pairs"]}
    rebuilt: dict[tuple[str, int], PathwayWeight] = {}
    for name, _, _, pathways in pathway_sites(target):
        if not any(p is pathways[0] for p in rebuilt.values()):   # a tied weight: once, as capture records it
            rebuilt.update({(name, i): p for i, p in enumerate(pathways)})
    if set(recorded) != set(rebuilt):
        only_file = sorted(f"{n}#{i}" for n, i in set(recorded) - set(rebuilt))
        only_here = sorted(f"{n}#{i}" for n, i in set(rebuilt) - set(recorded))
        raise PathwayError(f"connecting {where} again gives other pathways than {path} holds (only in the file: "
                           f"{only_file[:4]}; only here: {only_here[:4]}): pass load() the connect options the model "
                           f"was connected with (include=, exclude=, depth=, ...)")
    for key, pathway in rebuilt.items():
        if provenance.sha256_tensor(pathway.aux_weight) != recorded[key]["aux_sha256"]:
            raise PathwayError(f"the aux tensor rebuilt for '{key[0]}' from {where} ({pathway.source}, "
                               f"{pathway.transform}) differs from the one {path} was trained with: same aux file, "
                               f"other connect options? pass load() those the model was connected with")
    for site in spec["sites"]:
        module, tensor_name = owners(target, site["weight"])[0]
        module.parametrizations[tensor_name].original.requires_grad_(not site["pathways"][-1]["target_frozen"])

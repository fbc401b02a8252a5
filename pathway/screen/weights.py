"""The weight files a screen's conditions load: the target's initial weights per seed, the placebos, the
aligned donors.

Every file is written inside the screen's own folder, and each says what it is (``perturbation.json`` beside a
Hugging Face placebo; the metadata of a safetensors file), so a file of another kind, seed or source is
rewritten rather than reused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pathway.errors import PathwayError

from .design import PLACEBOS, Candidate

__all__ = ["PERTURBATIONS", "PlaceboError", "perturb", "perturbed_copy", "placebo_checkpoint", "target_init",
           "aligned_checkpoint"]

PERTURBATIONS = tuple(PLACEBOS.values())


class PlaceboError(PathwayError):
    """A placebo cannot be built from a candidate's file."""


def perturb(tensors: dict[str, torch.Tensor], kind: str, seed: int) -> dict[str, torch.Tensor]:
    """Every floating matrix (2+ dims) changed, other tensors as they are.

    ``random``: Gaussian with the tensor's own norm. ``rows``: the matrix's rows in a random order, a permutation
    per matrix (singular values, norm and row norms kept exactly)."""
    if kind not in PERTURBATIONS:
        raise ValueError(f"perturbation {kind!r} is not one of {list(PERTURBATIONS)}")
    g = torch.Generator().manual_seed(seed)
    changed = {}
    for name, t in tensors.items():
        if t.dim() >= 2 and t.is_floating_point():
            if kind == "random":
                r = torch.randn(t.shape, generator=g, dtype=torch.float32)
                t = (r * (t.float().norm() / r.norm())).to(t.dtype)
            else:
                t = t[torch.randperm(t.shape[0], generator=g)]
        changed[name] = t.contiguous()
    return changed


def _stamped(path: Path, stamp: dict[str, Any]) -> bool:
    """Whether the safetensors file at ``path`` was written for exactly ``stamp``."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("pathway_screen") == json.dumps(stamp, sort_keys=True)


def _save(tensors: dict[str, torch.Tensor], path: Path, stamp: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"pathway_screen": json.dumps(stamp, sort_keys=True)})
    return path


def perturbed_copy(source: Path, out: Path, kind: str, seed: int = 1234) -> Path:
    """A copy of a Hugging Face checkpoint folder with every floating matrix perturbed (:func:`perturb`).

    ``out`` is rewritten when it holds another kind, seed or source (``perturbation.json`` says which)."""
    from safetensors.torch import load_file, save_file

    if kind not in PERTURBATIONS:
        raise ValueError(f"perturbation {kind!r} is not one of {list(PERTURBATIONS)}")
    stamp = {"kind": kind, "seed": seed, "source": str(source)}
    if (out / "model.safetensors").exists() and (out / "perturbation.json").exists():
        if json.loads((out / "perturbation.json").read_text()) == stamp:
            return out
    if not (source / "model.safetensors").is_file() or not (source / "config.json").is_file():
        raise PlaceboError(f"{source}: a Hugging Face placebo is built from one model.safetensors beside its "
                           f"config.json; this folder lacks one of them (a sharded checkpoint is not supported)")
    out.mkdir(parents=True, exist_ok=True)
    save_file(perturb(load_file(str(source / "model.safetensors")), kind, seed), str(out / "model.safetensors"))
    (out / "config.json").write_text((source / "config.json").read_text())
    (out / "perturbation.json").write_text(json.dumps(stamp))
    return out


def _body(recipe, adapter, candidate: Candidate) -> torch.nn.Module:
    """The candidate as the engine loads an aux: the aux's sizes, its body from the candidate's file."""
    from pathway.train.model import build_transformer, init_from_checkpoint

    aux = build_transformer(recipe, adapter, aux=True)
    init_from_checkpoint(aux, candidate.path, candidate.format, body_only=True)
    return aux


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The aux model's tensors in the engine's layout (the engine reads the body, ``blocks.*``, of it)."""
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def placebo_checkpoint(recipe, adapter, candidate: Candidate, placebo: str, folder: Path) -> tuple[Path, str]:
    """The placebo's file and format: a perturbed Hugging Face folder for a ``transformers`` candidate, else the
    candidate's body (loaded as the engine loads it, any format it reads) perturbed, in the engine's layout."""
    kind = PLACEBOS[placebo]
    if candidate.format == "transformers":
        return perturbed_copy(candidate.path, folder / f"{candidate.name}~{placebo}", kind), "transformers"
    stamp = {"kind": kind, "seed": 1234, "source": str(candidate.path), "format": candidate.format}
    path = folder / f"{candidate.name}~{placebo}.safetensors"
    if not _stamped(path, stamp):
        _save(perturb(_state(_body(recipe, adapter, candidate)), kind, 1234), path, stamp)
    return path, "pathway"


def target_init(recipe, adapter, seed: int, folder: Path) -> Path:
    """The target's initial weights on ``seed`` (``model.checkpoint`` loaded over the seeded random init, as
    the engine builds it), written once so that every condition of the seed starts from this file."""
    from pathway.train.engine import seed_everything
    from pathway.train.model import build_transformer, init_from_checkpoint

    stamp = {"seed": seed, "checkpoint": recipe.model.checkpoint, "model": str(recipe.model)}
    path = folder / f"target-seed{seed}.safetensors"
    if not _stamped(path, stamp):
        seed_everything(seed)
        model = build_transformer(recipe, adapter)
        if recipe.model.checkpoint:
            init_from_checkpoint(model, recipe.model.checkpoint, recipe.model.checkpoint_format)
        _save({k: v.detach() for k, v in model.state_dict().items()}, path, stamp)
    return path


def aligned_checkpoint(recipe, adapter, candidate: Candidate, target: Path, seed: int,
                       folder: Path) -> tuple[Path, dict[str, Any]]:
    """The candidate's body permuted into the basis of the target's initial weights on ``seed`` (weight
    matching, :func:`pathway.align.align`), in the engine's layout; and the alignment report."""
    from safetensors.torch import load_file

    from pathway.align import align
    from pathway.train.model import build_transformer

    stamp = {"source": str(candidate.path), "format": candidate.format, "target": str(target), "seed": seed}
    path = folder / f"{candidate.name}+align-seed{seed}.safetensors"
    report_path = path.with_suffix(".json")
    if _stamped(path, stamp) and report_path.is_file():
        return path, json.loads(report_path.read_text())
    model = build_transformer(recipe, adapter)
    model.load_state_dict(load_file(str(target)))
    aux = _body(recipe, adapter, candidate)
    report = align(model, aux, "weights", restarts=1).to_dict()  # one climb: restarts cost minutes at 384x6
    _save(_state(aux), path, stamp)
    report_path.write_text(json.dumps(report, indent=1))
    return path, report

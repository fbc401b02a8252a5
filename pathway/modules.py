"""What the module tree tells: user-facing parameter names and the repeated body blocks.

Parametrization renames a weight (``qkv.weight`` -> ``qkv.parametrizations.weight.original``) and
adds pathway tensors beside it; tied weights appear under several names. Everything the user sees
(reports, ``lambdas``, layer decay) speaks of the *plain* names, the ones the model had before
``connect``.

Body blocks are found without name conventions: runs of at least two consecutive children of the
same class whose weights agree by name (one set within the other; shapes may differ), holding at
least two matrices (``blocks.N`` in timm, ``encoder.layer.N`` in Hugging Face,
``encoder.layers.encoder_layer_N`` in torchvision, ``h.N`` in GPT-2, ``layerS.N`` across ResNet
stages, whose ``Sequential`` containers are looked through). The walk stops at the first repeated
level that holds no repeat itself, so q/k/v Linear siblings are never blocks and Swin stages give
way to their blocks.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch.nn as nn
from torch.nn.utils import parametrize

from .layer import PathwayWeight

_PARAMETRIZED = re.compile(r"\.?parametrizations\.([^.]+)\.original$")
_PATHWAY_TENSOR = re.compile(r"\.?parametrizations\.[^.]+\.\d+\.")


def plain_name(raw: str) -> str | None:
    """``a.parametrizations.weight.original`` -> ``a.weight``; pathway's own tensors -> None."""
    if _PATHWAY_TENSOR.search(raw):
        return None
    return _PARAMETRIZED.sub(lambda m: ("." if raw[: m.start()] else "") + m.group(1), raw)


def plain_names(model: nn.Module) -> dict[str, str | None]:
    """Raw parameter name (aliases included) -> plain name of its canonical (first) alias, or None."""
    canonical: dict[int, str | None] = {}
    table: dict[str, str | None] = {}
    for raw, p in model.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(p), plain_name(raw))
        table[raw] = canonical[id(p)]
        name = plain_name(raw)
        if name is not None:
            table.setdefault(name, canonical[id(p)])
    return table


def plain_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every plain name, tied aliases included, -> its parameter; pathway tensors left out."""
    table: dict[str, nn.Parameter] = {}
    for raw, p in model.named_parameters(remove_duplicate=False):
        name = plain_name(raw)
        if name is not None:
            table.setdefault(name, p)
    return table


def named_plain_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The model's own parameters under their plain names, each once, pathway tensors left out."""
    for raw, p in model.named_parameters():
        name = plain_name(raw)
        if name is not None:
            yield name, p


def pathway_sites(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, list[PathwayWeight]]]:
    """Every parametrized tensor carrying pathways: (plain name, owner module, tensor name, pathways)."""
    model = getattr(model, "_orig_mod", model)   # torch.compile wrapper: names as in the user's model
    for path, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, plist in module.parametrizations.items():
            pathways = [p for p in plist if isinstance(p, PathwayWeight)]
            if pathways:
                yield (f"{path}.{tensor_name}" if path else tensor_name), module, tensor_name, pathways


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _members(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """Children, with plain containers opened: a stage's ``Sequential`` does not hide its blocks."""
    for name, child in module.named_children():
        if name == "parametrizations":
            continue
        if type(child) in _CONTAINERS:
            yield from _members(child, f"{prefix}{name}.")
        else:
            yield prefix + name, child


def _structure(module: nn.Module) -> tuple[str, frozenset[str]]:
    kind = parametrize.type_before_parametrizations(module).__name__
    return kind, frozenset(n for n, _ in named_plain_parameters(module))


def _alike(a: tuple[str, frozenset[str]], b: tuple[str, frozenset[str]]) -> bool:
    """Same class, and one's weights are a subset of the other's by name (shapes may differ).

    So a ResNet stage's first block (with its downsample, at new widths) repeats the others, and
    T5's block 0 (with the relative attention bias) repeats blocks 1..n.
    """
    return a[0] == b[0] and (a[1] <= b[1] or b[1] <= a[1])


def _matrices(module: nn.Module) -> int:
    return sum(1 for _, p in named_plain_parameters(module) if p.dim() >= 2)


def find_blocks(model: nn.Module) -> list[str]:
    """Module paths of the repeated body blocks, in registration order.

    A block is one of at least two consecutive alike modules (see :func:`_alike`) holding at least
    two matrices each, and holding no such run itself (a Swin stage holds its blocks, so its
    blocks are the body, not the stages).
    """
    blocks: list[str] = []

    def runs(module: nn.Module, prefix: str) -> list[list[tuple[str, nn.Module]]]:
        members = list(_members(module, prefix))
        found, i = [], 0
        while i < len(members):
            j = i + 1
            while j < len(members) and _alike(_structure(members[j - 1][1]), _structure(members[j][1])):
                j += 1
            found.append(members[i:j])
            i = j
        return found

    def walk(module: nn.Module, prefix: str) -> None:
        for run in runs(module, prefix):
            repeated = len(run) >= 2 and _matrices(run[0][1]) >= 2
            if repeated and not any(len(r) >= 2 and _matrices(r[0][1]) >= 2 for r in runs(run[0][1], "")):
                blocks.extend(path for path, _ in run)
            else:
                for path, child in run:
                    walk(child, f"{path}.")

    walk(model, "")
    return blocks


def block_of(name: str, blocks: list[str]) -> int | None:
    """Index of the block that owns parameter ``name``, or None outside the body."""
    for index, path in enumerate(blocks):
        if name.startswith(path + "."):
            return index
    return None


def owners(model: nn.Module, name: str) -> list[tuple[nn.Module, str]]:
    """Every (module, tensor name) holding the parameter at plain ``name``, tied aliases included."""
    path, _, tensor = name.rpartition(".")
    try:
        module = model.get_submodule(path)
    except AttributeError as e:
        raise KeyError(f"no module '{path}' in {type(model).__name__} for weight '{name}'") from e
    if parametrize.is_parametrized(module, tensor):
        param = module.parametrizations[tensor].original
    else:
        param = getattr(module, tensor, None)
    if not isinstance(param, nn.Parameter):
        raise KeyError(f"'{name}' is not a parameter of {type(model).__name__}")
    found: dict[tuple[int, str], tuple[nn.Module, str]] = {}
    for raw, p in model.named_parameters(remove_duplicate=False):
        alias = plain_name(raw)
        if p is param and alias is not None:
            owner_path, _, owner_tensor = alias.rpartition(".")
            owner = model.get_submodule(owner_path)
            found.setdefault((id(owner), owner_tensor), (owner, owner_tensor))
    return list(found.values())

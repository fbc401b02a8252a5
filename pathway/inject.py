"""``connect``: apply a plan by registering a :class:`PathwayWeight` on every paired weight.

Each pair's aux tensor is built once, here, in the target weight's own layout (transposed,
concatenated, split, regrouped per head or selected from a wider aux as the pair says) and copied,
so the aux model object can be dropped after ``connect``. Tied target weights get one shared
pathway on every alias, so the tie survives.

The aux may also be a path (:func:`pathway.source.open_aux`): the plan is made on its meta-device
model, and each aux tensor is read from disk only when a pair needs it and dropped after its last
use, so the peak is the target plus the built aux tensors plus one aux tensor or so.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .errors import CoverageError
from .layer import PathwayWeight
from .modules import owners, pathway_sites, plain_parameters
from .plan import AuxLike, Options, aux_module, coverage_problem, plan_with
from .report import Pair, Report
from .shapes import Selected, select_report
from .source import AuxSource, open_aux
from .units import apply_layout


def materialise(pair: Pair, aux_params: Mapping[str, torch.Tensor], selected: Selected | None = None) -> torch.Tensor:
    """The aux tensor of ``pair`` in the target weight's storage layout.

    ``selected`` (from :func:`pathway.shapes.select_pairs`) takes the target's shape out of a wider
    aux; per-head interleaved rows are brought to ``[q | k | v]`` before it and back after it.
    """
    names = selected.aux if selected is not None else pair.aux
    transposed = selected.aux_transposed if selected is not None else pair.aux_transposed
    parts = []
    for name, flip in zip(names, transposed):
        tensor = aux_params[name].detach()
        parts.append(tensor.t() if flip and tensor.dim() == 2 else tensor)
    stacked = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    if selected is None:
        tensor = apply_layout(pair, stacked)
    else:
        t_layout, a_layout = pair.layout
        if a_layout:
            stacked = apply_layout(dataclasses.replace(pair, layout=("", a_layout), out_slice=(0, len(stacked))),
                                   stacked)
        tensor = selected.apply(stacked)
        if t_layout:
            tensor = apply_layout(dataclasses.replace(pair, layout=(t_layout, ""), out_slice=(0, len(tensor))), tensor)
    return (tensor.t() if pair.target_transposed else tensor).contiguous()


def _scale_shape(weight: torch.Tensor, pair: Pair, per_channel: bool) -> tuple[int, ...]:
    if not per_channel:
        return ()
    if pair.target_transposed:
        return (1, weight.shape[1])
    return (weight.shape[0],) + (1,) * (weight.dim() - 1)


class _AuxTensors:
    """The aux tensors the pairs read, each fetched once and dropped after the last pair using it."""

    def __init__(self, fetch: Callable[[list[str]], Mapping[str, torch.Tensor]], uses: Counter[str]):
        self.fetch, self.uses, self.held = fetch, uses, {}

    def take(self, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        missing = [n for n in dict.fromkeys(names) if n not in self.held]
        self.held.update(self.fetch(missing) if missing else {})
        return {n: self.held[n] for n in names}

    def release(self, names: tuple[str, ...]) -> None:
        for name in names:
            self.uses[name] -= 1
            if self.uses[name] <= 0:
                self.held.pop(name, None)


def _aux_tensors(aux: nn.Module | AuxSource, reads: list[tuple[str, ...]]) -> _AuxTensors:
    uses = Counter(n for names in reads for n in names)
    if isinstance(aux, AuxSource):
        return _AuxTensors(aux.read, uses)
    params = plain_parameters(getattr(aux, "_orig_mod", aux))
    return _AuxTensors(lambda names: {n: params[n] for n in names}, uses)


def resolve(report: Report, target: nn.Module, aux: nn.Module, opts: Options) -> tuple[Report, dict[str, Selected]]:
    """Under ``on_shape_mismatch='select'``: the report naming each pair's selection, and the selections."""
    if opts.on_shape_mismatch != "select":
        return report, {}
    # plan_with selected already (its report names each selection); selecting again gives the same
    # selections, which inject needs as indices. A plain fc1 takes a gated MLP's gated_mlp ("up" or "gate").
    return select_report(report, target, aux, opts.gated_mlp)


def inject(target: nn.Module, aux: nn.Module | AuxSource, report: Report, opts: Options,
           selected: Mapping[str, Selected] | None = None) -> None:
    """Register the pathways of ``report`` on ``target``; all tensors are built before any change.

    ``aux`` is the aux model, or an :class:`~pathway.source.AuxSource` whose tensors are read as the
    pairs need them; ``selected`` holds the selections of pairs whose shapes differ (:func:`resolve`).
    """
    selected = selected or {}
    model = getattr(target, "_orig_mod", target)
    reads = [selected[p.target].aux if p.target in selected else p.aux for p in report.pairs]
    tensors = _aux_tensors(aux, reads)
    staged = []
    for pair, names in zip(report.pairs, reads):
        sites = owners(model, pair.target)
        module, tensor_name = sites[0]
        weight = getattr(module, tensor_name)
        aux_tensor = materialise(pair, tensors.take(names), selected.get(pair.target))
        aux_tensor = aux_tensor.to(device=weight.device, dtype=weight.dtype)
        tensors.release(names)
        if aux_tensor.shape != weight.shape:   # the plan checked shapes; this guards the layout logic
            raise AssertionError(f"{pair.target}: built aux tensor {list(aux_tensor.shape)} != {list(weight.shape)}")
        init = opts.lambda_init(pair.target, pair.target_block) if callable(opts.lambda_init) else opts.lambda_init
        staged.append(
            (sites, pair, aux_tensor, float(init), _scale_shape(weight, pair, opts.lambda_shape == "channel"))
        )
    staged.reverse()
    while staged:   # popped, so each built tensor is freed once its pathway holds its copy
        sites, pair, aux_tensor, init, scale_shape = staged.pop()
        module, tensor_name = sites[0]
        original = (module.parametrizations[tensor_name].original if parametrize.is_parametrized(module, tensor_name)
                    else getattr(module, tensor_name))
        pathway = PathwayWeight(aux_tensor, scale_shape, init, train_aux=opts.train_aux, train_lambda=opts.train_lambda,
                                source=pair.source, transform=pair.transform,
                                target_requires_grad=_first_requires_grad(module, tensor_name, original))
        for owner, name in sites:
            parametrize.register_parametrization(owner, name, pathway)
        if opts.freeze_target:
            original.requires_grad_(False)


def _first_requires_grad(module: nn.Module, tensor_name: str, original: nn.Parameter) -> bool:
    """requires_grad as the user had it: a second pathway must not record a freeze done by the first."""
    if parametrize.is_parametrized(module, tensor_name):
        earlier = [p for p in module.parametrizations[tensor_name] if isinstance(p, PathwayWeight)]
        if earlier:
            return earlier[0].target_requires_grad
    return original.requires_grad


def connect(target: nn.Module, aux: AuxLike | list[AuxLike], **options: Any) -> Report | list[Report]:
    """Connect ``target`` to ``aux`` in place: every paired weight becomes ``W + lambda * W_aux``.

    Args:
        target: the model to improve; it keeps its class, methods and forward.
        aux: a model trained on another modality, or a list of them (``W + l1*W1 + l2*W2``).
            Connecting again adds another pathway. A path (a Hugging Face model directory) or an
            :class:`~pathway.source.AuxSource` (``open_aux(path, architecture)``) is read lazily:
            only the tensors the pairs use are read from disk.
        **options: see :class:`~pathway.plan.Options` and the README.

    Returns:
        The :class:`~pathway.report.Report` (a list of them when ``aux`` is a list).

    Raises:
        CoverageError: some target body weights found no counterpart and ``allow_partial`` is False.
        Every error of :func:`~pathway.plan.plan`; nothing is changed when anything fails.

    Example:
        >>> import timm, torch, pathway
        >>> target = timm.create_model("vit_tiny_patch16_224", num_classes=10)
        >>> aux = timm.create_model("vit_tiny_patch16_224", num_classes=0)
        >>> report = pathway.connect(target, aux)
        >>> len(pathway.lambdas(target))
        48
    """
    opts = Options.parse(options)
    auxes = [open_aux(a) if isinstance(a, (str, os.PathLike)) else a
             for a in (aux if isinstance(aux, (list, tuple)) else [aux])]
    reports = [plan_with(target, a, opts) for a in auxes]
    for report in reports:
        problem = coverage_problem(report)
        if problem and not opts.allow_partial:
            raise CoverageError(problem)
    resolved = [resolve(report, target, aux_module(a)[0], opts) for a, report in zip(auxes, reports)]
    for a, (report, selected) in zip(auxes, resolved):
        inject(target, a, report, opts, selected)
    reports = [report for report, _ in resolved]
    return reports if isinstance(aux, (list, tuple)) else reports[0]


def lambdas(model: nn.Module) -> dict[str, nn.Parameter]:
    """The live lambda parameters by target weight name (``name#k`` for the k-th of several pathways)."""
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, _, _, pathways in pathway_sites(model):
        for k, pathway in enumerate(pathways):
            if id(pathway.scale) not in seen:
                seen.add(id(pathway.scale))
                found[name if len(pathways) == 1 else f"{name}#{k}"] = pathway.scale
    return found


def is_connected(model: nn.Module) -> bool:
    """Whether ``model`` carries at least one pathway."""
    return any(isinstance(m, PathwayWeight) for m in model.modules())

"""``connect``: apply a plan by registering a :class:`PathwayWeight` on every paired weight.

Each pair's aux tensor is built once, here, in the target weight's own layout (transposed,
concatenated, split, regrouped per head or selected from a wider aux as the pair says) and copied,
so the aux model object can be dropped after ``connect``. Tied target weights get one shared
pathway on every alias, so the tie survives.

The aux may also be a path (:func:`pathway.source.open_aux`): the plan is made on its meta-device
model, and each aux tensor is read from disk only when a pair needs it and dropped after its last
use (under ``on_shape_mismatch="select"`` only the rows the selection keeps: :mod:`pathway.reads`), so
the peak is the target plus the built aux tensors plus one aux tensor or so. Every pathway is built
and checked before the first is attached, for every aux of a list: nothing is half-applied.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .align import align as align_units
from .errors import CoverageError, NonFiniteError, OptionError
from .layer import PathwayWeight, attach_pathway
from .modules import owners, pathway_sites
from .plan import AuxLike, Options, aux_module, coverage_problem, plan_with
from .reads import aux_tensors
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


def resolve(report: Report, target: nn.Module, aux: nn.Module, opts: Options) -> tuple[Report, dict[str, Selected]]:
    """Under ``on_shape_mismatch='select'``: the report naming each pair's selection, and the selections."""
    if opts.on_shape_mismatch != "select":
        return report, {}
    # plan_with selected already (its report names each selection); selecting again gives the same
    # selections, which inject needs as indices. A plain fc1 takes a gated MLP's gated_mlp ("up" or "gate").
    return select_report(report, target, aux, opts.gated_mlp)


@dataclasses.dataclass
class Staged:
    """One pathway ready to attach: built, converted and checked, nothing changed yet."""

    sites: list[tuple[nn.Module, str]]
    pair: Pair
    aux_tensor: torch.Tensor
    lambda_init: float
    scale_shape: tuple[int, ...]


def build(target: nn.Module, aux: nn.Module | AuxSource, report: Report, opts: Options,
          selected: Mapping[str, Selected] | None = None) -> list[Staged]:
    """Every pathway of ``report``, built in the target weights' layout and checked; ``target`` is not changed.

    ``aux`` is the aux model, or an :class:`~pathway.source.AuxSource` whose tensors (or the rows a
    selection keeps) are read as the pairs need them; ``selected`` holds the selections of pairs
    whose shapes differ (:func:`resolve`).

    Raises:
        NonFiniteError: an aux tensor holds NaN or inf (``0 * inf`` is NaN: it would change the
            output even at lambda 0).
        OptionError: ``lambda_init`` gives a value that is not a finite number.
    """
    selected = selected or {}
    model = getattr(target, "_orig_mod", target)
    tensors = aux_tensors(aux, [(p, selected.get(p.target)) for p in report.pairs])
    staged = []
    for pair in report.pairs:
        sites = owners(model, pair.target)
        module, tensor_name = sites[0]
        weight = getattr(module, tensor_name)
        aux_tensor = tensors.build(pair, selected.get(pair.target), materialise)
        aux_tensor = aux_tensor.to(device=weight.device, dtype=weight.dtype)
        if aux_tensor.shape != weight.shape:   # the plan checked shapes; this guards the layout logic
            raise AssertionError(f"{pair.target}: built aux tensor {list(aux_tensor.shape)} != {list(weight.shape)}")
        _check_finite(pair, aux_tensor)
        staged.append(Staged(sites, pair, aux_tensor, _lambda_init(pair, opts),
                             _scale_shape(weight, pair, opts.lambda_shape == "channel")))
    return staged


def _lambda_init(pair: Pair, opts: Options) -> float:
    init = opts.lambda_init(pair.target, pair.target_block) if callable(opts.lambda_init) else opts.lambda_init
    try:
        value = float(init)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise OptionError(f"lambda_init gives {init!r} for '{pair.target}': lambda must start at a finite number "
                          f"(0 starts the connected model exactly as the target)")
    return value


def _check_finite(pair: Pair, aux_tensor: torch.Tensor) -> None:
    bad = ~torch.isfinite(aux_tensor)
    if bad.any():
        nan, count = int(torch.isnan(aux_tensor).sum()), int(bad.sum())
        raise NonFiniteError(f"the aux tensor for '{pair.target}' (from {pair.source}) holds {count} non-finite "
                             f"value(s) ({nan} NaN, {count - nan} inf): 0 * inf is NaN, so even lambda 0 would "
                             f"change the output. Repair or re-export the aux weights {list(pair.aux)}, or leave "
                             f"the weight out: exclude=[{pair.target!r}]")


def attach(staged: list[Staged], opts: Options) -> None:
    """Register the built pathways; ``staged`` is emptied, each built tensor freed once its pathway holds it."""
    staged.reverse()
    while staged:
        item = staged.pop()
        module, tensor_name = item.sites[0]
        original = (module.parametrizations[tensor_name].original if parametrize.is_parametrized(module, tensor_name)
                    else getattr(module, tensor_name))
        pathway = PathwayWeight(item.aux_tensor, item.scale_shape, item.lambda_init, train_aux=opts.train_aux,
                                train_lambda=opts.train_lambda, source=item.pair.source,
                                transform=item.pair.transform,
                                target_requires_grad=_first_requires_grad(module, tensor_name, original))
        for owner, name in item.sites:
            attach_pathway(owner, name, pathway)
        if opts.freeze_target:
            original.requires_grad_(False)


def _first_requires_grad(module: nn.Module, tensor_name: str, original: nn.Parameter) -> bool:
    """requires_grad as the user had it: a second pathway must not record a freeze done by the first."""
    if parametrize.is_parametrized(module, tensor_name):
        earlier = [p for p in module.parametrizations[tensor_name] if isinstance(p, PathwayWeight)]
        if earlier:
            return earlier[0].target_requires_grad
    return original.requires_grad


def _aux_list(aux: AuxLike | list[AuxLike]) -> list[nn.Module | AuxSource]:
    items = list(aux) if isinstance(aux, (list, tuple)) else [aux]
    if not items:
        raise OptionError("aux is an empty list: pass one aux model (or path), or a list of them")
    return [open_aux(a) if isinstance(a, (str, os.PathLike)) else a for a in items]


def connect(target: nn.Module, aux: AuxLike | list[AuxLike], *, align: str | None = None,
            **options: Any) -> Report | list[Report]:
    """Connect ``target`` to ``aux`` in place: every paired weight becomes ``W + lambda * W_aux``.

    Args:
        target: the model to improve; it keeps its class, methods and forward.
        aux: a model trained on another modality, or a list of them (``W + l1*W1 + l2*W2``).
            Connecting again adds another pathway. A path (a Hugging Face model directory) or an
            :class:`~pathway.source.AuxSource` (``open_aux(path, architecture)``) is read lazily:
            only the tensors the pairs use are read from disk. An aux that is itself connected
            gives its effective weights (what it computes).
        align: ``"weights"`` or ``"activations"``: first permute each aux's hidden units into the target's
            order (:func:`pathway.align.align`: the aux module is permuted in place, a symmetry of it);
            ``"activations"`` runs both models on ``target_inputs``. The report's flags say what moved.
        **options: see :class:`~pathway.plan.Options` and the README.

    Returns:
        The :class:`~pathway.report.Report` (a list of them when ``aux`` is a list).

    Raises:
        CoverageError: some target body weights found no counterpart and ``allow_partial`` is False.
        NonFiniteError: an aux tensor holds NaN or inf.
        Every error of :func:`~pathway.plan.plan`. Nothing is changed when anything fails: every aux
        of a list is planned, read and checked before the first pathway is attached.

    Example:
        >>> import timm, torch, pathway
        >>> target = timm.create_model("vit_tiny_patch16_224", num_classes=10)
        >>> aux = timm.create_model("vit_tiny_patch16_224", num_classes=0)
        >>> report = pathway.connect(target, aux)
        >>> len(pathway.lambdas(target))
        48
    """
    opts = Options.parse(options)
    auxes = _aux_list(aux)
    aligned = [align_units(target, a, align, inputs=opts.target_inputs) for a in auxes] if align else []
    reports = [plan_with(target, a, opts) for a in auxes]
    for report, note in zip(reports, aligned):
        report.flags.append(str(note))
    for report in reports:
        problem = coverage_problem(report)
        if problem and not opts.allow_partial:
            raise CoverageError(problem)
    resolved = [resolve(report, target, aux_module(a)[0], opts) for a, report in zip(auxes, reports)]
    staged = [build(target, a, report, opts, selected) for a, (report, selected) in zip(auxes, resolved)]
    for pathways in staged:
        attach(pathways, opts)
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

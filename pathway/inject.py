"""``connect``: apply a plan by registering a :class:`PathwayWeight` on every paired weight.

Each pair's aux tensor is built once, here, in the target weight's own layout (transposed,
concatenated or split as the pair says) and copied, so the aux model object can be dropped after
``connect``. Tied target weights get one shared pathway on every alias, so the tie survives.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .errors import CoverageError
from .layer import PathwayWeight
from .modules import owners, pathway_sites, plain_parameters
from .plan import Options, coverage_problem, plan_with
from .report import Pair, Report


def materialise(pair: Pair, aux_params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The aux tensor of ``pair`` in the target weight's storage layout."""
    parts = []
    for name, transposed in zip(pair.aux, pair.aux_transposed):
        tensor = aux_params[name].detach()
        parts.append(tensor.t() if transposed and tensor.dim() == 2 else tensor)
    stacked = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    tensor = stacked[pair.out_slice[0]:pair.out_slice[1]]
    return (tensor.t() if pair.target_transposed else tensor).contiguous()


def _scale_shape(weight: torch.Tensor, pair: Pair, per_channel: bool) -> tuple[int, ...]:
    if not per_channel:
        return ()
    if pair.target_transposed:
        return (1, weight.shape[1])
    return (weight.shape[0],) + (1,) * (weight.dim() - 1)


def inject(target: nn.Module, aux: nn.Module, report: Report, opts: Options) -> None:
    """Register the pathways of ``report`` on ``target``; all tensors are built before any change."""
    aux_params = plain_parameters(getattr(aux, "_orig_mod", aux))
    model = getattr(target, "_orig_mod", target)
    staged = []
    for pair in report.pairs:
        sites = owners(model, pair.target)
        module, tensor_name = sites[0]
        weight = getattr(module, tensor_name)
        aux_tensor = materialise(pair, aux_params).to(device=weight.device, dtype=weight.dtype)
        if aux_tensor.shape != weight.shape:   # the plan checked shapes; this guards the layout logic
            raise AssertionError(f"{pair.target}: built aux tensor {list(aux_tensor.shape)} != {list(weight.shape)}")
        init = opts.lambda_init(pair.target, pair.target_block) if callable(opts.lambda_init) else opts.lambda_init
        staged.append((sites, pair, aux_tensor, float(init), _scale_shape(weight, pair, opts.lambda_shape == "channel")))
    for sites, pair, aux_tensor, init, scale_shape in staged:
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


def connect(target: nn.Module, aux: nn.Module | list[nn.Module], **options: Any) -> Report | list[Report]:
    """Connect ``target`` to ``aux`` in place: every paired weight becomes ``W + lambda * W_aux``.

    Args:
        target: the model to improve; it keeps its class, methods and forward.
        aux: a model trained on another modality, or a list of them (``W + l1*W1 + l2*W2``).
            Connecting again adds another pathway.
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
    auxes = list(aux) if isinstance(aux, (list, tuple)) else [aux]
    reports = [plan_with(target, a, opts) for a in auxes]
    for report in reports:
        problem = coverage_problem(report)
        if problem and not opts.allow_partial:
            raise CoverageError(problem)
    for a, report in zip(auxes, reports):
        inject(target, a, report, opts)
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

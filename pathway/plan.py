"""``plan(target, aux)``: read both models, pair their weights, report; changes nothing.

Everything ``connect`` needs is decided here, and every check that can fail runs here, so that a
model is never left half-connected (PEFT's rule for ``inject_adapter``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .errors import DeviceMismatchError, NoPairsError, OptionError, SelfConnectionError, TraceError
from .inputs import derive_inputs, describe
from .match import DEPTH_POLICIES, ModelView, match
from .modules import block_of, find_blocks, named_plain_parameters, plain_names, plain_parameters
from .report import Pair, Report
from .shapes import GATED_CHOICES, select_report
from .trace import Op, Trace, analyse, read_fx, read_runtime
from .units import build_units

_CHOICES: dict[str, tuple[str, ...]] = {
    "match": ("auto", "name", "graph"),
    "depth": DEPTH_POLICIES,
    "lambda_shape": ("scalar", "channel"),
    "on_shape_mismatch": ("error", "skip", "select"),
    "gated_mlp": GATED_CHOICES,
    "tracer": ("auto", "fx", "runtime"),
}
_BOOLEANS = ("train_lambda", "train_aux", "freeze_target", "allow_partial")
_SUBSETS: dict[str, tuple[str, ...]] = {
    "kinds": ("linear", "conv"),
    "segments": ("body", "pre", "mid", "post"),
}


@dataclass(frozen=True)
class Options:
    """Options of ``plan`` and ``connect``; see the README for each one's meaning."""

    match: str = "auto"
    depth: str = "equal"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    pairs: dict[str, Any] = field(default_factory=dict)
    kinds: tuple[str, ...] = ("linear",)
    segments: tuple[str, ...] = ("body",)
    lambda_init: float | Callable[[str, int | None], float] = 0.0
    lambda_shape: str = "scalar"
    train_lambda: bool = True
    train_aux: bool = True
    freeze_target: bool = False
    on_shape_mismatch: str = "error"
    gated_mlp: str = "up"            # which projection of a gated (SwiGLU) aux MLP a plain fc1 takes: "up" | "gate"
    allow_partial: bool = False
    target_inputs: Any = None
    aux_inputs: Any = None
    tracer: str = "auto"

    @classmethod
    def parse(cls, options: dict[str, Any]) -> Options:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise OptionError(f"unknown option(s) {unknown}; the options are: {sorted(known)}")
        values = dict(options)
        for key in ("include", "exclude", "kinds", "segments"):
            if isinstance(values.get(key), str):
                values[key] = (values[key],)
            if key in values:
                if not isinstance(values[key], (tuple, list)):
                    raise OptionError(f"{key}={values[key]!r}: give a string or a list of strings")
                values[key] = tuple(values[key])
        opts = cls(**values)
        for key in _BOOLEANS:
            value = getattr(opts, key)
            if not isinstance(value, bool):
                raise OptionError(f"{key}={value!r} must be True or False, not a {type(value).__name__}: a string "
                                  f"or a number is not read as a boolean here. Fix: {key}=True or {key}=False")
        for key, allowed in _CHOICES.items():
            if getattr(opts, key) not in allowed:
                raise OptionError(f"{key}={getattr(opts, key)!r} is not one of {list(allowed)}")
        for key, allowed in _SUBSETS.items():
            bad = [v for v in getattr(opts, key) if v not in allowed]
            if bad or not getattr(opts, key):
                raise OptionError(f"{key}={getattr(opts, key)!r}: each value must be one of {list(allowed)}")
        init = opts.lambda_init
        if not callable(init) and (not isinstance(init, (int, float)) or isinstance(init, bool)):
            raise OptionError(f"lambda_init={init!r} must be a number or a callable (weight name, block index) -> "
                              f"number")
        if not callable(init) and not math.isfinite(init):
            raise OptionError(f"lambda_init={init!r} is not a finite number: lambda must start finite (0 starts the "
                              f"connected model exactly as the target)")
        for pattern in opts.include + opts.exclude:
            if not isinstance(pattern, str):
                raise OptionError(f"include/exclude pattern {pattern!r} is not a string (a regular expression)")
            try:
                re.compile(pattern)
            except re.error as e:
                raise OptionError(f"include/exclude pattern {pattern!r} is not a regular expression: {e}") from e
        if not isinstance(opts.pairs, dict):
            raise OptionError("pairs must be a dict {target weight name: aux weight name or list of names}")
        return opts

    def keeps(self, name: str) -> bool:
        """Whether target weight ``name`` passes include/exclude."""
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)


def read_model(model: nn.Module, inputs: Any, tracer: str, kinds: tuple[str, ...], side: str) -> ModelView:
    """Trace ``model`` and build its units.

    Under ``tracer='auto'`` torch.fx reads first; the runtime recorder reads where fx fails, where fx
    sees weights only inside functions it does not open, or where it cannot read a fused q/k/v
    layout (slice bounds fx only knows as traced values). Should the recorder fail on a model fx
    did read, the fx reading stands and the report says what it lacks.
    """
    model = getattr(model, "_orig_mod", model)   # torch.compile wrapper
    names = plain_names(model)
    plain_shapes = {n: tuple(p.shape) for n, p in plain_parameters(model).items()}
    shapes = {raw: tuple(p.shape) for raw, p in model.named_parameters(remove_duplicate=False)} | plain_shapes
    fx_trace, fx_ops, problem = None, [], ""
    if tracer in ("auto", "fx"):
        try:
            fx_ops, consts = read_fx(model)
        except Exception as e:  # fx raises many kinds of errors on untraceable code
            if tracer == "fx":
                raise TraceError(f"torch.fx cannot trace the {side} model {type(model).__name__}: "
                                 f"{type(e).__name__}: {e}. Use tracer='runtime' with example inputs.") from e
            problem = f"torch.fx failed first: {type(e).__name__}"
        else:
            try:
                fx_trace = Trace("torch.fx (no example inputs needed)", *analyse(fx_ops, consts, shapes, names))
            except TraceError as e:
                if tracer == "fx":
                    raise
                problem = f"torch.fx's reading was not enough: {e}"
            else:
                problem = "" if tracer == "fx" else _fx_shortfall(fx_trace)
    if fx_trace is not None and not problem:
        trace, ops = fx_trace, fx_ops
    else:
        try:
            trace, ops = _runtime_trace(model, inputs, shapes, names, side, problem)
        except TraceError as e:
            if fx_trace is None:
                raise
            trace = dataclasses.replace(fx_trace, reader=f"{fx_trace.reader}; {problem}, and the runtime recorder "
                                                         f"could not run: {e}")
            ops = fx_ops
    blocks = find_blocks(model)
    units, depth = build_units(trace, blocks, kinds, ops)
    return ModelView(type(model).__name__, trace, units, depth, blocks if len(blocks) == depth else [], plain_shapes)


def _fx_shortfall(trace: Trace) -> str:
    """What an fx reading misses that the runtime recorder may see, in words; empty if nothing."""
    if trace.hidden:
        example = next((n for n in trace.hidden if n.endswith("weight")), trace.hidden[0])
        return f"torch.fx saw {len(trace.hidden)} weight(s) only inside functions it does not open, e.g. {example}"
    unread = [u.name for u in trace.uses if u.role == "qkv" and u.layout is None]
    return f"torch.fx could not read the q/k/v row layout of {unread[0]}" if unread else ""


def _runtime_trace(model: nn.Module, inputs: Any, shapes: dict[str, tuple[int, ...]], names: dict[str, str | None],
                   side: str, fx_problem: str) -> tuple[Trace, list[Op]]:
    source = "given"
    why = f" ({fx_problem})" if fx_problem else ""
    if inputs is None:
        try:
            inputs, source = derive_inputs(model)
        except LookupError as e:
            raise TraceError(f"cannot derive example inputs for the {side} model {type(model).__name__}; pass "
                             f"{side}_inputs=... (a tensor, a tuple of args or a dict of kwargs){why}") from e
    try:
        ops, consts = read_runtime(model, inputs)
    except Exception as e:
        raise TraceError(
            f"the {side} model {type(model).__name__} could not run on example inputs {describe(inputs)} "
            f"({source}){why}: {type(e).__name__}: {e}. Pass inputs it accepts: connect(target, aux, "
            f"{side}_inputs=...) as a tensor, a tuple of positional args or a dict of keyword args.") from e
    reader = f"runtime recorder on {describe(inputs)} ({source})" + (f"; {fx_problem}" if fx_problem else "")
    return Trace(reader, *analyse(ops, consts, shapes, names)), ops


def _reparametrized(model: nn.Module, kinds: tuple[str, ...], segments: tuple[str, ...]
                    ) -> list[tuple[str, str, str]]:
    """Weights pathway would connect that are computed from several parameters: (module path, tensor, how).

    ``weight_norm`` (the old hook: ``weight_g`` and ``weight_v``; the parametrization: ``original0`` and
    ``original1``) and the old ``spectral_norm`` hook make ``module.weight`` a tensor computed at each
    forward, so the forward reads parameters that are not the weight and pathway has no weight to pair.
    Only weights of the connected ``kinds`` count (a matrix for linear, a kernel for conv), and under
    ``segments=("body",)`` not those outside the repeated blocks where blocks are found (wav2vec2's
    weight-normed position conv); weight_norm on some blocks only hides the blocks, and then counts.
    """
    blocks = (find_blocks(model) or None) if set(segments) == {"body"} else None
    found = []
    for path, module in model.named_modules():
        computed = [(hook.name, f"torch.nn.utils.{'weight_norm' if isinstance(hook, WeightNorm) else 'spectral_norm'}"
                     f" (hook)") for hook in module._forward_pre_hooks.values()
                    if isinstance(hook, (WeightNorm, SpectralNorm))]
        if parametrize.is_parametrized(module):
            for tensor, plist in module.parametrizations.items():
                if not hasattr(plist, "original"):      # several originals: weight_norm's g and v
                    names = ", ".join(type(p).__name__.lstrip("_") for p in plist)
                    computed.append((tensor, "torch.nn.utils.parametrizations.weight_norm" if names == "WeightNorm"
                                     else f"a parametrization of several tensors ({names})"))
        for tensor, how in computed:
            rank = getattr(getattr(module, tensor, None), "ndim", 0)
            kind = "linear" if rank == 2 else "conv" if rank >= 3 else None
            name = f"{path}.{tensor}" if path else tensor
            if kind in kinds and (blocks is None or block_of(name, blocks) is not None):
                found.append((path, tensor, how))
    return found


def _check_reparametrized(model: nn.Module, side: str, opts: Options) -> None:
    found = _reparametrized(model, opts.kinds, opts.segments)
    if not found:
        return
    by_how: dict[str, list[str]] = {}
    for path, tensor, how in found:
        by_how.setdefault(how, []).append(f"{path}.{tensor}" if path else tensor)
    shown = "; ".join(f"{len(names)} under {how}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                      for how, names in by_how.items())
    raise TraceError(
        f"the {side} model computes {len(found)} weight(s) from other parameters at each forward ({shown}). "
        f"pathway pairs and connects weight parameters, so these would be read as their parts (weight_g, "
        f"weight_v) or not at all. Fix: remove the reparametrization first, keeping the current weights: "
        f"torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') for "
        f"torch.nn.utils.parametrizations.weight_norm, torch.nn.utils.remove_weight_norm(module) or "
        f"remove_spectral_norm(module) for the old hooks; connect, and apply it again after pathway.fold if needed.")


def _refuse_adapter_layers(model: nn.Module, side: str) -> None:
    """A PEFT-wrapped model (LoRA and its kin) holds each adapted layer as ``base_layer`` beside its adapter
    matrices, which the trace would read as weights of the block (pairing ``lora_A`` with an aux weight). The
    two compose in one order only: connect the plain model, then wrap it. Found by the class's package, so the
    core does not import peft."""
    found = [name for name, m in model.named_modules() if type(m).__module__.startswith("peft.")
             and isinstance(getattr(m, "base_layer", None), nn.Module)]
    if found:
        raise OptionError(
            f"the {side} model holds {len(found)} PEFT adapter layer(s) ({', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}): their adapter matrices would be read as weights of the block. "
            f"Connect the plain model first, then get_peft_model (LoRA on a connected model trains lambda and LoRA; "
            f"README, 'PEFT LoRA with a pathway'), or merge the adapters into the model first "
            f"(model.merge_and_unload()), then connect")


def _check_models(target: nn.Module, aux: nn.Module, lazy: bool = False) -> None:
    """Refuse self-connections, PEFT-wrapped models and (for aux objects in memory) device or dtype mismatches."""
    _refuse_adapter_layers(target, "target")
    if isinstance(aux, nn.Module):
        _refuse_adapter_layers(aux, "aux")
    if target is aux:
        raise SelfConnectionError("the aux model is the target itself; connect a model trained on another modality")
    shared = {id(p) for p in target.parameters()} & {id(p) for p in aux.parameters()}
    if shared:
        raise SelfConnectionError(f"the aux model shares {len(shared)} parameter tensor(s) with the target; pass an "
                                  f"independent model (copy.deepcopy(aux) if it is a copy of the target)")
    t = next((p for p in target.parameters() if p.is_floating_point()), None)
    a = next((p for p in aux.parameters() if p.is_floating_point()), None)
    if t is None or a is None:
        raise NoPairsError("the target or the aux model has no floating-point parameters")
    if lazy:   # read from disk: tensors are converted when they are read
        return
    if a.device.type == "meta" and t.device.type != "meta":   # both on meta: a plan of shapes (the dry run)
        raise DeviceMismatchError("the aux model is on the meta device: it has shapes but no weights, so there is "
                                  "nothing to add; load its weights first (for a checkpoint on disk: "
                                  "pathway.open_aux(path) reads only what pairs)")
    if t.device != a.device:
        raise DeviceMismatchError(f"the aux model is on {a.device} and the target on {t.device}; move it first: "
                                  f"aux.to('{t.device}')")
    if t.dtype != a.dtype:
        raise DeviceMismatchError(f"the aux model is {a.dtype} and the target {t.dtype}; convert it first: "
                                  f"aux.to({t.dtype})")


AuxLike = nn.Module | str | os.PathLike
"""An aux model object, or the path of one that :func:`pathway.source.open_aux` reads lazily."""


def aux_module(aux: Any) -> tuple[nn.Module, bool]:
    """The aux ``nn.Module`` to read (possibly on the meta device), and whether it came from a path.

    A path (or an already opened source: anything with ``.model`` and ``.read``) is opened by
    ``pathway.source``, which reads tensors only when they are needed.
    """
    if isinstance(aux, nn.Module):
        return aux, False
    if isinstance(aux, (str, os.PathLike)):
        from .source import open_aux  # the lazy reader lives beside the injection, imported on demand
        aux = open_aux(aux)
    if isinstance(getattr(aux, "model", None), nn.Module) and callable(getattr(aux, "read", None)):
        return aux.model, True
    raise OptionError(f"aux must be an nn.Module or the path of a saved model, not {type(aux).__name__}")


def plan_with(target: nn.Module, aux: AuxLike, opts: Options) -> Report:
    aux, lazy = aux_module(aux)
    _check_models(target, aux, lazy)
    _check_reparametrized(target, "target", opts)
    _check_reparametrized(aux, "aux", opts)
    t_view = read_model(target, opts.target_inputs, opts.tracer, opts.kinds, "target")
    a_view = read_model(aux, opts.aux_inputs, opts.tracer, opts.kinds, "aux")
    pairs, unpaired, block_map, strategy = match(
        t_view, a_view, match=opts.match, depth=opts.depth, segments=opts.segments, overrides=opts.pairs,
        on_shape_mismatch=opts.on_shape_mismatch, keeps=opts.keeps, gated_mlp=opts.gated_mlp)
    overridden = {p.target for p in pairs if "override" in p.flags}
    excluded = sorted({n for n in [*unpaired, *(p.target for p in pairs)] if not opts.keeps(n) and n not in overridden})
    pairs = [p for p in pairs if opts.keeps(p.target) or p.target in overridden]
    for name in t_view.trace.hidden:
        unpaired.setdefault(name, "read only inside a function torch.fx does not open (torch.fx.wrap): its use is "
                                  "unknown; tracer='runtime' reads it")
    body = {n for u in t_view.units if u.segment == "body" for n in u.names}
    body |= {n for n in t_view.trace.hidden if block_of(n, t_view.blocks) is not None}
    unpaired_body = {n: why for n, why in unpaired.items() if opts.keeps(n) and n in body}
    unpaired_other = {n: why for n, why in unpaired.items() if opts.keeps(n) and n not in body}
    if not pairs:
        raise NoPairsError(f"include/exclude left no pair: patterns include={list(opts.include)}, "
                           f"exclude={list(opts.exclude)} removed all {len(excluded)} matched target weights")
    listed = {*unpaired, *(p.target for p in pairs), *excluded}
    outside = [n for u in t_view.units if u.segment not in opts.segments for n in u.names if n not in listed]
    flags = sorted({f for p in pairs for f in p.flags})
    flags += [f"{u.name} is used as {u.kind} first and later as {', '.join(sorted(u.later_kinds))} (tied weights): "
              f"it is matched by its first use only" for u in t_view.trace.uses if u.later_kinds]
    report = Report(
        target=t_view.name, aux=a_view.name, target_reader=t_view.reader, aux_reader=a_view.reader,
        strategy=strategy, depth_policy=opts.depth, depth=(t_view.depth, a_view.depth), block_map=block_map,
        pairs=pairs, unpaired=unpaired_body, unpaired_outside_body=unpaired_other, excluded=excluded,
        outside_segments=list(dict.fromkeys(outside)), never_used_target=_never_used(target, t_view),
        never_used_aux=_never_used(aux, a_view), flags=flags)
    if opts.on_shape_mismatch == "select":   # the selection each mismatched pair takes, a narrower aux refused here
        report, _ = select_report(report, target, aux, opts.gated_mlp)
    used_aux = {n for p in report.pairs for n in _aux_read(p, a_view)}
    report.unused_aux = list(dict.fromkeys(n for u in a_view.units if u.segment == "body" for n in u.names
                                           if n not in used_aux))
    return report


def _aux_read(pair: Pair, aux: ModelView) -> list[str]:
    """The aux weights whose rows the pair's aux tensor holds (a gated pair's ``up`` only, not its ``gate``)."""
    if "shape_mismatch" in pair.flags or pair.out_slice == (0, 0) or any(aux.use(n) is None for n in pair.aux):
        return list(pair.aux)
    used, start = [], 0
    for name in pair.aux:
        rows = aux.use(name).shape[0]
        if start < pair.out_slice[1] and start + rows > pair.out_slice[0]:
            used.append(name)
        start += rows
    return used


def _never_used(model: nn.Module, view: ModelView) -> list[str]:
    model = getattr(model, "_orig_mod", model)
    return [n for n, _ in named_plain_parameters(model) if n not in view.trace.touched]


def plan(target: nn.Module, aux: AuxLike, **options: Any) -> Report:
    """Find the pairs ``connect`` would make, without changing either model.

    Args:
        target: the model to improve (any ``nn.Module``).
        aux: a model of the same kind of architecture trained on another modality, or the path of
            one (read lazily by ``pathway.source.open_aux``).
        **options: see :class:`Options` and the README.

    Returns:
        A :class:`~pathway.report.Report`: every pair with its transform, what was left unpaired and
        why, parameters the forward never read, and how each model was read.

    Example:
        >>> import timm, pathway
        >>> target = timm.create_model("vit_tiny_patch16_224", num_classes=10)
        >>> aux = timm.create_model("vit_tiny_patch16_224", num_classes=0)
        >>> print(pathway.plan(target, aux).coverage)
        (48, 48)
    """
    return plan_with(target, aux, Options.parse(options))


def coverage_problem(report: Report) -> str | None:
    """The message ``connect`` raises when target body weights were left unpaired."""
    if not report.unpaired:
        return None
    shown = "\n  ".join(f"{n}: {why}" for n, why in list(report.unpaired.items())[:12])
    more = f"\n  ... and {len(report.unpaired) - 12} more" if len(report.unpaired) > 12 else ""
    paired, total = report.coverage
    return (f"only {paired}/{total} target body weights of {report.target} found a counterpart in {report.aux}:\n  "
            f"{shown}{more}\nFix: allow_partial=True accepts this; exclude=[...] leaves weights out on purpose; "
            f"pairs={{...}} pairs them by hand; another depth policy (depth=...) maps the blocks differently.")


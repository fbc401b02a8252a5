"""Weight selection: an aux tensor in the target's shape, taken from a wider aux consistently.

Xu et al., "Initializing Models with Larger Ones" (ICLR 2024, arXiv 2311.18823) start a small
model from a larger one by *layer selection* (the first N blocks: ``depth='first'`` here) and
*element selection*: along each dimension, every k-th index when the larger size is a multiple of
the smaller one, else evenly spaced indices (a rounded ``linspace``). Their code applies that rule
to each tensor on its own. The rule depends on the two sizes only, so the residual stream and the
MLP hidden units get the same indices in every tensor that reads or writes them: the columns of
qkv and fc1 are the rows of proj and fc2. That is kept here for the MLP (fc1 ``[I, D]`` and fc2
``[D, I]`` take the rule on each dimension).

Attention is where the per-tensor rule goes wrong: on a fused ``qkv`` it mixes q, k and v rows and
the rows of different heads. So attention is selected per block pair, by *space*:

  residual  the residual stream: the columns of q, k, v (or qkv), the rows of proj (o); the rule above
  q         query heads x head dims: the rows of q, the columns of proj (attention output is per q head)
  kv        key/value heads x head dims: the rows of k and v

Heads are kept whole: the rule picks aux heads, then head dims inside each head, so a target q
head, its k and v, and the proj columns that read its output all come from one aux head. A
grouped-query aux (Llama, Mistral, Qwen2, Falcon) shares each kv head among a group of q heads;
its k/v are expanded by repetition, as the aux model does at run time (``repeat_kv``): the target
kv head of target q head i is the aux kv head of the aux q head chosen for i. A gated MLP (SwiGLU:
gate, up, down) feeds a plain one (fc1, fc2) with ``fc1 <- up`` (or ``gate``) and ``fc2 <- down``.
The selected tensor is a plain tensor of the target's shape, so fold stays exact.

An aux narrower than the target in any dimension is refused (:class:`NarrowAuxError`).
Zero-padding would give a tensor of the right shape, but its padded rows and columns hold nothing
of the aux model: ``lambda * W_aux`` would add a fresh zero weight there, trained from scratch
under the one lambda that also scales the real aux weights, which is not the method's pathway.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import OptionError, ShapeMismatchError
from .modules import plain_parameters
from .report import Pair, Report

ATTENTION_ROLES = ("q", "k", "v", "qkv")
GATED_CHOICES = ("up", "gate")
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "nhead")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size")
# the two input projections of a gated MLP, (gate, up), as the codebases that have one name them
GATED_NAMES = (("gate_proj", "up_proj"), ("w1", "w3"), ("wi_0", "wi_1"), ("fc1_g", "fc1_x"), ("gate", "up"))


class NarrowAuxError(ShapeMismatchError):
    """The aux model is narrower than the target in some dimension, so no selection can fill it."""


def uniform_indices(n_aux: int, n_target: int, what: str = "size") -> torch.Tensor:
    """Xu et al.'s element selection of ``n_target`` of ``n_aux`` indices (every k-th, else evenly spaced)."""
    if n_target > n_aux:
        raise NarrowAuxError(f"the aux {what} is {n_aux}, narrower than the target's {n_target}")
    if n_aux % n_target == 0:
        return torch.arange(n_target) * (n_aux // n_target)
    return torch.linspace(0, n_aux - 1, n_target).round().long()


@dataclass(frozen=True)
class Geometry:
    """The attention sizes of one block, on one side of a block pair."""

    width: int          # residual stream
    heads: int          # query heads
    head_dim: int
    kv_heads: int       # key/value heads (== heads without grouped-query attention)

    def size(self, part: str) -> int:
        """Rows a tensor gives to ``part`` (``q``, ``k``, ``v``)."""
        return (self.heads if part == "q" else self.kv_heads) * self.head_dim


@dataclass(frozen=True)
class Selection:
    """One block pair's aux indices per space (rows of q, of k and v, the residual stream)."""

    residual: torch.Tensor
    q: torch.Tensor
    kv: torch.Tensor
    kv_repeat: int              # aux q heads per aux kv head

    def rows(self, parts: Sequence[str], aux_parts: Sequence[str], aux: Geometry) -> torch.Tensor:
        """Indices into rows stacked as ``aux_parts`` (e.g. q, k, v) that build rows stacked as ``parts``."""
        offsets, start = {}, 0
        for part in aux_parts:
            offsets[part] = start
            start += aux.size(part)
        return torch.cat([(self.q if part == "q" else self.kv) + offsets[part] for part in parts])


def select_block(target: Geometry, aux: Geometry, where: str = "") -> Selection:
    """Choose the aux indices of each attention space once for a block pair, heads kept whole."""
    try:
        residual = uniform_indices(aux.width, target.width, "width")
        heads = uniform_indices(aux.heads, target.heads, "number of heads")
        dims = uniform_indices(aux.head_dim, target.head_dim, "head size")
    except NarrowAuxError as e:
        raise _with_fix(e, where or "attention") from None
    repeat = aux.heads // aux.kv_heads
    kv_heads = heads[:: target.heads // target.kv_heads] // repeat   # the aux kv head each target kv head reads
    return Selection(residual, (heads[:, None] * aux.head_dim + dims).flatten(),
                     (kv_heads[:, None] * aux.head_dim + dims).flatten(), repeat)


def _with_fix(error: NarrowAuxError, where: str) -> NarrowAuxError:
    return NarrowAuxError(f"{error} ({where}): weight selection takes a part of a wider aux model and cannot fill "
                          f"a narrower one. Fix: an aux model at least as wide as the target (width, number of "
                          f"heads, head size, MLP size), on_shape_mismatch='skip' to leave these layers unpaired, "
                          f"or exclude=[...].")


@dataclass(frozen=True)
class Selected:
    """How one pair's aux tensor is taken from the aux weights, in canonical ``[out, in, ...]`` layout.

    The ``aux`` weights (transposed where ``aux_transposed``) are stacked along ``out``; then rows
    ``rows``, columns ``cols`` and, for kernels, the trailing dims ``rest`` are taken.
    """

    aux: tuple[str, ...]
    aux_transposed: tuple[bool, ...]
    rows: torch.Tensor
    cols: torch.Tensor
    rest: tuple[torch.Tensor, ...]
    transform: str

    def apply(self, stacked: torch.Tensor) -> torch.Tensor:
        """The selected tensor from the ``aux`` weights stacked in canonical layout (rows ``[q | k | v]``)."""
        for dim, index in enumerate((self.rows, self.cols, *self.rest)):
            stacked = stacked.index_select(dim, index.to(stacked.device))
        return stacked


def attention_heads(model: nn.Module, weight: str) -> tuple[int | None, int | None, int | None]:
    """(heads, kv heads, head size) from the nearest module above ``weight`` that names its heads.

    timm and GPT-2 attention say ``num_heads``, torchvision's MHA too, Hugging Face modules
    ``num_attention_heads`` or their ``config`` (which gives ``num_key_value_heads`` and ``head_dim``
    for grouped-query models). Values not given are None.
    """
    path = weight.rpartition(".")[0]
    while True:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        sources = [module, getattr(module, "config", None)] if module is not None else []
        heads = _first_attr(sources, _HEAD_ATTRS)
        if heads is not None:
            kv = _first_attr(sources, _KV_ATTRS)
            groups = _first_attr(sources, ("num_key_value_groups",))
            return heads, kv or (heads // groups if groups else None), _first_attr(sources, _HEAD_DIM_ATTRS)
        if not path:
            return None, None, None
        path = path.rpartition(".")[0]


def _first_attr(sources: Sequence[object], names: Sequence[str]) -> int | None:
    for source in sources:
        for name in names:
            value = getattr(source, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def gate_by_name(names: Sequence[str]) -> int | None:
    """Which of two names is the gate by the names codebases give a gated MLP's projections; None if unknown."""
    for gate, up in GATED_NAMES:
        gates = [i for i, n in enumerate(names) if f".{gate}." in f".{n}"]
        ups = [i for i, n in enumerate(names) if f".{up}." in f".{n}"]
        if len(gates) == len(ups) == 1 and gates != ups:
            return gates[0]
    return None


def gated_member(names: Sequence[str], choice: str = "up") -> int:
    """Which of a gated MLP's two input projections feeds a plain fc1: ``up`` (default) or ``gate``.

    Known names decide (``gate_proj``/``up_proj``, ``w1``/``w3``, ``wi_0``/``wi_1``, ``fc1_g``/``fc1_x``);
    otherwise execution order, gate first, as every SwiGLU forward computes ``act(gate(x)) * up(x)``.
    """
    gate = gate_by_name(names)
    gate = 0 if gate is None else gate
    return gate if choice == "gate" else 1 - gate


@dataclass(frozen=True)
class Side:
    """One model as selection sees it: the model (for its attention modules) and canonical weight shapes."""

    model: nn.Module
    shapes: dict[str, tuple[int, ...]]        # plain weight name -> canonical [out, in, ...] shape

    @classmethod
    def of(cls, model: nn.Module, transposed: dict[str, bool]) -> Side:
        shapes = {}
        for name, p in plain_parameters(getattr(model, "_orig_mod", model)).items():
            shape = tuple(p.shape)
            shapes[name] = shape[::-1] if transposed.get(name) and len(shape) == 2 else shape
        return cls(model, shapes)


def needs_selection(pair: Pair, target: Side, aux: Side) -> bool:
    """Whether the pair's aux tensor, built as the pair says, would miss the target's shape."""
    if "shape_mismatch" in pair.flags:
        return True
    shapes = [aux.shapes[n] for n in pair.aux]
    if any(s[1:] != shapes[0][1:] for s in shapes):
        return True
    rows = min(pair.out_slice[1], sum(s[0] for s in shapes)) - pair.out_slice[0]
    return (rows, *shapes[0][1:]) != target.shapes[pair.target]


def select_pairs(pairs: Sequence[Pair], target: nn.Module, aux: nn.Module, gated: str = "up") -> dict[str, Selected]:
    """A :class:`Selected` for every pair whose aux tensor would not have the target's shape as it is.

    Attention pairs are selected per block pair (the heads chosen once for q, k, v and proj); MLP
    and other weights take Xu et al.'s per-dimension rule, which agrees with the attention's
    residual indices since it depends on the two sizes only.
    """
    t_side = Side.of(target, {p.target: p.target_transposed for p in pairs})
    a_side = Side.of(aux, {n: tr for p in pairs for n, tr in zip(p.aux, p.aux_transposed)})
    chosen: dict[str, Selected] = {}
    selections: dict[tuple[int | None, int | None], tuple[Geometry, Geometry, Selection]] = {}
    for pair in pairs:
        if not needs_selection(pair, t_side, a_side):
            continue
        if pair.role not in (*ATTENTION_ROLES, "o"):
            chosen[pair.target] = _per_dimension(pair, t_side, a_side, gated)
            continue
        key = (pair.target_block, pair.aux_block)
        if key not in selections:    # the block pair's first attention weight to select sets its geometry
            t_geo, a_geo = _geometry(t_side, pair, False), _geometry(a_side, pair, True)
            selections[key] = (t_geo, a_geo, select_block(t_geo, a_geo, f"target block {key[0]} <- aux block {key[1]}"))
        chosen[pair.target] = _attention(pair, t_side, a_side, *selections[key])
    return chosen


def _geometry(side: Side, pair: Pair, is_aux: bool) -> Geometry:
    """Width and heads of the attention that ``pair``'s target (or aux) weight belongs to.

    Heads come from the pair (what the dataflow showed), else from the attention module or config;
    the head size from the module (Llama, Qwen2 state ``head_dim``), else proj's columns / heads or width / heads.
    """
    names = pair.aux if is_aux else (pair.target,)
    side_index = int(is_aux)
    found, found_kv, head_dim = attention_heads(side.model, names[0])
    heads = pair.heads[side_index] or found
    if heads is None:
        raise ShapeMismatchError(
            f"cannot tell how many heads the attention of '{names[0]}' has (the dataflow does not show them and "
            f"{type(side.model).__name__} names none on its attention modules or config); weight selection keeps "
            f"heads whole. Fix: on_shape_mismatch='skip', exclude=[...] for the attention layers, or pairs={{...}}")
    kv = pair.kv_heads[side_index] or found_kv or heads
    shape = side.shapes[names[0]]
    width = shape[0] if pair.role == "o" else shape[1]
    if head_dim is None:    # proj reads heads x head_dim columns; elsewhere the usual width / heads
        head_dim = shape[1] // heads if pair.role == "o" else width // heads
    return Geometry(width, heads, head_dim, kv)


def _parts(side: Side, names: Sequence[str], role: str, geometry: Geometry, what: str) -> tuple[str, ...]:
    """The parts (q, k, v) stacked along the rows of ``names``."""
    if len(names) == 3:
        return ("q", "k", "v")
    rows = side.shapes[names[0]][0]
    if len(names) == 1 and rows == geometry.size("q") + 2 * geometry.size("k"):
        return ("q", "k", "v")
    if len(names) == 1 and role in ("q", "k", "v") and rows == geometry.size(role):
        return (role,)
    raise ShapeMismatchError(f"{what} {list(names)}: cannot tell its q, k and v rows apart ({rows} rows; "
                             f"{geometry.heads} heads, {geometry.kv_heads} kv heads of {geometry.head_dim})")


def _attention(pair: Pair, target: Side, aux: Side, t_geo: Geometry, a_geo: Geometry, selection: Selection) -> Selected:
    t_shape = target.shapes[pair.target]
    a_shapes = [aux.shapes[n] for n in pair.aux]
    unequal = [side for side, layout in zip(("target", "aux"), pair.layout) if ":" in layout]
    if unequal and pair.role != "o":
        raise ShapeMismatchError(
            f"{pair.target} <- {list(pair.aux)}: the {' and '.join(unequal)} lays q, k and v out per head with unequal "
            f"widths ({' / '.join(pair.layout)}); weight selection takes heads of one size for q, k and v. Fix: an "
            f"aux of the same widths per head, pairs={{...}} by hand, or exclude=[...] for this weight")
    if pair.role == "o":
        rows, cols = selection.residual, selection.q
    else:
        t_parts = _parts(target, [pair.target], pair.role, t_geo, "target")
        a_parts = _parts(aux, pair.aux, pair.role, a_geo, f"aux of {pair.target}")
        if not set(t_parts) <= set(a_parts):
            raise ShapeMismatchError(f"{pair.target} needs rows {list(t_parts)}; its aux {list(pair.aux)} has "
                                     f"{list(a_parts)}")
        rows, cols = selection.rows(t_parts, a_parts, a_geo), selection.residual
    if (rows.numel(), cols.numel()) != t_shape[:2]:
        raise ShapeMismatchError(f"{pair.target} {list(t_shape)} <- {list(pair.aux)} {[list(s) for s in a_shapes]}:"
                                 f" its attention's sizes ({t_geo}) do not fit this weight")
    rest = tuple(uniform_indices(a, t, "kernel size") for a, t in zip(a_shapes[0][2:], t_shape[2:]))
    what = [f"heads {t_geo.heads}/{a_geo.heads}"]
    if t_geo.head_dim != a_geo.head_dim:
        what.append(f"head dims {t_geo.head_dim}/{a_geo.head_dim}")
    if t_geo.width != a_geo.width:
        what.append(f"width {t_geo.width}/{a_geo.width}")
    if selection.kv_repeat > 1 and pair.role != "o":
        what.append(f"kv heads x{selection.kv_repeat}")
    return Selected(pair.aux, pair.aux_transposed, rows, cols, rest,
                    f"select[{', '.join(what)}] {_share(t_shape, a_shapes)} of aux")


def _per_dimension(pair: Pair, target: Side, aux: Side, gated: str) -> Selected:
    """Xu et al.'s rule on each dimension of one aux tensor (one of gate/up for a plain fc1)."""
    k, gate_or_up = 0, ""
    if len(pair.aux) == 2 and aux.shapes[pair.aux[0]] == aux.shapes[pair.aux[1]]:
        if gated not in GATED_CHOICES:
            raise OptionError(f"gated MLP source {gated!r} is not one of {list(GATED_CHOICES)}")
        # a pair the matcher flagged "gated" holds (gate, up) in the order it read (dataflow, names or execution)
        k = GATED_CHOICES.index(gated) ^ 1 if "gated" in pair.flags else gated_member(pair.aux, gated)
        gate_or_up = f"{gated} of a gated MLP, "
    elif len(pair.aux) == 1 and "gated" in pair.flags:
        gate_or_up = f"{gated} of a gated MLP, "      # selected once already (plan); selecting again names it alike
    elif len(pair.aux) != 1:
        raise ShapeMismatchError(f"{pair.target} <- {list(pair.aux)}: selection takes one aux weight here, or the "
                                 f"two equal input projections of a gated MLP; pair it by hand with pairs={{...}}")
    name = pair.aux[k]
    t_shape, a_shape = target.shapes[pair.target], aux.shapes[name]
    if len(t_shape) != len(a_shape):
        raise ShapeMismatchError(f"{pair.target} {list(t_shape)} <- {name} {list(a_shape)}: different ranks")
    try:
        index = [uniform_indices(a, t, f"dim {d} size") for d, (a, t) in enumerate(zip(a_shape, t_shape))]
    except NarrowAuxError as e:
        raise _with_fix(e, f"{pair.target} {list(t_shape)} <- {name} {list(a_shape)}") from None
    dims = "x".join(map(str, t_shape)) + "/" + "x".join(map(str, a_shape))
    return Selected((name,), (pair.aux_transposed[k],), index[0], index[1], tuple(index[2:]),
                    f"select[{gate_or_up}{dims}] {_share(t_shape, [a_shape])} of aux")


def _share(target_shape: Sequence[int], aux_shapes: Sequence[Sequence[int]]) -> str:
    used = torch.Size(target_shape).numel() / sum(torch.Size(s).numel() for s in aux_shapes)
    return f"{100 * used:.3g}%"


def select_report(report: Report, target: nn.Module, aux: nn.Module, gated: str = "up"
                  ) -> tuple[Report, dict[str, Selected]]:
    """``report`` with every mismatched pair naming its selection (transform ``select[...]``, the aux
    weights it reads), and the selections by target weight name."""
    chosen = select_pairs(report.pairs, target, aux, gated)
    pairs = [dataclasses.replace(p, aux=chosen[p.target].aux, aux_transposed=chosen[p.target].aux_transposed,
                                 transform=chosen[p.target].transform) if p.target in chosen else p
             for p in report.pairs]
    return dataclasses.replace(report, pairs=pairs), chosen

"""Pairing target units with aux units: depth policy, then names or graph position per block.

Blocks are mapped first (``equal``, ``uniform``, ``first``, ``last``, ``every_k``, ``reversed``:
the paper's reversed-order ablation). Inside a block pair, models whose relative names agree
(timm <-> timm) pair by name; otherwise units are aligned by graph position with a small
Needleman-Wunsch over role and shape (zero gap cost): same role +2, role vs no role -1, equal
shape +3, same out/in ratio +1, other shapes +0.25; different kinds or different roles never pair.

A plain MLP's first linear (fc1) meeting a gated MLP's input projections (gate, up) is paired with
both (``aux=(gate, up)``, flagged ``gated``) and takes the rows of ``up``, or of ``gate`` under
``gated_mlp='gate'``; the reverse (a gated target, a plain aux) is refused: which of gate and up a
single fc1 should feed is not defined.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from .errors import (
    CompetingPairsError,
    DepthMismatchError,
    GroupSizeError,
    LayoutError,
    NoPairsError,
    OptionError,
    ShapeMismatchError,
)
from .modules import block_of
from .report import Pair
from .shapes import GATED_CHOICES
from .trace import Trace, WeightUse
from .units import Unit, head_widths

DEPTH_POLICIES = ("equal", "uniform", "first", "last", "every_k", "reversed")
NAME_MATCH_THRESHOLD = 0.9


@dataclass
class ModelView:
    """One model as the matcher sees it."""

    name: str
    trace: Trace
    units: list[Unit]
    depth: int
    blocks: list[str]                      # module paths; empty when blocks were unrolled
    shapes: dict[str, tuple[int, ...]]     # plain parameter name -> shape

    @property
    def reader(self) -> str:
        return self.trace.reader

    @cached_property
    def _uses_by_name(self) -> dict[str, WeightUse]:
        return {u.name: u for u in self.trace.uses}

    def use(self, name: str) -> WeightUse | None:
        return self._uses_by_name.get(name)

    def block_units(self, block: int) -> list[Unit]:
        return [u for u in self.units if u.block == block]


def map_blocks(n_target: int, n_aux: int, policy: str) -> list[int | None]:
    """Target block i <- aux block ``result[i]`` (None: no counterpart)."""
    if policy == "equal":
        if n_target != n_aux:
            raise DepthMismatchError(
                f"the target has {n_target} blocks and the aux model {n_aux}; depth='equal' needs the same "
                f"depth. Choose how to map them: depth='uniform' (spread aux blocks over the target), 'first', "
                f"'last', 'every_k' or 'reversed'.")
        return list(range(n_target))
    if policy == "first":
        return [i if i < n_aux else None for i in range(n_target)]
    if policy == "last":
        return [i + n_aux - n_target if i + n_aux - n_target >= 0 else None for i in range(n_target)]
    if policy == "uniform":
        if n_target == 1:
            return [0]
        return [round(i * (n_aux - 1) / (n_target - 1)) for i in range(n_target)]
    if policy == "every_k":
        if n_target > n_aux or n_aux % n_target:
            raise DepthMismatchError(
                f"depth='every_k' takes every k-th of {n_aux} aux blocks, which needs the aux depth to be a "
                f"multiple of the target depth ({n_target}); use depth='uniform' instead.")
        return [i * (n_aux // n_target) for i in range(n_target)]
    if policy == "reversed":
        return map_blocks(n_target, n_aux, "uniform")[::-1]
    raise ValueError(policy)


def _score(t: Unit, a: Unit, exact: bool) -> float | None:
    if t.kind != a.kind or (t.role and a.role and t.role != a.role):
        return None
    if exact and t.shape != a.shape:
        return None
    score = 2.0 if t.role and t.role == a.role else -1.0 if bool(t.role) != bool(a.role) else 0.0
    if t.shape == a.shape:
        return score + 3.0
    if len(t.shape) == len(a.shape) == 2 and t.shape[0] * a.shape[1] == a.shape[0] * t.shape[1]:
        return score + 1.0
    return score + 0.25


def align(targets: list[Unit], auxes: list[Unit], exact: bool = False) -> list[tuple[Unit, Unit]]:
    """Order-preserving alignment maximising the summed score; unmatched units are gaps."""
    n, m = len(targets), len(auxes)
    best = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            s = _score(targets[i], auxes[j], exact)
            diag = s + best[i + 1][j + 1] if s is not None else float("-inf")
            best[i][j] = max(best[i + 1][j], best[i][j + 1], diag)
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        s = _score(targets[i], auxes[j], exact)
        if s is not None and best[i][j] == s + best[i + 1][j + 1]:
            pairs.append((targets[i], auxes[j]))
            i, j = i + 1, j + 1
        elif best[i][j] == best[i + 1][j]:
            i += 1
        else:
            j += 1
    return pairs


def _label(part: WeightUse) -> str:
    if part.role in ("q", "k", "v"):
        return part.role
    return part.name.rsplit(".", 2)[-2] if "." in part.name else part.name


def unit_pairs(t: Unit, a: Unit, aux_block: int | None, same_code: bool = False, gated_mlp: str = "up"
               ) -> tuple[list[Pair], str | None]:
    """Pairs for every member of target unit ``t`` from aux unit ``a``, or a problem description.

    A fused ``qkv`` whose row layout the dataflow did not show is refused (problem ending in
    ``[layout]``) unless ``same_code``: both sides then use it through the same relative names.
    A plain fc1 takes the ``gated_mlp`` projection (``up`` or ``gate``) of a gated aux MLP.
    """
    unread = [m for m in (*t.members, *a.members) if m.role == "qkv" and m.layout is None]
    if unread and not (same_code and all(m.role == "qkv" for m in (*t.members, *a.members))):
        return [], "; ".join(
            f"{m.name} {list(m.shape)}: a fused attention projection whose row layout ([q | k | v] or per head "
            f"[head, (q, k, v), head_dim]) cannot be read: "
            + (m.layout_note or "its forward shows no view, split or slices of its output into q, k and v")
            for m in unread) + " [layout]"
    if _plain_from_gated(t, a):     # also where fc1 has as many rows as gate and up: it is no fused [gate | up]
        member = a.members[_gated_position(gated_mlp)]
        if t.shape == member.shape:
            return [_gated_pair(t, a, aux_block, gated_mlp, mismatch=False)], None
        return [], (f"shapes differ: target {t.names[0]} {list(t.shape)} <- aux {member.name} {list(member.shape)}, "
                    f"the {gated_mlp} projection of the gated MLP {'+'.join(a.names)}")
    if _plain_from_gated(a, t):
        return [], (f"the target's gated MLP {'+'.join(t.names)} {[list(m.shape) for m in t.members]} (gate, up) <- "
                    f"aux {a.names[0]} {list(a.shape)}, the single input projection of a plain MLP: which of gate "
                    f"and up it should feed is not defined, so it is not guessed. Fix: pairs={{"
                    f"'{t.names[0]}': '{a.names[0]}', '{t.names[1]}': '{a.names[0]}'}} (or one of them) sets it by "
                    f"hand; exclude=[...] leaves them out [group]")
    fused = _fused_with_plain(t, a)
    if fused:
        return [], fused
    t_rest, a_rest = t.shape[1:], a.shape[1:]
    t_roles, a_roles = t.role_rows(), a.role_rows()
    if t.shape == a.shape and t_roles and a_roles and t_roles != a_roles:   # same total, other q/k/v split
        return [], (f"group sizes do not add up: target {'+'.join(t.names)} {list(t.shape)} holds q, k, v rows "
                    f"{_role_sizes(t_roles)}, aux {'+'.join(a.names)} {list(a.shape)} holds {_role_sizes(a_roles)}"
                    f"{_attention_note(t, a)} [group]")
    if t_rest != a_rest or t.shape[0] != a.shape[0]:
        grouped = (len(t.members) > 1 or len(a.members) > 1) and t_rest == a_rest
        what = "group sizes do not add up" if grouped else "shapes differ"
        return [], (f"{what}: target {'+'.join(t.names)} {list(t.shape)} <- aux {'+'.join(a.names)} "
                    f"{list(a.shape)}{_attention_note(t, a)}" + (" [group]" if grouped else ""))
    ranges, start = [], 0
    for member in a.members:
        ranges.append((start, start + member.shape[0]))
        start += member.shape[0]
    pairs, start = [], 0
    for member in t.members:
        stop = start + member.shape[0]
        parts = [k for k, (lo, hi) in enumerate(ranges) if lo < stop and hi > start]
        base = ranges[parts[0]][0]
        used = [a.members[k] for k in parts]
        whole = len(parts) == 1 and ranges[parts[0]] == (start, stop)
        if whole:
            transform = "identity" if used[0].transposed == member.transposed else "transpose"
        elif len(parts) > 1:
            transform = f"concat_out[{','.join(_label(u) for u in used)}]"
        else:
            transform = f"split_out[{member.role or _label(member)}] rows {start - base}:{stop - base}"
        if not whole and any(u.transposed != member.transposed for u in used):
            transform += "+transpose"
        regroup = _regrouping(member, used)
        transform = regroup[1:] if regroup and transform == "identity" else transform + regroup
        pairs.append(_pair(member, t, used, a, aux_block, transform, (start - base, stop - base)))
        start = stop
    return pairs, None


def _role_sizes(rows: dict[str, tuple[int, int]]) -> str:
    return "/".join(str(hi - lo) for lo, hi in rows.values())


def _plain_from_gated(plain: Unit, gated: Unit) -> bool:
    """``plain`` is one weight without an attention role (not a fused [gate | up]), ``gated`` a gated MLP's
    (gate, up)."""
    return gated.gated_pair and plain.plain and plain.kind == gated.kind


def _fused_with_plain(t: Unit, a: Unit) -> str | None:
    """The problem where one side is a fused [gate | up] projection and the other a plain MLP's fc1."""
    if t.kind != a.kind or not ((t.gated == "fused" and a.plain) or (a.gated == "fused" and t.plain)):
        return None
    fused, plain = (t, a) if t.gated == "fused" else (a, t)
    side = "target" if fused is t else "aux"
    half = fused.shape[0] // 2
    fix = (f"pairs={{'{t.names[0]}': {{'aux': '{a.names[0]}', 'rows': [0, {half}] or [{half}, {2 * half}]}}}} takes "
           f"the half you name; " if fused is a and t.shape == (half, *a.shape[1:]) else "pairs={...} by hand; ")
    return (f"target {t.names[0]} {list(t.shape)} <- aux {a.names[0]} {list(a.shape)}: the {side} weight holds a "
            f"gated MLP's gate and up rows in one tensor (what reads its output takes half of its {2 * half} rows), "
            f"the other is a plain MLP's single input projection {plain.names[0]}; which half is the gate is not "
            f"read here, so the pairing is not guessed. Fix: {fix}exclude=[...] leaves it out [group]")


def _gated_position(gated_mlp: str) -> int:
    """Where the ``gated_mlp`` projection sits in a gated unit's (gate, up)."""
    return GATED_CHOICES.index(gated_mlp) ^ 1


def _gated_pair(t: Unit, a: Unit, aux_block: int | None, gated_mlp: str, mismatch: bool) -> Pair:
    """A plain fc1 <- a gated MLP's (gate, up): its rows are those of ``gated_mlp`` in the stack ``[gate | up]``."""
    member, k = t.members[0], _gated_position(gated_mlp)
    lo, hi = _member_rows(a)[k]
    if mismatch:
        transform = f"shape_mismatch[gated {gated_mlp}]"
    else:
        transform = f"gated[{gated_mlp}] rows {lo}:{hi}"
        if a.members[k].transposed != member.transposed:
            transform += "+transpose"
    flags = ("gated", *(("shape_mismatch",) if mismatch else ()))
    return _pair(member, t, list(a.members), a, aux_block, transform, (lo, hi), flags)


def _regrouping(member: WeightUse, used: list[WeightUse]) -> str:
    """``+heads[..]`` where per-head interleaved rows are regrouped; empty when both layouts agree."""
    t_layout, a_layout = _layouts(member, used)
    if t_layout == a_layout and member.heads == used[0].heads:
        return ""
    steps = ([f"from_heads[{_heads_label(a_layout, used[0].heads)}]"] * bool(a_layout)
             + [f"to_heads[{_heads_label(t_layout, member.heads)}]"] * bool(t_layout))
    return "+" + "+".join(steps) if steps else ""


def _heads_label(layout: str, heads: int | None) -> str:
    """``4`` for equal q/k/v widths per head, ``4 x q,k,v 24,24,48`` for unequal ones."""
    _, _, widths = layout.partition(":")
    return f"{heads} x q,k,v {widths}" if widths else f"{heads}"


def _layouts(member: WeightUse, used: list[WeightUse]) -> tuple[str, str]:
    aux_layout = used[0].layout or "" if len(used) == 1 else ""
    return member.layout or "", aux_layout


def _pair(member: WeightUse, t: Unit, used: list[WeightUse], a: Unit, aux_block: int | None, transform: str,
          out_slice: tuple[int, int], flags: tuple[str, ...] = ()) -> Pair:
    t_layout, a_layout = _layouts(member, used)
    if t_layout == a_layout and member.heads == used[0].heads:
        t_layout = a_layout = ""   # the same per-head layout on both sides: the rows map one to one
    return Pair(
        target=member.name, aux=tuple(u.name for u in used), transform=transform, role=member.role or t.role,
        segment=t.segment, target_block=t.block, aux_block=aux_block, aux_transposed=tuple(u.transposed for u in used),
        out_slice=out_slice, target_transposed=member.transposed,
        flags=tuple(dict.fromkeys(t.flags + a.flags + list(flags))),
        layout=(t_layout, a_layout), heads=(t.heads, a.heads), kv_heads=(t.kv_heads, a.kv_heads))


def select_pairs(t: Unit, a: Unit, aux_block: int | None, gated_mlp: str = "up") -> list[Pair]:
    """``on_shape_mismatch='select'``: pairs of differing shapes, kept by role for a shape policy.

    Each target member takes the aux rows of its own role (all of them for a fused ``qkv``), or the
    whole aux weight when both units hold one weight; a plain fc1 takes a gated MLP's (gate, up),
    flagged ``gated``; what cannot be told apart by role stays unpaired (empty list).
    """
    if _plain_from_gated(t, a):
        return [_gated_pair(t, a, aux_block, gated_mlp, mismatch=True)]
    if _plain_from_gated(a, t) or _fused_with_plain(t, a):
        return []
    if t.gated_pair and a.gated_pair:     # gate <- gate, up <- up, each selected alone (same hidden units)
        return [_pair(m, t, [other], a, aux_block, "shape_mismatch", (0, other.shape[0]), ("shape_mismatch",))
                for m, other in zip(t.members, a.members)]
    if len(t.members) == 1 and len(a.members) == 1 and (t.role == "qkv") == (a.role == "qkv"):
        m, other = t.members[0], a.members[0]
        return [_pair(m, t, [other], a, aux_block, "shape_mismatch", (0, other.shape[0]),
                      ("shape_mismatch", *(("gqa",) if _narrow_kv(t) or _narrow_kv(a) else ())))]
    t_rows, a_rows = t.role_rows(), a.role_rows()
    if t_rows is None or a_rows is None:
        return []
    gqa = ("gqa",) if _narrow_kv(t) or _narrow_kv(a) else ()
    pairs = []
    for member in t.members:
        roles = "qkv" if member.role == "qkv" else member.role
        lo, hi = a_rows[roles[0]][0], a_rows[roles[-1]][1]
        used = [u for u, (u_lo, u_hi) in zip(a.members, _member_rows(a)) if u_lo < hi and u_hi > lo]
        base = _member_rows(a)[a.members.index(used[0])][0]
        fits = hi - lo == member.shape[0]
        flags = () if fits else ("shape_mismatch", *(gqa if roles != "q" else ()))
        transform = f"split_out[{roles}] rows {lo - base}:{hi - base}" if fits else f"shape_mismatch[{roles}]"
        pairs.append(_pair(member, t, used, a, aux_block, transform + _regrouping(member, used), (lo - base, hi - base),
                           flags))
    return pairs


def _member_rows(unit: Unit) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for m in unit.members:
        bounds.append((start, start + m.shape[0]))
        start += m.shape[0]
    return bounds


def _narrow_kv(unit: Unit) -> bool:
    rows = unit.role_rows()
    return bool(rows) and rows["k"][1] - rows["k"][0] < rows["q"][1] - rows["q"][0]


def _attention_note(t: Unit, a: Unit) -> str:
    """Names grouped-/multi-query attention when narrower key/value rows are what differs."""
    notes = []
    for side, unit in (("target", t), ("aux", a)):
        if _narrow_kv(unit):
            rows = unit.role_rows()
            q, k = rows["q"][1] - rows["q"][0], rows["k"][1] - rows["k"][0]
            mqa = unit.kv_heads == 1
            heads = (f"{unit.heads} query heads, {unit.kv_heads} key/value head{'' if mqa else 's'}"
                     if unit.heads and unit.kv_heads else f"q {q} rows, k and v {k} rows each")
            notes.append(f"the {side} uses {'multi' if mqa else 'grouped'}-query attention "
                         f"({'MQA' if mqa else 'GQA'}: {heads})")
    return f" ({'; '.join(notes)})" if notes else ""


def _name_ratio(target: ModelView, aux: ModelView, block_map: list[int | None]) -> float:
    total = hits = 0
    for i, j in enumerate(block_map):
        for unit in target.block_units(i):
            for m in unit.members:
                total += 1
                other = _counterpart_by_name(m, target, aux, i, j)
                hits += other is not None and other.shape == m.shape
    return hits / total if total else 0.0


def _counterpart_by_name(m: WeightUse, target: ModelView, aux: ModelView, i: int, j: int | None) -> WeightUse | None:
    if j is None or not target.blocks or not aux.blocks:
        return None
    relative = m.name[len(target.blocks[i]) + 1:]
    return aux.use(f"{aux.blocks[j]}.{relative}")


def match(target: ModelView, aux: ModelView, *, match: str, depth: str, segments: tuple[str, ...],
          overrides: dict[str, str | list[str]], on_shape_mismatch: str, keeps: Callable[[str], bool] = lambda n: True,
          gated_mlp: str = "up") -> tuple[list[Pair], dict[str, str], list[int | None], str]:
    """Pair target units with aux units; returns (pairs, unpaired target weights, block map, strategy).

    ``keeps`` says which target weights include/exclude keep; shape problems on weights left out, or
    on weights that ``overrides`` pair by hand, are not errors. ``gated_mlp`` says which projection
    of a gated aux MLP (``up`` or ``gate``) a plain fc1 takes.
    """
    if gated_mlp not in GATED_CHOICES:
        raise OptionError(f"gated_mlp={gated_mlp!r} is not one of {list(GATED_CHOICES)}")
    overrides = {_resolve(name, target, "target"): aux_names for name, aux_names in (overrides or {}).items()}
    block_map = map_blocks(target.depth, aux.depth, depth) if target.depth and aux.depth else [None] * target.depth
    strategy = match
    if match == "auto":
        strategy = "name" if _name_ratio(target, aux, block_map) >= NAME_MATCH_THRESHOLD else "graph"

    candidates: list[tuple[Unit, Unit, int | None]] = []
    unpaired: dict[str, str] = {}
    for i, j in enumerate(block_map):
        t_units = target.block_units(i)
        if j is None:
            for u in t_units:
                unpaired.update({n: f"no aux block for target block {i} under depth='{depth}'" for n in u.names})
            continue
        if strategy == "name":
            for unit in t_units:
                for m in unit.members:
                    other = _counterpart_by_name(m, target, aux, i, j)
                    if other is None:
                        unpaired[m.name] = f"no weight of the same name in aux block {j}"
                    else:
                        candidates.append((_single(m, unit), _single(other, unit), j))
        else:
            aligned = align(t_units, aux.block_units(j))
            candidates += [(t, a, j) for t, a in aligned]
            paired_ids = {id(t) for t, _ in aligned}
            for u in t_units:
                if id(u) not in paired_ids:
                    unpaired.update({n: f"no counterpart of its kind/role in aux block {j}" for n in u.names})
    for segment in ("pre", "post", "mid"):
        if segment in segments:
            t_seg = [u for u in target.units if u.segment == segment]
            a_seg = [u for u in aux.units if u.segment == segment]
            aligned = align(t_seg, a_seg, exact=True)
            candidates += [(t, a, None) for t, a in aligned]
            paired_ids = {id(t) for t, _ in aligned}
            unpaired.update({n: f"no {segment} aux weight of the same kind and shape"
                             for u in t_seg if id(u) not in paired_ids for n in u.names})

    pairs: list[Pair] = []
    problems: list[str] = []
    layout_problems: list[str] = []
    for t, a, j in candidates:
        built, problem = unit_pairs(t, a, j, same_code=strategy == "name", gated_mlp=gated_mlp)
        if problem and problem.endswith("[layout]"):
            if any(keeps(n) and n not in overrides for n in t.names):
                layout_problems.append(problem[: -len(" [layout]")])
            unpaired.update({n: problem for n in t.names})
            continue
        if problem and on_shape_mismatch == "select":
            built = select_pairs(t, a, j, gated_mlp)
            problem = None if built else problem
        if problem:
            unpaired.update({n: problem for n in t.names})
            if any(keeps(n) and n not in overrides for n in t.names):
                problems.append(problem)
        pairs += built
    if layout_problems:
        shown = "\n  ".join(dict.fromkeys(layout_problems))
        raise LayoutError(
            f"{len(layout_problems)} pair(s) need the row layout of a fused q/k/v projection, which cannot be read:\n"
            f"  {shown}\nPairing it anyway could hand one head's key rows another head's query rows. Fix: "
            f"pairs={{target_weight: {{'aux': aux_weight(s), 'layout': '' or 'heads', 'heads': n, 'aux_layout': "
            f"'' or 'heads', 'aux_heads': n}}}} states the layouts ('' = rows [q | k | v], 'heads' = rows "
            f"[head, (q, k, v), head_dim], 'heads:a,b,c' = the same with q, k, v a, b, c rows wide per head); "
            f"exclude=[...] leaves the weight out.")
    if problems and on_shape_mismatch == "error":
        error = GroupSizeError if any(p.endswith("[group]") for p in problems) else ShapeMismatchError
        shown = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        attention = any("-query attention" in p for p in problems)
        raise error(f"{len(problems)} paired layer(s) cannot be combined as W + lambda * W_aux:\n  {shown}\n"
                    f"Fix: on_shape_mismatch='select' keeps them, flagged, for a shape policy"
                    f"{' (key/value heads expanded to the query heads)' if attention else ''}; "
                    f"on_shape_mismatch='skip' leaves them unpaired; pairs={{...}} sets a pair by hand; "
                    f"exclude=[...] leaves a target weight out.")

    replaced = {}
    for p in pairs:
        if p.target in overrides:
            replaced.setdefault(p.target, p)
    pairs = [p for p in pairs if p.target not in overrides]
    _check_competition(pairs)     # before overrides: setting one pair by hand must not hide another clash
    pairs = _apply_overrides(pairs, overrides, replaced, target, aux, unpaired, on_shape_mismatch == "select")
    for p in pairs:
        unpaired.pop(p.target, None)
    if not pairs:
        raise NoPairsError(
            f"no weight of {target.name} found a counterpart in {aux.name}: the target has {target.depth} body "
            f"blocks and {sum(len(u.members) for u in target.units if u.segment == 'body')} body weights, the aux "
            f"{aux.depth} blocks. Check the layer kinds (kinds=('linear', 'conv')), the example inputs, or set "
            f"pairs={{target_weight: aux_weight}} by hand.")
    return pairs, unpaired, block_map, strategy


def _single(m: WeightUse, unit: Unit) -> Unit:
    return Unit([m], unit.kind, unit.segment, unit.block, list(unit.flags))


def _resolve(name: str, view: ModelView, side: str) -> str:
    for candidate in (name, f"{name}.weight"):
        if candidate in view.shapes:
            return candidate
    close = [n for n in view.shapes if name.split(".")[-1] in n][:5]
    raise ShapeMismatchError(f"pairs: the {side} model has no weight '{name}'"
                             + (f"; similar: {close}" if close else ""))


_OVERRIDE_KEYS = ("aux", "rows", "layout", "heads", "aux_layout", "aux_heads")
_LAYOUT = re.compile(r"(heads(:\d+,\d+,\d+)?)?")


@dataclass(frozen=True)
class _Override:
    """One ``pairs={}`` entry: aux weights, the rows taken of their stack, and per-head layouts."""

    aux: list[str]
    rows: tuple[int, int] | None = None
    layout: tuple[str, str] = ("", "")
    heads: tuple[int | None, int | None] = (None, None)


def _override_spec(t_name: str, spec: str | list[str] | dict) -> _Override:
    """``pairs={}`` value: a name, a list of names, or a dict (see ``_OVERRIDE_KEYS``)."""
    if not isinstance(spec, dict):
        return _Override([spec] if isinstance(spec, str) else list(spec))
    unknown = sorted(set(spec) - set(_OVERRIDE_KEYS))
    layouts = (spec.get("layout", ""), spec.get("aux_layout", ""))
    heads = (spec.get("heads"), spec.get("aux_heads"))
    rows = spec.get("rows")
    if unknown or "aux" not in spec or any(not _LAYOUT.fullmatch(str(v)) for v in layouts) or any(
            lay and not isinstance(h, int) for lay, h in zip(layouts, heads)) or rows is not None and not (
            len(rows) == 2 and all(isinstance(r, int) for r in rows) and 0 <= rows[0] < rows[1]):
        raise OptionError(f"pairs['{t_name}'] = {spec!r}: a dict takes 'aux' (a name or a list of names) and "
                          f"optionally 'rows' ([first, stop) of the stacked aux rows), 'layout'/'aux_layout' ('' for "
                          f"rows [q | k | v], 'heads' for rows [head, (q, k, v), head_dim], 'heads:a,b,c' for q, k, v "
                          f"of widths a, b, c per head) with 'heads'/'aux_heads' (the number of heads) wherever a "
                          f"layout is per head")
    aux = spec["aux"]
    return _Override([aux] if isinstance(aux, str) else list(aux), tuple(rows) if rows else None, layouts, heads)


def _as_override(pair: Pair) -> str | list[str] | dict:
    """The ``pairs={}`` entry that sets ``pair`` by hand (what a CompetingPairsError suggests)."""
    aux: str | list[str] = pair.aux[0] if len(pair.aux) == 1 else list(pair.aux)
    spec: dict = {"aux": aux}
    if pair.transform.startswith("split_out"):
        spec["rows"] = list(pair.out_slice)
    for key, layout, heads in (("layout", pair.layout[0], pair.heads[0]),
                               ("aux_layout", pair.layout[1], pair.heads[1])):
        if layout:
            spec[key], spec[key.replace("layout", "heads")] = layout, heads
    return spec if len(spec) > 1 else aux


def _apply_overrides(pairs: list[Pair], overrides: dict, replaced: dict[str, Pair], target: ModelView,
                     aux: ModelView, unpaired: dict[str, str], select: bool = False) -> list[Pair]:
    """Add the hand-set pairs; ``replaced`` holds the automatic pairs they replace (for role and blocks).

    Under ``select`` (``on_shape_mismatch='select'``) a pair whose shapes differ is kept, flagged
    ``shape_mismatch``, for weight selection to take the target's shape from its aux weights.
    """
    if not overrides:
        return pairs
    by_target = {p.target: p for p in pairs}
    for t_name, spec in overrides.items():
        hand = _override_spec(t_name, spec)
        a_list = [_resolve(n, aux, "aux") for n in hand.aux]
        t_use = target.use(t_name)
        t_transposed = bool(t_use and t_use.transposed)
        parts = [aux.use(n) for n in a_list]
        a_transposed = tuple(bool(u and u.transposed) for u in parts)
        canon = [aux.shapes[n][::-1] if tr and len(aux.shapes[n]) == 2 else aux.shapes[n]
                 for n, tr in zip(a_list, a_transposed)]
        t_shape = target.shapes[t_name]
        t_canon = t_shape[::-1] if t_transposed and len(t_shape) == 2 else t_shape
        stacked = sum(c[0] for c in canon)
        lo, hi = hand.rows or (0, stacked)
        fits = all(c[1:] == t_canon[1:] for c in canon) and hi - lo == t_canon[0] and hi <= stacked
        mismatch = not fits and select
        if mismatch and hand.rows:
            raise OptionError(f"pairs['{t_name}']: target {list(t_canon)} cannot take rows {lo}:{hi} of aux {a_list} "
                              f"{[list(c) for c in canon]}, and weight selection (on_shape_mismatch='select') takes "
                              f"whole aux weights, not rows of them. Fix: name the aux weight(s) without 'rows' (q, "
                              f"k and v as a list for a fused qkv), or give rows that fit the target exactly.")
        if mismatch and any(len(c) != len(t_canon) for c in canon):
            raise ShapeMismatchError(f"pairs: target '{t_name}' {list(t_canon)} <- aux {a_list} "
                                     f"{[list(c) for c in canon]}: different ranks, which no selection can bridge.")
        if not fits and not select:
            raise ShapeMismatchError(f"pairs: target '{t_name}' {list(t_canon)} cannot take rows {lo}:{hi} of aux "
                                     f"{a_list} {[list(c) for c in canon]} (stacked along the output dimension). "
                                     f"Fix: on_shape_mismatch='select' takes the target's shape from a wider aux by "
                                     f"weight selection, or name aux weights (and rows) of the target's shape.")
        for (layout, n), side_rows in zip(zip(hand.layout, hand.heads), (t_canon[0], stacked)):
            try:
                head_widths(layout, n, side_rows) if layout else None
            except LayoutError:
                raise OptionError(f"pairs['{t_name}']: {side_rows} rows cannot be {n} heads of (q, k, v) laid out "
                                  f"as {layout!r}") from None
        old = replaced.get(t_name)
        regroup = "".join(f"+{step}[{n}]" for step, lay, n in zip(("to_heads", "from_heads"), hand.layout, hand.heads)
                          if lay)
        role = old.role if old else None
        t_block, a_block = (old.target_block, old.aux_block) if old else (None, None)
        if mismatch and not old:    # selection keeps heads whole: it needs the role and the blocks of the weight
            role = t_use.role if t_use else None
            t_block, a_block = block_of(t_name, target.blocks), block_of(a_list[0], aux.blocks)
        by_target[t_name] = Pair(
            target=t_name, aux=tuple(a_list),
            transform="override" + (f" concat_out[{len(a_list)}]" if len(a_list) > 1 else "")
                      + (f" rows {lo}:{hi}" if hand.rows else "") + regroup + (" shape_mismatch" if mismatch else ""),
            role=role, segment=old.segment if old else "body",
            target_block=t_block, aux_block=a_block,
            aux_transposed=a_transposed, out_slice=(lo, hi), target_transposed=t_transposed,
            flags=("override", "shape_mismatch") if mismatch else ("override",),
            layout=hand.layout, heads=hand.heads)
        unpaired.pop(t_name, None)
    order = {p.target: i for i, p in enumerate([*pairs, *replaced.values()])}
    return sorted(by_target.values(), key=lambda p: order.get(p.target, len(order)))


def _check_competition(pairs: list[Pair]) -> None:
    """Refuse target weights that would receive several aux weights, naming them all at once."""
    sources: dict[str, list[Pair]] = {}
    for p in pairs:
        known = sources.setdefault(p.target, [])
        if all(other.aux != p.aux for other in known):
            known.append(p)
    clashes = {name: found for name, found in sources.items() if len(found) > 1}
    if clashes:
        shown = "\n  ".join(f"{name} <- {' | '.join(p.source for p in found)}" for name, found in clashes.items())
        fix = {name: _as_override(found[0]) for name, found in clashes.items()}
        raise CompetingPairsError(
            f"{len(clashes)} target weight(s) would each receive several aux weights (the target reuses them in "
            f"several blocks, so each use found its own counterpart):\n  {shown}\nFix: pairs={fix!r} keeps the "
            f"first block's counterpart of each (or choose others), or exclude={[re.escape(n) for n in clashes]!r} "
            f"leaves them out.")
    # identical duplicates (a shared target layer paired with a shared aux layer) collapse to one pair
    unique: dict[str, Pair] = {}
    for p in pairs:
        unique.setdefault(p.target, p)
    pairs[:] = list(unique.values())

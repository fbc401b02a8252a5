"""The plan's outcome as a plain data object: every pair, what was left, and why.

``str(report)`` reads well in a terminal; ``report.to_dict()`` is JSON-ready. A :class:`Pair` also
carries the recipe that builds the aux tensor in the target's layout, so ``connect`` and
``pathway.load`` need nothing else.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Pair:
    """One target weight and the aux weights that feed its pathway.

    The aux tensor is built as: each ``aux`` weight in canonical ``[out, in, ...]`` layout
    (transposed first where ``aux_transposed``), concatenated along ``out``; then
    :func:`pathway.units.apply_layout` brings those rows into the split ``[q | k | v]`` order (when
    the aux is a per-head interleaved fused projection), takes rows ``out_slice[0]:out_slice[1]``
    and lays them out as the target stores them (per head, when the target is interleaved); the
    result is transposed again if ``target_transposed``.

    Per-head fields, ``(target, aux)`` each, read from the dataflow (None where it does not show):

    * ``layout``: the row layout of a fused attention projection, ``""`` for rows stored as
      ``[q | k | v]`` (timm ``qkv``, MHA ``in_proj_weight``, or any non-fused weight) or
      ``"heads"`` for rows stored ``[head, (q, k, v), head_dim]`` (GPT-NeoX, Bloom, Falcon-RW
      ``query_key_value``).
    * ``heads``: query heads of the attention this weight belongs to; ``kv_heads``: its key/value
      heads (fewer than ``heads`` under grouped-query attention, 1 under multi-query).

    Under ``on_shape_mismatch="select"`` a pair whose built rows do not fit the target is kept with
    the flag ``"shape_mismatch"`` (and ``"gqa"`` when key/value heads are what differs), for a shape
    policy to resolve; ``out_slice`` then spans the aux rows of the target's role.

    A plain MLP's fc1 paired with a gated (SwiGLU) MLP carries ``aux=(gate, up)`` and the flag
    ``"gated"``; ``out_slice`` spans the rows of the projection it takes (``up``, or ``gate`` under
    ``gated_mlp="gate"``) in the stack ``[gate | up]``. ``"order_by_name"`` / ``"order_by_execution"``
    say the dataflow did not show which projection passes through the activation, and what told them
    apart instead. Under ``"select"`` the plan's report names the one aux weight selected from.
    """

    target: str
    aux: tuple[str, ...]
    transform: str
    role: str | None = None
    segment: str = "body"
    target_block: int | None = None
    aux_block: int | None = None
    aux_transposed: tuple[bool, ...] = ()
    out_slice: tuple[int, int] = (0, 0)
    target_transposed: bool = False
    flags: tuple[str, ...] = ()
    layout: tuple[str, str] = ("", "")
    heads: tuple[int | None, int | None] = (None, None)
    kv_heads: tuple[int | None, int | None] = (None, None)

    @property
    def source(self) -> str:
        return _compact(self.aux)


@dataclass
class Report:
    """What ``plan``/``connect`` found for one aux model."""

    target: str
    aux: str
    target_reader: str
    aux_reader: str
    strategy: str                                   # "name" or "graph"
    depth_policy: str
    depth: tuple[int, int]                          # (target blocks, aux blocks)
    block_map: list[int | None]                     # target block i <- aux block block_map[i]
    pairs: list[Pair] = field(default_factory=list)
    unpaired: dict[str, str] = field(default_factory=dict)      # target body weight -> why
    unpaired_outside_body: dict[str, str] = field(default_factory=dict)  # pre/mid/post weights asked for, unpaired
    excluded: list[str] = field(default_factory=list)           # target weights left out by include/exclude
    outside_segments: list[str] = field(default_factory=list)   # pre/mid/post weights of the kinds, segments not asked
    unused_aux: list[str] = field(default_factory=list)         # aux body weights no pair uses
    never_used_target: list[str] = field(default_factory=list)  # parameters the traced forward never read
    never_used_aux: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    @property
    def coverage(self) -> tuple[int, int]:
        """(paired, total) target body weights of the connected kinds, excluded ones not counted.

        Every weight of those kinds the forward reads is in exactly one list: ``pairs``,
        ``unpaired`` (body), ``unpaired_outside_body``, ``excluded`` or ``outside_segments``.
        """
        body = [p for p in self.pairs if p.segment == "body"]
        return len(body), len(body) + len(self.unpaired)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["coverage"] = list(self.coverage)
        return d

    def __str__(self) -> str:
        paired, total = self.coverage
        lines = [
            f"pathway: {self.target} <- {self.aux}",
            f"  read        target: {self.target_reader}",
            f"              aux:    {self.aux_reader}",
            f"  matching    by {'name' if self.strategy == 'name' else 'graph position'}, depth policy "
            f"'{self.depth_policy}' ({self.depth[0]} target blocks <- {self.depth[1]} aux blocks)",
            (f"  coverage    {paired}/{total} target body weights paired; "
             f"{len(self.unused_aux)} aux body weights unused"
             + (f"; {len(self.outside_segments)} target weights outside the connected segments"
                if self.outside_segments else "")),
        ]
        if self.block_map and list(self.block_map) != list(range(len(self.block_map))):
            lines.append("  blocks      " + ", ".join(f"{i}<-{j}" for i, j in enumerate(self.block_map)))
        width = max((len(p.target) for p in self.pairs), default=0)
        lines.append(f"  pairs ({len(self.pairs)}):")
        lines += [f"    {p.target:<{width}} <- {p.source}  [{p.transform}]"
                  + (f"  {', '.join(p.flags)}" if p.flags else "") for p in self.pairs]
        for title, items in (("unpaired target body weights", [f"{n}: {why}" for n, why in self.unpaired.items()]),
                             ("unpaired target weights outside the body",
                              [f"{n}: {why}" for n, why in self.unpaired_outside_body.items()]),
                             ("excluded by include/exclude", self.excluded),
                             ("target weights outside the connected segments", self.outside_segments),
                             ("aux body weights unused", self.unused_aux),
                             ("target parameters never read by the traced forward", self.never_used_target),
                             ("aux parameters never read by the traced forward", self.never_used_aux),
                             ("flags", self.flags)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    {item}" for item in items]
        return "\n".join(lines)


def _compact(names: tuple[str, ...]) -> str:
    """``a.q.w, a.k.w, a.v.w`` -> ``a.{q,k,v}.w``."""
    if len(names) == 1:
        return names[0]
    prefix = os.path.commonprefix(list(names))
    prefix = prefix[: prefix.rfind(".") + 1]
    suffix = os.path.commonprefix([n[len(prefix):][::-1] for n in names])[::-1]
    suffix = suffix[suffix.find("."):] if "." in suffix else ""
    middles = [n[len(prefix): len(n) - len(suffix)] for n in names]
    return f"{prefix}{{{','.join(middles)}}}{suffix}"

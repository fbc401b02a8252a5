"""Which aux tensors (and which of their rows) a connect reads, each read once and dropped after its last use.

A pair under ``on_shape_mismatch="select"`` keeps some rows of a wider aux weight (whole heads of q,
k and v, the chosen hidden channels of an MLP). Read from disk, only those rows are taken
(safetensors slices, as runs of consecutive rows), and the selection's row indices are renumbered
into the compact tensor, so the built tensor is bit-identical to selecting from the whole one. A
row-major file cannot give evenly spaced columns more cheaply than their rows, so columns are
selected in memory. Weights read whole (every other pair, and aux weights stored transposed such as
GPT-2's ``Conv1D``, whose file rows are the selection's columns) keep ``rows=None``.

An aux model in memory is read through its modules, so an aux that is itself connected gives its
effective weight ``W + lambda * W_aux`` (what it computes), not its raw ``W``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

from .modules import plain_parameters
from .report import Pair
from .shapes import Selected
from .source import AuxSource
from .units import apply_layout

Rows = torch.Tensor | None
"""Sorted file rows of one aux tensor to read, or None for the whole tensor."""


def _stacked_rows(pair: Pair, selected: Selected, heights: list[int]) -> torch.Tensor:
    """Rows of the aux weights stacked as stored that the selection keeps, in the selection's order.

    A per-head interleaved aux (``[head, (q, k, v), head_dim]``) is regrouped before the selection;
    that permutation is applied here to row numbers instead of rows.
    """
    total = sum(heights)
    order = torch.arange(total)
    if pair.layout[1]:
        order = apply_layout(dataclasses.replace(pair, layout=("", pair.layout[1]), out_slice=(0, total)), order)
    return order[selected.rows]


def _heights(names: tuple[str, ...], transposed: tuple[bool, ...], shapes: Mapping[str, torch.Size]) -> list[int]:
    return [shapes[n][1] if flip and len(shapes[n]) == 2 else shapes[n][0] for n, flip in zip(names, transposed)]


def rows_needed(pair: Pair, selected: Selected | None, shapes: Mapping[str, torch.Size]) -> dict[str, Rows]:
    """File rows of each aux weight that ``pair`` keeps (None: read it whole)."""
    if selected is None:
        return dict.fromkeys(pair.aux)
    wanted = _stacked_rows(pair, selected, _heights(selected.aux, selected.aux_transposed, shapes))
    needed: dict[str, Rows] = {}
    start = 0
    for name, flip, height in zip(selected.aux, selected.aux_transposed,
                                  _heights(selected.aux, selected.aux_transposed, shapes)):
        mine = wanted[(wanted >= start) & (wanted < start + height)] - start
        needed[name] = None if flip else torch.unique(mine)
        start += height
    return needed


def merge_rows(a: Rows, b: Rows) -> Rows:
    """Rows two pairs need of one tensor: their union, or None if either reads it whole."""
    return None if a is None or b is None else torch.unique(torch.cat([a, b]))


def compact(pair: Pair, selected: Selected, held: Mapping[str, Rows],
            shapes: Mapping[str, torch.Size]) -> tuple[Pair, Selected]:
    """``pair`` and ``selected`` renumbered to read the tensors ``held`` (only some rows of each).

    The aux's per-head regrouping is folded into the renumbered rows, so the returned pair has none.
    """
    heights = _heights(selected.aux, selected.aux_transposed, shapes)
    wanted = _stacked_rows(pair, selected, heights)
    position = torch.full((sum(heights),), -1, dtype=torch.long)
    start = kept = 0
    for name, height in zip(selected.aux, heights):
        rows = held[name] if held[name] is not None else torch.arange(height)
        position[start + rows] = kept + torch.arange(len(rows))
        start, kept = start + height, kept + len(rows)
    renumbered = position[wanted]
    if (renumbered < 0).any():   # rows_needed and compact read one rule; this guards it
        raise AssertionError(f"{pair.target}: a selected row of {selected.aux} was not read")
    return (dataclasses.replace(pair, layout=(pair.layout[0], "")),
            dataclasses.replace(selected, rows=renumbered))


class AuxTensors:
    """The aux tensors the pairs read, each fetched once and dropped after the last pair using it."""

    def __init__(self, fetch: Callable[[dict[str, Rows]], Mapping[str, torch.Tensor]], needs: list[dict[str, Rows]],
                 shapes: Mapping[str, torch.Size]):
        self.fetch, self.shapes, self.held = fetch, shapes, {}
        self.uses: Counter[str] = Counter(n for need in needs for n in need)
        self.rows: dict[str, Rows] = {}
        for need in needs:
            for name, rows in need.items():
                self.rows[name] = merge_rows(self.rows[name], rows) if name in self.rows else rows

    def build(self, pair: Pair, selected: Selected | None,
              materialise: Callable[[Pair, Mapping[str, torch.Tensor], Selected | None], torch.Tensor]) -> torch.Tensor:
        """``materialise(pair, tensors, selected)`` on the tensors read for ``pair``, then released."""
        names = selected.aux if selected is not None else pair.aux
        missing = {n: self.rows[n] for n in dict.fromkeys(names) if n not in self.held}
        self.held.update(self.fetch(missing) if missing else {})
        if selected is not None and any(self.rows[n] is not None for n in names):
            pair, selected = compact(pair, selected, {n: self.rows[n] for n in names}, self.shapes)
        built = materialise(pair, {n: self.held[n] for n in names}, selected)
        for name in names:
            self.uses[name] -= 1
            if self.uses[name] <= 0:
                self.held.pop(name, None)
        return built


def aux_tensors(aux: nn.Module | AuxSource, reads: list[tuple[Pair, Selected | None]]) -> AuxTensors:
    """The reader for ``reads`` (pairs with their selections): sliced from disk, or whole from memory."""
    if isinstance(aux, AuxSource):
        shapes = {n: p.shape for n, p in plain_parameters(aux.model).items()}   # the files' (open_aux checked)
        return AuxTensors(lambda need: aux.read(need, rows=need), [rows_needed(p, s, shapes) for p, s in reads],
                          shapes)
    model = getattr(aux, "_orig_mod", aux)
    return AuxTensors(lambda need: {n: effective_weight(model, n) for n in need},
                      [dict.fromkeys(s.aux if s is not None else p.aux) for p, s in reads], {})


def effective_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight ``model`` computes with at ``name``: through its parametrizations (its own pathways) if any."""
    path, _, tensor = name.rpartition(".")
    with torch.no_grad():
        return getattr(model.get_submodule(path) if path else model, tensor).detach()

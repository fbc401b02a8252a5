"""Units: the weights that play one part together, placed in pre / body blocks / mid / post.

Siblings that read the same activation in separate calls form one unit (BERT's q, k, v reading
one hidden state become one ``[3D, D]`` unit, as timm's fused ``qkv`` is), ordered q, k, v by
their dataflow roles; attention projections and the MLP of a parallel block, which read one
activation too, stay apart. Units are then placed by the body blocks the module tree shows; a model
that applies one shared layer several times (ALBERT) has no repeated children, so its use
sequence is unrolled into one virtual block per application.

Two siblings without attention roles whose outputs meet in one product that a later weight reads
are the input projections of a gated MLP (SwiGLU: ``down(act(gate(x)) * up(x))``). They are ordered
(gate, up): by the dataflow where it shows which one passes through the activation before the
product, else by known names (``gate_proj``/``up_proj``, ...), else by execution order, flagged
``order_by_name`` or ``order_by_execution``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import torch

from .errors import LayoutError
from .modules import block_of
from .report import Pair
from .shapes import gate_by_name
from .trace import Op, Trace, WeightUse

_ROLE_ORDER = "qkv"


@dataclass
class Unit:
    members: list[WeightUse]          # in concatenation order (q, k, v when roles are known)
    kind: str
    segment: str                      # "pre" | "body" | "mid" | "post"
    block: int | None
    flags: list[str] = field(default_factory=list)
    gated: str = ""                   # a gated MLP's (gate, up) ordered by "dataflow", "name" or "execution";
                                      # "fused": one projection whose rows are [gate | up] (Phi-3's gate_up_proj)

    @property
    def gated_pair(self) -> bool:
        """The two input projections of a gated MLP, as (gate, up)."""
        return len(self.members) == 2 and self.gated in ("dataflow", "name", "execution")

    @property
    def plain(self) -> bool:
        """One weight without an attention role that is not a fused [gate | up] projection."""
        return len(self.members) == 1 and self.role is None and self.gated != "fused"

    @property
    def shape(self) -> tuple[int, ...]:
        """Canonical shape of the members stacked along the output dimension."""
        first = self.members[0].shape
        return (sum(m.shape[0] for m in self.members), *first[1:])

    @property
    def role(self) -> str | None:
        roles = [m.role for m in self.members]
        if len(self.members) > 1 and set(roles) <= set(_ROLE_ORDER) and len(set(roles)) == len(roles):
            return "qkv" if len(roles) == 3 else "".join(roles)
        return roles[0] if len(roles) == 1 else None

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def heads(self) -> int | None:
        """Query heads, where the dataflow shows them (the view that splits q, or a fused qkv, into heads)."""
        lead = next((m for m in self.members if m.role in ("q", "qkv")), None)
        return lead.heads if lead else None

    @property
    def kv_heads(self) -> int | None:
        """Key/value heads: those of k (split), or of a fused qkv (equal to ``heads`` unless it says otherwise)."""
        k = next((m for m in self.members if m.role in ("k", "qkv")), None)
        return (k.kv_heads if k.role == "qkv" else k.heads) if k else None

    def role_rows(self) -> dict[str, tuple[int, int]] | None:
        """Rows of q, k and v in ``[q | k | v]`` order; None where the roles do not show them."""
        if len(self.members) == 3 and [m.role for m in self.members] == list(_ROLE_ORDER):
            bounds, start = {}, 0
            for m in self.members:
                bounds[m.role] = (start, start + m.shape[0])
                start += m.shape[0]
            return bounds
        if len(self.members) == 1 and self.role == "qkv" and self.members[0].part_rows:
            q, k, v = self.members[0].part_rows
            return {"q": (0, q), "k": (q, q + k), "v": (q + k, q + k + v)}
        return None


def _group(uses: list[WeightUse]) -> list[list[WeightUse]]:
    """Siblings: same input activation, same kind, same input dims, different calls."""
    groups: dict[tuple, list[WeightUse]] = {}
    order: list[tuple] = []
    for use in uses:
        key = (use.input, use.kind, use.shape[1:]) if use.input is not None else ("alone", use.index)
        if key in groups and any(m.call == use.call for m in groups[key]):
            key = ("alone", use.index)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(use)
    parts = [part for k in order for part in _by_consumer(groups[k])]
    return sorted(parts, key=lambda part: part[0].index)   # a split-off MLP goes where it runs


def _by_consumer(group: list[WeightUse]) -> list[list[WeightUse]]:
    """Split siblings by what reads their outputs: attention (q, k, v) apart from the rest.

    A parallel block (GPT-J, Phi, Falcon) feeds one LayerNorm output to q, k, v and the MLP's
    first linear; only the attention projections form the fused-like unit.
    """
    attention = [m for m in group if m.role in ("q", "k", "v", "qkv")]
    rest = [m for m in group if m.role not in ("q", "k", "v", "qkv")]
    return [part for part in (attention, rest) if part] if attention and rest else [group]


def _ordered(members: list[WeightUse]) -> tuple[list[WeightUse], list[str]]:
    roles = [m.role for m in members]
    if len(members) > 1 and all(r in ("q", "k", "v") for r in roles) and len(set(roles)) == len(roles):
        return sorted(members, key=lambda m: _ROLE_ORDER.index(m.role)), []
    if len(members) > 1:
        return members, ["order_by_execution"]
    return members, []


def build_units(trace: Trace, blocks: list[str], kinds: tuple[str, ...], ops: list[Op] | None = None
                ) -> tuple[list[Unit], int]:
    """Units of ``trace`` restricted to ``kinds``, placed by ``blocks``; returns (units, depth).

    ``ops`` are the calls the trace was read from; they show which input projection of a gated MLP
    is the gate (without them, names or execution order tell, flagged).
    """
    uses = [u for u in trace.uses if u.kind in kinds]
    units = []
    for group in _group(uses):
        members, flags = _ordered(group)
        gated = ""
        if _is_gated(members, trace.uses):
            members, gated = _gate_first(members, ops)
            flags = [] if gated == "dataflow" else [f"order_by_{gated}"]
        elif _is_fused_gated(members, trace.uses):
            gated = "fused"
        block = block_of(members[0].name, blocks)
        units.append(Unit(members, members[0].kind, "body" if block is not None else "", block, flags, gated))
    depth = len(blocks)
    if depth == 0:
        units, depth = _unroll(units, trace.sequence)
    _place(units)
    return units, depth


def _is_gated(members: list[WeightUse], uses: list[WeightUse]) -> bool:
    """Two equal linear siblings without roles whose outputs (and nothing else) a later weight reads together."""
    if len(members) != 2 or any(m.kind != "linear" or m.role for m in members):
        return False
    if members[0].shape != members[1].shape:
        return False
    both = frozenset(m.index for m in members)
    return any(u.input_tags == both for u in uses)


def _is_fused_gated(members: list[WeightUse], uses: list[WeightUse]) -> bool:
    """One linear without a role whose reader (the only weight reading what it made) takes half its rows:
    its output was cut in two, gate and up, and their product read (Phi-3's ``gate_up_proj``)."""
    if len(members) != 1 or members[0].kind != "linear" or members[0].role:
        return False
    m = members[0]
    readers = [u for u in uses if u.input_tags == frozenset([m.index]) and u.index != m.index]
    return len(readers) == 1 and len(readers[0].shape) == 2 and 2 * readers[0].shape[1] == m.shape[0]


_WEIGHT_OPS = ("linear", "conv", "embedding", "matmul", "mha", "sdpa")


def read_gate(ops: list[Op], first: WeightUse, second: WeightUse) -> int | None:
    """Which of two sibling projections is a gated MLP's gate (0: ``first``, 1: ``second``), from the dataflow.

    Each projection's output is followed through the calls after it until the one call that reads
    both (the product). The gate's path passes through an activation (a call that reads nothing but
    that path: SiLU, GELU, sigmoid); the up path reaches the product without one. None where that is
    not what the calls show: neither or both paths activated, the product not a plain call, or a path
    read by another weight first.
    """
    chains = (set(ops[first.call].outputs), set(ops[second.call].outputs))
    activated = [0, 0]
    for op in ops[min(first.call, second.call) + 1:]:
        refs = set(op.touched)
        hit = [k for k in (0, 1) if chains[k] & refs]
        if len(hit) == 2:
            if op.kind != "other":
                return None
            gates = [k for k in (0, 1) if activated[k]]
            return gates[0] if len(gates) == 1 else None
        if not hit:
            continue
        k = hit[0]
        if op.kind in _WEIGHT_OPS:
            return None
        chains[k].update(op.outputs)
        if op.kind == "other" and refs <= chains[k]:
            activated[k] += 1
    return None


def _gate_first(members: list[WeightUse], ops: list[Op] | None) -> tuple[list[WeightUse], str]:
    """A gated MLP's two projections as (gate, up), and what told their order."""
    gate = read_gate(ops, *members) if ops else None
    how = "dataflow"
    if gate is None:
        gate, how = gate_by_name([m.name for m in members]), "name"
    if gate is None:
        gate, how = 0, "execution"
    return [members[gate], members[1 - gate]], how


def _place(units: list[Unit]) -> None:
    """Units outside blocks are pre (before the body), post (after it) or mid (between blocks)."""
    body = [i for i, u in enumerate(units) if u.block is not None]
    for i, unit in enumerate(units):
        if unit.block is None:
            unit.segment = "pre" if not body or i < body[0] else "post" if i > body[-1] else "mid"


def _unroll(units: list[Unit], sequence: list[str]) -> tuple[list[Unit], int]:
    """One shared layer applied n times -> n virtual blocks (period of the most used weight)."""
    counts = Counter(sequence)
    if not counts or counts.most_common(1)[0][1] < 2:
        return units, 0
    anchor, times = counts.most_common(1)[0]
    starts = [i for i, name in enumerate(sequence) if name == anchor]
    period = starts[1] - starts[0]
    by_name = {m.name: u for u in units for m in u.members}
    shared = {m.name for u in units for m in u.members if counts[m.name] == times}
    virtual: list[Unit] = []
    for k, start in enumerate(starts):
        seen: set[int] = set()
        for name in sequence[start:start + period]:
            unit = by_name.get(name)
            if name in shared and unit is not None and id(unit) not in seen:
                seen.add(id(unit))
                virtual.append(replace(unit, block=k, segment="body", flags=[*unit.flags, "shared_block"]))
    first_shared = by_name[anchor].members[0].index
    rest = [u for u in units if not any(m.name in shared for m in u.members)]
    pre = [u for u in rest if u.members[0].index < first_shared]
    post = [u for u in rest if u.members[0].index >= first_shared]
    return pre + virtual + post, times


def head_widths(layout: str, heads: int, rows: int) -> tuple[int, int, int]:
    """Per-head widths of q, k and v in rows laid out per head: ``"heads"`` (equal thirds) or ``"heads:a,b,c"``."""
    _, _, given = layout.partition(":")
    widths = tuple(int(w) for w in given.split(",")) if given else (rows // (3 * heads),) * 3
    if len(widths) != 3 or heads * sum(widths) != rows:
        raise LayoutError(f"a per-head row layout {layout!r} with {heads} heads does not fit {rows} rows: "
                          f"heads x (q + k + v widths) must equal the rows")
    return widths


def per_head_rows(layout: str, heads: int, rows: int) -> torch.Tensor:
    """For each row of ``[q | k | v]``, the row that holds it when rows are laid out per head
    ``[head, (q, k, v)]`` with the widths ``layout`` gives (see :func:`head_widths`)."""
    widths = head_widths(layout, heads, rows)
    stride, offsets = sum(widths), (0, widths[0], widths[0] + widths[1])
    return torch.cat([(torch.arange(heads)[:, None] * stride + off + torch.arange(w)).flatten()
                      for off, w in zip(offsets, widths)])


def apply_layout(pair: Pair, stacked: torch.Tensor) -> torch.Tensor:
    """The target's rows of ``pair`` from its aux weights stacked in canonical ``[out, in, ...]`` layout.

    ``stacked`` is the concatenation of ``pair.aux`` (each transposed where ``aux_transposed``).
    Rows laid out per head (``[head, (q, k, v), head_dim]``, or of unequal q/k/v widths) are brought
    to the split ``[q | k | v]`` order first, ``out_slice`` is taken there, and the result is laid out
    per head again if the target stores it so. The caller transposes the result when
    ``pair.target_transposed``.
    """
    (t_layout, a_layout), (t_heads, a_heads) = pair.layout, pair.heads
    rows = stacked
    if a_layout:
        rows = rows.index_select(0, per_head_rows(a_layout, a_heads, len(rows)).to(rows.device))
    rows = rows[pair.out_slice[0]:pair.out_slice[1]]
    if t_layout:
        order = per_head_rows(t_layout, t_heads, len(rows)).argsort()
        rows = rows.index_select(0, order.to(rows.device))
    return rows

"""Which rows of a fused projection reach attention as q, k and v: row provenance, read from the graph.

A fused projection (timm's ``qkv``, GPT-NeoX's and Falcon's ``query_key_value``, Phi-3's ``qkv_proj``,
a LeViT-style block) stores q, k and v in one weight. How its rows divide into the three, and into
heads, is decided only by what the forward does with its output: views, ``unflatten``, ``split`` /
``chunk`` / ``unbind``, indexing and slicing, transposes. Rather than recognise known patterns of
those (transformers rewrites them between releases: Falcon moved from ``view`` + indexing to
``unflatten`` + ``unbind`` and ``split([heads, 1, 1])``), each such op is replayed on a tensor of *row
numbers*: which row of the weight each element of the value came from. Dims that are not rows
(batch, tokens) are size-1 placeholders. What reaches attention (SDPA's q, k, v; ``q @ k^T``;
``probs @ v``) then names the rows of each role, and the layout is read from those row sets:

* ``""``: rows ``[q | k | v]`` (timm, GPT-2, Phi-3; k and v narrower under multi-/grouped-query
  attention, Falcon-7B);
* ``"heads"``: per head ``[head, (q, k, v), head_dim]`` (GPT-NeoX, Bloom, Falcon-RW);
* ``"heads:a,b,c"``: per head, q, k and v of unequal widths a, b and c (LeViT:
  ``view(B, N, heads, -1).split([24, 24, 48], dim=3)``);
* None, with a note saying what was seen, for anything else: rows grouped per key/value group
  (Falcon-40B), parts reaching attention in another order than q, k, v, a path not followed.

An op that cannot be replayed keeps the value's set of rows but forgets their arrangement
(``frozen``); an op that would take a subset of a frozen value's rows drops it. Nothing is assumed
where the replay stops: a layout is only read from row sets that reached attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .trace import Op, WeightUse

LAYOUT_OPS = ("view", "flatten", "unflatten", "split", "index", "transpose", "permute", "keep")
"""Op kinds that rearrange a value without mixing it with others: replayed on row numbers."""


@dataclass(frozen=True)
class Rows:
    """Row numbers of one weight use's output, laid out as a value's trailing dims."""

    use: int
    index: torch.Tensor              # row numbers; size 1 on dims that are not rows (batch, tokens)
    row_dims: tuple[bool, ...]       # per dim of ``index``: True where it runs over rows
    full: bool = False               # ``index`` spans all of the value's dims (else its trailing ones)
    frozen: bool = False             # the set of rows is right, their arrangement no longer followed

    def padded(self, dims: int) -> Rows:
        """At least ``dims`` dims, placeholders added in front."""
        extra = dims - self.index.dim()
        if extra <= 0:
            return self
        return replace(self, index=self.index.reshape((1,) * extra + tuple(self.index.shape)),
                       row_dims=(False,) * extra + self.row_dims)

    def at(self, dims: list[Any]) -> tuple[Rows, list[int]] | None:
        """``self`` padded to reach the value's ``dims`` and their positions in ``index``; None where a
        dim cannot be placed (not an int, or counted from the front of a value of unknown rank)."""
        need = self.index.dim()
        for d in dims:
            if not isinstance(d, int) or isinstance(d, bool):
                return None
            if d < 0:
                if self.full and -d > need:
                    return None
                need = max(need, -d)
            elif not self.full or d >= need:
                return None
        rows = self.padded(need)
        return rows, [d % need for d in dims]

    def frozen_copy(self) -> Rows:
        return replace(self, frozen=True)

    def row_set(self) -> torch.Tensor:
        return self.index.flatten().unique()

    def head_dim(self) -> int | None:
        """Size of the last dim, where it still runs over rows: the head size of a q, k or v."""
        if self.frozen or not self.row_dims or not self.row_dims[-1]:
            return None
        return self.index.shape[-1]


def factors(sizes: tuple[int | None, ...], rows: int) -> tuple[int, ...] | None:
    """How a view splits ``rows`` over its trailing dims (``[.., 3, H, hd]`` -> (3, H, hd)); None if unread.

    One unknown size among them (a -1, or a value fx traced, e.g. ``C // heads``) stands for what the
    known sizes between it and the next unknown leave of ``rows``.
    """
    found: list[int] = []
    product, resolved = 1, False
    for i in range(len(sizes) - 1, -1, -1):
        size = sizes[i]
        if size is None or size == -1:
            if resolved:
                return None
            left = 1
            for other in reversed(sizes[:i]):
                if other is None or other == -1:
                    break
                left *= other
            if rows % (product * left):
                return None
            size, resolved = rows // (product * left), True
        found.append(size)
        product *= size
        if product == rows:
            return tuple(reversed(found))
        if product > rows:
            return None
    return None


def _view(rows: Rows, sizes: tuple[int | None, ...] | None, in_shape: tuple[int, ...] | None) -> Rows:
    """A view/reshape to ``sizes``; ``in_shape`` is the input's real shape where the reader has it."""
    if rows.frozen or sizes is None or True not in rows.row_dims:
        return rows.frozen_copy()
    if in_shape is not None and len(in_shape) >= rows.index.dim():
        rows = replace(rows.padded(len(in_shape)), full=True)
    first = rows.row_dims.index(True)
    if not all(rows.row_dims[first:]):          # a placeholder (tokens) between row dims
        return _fold_leading(rows, sizes, in_shape)
    f = factors(sizes, rows.index.numel())
    if f is None:
        return rows.frozen_copy()
    lead = max(len(sizes) - len(f), 0)
    return Rows(rows.use, rows.index.reshape((1,) * lead + f), (False,) * lead + (True,) * len(f), True)


def _at_rank(rows: Rows, shape: tuple[int, ...] | None) -> Rows:
    """``rows`` of a value whose shape the runtime recorder saw (an expand or a broadcast may add leading dims)."""
    if shape is None or rows.frozen:
        return rows
    if len(shape) < rows.index.dim():
        return rows.frozen_copy()
    return replace(rows.padded(len(shape)), full=True)


def _fold_leading(rows: Rows, sizes: tuple[int | None, ...], in_shape: tuple[int, ...] | None) -> Rows:
    """A view that keeps the trailing dims and folds the leading ones (Bloom: ``[B, H, T, hd]`` ->
    ``[B * H, T, hd]``; old Falcon: the same shape again). Kept dims are told by their sizes: a row dim's
    own, a placeholder's real one (runtime only). The folded dims may hold one row dim, last, after
    placeholders of real size 1 (the example batch), which then runs over it; anything else is not followed."""
    n, kept = rows.index.dim(), 0
    real = in_shape[-n:] if in_shape is not None and len(in_shape) == n else None
    while kept < min(n, len(sizes)) - 1:
        j = -1 - kept
        want = real[j] if real is not None else rows.index.shape[j] if rows.row_dims[j] else None
        if want is None or sizes[j] != want:
            break
        kept += 1
    folded, lead = rows.row_dims[:n - kept], len(sizes) - kept
    tail, tail_dims = tuple(rows.index.shape[n - kept:]), rows.row_dims[n - kept:]
    if not any(folded):
        return Rows(rows.use, rows.index.reshape((1,) * lead + tail), (False,) * lead + tail_dims, True)
    exact = real is not None and all(real[k] == 1 for k in range(n - kept - 1))
    if lead != 1 or sum(folded) != 1 or not folded[-1] or not exact:
        return rows.frozen_copy()
    return Rows(rows.use, rows.index.reshape(rows.index.shape[n - kept - 1:]), (True, *tail_dims), True)


def _unflatten(rows: Rows, dim: Any, sizes: tuple[int | None, ...]) -> Rows:
    placed = rows.at([dim]) if not rows.frozen else None
    if placed is None or sum(s is None or s == -1 for s in sizes) > 1:
        return rows.frozen_copy()
    rows, (k,) = placed
    is_rows = rows.row_dims[k]
    shape = tuple(-1 if s is None else s for s in sizes) if is_rows else (1,) * len(sizes)
    try:
        index = rows.index.unflatten(k, shape)
    except RuntimeError:
        return rows.frozen_copy()
    return replace(rows, index=index, row_dims=rows.row_dims[:k] + (is_rows,) * len(sizes) + rows.row_dims[k + 1:])


def _flatten(rows: Rows, start: Any, end: Any) -> Rows:
    placed = rows.at([start, end]) if not rows.frozen else None
    if placed is None:
        return rows.frozen_copy()
    rows, (s, e) = placed
    kinds = set(rows.row_dims[s:e + 1])
    if len(kinds) != 1:                          # rows merged with tokens or batch: not followed
        return rows.frozen_copy()
    return replace(rows, index=rows.index.flatten(s, e), row_dims=rows.row_dims[:s] + (kinds.pop(),)
                   + rows.row_dims[e + 1:])


def _transpose(rows: Rows, how: tuple[Any, ...]) -> Rows:
    """``how``: ``("t",)``, ``("T",)``, ``(d0, d1)`` or ``("permute", *dims)``."""
    if rows.frozen:
        return rows
    if how[0] == "permute":
        dims = list(how[1:])
        if not all(isinstance(d, int) for d in dims):
            return rows.frozen_copy()
        rows = replace(rows.padded(len(dims)), full=True)
        if rows.index.dim() != len(dims):
            return rows.frozen_copy()
        order = [d % len(dims) for d in dims]
    elif how[0] in ("t", "T"):
        if not rows.full and how[0] == "T":
            return rows.frozen_copy()
        rows = replace(rows.padded(2), full=True) if how[0] == "t" else rows
        order = list(range(rows.index.dim()))[::-1]
    else:
        placed = rows.at(list(how))
        if placed is None:
            return rows.frozen_copy()
        rows, (a, b) = placed
        order = list(range(rows.index.dim()))
        order[a], order[b] = order[b], order[a]
    return replace(rows, index=rows.index.permute(order), row_dims=tuple(rows.row_dims[k] for k in order))


def _split(rows: Rows, how: str, dim: Any, spec: Any, parts: int | None) -> list[Rows | None] | Rows | None:
    """The parts of a chunk/split/unbind/tensor_split: a list (one per part), or one Rows every part
    shares (split along a placeholder dim, count unknown), or None where the rows are not followed."""
    placed = rows.at([dim]) if not rows.frozen else None
    if placed is None:
        return None
    rows, (k,) = placed
    if not rows.row_dims[k]:
        if how == "unbind":
            rows = replace(rows, index=rows.index.select(k, 0), row_dims=rows.row_dims[:k] + rows.row_dims[k + 1:])
        return [rows] * parts if parts else rows
    try:
        if how == "unbind":
            pieces = rows.index.unbind(k)
            dims = rows.row_dims[:k] + rows.row_dims[k + 1:]
            return [replace(rows, index=p, row_dims=dims) for p in pieces]
        spec = list(spec) if isinstance(spec, (list, tuple)) else spec
        pieces = getattr(rows.index, how)(spec, k)
    except (RuntimeError, TypeError, ValueError):
        return None
    return [replace(rows, index=p) for p in pieces]


def _index(rows: Rows, items: tuple[Any, ...] | None) -> Rows | None:
    """``value[items]`` replayed on the row numbers; None where it cannot be (a subset of unknown rows)."""
    if items is None or rows.frozen:
        return None
    consuming = [i for i in items if i is not None and i is not Ellipsis]
    lists = sum(isinstance(i, list) for i in items)
    if lists > 1 or lists and any(isinstance(i, int) for i in items):    # torch would move the indexed dims first
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        before, after = items[:at], items[at + 1:]
        if any(i is not None for i in before) and not rows.full:
            return None
        rows = rows.padded(len(consuming))
        middle = rows.index.dim() - len(consuming)
        items = before + (slice(None),) * middle + after
    elif not rows.full:
        return None
    rows = rows.padded(len(consuming))
    if sum(i is not None for i in items) > rows.index.dim():
        return None
    picked, dims, k = [], [], 0
    for item in items:
        if item is None:
            picked.append(None)
            dims.append(False)
            continue
        is_rows = rows.row_dims[k] if k < len(rows.row_dims) else False
        if is_rows:
            picked.append(item)
        elif isinstance(item, list):
            return None
        else:
            picked.append(0 if isinstance(item, int) else slice(None))
        if not isinstance(item, int):
            dims.append(is_rows)
        k += 1
    dims += list(rows.row_dims[k:])
    try:
        index = rows.index[tuple(picked)]
    except (IndexError, RuntimeError, TypeError):
        return None
    if index.dim() != len(dims):
        return None
    return replace(rows, index=index, row_dims=tuple(dims))


def _cat(parts: list[Rows | None], dim: Any) -> Rows | None:
    """``torch.cat`` replayed: along a row dim, of parts of one weight's output (partial rotary: rotated and
    passed dims); along another dim (tokens: a key cache, a class token) the rows stay those of the parts."""
    found = [p for p in parts if p is not None]
    if not found or len({p.use for p in found}) != 1 or any(p.frozen for p in found):
        return None
    placed = [p.at([dim]) for p in found]
    if any(p is None for p in placed):
        return None
    aligned = [p.padded(max(q.index.dim() for q, _ in placed)) for p, _ in placed]
    k = aligned[0].index.dim() + dim if dim < 0 else dim
    if len({p.row_dims for p in aligned}) != 1:
        return None
    if not aligned[0].row_dims[k]:
        same = all(torch.equal(p.index, aligned[0].index) for p in aligned[1:])
        return aligned[0] if same else None
    if len(found) != len(parts):                # rows joined with values of no weight's rows
        return None
    try:
        return replace(aligned[0], index=torch.cat([p.index for p in aligned], k))
    except RuntimeError:
        return None


@dataclass
class RowReader:
    """Follows each linear's output rows through the forward to the attention slots they reach."""

    uses: list[WeightUse]
    values: dict[int, Rows] = field(default_factory=dict)
    unpacked: dict[int, list[Rows | None] | Rows] = field(default_factory=dict)   # fx: a split node's parts
    reached: dict[int, dict[str, list[Rows]]] = field(default_factory=dict)       # use -> slot -> rows seen there
    views: dict[int, tuple[int, ...]] = field(default_factory=dict)               # use -> last view of all its rows
    attention_heads: dict[int, tuple[int, int]] = field(default_factory=dict)     # use -> SDPA's (q heads, kv heads)

    def start(self, use: int, outputs: tuple[int, ...]) -> None:
        rows = self.uses[use].shape[0]
        for out in outputs:
            self.values[out] = Rows(use, torch.arange(rows), (True,))

    def step(self, op: Op) -> None:
        """Replay one layout op (see :data:`LAYOUT_OPS`) on the rows of its input."""
        source = op.args[0] if op.args and isinstance(op.args[0], int) else None
        if op.kind == "index" and source in self.unpacked:      # fx: getitem(split node, k)
            parts, k = self.unpacked[source], op.info[0] if op.info else None
            picked = parts if isinstance(parts, Rows) else (
                parts[k] if isinstance(k, int) and -len(parts) <= k < len(parts) else None)
            self._set(op.outputs, picked)
            return
        rows = self.values.get(source)
        if rows is None:
            return
        if op.kind == "view":
            out = _view(rows, op.info, op.in_shape)
            if not out.frozen and out.index.numel() == self.uses[rows.use].shape[0]:
                self.views[rows.use] = tuple(s for s, r in zip(out.index.shape, out.row_dims) if r)
        elif op.kind == "unflatten":
            out = _unflatten(rows, op.info[0], tuple(op.info[1:]))
        elif op.kind == "flatten":
            out = _flatten(rows, *op.info)
        elif op.kind in ("transpose", "permute"):
            out = _transpose(rows, op.info)
        elif op.kind == "index":
            out = _index(rows, op.info)
        elif op.kind == "split":
            how, dim, spec = op.info
            parts = _split(rows, how, dim, spec, len(op.outputs) if len(op.outputs) > 1 else None)
            if len(op.outputs) > 1:
                for k, value in enumerate(op.outputs):
                    self._set((value,), parts[k] if isinstance(parts, list) and k < len(parts) else parts)
            elif parts is not None:
                self.unpacked[op.outputs[0]] = parts
            return
        else:
            out = _at_rank(rows, op.shape)
        self._set(op.outputs, out)

    def _set(self, outputs: tuple[int, ...], rows: Rows | None) -> None:
        for out in outputs:
            if rows is None:
                self.values.pop(out, None)
            else:
                self.values[out] = rows

    def combine(self, kept: list[int], outputs: tuple[int, ...], shape: tuple[int, ...] | None = None) -> None:
        """An elementwise op keeps the rows of ``kept`` (its inputs whose elements stay in place) where every
        one of them that carries rows carries the same set of one weight's rows (rotary: ``q * cos +
        rotate_half(q) * sin``); values without rows (cos, sin, a scale) do not change them. Any other op
        (a gather, a reduction, a roll) drops them."""
        found = [self.values[v] for v in kept if v in self.values]
        if not found:
            self._set(outputs, None)
            return
        first = found[0]
        same = all(r.use == first.use and torch.equal(r.row_set(), first.row_set()) for r in found[1:])
        self._set(outputs, _at_rank(first, shape) if same else None)

    def cat(self, values: list[Any], outputs: tuple[int, ...], dim: Any) -> None:
        if any(v in self.values for v in values):
            self._set(outputs, _cat([self.values.get(v) for v in values], dim))

    def reached_slot(self, value: Any, slot: str, transposed: bool = False) -> None:
        """Attention read ``value`` as its ``slot`` (q, k or v); ``transposed``: as ``k^T`` in ``q @ k^T``."""
        rows = self.values.get(value) if isinstance(value, int) else None
        if rows is None:
            return
        if transposed and not rows.frozen and rows.index.dim() >= 2:
            rows = _transpose(rows, (-2, -1))
        self.reached.setdefault(rows.use, {}).setdefault(slot, []).append(rows)

    def at_matmul(self, left: Any, right: Any) -> None:
        """``q @ k^T`` (rows on both sides) or ``probs @ v`` (rows on the right only)."""
        if left in self.values and right in self.values:
            self.reached_slot(left, "q")
            self.reached_slot(right, "k", transposed=True)
        elif right in self.values:
            self.reached_slot(right, "v")

    def at_sdpa(self, args: tuple[Any, ...], heads: tuple[int, ...]) -> None:
        for value, slot in zip(args, "qkv"):
            self.reached_slot(value, slot)
            rows = self.values.get(value) if isinstance(value, int) else None
            if rows is not None and heads:
                self.attention_heads[rows.use] = heads

    def from_mha(self, use: int, role: str, heads: int) -> None:
        """``F.multi_head_attention_forward``: torch's own code, whose in_proj rows are ``[q | k | v]``."""
        u = self.uses[use]
        u.heads = heads
        if role == "qkv":
            u.layout, u.kv_heads, u.part_rows = "", heads, (u.shape[0] // 3,) * 3

    def finish(self) -> None:
        for i, use in enumerate(self.uses):
            if use.heads is not None:
                continue
            reached = self.reached.get(i, {})
            if use.role == "qkv":
                _read_fused(use, reached, self.views.get(i), self.attention_heads.get(i))
            elif use.role in ("q", "k", "v"):
                dims = [r.head_dim() for r in reached.get(use.role, []) if r.head_dim()]
                view = self.views.get(i)
                if dims:
                    use.heads = use.shape[0] // dims[0]
                elif view and len(view) == 2:
                    use.heads = view[0]


def _ranges(found: dict[str, torch.Tensor]) -> str:
    ordered = sorted(found.items(), key=lambda item: int(item[1][0]))
    return ", ".join(f"rows {_span(rows)} -> {slot}" for slot, rows in ordered)


def _span(rows: torch.Tensor) -> str:
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    return f"{lo}:{hi}" if hi - lo == rows.numel() else f"{lo}:{hi} (not contiguous)"


def _contiguous(rows: torch.Tensor, start: int) -> bool:
    return bool(rows.numel()) and torch.equal(rows, torch.arange(start, start + rows.numel()))


def _read_fused(use: WeightUse, reached: dict[str, list[Rows]], view: tuple[int, ...] | None,
                sdpa_heads: tuple[int, int] | None) -> None:
    """Set ``use.layout``, heads and ``part_rows`` from the rows that reached q, k and v, or a note."""
    use.layout = None
    found: dict[str, torch.Tensor] = {}
    for slot, seen in reached.items():
        sets = {tuple(r.row_set().tolist()) for r in seen}
        if len(sets) == 1:
            found[slot] = seen[0].row_set()
    total = use.shape[0]
    complete = set(found) == set("qkv") and sum(r.numel() for r in found.values()) == total and torch.equal(
        torch.cat(list(found.values())).sort().values, torch.arange(total))
    if not complete:
        use.layout_note = _view_note(view) or (
            f"its rows reach attention only partly ({_ranges(found)})" if found else "")
        return
    q, k, v = found["q"], found["k"], found["v"]
    sizes = (q.numel(), k.numel(), v.numel())
    head_dim = next((r.head_dim() for r in reached["q"] if r.head_dim()), None)
    if _contiguous(q, 0) and _contiguous(k, sizes[0]) and _contiguous(v, sizes[0] + sizes[1]):
        heads = sizes[0] // head_dim if head_dim else (sdpa_heads[0] if sdpa_heads else None)
        kv = sizes[1] * heads // sizes[0] if heads and sizes[1] * heads % sizes[0] == 0 else None
        use.layout, use.heads, use.kv_heads, use.part_rows = "", heads, kv, sizes
        return
    heads = sizes[0] // head_dim if head_dim else None
    if heads and all(s % heads == 0 for s in sizes):
        widths = tuple(s // heads for s in sizes)
        stride, offsets = sum(widths), (0, widths[0], widths[0] + widths[1])
        per_head = all(torch.equal(rows, (torch.arange(heads)[:, None] * stride + off + torch.arange(w)).flatten())
                       for rows, off, w in zip((q, k, v), offsets, widths))
        if per_head:
            use.layout = "heads" if len(set(widths)) == 1 else "heads:" + ",".join(map(str, widths))
            use.heads, use.kv_heads, use.part_rows = heads, heads, sizes
            return
    if all(_contiguous(r, int(r[0])) for r in (q, k, v)):
        use.layout_note = f"its rows reach attention as {_ranges(found)}"
    else:
        use.layout_note = _view_note(view) or f"its rows reach attention as {_ranges(found)}"


def _view_note(view: tuple[int, ...] | None) -> str:
    if not view:
        return ""
    grouped = len(view) == 3 and view[1] > 3
    return (f"its rows are viewed as {list(view)}, neither [3, heads, head_dim] nor [heads, 3, head_dim]"
            + (" (grouped-query attention with [queries, key, value] rows per group, as Falcon-40B)"
               if grouped else ""))

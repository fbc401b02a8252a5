"""Ordered weight uses of a model's forward, read by torch.fx or by a runtime recorder.

Pairing layers of two unrelated codebases by *graph position* needs the order in which the
forward uses each weight, how it uses it (``F.linear(x, W)`` reads ``W`` as ``[out, in]``,
GPT-2's ``x @ W`` as ``[in, out]``), which weights read the same activation (split q, k, v) and
which attention role each one plays (VideoMAE computes key, value, query: execution order lies).

Two readers see the forward:

* **torch.fx** (``symbolic_trace``) reads the graph without running it; timm and torchvision trace.
* A **runtime recorder** (a ``TorchFunctionMode`` active during one ``eval()``/``no_grad`` forward
  on example inputs) reads every model, Hugging Face included, where fx fails.

Both lower what they see into one tiny IR (:class:`Op` over value ids and parameter names), and a
single :func:`analyse` turns it into :class:`WeightUse` records. So the two readers cannot drift
apart in how they interpret a graph, only in what they see (tests check they agree).
"""

from __future__ import annotations

import inspect
import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

Ref = int | str
"""An op argument: an ``int`` value id (activation or constant) or a ``str`` raw parameter name."""

WEIGHT_KINDS = ("linear", "conv", "embedding")

_KIND_BY_NAME = {
    "linear": "linear",
    "conv1d": "conv", "conv2d": "conv", "conv3d": "conv",
    "matmul": "matmul", "__matmul__": "matmul", "mm": "matmul", "bmm": "matmul",
    "__rmatmul__": "rmatmul",
    "addmm": "addmm", "baddbmm": "addmm",
    "scaled_dot_product_attention": "sdpa",
    "multi_head_attention_forward": "mha",
    "embedding": "embedding",
    "t": "transpose", "transpose": "transpose", "swapaxes": "transpose", "swapdims": "transpose",
    "T": "transpose", "mT": "transpose",
    "view": "view", "reshape": "view", "unflatten": "view",
    "chunk": "split", "split": "split", "unbind": "split", "tensor_split": "split",
    "permute": "shape", "contiguous": "shape", "__getitem__": "shape", "getitem": "shape",
}
# Tensor attributes and methods whose result is not a tensor: fx sees them as nodes, the runtime
# recorder as non-tensor outputs. Neither must carry dataflow tags into later ops.
_NON_TENSOR_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_sparse"}
_NON_TENSOR_METHODS = {"size", "dim", "numel", "stride", "item", "tolist", "element_size", "get_device",
                       "is_contiguous", "is_floating_point", "data_ptr"}
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_PROPERTY_GETTERS = {"T": torch.Tensor.T.__get__, "mT": torch.Tensor.mT.__get__}


@dataclass
class Op:
    """One call seen in the forward, in the kind's canonical argument order.

    ``args`` holds the tensor slots the analysis needs (``linear``: input, weight, bias;
    ``matmul``: left, right; ``sdpa``: q, k, v; ``mha``: q, k, v; ``view``/``split``/``shape``:
    the tensor); ``touched`` every tensor the call read; ``mha_weights`` the (weight, role) pairs
    hidden inside one opaque MHA call; ``info`` what shape reading needs: a view's trailing sizes
    (None where fx sees a traced value), a split's ``(dim, parts)``, an MHA call's ``(heads,)``.
    ``opaque`` marks a call into user code that fx kept closed (``torch.fx.wrap``).
    """

    kind: str
    args: tuple[Ref | None, ...]
    touched: tuple[Ref, ...]
    outputs: tuple[int, ...]
    mha_weights: tuple[tuple[Ref, str], ...] = ()
    info: tuple[int | None, ...] = ()
    opaque: bool = False


@dataclass
class WeightUse:
    """The first use of one weight by the forward."""

    index: int
    name: str                      # plain parameter name (``blocks.0.attn.qkv.weight``)
    kind: str                      # "linear" | "conv" | "embedding"
    shape: tuple[int, ...]         # canonical shape: [out, in, *kernel]
    transposed: bool               # stored as [in, out] (GPT-2 Conv1D, ``x @ W``)
    input: int | None              # value id of the activation it reads; siblings share it
    call: int                      # index of the op; one MHA call holds two uses
    roles: set[str] = field(default_factory=set)
    input_tags: frozenset[int] = frozenset()
    later_kinds: set[str] = field(default_factory=set)   # other kinds of later uses (a tied lm_head is linear)
    heads: int | None = None       # heads its output is viewed as (query heads of a fused qkv)
    kv_heads: int | None = None    # key/value heads of a fused qkv
    layout: str | None = None      # fused qkv rows: "" as [q | k | v], "heads" as [head, (q, k, v), dim]; None: unread
    layout_note: str = ""          # why a fused qkv's layout was not read, where the dataflow tells

    @property
    def role(self) -> str | None:
        """Attention role from dataflow: ``qkv`` (fused), ``q``, ``k``, ``v``, ``o`` or None."""
        qkv = self.roles & {"q", "k", "v", "qkv"}
        if "qkv" in qkv or len(qkv) >= 2:
            return "qkv"
        if qkv:
            return next(iter(qkv))
        return "o" if "o" in self.roles else None


@dataclass
class Trace:
    """What one reader saw of one model's forward."""

    reader: str                    # how it was read, with the example inputs used, in words
    uses: list[WeightUse]          # first use of each weight, in order
    sequence: list[str]            # every matrix use in order, repeats included (shared blocks)
    touched: set[str]              # plain names of every parameter the forward read
    hidden: list[str] = field(default_factory=list)   # matrices read inside calls the reader cannot open


# ----------------------------------------------------------------------------- binding


def _kind_of(name: str) -> str:
    return _KIND_BY_NAME.get(name, "other")


def _slot(args: tuple, kwargs: dict, index: int, *names: str) -> Any:
    if index < len(args):
        return args[index]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return None


def _sizes(name: str, args: tuple, kwargs: dict) -> tuple[int | None, ...]:
    """The sizes a view/reshape/unflatten asks for, trailing dims last; None for a traced value."""
    if name == "unflatten":
        dim, sizes = _slot(args, kwargs, 1, "dim"), _slot(args, kwargs, 2, "sizes")
        return tuple(s if isinstance(s, int) else None for s in sizes) if dim == -1 and sizes else ()
    sizes = args[1:] if len(args) > 1 else tuple(kwargs.get("shape", kwargs.get("size", ())))
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = tuple(sizes[0])
    return tuple(s if isinstance(s, int) else None for s in sizes)


def _split_info(name: str, args: tuple, kwargs: dict, ndim: int | None, parts: int | None) -> tuple[int | None, ...]:
    """``(dim, parts, size)`` of a chunk/split/unbind: dim counted from the end where it can be told
    (None otherwise), the number of parts and a split's part size where known."""
    dim = _slot(args, kwargs, 1 if name == "unbind" else 2, "dim")
    dim = 0 if dim is None else dim
    if isinstance(dim, int) and dim >= 0 and ndim is not None:
        dim -= ndim
    size = _slot(args, kwargs, 1, "split_size_or_sections", "split_size") if name == "split" else None
    if parts is None and name == "chunk":
        parts = _slot(args, kwargs, 1, "chunks")
    return (dim if isinstance(dim, int) and dim < 0 else None, parts if isinstance(parts, int) else None,
            size if isinstance(size, int) else None)


def _last_dim_slice(index: Any, ndim: int | None) -> tuple[int | None, int | None] | None:
    """``(start, stop)`` of ``x[..., a:b]`` or ``x[:, :, a:b]`` (``ndim`` items): only the last dim
    sliced, by ints; None for other indices."""
    items = index if isinstance(index, tuple) else (index,)
    ellipsis = len(items) == 2 and items[0] is Ellipsis
    full = len(items) == ndim and all(i == slice(None) for i in items[:-1])
    if not (ellipsis or full) or not isinstance(items[-1], slice) or items[-1] == slice(None):
        return None
    last = items[-1]
    if last.step not in (None, 1) or not all(v is None or isinstance(v, int) for v in (last.start, last.stop)):
        return None
    return last.start, last.stop


def _index_info(index: Any, ndim: int | None) -> tuple[int, ...]:
    """``(k, dim)`` for an index that picks position ``k`` of one dim (``x[..., 0, :]``), the dim
    counted from the end (None where it cannot be told: fx's ``getitem`` of a split's parts); ``()``
    for other indices."""
    items = index if isinstance(index, tuple) else (index,)
    picks = [n for n, i in enumerate(items) if isinstance(i, int) and not isinstance(i, bool)]
    if len(picks) != 1 or not all(isinstance(i, (int, slice)) or i is Ellipsis for i in items):
        return ()
    at = picks[0]
    if items[0] is Ellipsis:
        return items[at], at - len(items)
    return items[at], at - ndim if ndim is not None else None


def _make_op(name: str, args: tuple, kwargs: dict, ref: Callable[[Any], Ref | None], outputs: tuple[int, ...],
             result: Any = None) -> Op:
    """Bind a call's arguments into the canonical slots of its kind; shared by both readers.

    ``result`` is what the call returned, where a reader has it (the runtime recorder): its shapes
    are exact where fx only sees the arguments.
    """
    kind = _kind_of(name)
    touched = tuple(r for r in (ref(a) for a in tree_flatten((args, kwargs))[0]) if r is not None)
    if kind in ("linear", "conv"):
        slots = (_slot(args, kwargs, 0, "input"), _slot(args, kwargs, 1, "weight"), _slot(args, kwargs, 2, "bias"))
    elif kind in ("matmul", "rmatmul"):
        slots = (_slot(args, kwargs, 0, "input", "self"), _slot(args, kwargs, 1, "other", "mat2"))
        if kind == "rmatmul":
            kind, slots = "matmul", slots[::-1]
    elif kind == "addmm":
        kind, slots = "matmul", (_slot(args, kwargs, 1, "mat1", "batch1"), _slot(args, kwargs, 2, "mat2", "batch2"))
    elif kind == "sdpa":
        slots = (_slot(args, kwargs, 0, "query"), _slot(args, kwargs, 1, "key"), _slot(args, kwargs, 2, "value"))
        if all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in slots[:2]):   # [batch, heads, tokens, dim]
            return Op(kind, tuple(ref(s) for s in slots), touched, outputs,
                      info=(slots[0].shape[1], slots[1].shape[1]))
    elif kind == "embedding":
        slots = (_slot(args, kwargs, 0, "input"), _slot(args, kwargs, 1, "weight"))
    elif kind == "mha":
        bound = _MHA_SIGNATURE.bind(*args, **kwargs).arguments
        if bound.get("use_separate_proj_weight"):
            weights = [(bound["q_proj_weight"], "q"), (bound["k_proj_weight"], "k"), (bound["v_proj_weight"], "v")]
        else:
            weights = [(bound["in_proj_weight"], "qkv")]
        weights.append((bound["out_proj_weight"], "o"))
        slots = (bound["query"], bound["key"], bound["value"])
        return Op(kind, tuple(ref(s) for s in slots), touched, outputs,
                  tuple((ref(w), role) for w, role in weights if ref(w) is not None), (bound["num_heads"],))
    elif kind == "view":
        return Op(kind, (ref(args[0]) if args else None,), touched, outputs,
                  info=tuple(result.shape) if isinstance(result, torch.Tensor) else _sizes(name, args, kwargs))
    elif kind == "split":
        x = args[0] if args else None
        ndim = x.dim() if isinstance(x, torch.Tensor) else None
        parts = len(result) if isinstance(result, (tuple, list)) else None
        return Op(kind, (ref(x),), touched, outputs, info=_split_info(name, args, kwargs, ndim, parts))
    elif kind == "shape" and name in ("__getitem__", "getitem") and len(args) == 2:
        rows = _last_dim_slice(args[1], args[0].dim() if isinstance(args[0], torch.Tensor) else None)
        if rows is not None:
            return Op("slice", (ref(args[0]),), touched, outputs, info=rows)
        return Op(kind, (ref(args[0]),), touched, outputs,
                  info=_index_info(args[1], args[0].dim() if isinstance(args[0], torch.Tensor) else None))
    elif kind in ("shape", "transpose"):
        slots = (args[0] if args else None,)
    else:
        slots = ()
    return Op(kind, tuple(ref(s) for s in slots), touched, outputs)


# ----------------------------------------------------------------------------- torch.fx reader

_FX_LEAVES = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.Embedding,
              nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)   # norms: their input checks branch


class _LeafTracer(fx.Tracer):
    """Traces through every module except those whose weight use the IR understands.

    The default tracer keeps every ``torch.nn`` module opaque, which would hide the linears inside
    ``nn.TransformerEncoderLayer``; here only parameter-free modules, the known weight layers and
    the norms (whose input checks branch on the input, which fx cannot trace) stay leaves.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _FX_LEAVES):
            return True
        own_params = any(True for _ in m.parameters(recurse=False))
        return (not own_params and not list(m.children())
                and m.__module__.startswith("torch.nn") and not isinstance(m, nn.Sequential))


def read_fx(model: nn.Module) -> tuple[list[Op], set[int]]:
    """Lower ``model``'s fx graph into ops. Raises whatever ``symbolic_trace`` raises."""
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    value_of: dict[fx.Node, Ref] = {}
    non_tensor: set[fx.Node] = set()
    consts: set[int] = set()
    ops: list[Op] = []

    def ref(a: Any) -> Ref | None:
        return value_of.get(a) if isinstance(a, fx.Node) and a not in non_tensor else None

    for index, node in enumerate(graph.nodes):
        node_args = [a for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, fx.Node)]
        if node.op == "placeholder":
            value_of[node] = index
        elif node.op == "get_attr":
            if node.target in params:
                value_of[node] = node.target
            else:
                value_of[node] = index
                if node.target in buffers:
                    consts.add(index)
        elif node.op == "output":
            continue
        elif node_args and all(a in non_tensor for a in node_args):
            non_tensor.add(node)
        elif node.op == "call_module":
            value_of[node] = index
            ops.append(_module_op(modules[node.target], node.target, node, ref, index))
        else:
            name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
            if name == "getattr":
                name = node.args[1]
                if name in _NON_TENSOR_ATTRS:
                    non_tensor.add(node)
                    continue
                args, kwargs = (node.args[0],), {}
            elif name in _NON_TENSOR_METHODS:
                non_tensor.add(node)
                continue
            else:
                args, kwargs = node.args, node.kwargs
            value_of[node] = index
            op = _make_op(name, tuple(args), dict(kwargs), ref, (index,))
            op.opaque = node.op == "call_function" and _is_user_code(node.target)
            ops.append(op)
    return ops, consts


def _is_user_code(fn: Any) -> bool:
    """A function outside torch and the operators (``torch.fx.wrap``-ed code, e.g. torchvision's
    ``shifted_window_attention``): fx keeps it closed, so weights it reads are not seen used."""
    module = getattr(fn, "__module__", None) or ""
    return not (module.split(".")[0] in ("torch", "_operator", "operator", "builtins", "math")
                or getattr(fn, "__self__", None) is not None)


def _module_op(module: nn.Module, path: str, node: fx.Node, ref: Callable, index: int) -> Op:
    x = ref(node.args[0]) if node.args else None
    prefix = f"{path}." if path else ""
    own = tuple(prefix + n for n, _ in module.named_parameters(recurse=True))
    if isinstance(module, nn.MultiheadAttention):
        q, k, v = (ref(a) for a in (list(node.args) + [None, None, None])[:3])
        if module._qkv_same_embed_dim:
            weights = [(prefix + "in_proj_weight", "qkv")]
        else:
            weights = [(prefix + f"{r}_proj_weight", r) for r in "qkv"]
        weights.append((prefix + "out_proj.weight", "o"))
        return Op("mha", (q, k, v), (x, *own) if x is not None else own, (index,), tuple(weights), (module.num_heads,))
    bias = prefix + "bias" if getattr(module, "bias", None) is not None else None
    if isinstance(module, nn.Linear):
        return Op("linear", (x, prefix + "weight", bias), own, (index,))
    if isinstance(module, nn.modules.conv._ConvNd):
        return Op("conv", (x, prefix + "weight", bias), own, (index,))
    if isinstance(module, nn.Embedding):
        return Op("embedding", (x, prefix + "weight"), own, (index,))
    touched = tuple(r for r in (ref(a) for a in node.args) if r is not None) + own
    return Op("other", (), touched, (index,))


# ----------------------------------------------------------------------------- runtime reader


class _Recorder(TorchFunctionMode):
    """Records every torch call of one forward as an :class:`Op`.

    Activations get monotonic value ids keyed by ``id(tensor)``; a ``weakref.finalize`` frees the
    key when the tensor dies so that a recycled ``id`` never aliases an old value.
    """

    def __init__(self, param_names: dict[int, str], buffer_ids: set[int]):
        super().__init__()
        self.param_names = param_names
        self.buffer_ids = buffer_ids
        self.ops: list[Op] = []
        self.consts: set[int] = set()
        self._value_of: dict[int, int] = {}
        self._serial = itertools.count()

    def ref(self, obj: Any) -> Ref | None:
        if not isinstance(obj, torch.Tensor):
            return None
        key = id(obj)
        name = self.param_names.get(key)
        if name is not None:
            return name
        value = self._value_of.get(key)
        if value is None:
            value = next(self._serial)
            self._value_of[key] = value
            weakref.finalize(obj, self._value_of.pop, key, None)
            if key in self.buffer_ids:
                self.consts.add(value)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs = tuple(r for r in (self.ref(t) for t in tree_flatten(out)[0]) if isinstance(r, int))
        if outputs:
            name = getattr(func, "__name__", "")
            if name == "__get__":
                name = next((n for n, getter in _PROPERTY_GETTERS.items() if func == getter), name)
            self.ops.append(_make_op(name, tuple(args), kwargs, self.ref, outputs, out))
        return out


def call_with(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` with example inputs given as a tensor, a tuple of args or a dict of kwargs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def read_runtime(model: nn.Module, inputs: Any) -> tuple[list[Op], set[int]]:
    """Run one ``eval()``/``no_grad`` forward on ``inputs`` and record it as ops."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    recorder = _Recorder(names, {id(b) for b in model.buffers()})
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), recorder:
            call_with(model, inputs)
    finally:
        model.train(was_training)
    return recorder.ops, recorder.consts


# ----------------------------------------------------------------------------- analysis


def analyse(ops: list[Op], consts: set[int], shapes: dict[str, tuple[int, ...]],
            plain: dict[str, str | None]) -> tuple[list[WeightUse], list[str], set[str], list[str]]:
    """Turn ops into ordered weight uses with roles; see the module docstring.

    Returns (uses, sequence of every matrix use, touched plain names, hidden): ``hidden`` lists
    the matrices read only inside opaque calls (fx's closed user functions), in order.

    ``shapes`` maps raw parameter names to shapes; ``plain`` maps raw names to the user-facing
    name (``...parametrizations.weight.original`` -> ``...weight``, tied aliases -> the first
    name), or to None for pathway's own parameters, which are never reported as uses.
    """
    derived: dict[int, tuple[frozenset[str], int]] = {}   # param-derived value -> (raw sources, transposes)
    tags: dict[int, frozenset[int]] = {}                  # activation value -> weight-use indices
    uses: list[WeightUse] = []
    first: dict[str, int] = {}
    sequence: list[str] = []
    touched: set[str] = set()
    heads = _HeadReader(uses)
    opaque_reads: dict[str, None] = {}

    def sources(r: Ref) -> tuple[frozenset[str], int] | None:
        if isinstance(r, str):
            return frozenset([r]), 0
        return derived.get(r)

    def is_activation(r: Ref | None) -> bool:
        return isinstance(r, int) and r not in derived and r not in consts

    def record(weight: Ref, kind: str, transposed_use: bool, x: Ref | None, call: int, role: str | None) -> int | None:
        src = sources(weight)
        if src is None:
            return None
        raw_names, transposes = src
        candidates = [n for n in sorted(raw_names) if plain.get(n) and len(shapes[n]) >= 2]
        if not candidates:
            return None
        raw = candidates[0]
        name = plain[raw]
        transposed = transposed_use ^ bool(transposes % 2)
        shape = shapes[raw]
        if kind != "conv" and len(shape) == 2 and transposed:
            shape = shape[::-1]
        sequence.append(name)
        if name in first:
            if kind != uses[first[name]].kind:
                uses[first[name]].later_kinds.add(kind)
            return first[name]
        use = WeightUse(len(uses), name, kind, tuple(shape), transposed, x if is_activation(x) else None, call,
                        input_tags=tags.get(x, frozenset()) if isinstance(x, int) else frozenset())
        if role:
            use.roles.add(role)
        first[name] = use.index
        uses.append(use)
        return use.index

    for call, op in enumerate(ops):
        for r in op.touched:
            src = sources(r)
            if src:
                touched.update(plain[n] for n in src[0] if plain.get(n))
                if op.opaque:
                    opaque_reads.update({plain[n]: None for n in src[0]
                                         if plain.get(n) and len(shapes[n]) >= 2 and shapes[n][0] > 1})
        acts = [r for r in op.touched if is_activation(r)]
        produced: int | None = None
        if op.kind in ("linear", "conv", "embedding"):
            x, w = op.args[0], op.args[1]
            kind = op.kind
            produced = record(w, kind, False, x, call, None)
        elif op.kind == "matmul" and len(op.args) == 2:
            left, right = op.args
            if sources(right) is not None and is_activation(left):
                produced = record(right, "linear", True, left, call, None)
            elif sources(left) is not None and is_activation(right):
                produced = record(left, "linear", False, right, call, None)
            elif is_activation(left) and is_activation(right):
                _attention_roles_from_matmul(tags.get(left, frozenset()), tags.get(right, frozenset()), uses)
                heads.at_matmul(left, right)
        elif op.kind == "mha":
            x = op.args[0]
            for weight, role in op.mha_weights:
                produced = record(weight, "linear", False, x if role != "o" else None, call, role)
                if produced is not None and role != "o":
                    heads.from_mha(produced, role, op.info[0])
        elif op.kind == "sdpa":
            for slot, r in zip("qkv", op.args):
                heads.reached(r, slot)
                t = tags.get(r, frozenset()) if isinstance(r, int) else frozenset()
                if len(t) == 1:
                    uses[next(iter(t))].roles.add(slot)
                    if op.info:
                        heads.at_attention(next(iter(t)), slot, op.info)

        if produced is not None and op.kind != "mha":
            heads.start(produced, op.outputs)
        elif op.kind in _RESHAPES:
            heads.step(op)
        elif op.kind == "other" and len(acts) == 1:   # a bias added, a scale: still the projection's rows
            heads.follow(acts[0], op.outputs)
        elif op.kind == "other":
            heads.carry(acts, op.outputs)
        if produced is not None:
            for out in op.outputs:
                tags[out] = frozenset([produced])
        elif acts:
            merged = frozenset().union(*(tags.get(r, frozenset()) for r in acts))
            for out in op.outputs:
                tags[out] = merged
        else:
            srcs = [src for src in map(sources, op.touched) if src is not None]
            if srcs:
                names = frozenset().union(*(s[0] for s in srcs))
                transposes = max(s[1] for s in srcs) + (1 if op.kind == "transpose" else 0)
                for out in op.outputs:
                    derived[out] = (names, transposes)
            else:
                consts.update(op.outputs)

    for use in uses:   # a linear reading what attention produced is its output projection
        if use.kind == "linear" and use.role is None and any(uses[t].role in ("q", "k", "v", "qkv")
                                                              for t in use.input_tags if t != use.index):
            use.roles.add("o")
    heads.finish()
    return uses, sequence, touched, [n for n in opaque_reads if n not in first]


_RESHAPES = ("view", "split", "shape", "transpose", "slice")


def _factors(sizes: tuple[int | None, ...], rows: int) -> tuple[int, ...] | None:
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


class _HeadReader:
    """Reads heads and the row layout of attention projections from the reshapes after them.

    It follows each weight use's output through views, splits, transposes and indexing only:
    ``view(.., 3, H, hd)`` is ``[q | k | v]`` with H heads (timm), ``view(.., H, 3, hd)`` and
    ``view(.., H, 3 * hd)`` then a split of the last dim are per-head interleaved (Bloom,
    GPT-NeoX), a split of the rows into 3 before any view is ``[q | k | v]`` (GPT-2), and a
    ``view(.., H, hd)`` of one projection gives its heads (q/k/v, grouped k/v included), and
    ``view(.., H + 2 * Hkv, hd)`` with SDPA seeing H query and Hkv key/value heads is ``[q | k | v]``
    of multi-/grouped-query attention (Falcon-7B), and three contiguous row slices ``x[..., a:b]``
    are ``[q | k | v]`` too (Phi-3).

    The order is checked, not assumed: each of a fused projection's three parts (a chunk, split or
    unbind, an index on its axis of 3, a row slice) is followed, through reshapes and through ops
    that mix it only with values of no other part (rotary embeddings), to the attention slot it
    reaches (SDPA's q/k/v, ``q @ k^T``, ``probs @ v``). Parts that reach attention in another order
    than q, k, v leave the layout unread, with a note saying how they were read.
    """

    def __init__(self, uses: list[WeightUse]):
        self.uses = uses
        self.chain: dict[int, tuple[int, int, int | None]] = {}   # value -> (use, stage, size of the last dim)
        self.factors: dict[int, tuple[int, ...]] = {}
        self.split: dict[int, str] = {}            # use -> "rows" (before a view) or "head_dim" (after it)
        self.part_heads: dict[int, int] = {}
        self.attention_heads: dict[int, tuple[int, int]] = {}
        self.parts: dict[int, tuple[int, int]] = {}          # value -> (use, which of its 3 parts / first row)
        self.part_roles: dict[int, dict[int, str]] = {}      # use -> {part: attention slot it reached}
        self.slices: dict[int, set[tuple[int, int]]] = {}    # use -> row ranges taken by x[..., a:b]
        self.unpacked: dict[int, int] = {}                   # fx split node -> use (getitem picks its parts)

    def start(self, use: int, outputs: tuple[int, ...]) -> None:
        for out in outputs:
            self.chain[out] = (use, 0, self.uses[use].shape[0])

    def step(self, op: Op) -> None:
        source = op.args[0] if op.args and isinstance(op.args[0], int) else None
        if source in self.parts:
            self._carry_part(source, op.outputs)
        if source in self.unpacked and op.kind == "shape" and op.info:   # fx: getitem(split, k) is part k
            self.parts[op.outputs[0]] = (self.unpacked[source], op.info[0] % 3)
        link = self.chain.get(source)
        if link is None:
            return
        use, stage, last = link
        picked = (op.kind == "shape" and op.info and stage == 1 and op.info[1] is not None
                  and -op.info[1] <= len(self.factors[use]) and self.factors[use][op.info[1]] == 3)
        if op.kind == "split" and len(op.outputs) == 3 and stage < 2 or picked:
            for k, out in enumerate(op.outputs):   # q, k, v as they leave the fused rows, in row order
                self.parts[out] = (use, op.info[0] % 3 if picked else k)
        elif op.kind == "split" and len(op.outputs) == 1 and stage < 2:   # fx: one node, its parts picked later
            self.unpacked[op.outputs[0]] = use
        if op.kind == "slice" and stage == 0:      # Phi-3: qkv[..., :q], qkv[..., q:q + kv], qkv[..., q + kv:]
            rows = self.uses[use].shape[0]
            start, stop = (0 if v is None else v + rows if v < 0 else min(v, rows)
                           for v in (op.info[0], rows if op.info[1] is None else op.info[1]))
            self.slices.setdefault(use, set()).add((start, stop))
            for out in op.outputs:
                self.parts[out] = (use, start)
                self.chain[out] = (use, 2, None)
            return
        if op.kind == "view":
            f = _factors(op.info, last) if last else None
            if stage == 0 and f is not None and len(f) > 1:
                self.factors[use] = f
                self._extend(op, use, 1, f[-1])
            elif stage == 0 and f is not None:
                self._extend(op, use, 0, last)
            elif stage == 2 and f is not None and len(f) == 2:
                self.part_heads.setdefault(use, f[0])
        elif op.kind == "split":
            dim, parts, size = op.info
            parts = parts or (last // size if size and last else None)
            if dim == -1 and parts == 3 and stage < 2:
                self.split.setdefault(use, "rows" if stage == 0 else "head_dim")
                self._extend(op, use, 2, last // 3)
        else:
            self._extend(op, use, stage, last)

    def _carry_part(self, value: int, outputs: tuple[int, ...]) -> None:
        for out in outputs:
            self.parts.setdefault(out, self.parts[value])

    def reached(self, value: Ref | None, slot: str) -> None:
        """Attention read ``value`` as its ``slot`` (q, k or v); notes which fused part it was."""
        part = self.parts.get(value) if isinstance(value, int) else None
        if part is not None:
            self.part_roles.setdefault(part[0], {})[part[1]] = slot

    def at_matmul(self, left: Ref | None, right: Ref | None) -> None:
        """``q @ k^T`` (parts on both sides) or ``probs @ v`` (a part on the right only)."""
        if left in self.parts and right in self.parts:
            self.reached(left, "q")
            self.reached(right, "k")
        elif right in self.parts:
            self.reached(right, "v")

    def carry(self, values: list[int], outputs: tuple[int, ...]) -> None:
        """An op mixing one part with values of no part (rotary: ``q * cos + rotate_half(q) * sin``) keeps it."""
        found = {self.parts[v] for v in values if v in self.parts}
        if len(found) == 1:
            for out in outputs:
                self.parts.setdefault(out, next(iter(found)))

    def follow(self, value: int, outputs: tuple[int, ...]) -> None:
        if value in self.parts:
            self._carry_part(value, outputs)
        link = self.chain.get(value)
        if link is not None:
            for out in outputs:
                self.chain[out] = link

    def _extend(self, op: Op, use: int, stage: int, last: int | None) -> None:
        for out in op.outputs:
            self.chain[out] = (use, stage, last)

    def at_attention(self, use: int, slot: str, heads: tuple[int, int]) -> None:
        """SDPA saw this use's output as its ``slot`` with (query heads, key/value heads)."""
        self.attention_heads[use] = heads

    def from_mha(self, use: int, role: str, heads: int) -> None:
        self.uses[use].heads = heads
        if role == "qkv":
            self.uses[use].layout, self.uses[use].kv_heads = "", heads

    def finish(self) -> None:
        for i, use in enumerate(self.uses):
            if use.heads is not None:
                continue
            f, split = self.factors.get(i), self.split.get(i)
            if use.role == "qkv":
                if f and f[0] == 3:
                    use.layout, use.heads = "", f[1] if len(f) >= 3 else None
                elif f and len(f) >= 3 and f[1] == 3 or f and len(f) == 2 and split == "head_dim":
                    use.layout, use.heads = "heads", f[0]
                elif not f and split == "rows":
                    use.layout, use.heads = "", self.part_heads.get(i)
                use.kv_heads = use.heads
                q_heads, kv_heads = self.attention_heads.get(i, (None, None))
                narrower = q_heads and kv_heads < q_heads and use.shape[0] % (q_heads + 2 * kv_heads) == 0
                if narrower and (f and len(f) == 2 and f[0] == q_heads + 2 * kv_heads or not f and split == "rows"):
                    use.layout, use.heads, use.kv_heads = "", q_heads, kv_heads   # [q | k | v], k/v narrower (MQA)
                reached = self.part_roles.get(i, {})
                if i in self.slices:
                    _read_slices(use, self.slices[i], q_heads, kv_heads, reached)
                elif any("qkv"[k] != slot for k, slot in reached.items()):
                    use.layout = None   # its parts feed attention in another order than q, k, v: not read
                    use.layout_note = "its three parts reach attention as " + ", ".join(
                        f"part {k} -> {slot}" for k, slot in sorted(reached.items()))
                if use.layout is None and f and not use.layout_note:
                    grouped = len(f) == 3 and f[1] > 3
                    use.layout_note = (f"its rows are viewed as {list(f)}, neither [3, heads, head_dim] nor [heads, 3, "
                                       f"head_dim]" + (" (grouped-query attention with [queries, key, value] rows per "
                                                       "group, as Falcon-40B)" if grouped else ""))
            elif use.role in ("q", "k", "v") and f and len(f) == 2:
                use.heads = f[0]


def _read_slices(use: WeightUse, taken: set[tuple[int, int]], q_heads: int | None, kv_heads: int | None,
                 reached: dict[int, str]) -> None:
    """Rows sliced into three contiguous ranges are ``[q | k | v]`` if attention saw them in that order."""
    bounds = sorted(taken)
    three = len(bounds) == 3 and [b[0] for b in bounds] == [0, bounds[0][1], bounds[1][1]]
    if not three or bounds[-1][1] != use.shape[0] or bounds[1][1] - bounds[1][0] != bounds[2][1] - bounds[2][0]:
        use.layout, use.layout_note = None, f"its output is sliced into rows {bounds}, not three contiguous parts"
        return
    order = {start: "qkv"[k] for k, (start, _) in enumerate(bounds)}
    if any(order[start] != slot for start, slot in reached.items()):
        use.layout, use.layout_note = None, "its row slices reach attention as " + ", ".join(
            f"rows {start}: -> {slot}" for start, slot in sorted(reached.items()))
        return
    q_rows, kv_rows = bounds[0][1], bounds[1][1] - bounds[1][0]
    heads = q_heads or use.heads
    use.layout, use.heads = "", heads
    use.kv_heads = kv_heads if kv_heads else heads * kv_rows // q_rows if heads else None


def _attention_roles_from_matmul(left: frozenset[int], right: frozenset[int], uses: list[WeightUse]) -> None:
    """``q @ k^T`` (one producer each side) names q and k; ``probs @ v`` (many @ one) names v."""
    if len(left) == 1 and len(right) == 1:
        (a,), (b,) = left, right
        uses[a].roles.add("q")
        uses[b].roles.add("k")
    elif len(left) > 1 and len(right) == 1:
        uses[next(iter(right))].roles.add("v")

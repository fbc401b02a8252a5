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

from .errors import TraceError
from .rows import LAYOUT_OPS, RowReader

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
    "T": "transpose", "mT": "transpose", "permute": "permute",
    "view": "view", "reshape": "view", "unflatten": "unflatten", "flatten": "flatten",
    "chunk": "split", "split": "split", "unbind": "split", "tensor_split": "split",
    "__getitem__": "index", "getitem": "index", "narrow": "index", "select": "index", "unsqueeze": "index",
    "squeeze": "index",
    "contiguous": "keep", "clone": "keep", "expand": "keep", "expand_as": "keep", "float": "keep", "to": "keep",
    "type_as": "keep", "detach": "keep",
    "cat": "cat", "concat": "cat", "concatenate": "cat",
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
    ``matmul``: left, right; ``sdpa``: q, k, v; ``mha``: q, k, v; a layout op of
    :data:`~pathway.rows.LAYOUT_OPS`: the tensor; ``cat``: the tensors); ``touched`` every tensor
    the call read; ``mha_weights`` the (weight, role) pairs hidden inside one opaque MHA call;
    ``info`` what reading rows needs: a view's sizes (None for each size fx traced; None for the
    whole where the shape itself was traced), ``(dim, *sizes)`` of an unflatten, ``(start, end)``
    of a flatten, ``(name, dim, sizes or parts)`` of a split, the items of an index, the dims of a
    transpose or permute, ``(dim,)`` of a cat, SDPA's ``(q heads, kv heads)``, an MHA call's
    ``(heads,)``. Dims are counted from the end where the reader knows the rank (the runtime recorder).
    ``opaque`` marks a call into user code that fx kept closed (``torch.fx.wrap``).
    """

    kind: str
    args: tuple[Ref | None, ...]
    touched: tuple[Ref, ...]
    outputs: tuple[int, ...]
    mha_weights: tuple[tuple[Ref, str], ...] = ()
    info: tuple[Any, ...] | None = ()
    opaque: bool = False
    shape: tuple[int, ...] | None = None     # the result's shape, where the reader has it (runtime recorder)
    in_shape: tuple[int, ...] | None = None  # a layout op's input shape, likewise


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
    layout: str | None = None      # fused qkv rows: "" as [q | k | v], "heads" as [head, (q, k, v), dim],
                                   # "heads:a,b,c" per head of unequal widths (see ``rows``); None: unread
    layout_note: str = ""          # why a fused qkv's layout was not read, where the dataflow tells
    part_rows: tuple[int, int, int] | None = None   # a fused qkv's rows of q, k and v, where read

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


def _sizes(args: tuple, kwargs: dict) -> tuple[int | None, ...] | None:
    """The sizes a view/reshape asks for, None for each size fx traced; None where the whole shape is
    a traced value."""
    sizes = args[1:] if len(args) > 1 else tuple(kwargs.get("shape", kwargs.get("size", ())))
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = tuple(sizes[0])
    if not sizes or any(not isinstance(s, int) and isinstance(s, (tuple, list)) for s in sizes):
        return None
    if len(sizes) == 1 and not isinstance(sizes[0], int):
        return None
    return tuple(s if isinstance(s, int) else None for s in sizes)


def _dim(d: Any, ndim: int | None) -> Any:
    """A dim counted from the end where the rank is known (the runtime recorder), else as given."""
    return d - ndim if isinstance(d, int) and not isinstance(d, bool) and d >= 0 and ndim is not None else d


def _index_items(index: Any, ndim: int | None) -> tuple[Any, ...] | None:
    """An index as items the row reader replays: ints, int slices, int lists, None and Ellipsis.

    Where the rank is known and the index has no Ellipsis, one is put in front so every item is
    placed from the end. None for anything else (tensors, masks, traced bounds).
    """
    items = index if isinstance(index, tuple) else (index,)
    for item in items:
        plain_int = isinstance(item, int) and not isinstance(item, bool)
        ok_slice = isinstance(item, slice) and all(v is None or isinstance(v, int) and not isinstance(v, bool)
                                                   for v in (item.start, item.stop, item.step))
        ok_list = isinstance(item, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in item)
        if not (plain_int or ok_slice or ok_list or item is None or item is Ellipsis):
            return None
    if Ellipsis not in items and ndim is not None:
        consumed = sum(i is not None for i in items)
        items = (Ellipsis, *items, *(slice(None),) * (ndim - consumed))
    return items


def _as_index(name: str, args: tuple, kwargs: dict, x: Any) -> Any:
    """``narrow``, ``select``, ``unsqueeze`` and ``squeeze`` as the index that does the same; None where
    it cannot be told (a traced bound, ``squeeze`` of a dim whose size fx does not know)."""
    dim = _slot(args, kwargs, 1, "dim")
    if not isinstance(dim, int) or isinstance(dim, bool):
        return None
    if name == "narrow":
        start, length = _slot(args, kwargs, 2, "start"), _slot(args, kwargs, 3, "length")
        if not isinstance(start, int) or not isinstance(length, int):
            return None
        item: Any = slice(start, start + length)
    elif name == "select":
        item = _slot(args, kwargs, 2, "index")
    elif name == "unsqueeze":
        ndim = x.dim() + 1 if isinstance(x, torch.Tensor) else None
        if dim < 0 and ndim is not None:
            dim += ndim
        if dim < 0:
            return (Ellipsis, None, *(slice(None),) * (-dim - 1))
        return (*(slice(None),) * dim, None)
    elif isinstance(x, torch.Tensor):       # squeeze(dim): a no-op unless that dim has size 1
        item = 0 if x.shape[dim] == 1 else slice(None)
    else:
        return None
    if dim < 0:
        return (Ellipsis, item, *(slice(None),) * (-dim - 1))
    return (*(slice(None),) * dim, item)


_SHAPE_KEEPING = {"add", "sub", "mul", "div", "neg", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__",
                  "__mul__", "__rmul__", "__imul__", "truediv", "__truediv__", "__rtruediv__", "__neg__", "softmax",
                  "gelu", "silu", "relu", "sigmoid", "tanh", "dropout", "layer_norm", "rms_norm", "masked_fill",
                  "where", "clamp", "pow", "__pow__", "sqrt", "rsqrt", "exp", "type", "half", "bfloat16"}
"""Calls whose output keeps each element of its input where it was (for fx, which has no shapes)."""


def _layout_op(kind: str, name: str, args: tuple, kwargs: dict, ref: Callable[[Any], Ref | None],
               touched: tuple[Ref, ...], outputs: tuple[int, ...], result: Any) -> Op:
    """An op that rearranges one tensor, with what replaying it on row numbers needs (see ``rows``)."""
    x = args[0] if args else _slot(args, kwargs, 0, "input", "self")
    ndim = x.dim() if isinstance(x, torch.Tensor) else None
    if kind == "view":
        info: tuple = tuple(result.shape) if isinstance(result, torch.Tensor) else _sizes(args, kwargs)
    elif kind == "unflatten":
        dim, sizes = _slot(args, kwargs, 1, "dim"), _slot(args, kwargs, 2, "sizes")
        info = (_dim(dim, ndim), *(s if isinstance(s, int) else None for s in sizes or ()))
    elif kind == "flatten":
        info = (_dim(_slot(args, kwargs, 1, "start_dim") or 0, ndim),
                _dim(-1 if _slot(args, kwargs, 2, "end_dim") is None else _slot(args, kwargs, 2, "end_dim"), ndim))
    elif kind == "split":
        dim = _slot(args, kwargs, 1 if name == "unbind" else 2, "dim")
        spec = None if name == "unbind" else _slot(args, kwargs, 1, "split_size_or_sections", "split_size",
                                                   "chunks", "sections", "indices")
        info = (name, _dim(0 if dim is None else dim, ndim), spec)
    elif kind == "index" and name in ("__getitem__", "getitem"):
        info = _index_items(args[1], ndim) if len(args) == 2 else None
    elif kind == "index":
        info = _index_items(_as_index(name, args, kwargs, x), ndim)
    elif kind == "permute":
        dims = args[1:] if len(args) > 1 else tuple(kwargs.get("dims", ()))
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else tuple(dims)
        info = ("permute", *dims)
    elif kind == "transpose" and name in ("t", "T", "mT"):
        info = ("permute", *range(ndim - 1, -1, -1)) if name == "T" and ndim else (
            (-2, -1) if name == "mT" else (name,))
    elif kind == "transpose":
        info = tuple(_dim(_slot(args, kwargs, k, f"dim{k - 1}", f"axis{k - 1}"), ndim) for k in (1, 2))
    else:
        info = ()
    return Op(kind, (ref(x),), touched, outputs, info=info,
              in_shape=tuple(x.shape) if isinstance(x, torch.Tensor) else None)


def _kept_in_place(name: str, args: tuple, kwargs: dict, ref: Callable[[Any], Ref | None], result: Any
                   ) -> tuple[Ref, ...]:
    """The inputs whose elements stay where they were in the output: those of the output's shape where the
    reader has the output (the runtime recorder), every input of a known elementwise call for fx."""
    tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, (torch.Tensor, fx.Node))]
    if isinstance(result, torch.Tensor):
        found = [ref(a) for a in tensors if isinstance(a, torch.Tensor) and a.shape == result.shape]
    elif result is None and name in _SHAPE_KEEPING:
        found = [ref(a) for a in tensors]
    else:
        found = []
    return tuple(r for r in found if r is not None)


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
    elif kind in LAYOUT_OPS:
        return _layout_op(kind, name, args, kwargs, ref, touched, outputs, result)
    elif kind == "other":
        return Op(kind, (), touched, outputs, info=_kept_in_place(name, args, kwargs, ref, result))
    elif kind == "cat":
        tensors = _slot(args, kwargs, 0, "tensors")
        dim = _slot(args, kwargs, 1, "dim")
        first = tensors[0] if isinstance(tensors, (tuple, list)) and tensors else None
        ndim = first.dim() if isinstance(first, torch.Tensor) else None
        return Op(kind, tuple(ref(t) for t in tensors or ()), touched, outputs, info=(_dim(0 if dim is None else dim,
                                                                                       ndim),))
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
    return Op("other", (), touched, (index,), info=touched)   # a norm, an activation, dropout: shapes kept


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
            op = _make_op(name, tuple(args), kwargs, self.ref, outputs, out)
            op.shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            self.ops.append(op)
        return out


def call_with(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` with example inputs given as a tensor, a tuple of args or a dict of kwargs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def read_runtime(model: nn.Module, inputs: Any) -> tuple[list[Op], set[int]]:
    """Run one ``eval()``/``no_grad`` forward on ``inputs`` and record it as ops; every module's
    train/eval mode is as it was afterwards."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    recorder = _Recorder(names, {id(b) for b in model.buffers()})
    modes = [(m, m.training) for m in model.modules()]   # each module's own mode: a user's eval() submodule stays so
    model.eval()
    try:
        with torch.no_grad(), recorder:
            call_with(model, inputs)
    finally:
        for module, training in modes:
            module.training = training
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
    derived_shapes: dict[int, tuple[int, ...]] = {}       # its shape, where the reader knows it
    tags: dict[int, frozenset[int]] = {}                  # activation value -> weight-use indices
    uses: list[WeightUse] = []
    first: dict[str, int] = {}
    sequence: list[str] = []
    touched: set[str] = set()
    rows = RowReader(uses)
    opaque_reads: dict[str, None] = {}
    made_from: dict[int, Ref | None] = {}    # value -> the activation its weight call read (k's and v's agree)
    scores: list[tuple[frozenset[int], frozenset[int], Ref | None]] = []   # q @ k^T: (left, right, k's input)
    value_inputs: set[Ref] = set()           # what v's weight calls read

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
        raw = candidates[0] if len(candidates) == 1 else _main_source(candidates, shapes, derived_shapes.get(weight),
                                                                       plain, kind)
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
        read: Ref | None = None                        # the activation the weight call read
        if op.kind in ("linear", "conv", "embedding"):
            read, w = op.args[0], op.args[1]
            produced = record(w, op.kind, False, read, call, None)
        elif op.kind == "matmul" and len(op.args) == 2:
            left, right = op.args
            if sources(right) is not None and is_activation(left):
                read, produced = left, record(right, "linear", True, left, call, None)
            elif sources(left) is not None and is_activation(right):
                read, produced = right, record(left, "linear", False, right, call, None)
            elif is_activation(left) and is_activation(right):
                left_tags, right_tags = tags.get(left, frozenset()), tags.get(right, frozenset())
                if len(left_tags) == 1 and len(right_tags) == 1:
                    scores.append((left_tags, right_tags, made_from.get(right)))
                elif len(left_tags) > 1 and len(right_tags) == 1:    # probs @ v
                    uses[next(iter(right_tags))].roles.add("v")
                    value_inputs.add(made_from.get(right))
                rows.at_matmul(left, right)
        elif op.kind == "mha":
            read = op.args[0]
            for weight, role in op.mha_weights:
                produced = record(weight, "linear", False, read if role != "o" else None, call, role)
                if produced is not None and role != "o":
                    rows.from_mha(produced, role, op.info[0])
        elif op.kind == "sdpa":
            rows.at_sdpa(op.args, op.info)
            for slot, r in zip("qkv", op.args):
                t = tags.get(r, frozenset()) if isinstance(r, int) else frozenset()
                if len(t) == 1:
                    uses[next(iter(t))].roles.add(slot)
            value_inputs.add(made_from.get(op.args[2]) if isinstance(op.args[2], int) else None)

        if produced is not None and op.kind not in ("mha", "conv", "embedding"):
            rows.start(produced, op.outputs)
        elif op.kind in LAYOUT_OPS:
            rows.step(op)
        elif op.kind == "cat":
            rows.cat(list(op.args), op.outputs, op.info[0])
        elif op.kind == "other":                       # a bias added, a scale, rotary: still the projection's rows
            rows.combine([r for r in acts if r in op.info], op.outputs, op.shape)
        if produced is not None:
            for out in op.outputs:
                tags[out] = frozenset([produced])
                made_from[out] = read if is_activation(read) else None
        elif acts:
            merged = frozenset().union(*(tags.get(r, frozenset()) for r in acts))
            origins = {made_from[r] for r in acts if r in made_from}   # a scale from opaque (jit) code has none
            for out in op.outputs:
                tags[out] = merged
                if origins:
                    made_from[out] = next(iter(origins)) if len(origins) == 1 else None
        else:
            srcs = [src for src in map(sources, op.touched) if src is not None]
            if srcs:
                names = frozenset().union(*(s[0] for s in srcs))
                transposes = max(s[1] for s in srcs) + (1 if op.kind == "transpose" else 0)
                for out in op.outputs:
                    derived[out] = (names, transposes)
                    if op.shape is not None and len(op.outputs) == 1:
                        derived_shapes[out] = op.shape
            else:
                consts.update(op.outputs)

    _score_roles(scores, value_inputs - {None}, uses)
    for use in uses:   # a linear reading what attention produced is its output projection
        if use.kind == "linear" and use.role is None and any(uses[t].role in ("q", "k", "v", "qkv")
                                                              for t in use.input_tags if t != use.index):
            use.roles.add("o")
    rows.finish()
    return uses, sequence, touched, [n for n in opaque_reads if n not in first]


def _main_source(candidates: list[str], shapes: dict[str, tuple[int, ...]], used: tuple[int, ...] | None,
                 plain: dict[str, str | None], kind: str) -> str:
    """The one parameter of the used weight's shape among several it was computed from (``W + B @ A``, a
    LoRA-style sum); refused where the shape does not single one out (not known under fx, or equal)."""
    fits = [n for n in candidates if used is not None and shapes[n] in (used, tuple(reversed(used)))]
    if len(fits) == 1:
        return fits[0]
    names = ", ".join(str(plain[n]) for n in candidates)
    shape = "" if used is None else f" of shape {list(used)}"
    raise TraceError(f"a {kind} call reads a weight computed from several parameters ({names}){shape} and which "
                     f"one carries the weight cannot be told. Fix: compute it into one parameter before connecting "
                     f"(merge the parts), or read the forward with tracer='runtime', which sees its shape")


def _score_roles(scores: list[tuple[frozenset[int], frozenset[int], Ref | None]], value_inputs: set[Ref],
                 uses: list[WeightUse]) -> None:
    """q and k roles from ``left @ right^T`` products of two projections (one producer each side).

    A product whose right side was computed from what v's projection read (k and v read one activation,
    in self- and cross-attention alike) is the attention itself; others are extra position terms
    (DeBERTa's c2p ``q @ pos_k^T`` and p2c ``k @ pos_q^T``, where the content key stands on the left).
    A weight takes the roles the attention gives it and, only where it has none, those of the extra terms.
    """
    main: dict[int, set[str]] = {}
    extra: dict[int, set[str]] = {}
    for left, right, k_input in scores:
        found = main if k_input is not None and k_input in value_inputs else extra
        found.setdefault(next(iter(left)), set()).add("q")
        found.setdefault(next(iter(right)), set()).add("k")
    for use in uses:
        if use.index in main:
            use.roles |= main[use.index]
        elif use.index in extra and not use.roles & {"q", "k", "v", "qkv"}:
            use.roles |= extra[use.index]

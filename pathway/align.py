"""``align``: permute an aux model's hidden units into the target's basis before the pathways add them.

A pathway adds ``lambda * W_aux`` to ``W`` entry by entry, so it assumes that hidden unit ``k`` of the aux
plays the role of hidden unit ``k`` of the target. Two models trained from different initialisations share
no such order: a transformer is unchanged when its MLP hidden units, its attention heads or its residual
channels are permuted (with every weight that reads or writes them), so their order is arbitrary. A donor
of the target's own architecture helps a frozen target only when it shares the target's initialisation
(issue 22), which is this order. ``align`` picks the permutation of the aux that best matches the target:

* ``weights``: weight matching (Git Re-Basin, Ainsworth et al., ICLR 2023): maximise the sum over all block
  tensors of ``<W_target, P_out W_aux P_in^T>`` by alternating linear assignments
  (``scipy.optimize.linear_sum_assignment``): the residual channels given the per-block permutations, then
  each block's heads and MLP units given the residual channels, until the objective stops increasing;
* ``activations``: activation matching, for an aux that reads the target's inputs (the same modality): the
  correlation of the residual stream after every block, of each MLP hidden unit, and the attention maps of
  each head, on the same inputs; one assignment each.

The permutation is a symmetry of the aux: its blocks compute the same function in the permuted basis, and
the tensors outside the blocks that write or read the residual stream (the embedding, position embedding,
class token, final norm, head) are permuted with them, so the whole aux computes what it computed before
(checked on the given inputs). It works on timm-style ViT blocks (``blocks.N.attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2``, ``norm1``, ``norm2``) and refuses by name what it cannot permute.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import PathwayError

__all__ = ["METHODS", "AlignError", "AlignReport", "Permutation", "align", "apply_permutation",
           "weight_objective"]

METHODS = ("weights", "activations")
ROLES = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
         "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
_BLOCK = re.compile(r"^(?P<prefix>(?:.*\.)?blocks)\.(?P<index>\d+)\.(?P<role>.+)$")


class AlignError(PathwayError):
    """The aux cannot be aligned to the target (another layout, other widths, a tensor align cannot permute)."""


@dataclass(frozen=True)
class Permutation:
    """Where each aligned unit comes from: aligned unit ``k`` is the aux's unit ``residual[k]`` (and so on)."""

    residual: Tensor             # [D]
    heads: tuple[Tensor, ...]    # per block, [H]
    mlp: tuple[Tensor, ...]      # per block, [F]


@dataclass(frozen=True)
class AlignReport:
    """What ``align`` permuted and how much the matching objective improved."""

    method: str
    blocks: int
    residual_moved: int               # residual channels whose index changed (of residual_width)
    residual_width: int
    heads_moved: tuple[int, ...]      # per block
    heads: int
    mlp_moved: tuple[int, ...]        # per block
    mlp_width: int
    outside: tuple[str, ...]          # tensors outside the blocks permuted with the residual channels
    objective_before: float           # sum over block tensors of <W_target, W_aux>, unaligned
    objective_after: float            # the same, aligned
    cosine_before: float              # that sum over the product of the two norms: 1 = identical up to scale
    cosine_after: float
    iterations: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"align ({self.method}): {self.blocks} blocks; moved {self.residual_moved}/{self.residual_width} "
                f"residual channels, {sum(self.heads_moved)}/{self.blocks * self.heads} heads, "
                f"{sum(self.mlp_moved)}/{self.blocks * self.mlp_width} MLP units; outside the blocks "
                f"{', '.join(self.outside) or 'nothing'}; weight-matching objective {self.objective_before:.4g} -> "
                f"{self.objective_after:.4g} (cosine {self.cosine_before:.4f} -> {self.cosine_after:.4f}, "
                f"{self.iterations} iterations)")


# -- reading the blocks ------------------------------------------------------------------------------------------

def _blocks(model: nn.Module, which: str) -> tuple[str, list[dict[str, Tensor]], list[int]]:
    """The blocks' tensors by role, their prefix and head counts; anything else inside a block is refused."""
    found: dict[int, dict[str, Tensor]] = {}
    prefixes = set()
    for name, param in model.named_parameters():
        m = _BLOCK.match(name)
        if m is None:
            continue
        prefixes.add(m["prefix"])
        if m["role"] not in ROLES:
            raise AlignError(f"align: {which} tensor {name} is not one align can permute; it aligns timm-style ViT "
                             f"blocks ({', '.join(ROLES)}); leave align off for this model")
        found.setdefault(int(m["index"]), {})[m["role"]] = param
    if not found:
        names = [n for n, _ in model.named_parameters()][:3]
        raise AlignError(f"align: the {which} ({type(model).__name__}) has no timm-style blocks "
                         f"(blocks.N.attn.qkv.weight ...; its first tensors are {names}); align works on timm-style "
                         f"ViT blocks (fused qkv, proj, fc1, fc2, norm1, norm2): leave align off for this model")
    if len(prefixes) > 1:
        raise AlignError(f"align: the {which} has several block stacks ({sorted(prefixes)}); align takes one")
    prefix = prefixes.pop()
    blocks = [found[i] for i in sorted(found)]
    for i, block in enumerate(blocks):
        missing = [r for r in ROLES if r not in block]
        if missing:
            raise AlignError(f"align: {which} block {prefix}.{i} lacks {missing}; align needs timm-style blocks "
                             f"with biases and both norms")
    heads = []
    for i in range(len(blocks)):
        attn = model.get_submodule(f"{prefix}.{i}.attn")
        if not isinstance(getattr(attn, "num_heads", None), int):
            raise AlignError(f"align: {which} module {prefix}.{i}.attn has no integer num_heads; align needs the "
                             f"head count to permute whole heads")
        heads.append(attn.num_heads)
    return prefix, blocks, heads


def _check_same_shapes(target: list[dict[str, Tensor]], aux: list[dict[str, Tensor]], t_heads: list[int],
                       a_heads: list[int]) -> None:
    if len(target) != len(aux):
        raise AlignError(f"align: the target has {len(target)} blocks and the aux {len(aux)}; align permutes "
                         f"units block by block, so both need the same depth (leave align off)")
    for i, (t, a) in enumerate(zip(target, aux)):
        for role in ROLES:
            if t[role].shape != a[role].shape:
                raise AlignError(f"align: block {i} {role} is {list(t[role].shape)} in the target and "
                                 f"{list(a[role].shape)} in the aux; align needs the same widths (leave it off)")
        if t_heads[i] != a_heads[i]:
            raise AlignError(f"align: block {i} has {t_heads[i]} heads in the target and {a_heads[i]} in the aux")


# -- permuting -------------------------------------------------------------------------------------------------

def _heads_rows(perm: Tensor, parts: int, width: int) -> Tensor:
    """Row order of a ``[parts * width, ...]`` tensor (q, k, v stacked) with its heads in the order ``perm``."""
    head_dim = width // len(perm)
    within = torch.arange(head_dim)
    one = (perm[:, None] * head_dim + within[None, :]).reshape(-1)
    return torch.cat([one + s * width for s in range(parts)])


def _permuted_block(block: dict[str, Tensor], res: Tensor, heads: Tensor, mlp: Tensor) -> dict[str, Tensor]:
    """A block's tensors with its residual channels, heads and MLP units in the given orders."""
    width = len(res)
    qkv_rows = _heads_rows(heads, 3, width)
    head_cols = _heads_rows(heads, 1, width)
    return {
        "norm1.weight": block["norm1.weight"][res], "norm1.bias": block["norm1.bias"][res],
        "attn.qkv.weight": block["attn.qkv.weight"][qkv_rows][:, res],
        "attn.qkv.bias": block["attn.qkv.bias"][qkv_rows],
        "attn.proj.weight": block["attn.proj.weight"][res][:, head_cols],
        "attn.proj.bias": block["attn.proj.bias"][res],
        "norm2.weight": block["norm2.weight"][res], "norm2.bias": block["norm2.bias"][res],
        "mlp.fc1.weight": block["mlp.fc1.weight"][mlp][:, res], "mlp.fc1.bias": block["mlp.fc1.bias"][mlp],
        "mlp.fc2.weight": block["mlp.fc2.weight"][res][:, mlp], "mlp.fc2.bias": block["mlp.fc2.bias"][res],
    }


def weight_objective(target: list[dict[str, Tensor]], aux: list[dict[str, Tensor]]) -> tuple[float, float]:
    """``sum <W_target, W_aux>`` over every block tensor, and that sum over the product of the global norms."""
    dot = sum(float((t[r].float() * a[r].float()).sum()) for t, a in zip(target, aux) for r in ROLES)
    nt = sum(float(t[r].float().pow(2).sum()) for t in target for r in ROLES) ** 0.5
    na = sum(float(a[r].float().pow(2).sum()) for a in aux for r in ROLES) ** 0.5
    return dot, dot / max(nt * na, 1e-30)


def _assign(cost: Tensor) -> Tensor:
    """The permutation ``p`` maximising ``sum_k cost[k, p[k]]``."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.detach().double().numpy(), maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def _per_head(x: Tensor, heads: int) -> Tensor:
    """A qkv tensor ``[3 * D, ...] -> [3, heads, D / heads * ...]``: rows grouped per head, q, k, v apart."""
    return x.reshape(3, heads, -1)


def _blocks_given_residual(target: list[dict[str, Tensor]], aux: list[dict[str, Tensor]], heads: list[int],
                           res: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Each block's best head and MLP-unit permutations once the residual channels are fixed."""
    head_perms, mlp_perms = [], []
    for t, a, h in zip(target, aux, heads):
        ar = _permuted_block(a, res, torch.arange(h), torch.arange(a["mlp.fc1.weight"].shape[0]))
        tq, aq = _per_head(t["attn.qkv.weight"].double(), h), _per_head(ar["attn.qkv.weight"].double(), h)
        tb, ab = _per_head(t["attn.qkv.bias"].double(), h), _per_head(ar["attn.qkv.bias"].double(), h)
        tp = t["attn.proj.weight"].double().t().reshape(h, -1)
        ap = ar["attn.proj.weight"].double().t().reshape(h, -1)
        head_perms.append(_assign(torch.einsum("shx,sgx->hg", tq, aq) + torch.einsum("shx,sgx->hg", tb, ab)
                                  + tp @ ap.t()))
        mlp_perms.append(_assign(t["mlp.fc1.weight"].double() @ ar["mlp.fc1.weight"].double().t()
                                 + torch.outer(t["mlp.fc1.bias"].double(), ar["mlp.fc1.bias"].double())
                                 + t["mlp.fc2.weight"].double().t() @ ar["mlp.fc2.weight"].double()))
    return head_perms, mlp_perms


def _residual_given_blocks(target: list[dict[str, Tensor]], aux: list[dict[str, Tensor]], head_perms: list[Tensor],
                           mlp_perms: list[Tensor]) -> Tensor:
    """The best residual-channel permutation once every block's heads and MLP units are fixed."""
    width = target[0]["norm1.weight"].shape[0]
    cost = torch.zeros(width, width, dtype=torch.float64)
    for t, a, hp, mp in zip(target, aux, head_perms, mlp_perms):
        a = _permuted_block(a, torch.arange(width), hp, mp)
        cost += t["attn.qkv.weight"].double().t() @ a["attn.qkv.weight"].double()
        cost += t["attn.proj.weight"].double() @ a["attn.proj.weight"].double().t()
        cost += t["mlp.fc1.weight"].double().t() @ a["mlp.fc1.weight"].double()
        cost += t["mlp.fc2.weight"].double() @ a["mlp.fc2.weight"].double().t()
        for role in ("norm1.weight", "norm1.bias", "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc2.bias"):
            cost += torch.outer(t[role].double(), a[role].double())
    return _assign(cost)


def _ascend(target: list[dict[str, Tensor]], aux: list[dict[str, Tensor]], heads: list[int], res: Tensor,
            iterations: int) -> tuple[float, Permutation, int]:
    """Coordinate ascent from the residual order ``res``: blocks given residual, residual given blocks, ...
    until the objective stops increasing; returns the best objective, its permutation and the iterations."""
    best: tuple[float, Permutation] | None = None
    done = 0
    while done < iterations:
        done += 1
        head_perms, mlp_perms = _blocks_given_residual(target, aux, heads, res)
        value = weight_objective(target, [_permuted_block(a, res, h, m)
                                          for a, h, m in zip(aux, head_perms, mlp_perms)])[0]
        if best is not None and value <= best[0] + 1e-9 * abs(best[0]):
            break
        best = (value, Permutation(res, tuple(head_perms), tuple(mlp_perms)))
        res = _residual_given_blocks(target, aux, head_perms, mlp_perms)
    return best[0], best[1], done


def _match_weights(target: list[dict[str, Tensor]], aux: list[dict[str, Tensor]], heads: list[int],
                   iterations: int, restarts: int) -> tuple[Permutation, int]:
    """Weight matching: coordinate ascent from the identity and from ``restarts - 1`` random residual orders
    (seeded: the same models give the same answer); the best wins. One start can stop in a local optimum."""
    width = target[0]["norm1.weight"].shape[0]
    g = torch.Generator().manual_seed(0)
    starts = [torch.arange(width)] + [torch.randperm(width, generator=g) for _ in range(restarts - 1)]
    results = [_ascend(target, aux, heads, start, iterations) for start in starts]
    _, perm, _ = max(results, key=lambda r: r[0])
    return perm, sum(r[2] for r in results)


# -- activation matching -----------------------------------------------------------------------------------------

def _record(model: nn.Module, prefix: str, heads: list[int], inputs: Any) -> list[dict[str, Tensor]]:
    """Per block: the residual stream after it [T, D], the MLP hidden units [T, F], each head's attention map."""
    rows: list[dict[str, Tensor]] = [{} for _ in heads]
    hooks = []

    def keep(i: int, key: str):
        def hook(module, args, output):
            rows[i][key] = output.detach().float()
        return hook

    for i in range(len(heads)):
        block = model.get_submodule(f"{prefix}.{i}")
        hooks += [block.register_forward_hook(keep(i, "out")), block.norm1.register_forward_hook(keep(i, "in")),
                  block.mlp.act.register_forward_hook(keep(i, "hidden"))]
    try:
        with torch.no_grad():
            model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    finally:
        for h in hooks:
            h.remove()
    for i, (row, h) in enumerate(zip(rows, heads)):
        with torch.no_grad():
            qkv = model.get_submodule(f"{prefix}.{i}.attn.qkv")(row.pop("in"))
        b, n, _ = qkv.shape
        q, k, _ = qkv.reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4).float()
        row["attention"] = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)  # [B, H, N, N]
    return rows


def _correlation(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation between every column of ``a`` and every column of ``b`` (rows are samples)."""
    a = a.reshape(-1, a.shape[-1]).double()
    b = b.reshape(-1, b.shape[-1]).double()
    a = (a - a.mean(0)) / (a.std(0) + 1e-8)
    b = (b - b.mean(0)) / (b.std(0) + 1e-8)
    return a.t() @ b / max(len(a) - 1, 1)


def _match_activations(target: nn.Module, aux: nn.Module, t_prefix: str, a_prefix: str, heads: list[int],
                       inputs: Any) -> Permutation:
    t_rows, a_rows = _record(target, t_prefix, heads, inputs), _record(aux, a_prefix, heads, inputs)
    res = _assign(sum(_correlation(t["out"], a["out"]) for t, a in zip(t_rows, a_rows)))
    head_perms = tuple(_assign(torch.einsum("bhij,bgij->hg", t["attention"].double(), a["attention"].double()))
                       for t, a in zip(t_rows, a_rows))
    mlp_perms = tuple(_assign(_correlation(t["hidden"], a["hidden"])) for t, a in zip(t_rows, a_rows))
    return Permutation(res, head_perms, mlp_perms)


# -- the tensors outside the blocks ------------------------------------------------------------------------------

def _outside(model: nn.Module, prefix: str, width: int) -> dict[str, int]:
    """The residual axis of every tensor outside the blocks that writes or reads the residual stream.

    A Linear or Conv writing ``width`` channels (a patch embedding) permutes its outputs; a Linear reading
    ``width`` features (a head) its inputs; a LayerNorm of ``width`` (the final norm) its entries; a bare
    parameter of a model or a tokenizer (class token, position embedding: 2+ dims, the width last) its last
    axis. A module of another kind that has
    a tensor of that width, or a square ``width x width`` layer outside the blocks, is refused by name:
    align cannot tell which of its axes is the residual stream.
    """
    axes: dict[str, int] = {}
    for module_name, module in model.named_modules():
        if module_name == prefix or module_name.startswith(prefix + "."):
            continue
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        full = {k: f"{module_name}.{k}" if module_name else k for k in own}
        touches = any(width in p.shape for p in own.values())
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            w = own["weight"]
            writes, reads = w.shape[0] == width, w.shape[1] == width
            if writes and reads:
                raise AlignError(f"align: {full['weight']} maps {width} channels to {width} outside the blocks; "
                                 f"align cannot tell whether it reads or writes the residual stream")
            if writes:
                axes[full["weight"]] = 0
                if "bias" in own:
                    axes[full["bias"]] = 0
            elif reads:
                axes[full["weight"]] = 1
        elif isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (width,):
            axes.update({full[k]: 0 for k in own})
        elif type(module).__module__.startswith("torch.nn") is False and all(
                p.dim() >= 2 and p.shape[-1] == width and width not in p.shape[:-1] for p in own.values()):
            axes.update({full[k]: p.dim() - 1 for k, p in own.items()})
        elif touches:
            raise AlignError(f"align: {type(module).__name__} {module_name or '(the model)'} outside the blocks has "
                             f"a tensor of the residual width {width} ({', '.join(full.values())}); align does not "
                             f"know how to permute it, so it leaves this aux as it is: leave align off")
    return axes


# -- the whole ----------------------------------------------------------------------------------------------------

def apply_permutation(model: nn.Module, perm: Permutation) -> tuple[str, ...]:
    """Permute ``model``'s blocks and the tensors outside them in place; returns the outside tensors permuted."""
    prefix, blocks, _ = _blocks(model, "aux")
    outside = _outside(model, prefix, len(perm.residual))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for block, heads, mlp in zip(blocks, perm.heads, perm.mlp):
            new = _permuted_block({r: t.detach().clone() for r, t in block.items()}, perm.residual, heads, mlp)
            for role, tensor in new.items():
                block[role].copy_(tensor)
        for name, axis in outside.items():
            params[name].copy_(params[name].detach().index_select(axis, perm.residual))
    return tuple(outside)


def align(target: nn.Module, aux: nn.Module, method: str = "weights", *, inputs: Any = None,
          iterations: int = 30, restarts: int = 4) -> AlignReport:
    """Permute ``aux`` in place so that its hidden units line up with ``target``'s; returns what changed.

    ``method``: ``"weights"`` (weight matching, needs nothing else) or ``"activations"`` (needs ``inputs``
    that both models read: the same modality); weight matching climbs from ``restarts`` starting orders for
    at most ``iterations`` rounds each. With ``inputs`` the aux's output is checked unchanged
    (a permutation is a symmetry); a difference raises :class:`AlignError` and the aux is put back.
    """
    if method not in METHODS:
        raise AlignError(f"align={method!r} is not one of {list(METHODS)}")
    if not isinstance(aux, nn.Module):
        raise AlignError(f"align needs the aux as a module in memory (got {type(aux).__name__}); a lazily read "
                         f"aux (a path, an AuxSource) is not aligned: load it first, or leave align off")
    t_prefix, t_blocks, t_heads = _blocks(target, "target")
    a_prefix, a_blocks, a_heads = _blocks(aux, "aux")
    _check_same_shapes(t_blocks, a_blocks, t_heads, a_heads)
    width = t_blocks[0]["norm1.weight"].shape[0]
    _outside(aux, a_prefix, width)  # refuses before anything changes
    t_plain = [{r: t.detach().float() for r, t in b.items()} for b in t_blocks]
    a_plain = [{r: t.detach().float().clone() for r, t in b.items()} for b in a_blocks]
    before, cos_before = weight_objective(t_plain, a_plain)
    if method == "activations":
        if inputs is None:
            raise AlignError("align='activations' needs inputs both models read (the same modality); pass "
                             "target_inputs, or use align='weights'")
        perm, iterations_done = _match_activations(target, aux, t_prefix, a_prefix, t_heads, inputs), 1
    else:
        perm, iterations_done = _match_weights(t_plain, a_plain, t_heads, iterations, restarts)
    reference = _output(aux, inputs)
    saved = {k: v.detach().clone() for k, v in aux.state_dict().items()}
    outside = apply_permutation(aux, perm)
    if reference is not None:
        after_output = _output(aux, inputs)
        gap = float((after_output - reference).abs().max())
        scale = float(reference.abs().max()) + 1e-12
        if gap > 1e-4 * scale:
            aux.load_state_dict(saved)
            raise AlignError(f"align: the permuted aux's output moved by {gap:.3g} (of {scale:.3g}) on the given "
                             f"inputs, so the permutation was not a symmetry of this model (a tensor outside the "
                             f"blocks was permuted wrongly: {list(outside)}); the aux was put back. Leave align off")
    after, cos_after = weight_objective(t_plain, [{r: t.detach().float() for r, t in b.items()} for b in a_blocks])
    ident = torch.arange
    return AlignReport(
        method=method, blocks=len(a_blocks),
        residual_moved=int((perm.residual != ident(width)).sum()), residual_width=width,
        heads_moved=tuple(int((h != ident(len(h))).sum()) for h in perm.heads), heads=t_heads[0],
        mlp_moved=tuple(int((m != ident(len(m))).sum()) for m in perm.mlp), mlp_width=len(perm.mlp[0]),
        outside=outside, objective_before=before, objective_after=after, cosine_before=cos_before,
        cosine_after=cos_after, iterations=iterations_done)


def _output(model: nn.Module, inputs: Any) -> Tensor | None:
    if inputs is None:
        return None
    with torch.no_grad():
        out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    return out.detach().float() if isinstance(out, Tensor) else None

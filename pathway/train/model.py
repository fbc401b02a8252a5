"""The engine's transformer: adapter tokenizer -> timm Blocks -> LayerNorm -> adapter head.

One class for every modality (contracts.md section 4); a modality only brings its tokenizer and
head. Parameter names follow timm's VisionTransformer (``blocks.{i}.attn.qkv`` ...), so target and
aux models built here pair by name, and official ViT-family checkpoints load through renames.

``build_model(recipe)`` makes the target (initialised from ``model.checkpoint``), the aux model
(``aux.checkpoint``, body only) and connects them with ``pathway.connect`` using the recipe's
``pathway:`` options.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from pathway.adapters.heads import has_cls_token

from .config import Recipe, RecipeError

if TYPE_CHECKING:
    from pathway.adapters.base import Adapter

__all__ = ["TransformerModel", "build_adapter", "build_transformer", "build_model", "init_from_checkpoint",
           "open_transformers_aux", "aux_reads", "body_parameters",
           "check_fits_in_memory"]


class TransformerModel(nn.Module):
    """``x -> tokenizer.encode(x) -> [cls +] tokens [B, N, D] -> blocks -> norm -> head(t, out) -> logits``.

    Args:
        tokenizer: the adapter's tokenizer (``encode(x) -> TokenizerOutput``).
        head: the adapter's head, ``forward(tokens [B, N(+1), D], out) -> logits``. With ``cls_token``
            the class token is ``tokens[:, 0]``.
        embed_dim, depth, num_heads, mlp_ratio: ViT body sizes.
        drop_path: stochastic depth of the last block, linear from 0 over the depth (timm, MAE).
        cls_token: prepend a learned class token ``[1, 1, D]``.
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        head: nn.Module,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        cls_token: bool = False,
        fc_norm: bool = False,
        pos_every_block: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim, self.depth, self.num_heads, self.mlp_ratio = embed_dim, depth, num_heads, mlp_ratio
        self.tokenizer = tokenizer
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        self.pos_every_block = pos_every_block
        # Point-MAE keeps the class token's position apart, to add it again before every block
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token and pos_every_block else None
        norm = partial(nn.LayerNorm, eps=1e-6)  # timm VisionTransformer's choice: folded files load there exactly
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.Sequential(
            *[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=r, norm_layer=norm) for r in rates]
        )
        self.norm = nn.Identity() if fc_norm else norm(embed_dim)  # fc_norm: the head normalises after pooling
        self.head = head
        beyond = [i for i in getattr(head, "feature_blocks", ()) if not 0 <= i < depth]
        if beyond:
            raise RecipeError(f"the head {type(head).__name__} reads the outputs of blocks "
                              f"{list(head.feature_blocks)}, "
                              f"but the model has {depth} blocks (model.depth); use a depth above {max(beyond)}")
        self.apply(_init_weights)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        if self.cls_pos is not None:
            nn.init.normal_(self.cls_pos, std=0.02)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Any]:
        """Tokens after the final norm ``[B, N(+1), D]`` and the tokenizer's output.

        A head with ``feature_blocks`` (Point-MAE's segmentation head reads blocks 3, 7 and 11) also gets those
        blocks' outputs after the final norm, in ``out.extras["block_features"]``."""
        out = self.tokenizer.encode(x)
        t = out.tokens
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        wanted = getattr(self.head, "feature_blocks", ())
        t, features = self.run_blocks(t, out.pos.expand(t.shape[0], -1, -1), wanted)
        if wanted:
            out.extras["block_features"] = features
        return self.norm(t), out

    def run_blocks(self, t: Tensor, pos: Tensor, wanted: tuple[int, ...] = ()) -> tuple[Tensor, list[Tensor]]:
        """The blocks over ``t`` (positions already added, a class token first if the model has one); with
        ``pos_every_block`` the patch positions ``pos [B, N, D]`` (and ``cls_pos``) are added again before blocks
        1.. as Point-MAE does. Returns the last output and the normed outputs of the ``wanted`` blocks."""
        if not wanted and not self.pos_every_block:
            return self.blocks(t), []
        again = None
        if self.pos_every_block:
            again = pos if self.cls_pos is None else torch.cat([self.cls_pos.expand(pos.shape[0], -1, -1), pos], dim=1)
        features = []
        for i, block in enumerate(self.blocks):
            t = block(t if again is None or i == 0 else t + again)  # the first block's input has them already
            if i in wanted:
                features.append(self.norm(t))
        return t, features

    def forward(self, x: Tensor) -> Tensor:
        t, out = self.forward_features(x)
        return self.head(t, out)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "cls_pos", "tokenizer.pos_embed"}


class PooledNormHead(nn.Module):
    """The global-pool classifier of MAE, VideoMAE and AudioMAE fine-tuning (``models_vit.py``,
    ``global_pool=True`` / ``use_mean_pooling``): the mean of the patch tokens (a class token left out), a
    LayerNorm ``fc_norm``, a Linear ``fc``. The model then has no norm after its blocks (``model.fc_norm``)."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc = nn.Linear(embed_dim, num_classes)
        # the three start their new classifier near zero: trunc-normal std 2e-5 (MAE main_finetune.py, AudioMAE),
        # VideoMAE's 0.02 times init_scale 0.001
        nn.init.trunc_normal_(self.fc.weight, std=2e-5)
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens: Tensor, out: Any = None) -> Tensor:
        patches = tokens[:, 1:] if has_cls_token(tokens, out) else tokens
        return self.fc(self.fc_norm(patches.mean(dim=1)))


def _init_weights(m: nn.Module) -> None:
    """timm's ViT init for the body (trunc-normal 0.02 linears, zero biases); tokenizers/heads keep theirs."""
    if isinstance(m, Block):
        for sub in m.modules():
            if isinstance(sub, nn.Linear):
                nn.init.trunc_normal_(sub.weight, std=0.02)
                if sub.bias is not None:
                    nn.init.zeros_(sub.bias)


def build_adapter(recipe: Recipe, *, need_data: bool = True) -> Adapter:
    """Instantiate the recipe's adapter (``Adapter(root, **data.options)``).

    ``need_data=False`` (dry runs, inspect): when ``data.root`` is missing, build a data-less
    ``Adapter.spec`` that still makes the tokenizer and head, with ``data.num_classes`` classes (or the
    length of ``data.options.classes``; 1000 when neither says).
    """
    from pathway.adapters import registry as adapters
    from pathway.adapters.base import OptionError

    name = recipe.data.adapter
    try:
        cls = adapters.get(name)
    except (KeyError, ValueError) as err:
        raise RecipeError(f"{recipe.source}: 'data.adapter' = {name!r}: {err.args[0]}") from None
    try:
        if not need_data and not (recipe.data.root and Path(recipe.data.root).exists()):
            classes = recipe.data.options.get("classes")
            return cls.spec(recipe.data.num_classes or (len(classes) if classes else 1000), **recipe.data.options)
        return cls(recipe.data.root, **recipe.data.options)
    except OptionError as err:
        raise RecipeError(f"{recipe.source}: 'data.options' for adapter {name!r}: {err}") from None


def body_parameters(dim: int, depth: int, mlp_ratio: float) -> int:
    """Parameters of ``depth`` timm Blocks of width ``dim`` (qkv, proj, the MLP and two LayerNorms each)."""
    hidden = int(dim * mlp_ratio)
    return depth * (3 * dim * dim + 3 * dim + dim * dim + dim + 2 * dim * hidden + hidden + dim + 4 * dim)


def memory_bytes() -> int | None:
    """This machine's physical memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(recipe: Recipe, section: str, dim: int, depth: int, mlp_ratio: float) -> None:
    """Refuse, before allocating, a transformer whose fp32 weights alone exceed this machine's memory."""
    count, total = body_parameters(dim, depth, mlp_ratio), memory_bytes()
    if total is not None and 4 * count > total:
        raise RecipeError(f"{recipe.source}: '{section}' of width {dim}, depth {depth}, mlp_ratio {mlp_ratio} holds "
                          f"about {count:.3g} parameters in its blocks ({4 * count / 2**30:.3g} GiB in fp32, before "
                          f"gradients and optimizer state), more than this machine's {total / 2**30:.3g} GiB of "
                          f"memory; lower {section}.embed_dim or {section}.depth")


def build_transformer(recipe: Recipe, adapter: Adapter, *, aux: bool = False) -> TransformerModel:
    """A TransformerModel of the recipe's sizes (``aux=True``: the aux section's sizes, no drop path)."""
    m, a = recipe.model, recipe.aux
    pick = (lambda own, fallback: fallback if own is None else own) if aux else (lambda own, fallback: fallback)
    dim = pick(a.embed_dim, m.embed_dim)
    depth, mlp_ratio = pick(a.depth, m.depth), pick(a.mlp_ratio, m.mlp_ratio)
    if torch.empty(0).device.type != "meta":  # a dry run builds on meta and allocates nothing
        check_fits_in_memory(recipe, "aux" if aux else "model", dim, depth, mlp_ratio)
    fc_norm = m.fc_norm and not aux  # only the target's head is used
    if fc_norm and adapter.task not in ("classification", "multilabel"):
        raise RecipeError(f"{recipe.source}: 'model.fc_norm' = true is the global-pool classifier of MAE-family "
                          f"fine-tuning; the '{adapter.name}' adapter's task is {adapter.task}: "
                          f"set model.fc_norm: false")
    return TransformerModel(
        adapter.tokenizer(dim),
        PooledNormHead(dim, adapter.num_classes) if fc_norm else adapter.head(dim),
        embed_dim=dim,
        depth=depth,
        num_heads=pick(a.num_heads, m.num_heads),
        mlp_ratio=mlp_ratio,
        drop_path=0.0 if aux else m.drop_path,
        cls_token=m.cls_token,
        fc_norm=fc_norm,
        pos_every_block=m.pos_every_block,
    )


def init_from_checkpoint(model: nn.Module, path: str | Path, fmt: str = "auto", *, body_only: bool = False) -> str:
    """Load ``path`` into ``model`` and return a one-line account of what was loaded.

    ``fmt="pathway"`` (or ``"auto"`` on a file in TransformerModel keys, e.g. ``pathway pretrain``'s
    encoder) loads our own layout; anything else goes through ``pathway.train.official.layouts.load_checkpoint``
    (official MAE-family and timm layouts, exact key checks). ``body_only`` (the aux model) keeps only
    ``blocks.*`` and requires every body tensor: a half-loaded aux body would silently weaken the pathway.
    """
    from .official.layouts import ENGINE_BODY, is_engine_layout, load_checkpoint, read_checkpoint

    path = Path(path)
    state, args = read_checkpoint(path)  # read once; MAE-family files keep their `args` for format detection
    engine_layout = is_engine_layout(list(state))
    if fmt == "pathway" or (fmt == "auto" and engine_layout):
        if not engine_layout:
            raise RecipeError(f"{path}: not in TransformerModel keys (no 'blocks.*'); set checkpoint_format")
        if body_only:
            state = {k: v for k, v in state.items() if k.startswith(ENGINE_BODY)}
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k.startswith(ENGINE_BODY) or not body_only]
        if body_only and missing:
            raise RecipeError(f"{path}: aux checkpoint lacks {len(missing)} body tensors, e.g. {missing[:4]}")
        return (f"{path.name} (pathway layout): missing {missing or 'none'}, "
                f"unexpected {list(result.unexpected_keys) or 'none'}")
    report = load_checkpoint(model, state, format=fmt, args=args, only=ENGINE_BODY if body_only else "")
    return (f"{path.name} (format {report.format}): {len(report.loaded)} tensors loaded, "
            f"left at init {report.left_at_init or 'none'}")


def open_transformers_aux(path: str | Path):
    """A Hugging Face model directory (config.json + safetensors, sharded or not) as a lazily read aux.

    The model is built on the meta device from its config (``pathway.open_aux``); ``connect`` then reads
    only the tensors it pairs, so a language model of billions of parameters costs only those tensors.
    """
    import pathway

    path = Path(path)
    if not (path / "config.json").is_file():
        raise RecipeError(f"aux.checkpoint={path}: aux.checkpoint_format=transformers needs a Hugging Face model "
                          f"directory holding config.json and the weights")
    return pathway.open_aux(path)  # a SourceError names a missing transformers package or weights file


def aux_reads(report: Any) -> list[str]:
    """The aux tensors a connect with ``report`` reads (a gated MLP's unused projection is not read)."""
    unused = set(report.unused_aux)
    return [n for n in dict.fromkeys(n for p in report.pairs for n in p.aux) if n not in unused]


def build_model(recipe: Recipe, adapter: Adapter | None = None, *, example: Tensor | None = None,
                log=print) -> tuple[TransformerModel, Any]:
    """Target model (initialised from ``model.checkpoint``), connected to the aux model when ``aux.enabled``.

    ``example``: one input batch for the core to read both graphs with (default: what it derives).
    Returns ``(model, report)``; report is ``pathway.connect``'s Report, or None for the baseline.
    """
    import pathway

    adapter = adapter or build_adapter(recipe)
    model = build_transformer(recipe, adapter)
    if recipe.model.checkpoint:
        log("target init: " + init_from_checkpoint(model, recipe.model.checkpoint, recipe.model.checkpoint_format))
    if not recipe.aux.enabled:
        return model, None
    if recipe.aux.checkpoint_format == "transformers":
        # Any Hugging Face model directory (another codebase, another modality): the core pairs it by
        # graph position and derives its inputs from its config (token ids for a text encoder).
        source = open_transformers_aux(recipe.aux.checkpoint)
        log(f"aux: {type(source.model).__name__} from {recipe.aux.checkpoint} (Hugging Face directory, read lazily)")
        inputs = {} if example is None else {"target_inputs": example}
        report = pathway.connect(model, source, **recipe.connect_options(), **inputs)
        log("aux " + source.describe_reads(source.tensors_read))
        return model, report
    aux = build_transformer(recipe, adapter, aux=True)
    if recipe.aux.checkpoint:
        loaded = init_from_checkpoint(aux, recipe.aux.checkpoint, recipe.aux.checkpoint_format, body_only=True)
        log("aux body: " + loaded)
    else:
        log("aux body: random init (no aux.checkpoint)")
    inputs = {} if example is None else {"target_inputs": example, "aux_inputs": example}
    report = pathway.connect(model, aux, **recipe.connect_options(), **inputs)
    return model, report

"""Recipes: YAML files over typed dataclass defaults.

A recipe is a YAML mapping whose top-level sections are the fields of :class:`Recipe`
(``data``, ``model``, ``aux``, ``pathway``, ``optim``, ``train``, ``pretrain``, ``output``).
Every key a file may set is a dataclass field below, with its type and default; a key that is
not a field, or a value of the wrong type, is an error that names the file, the key and what is
allowed (nanoGPT's configurator, without its ``exec``).

Resolution order (later wins), as timm's ``train.py`` does with ``set_defaults``:

1. the dataclass defaults,
2. the files named by ``extends:`` (a path relative to the file, or a list of them; chains allowed),
3. the file itself,
4. ``--set section.key=value`` overrides (values parsed as YAML, so ``--set train.epochs=3``,
   ``--set pathway.include=['^blocks\\.0\\.']``).

Mappings merge key by key; lists and scalars replace. The resolved recipe (``Recipe.to_dict()``)
is written next to the outputs (``recipe.yaml``) and inside every checkpoint, so a run can be
re-created from either.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import errno
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pathway.errors import OptionError, PathwayError

__all__ = [
    "RecipeError",
    "DataConfig",
    "ModelConfig",
    "AuxConfig",
    "OptimConfig",
    "TrainConfig",
    "PretrainConfig",
    "OutputConfig",
    "Recipe",
    "BatchPlan",
    "batch_plan",
    "load_recipe",
    "recipe_from_dict",
    "parse_overrides",
    "check_adapter",
    "check_data",
    "pathway_section",
]


class RecipeError(PathwayError):
    """A recipe that cannot be used; the message names the file, the key and the allowed values."""


# --------------------------------------------------------------------------------------------
# Sections. Every field has a comment saying what it does; defaults are the paper's image run
# where one exists (official-m2pt.md), otherwise the smallest sensible choice.
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the data is and how it is batched. The adapter reads the files."""

    adapter: str = "image"  # registered adapter name: pathway.adapters.available()
    root: str = ""  # folder or manifest the adapter reads; relative paths resolve against the recipe file
    options: dict[str, Any] = field(default_factory=dict)  # passed as Adapter(root, **options); the adapter checks them
    train_split: str = "train"  # split name given to adapter.dataset(split, train=True)
    val_split: str = "val"  # split evaluated during and after training ("" = no evaluation)
    batch_size: int = 64  # per process and per micro-step
    global_batch: int | None = None  # items per optimizer step over all processes (the paper's batch): the engine
    #   derives the accumulation, global_batch / (batch_size * processes); None: optim.accum_steps says it
    num_workers: int | None = None  # DataLoader workers per process (0 = load in the main process); None: the
    #   process's share of this machine's CPU cores less one, at most 16 on a GPU and 4 on the CPU (data.py)
    prefetch_factor: int = 2  # batches each worker loads ahead (torch's default); raise it when data_wait is high
    num_classes: int | None = None  # only for builds without the data (dry runs, inspect); else counted by the adapter
    demo: bool = False  # generate the embedded demo data at root when it is missing (pathway/train/demo_data.py)


@dataclass
class ModelConfig:
    """The target transformer (pathway/train/model.py): adapter tokenizer, timm Blocks, norm, adapter head."""

    embed_dim: int = 768  # token width D
    depth: int = 12  # number of timm Blocks
    num_heads: int = 12  # attention heads per Block
    mlp_ratio: float = 4.0  # hidden width of the MLP = mlp_ratio * D
    drop_path: float = 0.1  # stochastic depth rate of the last block (linear from 0 over the depth)
    cls_token: bool = False  # prepend a learned class token (official checkpoints fold their cls pos-embed into it)
    pos_every_block: bool = False  # Point-MAE: the position embedding is added to the input of every block
    #   (models/Point_MAE.py TransformerEncoder: x = block(x + pos)), not only to the first
    fc_norm: bool = False  # MAE / VideoMAE / AudioMAE global pooling: mean of the patch tokens, then a LayerNorm
    #   (fc_norm), then the Linear; no norm after the blocks (their pretraining norm goes unused, as there)
    checkpoint: str = ""  # initial weights of the target ("" = random init, i.e. from scratch)
    checkpoint_format: str = "auto"  # "auto" | "pathway" | a format of pathway.train.official.layouts (e.g. "mae")


@dataclass
class AuxConfig:
    """The auxiliary model: a transformer of the same kind trained on another modality.

    Only its blocks take part in the pathway, so only ``blocks.*`` tensors of its checkpoint are
    kept; its tokenizer and head are never used by the target.
    """

    enabled: bool = True  # False: train the plain target (the baseline of every paper table)
    adapter: str = ""  # modality of the aux checkpoint, for format detection ("" = same as data.adapter)
    checkpoint: str = ""  # aux weights file ("" = random init: tests and the 'untrained aux' ablation)
    checkpoint_format: str = "auto"  # as model.checkpoint_format, or "transformers": a Hugging Face model directory
    embed_dim: int | None = None  # None = same as model.*
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None


# The ``pathway`` section holds the options of ``pathway.connect`` and is checked by the core's own
# ``pathway.plan.Options`` (one definition of the options, their defaults and allowed values). The engine
# supplies the example inputs itself (the adapter's ``example_input()``), so a recipe does not set them.
ENGINE_SUPPLIED_OPTIONS = ("target_inputs", "aux_inputs")


@dataclass
class OptimConfig:
    """AdamW over pathway.param_groups, MAE lr scaling, cosine schedule with linear warm-up."""

    blr: float = 1e-3  # base lr; the absolute lr is blr * effective_batch / 256 (MAE)
    lr: float | None = None  # absolute lr; overrides blr when set
    lambda_lr: float | None = None  # absolute lr of the lambda group (None = same as lr)
    min_lr: float = 1e-6  # floor of the cosine
    weight_decay: float = 0.05  # decoupled decay; never applied to lambdas and 1-D params
    layer_decay: float | None = None  # layer-wise lr decay (0.65 in MAE ViT-B fine-tuning); None = off
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_epochs: float = 5.0  # linear warm-up length, in epochs (fractions allowed)
    clip_grad: float | None = None  # max global grad norm; None = no clipping
    accum_steps: int | None = None  # micro-batches per optimizer step; None: from data.global_batch (else 1)
    optimizer: Literal["adamw", "lars"] = "adamw"  # lars: MAE's linear probe (LARS on the weights, AdamW on lambda)
    lambda_layer_decay: bool = True  # block i's lambda takes block i's layer-decay scale (the official code)
    repeat_step: bool = False  # Point-MAE segmentation: AdamW steps twice per batch, the second time on the same
    #   gradients clipped to clip_grad (needed); the schedule and the EMA step once per batch; not under fp16


@dataclass
class TrainConfig:
    """The loop: length, precision, regularisation, logging and checkpoints."""

    epochs: int = 100
    max_steps: int | None = None  # stop after this many optimizer steps (demos, tests); None = all epochs
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 on GPUs that have it, else fp16; fp32 on the CPU, where bf16 is used when asked (fp16 refused)
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    mixup: float = 0.0  # Mixup alpha (0.8 in the paper's image run); classification only
    cutmix: float = 0.0  # CutMix alpha (1.0 in the paper's image run)
    mixup_prob: float = 1.0  # probability of applying mixup or cutmix to a batch
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    label_smoothing: float = 0.0  # 0.1 in the paper's image run
    ema: bool = False  # keep an EMA of the weights (timm ModelEmaV3) and evaluate it too
    ema_decay: float = 0.9999
    export_ema: bool = False  # the EMA weights (needs ema) become the run's: the final test, the fold and
    #   model.safetensors use them, and the best evaluation is the EMA's (MAE's from-scratch ViT-B reports them)
    eval_every: int = 1  # evaluate every N epochs (and always at the end)
    log_every: int = 10  # optimizer steps between log lines / JSONL rows
    tensorboard: bool | None = None  # the JSONL rows also as TensorBoard scalars in RUN/tensorboard; None: when the
    #   tensorboard package is installed; true without it is refused; false: off
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0 = none by steps)
    checkpoint_minutes: float = 30.0  # wall-clock minutes between checkpoints (0 = none by time): a preempted run
    #   loses at most this much; an ImageNet epoch of ViT-B on 8 GPUs is longer
    checkpoint_epochs: int = 1  # epochs between end-of-epoch checkpoints (the final state is always saved)
    keep_last: int = 3  # checkpoints kept on disk
    compile: bool = False  # torch.compile the model (GPU runs)


@dataclass
class PretrainConfig:
    """MAE pretraining (pathway pretrain): random masking, small decoder, loss on masked tokens."""

    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_targets: bool = False  # normalise each token's target (MAE norm_pix_loss) before the loss


@dataclass
class OutputConfig:
    dir: str = "runs"  # parent folder of the run; relative paths resolve against the working directory
    name: str = ""  # run folder name ("" = the recipe file's stem)
    plots: bool = True  # write PNG plots of loss/metric and lambda per layer


@dataclass
class Recipe:
    """A whole experiment. ``source`` is the file it was read from (not a YAML key)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)
    pathway: dict[str, Any] = field(default_factory=lambda: pathway_section({}, "defaults"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    description: str = ""  # one line saying what the recipe reproduces
    source: str = field(default="", metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping of every resolved value (no ``extends``), suitable for YAML and checkpoints."""
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def run_name(self) -> str:
        return self.output.name or (Path(self.source).stem if self.source else "run")

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.run_name

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``pathway.connect`` / ``pathway.plan`` (checked by ``pathway.plan.Options``)."""
        return dict(self.pathway)


_SECTION_TYPES = typing.get_type_hints(Recipe)


# --------------------------------------------------------------------------------------------
# Type checking of values against the dataclass annotations.
# --------------------------------------------------------------------------------------------


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_describe(a) for a in typing.get_args(tp))}]"
    if origin is tuple:
        return f"list[{_describe(typing.get_args(tp)[0])}]"
    if origin is collections.abc.Callable:
        return "callable (Python API only)"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise _Mismatch. Only lossless conversions are made:
    int -> float, and strings such as '1e-3' (which YAML 1.1 reads as text) -> float."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp) for v in value]
    if origin is tuple:  # tuple[X, ...] in the core's Options: a list, or one value
        item_tp = typing.get_args(tp)[0]
        return tuple(_coerce(v, item_tp) for v in (value if isinstance(value, (list, tuple)) else [value]))
    if origin is collections.abc.Callable:  # YAML has no callables
        raise _Mismatch
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        key_tp, val_tp = typing.get_args(tp)
        return {_coerce(k, key_tp): _coerce(v, val_tp) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported annotation {tp!r}")  # a bug in this file, not in a recipe


def _unknown_key(where: str, key: str, allowed: list[str]) -> RecipeError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return RecipeError(f"{where}: unknown key '{key}'{hint}; allowed: {', '.join(allowed)}")


def _build_section(cls: type, values: Any, where: str, prefix: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: '{prefix}' must be a mapping of keys, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in allowed:
            raise _unknown_key(where, f"{prefix}.{key}", [f"{prefix}.{a}" for a in allowed])
        try:
            kwargs[key] = _coerce(value, hints[key])
        except _Mismatch:
            raise RecipeError(
                f"{where}: '{prefix}.{key}' = {value!r} ({type(value).__name__}); expected {_describe(hints[key])}"
            ) from None
    return cls(**kwargs)


def _plain(value: Any) -> Any:
    """Tuples as lists, so the resolved recipe is plain YAML."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def pathway_section(values: Any, where: str) -> dict[str, Any]:
    """The ``pathway`` section resolved against ``pathway.plan.Options``: every option, with its default."""
    from pathway.plan import Options

    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: 'pathway' must be a mapping of connect options, got {type(values).__name__}")
    hints = typing.get_type_hints(Options)
    checked = dict(values)
    for key, value in values.items():
        if key in ENGINE_SUPPLIED_OPTIONS:
            raise RecipeError(f"{where}: 'pathway.{key}' is set by the engine (the adapter's example input); "
                              f"remove it from the recipe")
        if key in hints:
            try:
                checked[key] = _coerce(value, hints[key])
            except _Mismatch:
                raise RecipeError(f"{where}: 'pathway.{key}' = {value!r} ({type(value).__name__}); "
                                  f"expected {_describe(hints[key])}") from None
    try:
        options = Options.parse(checked)
    except OptionError as err:
        raise RecipeError(f"{where}: 'pathway': {err}") from None
    return {f.name: _plain(getattr(options, f.name)) for f in dataclasses.fields(Options)
            if f.name not in ENGINE_SUPPLIED_OPTIONS}


def recipe_from_dict(values: dict[str, Any], where: str = "<recipe>") -> Recipe:
    """Check a resolved mapping (no ``extends``) against the schema and build the Recipe."""
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: a recipe is a YAML mapping of sections, got {type(values).__name__}")
    top = [f.name for f in dataclasses.fields(Recipe) if not f.metadata.get("internal")]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in top:
            raise _unknown_key(where, key, top)
        tp = _SECTION_TYPES[key]
        if key == "pathway":
            kwargs[key] = pathway_section(value, where)
        elif dataclasses.is_dataclass(tp):
            kwargs[key] = _build_section(tp, value, where, key)
        else:
            try:
                kwargs[key] = _coerce(value, tp)
            except _Mismatch:
                raise RecipeError(f"{where}: '{key}' = {value!r}; expected {_describe(tp)}") from None
    recipe = Recipe(**kwargs)
    check_values(recipe, where)
    return recipe


# --------------------------------------------------------------------------------------------
# Values: ranges and relations, checked when the recipe is read, before anything runs.
# --------------------------------------------------------------------------------------------

MAX_SEED = 1_000_000
_POSITIVE, _NON_NEGATIVE, _AT_LEAST_1 = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0"), (lambda v: v >= 1, ">= 1")
_FRACTION = (lambda v: 0 <= v <= 1, "between 0 and 1")
_BELOW_1 = (lambda v: 0 <= v < 1, "in [0, 1)")
_OPEN_UNIT = (lambda v: 0 < v < 1, "strictly between 0 and 1")
_RULES: dict[str, tuple[Any, str]] = {  # key -> (predicate, what is allowed); None values are not checked
    "data.batch_size": _AT_LEAST_1, "data.num_workers": _NON_NEGATIVE, "data.num_classes": _AT_LEAST_1,
    "data.prefetch_factor": _AT_LEAST_1,
    "model.embed_dim": _AT_LEAST_1, "model.depth": _AT_LEAST_1, "model.num_heads": _AT_LEAST_1,
    "model.mlp_ratio": _POSITIVE, "model.drop_path": _BELOW_1,
    "aux.embed_dim": _AT_LEAST_1, "aux.depth": _AT_LEAST_1, "aux.num_heads": _AT_LEAST_1, "aux.mlp_ratio": _POSITIVE,
    "optim.blr": _POSITIVE, "optim.lr": _POSITIVE, "optim.lambda_lr": _NON_NEGATIVE, "optim.min_lr": _NON_NEGATIVE,
    "optim.weight_decay": _NON_NEGATIVE, "optim.layer_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "optim.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two values in [0, 1)"),
    "optim.eps": _POSITIVE, "optim.warmup_epochs": _NON_NEGATIVE, "optim.clip_grad": _POSITIVE,
    "optim.accum_steps": _AT_LEAST_1, "data.global_batch": _AT_LEAST_1,
    "train.epochs": _AT_LEAST_1, "train.max_steps": _AT_LEAST_1, "train.mixup": _NON_NEGATIVE,
    "train.cutmix": _NON_NEGATIVE, "train.mixup_prob": _FRACTION, "train.mixup_switch_prob": _FRACTION,
    "train.label_smoothing": _BELOW_1, "train.ema_decay": _OPEN_UNIT, "train.eval_every": _AT_LEAST_1,
    "train.log_every": _AT_LEAST_1, "train.checkpoint_every": _NON_NEGATIVE, "train.checkpoint_minutes": _NON_NEGATIVE,
    "train.checkpoint_epochs": _AT_LEAST_1, "train.keep_last": _AT_LEAST_1,
    # per-item seeds are (seed * 1_000_003 + epoch) * 10_000_019 + index (data.py), which must fit torch's 64 bits
    "train.seed": (lambda v: 0 <= v < MAX_SEED, f"in [0, {MAX_SEED:_})"),
    "pretrain.mask_ratio": _OPEN_UNIT, "pretrain.decoder_dim": _AT_LEAST_1, "pretrain.decoder_depth": _AT_LEAST_1,
    "pretrain.decoder_heads": _AT_LEAST_1,
}


def _divisible(where: str, width_key: str, width: int, heads_key: str, heads: int) -> None:
    if width % heads:
        fits = [h for h in range(1, min(width, 64) + 1) if width % h == 0]
        raise RecipeError(f"{where}: '{width_key}' = {width} is not divisible by '{heads_key}' = {heads} (each head "
                          f"gets an equal share of the width); choose {heads_key} from {fits} or a width divisible "
                          f"by {heads}")


def _numbers(value: Any, key: str):
    """``(dotted key, number)`` of every int or float inside ``value`` (sections, options, lists)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{key}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield key, value


def check_finite(recipe: Recipe, where: str) -> None:
    """Every number of the recipe is finite: an inf lr trains to NaN, an inf warm-up cannot be counted."""
    for key, value in _numbers(recipe.to_dict(), ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"{where}: '{key}' = {value}; it must be a finite number")


def check_mlp_width(recipe: Recipe, where: str) -> None:
    """Widths that round to nothing: an MLP of ``int(mlp_ratio * D)`` = 0 units (the adapter checks its own sizes,
    ``Adapter.sizes``)."""
    m, a = recipe.model, recipe.aux
    for key, ratio, width in (("model.mlp_ratio", m.mlp_ratio, m.embed_dim),
                              ("aux.mlp_ratio", a.mlp_ratio, a.embed_dim or m.embed_dim)):
        if ratio is not None and int(ratio * width) < 1:
            raise RecipeError(f"{where}: '{key}' = {ratio} gives an MLP of int({ratio} x {width}) = "
                              f"{int(ratio * width)} units; it must give at least 1 (e.g. 4.0, a ViT's)")


def check_protocol_options(recipe: Recipe, where: str) -> None:
    """The options that copy an official protocol need the setting they act on: ``optim.repeat_step`` clips its
    second step (``optim.clip_grad``), ``train.export_ema`` exports the EMA (``train.ema``)."""
    if recipe.optim.repeat_step and recipe.optim.clip_grad is None:
        raise RecipeError(f"{where}: 'optim.repeat_step' = true steps a second time on the gradients clipped to "
                          f"'optim.clip_grad', which is not set; set optim.clip_grad (Point-MAE's segmentation: 10)")
    if recipe.train.export_ema and not recipe.train.ema:
        raise RecipeError(f"{where}: 'train.export_ema' = true but 'train.ema' = false: the run keeps no EMA to "
                          f"export; set train.ema: true (and train.ema_decay), or remove train.export_ema")


def check_values(recipe: Recipe, where: str) -> None:
    """Ranges of single values and the relations between them (widths divisible by heads)."""
    check_finite(recipe, where)
    for key, (ok, allowed) in _RULES.items():
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if value is not None and not ok(value):
            raise RecipeError(f"{where}: '{key}' = {value!r}; it must be {allowed}")
    if recipe.data.global_batch is not None and recipe.optim.accum_steps is not None:
        raise RecipeError(f"{where}: 'data.global_batch' = {recipe.data.global_batch} and 'optim.accum_steps' = "
                          f"{recipe.optim.accum_steps} are both set; the accumulation follows from the global batch, "
                          f"the per-process batch and the number of processes: remove optim.accum_steps")
    m, a, p = recipe.model, recipe.aux, recipe.pretrain
    _divisible(where, "model.embed_dim", m.embed_dim, "model.num_heads", m.num_heads)
    if recipe.aux.checkpoint_format != "transformers":  # a Hugging Face aux brings its own sizes
        aux_width, aux_heads = a.embed_dim or m.embed_dim, a.num_heads or m.num_heads
        _divisible(where, "aux.embed_dim" if a.embed_dim else "model.embed_dim", aux_width,
                   "aux.num_heads" if a.num_heads else "model.num_heads", aux_heads)
    _divisible(where, "pretrain.decoder_dim", p.decoder_dim, "pretrain.decoder_heads", p.decoder_heads)
    check_mlp_width(recipe, where)
    check_protocol_options(recipe, where)
    name = recipe.output.name
    if name and (name in (".", "..") or any(sep in name for sep in "/\\")):
        raise RecipeError(f"{where}: 'output.name' = {name!r} is not a folder name: the run folder is "
                          f"output.dir/output.name, so a path there would write outside output.dir; put the path "
                          f"in output.dir and a plain name in output.name")


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step is batched: ``global_batch = per_process * accum_steps * world``."""

    per_process: int  # data.batch_size: items per process and micro-step
    accum_steps: int  # micro-steps per optimizer step
    world: int  # processes
    global_batch: int  # items per optimizer step over all processes: the lr scales with it (MAE)

    def __str__(self) -> str:
        return (f"global batch {self.global_batch} = {self.per_process} per process x {self.accum_steps} accumulation "
                f"x {self.world} process(es)")


def batch_plan(recipe: Recipe, world: int) -> BatchPlan:
    """The recipe's batching on ``world`` processes. With ``data.global_batch`` (the paper's batch, the recipe's
    contract) the accumulation is derived, and a global batch that ``batch_size x world`` does not divide is a
    RecipeError; without it, ``optim.accum_steps`` (default 1) is used and the global batch grows with ``world``."""
    d = recipe.data
    if d.global_batch is None:
        accum = recipe.optim.accum_steps or 1
        return BatchPlan(d.batch_size, accum, world, d.batch_size * accum * world)
    per_step = d.batch_size * world
    if d.global_batch % per_step:
        fits = [b for b in range(1, d.batch_size + 1) if d.global_batch % (b * world) == 0]
        where = (f"{recipe.source}: 'data.global_batch' = {d.global_batch} is not a whole number of micro-batches "
                 f"of 'data.batch_size' = {d.batch_size} on {world} process(es) ({per_step} items per micro-step)")
        if fits:
            raise RecipeError(f"{where}; choose data.batch_size from {fits[-3:]} (or run on a number of processes "
                              f"that divides it)")
        worlds = [w for w in range(1, min(d.global_batch, 64) + 1) if d.global_batch % w == 0]
        raise RecipeError(f"{where}; no per-process batch fits: the global batch must be a multiple of the number "
                          f"of processes, which may be one of {worlds}")
    return BatchPlan(d.batch_size, d.global_batch // per_step, world, d.global_batch)


# --------------------------------------------------------------------------------------------
# Files, extends and overrides.
# --------------------------------------------------------------------------------------------


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if value is None and isinstance(out.get(key), dict):
            continue  # `model:` holding only a comment is YAML null: the section inherits, it is not reset
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("options", "pairs"):
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}  # adapter options and pairs merge one level
        else:
            out[key] = value
    return out


def _read_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one file and everything it extends, merged (no schema check yet)."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise RecipeError(f"{path}: 'extends' forms a cycle: {chain}")
    if not path.is_file():
        where = f"{seen[-1]}: 'extends'" if seen else "recipe"
        if path.is_dir():
            raise RecipeError(f"{where}: {path} is a folder; name a recipe file (.yaml) in it")
        raise RecipeError(f"{where}: file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                          f"save the recipe as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of sections, got {type(raw).__name__}")
    parents = raw.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise RecipeError(f"{path}: 'extends' must be a path or a list of paths, got {parents!r}")
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = _merge(merged, _read_raw(path.parent / parent, (*seen, path)))
    # Data roots and checkpoints are written relative to the file that names them.
    for section, key in (("data", "root"), ("model", "checkpoint"), ("aux", "checkpoint")):
        value = (raw.get(section) or {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute() and "://" not in value:
            raw[section][key] = str((path.parent / value).resolve())
        elif isinstance(value, str) and value:
            raw[section][key] = str(Path(value).expanduser())
    return _merge(merged, raw)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "pathway.exclude=['mlp']"]`` -> nested mapping. Values are YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item!r}: '{part}' is set twice, once as a value")
        node[parts[-1]] = value
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file (with its ``extends`` chain), apply ``--set`` overrides, check the schema."""
    path = Path(path)
    raw = _read_raw(path)
    if overrides:
        over = parse_overrides(overrides)
        raw = _merge(raw, over)
        where = f"{path} (with --set {' '.join(overrides)})"
    else:
        where = str(path)
    recipe = recipe_from_dict(raw, where)
    recipe.source = str(path.resolve())
    return recipe


def check_task_options(recipe: Recipe, task: str) -> None:
    """Refuse training options that do not fit the task, naming the key and what to use instead."""
    t = recipe.train
    if task == "multilabel":
        if t.mixup > 0 or t.cutmix > 0:
            key = "train.mixup" if t.mixup > 0 else "train.cutmix"
            raise OptionError(
                f"{key}={getattr(t, key.split('.')[1])} does not fit a multi-label task (timm's batch Mixup/CutMix "
                f"mixes one class per item); use AudioMAE's mixup: data.options.mixup: 0.5 (the share of clips "
                f"mixed with another clip, lambda ~ Beta(10, 10), labels mixed) and set {key}: 0")
        if t.label_smoothing > 0:
            raise OptionError(f"train.label_smoothing={t.label_smoothing} does not fit a multi-label task (BCE on "
                              f"multi-hot targets; AudioMAE's loss has none); set train.label_smoothing: 0")
    if task == "segmentation" and (t.mixup > 0 or t.cutmix > 0):
        key = "train.mixup" if t.mixup > 0 else "train.cutmix"
        raise OptionError(f"{key} does not fit part segmentation (per-point labels); set {key}: 0")


def check_adapter(recipe: Recipe) -> None:
    """The adapters the recipe names must be registered, and its train options must fit the adapter's task."""
    from pathway.adapters import registry as adapters

    names = list(adapters.available())
    for key, name in (("data.adapter", recipe.data.adapter), ("aux.adapter", recipe.aux.adapter)):
        if name and name not in names:
            raise RecipeError(f"{recipe.source}: '{key}' = {name!r} is not a registered adapter; "
                              f"available: {', '.join(names)}")
    try:
        check_task_options(recipe, adapters.get(recipe.data.adapter).task)
    except OptionError as err:
        raise RecipeError(f"{recipe.source}: {err} (the '{recipe.data.adapter}' adapter's task)") from None


def check_data(recipe: Recipe) -> None:
    """Training and evaluation need the data root to exist (dry-runs only warn)."""
    root = recipe.data.root
    if not root:
        raise RecipeError(f"{recipe.source}: 'data.root' is empty; name the folder or manifest of the "
                          f"'{recipe.data.adapter}' data")
    if not Path(root).exists():
        raise RecipeError(f"{recipe.source}: 'data.root' = {root!r} {_why_missing(Path(root))}")


def _why_missing(path: Path) -> str:
    """Why a path that ``exists()`` denies is not there: a symlink loop, a link to nothing, or nothing at all."""
    link = next((p for p in (path, *path.parents) if p.is_symlink()), None)
    if link is None:
        return "does not exist"
    try:
        link.resolve(strict=True)
    except (RuntimeError, OSError) as err:  # Python 3.11 raises RuntimeError for a loop, later ones OSError ELOOP
        if isinstance(err, RuntimeError) or err.errno == errno.ELOOP:
            return f"is a symlink loop ({link} -> {link.readlink()} leads back to itself); point it at the data folder"
        return f"is a symlink to {link.readlink()}, which does not exist; point it at the data folder"
    return "does not exist"


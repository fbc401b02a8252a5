"""Evaluation and folding of saved runs, outside the training loop (``pathway eval``, ``pathway fold``).

Two kinds of files come out of ``pathway train``: the folded model (``model.safetensors``, the plain
target) and training checkpoints (``checkpoints/ckpt-*.pt``: the connected model with its aux
weights and lambdas, and the resolved recipe). Both can be evaluated; a checkpoint can be folded. So can
the fine-tuned files of the official code bases (MAE, VideoMAE, AudioMAE, Point-MAE): ``pathway eval RECIPE
--weights their_file.pth`` converts them with ``pathway.train.official.layouts`` and requires every tensor, head
included.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .checkpoint import CheckpointError, read_state
from .config import Recipe, recipe_from_dict
from .export import provenance_metadata
from .model import TransformerModel, build_adapter, build_model, build_transformer
from .official.layouts import is_engine_layout, read_checkpoint
from .owned import check_new_file

__all__ = ["load_run_model", "evaluation_set", "evaluate_weights", "fold_checkpoint"]


def _without_init(recipe: Recipe) -> Recipe:
    """The same recipe with no initial weights: the file about to be loaded holds every tensor."""
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, checkpoint=""),
                               aux=dataclasses.replace(recipe.aux, checkpoint=""))


def run_weights(state: dict, recipe: Recipe) -> dict:
    """The weights a training checkpoint stands for: the live model's, or with ``train.export_ema`` the EMA's (the
    run exported those), so that ``pathway fold`` and ``pathway eval`` of a checkpoint give the run's model."""
    if not recipe.train.export_ema:
        return state["model"]
    if state.get("ema") is None:
        raise CheckpointError("the recipe sets train.export_ema but the checkpoint holds no EMA; evaluate it with "
                              "the recipe it was trained with, or with --set train.export_ema=false")
    return {k.removeprefix("module."): v for k, v in state["ema"].items()}  # timm ModelEmaV3 keeps it as `module`


def load_run_model(recipe: Recipe, weights: Path, adapter, state: dict | None = None) -> TransformerModel:
    """A model holding ``weights``: connected for a training checkpoint (``state``, if already read), plain
    for a folded file or an official fine-tuned one (MAE, VideoMAE, AudioMAE, Point-MAE, timm: every tensor,
    the classifier included, must be in the file)."""
    from .official.layouts import load_checkpoint

    if weights.suffix == ".pt" and weights.name.startswith("ckpt-"):
        state = state or read_state(weights)
        example = adapter.example_input()[None]  # the core reads both graphs on an input of the adapter's shape
        model, _ = build_model(_without_init(recipe), adapter, example=example, log=lambda _: None)
        tensors = run_weights(state, recipe)
    else:
        model = build_transformer(recipe, adapter)
        tensors, args = read_checkpoint(weights)
        if not is_engine_layout(list(tensors)):  # an official code base's own file: convert, then check every key
            try:
                load_checkpoint(model, tensors, format=recipe.model.checkpoint_format, args=args, allow_missing=())
            except CheckpointError as err:
                raise CheckpointError(f"{weights}: {err}") from None
            return model
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:  # missing, unexpected or wrongly shaped tensors
        raise CheckpointError(f"{weights} does not fit the recipe's model: {str(err).splitlines()[0]}; "
                              f"evaluate it with the recipe it was trained with") from err
    return model


def evaluation_set(adapter, split: str):
    """What ``pathway eval`` scores: the multi-view test where the adapter has one (video: clips x crops,
    streamed view by view), else the split's evaluation items."""
    from .engine import multiview_test_set

    return multiview_test_set(adapter, split) or adapter.dataset(split, train=False)


def evaluate_weights(recipe: Recipe, weights: Path, split: str | None = None, ctx=None) -> dict[str, float]:
    """The adapter's metric of ``weights`` on ``split`` (default ``data.val_split``), by the test protocol.

    ``ctx``: the engine ``Context`` to run in (default: set up from the recipe and the environment); one process
    of a process group passes a single-process one to evaluate alone. Under ``torchrun`` each process scores its
    share of the items and every process gets the metric of the whole split (``engine.evaluate``)."""
    from .cluster.distributed import release
    from .data import make_loader
    from .engine import evaluate, setup

    ctx = ctx or setup(recipe)
    adapter = build_adapter(recipe)
    model = load_run_model(recipe, weights, adapter).to(ctx.device)
    loader, _ = make_loader(evaluation_set(adapter, split or recipe.data.val_split), batch_size=recipe.data.batch_size,
                            num_workers=recipe.data.num_workers, seed=recipe.train.seed, shuffle=False, rank=ctx.rank,
                            world=ctx.world, prefetch_factor=recipe.data.prefetch_factor)
    metrics = evaluate(model, loader, ctx, adapter.metric, adapter.task)
    release(ctx)  # the process group, where setup started one here
    return metrics


def fold_checkpoint(checkpoint: Path, output: Path) -> str:
    """Fold the pathways of a training checkpoint (its recipe is inside) and save the plain model."""
    from safetensors.torch import save_file

    import pathway

    check_new_file(output, "fold output")
    state = read_state(checkpoint, ("model", "recipe"))
    trained = recipe_from_dict(state["recipe"], f"{checkpoint} (embedded recipe)")
    recipe = _without_init(trained)
    adapter = build_adapter(recipe, need_data=False)
    model = load_run_model(recipe, checkpoint, adapter, state)
    record: dict[str, str] = {}
    if pathway.is_connected(model):
        record = provenance_metadata(model, trained)  # the pairs and lambdas, read before the fold removes them
        pathway.fold(model)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(output),
              metadata={**record, "format": "pathway", "layout": "TransformerModel", "step": str(state.get("step"))})
    return f"folded {checkpoint} (step {state.get('step')}) -> {output}"

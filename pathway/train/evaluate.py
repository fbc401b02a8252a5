"""Evaluation and folding of saved runs, outside the training loop (``pathway eval``, ``pathway fold``).

Two kinds of files come out of ``pathway train``: the folded model (``model.safetensors``, the plain
target) and training checkpoints (``checkpoints/ckpt-*.pt``: the connected model with its aux
weights and lambdas, and the resolved recipe). Both can be evaluated; a checkpoint can be folded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import Recipe, recipe_from_dict
from .model import TransformerModel, build_adapter, build_model, build_transformer, read_weights

__all__ = ["load_run_model", "evaluate_weights", "fold_checkpoint"]


def _without_init(recipe: Recipe) -> Recipe:
    """The same recipe with no initial weights: the file about to be loaded holds every tensor."""
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, checkpoint=""),
                               aux=dataclasses.replace(recipe.aux, checkpoint=""))


def load_run_model(recipe: Recipe, weights: Path, adapter) -> TransformerModel:
    """A model holding ``weights``: connected for a training checkpoint, plain for a folded file."""
    if weights.suffix == ".pt" and weights.name.startswith("ckpt-"):
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if "model" not in state:
            raise CheckpointError(f"{weights}: not a training checkpoint (no 'model' entry)")
        model, _ = build_model(_without_init(recipe), adapter, log=lambda _: None)
        model.load_state_dict(state["model"], strict=True)
        return model
    model = build_transformer(recipe, adapter)
    model.load_state_dict(read_weights(weights), strict=True)
    return model


def evaluate_weights(recipe: Recipe, weights: Path, split: str | None = None) -> dict[str, float]:
    """The adapter's metric of ``weights`` on ``split`` (default ``data.val_split``)."""
    from .data import make_loader
    from .engine import evaluate, setup

    ctx = setup(recipe)
    adapter = build_adapter(recipe)
    model = load_run_model(recipe, weights, adapter).to(ctx.device)
    dataset = adapter.dataset(split or recipe.data.val_split, train=False)
    loader, _ = make_loader(dataset, batch_size=recipe.data.batch_size, num_workers=recipe.data.num_workers,
                            seed=recipe.train.seed, shuffle=False)
    item_dims = adapter.dataset(recipe.data.train_split, train=True)[0][0].dim()
    return evaluate(model, loader, ctx, adapter.metric, adapter.task, item_dims)


def fold_checkpoint(checkpoint: Path, output: Path) -> str:
    """Fold the pathways of a training checkpoint (its recipe is inside) and save the plain model."""
    import pathway
    from safetensors.torch import save_file

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "recipe" not in state or "model" not in state:
        raise CheckpointError(f"{checkpoint}: not a training checkpoint (needs 'model' and 'recipe' entries)")
    recipe = _without_init(recipe_from_dict(state["recipe"], f"{checkpoint} (embedded recipe)"))
    adapter = build_adapter(recipe, need_data=False)
    model = load_run_model(recipe, checkpoint, adapter)
    if pathway.is_connected(model):
        pathway.fold(model)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(output),
              metadata={"format": "pathway", "layout": "TransformerModel", "step": str(state.get("step"))})
    return f"folded {checkpoint} (step {state.get('step')}) -> {output}"

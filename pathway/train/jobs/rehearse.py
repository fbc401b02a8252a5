"""``pathway train RECIPE --rehearse``: run a paper recipe for real, on the CPU, on tiny data in its official layout.

A dry run checks the plan; a rehearsal checks the run. It writes a tiny data set in the layout the recipe
reads (ImageNet class folders, Kinetics csv + mp4, AudioSet csv + wav, ShapeNetPart's benchmark folder,
PartNet, ModelNet; ``pathway/train/official/fixtures.py``) and the recipe's checkpoint files in their official key
layouts (MAE, VideoMAE, AudioMAE, Point-MAE, M2PT aux) at a reduced width, then runs the recipe **as
written** -- adapter options, augmentation, mixup, loss, optimizer and parameter groups, freezing, schedule
shape, evaluation views and metric, fold and export -- changing only sizes (:data:`SIZES`: width, depth,
heads, input size, batch, epochs; the warm-up keeps its share of the run; a stated global batch becomes a
small one that still accumulates) and where it runs (the CPU, data read in the main process, a log row every
step). After training it evaluates the exported ``model.safetensors`` the way ``pathway eval`` does, the same
weights written as the official MAE / VideoMAE / AudioMAE fine-tuned file too, folds the last training
checkpoint the way ``pathway fold`` does, and checks all of them against the run. It ends with one line
``rehearsal ok: RECIPE (...)``; anything that would stop the real run stops the rehearsal with the same error.

Everything is written into a temporary folder the rehearsal creates and removes (``keep`` keeps it). Tests
pass ``cache``, a folder the rehearsal claims (``pathway/train/owned.py``) to share the data sets and
checkpoint files between recipes.

``world > 1`` rehearses that many processes on the CPU (gloo), as ``torchrun`` would start them; under
``torchrun`` itself (``WORLD_SIZE`` set) every process takes part and rank 0 writes the data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pathway.errors import PathwayError

from ..config import Recipe, batch_plan, load_recipe, recipe_from_dict

__all__ = ["SIZES", "RehearsalError", "Rehearsal", "rehearse", "rehearsal_recipe"]

# What a rehearsal changes: sizes only.
SIZES = {"embed_dim": 32, "depth": 2, "num_heads": 2, "batch_size": 2, "max_accum": 2, "epochs": 2}
# Inputs, per adapter: the smallest that keep each tokenizer's structure (patch 16, tubelet 2, groups of points).
INPUT_SIZES = {
    "image": {"img_size": 32},
    "video": {"img_size": 32, "num_frames": 4},
    "audio": {"target_length": 64},
    "point": {"num_points": 128, "num_groups": 16, "group_size": 8},
    "point_part": {"num_points": 128, "num_groups": 16, "group_size": 8},
}
CACHE_KIND = "rehearsal fixtures"


class RehearsalError(PathwayError):
    """A rehearsal ran but its results do not hold together (export, evaluation or fold disagree)."""


@dataclasses.dataclass
class Rehearsal:
    """What one rehearsal ran and saw."""

    recipe: str
    layout: str
    world: int
    steps: int
    metrics: dict[str, float]
    test_metrics: dict[str, float]
    best: dict[str, Any]
    eval_of_export: dict[str, float]
    fold_max_abs_diff: float | None
    checkpoint_fold_max_abs_diff: float
    official_eval: str | None  # the official fine-tuned layout the weights were also scored in by pathway eval
    files: dict[str, str]
    seconds: float
    plan: str

    @property
    def line(self) -> str:
        shown = "last eval " + ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items() if k != "loss")
        if self.best:
            shown += f" (best at epoch {self.best['epoch']})"
        if self.test_metrics:
            test = self.test_metrics.items()
            shown += "; multi-view test " + ", ".join(f"{k} {v:.4g}" for k, v in test if k != "loss")
        fold = "no pathway" if self.fold_max_abs_diff is None else f"fold max diff {self.fold_max_abs_diff:.2g}"
        return (f"rehearsal ok: {self.recipe} ({self.layout} layout, {self.plan}; {self.steps} steps on "
                f"{self.world} process(es); {shown}; {fold}; model.safetensors re-evaluated"
                + (f" (also as an official {self.official_eval} fine-tuned file)" if self.official_eval else "")
                + f", last checkpoint folded to the same weights; {self.seconds:.1f} s)")


# ---------------------------------------------------------------------------------------------------------
# The rehearsal recipe: the recipe as written, sizes changed.


def small_options(adapter: str, options: dict[str, Any]) -> dict[str, Any]:
    """The adapter options with input sizes reduced; SpecAugment's time mask keeps its share of the clip."""
    from pathway.adapters import registry

    out = dict(options)
    full = {**registry.get(adapter).defaults, **options}
    out.update(INPUT_SIZES.get(adapter, {}))
    if adapter == "audio" and full.get("timem"):
        out["timem"] = max(1, round(full["timem"] * out["target_length"] / full["target_length"]))
    return out


def _depth(recipe: Recipe, options: dict[str, Any]) -> int:
    """The rehearsal depth: SIZES' unless the head reads the outputs of deeper blocks (Point-MAE's 3, 7, 11)."""
    from pathway.adapters import registry

    spec = registry.get(recipe.data.adapter).spec(recipe.data.num_classes or 2, **options)
    return max(SIZES["depth"], 1 + max(getattr(spec.head(SIZES["embed_dim"]), "feature_blocks", ()) or (0,)))


def rehearsal_recipe(recipe: Recipe, data_root: Path, run_dir: Path, checkpoints: dict[str, str], world: int) -> Recipe:
    """``recipe`` with sizes reduced, the rehearsal's data, checkpoint files and run folder.

    The batching keeps the recipe's form: a recipe that states a global batch (which must divide on ``world``
    processes, as on the GPU node) gets a small one that needs accumulation too."""
    d = recipe.to_dict()
    epochs = SIZES["epochs"]
    plan = batch_plan(recipe, world)  # the recipe's own batching must hold on this many processes
    accum = min(plan.accum_steps, SIZES["max_accum"])
    options = small_options(recipe.data.adapter, recipe.data.options)
    d["data"].update(root=str(data_root), batch_size=SIZES["batch_size"], num_workers=0, options=options)
    if recipe.data.global_batch is not None:
        d["data"]["global_batch"] = SIZES["batch_size"] * world * accum
    else:
        d["optim"]["accum_steps"] = accum
    d["model"].update(embed_dim=SIZES["embed_dim"], depth=_depth(recipe, options), num_heads=SIZES["num_heads"],
                      checkpoint=checkpoints.get("model", ""))
    for key in ("embed_dim", "num_heads"):
        if d["aux"][key] is not None:
            d["aux"][key] = SIZES[key]
    if d["aux"]["depth"] is not None:
        d["aux"]["depth"] = d["model"]["depth"]
    d["aux"]["checkpoint"] = checkpoints.get("aux", "")
    d["optim"]["warmup_epochs"] = recipe.optim.warmup_epochs * epochs / max(1, recipe.train.epochs)
    d["train"].update(epochs=epochs, max_steps=None, device="cpu", log_every=1, checkpoint_every=0,
                      eval_every=min(recipe.train.eval_every, epochs))
    d["output"].update(dir=str(run_dir.parent), name=run_dir.name)
    small = recipe_from_dict(d, f"{recipe.source} (rehearsal sizes)")
    small.source = recipe.source
    return small


# ---------------------------------------------------------------------------------------------------------
# Fixtures: data sets and checkpoint files.


def _aux_adapter_spec(recipe: Recipe):
    """A data-less adapter of the aux model's own modality, at rehearsal input sizes (its file's tokenizer)."""
    from pathway.adapters import registry

    name = recipe.aux.adapter or recipe.data.adapter
    return registry.get(name).spec(1000, **small_options(name, {}))


def _checkpoint_files(recipe: Recipe, data_root: Path, folder: Path) -> dict[str, str]:
    """The recipe's checkpoint files, written in their official layouts for the rehearsal's sizes."""
    from ..model import build_adapter, build_transformer
    from ..official.fixtures import write_checkpoint

    files = {}
    probe = rehearsal_recipe(recipe, data_root, folder / "probe", {}, 1)
    wanted = [("model", recipe.model.checkpoint, recipe.model.checkpoint_format)]
    if recipe.aux.enabled:
        wanted.append(("aux", recipe.aux.checkpoint, recipe.aux.checkpoint_format))
    for role, path, fmt in wanted:
        if not path:
            continue
        if role == "model":
            adapter = build_adapter(probe)
            model = build_transformer(probe, adapter)
        else:
            adapter = _aux_adapter_spec(probe)
            model = build_transformer(probe, adapter, aux=True)
        key = json.dumps([fmt, role, adapter.name, adapter.options, probe.model.embed_dim,
                          probe.aux.depth or probe.model.depth], sort_keys=True, default=str)
        target = folder / f"{Path(path).stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.pth"
        if not target.is_file():
            torch.manual_seed(0)
            write_checkpoint(fmt, model.state_dict(), target)
        files[role] = str(target)
    return files


def _data_root(recipe: Recipe, folder: Path) -> tuple[str, Path]:
    from ..official.fixtures import layout_of, write_dataset

    layout = layout_of(recipe.data.adapter, recipe.data.options)
    kwargs = {"category": recipe.data.options["category"]} if layout == "partnet" else {}
    name = layout + (f"-{kwargs['category']}" if kwargs else "")
    return layout, write_dataset(layout, folder / name, **kwargs)


@contextmanager
def _workspace(cache: Path | None, keep: bool):
    """(fixtures folder, scratch folder): the fixtures go to ``cache`` when given; scratch is always new."""
    from ..owned import claim

    scratch = Path(tempfile.mkdtemp(prefix="pathway-rehearse-"))
    try:
        yield (claim(cache, CACHE_KIND) if cache is not None else scratch / "fixtures"), scratch
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Running: one process, N spawned processes, or the processes torchrun started.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_rank(rank: int, recipe_dict: dict[str, Any], source: str, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from ..engine import train

    recipe = recipe_from_dict(recipe_dict, f"{source} (rehearsal, rank {rank})")
    recipe.source = source
    try:
        train(recipe, progress=False)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _train(recipe: Recipe, world: int) -> dict[str, Any]:
    from ..engine import train

    if world == 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process, or torchrun's processes
        return train(recipe, progress=False)
    import torch.multiprocessing as mp

    mp.start_processes(_spawned_rank, args=(recipe.to_dict(), recipe.source, world, _free_port()), nprocs=world,
                       start_method="spawn")
    return json.loads((recipe.run_dir / "result.json").read_text())


def _alone():
    """A single-process CPU context: rank 0 checks the outputs while the other ranks wait."""
    from ..engine import Context

    return Context(torch.device("cpu"))


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> float:
    if set(a) != set(b):
        raise RehearsalError(f"{what}: the key sets differ: {sorted(set(a) ^ set(b))[:6]}")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a) if a else 0.0


OFFICIAL_FINETUNED = ("mae", "audio_mae", "video_mae")  # code bases whose fine-tuned files pathway eval reads


def _check_official_file(small: Recipe, exported: Path, evaluated: dict[str, float], scratch: Path) -> str | None:
    """Write the exported weights as the official code base's fine-tuned file and score it with ``pathway eval``:
    it must score what the export scores. Returns the format checked (None where there is no such layout)."""
    from safetensors.torch import load_file

    from ..evaluate import evaluate_weights
    from ..official.fixtures import official_finetuned

    fmt = small.model.checkpoint_format
    if fmt not in OFFICIAL_FINETUNED or not small.model.fc_norm or not evaluated:
        return None
    path = scratch / f"official-{fmt}-finetuned.pth"
    torch.save(official_finetuned(fmt, load_file(str(exported))), path)
    theirs = evaluate_weights(small, path, ctx=_alone())
    if abs(theirs["loss"] - evaluated["loss"]) > 1e-4 * max(1.0, abs(evaluated["loss"])):
        raise RehearsalError(f"{small.source}: pathway eval of the weights as an official {fmt} fine-tuned file gives "
                             f"loss {theirs['loss']:.6g}, of model.safetensors {evaluated['loss']:.6g}")
    return fmt


def _check_outputs(small: Recipe, result: dict[str, Any], scratch: Path) -> tuple[dict[str, float], float, str | None]:
    """Re-evaluate the exported model as ``pathway eval`` does (also as an official fine-tuned file); fold the last
    checkpoint as ``pathway fold`` does."""
    from safetensors.torch import load_file

    from ..checkpoint import list_checkpoints
    from ..evaluate import evaluate_weights, fold_checkpoint

    run_dir = small.run_dir
    exported = run_dir / "model.safetensors"
    if not exported.is_file():
        raise RehearsalError(f"{small.source}: the run wrote no {exported}")
    evaluated = evaluate_weights(small, exported, ctx=_alone()) if small.data.val_split else {}
    trained = result.get("test_metrics") or result.get("metrics") or {}  # pathway eval scores the test protocol
    if evaluated and "loss" in trained:
        tolerance = 1e-3 * max(1.0, abs(trained["loss"]))
        if abs(evaluated["loss"] - trained["loss"]) > tolerance:
            raise RehearsalError(f"{small.source}: the exported model.safetensors evaluates to loss "
                                 f"{evaluated['loss']:.6g}, "
                                 f"the run's last evaluation said {trained['loss']:.6g}")
    last = list_checkpoints(run_dir / "checkpoints")
    if not last:
        raise RehearsalError(f"{small.source}: the run left no training checkpoint in {run_dir / 'checkpoints'}")
    folded = scratch / "folded.safetensors"
    fold_checkpoint(last[-1], folded)
    diff = _max_abs_diff(load_file(str(folded)), load_file(str(exported)), f"{last[-1]} folded vs {exported}")
    if diff > 1e-5:
        raise RehearsalError(f"{small.source}: folding {last[-1]} gives weights {diff:.3g} away from {exported}")
    return evaluated, diff, _check_official_file(small, exported, evaluated, scratch)


def _plan_text(small: Recipe, files: dict[str, str], world: int) -> str:
    m = small.model
    text = f"D={m.embed_dim} depth {m.depth} heads {m.num_heads}"
    if "model" in files:
        text += f", target from a {m.checkpoint_format} file"
    if small.aux.enabled:
        text += f", aux {small.aux.adapter or small.data.adapter} " + (
            f"from a {small.aux.checkpoint_format} file" if "aux" in files else "at random init")
    else:
        text += ", no aux"
    return text + f", {batch_plan(small, world)}"


def rehearse(path: str | Path, overrides: list[str] | None = None, *, world: int | None = None,
             cache: Path | None = None, keep: bool = False, log: Callable[[str], None] = print) -> Rehearsal | None:
    """Rehearse the recipe at ``path`` (with ``--set`` overrides) and return what ran (None on the ranks other
    than 0 under torchrun); see the module docstring."""
    import torch.distributed as dist

    start = time.perf_counter()
    recipe = load_recipe(path, overrides)
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world > 1:
        if world not in (None, env_world):
            raise RehearsalError(f"--world {world} under torchrun, which started {env_world} processes; drop --world")
        world = env_world
        if not dist.is_initialized():
            dist.init_process_group("gloo")
    world = world or 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    with _workspace(cache if rank == 0 else None, keep) as (fixtures, scratch):
        if rank == 0:
            layout, data_root = _data_root(recipe, fixtures / "data")
            files = _checkpoint_files(recipe, data_root, fixtures / "checkpoints")
            shared = [layout, str(data_root), files, str(scratch)]
        else:
            shared = [None] * 4
        if dist.is_initialized():  # every torchrun process rehearses on rank 0's files
            dist.broadcast_object_list(shared, src=0)
        layout, data_root, files, run_parent = shared
        small = rehearsal_recipe(recipe, Path(data_root), Path(run_parent) / "runs" / recipe.run_name, files, world)
        log(f"rehearsal of {recipe.source}: {layout} data in {data_root}, run folder {small.run_dir}")
        result = _train(small, world)
        if rank != 0:  # rank 0 checks the outputs and reports
            dist.barrier()
            return None
        evaluated, ckpt_diff, official = _check_outputs(small, result, scratch)
        if dist.is_initialized():
            dist.barrier()
        return Rehearsal(
            recipe=recipe.run_name, layout=layout, world=world, steps=result["step"],
            metrics=result.get("metrics") or {},
            test_metrics=result.get("test_metrics") or {}, best=result.get("best") or {},
            eval_of_export=evaluated, fold_max_abs_diff=result.get("fold_max_abs_diff"),
            checkpoint_fold_max_abs_diff=ckpt_diff, official_eval=official, files=files,
            seconds=time.perf_counter() - start,
            plan=_plan_text(small, files, world))

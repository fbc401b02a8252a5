"""The training loop, one for every modality: read it top to bottom.

``train(recipe)``::

    setup (device, DDP, seeds) -> data (adapter, loaders) -> model (target + aux, connect)
    -> optimizer, AMP scaler, EMA, Mixup -> resume from the last checkpoint if asked
    -> for each optimizer step: lr_at(step); micro-batches under pathway.cached() and autocast;
       clip; step; log loss, lr, throughput, mean |lambda|; checkpoint
    -> evaluate each `eval_every` epochs -> fold the pathways into the target, check on a batch that
       the folded model gives the connected model's outputs, save it (safetensors, the target
       library's own keys, the provenance record in the metadata), write metrics (JSONL, CSV) and plots.

A modality enters only through its adapter (data, tokenizer, head, task, metric) and its recipe.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import pathway

from . import checkpoint as ckpt
from .cluster.distributed import agreed_loss, gather_rows, release, sync_batchnorm
from .cluster.preempt import CheckpointClock, RunStopped, StopAgreement, StopSignals
from .cluster.seeding import seed_everything, seed_rank_streams
from .config import BatchPlan, Recipe, RecipeError, batch_plan, check_adapter, check_data
from .data import Repeated, collate, make_loader, set_epoch
from .metrics import MetricAccumulator
from .model import TransformerModel, build_adapter, build_model
from .optim import base_lr, build_mixup, build_optimizer, compute_loss
from .owned import check_run_dir, claim_run_dir, lock_run_dir, unlock_run_dir
from .schedule import apply_lr, lr_at, step_plan
from .throughput import Window

__all__ = ["NonFiniteLossError", "RunStopped", "WorldSizeError", "Context",
           "setup", "train", "evaluate", "fold_and_check", "mean_abs_lambda"]


class LogError(pathway.PathwayError):
    """A metrics log of the run folder cannot be read back."""


class NonFiniteLossError(pathway.PathwayError):
    """The loss became NaN or infinite; the last safe state was saved before stopping."""


class WorldSizeError(ckpt.CheckpointError):
    """A run resumed on another number of processes whose batch that number would change."""


# ---------------------------------------------------------------------------------------------
# Process setup: device, distributed group, precision.
# ---------------------------------------------------------------------------------------------


@dataclass
class Context:
    device: torch.device
    rank: int = 0
    world: int = 1
    amp_dtype: torch.dtype | None = None  # None: full precision
    owns_group: bool = False  # setup() started the process group, and the run destroys it at its end

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def log(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup(recipe: Recipe) -> Context:
    """Pick the device, join the process group started by ``torchrun`` (if any), choose AMP."""
    want = recipe.train.device
    cuda = torch.cuda.is_available() and want != "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"{recipe.source}: 'train.device' = 'cuda' but no CUDA device is visible; "
                          f"use --set train.device=auto (or cpu)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if cuda else "gloo")
    amp = recipe.train.amp
    if device.type == "cpu" and amp == "fp16":
        raise RecipeError(f"{recipe.source}: 'train.amp' = 'fp16' on the CPU: autocast there runs bf16 "
                          f"(fast on CPUs with AMX or AVX-512 BF16) or fp32; use --set train.amp=bf16 or fp32")
    if amp == "fp32" or (device.type == "cpu" and amp == "auto"):
        amp_dtype = None
    elif device.type == "cpu":
        amp_dtype = torch.bfloat16
        if not native_cpu_bf16() and rank == 0:
            print("warning: train.amp=bf16 on a CPU without native bf16 matrix units (AMX or AVX-512 BF16): "
                  "autocast may run slower than fp32 here; --set train.amp=fp32", file=sys.stderr, flush=True)
    elif amp == "auto":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        amp_dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return Context(device, rank, world, amp_dtype, owns_group)


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX-512 BF16), where bf16 autocast pays."""
    checks = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(check is not None and check() for check in checks)


# ---------------------------------------------------------------------------------------------
# Small pieces used by the loop.
# ---------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> TransformerModel:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def mean_abs_lambda(model: nn.Module) -> float:
    """Mean |lambda| over every pathway (the quantity the paper's Fig. 3 tracks); 0 when none."""
    lams = pathway.lambdas(unwrap(model))
    if not lams:
        return 0.0
    return float(torch.stack([p.detach().abs().mean().float().cpu() for p in lams.values()]).mean())


def lambda_values(model: nn.Module) -> dict[str, float]:
    return {name: float(p.detach().float().mean().cpu()) for name, p in pathway.lambdas(unwrap(model)).items()}


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def first_sample(dataset) -> tuple[Any, Any]:
    """``(x, y)`` of a data set's first item (the first clip of a repeated-augmentation item)."""
    item = dataset[0]
    return item[0] if isinstance(item, Repeated) else item


def unreadable_files(adapter, ctx: Context) -> int:
    """Files the adapter skipped as unreadable so far, over every rank (each counts its own workers)."""
    count = torch.tensor([float(adapter.skipped)])
    if ctx.world > 1:
        count = count.to(ctx.device)
        dist.all_reduce(count)
    return int(count.item())


def multiview_test_set(adapter, split: str):
    """The final multi-view test of ``split`` (video: clips x crops, one view per item), or None when the
    adapter has one view per item (its per-epoch evaluation is then the test)."""
    views = getattr(adapter, "test_views", None)
    if not split or views is None or len(views()) <= 1:
        return None
    return adapter.multiview_dataset(split)


def primary_metric(metrics: dict[str, float]) -> str | None:
    """The metric a run is judged by: the first the adapter's metric reports (top1, map, inst_miou, part_miou)."""
    return next((k for k in metrics if k not in ("kind", "step", "epoch", "loss") and not k.startswith("ema_")), None)


def best_evaluation(best: dict[str, Any], row: dict[str, Any], ema: bool = False) -> dict[str, Any]:
    """``best`` or the evaluation ``row`` (with its ``epoch`` and ``step``), whichever scores higher; with ``ema``
    (``train.export_ema``: the EMA's weights are the run's) by the EMA's column (``ema_top1``), marked so."""
    key = primary_metric(row)
    column = f"ema_{key}" if ema else key
    if key is None or column not in row or (best and best[key] >= row[column]):
        return best
    return {key: row[column], "epoch": row["epoch"], "step": row["step"], **({"weights": "ema"} if ema else {})}


END_ROWS = ("test", "best")  # written once, after the final checkpoint


class JsonlLog:
    """Append-only JSONL of metrics; on resume, rows written after the checkpoint's step are dropped."""

    def __init__(self, path: Path, main: bool) -> None:
        self.path, self.main = path, main

    def truncate_after(self, step: int) -> None:
        """Keep the rows up to ``step``, less the end-of-run rows (``test``, ``best``) the resumed run writes again."""
        if not self.main or not self.path.exists():
            return
        rows = [r for r in self.rows() if r.get("step", 0) <= step and r.get("kind") not in END_ROWS]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(self, **row: Any) -> None:
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        """Every row; a torn last line (the process was killed while appending it) is dropped."""
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number == len(lines):
                    break
                raise LogError(f"{self.path} line {number} is not a JSON row ({err.msg}); the file was edited or "
                               f"damaged: repair or delete that line") from None
        return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows with possibly different keys -> one CSV with the union of columns (blank where absent)."""
    import csv

    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------------------------------------
# Evaluation, fold.
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, loader, ctx: Context, metric: str, task: str) -> dict[str, float]:
    """The adapter's metric over ``loader``, plus the mean loss.

    Under DDP every rank scores its share (the evaluation sampler's ``rank::world``, no padding) and the rows are
    gathered in the data set's order (``cluster.distributed.gather_rows``): the metric of one process scoring the
    whole split. Pass the plain model, not the DDP wrapper: the shares differ in length by one, so no rank may wait on
    a collective inside a forward. Items are ``(x, y)``, or ``(x, y, item)`` for the views of a multi-view test:
    one view per row, streamed batch by batch (never the views of an item stacked in memory), the softmax
    probabilities of an item's views averaged by the accumulator (VideoMAE's ``merge``); the loss is the mean over
    views."""
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(metric)
    loss_sum, n = 0.0, 0
    for batch in loader:
        if batch is None:  # every file of this batch unreadable: left out of the metric (data.collate)
            continue
        x, y, *item = to_device(batch, ctx.device)
        with pathway.cached(), ctx.autocast():
            logits = model(x)
        loss_sum += compute_loss(logits, y, task).item() * y.shape[0]
        n += y.shape[0]
        acc.add(logits, y, item=item[0] if item else None)
    model.train(was_training)
    acc.logits, acc.targets, acc.items = (gather_rows(rows, ctx) for rows in (acc.logits, acc.targets, acc.items))
    if ctx.world > 1:
        totals = torch.tensor([loss_sum, float(n)], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(totals)
        loss_sum, n = totals.tolist()
    return {**acc.compute(), "loss": loss_sum / max(1, n)}


@torch.no_grad()
def fold_and_check(model: TransformerModel, x: Tensor, ctx: Context) -> float:
    """Fold every pathway into the target weights, in place; return max |folded - connected| on ``x``.

    Compared in eval mode and fp32 (PEFT saw merge drift in bf16: fold in fp32, then compare).
    """
    model.eval()
    with pathway.cached():
        before = model(x).float()
    pathway.fold(model)
    after = model(x).float()
    return (after - before).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Pieces shared by fine-tuning (train) and MAE pretraining (pretrain.py): one data set-up, one step.
# ---------------------------------------------------------------------------------------------


def prepare_data(recipe: Recipe, ctx: Context):
    """The recipe's adapter, after checking it and its data (the demo data is made first where asked)."""
    check_adapter(recipe)
    if recipe.data.demo and ctx.main:
        from .demo_data import make_demo_data

        make_demo_data(recipe.data.adapter, recipe.data.root)
    ctx.barrier()
    check_data(recipe)
    return build_adapter(recipe)


def steps_in_epoch(recipe: Recipe, loader, items: int, plan: BatchPlan) -> int:
    """Optimizer steps per epoch; a data set too small for one step is a recipe error."""
    steps = len(loader) // plan.accum_steps
    if steps == 0:
        raise RecipeError(f"{recipe.source}: the {items} training items make no full optimizer step of {plan}; "
                          f"lower data.global_batch (or data.batch_size / optim.accum_steps)")
    return steps


def optimizer_step(net: nn.Module, batches, loss_of: Callable[[Any], tuple[Tensor, int]], optimizer, scaler,
                   ctx: Context, accum_steps: int, clip_grad: float | None,
                   on_nonfinite: Callable[[float], None], repeat_step: bool = False,
                   agreement: StopAgreement | None = None) -> tuple[float, int]:
    """One optimizer step over ``accum_steps`` micro-batches; returns (mean loss, samples seen on all ranks).

    ``loss_of(batch)`` gives a micro-batch's loss and size. The losses are added up on the device; once the last
    backward is queued, one host sync reads the step's loss and whether it is finite on every rank
    (``cluster.distributed.agreed_loss``), not one per micro-batch. If not, ``on_nonfinite(value)`` runs on every rank
    (it saves and raises) before any gradient of this step is applied. Under fp16 the grad scaler scales the loss
    and unscales before clipping. ``agreement``: the stop request and the checkpoint clock ride in that same
    all-reduce, so the loop learns whether every rank stops, or saves, after this step without another sync.

    ``repeat_step`` (``optim.repeat_step``) is Point-MAE's segmentation loop (``segmentation/main.py:191-201``):
    the optimizer steps on the plain gradients, then the same gradients are clipped to ``clip_grad`` and it steps
    again. The fp16 grad scaler would skip or keep the first step on overflow where the second cannot follow it,
    so that pairing is refused.
    """
    if repeat_step and scaler.is_enabled():
        raise RecipeError("optim.repeat_step steps twice on one batch's gradients, which the fp16 grad scaler "
                          "cannot follow (it skips a step on overflow); use --set train.amp=bf16 or fp32")
    loss_sum, seen = torch.zeros((), device=ctx.device), 0
    for micro in range(accum_steps):
        batch = to_device(next(batches), ctx.device)
        sync = micro == accum_steps - 1 or ctx.world == 1
        with (nullcontext() if sync else net.no_sync()), pathway.cached(), ctx.autocast():
            loss, size = loss_of(batch)
        scaler.scale(loss / accum_steps).backward()
        loss_sum += loss.detach().float() / accum_steps
        seen += size * ctx.world
    value, finite = agreed_loss(loss_sum, ctx, agreement)  # the one host sync of the step; every rank stops together
    if not finite:
        on_nonfinite(value)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if repeat_step:  # the scaler is off (refused above): the gradients are the true ones
        optimizer.step()
        nn.utils.clip_grad_norm_(params, clip_grad)
        optimizer.step()
    else:
        if clip_grad is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, clip_grad)
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return value, seen


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


def train(recipe: Recipe, *, resume: bool = False, progress: bool = True,
          stops: StopSignals | None = None) -> dict[str, Any]:
    """Run a recipe to the end; returns the final metrics and the paths written.

    A run folder that holds checkpoints is continued (the same command after a preemption resumes), provided its
    recipe is the one the checkpoints were written with; ``resume=True`` insists that there is one to continue.
    ``stops`` (the CLI's :class:`StopSignals`): a signal it received ends the run after the current optimizer step
    with a checkpoint and :class:`RunStopped`. The run folder's lock is released on every way out (the end, a
    stop, an error such as a NaN loss), so the same process, or another, can continue the run.
    """
    try:
        return _train(recipe, resume=resume, progress=progress, stops=stops)
    finally:
        unlock_run_dir(recipe.run_dir)  # held by rank 0 only; elsewhere nothing to release


def _train(recipe: Recipe, *, resume: bool, progress: bool, stops: StopSignals | None) -> dict[str, Any]:
    ctx = setup(recipe)
    t, o = recipe.train, recipe.optim
    run_dir = recipe.run_dir
    ckpt_dir = run_dir / "checkpoints"
    stops = stops or StopSignals()  # not entered: no handler installed, nothing is ever received

    if resume and not ckpt.list_checkpoints(ckpt_dir):
        raise ckpt.CheckpointError(f"--resume: {ckpt_dir} holds no checkpoint to continue from; start the run "
                                   f"without --resume, or name its output.dir / output.name")
    resume = bool(ckpt.list_checkpoints(ckpt_dir))  # auto-resume: a requeued job runs the same command again
    if ctx.main:
        check_run_dir(run_dir)
        if resume:  # checkpoints in a folder check_run_dir accepts: it is a marked run folder
            lock_run_dir(run_dir)
    resumed = ckpt.load_latest(ckpt_dir, log=ctx.log) if resume else None
    if resumed is not None:  # before anything is built or written
        check_resumable(resumed[1], recipe, ctx, resumed[0])

    # -- data ---------------------------------------------------------------------------------
    adapter = prepare_data(recipe, ctx)
    train_set = adapter.dataset(recipe.data.train_split, train=True)
    val_set = adapter.dataset(recipe.data.val_split, train=False) if recipe.data.val_split else None
    loader_args = dict(batch_size=recipe.data.batch_size, num_workers=recipe.data.num_workers, seed=t.seed,
                       rank=ctx.rank, world=ctx.world, prefetch_factor=recipe.data.prefetch_factor)
    train_loader, train_sampler = make_loader(train_set, shuffle=True, **loader_args)
    val_loader = make_loader(val_set, shuffle=False, **loader_args)[0] if val_set is not None else None
    plan = batch_plan(recipe, ctx.world)
    accum = plan.accum_steps
    steps_per_epoch = steps_in_epoch(recipe, train_loader, len(train_set), plan)
    total_steps, warmup_steps = step_plan(steps_per_epoch, t.epochs, t.max_steps, o.warmup_epochs)

    # -- model ----------------------------------------------------------------------------------
    seed_everything(t.seed)
    example = first_sample(train_set)[0][None]  # the core reads both graphs on a real input
    model, report = build_model(recipe, adapter, example=example, log=ctx.log)
    if ctx.main:
        claim_run_dir(run_dir)
        lock_run_dir(run_dir)
    if report is not None:
        ctx.log(str(report))
        if ctx.main:
            (run_dir / "report.txt").write_text(str(report) + "\n")
            (run_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=1))
    model = sync_batchnorm(model.to(ctx.device), ctx)
    lr = base_lr(recipe, plan.global_batch)
    ctx.log(f"optimizer {o.optimizer} lr {lr:.3g} ({plan}), groups:")
    optimizer = build_optimizer(model, recipe, lr, log=ctx.log)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp_dtype == torch.float16)
    ema = None
    if t.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=t.ema_decay)
    mixup = build_mixup(recipe, adapter.num_classes, adapter.task)
    net: nn.Module = model
    if ctx.world > 1:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(net, device_ids=device_ids)
    if t.compile:  # after the DDP wrap, as torch documents: the compiler then splits the graph at DDP's buckets
        net = torch.compile(net)
    seed_rank_streams(t.seed, ctx.rank)  # the model is built alike everywhere; mixup, drop path draw per rank

    # -- resume -----------------------------------------------------------------------------------
    step, epoch, position = 0, 0, 0  # optimizer steps done; epoch; micro-batches consumed in it
    from .tracking import TensorBoard  # rows also go to RUN/tensorboard (train.tensorboard)

    board = TensorBoard.open(run_dir, ctx.main, t.tensorboard)
    log = board.mirror(JsonlLog(run_dir / "metrics.jsonl", ctx.main))
    lam_log = board.mirror(JsonlLog(run_dir / "lambdas.jsonl", ctx.main), prefix="lambda")
    if resumed is not None:
        path, state = resumed
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        step, epoch = state["step"], state["epoch"]
        saved_world = state.get("world", len(state["rng"]))
        position = state["position"] // batch_plan(recipe, saved_world).accum_steps * accum  # whole steps, any world
        if saved_world == ctx.world:
            ckpt.set_rng_state(state["rng"][ctx.rank])
        else:  # per-rank streams cannot be carried to another world: fresh ones, distinct per rank and step
            seed_everything(t.seed * 1_000_003 + step * 4_099 + ctx.rank)
            ctx.log(f"resumed on {ctx.world} process(es) a run saved from {saved_world}: {plan}; the rest of epoch "
                    f"{epoch} reads this world's share of its order, and the random streams restart")
        log.truncate_after(step)
        lam_log.truncate_after(step)
        ctx.log(f"resumed from {path}: step {step}, epoch {epoch}, batch {position}")
        del state, resumed  # the loaded copy (weights, optimizer state) is not held through the run
    elif ctx.main:
        for stale in ("metrics.jsonl", "lambdas.jsonl"):
            (run_dir / stale).unlink(missing_ok=True)
    if ctx.main:
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    ctx.log(f"plan: {t.epochs} epochs x {steps_per_epoch} steps (total {total_steps}, warm-up {warmup_steps}), "
            f"{ctx.world} process(es) on {ctx.device}, amp {ctx.amp_dtype or 'off'}, run folder {run_dir}")

    clock = CheckpointClock(t.checkpoint_minutes)
    agreement = StopAgreement(stops, clock)  # stop and save decisions, agreed in each step's loss all-reduce

    def save(at_step: int, at_epoch: int, at_position: int) -> Path | None:
        rngs: list[Any] = [ckpt.rng_state()]
        if ctx.world > 1:
            rngs = [None] * ctx.world
            dist.all_gather_object(rngs, ckpt.rng_state())
        clock.saved()  # on every rank: a clock left running elsewhere would make every later step due
        if not ctx.main:
            return None
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "step": at_step, "epoch": at_epoch,
            "position": at_position, "rng": rngs, "world": ctx.world, "recipe": recipe.to_dict(),
        }
        return ckpt.save_checkpoint(ckpt_dir, state, at_step, t.keep_last)

    # -- train ------------------------------------------------------------------------------------
    model.train()
    bar = None
    if ctx.main and progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=recipe.run_name, dynamic_ncols=True, file=sys.stderr)

    def loss_of(batch: Any) -> tuple[Tensor, int]:
        x, y = batch
        if mixup is not None:
            x, y = mixup(x, y)
        logits = net(x)
        return compute_loss(logits, y, adapter.task, t.label_smoothing if mixup is None else 0.0), y.shape[0]

    def stop(value: float) -> None:
        # The weights are still those of the last completed step: save them, then stop.
        saved = save(step, epoch, position)
        raise NonFiniteLossError(
            f"loss is {value} at step {step} (epoch {epoch}); the last finite state is saved"
            f"{f' in {saved}' if saved else ''}. Lower the lr (optim.blr/lr), set optim.clip_grad, "
            f"or use train.amp=bf16/fp32"
        )

    last_eval: dict[str, float] = {}
    best: dict[str, Any] = {}  # the best evaluation (primary metric, epoch, step), reported beside the last
    for row in log.rows() if resume else ():  # the evaluations before the checkpoint (the log is truncated to it)
        if row["kind"] == "eval":
            best = best_evaluation(best, row, t.export_ema)
            last_eval = {k: v for k, v in row.items() if k not in ("kind", "step", "epoch")}
    window = Window()  # samples/s and the wait for data, per log row
    while step < total_steps and epoch < t.epochs:
        set_epoch(train_loader, train_sampler, epoch, position)
        batches = window.batches(train_loader)
        while position < steps_per_epoch * accum and step < total_steps:
            apply_lr(optimizer, lr_at(step, base_lr=lr, total_steps=total_steps, warmup_steps=warmup_steps,
                                      min_lr=o.min_lr))
            loss_sum, samples = optimizer_step(net, batches, loss_of, optimizer, scaler, ctx, accum, o.clip_grad, stop,
                                               repeat_step=o.repeat_step, agreement=agreement)
            position += accum
            window.add(samples)
            if ema is not None:
                ema.update(model, step=step)
            step += 1

            if step % t.log_every == 0 or step == total_steps:
                row = {"kind": "train", "step": step, "epoch": epoch, "loss": loss_sum,
                       "lr": optimizer.param_groups[0]["lr"], "lambda_abs": mean_abs_lambda(model),
                       **window.row(ctx), "unreadable_files": unreadable_files(adapter, ctx)}
                log.write(**row)
                lam_log.write(step=step, **lambda_values(model))
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", lam=f"{row['lambda_abs']:.2e}",
                                    sps=f"{row['samples_per_s']:.0f}", wait=f"{row['data_wait']:.0%}")
            if bar is not None:
                bar.update(1)
            if agreement.stop:
                saved = save(step, epoch, position)
                raise RunStopped(f"stopped by {stops.name} after step {step} of {total_steps} (epoch {epoch}); "
                                 f"checkpoint {saved or 'written by rank 0'}; run the same command again to continue",
                                 exit_code=128 + (stops.received or signal.SIGTERM))
            if (agreement.due or (t.checkpoint_every and step % t.checkpoint_every == 0)) and step < total_steps:
                save(step, epoch, position)

        if position >= steps_per_epoch * accum:  # the epoch is complete
            epoch, position = epoch + 1, 0
        with window.paused():
            if val_loader is not None and (epoch % t.eval_every == 0 or step >= total_steps):
                last_eval = evaluate(model, val_loader, ctx, adapter.metric, adapter.task)
                if ema is not None:
                    ema_eval = evaluate(ema.module, val_loader, ctx, adapter.metric, adapter.task)
                    last_eval.update({f"ema_{k}": v for k, v in ema_eval.items()})
                best = best_evaluation(best, {**last_eval, "epoch": epoch, "step": step}, t.export_ema)
                skipped = unreadable_files(adapter, ctx)
                log.write(kind="eval", step=step, epoch=epoch, **last_eval)
                ctx.log(f"eval step {step} epoch {epoch}: "
                        + ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items())
                        + (f"; {skipped} unreadable file(s) skipped so far" if skipped else ""))
            if step < total_steps and epoch % t.checkpoint_epochs == 0:
                save(step, epoch, position)
    if bar is not None:
        bar.close()
    save(step, epoch, position)

    # -- the final test: the multi-view protocol, once, on the connected model ----------------------
    result: dict[str, Any] = {"step": step, "metrics": last_eval, "run_dir": str(run_dir), "plan": str(plan)}
    if t.export_ema:  # the EMA is the run from here on: final test, fold, export (the checkpoint keeps both)
        model.load_state_dict(ema.module.state_dict())
        result.update(weights="ema", **ema_metrics(last_eval))
    test_set = multiview_test_set(adapter, recipe.data.val_split)
    if test_set is not None:
        test_loader = make_loader(test_set, shuffle=False, **loader_args)[0]
        result["test_metrics"] = evaluate(model, test_loader, ctx, adapter.metric, adapter.task)
        log.write(kind="test", step=step, epoch=epoch, views=len(adapter.test_views()), **result["test_metrics"])
        ctx.log(f"test ({len(adapter.test_views())} views per item, probabilities averaged): "
                + ", ".join(f"{k} {v:.4g}" for k, v in result["test_metrics"].items()))
    if best:
        result["best"] = best
        log.write(kind="best", step=step, epoch=epoch, best=best)
        key, weights = primary_metric(result["metrics"]), " of the EMA weights" if t.export_ema else ""
        ctx.log(f"best evaluation{weights}: epoch {best['epoch']} (step {best['step']}) {key} {best[key]:.4g}; "
                f"last: epoch {epoch} {key} {result['metrics'][key]:.4g}")
    result["unreadable_files"] = unreadable_files(adapter, ctx)

    # -- fold and export ----------------------------------------------------------------------------
    if ctx.world > 1:
        result["replica_max_abs_diff"] = replica_difference(model, ctx)
        ctx.log(f"DDP replicas: max |rank - rank 0| over per-tensor checksums {result['replica_max_abs_diff']:.3g}")
    if ctx.main:
        result.update(finish(model, recipe, adapter, val_set or train_set, ctx, log, lam_log,
                             extra={k: v for k, v in result.items() if k != "run_dir"}))
    ctx.barrier()
    release(ctx)
    return result


def check_resumable(state: dict[str, Any], recipe: Recipe, ctx: Context, path: Path) -> None:
    """Refuse to continue checkpoints with a recipe that changed a key shaping the run, or on another number of
    processes when that would change the batch (without ``data.global_batch`` it grows with the processes)."""
    changes = ckpt.recipe_changes(state["recipe"], recipe.to_dict())
    if changes:
        raise ckpt.RecipeChangedError(
            f"{recipe.run_dir} holds checkpoints of another recipe ({path.name}): {'; '.join(changes)}. Continue it "
            f"with the recipe it was started with (it is saved in the checkpoint; `pathway fold` reads it), or start "
            f"the new recipe in another output.name")
    saved_world = state.get("world", len(state["rng"]))
    if saved_world != ctx.world and recipe.data.global_batch is None:
        saved, plan = batch_plan(recipe, saved_world), batch_plan(recipe, ctx.world)
        raise WorldSizeError(
            f"{path} was written by {saved_world} process(es) and this run has {ctx.world}: without "
            f"data.global_batch the global batch would change from {saved.global_batch} to {plan.global_batch}: "
            f"run it on {saved_world} process(es) (a recipe that states data.global_batch keeps its batch on any "
            f"number, through accumulation)")


def ema_metrics(evaluation: dict[str, float]) -> dict[str, dict[str, float]]:
    """A last evaluation of live and EMA weights (``top1``, ``ema_top1``, ...) split for a run whose EMA is exported:
    ``metrics`` are the EMA's, without the prefix (the metrics of the exported weights), ``live_metrics`` the rest."""
    return {"metrics": {k.removeprefix("ema_"): v for k, v in evaluation.items() if k.startswith("ema_")},
            "live_metrics": {k: v for k, v in evaluation.items() if not k.startswith("ema_")}}


def replica_difference(model: nn.Module, ctx: Context) -> float:
    """Largest difference between this rank's and rank 0's per-tensor checksums (0.0: replicas agree).

    A cheap end-of-run check that DDP kept the copies in lock-step (one float64 per tensor is sent).
    """
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(ctx.device)
    gathered = [torch.zeros_like(sums) for _ in range(ctx.world)]
    dist.all_gather(gathered, sums)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def finish(model: TransformerModel, recipe: Recipe, adapter, check_set, ctx: Context,
           log: JsonlLog, lam_log: JsonlLog, extra: dict[str, Any]) -> dict[str, Any]:
    """Fold, check, save the folded model, write CSVs and plots (rank 0)."""
    from torch.utils.data import DataLoader

    from .export import provenance_metadata, save_folded

    run_dir = recipe.run_dir
    out: dict[str, Any] = dict(extra)
    record: dict[str, str] = {}
    if pathway.is_connected(model):
        record = provenance_metadata(model, recipe)  # the pairs and lambdas, read before the fold removes them
        batches = DataLoader(check_set, batch_size=min(8, len(check_set)), collate_fn=collate)
        x = to_device(next(batch for batch in batches if batch is not None)[0], ctx.device)
        out["fold_max_abs_diff"] = fold_and_check(model, x, ctx)
        ctx.log(f"fold: max |folded - connected| on a batch of {x.shape[0]}: {out['fold_max_abs_diff']:.3g}")
    out.update(save_folded(model, adapter, run_dir, log=ctx.log, metadata=record))
    (run_dir / "result.json").write_text(json.dumps(out, indent=2))
    rows = log.rows()
    write_csv([r for r in rows if r["kind"] == "train"], run_dir / "train.csv")
    write_csv([r for r in rows if r["kind"] in ("eval", "test")], run_dir / "eval.csv")
    if recipe.output.plots:
        from .plots import plot_run

        out["plots"] = [str(p) for p in plot_run(rows, lam_log.rows(), run_dir)]
    return out

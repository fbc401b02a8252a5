"""``--dry-run``: check a recipe end to end without training, and say what the run would do.

Validates the schema and the adapter, builds target and aux on the meta device (no memory, no
weights; on the CPU if some part cannot run on meta), prints ``pathway.plan``'s report (the
pairs ``connect`` would make, changing nothing) and the run plan: data sizes when the data is
there, steps, warm-up, effective batch, lr. Missing data or checkpoint files are listed as
problems a real run would stop on, not errors here, so paper recipes can be checked anywhere. A dry run
writes nothing: where the demo data (`data.demo: true`) is missing it checks only that the real run may make
it there (a folder pathway owns or a new one; never a user's).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pathway.errors import TraceError

from ..config import Recipe, RecipeError, batch_plan, check_adapter
from ..model import aux_reads, build_adapter, build_transformer, open_transformers_aux
from ..optim import base_lr
from ..schedule import step_plan

__all__ = ["dry_run"]


def _build_pair(recipe: Recipe, adapter, device: str):
    with torch.device(device):
        target = build_transformer(recipe, adapter)
        if not recipe.aux.enabled:
            return target, None
        if recipe.aux.checkpoint_format == "transformers":  # built on meta from its config, whatever the device
            return target, open_transformers_aux(recipe.aux.checkpoint)
        return target, build_transformer(recipe, adapter, aux=True)


def _plan(target, aux, recipe: Recipe, example, device: str):
    import pathway

    example = example.to(device)
    # a Hugging Face aux reads its own inputs (token ids...) from its config
    aux_inputs = {} if recipe.aux.checkpoint_format == "transformers" else {"aux_inputs": example}
    return pathway.plan(target, aux, **recipe.connect_options(), target_inputs=example, **aux_inputs)


def dry_run(recipe: Recipe, *, world: int = 1, pretrain: bool = False) -> str:
    """The report text; raises RecipeError (or the core's PathwayError) for what would stop a run."""
    check_adapter(recipe)
    lines = [f"recipe {recipe.source}" + (f": {recipe.description}" if recipe.description else "")]
    problems = []
    root = recipe.data.root
    demo_pending = False
    if recipe.data.demo and root:  # a dry run writes nothing: check that the real run could make the data there
        from ..demo_data import check_demo_root

        demo_pending = not check_demo_root(recipe.data.adapter, root)
    has_data = bool(root) and Path(root).exists() and not demo_pending
    if demo_pending:
        lines.append(f"data.root {root}: the demo data is made there on the first real run (data.demo: true)")
    elif not has_data:
        problems.append(f"data.root {root or '(empty)'} does not exist")
    hf_aux = recipe.aux.enabled and recipe.aux.checkpoint_format == "transformers"
    missing = {}
    for key, path in (("model.checkpoint", recipe.model.checkpoint), ("aux.checkpoint", recipe.aux.checkpoint)):
        hf_directory = key == "aux.checkpoint" and hf_aux
        if path and not (Path(path) / "config.json" if hf_directory else Path(path)).is_file():
            missing[key] = (f"{key} {path} does not exist"
                            + (" (a Hugging Face model directory)" if hf_directory else ""))
    problems += missing.values()
    if hf_aux and "aux.checkpoint" in missing:  # that directory is the whole aux model: nothing to plan without it
        raise RecipeError(f"{recipe.source}: {missing['aux.checkpoint']}")
    adapter = build_adapter(recipe, need_data=False)
    lines.append(f"adapter {adapter.name}: task {adapter.task}, metric {adapter.metric}, {adapter.num_classes} classes"
                 + ("" if has_data else " (data-less spec)"))

    example = adapter.example_input()[None]  # from the options alone: no data needed

    def build(device: str):
        target, aux = _build_pair(recipe, adapter, device)
        return target, aux, (_plan(target, aux, recipe, example, device) if aux is not None and not pretrain else None)

    device = "meta"  # a Hugging Face aux too: it is built on meta from its config and read lazily
    try:
        target, aux, report = build(device)
    except (NotImplementedError, RuntimeError, TraceError) as err:  # an op without a meta kernel: build on the CPU
        if isinstance(err, TraceError) and not isinstance(err.__cause__, (NotImplementedError, RuntimeError)):
            raise  # the core could not read the model for another reason than meta: the real run would stop too
        device = "cpu"
        target, aux, report = build(device)
    n_params = sum(p.numel() for p in target.parameters())
    lines.append(f"target: TransformerModel D={recipe.model.embed_dim} depth={recipe.model.depth} "
                 f"heads={recipe.model.num_heads}, {n_params / 1e6:.2f}M parameters (built on {device})"
                 + (f", init {recipe.model.checkpoint}" if recipe.model.checkpoint else ", random init"))
    if pretrain:
        p = recipe.pretrain
        lines.append(f"MAE pretraining: mask {p.mask_ratio}, decoder {p.decoder_depth} x {p.decoder_dim} "
                     f"({p.decoder_heads} heads), loss {target.tokenizer.reconstruction_loss}")
    elif aux is None:
        lines.append("aux: disabled (baseline run without a pathway)")
    else:
        lines.append(f"aux: body of {recipe.aux.checkpoint or 'a random init'}"
                     + (f" ({recipe.aux.adapter} model)" if recipe.aux.adapter else ""))
        lines.append(str(report))
        if hf_aux:  # what connect will take from disk, and nothing was read for the plan
            lines.append("aux from disk: " + aux.describe_reads(aux_reads(report))
                         + f" (the plan read {aux.bytes_read} bytes)")

    o, t = recipe.optim, recipe.train
    plan = batch_plan(recipe, world)
    if has_data:
        n_train = len(adapter.dataset(recipe.data.train_split, train=True))
        steps = n_train // world // recipe.data.batch_size // plan.accum_steps
        total, warmup = step_plan(steps, t.epochs, t.max_steps, o.warmup_epochs)
        lines.append(f"data: {n_train} training items -> {steps} steps per epoch, {total} steps in all, "
                     f"warm-up {warmup} steps")
    else:
        lines.append(f"data: not present; {t.epochs} epochs, warm-up {o.warmup_epochs} epochs")
    lines.append(f"batch: world size {plan.world}, per-process batch {plan.per_process}, accumulation "
                 f"{plan.accum_steps}, global batch {plan.global_batch}"
                 + ("" if recipe.data.global_batch else " (no data.global_batch: it grows with the world size)"))
    name = {"adamw": "AdamW", "lars": "LARS (AdamW for lambda)"}[o.optimizer]
    lines.append(f"optim: {name} lr {base_lr(recipe, plan.global_batch):.3g}"
                 + ("" if o.lr is not None else f" (blr {o.blr:g} x {plan.global_batch} / 256)")
                 + f", wd {o.weight_decay}, layer decay {o.layer_decay}, lambda lr {o.lambda_lr or 'same'}, "
                   f"clip {o.clip_grad}")
    lines.append(f"train: amp {t.amp}, mixup {t.mixup}, cutmix {t.cutmix}, smoothing {t.label_smoothing}, "
                 f"drop path {recipe.model.drop_path}, ema {t.ema}; outputs in {recipe.run_dir}")
    if problems:
        lines.append("a real run would stop on: " + "; ".join(problems))
    return "\n".join(lines)

"""The ``pathway`` command (also ``python -m pathway``): train, eval, fold, pretrain, inspect, demo-data.

Every command that takes a recipe accepts ``--set section.key=value`` (repeatable, YAML values) and
``--dry-run``. Errors a user can fix (recipe, data, checkpoint) print one message and exit 2,
without a traceback. A run stopped by a signal exits 128 + the signal (SIGTERM 143, Ctrl-C 130) after saying
where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pathway.errors import PathwayError

__all__ = ["main", "build_parser", "UsageError"]

EPILOG = """examples:
  pathway train recipes/demo/image.yaml
  pathway train recipes/demo/image.yaml --set train.epochs=1 --set optim.blr=2e-3
  pathway train recipes/paper/imagenet_mae_point.yaml --dry-run   # check a recipe, print the pairs and the plan
  pathway train recipes/paper/imagenet_mae_point.yaml --rehearse  # run it for real on tiny official-layout data
  pathway train RECIPE --rehearse --world 2                        # the same on 2 CPU processes (gloo)
  torchrun --nproc-per-node 8 -m pathway train RECIPE            # DDP
  pathway train RECIPE                                          # again: continues the run from its last checkpoint
  pathway pretrain recipes/demo/point_mae.yaml                   # MAE encoder, usable as aux.checkpoint
  pathway eval RECIPE --weights runs/NAME/model.safetensors
  pathway fold runs/NAME/checkpoints/ckpt-00000100.pt -o folded.safetensors
  pathway inspect RECIPE                                         # connect report, target vs aux
  pathway inspect model.safetensors                              # how a saved/folded file was made
  pathway inspect timm:vit_small_patch16_224 timm:vit_small_patch16_224
  pathway experiment                                             # the embedded experiment -> results/
  pathway screen RECIPE --candidate a=aux.safetensors --candidate b=hf_dir:transformers --seeds 5 --align

Recipes are YAML over typed defaults (pathway/train/config.py, docs/training.md)."""


class UsageError(PathwayError):
    """Command-line arguments that do not fit the command."""


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="recipe YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.epochs=3 (repeatable; values are YAML)")


def build_parser() -> argparse.ArgumentParser:
    from .demo_data import MAKERS  # numpy only: the parser stays light
    parser = argparse.ArgumentParser(
        prog="pathway",
        description="Multimodal Pathway: train a transformer with the weights of another modality's transformer "
                    "(W + lambda * W_aux), then fold the pathway away.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a recipe (fine-tune with a pathway, fold, export)",
                       description="Train a recipe: connect target and aux, train, fold the pathway into the "
                                   "target, check and save the folded model, metrics and plots.")
    _add_recipe_args(p)
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint to continue from (a run folder holding checkpoints is continued anyway, "
                        "when its recipe is the same)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, build on the meta device, print pairs and plan, exit")
    p.add_argument("--rehearse", action="store_true",
                   help="run the recipe as written on the CPU, on tiny data in its official layout and checkpoint "
                        "files in the official key layouts, at reduced sizes; train, evaluate, fold, export, check, "
                        "exit")
    p.add_argument("--world", type=int, default=None, metavar="N",
                   help="with --rehearse: rehearse N processes on the CPU (gloo), as torchrun would start them")
    p.add_argument("--keep", action="store_true", help="with --rehearse: keep the temporary folder and print it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs and metrics files only)")

    p = sub.add_parser("pretrain", help="MAE-pretrain an encoder for any adapter (an aux model for the demos)",
                       description="Masked-autoencoder pretraining on the recipe's data; writes encoder.safetensors.")
    _add_recipe_args(p)
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan, exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("eval", help="evaluate weights on the recipe's validation split",
                       description="Evaluate a folded model file (model.safetensors) or a training checkpoint.")
    _add_recipe_args(p)
    p.add_argument("--weights", type=Path, required=True,
                   help="model.safetensors written by train (folded), a checkpoints/ckpt-*.pt, or an official "
                        "fine-tuned file (MAE, VideoMAE, AudioMAE, Point-MAE; its format from model.checkpoint_format)")
    p.add_argument("--split", default=None, help="split to evaluate (default: data.val_split)")

    p = sub.add_parser("fold", help="fold the pathways of a training checkpoint into a plain model file",
                       description="Rebuild the connected model from a training checkpoint (its recipe is inside), "
                                   "fold every pathway, save safetensors in TransformerModel keys.")
    p.add_argument("checkpoint", type=Path, help="checkpoints/ckpt-*.pt of a run")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .safetensors file")

    p = sub.add_parser("inspect", help="connect report for a recipe's target and aux, or two timm models",
                       description="Print what pathway.connect would pair (pathway.plan; nothing is changed). "
                                   "Give one recipe, or two models as timm:NAME; or a .safetensors file pathway "
                                   "wrote, to print how it was made (pathway, aux and its sha256, pairs, lambdas).")
    p.add_argument("models", nargs="+", metavar="RECIPE | timm:NAME | FILE.safetensors",
                   help="a recipe, two timm model names, or a model file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override (pathway.* options apply to timm models too)")

    p = sub.add_parser("experiment", help="the embedded experiment: digits ViT with pathways to a point-cloud MAE, "
                                          "MiniLM text and two controls, from scratch and in the fix setting, "
                                          "with paired intervals (README's first command)",
                       description="Run the embedded experiment and write results/ (tables, verdict, plots). "
                                   "Conditions, seeds and hyper-parameters are fixed in "
                                   "pathway/train/jobs/experiment.py and recipes/demo/experiment_image*.yaml.")
    p.add_argument("--out", type=Path, default=Path("results"), help="output folder (default: results)")
    p.add_argument("--quick", action="store_true", help="toy sizes and 2 seeds, same code path (about a minute)")

    p = sub.add_parser("screen", help="which donor helps my model: candidates against their placebos and the "
                                      "baseline on the same seeds, paired intervals, a ranking",
                       description="Screen candidate aux models on a recipe: each beside two placebos made from "
                                   "its own file (Gaussian with its norms; rows permuted) and the baseline, on the "
                                   "same seeds; writes screen.json, screen.md, screen.png (README: pathway screen).")
    _add_recipe_args(p)
    p.add_argument("--candidate", action="append", required=True, metavar="NAME=SPEC",
                   help="a donor: NAME=PATH or NAME=PATH:FORMAT, anything aux.checkpoint takes (repeatable)")
    p.add_argument("--setting", choices=["fix", "tune", "both"], default="fix",
                   help="fix: target frozen, lambda and head train (default); tune: short full fine-tune; both")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1, shared by every condition (default 3)")
    p.add_argument("--layers", default="all", help="layer groups screened side by side: all, attn, mlp "
                                                   "(comma-separated; default all)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the recipe's schedule)")
    p.add_argument("--align", action="store_true",
                   help="also screen each candidate aligned to the target's basis (pathway.align, weight matching)")
    p.add_argument("--out", type=Path, default=Path("screen"), help="output folder (default: screen)")

    p = sub.add_parser("demo-data", help="write the embedded demo data of one modality",
                       description="Generate the small on-disk data set the demo recipes use.")
    p.add_argument("adapter", choices=sorted(MAKERS), help="modality")
    p.add_argument("root", type=Path, help="output folder")
    return parser


def _report(line: str) -> None:
    """Print a command's closing line once: under ``torchrun`` every process runs the command, rank 0 speaks."""
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(line)


def _cmd_train(args) -> int:
    from .config import load_recipe

    if (args.world is not None or args.keep) and not args.rehearse:
        raise UsageError("pathway train: --world and --keep go with --rehearse (a real multi-process run is started "
                         "by torchrun --nproc-per-node N)")
    if args.world is not None and args.world < 1:
        raise UsageError(f"pathway train: --world {args.world}: give a number of processes, 1 or more")
    if args.rehearse:
        from .jobs.rehearse import rehearse

        result = rehearse(args.recipe, args.overrides, world=args.world, keep=args.keep)
        if result is not None:  # rank 0 reports
            print(result.line)
        return 0
    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        import os

        from .jobs.dryrun import dry_run

        print(dry_run(recipe, world=int(os.environ.get("WORLD_SIZE", "1"))))
        return 0
    from .cluster.preempt import StopSignals
    from .engine import train

    with StopSignals() as stops:  # SIGTERM, SIGUSR1, Ctrl-C: finish the step, checkpoint, stop
        result = train(recipe, resume=args.resume, progress=not args.no_progress, stops=stops)
    if result.get("metrics"):
        _report("final: " + ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items()))
    return 0


def _cmd_pretrain(args) -> int:
    from .config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        from .jobs.dryrun import dry_run

        print(dry_run(recipe, pretrain=True))
        return 0
    from .pretrain import pretrain

    pretrain(recipe, progress=not args.no_progress)
    return 0


def _cmd_eval(args) -> int:
    from .config import check_data, load_recipe
    from .evaluate import evaluate_weights

    recipe = load_recipe(args.recipe, args.overrides)
    check_data(recipe)
    metrics = evaluate_weights(recipe, args.weights, split=args.split)
    _report(", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return 0


def _cmd_fold(args) -> int:
    from .evaluate import fold_checkpoint

    print(fold_checkpoint(args.checkpoint, args.output))
    return 0


def _cmd_inspect(args) -> int:
    import pathway

    from .config import load_recipe

    if len(args.models) == 1 and args.models[0].endswith(".safetensors"):
        from pathway import provenance

        print(provenance.describe(provenance.read(args.models[0])))
        return 0
    if len(args.models) == 1:
        from .jobs.dryrun import dry_run

        print(dry_run(load_recipe(Path(args.models[0]), args.overrides)))
        return 0
    if len(args.models) != 2 or not all(m.startswith("timm:") for m in args.models):
        raise UsageError(f"give one recipe, or two models as timm:NAME timm:NAME (got {' '.join(args.models)})")
    import timm
    import torch

    names = [m.removeprefix("timm:") for m in args.models]
    unknown = [n for n in names if not timm.is_model(n)]
    if unknown:
        raise UsageError(f"timm has no model {unknown[0]!r}; see timm.list_models('{unknown[0][:4]}*')")

    from .config import parse_overrides, recipe_from_dict

    opts = recipe_from_dict(parse_overrides(args.overrides), "--set").connect_options()
    with torch.device("meta"):
        target, aux = (timm.create_model(n, pretrained=False) for n in names)
    print(pathway.plan(target, aux, **opts))
    return 0


def _cmd_demo_data(args) -> int:
    from .demo_data import make_demo_data

    print(make_demo_data(args.adapter, args.root))
    return 0


def _cmd_experiment(args) -> int:
    from .jobs.experiment import run_experiment

    run_experiment(args.out, quick=args.quick)
    return 0


def _cmd_screen(args) -> int:
    from pathway.screen import screen

    screen(args.recipe, args.candidate, setting=args.setting, seeds=args.seeds, layers=args.layers,
           overrides=args.overrides, out=args.out, steps=args.steps, align=args.align)
    return 0


COMMANDS = {"experiment": _cmd_experiment, "screen": _cmd_screen, "train": _cmd_train, "pretrain": _cmd_pretrain,
            "eval": _cmd_eval, "fold": _cmd_fold, "inspect": _cmd_inspect, "demo-data": _cmd_demo_data}


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user's mistake prints ``pathway COMMAND: error: ...`` and returns 2, never a traceback.

    Recipe, adapter, data, checkpoint, folder and loss errors are all PathwayErrors that name what to fix; an
    OSError (a file that cannot be read or written) names its path. argparse handles wrong commands and flags.
    """
    from .cluster.preempt import RunStopped

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except RunStopped as err:
        print(f"pathway {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except (PathwayError, OSError) as err:
        print(f"pathway {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pathway {args.command}: interrupted (Ctrl-C); files are written whole or not at all, so a training "
              f"run continues from its last checkpoint when the same command runs again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Every PartNet category of a recipe's level, one run each, then the mean: PartNet's number for a method.

PartNet trains and scores one network per category and level (daerduoCarey/partnet_seg_exps
``exps/sem_seg_pointcnn/README.md:12``); a paper's PartNet column is the mean over the categories (level 3: the
17 that have it). ::

    python -m pathway.train.jobs.partnet_sweep recipes/paper/partnet_pointmae_baseline.yaml [--set KEY=VALUE ...]
        [--categories Chair Table ...] [--no-progress]

Each category runs as ``pathway train RECIPE --set data.options.category=C --set output.name=<run>-C``. After
each, ``<output.dir>/<run>-sweep.json`` is rewritten with every finished category's last and best evaluation
and their means (:func:`pathway.train.metrics.average_over_categories`); run again, the command skips the
categories that file already holds, so a stopped sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pathway.adapters import partnet

from ..config import Recipe, RecipeError, load_recipe
from ..metrics import average_over_categories

PARTNET_LAYOUTS = ("partnet", "partnet_h5")


def sweep_categories(recipe: Recipe) -> list[str]:
    """The categories of the recipe's data root that have its level (and data in its layout)."""
    options = recipe.data.options
    if recipe.data.adapter != "point_part" or options.get("layout") not in PARTNET_LAYOUTS:
        raise RecipeError(f"{recipe.source}: a PartNet sweep needs data.adapter point_part with data.options.layout "
                          f"in {PARTNET_LAYOUTS}, not {recipe.data.adapter} / {options.get('layout')!r}")
    if options.get("level") is None:
        raise RecipeError(f"{recipe.source}: a PartNet sweep scores one level: set data.options.level (1, 2 or 3)")
    return partnet.categories(Path(recipe.data.root), options["level"], options["layout"])


def summary_path(recipe: Recipe) -> Path:
    return Path(recipe.output.dir) / f"{recipe.run_name}-sweep.json"


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-category results and their means, for the last and for the best evaluation of each run."""
    return {"categories": runs,
            "mean_last": average_over_categories({c: r["last"] for c, r in runs.items()}),
            "mean_best": average_over_categories({c: r["best"] for c, r in runs.items()})}


def run_sweep(path: str | Path, overrides: list[str] | None = None, categories: list[str] | None = None,
              progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``path`` once per category (all of the level's, or ``categories``) and write the means."""
    from ..engine import train

    overrides = list(overrides or [])
    recipe = load_recipe(path, overrides)
    available = sweep_categories(recipe)
    unknown = sorted(set(categories or ()) - set(available))
    if unknown:
        raise RecipeError(f"{path}: categories {unknown} have no level-{recipe.data.options['level']} data "
                          f"under {recipe.data.root}; available: {available}")
    out = summary_path(recipe)
    runs: dict[str, dict[str, Any]] = json.loads(out.read_text())["categories"] if out.is_file() else {}
    for category in categories or available:
        if category in runs:
            log(f"{category}: done before ({out}), skipped")
            continue
        one = load_recipe(path, [*overrides, f"data.options.category={category}",
                                 f"output.name={recipe.run_name}-{category}"])
        result = train(one, progress=progress)
        metrics = {k: v for k, v in result["metrics"].items() if k != "loss"}
        best = {k: v for k, v in result.get("best", result["metrics"]).items() if k in metrics}
        runs[category] = {"last": metrics, "best": best, "run_dir": result["run_dir"]}
        summary = summarise(runs)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1))
        log(f"{category}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) + f"; mean over {len(runs)} "
            f"categories so far: " + ", ".join(f"{k} {v:.4g}" for k, v in summary["mean_last"].items()))
    return summarise(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pathway.train.jobs.partnet_sweep",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="a PartNet recipe (data.options.layout partnet or partnet_h5)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, as pathway train --set")
    parser.add_argument("--categories", nargs="+", help="only these categories (default: every one of the level)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    from pathway import PathwayError

    try:
        summary = run_sweep(args.recipe, args.overrides, args.categories, progress=not args.no_progress)
    except PathwayError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"mean over {len(summary['categories'])} categories: "
          + ", ".join(f"{k} {v:.4g}" for k, v in summary["mean_last"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

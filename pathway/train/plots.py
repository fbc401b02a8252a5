"""PNG plots of a run, written next to it: loss and metric curves, and lambda per layer over training.

matplotlib is imported here only (``import pathway`` stays light) with the non-interactive Agg backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_run"]


def plot_run(rows: list[dict[str, Any]], lambda_rows: list[dict[str, Any]], run_dir: Path) -> list[Path]:
    """``curves.png`` (train loss, lr, eval metrics) and, for connected runs, ``lambdas.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    metric_keys = [k for k in (evals[0] if evals else {}) if k not in ("kind", "step", "epoch", "loss")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set(title="learning rate (first group)", xlabel="step")
    for key in metric_keys:
        axes[2].plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=key)
    axes[2].set(title="evaluation", xlabel="step")
    if metric_keys:
        axes[2].legend()
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    names = [k for k in (lambda_rows[-1] if lambda_rows else {}) if k != "step"]
    if names:
        fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5))
        steps = [r["step"] for r in lambda_rows]
        for name in names:
            left.plot(steps, [r.get(name, float("nan")) for r in lambda_rows], lw=0.8)
        left.set(title=f"lambda of each of {len(names)} layers", xlabel="step", ylabel="lambda (mean over channels)")
        right.barh(range(len(names)), [lambda_rows[-1][n] for n in names])
        right.set_yticks(range(len(names)), names, fontsize=max(4, 9 - len(names) // 12))
        right.invert_yaxis()
        right.set(title=f"final lambda per layer (step {steps[-1]})", xlabel="lambda")
        fig.tight_layout()
        path = run_dir / "lambdas.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written

"""Running a screen's conditions: one engine run per (setting, seed, condition), the same seeds for all.

Each run trains the recipe with the condition's aux (or none), evaluates, folds the pathway and checks the
folded model; what a summary needs (the metric, the learned lambdas, the accuracy curve, the fold check, the
parameter count, the time) is kept in a :class:`Run`. An interrupted screen continues each run from its last
checkpoint; a finished run's training checkpoints are removed (they are only for resuming).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Run", "train_condition", "Progress"]


@dataclass
class Run:
    setting: str
    condition: str
    seed: int
    metric: float                     # the run's primary metric after the last step (top-1 in %, ...)
    metric_name: str
    fold_max_abs_diff: float | None
    parameters: int
    lambdas: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


def _parameters(path: str) -> int:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def train_condition(recipe_path: Path, overrides: list[str], runs_dir: Path, setting: str, condition: str,
                    seed: int) -> Run:
    """Train ``recipe_path`` with ``overrides`` on ``seed`` into ``runs_dir/setting/condition-seed<k>``."""
    from pathway.train.checkpoint import list_checkpoints
    from pathway.train.config import load_recipe
    from pathway.train.engine import JsonlLog, primary_metric, train

    started = time.perf_counter()
    recipe = load_recipe(recipe_path, [*overrides, f"train.seed={seed}", f"output.dir={runs_dir / setting}",
                                       f"output.name={condition}-seed{seed}", "train.keep_last=1"])
    # a run an interrupted screen left behind continues from its last checkpoint
    result = train(recipe, resume=bool(list_checkpoints(recipe.run_dir / "checkpoints")), progress=False)
    run_dir = Path(result["run_dir"])
    # A finished run needs no resume state (weights, aux weights and optimizer state) nor the second copy of its
    # folded model in timm keys, already checked.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    Path(result.get("timm_model", run_dir / "model_timm.safetensors")).unlink(missing_ok=True)
    lambda_rows = JsonlLog(run_dir / "lambdas.jsonl", main=False).rows()
    last_lambdas = ({k: v for k, v in lambda_rows[-1].items() if k not in ("step", "time")} if lambda_rows else {})
    metric = primary_metric(result["metrics"])
    curve = [(r["step"], r[metric]) for r in JsonlLog(run_dir / "metrics.jsonl", main=False).rows()
             if r.get("kind") == "eval"]
    return Run(setting, condition, seed, float(result["metrics"][metric]), metric, result.get("fold_max_abs_diff"),
               _parameters(result["model"]), last_lambdas, curve, time.perf_counter() - started)


class Progress:
    """A line per finished run: how many are done, the last result, the time so far and an estimate of the rest
    (from the mean time of finished baseline and connected runs, each kind apart: a baseline run costs less)."""

    def __init__(self, total: int, connected: int) -> None:
        self.total, self.connected, self.done = total, connected, 0
        self.seconds: dict[bool, list[float]] = {False: [], True: []}
        self.started = time.perf_counter()

    def estimate_left(self) -> float | None:
        """Seconds left, once a baseline and a connected run have been timed (``None`` before)."""
        if not all(self.seconds.values()):
            return None
        mean = {k: sum(v) / len(v) for k, v in self.seconds.items()}
        left_connected = self.connected - len(self.seconds[True])
        left_baseline = self.total - self.connected - len(self.seconds[False])
        return left_connected * mean[True] + left_baseline * mean[False]

    def finished(self, run: Run, connected: bool) -> str:
        self.done += 1
        self.seconds[connected].append(run.seconds)
        elapsed = (time.perf_counter() - self.started) / 60
        left = self.estimate_left()
        bar = "#" * round(20 * self.done / self.total)
        return (f"[{bar:<20}] {self.done}/{self.total} {run.setting} {run.condition} seed {run.seed}: "
                f"{run.metric:.1f} ({run.seconds:.0f} s); {elapsed:.1f} min so far"
                + (f", about {left / 60:.1f} min left" if left is not None else ""))

"""``pathway screen``: which donor helps my model, and is it worth a GPU run?

A short, paired probe of candidate aux models on the user's own recipe: every candidate runs beside two
placebos made from its own file (Gaussian matrices with its per-tensor norms; its matrices with their rows
permuted) and the baseline, all on the same seeds, in the ``fix`` setting (target frozen: the sharpest probe),
the ``tune`` setting (a short full fine-tune), or both; optionally per layer group (attention, MLP, all) and
aligned into the target's basis (:mod:`pathway.align`). It writes ``screen.json``, ``screen.md`` and
``screen.png`` and ranks the candidates by what they add beyond their placebos (:mod:`.report`).

A screen is a screen, not a replication: a short run on a small budget says whether a donor moves a model
more than its bare numbers do, not the size of a gain after a paper's hundreds of epochs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pathway.train.owned import claim

from .design import (
    LAYER_GROUPS,
    PLACEBOS,
    SETTINGS,
    Candidate,
    Condition,
    ScreenDesignError,
    design_conditions,
    parse_candidate,
    unalignable,
)
from .report import CONFIDENCE, compare, to_json, write
from .run import Progress, Run, train_condition
from .weights import aligned_checkpoint, placebo_checkpoint, target_init

__all__ = ["screen", "Candidate", "ScreenDesignError", "SETTINGS", "LAYER_GROUPS", "parse_candidate"]

SETTING_WORDS = {
    "fix": "target frozen; only lambda and the classifier train, the aux as loaded",
    "tune": "short full fine-tune: target, lambda and classifier train, the aux as loaded",
}


def _aux_overrides(condition: Condition, candidate: Candidate | None, files: dict[str, tuple[Path, str]],
                   seed: int) -> list[str]:
    if condition.kind == "baseline":
        return ["aux.enabled=false"]
    if condition.aux == "loaded":
        path, fmt = candidate.path, candidate.format
    elif condition.aux == "aligned":
        path, fmt = files[f"{candidate.name}+align-seed{seed}"]
    else:
        path, fmt = files[f"{candidate.name}~{condition.aux}"]
    include = LAYER_GROUPS[condition.layers]
    quoted = ", ".join("'" + p + "'" for p in include)  # YAML single quotes keep the regex's backslashes
    return [f"aux.checkpoint={path}", f"aux.checkpoint_format={fmt}"] + (
        [f"pathway.include=[{quoted}]"] if include else [])


def screen(recipe: str | Path, candidates: list[str | Candidate], *, setting: str = "fix", seeds: int | list[int] = 3,
           layers: list[str] | str = "all", overrides: list[str] | None = None, out: str | Path = "screen",
           steps: int | None = None, align: bool = False, log=print) -> dict[str, Any]:
    """Screen ``candidates`` (``NAME=PATH[:FORMAT]`` strings or :class:`Candidate`) on ``recipe``.

    Args:
        setting: ``"fix"``, ``"tune"`` or ``"both"``.
        seeds: how many (0, 1, ...) or which; every condition runs on each.
        layers: layer groups (``"all"``, ``"attn"``, ``"mlp"``; a list or comma-separated) screened side by side.
        overrides: recipe overrides (``--set``), applied to every run.
        out: a new or empty folder (or one an earlier screen wrote); runs, weights and results go there.
        steps: optimizer steps per run (``train.max_steps``); ``None``: the recipe's schedule.
        align: also screen each candidate aligned to the target's initial weights of each seed (weight matching).

    Returns the result ``screen.json`` holds (design, per-seed metrics, comparisons, ranking).
    """
    from pathway.train.config import check_data, load_recipe
    from pathway.train.demo_data import make_demo_data
    from pathway.train.model import build_adapter

    started = time.perf_counter()
    recipe_path = Path(recipe).resolve()
    settings = list(SETTINGS) if setting == "both" else [setting]
    groups = layers.split(",") if isinstance(layers, str) else list(layers)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if len(seed_list) < 2 or len(set(seed_list)) != len(seed_list):
        raise ScreenDesignError(f"--seeds: a paired interval needs 2 distinct seeds or more (got {seed_list})")
    found = [c if isinstance(c, Candidate) else parse_candidate(c) for c in candidates]
    conditions = design_conditions(found, settings, groups, align)
    by_name = {c.name: c for c in found}
    not_aligned = {c.name: why for c in found if align and (why := unalignable(c))}
    base = [*(overrides or []), *([f"train.max_steps={steps}"] if steps else [])]

    out = claim(Path(out).resolve(), "screen", fix="pass --out with a new or empty folder (or one an earlier "
                                                    "screen wrote)")
    first = load_recipe(recipe_path, base)
    if first.data.demo:
        make_demo_data(first.data.adapter, first.data.root)
    check_data(first)
    adapter = build_adapter(first)

    runs_total = len(settings) * len(seed_list) * len(conditions)
    length = (f"at most {first.train.max_steps} optimizer steps" if first.train.max_steps
              else f"the recipe's {first.train.epochs} epochs")
    log(f"screen: {len(conditions)} conditions ({', '.join(c.name for c in conditions)}) x {len(seed_list)} seeds x "
        f"{len(settings)} setting(s) = {runs_total} runs, each {length}; results in {out}"
        + (f"; not aligned: {not_aligned}" if not_aligned else ""))

    files: dict[str, tuple[Path, str]] = {}
    weights = out / "weights"
    for c in found:
        for p in PLACEBOS:
            files[f"{c.name}~{p}"] = placebo_checkpoint(first, adapter, c, p, weights)
    targets = {seed: target_init(first, adapter, seed, weights) for seed in seed_list}
    alignment: dict[str, dict[int, dict[str, Any]]] = {}
    for c in found:
        if align and c.name not in not_aligned:
            for seed in seed_list:
                path, report = aligned_checkpoint(first, adapter, c, targets[seed], seed, weights)
                files[f"{c.name}+align-seed{seed}"] = (path, "pathway")
                alignment.setdefault(c.name, {})[seed] = report
                log(f"aligned {c.name} to the target of seed {seed}: cosine {report['cosine_before']:.4f} -> "
                    f"{report['cosine_after']:.4f}")

    progress = Progress(runs_total, runs_total - len(settings) * len(seed_list))
    runs: list[Run] = []
    for name in settings:
        for seed in seed_list:
            for c in conditions:
                extra = [*base, *SETTINGS[name], f"model.checkpoint={targets[seed]}", "model.checkpoint_format=pathway",
                         *_aux_overrides(c, by_name.get(c.candidate), files, seed)]
                runs.append(train_condition(recipe_path, extra, out / "runs", name, c.name, seed))
                log(progress.finished(runs[-1], c.kind != "baseline"))

    metric = runs[0].metric_name
    design = {"recipe": str(recipe_path), "settings": settings, "setting_words": SETTING_WORDS, "seeds": seed_list,
              "layers": groups, "align": align, "steps": steps,
              "steps_note": f"each run {length}",
              "overrides": base, "candidates": {c.name: {"path": str(c.path), "format": c.format} for c in found},
              "placebos": "~gauss: the candidate's shapes, each matrix Gaussian with its norm; ~rows: each matrix's "
                          "rows permuted (its spectrum and norms, no alignment between matrices)",
              "confidence": CONFIDENCE, "not_aligned": not_aligned,
              "alignment": {k: {str(s): a for s, a in v.items()} for k, v in alignment.items()},
              "minutes": (time.perf_counter() - started) / 60}
    result = to_json(design, metric, runs, conditions, compare(runs, conditions))
    paths = write(result, out)
    for r in (r for r in result["ranking"]):
        log(f"{r['setting']} #{r['rank']} {r['candidate']}: {r['verdict']} (Bonferroni lower end against "
            f"{r['against']} {r['lower']:+.1f} points)")
    log(f"screen written: {paths['json']}, {paths['md'].name}, {paths['png'].name} ({design['minutes']:.1f} min)")
    return result

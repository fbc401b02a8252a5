"""What a screen says: paired differences, verdicts in words, a ranking, and ``screen.json``, ``screen.md``,
``screen.png``.

Every candidate arm is compared seed by seed with the baseline and with each of its placebos (and an aligned
arm with the candidate as loaded): a mean, its 95 % Student-t interval, and the Bonferroni interval over all
of a setting's comparisons (each widened to ``1 - 0.05 / k``, so all hold together at 95 %). The verdict of an
arm rests on the Bonferroni intervals:

* **helps: above its placebos**: the interval against each placebo lies above zero;
* **hurts**: the interval against the baseline lies below zero;
* **no better than its placebos**: anything else.

Arms are ranked by the lower end of their Bonferroni interval against the better placebo (the one with the
higher mean): what the candidate adds beyond its shapes, norms and spectrum, at the pessimistic end.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .design import Condition, planned_comparisons
from .paired import PairedDifference, paired_difference
from .run import Run

__all__ = ["CONFIDENCE", "VERDICTS", "Comparison", "compare", "rank", "to_json", "to_markdown", "plot"]

CONFIDENCE = 0.95
VERDICTS = ("helps: above its placebos", "no better than its placebos", "hurts")


@dataclass(frozen=True)
class Comparison:
    setting: str
    condition: str
    against: str
    difference: PairedDifference
    corrected: PairedDifference  # the same at the Bonferroni level over the setting's comparisons

    def to_dict(self) -> dict[str, Any]:
        d, k = self.difference, self.corrected
        return {"setting": self.setting, "candidate": self.condition, "against": self.against, "mean": d.mean,
                "ci95": [d.low, d.high], "ci_bonferroni": [k.low, k.high], "bonferroni_level": k.confidence,
                "per_seed": list(d.differences), "verdict": _words(k)}


def _words(d: PairedDifference) -> str:
    if not d.excludes_zero:
        return "not distinguishable from zero"
    return "higher" if d.mean > 0 else "lower"


def per_seed(runs: list[Run], setting: str, condition: str) -> dict[int, float]:
    return {r.seed: r.metric for r in runs if r.setting == setting and r.condition == condition}


def compare(runs: list[Run], conditions: list[Condition]) -> list[Comparison]:
    """Every planned comparison in every setting the runs cover."""
    pairs = planned_comparisons(conditions)
    corrected = 1 - (1 - CONFIDENCE) / len(pairs)
    found = []
    for setting in dict.fromkeys(r.setting for r in runs):
        for condition, against in pairs:
            a, b = per_seed(runs, setting, condition), per_seed(runs, setting, against)
            found.append(Comparison(setting, condition, against, paired_difference(a, b, CONFIDENCE),
                                    paired_difference(a, b, corrected)))
    return found


def _verdict(mine: list[Comparison], placebos: list[str]) -> str:
    against = {c.against: c.corrected for c in mine}
    if placebos and all(against[p].low > 0 for p in placebos):
        return VERDICTS[0]
    if against["baseline"].high < 0:
        return VERDICTS[2]
    return VERDICTS[1]


def rank(runs: list[Run], conditions: list[Condition], found: list[Comparison]) -> list[dict[str, Any]]:
    """Per setting, the candidate arms best first by the Bonferroni lower end against the better placebo."""
    ranking = []
    for setting in dict.fromkeys(c.setting for c in found):
        entries = []
        for arm in (c for c in conditions if c.tested):
            mine = [c for c in found if c.setting == setting and c.condition == arm.name]
            placebos = [p.name for p in conditions if p.kind == "placebo" and p.of == (arm.of or arm.name)]
            better = max(placebos, key=lambda p: statistics.fmean(per_seed(runs, setting, p).values()))
            against = next(c for c in mine if c.against == better)
            entries.append({"setting": setting, "candidate": arm.name, "against": better,
                            "lower": against.corrected.low, "mean": against.difference.mean,
                            "verdict": _verdict(mine, placebos)})
        entries.sort(key=lambda e: e["lower"], reverse=True)
        ranking += [{"rank": i + 1, **e} for i, e in enumerate(entries)]
    return ranking


def _condition_rows(runs: list[Run], conditions: list[Condition]) -> list[dict[str, Any]]:
    rows = []
    for setting in dict.fromkeys(r.setting for r in runs):
        for c in conditions:
            mine = sorted((r for r in runs if r.setting == setting and r.condition == c.name), key=lambda r: r.seed)
            values = [r.metric for r in mine]
            lambdas = [abs(v) for r in mine for v in r.lambdas.values()]
            folds = [r.fold_max_abs_diff for r in mine if r.fold_max_abs_diff is not None]
            rows.append({"setting": setting, "name": c.name, "kind": c.kind, "of": c.of, "candidate": c.candidate,
                         "aux": c.aux, "layers": c.layers, "seeds": [r.seed for r in mine], "per_seed": values,
                         "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "mean_abs_lambda": statistics.fmean(lambdas) if lambdas else None,
                         "fold_max_abs_diff": max(folds) if folds else None,
                         "parameters": sorted({r.parameters for r in mine}),
                         "seconds": sum(r.seconds for r in mine)})
    return rows


def to_json(design: dict[str, Any], metric: str, runs: list[Run], conditions: list[Condition],
            found: list[Comparison]) -> dict[str, Any]:
    """The screen's whole result, as ``screen.json`` holds it and the API returns it."""
    return {"design": design, "metric": metric, "conditions": _condition_rows(runs, conditions),
            "comparisons": [c.to_dict() for c in found], "ranking": rank(runs, conditions, found)}


def _points(x: float) -> str:
    return f"{x:+.1f}"


def to_markdown(result: dict[str, Any]) -> str:
    """Tables per setting: conditions, paired differences, ranking with verdicts."""
    d = result["design"]
    lines = [f"# Screen of {', '.join(d['candidates'])} on `{d['recipe']}`", "",
             f"Metric: {result['metric']} on the held-out split after the last step; seeds "
             f"{', '.join(map(str, d['seeds']))} shared by every condition; {d['steps_note']}. Placebos: "
             f"{d['placebos']}.", ""]
    for setting in d["settings"]:
        rows = [c for c in result["conditions"] if c["setting"] == setting]
        comps = [c for c in result["comparisons"] if c["setting"] == setting]
        ranking = [r for r in result["ranking"] if r["setting"] == setting]
        level = 100 * comps[0]["bonferroni_level"] if comps else 100.0
        lines += [f"## {setting}: {d['setting_words'][setting]}", "",
                  "| condition | kind | mean +- std | per seed | mean abs lambda | max abs(folded - connected) |",
                  "|---|---|---|---|---|---|"]
        for c in rows:
            lam = "-" if c["mean_abs_lambda"] is None else f"{c['mean_abs_lambda']:.4f}"
            fold = "-" if c["fold_max_abs_diff"] is None else f"{c['fold_max_abs_diff']:.1e}"
            lines.append(f"| {c['name']} | {c['kind']} | {c['mean']:.1f} +- {c['std']:.1f} | "
                         f"{', '.join(f'{v:.1f}' for v in c['per_seed'])} | {lam} | {fold} |")
        lines += ["", f"| paired difference (points) | mean | 95 % CI | {level:.1f} % CI (Bonferroni) | per seed | "
                      "Bonferroni verdict |", "|---|---|---|---|---|---|"]
        for c in comps:
            lines.append(f"| {c['candidate']} - {c['against']} | {_points(c['mean'])} | "
                         f"[{_points(c['ci95'][0])}, {_points(c['ci95'][1])}] | "
                         f"[{_points(c['ci_bonferroni'][0])}, {_points(c['ci_bonferroni'][1])}] | "
                         f"{', '.join(_points(x) for x in c['per_seed'])} | {c['verdict']} |")
        lines += ["", "| rank | candidate | better placebo | mean over it | Bonferroni lower end | verdict |",
                  "|---|---|---|---|---|---|"]
        for r in ranking:
            lines.append(f"| {r['rank']} | {r['candidate']} | {r['against']} | {_points(r['mean'])} | "
                         f"{_points(r['lower'])} | **{r['verdict']}** |")
        lines.append("")
    if d.get("not_aligned"):
        lines += ["Not aligned: " + "; ".join(f"{k}: {v}" for k, v in d["not_aligned"].items()), ""]
    if d.get("alignment"):
        lines += ["Alignment (weight matching to each seed's target): " + "; ".join(
            f"{name} seed {seed}: cosine {a['cosine_before']:.4f} -> {a['cosine_after']:.4f}"
            for name, per in d["alignment"].items() for seed, a in per.items()), ""]
    lines += [f"Time: {result['design']['minutes']:.1f} min.", ""]
    return "\n".join(lines)


COLORS = {"baseline": "#888888", "candidate": "#1f77b4", "placebo": "#bbbbbb"}


def plot(result: dict[str, Any], path: Path) -> Path:
    """One PNG, a row per setting: the metric per condition with per-seed points and lines (the pairing), and
    every paired difference with its 95 % (thick) and Bonferroni (thin) interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = result["design"]["settings"]
    names = list(dict.fromkeys(c["name"] for c in result["conditions"]))
    fig, axes = plt.subplots(len(settings), 2, figsize=(max(12, 1.1 * len(names) + 8), 4.8 * len(settings)),
                             squeeze=False)
    for row, setting in zip(axes, settings):
        rows = [c for c in result["conditions"] if c["setting"] == setting]
        ax = row[0]
        for i, c in enumerate(rows):
            color = "#2ca02c" if c["aux"] == "aligned" else COLORS[c["kind"]]
            ax.bar(i, c["mean"], color=color, alpha=0.7)
            ax.scatter([i] * len(c["per_seed"]), c["per_seed"], color="black", s=12, zorder=3)
        for k in range(len(rows[0]["per_seed"])):
            ax.plot(range(len(rows)), [c["per_seed"][k] for c in rows], color="black", lw=0.5, alpha=0.35)
        values = [v for c in rows for v in c["per_seed"]]
        ax.set_ylim(max(0.0, min(values) - 5), min(100.0, max(values) + 3))
        ax.set_xticks(range(len(rows)), [c["name"] for c in rows], rotation=30, ha="right")
        ax.set_ylabel(result["metric"])
        ax.set_title(f"{setting}: per condition (bar: mean; dots and lines: seeds)")
        ax = row[1]
        comps = [c for c in result["comparisons"] if c["setting"] == setting]
        for i, c in enumerate(comps):
            color = "#d62728" if c["against"] == "baseline" else "#1f77b4"
            ax.plot(c["ci_bonferroni"], [i, i], color=color, lw=1, alpha=0.5)
            ax.errorbar(c["mean"], i, xerr=[[c["mean"] - c["ci95"][0]], [c["ci95"][1] - c["mean"]]], fmt="o",
                        color=color, capsize=4, lw=2)
            ax.scatter(c["per_seed"], [i] * len(c["per_seed"]), color="black", s=8, zorder=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(comps)), [f"{c['candidate']} - {c['against']}" for c in comps], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("paired difference (points)")
        ax.set_title(f"{setting}: paired differences, 95 % CI (thick), Bonferroni (thin)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write(result: dict[str, Any], folder: Path) -> dict[str, Path]:
    """``screen.json``, ``screen.md`` and ``screen.png`` in ``folder``."""
    paths = {"json": folder / "screen.json", "md": folder / "screen.md", "png": folder / "screen.png"}
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["md"].write_text(to_markdown(result))
    plot(result, paths["png"])
    return paths

"""What a screen runs: its candidates, their placebos, the settings, the layer groups, and the comparisons.

A candidate donor is worth a GPU run only if it beats what its bare numbers would do: the **placebos** are
the candidate's own shapes as Gaussian matrices with its per-tensor norms (no pretrained knowledge, no
pretrained spectrum) and the candidate with each matrix's rows permuted (its exact spectrum and norms, no
alignment between matrices). Every condition, the baseline (no aux) included, runs on the same seeds, so
every comparison is paired seed by seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pathway.errors import PathwayError

__all__ = ["PLACEBOS", "LAYER_GROUPS", "SETTINGS", "Candidate", "Condition", "ScreenDesignError",
           "parse_candidate", "design_conditions", "planned_comparisons", "unalignable"]

PLACEBOS = {"gauss": "random", "rows": "rows"}   # placebo suffix -> perturbation kind (pathway.screen.aux)
LAYER_GROUPS = {"all": (), "attn": (r"\.attn\.",), "mlp": (r"\.mlp\.",)}  # pathway.include patterns
SETTINGS = {
    # the target frozen, lambda and the classifier train, the aux as loaded: the sharpest probe, since a pathway
    # can change the features only through W + lambda * W_aux
    "fix": ("pathway.freeze_target=true", "pathway.train_aux=false"),
    # a short full fine-tune: the target, lambda and the classifier train, the aux as loaded
    "tune": ("pathway.freeze_target=false", "pathway.train_aux=false"),
}


class ScreenDesignError(PathwayError):
    """A screen's arguments do not make a design (a malformed candidate, an unknown setting or layer group)."""


@dataclass(frozen=True)
class Candidate:
    """A donor: anything a recipe's ``aux.checkpoint`` takes, with its ``aux.checkpoint_format``."""

    name: str
    path: Path
    format: str = "auto"

    def overrides(self) -> list[str]:
        return [f"aux.checkpoint={self.path}", f"aux.checkpoint_format={self.format}"]


def parse_candidate(spec: str) -> Candidate:
    """``NAME=PATH`` or ``NAME=PATH:FORMAT`` (the format as ``aux.checkpoint_format`` takes it)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ScreenDesignError(f"--candidate {spec!r}: write NAME=PATH or NAME=PATH:FORMAT, e.g. "
                                f"--candidate minilm=/models/minilm:transformers")
    if not all(c.isalnum() or c in "-_." for c in name) or name == "baseline":
        raise ScreenDesignError(f"--candidate {spec!r}: the name {name!r} must be letters, digits, '-', '_' or '.' "
                                f"and not 'baseline' (it names files and table rows)")
    path, fmt = rest, "auto"
    head, colon, tail = rest.rpartition(":")
    if colon and head and "/" not in tail and not Path(rest).exists():
        path, fmt = head, tail
    if not Path(path).exists():
        raise ScreenDesignError(f"--candidate {name}: {path} does not exist (give a checkpoint file, a Hugging Face "
                                f"folder or an engine run's model.safetensors)")
    return Candidate(name, Path(path).resolve(), fmt)


def unalignable(candidate: Candidate) -> str | None:
    """Why ``align`` cannot be applied to this candidate (``None``: it can)."""
    if candidate.format == "transformers":
        return ("a Hugging Face model in another codebase's layout (separate q, k, v Linears, post-norm); "
                "pathway.align permutes timm-style blocks (fused qkv, proj, fc1, fc2, norm1, norm2)")
    return None


@dataclass(frozen=True)
class Condition:
    """One arm of the screen: the baseline, a candidate (as loaded or aligned) or one of its placebos."""

    name: str
    kind: str                  # "baseline" | "candidate" | "placebo"
    of: str | None = None      # the candidate a placebo stands in for, or that an aligned one is a version of
    candidate: str | None = None
    aux: str = "none"          # "none" | "loaded" | "aligned" | a PLACEBOS key
    layers: str = "all"        # a LAYER_GROUPS key

    @property
    def tested(self) -> bool:
        """A candidate arm: compared with the baseline and its placebos, and ranked."""
        return self.kind == "candidate"


def _check(settings: list[str], layers: list[str]) -> None:
    for s in settings:
        if s not in SETTINGS:
            raise ScreenDesignError(f"--setting {s!r} is not one of {[*SETTINGS, 'both']}")
    for group in layers:
        if group not in LAYER_GROUPS:
            raise ScreenDesignError(f"--layers {group!r} is not one of {list(LAYER_GROUPS)} (comma-separated)")
    if len(set(layers)) != len(layers) or not layers:
        raise ScreenDesignError(f"--layers {','.join(layers)}: name each of {list(LAYER_GROUPS)} once at most")


def design_conditions(candidates: list[Candidate], settings: list[str], layers: list[str],
                      align: bool) -> list[Condition]:
    """The baseline, then per candidate and layer group: the candidate, aligned (with ``align``, where it can
    be), and its two placebos. Condition names: ``NAME``, ``NAME+align``, ``NAME~gauss``, ``NAME~rows``, with
    ``@GROUP`` when the group is not ``all``."""
    _check(settings, layers)
    names = [c.name for c in candidates]
    if not candidates or len(set(names)) != len(names):
        raise ScreenDesignError(f"give one --candidate or more, each name once (got {names})")
    found = [Condition("baseline", "baseline")]
    for c in candidates:
        for group in layers:
            at = "" if group == "all" else f"@{group}"
            found.append(Condition(f"{c.name}{at}", "candidate", None, c.name, "loaded", group))
            if align and unalignable(c) is None:
                found.append(Condition(f"{c.name}+align{at}", "candidate", f"{c.name}{at}", c.name, "aligned", group))
            found += [Condition(f"{c.name}~{p}{at}", "placebo", f"{c.name}{at}", c.name, p, group) for p in PLACEBOS]
    return found


def planned_comparisons(conditions: list[Condition]) -> list[tuple[str, str]]:
    """(condition, against) pairs: every candidate arm against the baseline and its two placebos; an aligned
    arm also against the candidate as loaded. The Bonferroni correction runs over all of them."""
    pairs = []
    for c in conditions:
        if not c.tested:
            continue
        unaligned = c.of or c.name
        pairs += [(c.name, "baseline")] + [(c.name, p.name) for p in conditions
                                           if p.kind == "placebo" and p.of == unaligned]
        if c.aux == "aligned":
            pairs.append((c.name, unaligned))
    return pairs

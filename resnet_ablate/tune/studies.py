"""What a study is: which configurations of a grid are tuned, what a trial trains, the grid with
tuned values, and which trial is best.

Plain data and rules only (no Optuna, no MLflow), so the report and the CLI can use them
without the trainer.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import (
    Cell,
    CellConfig,
    FloatRange,
    Grid,
    TuneSpec,
    expand,
    key_fields,
)
from ..errors import UserError

METRIC = "val_err"
OBJECTIVE = "final val_err (%) after the trial's last epoch"
DIVERGED_SCORE = 100.0
#: Trial statuses that count toward a study's budget (Optuna COMPLETE or PRUNED).
FINISHED = ("complete", "pruned", "diverged")
#: Finished trials with a score Optuna was told (a pruned trial has none).
SCORED = ("complete", "diverged")

TAG_TRIAL = "ablate.trial"
TAG_STUDY = "ablate.study"
TAG_SUGGESTED = "ablate.suggested"
TAG_CELLS = "ablate.cells"
TAG_BUDGET = "ablate.trials_budget"
TAG_FINISHED = "ablate.trials_finished"
TAG_BEST_TRIAL = "ablate.best_trial"
TAG_BEST_VALUES = "ablate.best_values"


@dataclass(frozen=True)
class Target:
    """One study: a configuration of the grid (its cells at every seed) and its trials' base."""

    study: str  # Optuna study name, tune:<grid>:<key>
    key: str  # hash of what a trial computes (tuned fields left out) and the search
    label: str  # the configuration: `plain-56 basic post`
    base: Cell  # what a trial trains before the suggested values: first seed, trial epochs
    cells: tuple[Cell, ...]  # the grid's cells that take this study's values


def tune_spec(grid: Grid) -> TuneSpec:
    """The grid's tune section, or a UserError saying how to add one."""
    if grid.spec.tune is None:
        raise UserError(
            f"{grid.path}: has no tune: section; add one (params, trials, epochs) to tune "
            f"this grid, see experiments/smoke-tune.yaml"
        )
    return grid.spec.tune


def study_key(config: CellConfig, spec: TuneSpec) -> str:
    """Short stable hash of a trial's base configuration (tuned fields left out) and search."""
    flat = {k: v for k, v in key_fields(config).items() if k not in spec.params}
    search = spec.model_dump(mode="json", include={"params", "sampler", "pruner"})
    blob = json.dumps(
        {"config": flat, "search": search}, sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def targets(grid: Grid) -> list[Target]:
    """One target per configuration of the grid (cells equal but for the seed), in grid order."""
    spec = tune_spec(grid)
    groups: dict[str, list[Cell]] = {}
    for cell in grid.cells:
        unseeded = Cell(cell.config.model_copy(update={"seed": 0})).key
        groups.setdefault(unseeded, []).append(cell)
    found = []
    for cells in groups.values():
        first = cells[0]
        epochs = spec.epochs or first.config.train.epochs
        train = first.config.train.model_copy(update={"epochs": epochs})
        config = first.config.model_copy(update={"train": train})
        key = study_key(config, spec)
        found.append(
            Target(
                study=f"tune:{grid.name}:{key}",
                key=key,
                label=first.name.untuned().config,
                base=Cell(config=config, varying=first.varying),
                cells=tuple(cells),
            )
        )
    return found


def with_values(config: CellConfig, values: Mapping[str, Any]) -> CellConfig:
    """The configuration with tuned train.* values substituted (validated again)."""
    train = config.train.model_dump()
    for name, value in values.items():
        train[name.split(".", 1)[1]] = value
    return CellConfig.model_validate({**config.model_dump(), "train": train})


def tuned_grid(grid: Grid, best: Mapping[str, Mapping[str, Any]]) -> Grid:
    """The grid with every cell given its study's best values (`best`: study key -> values)."""
    replaced: dict[str, Cell] = {}
    for target in targets(grid):
        for cell in target.cells:
            config = with_values(cell.config, best[target.key])
            replaced[cell.key] = Cell(config=config, varying=cell.varying, tuned=True)
    return replace(grid, cells=tuple(replaced[c.key] for c in grid.cells))


def default_grid(grid: Grid) -> Grid:
    """The grid with its default settings: itself, or the cells `tuned_grid` started from."""
    if not any(cell.tuned for cell in grid.cells):
        return grid
    raw = grid.spec.model_dump(mode="python")
    return expand(raw, grid.path, sliced=True)


# --------------------------------------------------------------------------------------------
# The best trial: one rule for `ablate tune`, `run --tuned` and the report.


@dataclass(frozen=True)
class TrialScore:
    """A trial as the best-trial rule sees it, from Optuna's storage or from its MLflow run."""

    number: int
    status: str  # running, complete, pruned, diverged, failed or killed
    score: float  # the objective; NaN when it has none
    values: Mapping[str, Any] = field(default_factory=dict)


def best_trial(trials: Iterable[TrialScore], budget: int) -> TrialScore | None:
    """The trial whose values a study hands on: among its first `budget` finished trials (in
    trial order), the complete or diverged one with the lowest score, the earliest on a tie.
    Counting only the first `budget` keeps a study tuned further under a larger budget
    comparable with the others when the budget is lowered again."""
    finished = sorted((t for t in trials if t.status in FINISHED), key=lambda t: t.number)
    scored = [t for t in finished[:budget] if t.status in SCORED and not math.isnan(t.score)]
    return min(scored, key=lambda t: (t.score, t.number), default=None)


# --------------------------------------------------------------------------------------------
# Words.


def describe_space(spec: TuneSpec) -> dict[str, str]:
    """`{"train.lr": "log-uniform 0.01 to 0.3", "train.weight_decay": "one of 0.0001, 0.0005"}`."""
    out = {}
    for name, space in spec.params.items():
        if isinstance(space, FloatRange):
            kind = "log-uniform" if space.log else "uniform"
            out[name] = f"{kind} {space.low:g} to {space.high:g}"
        else:
            out[name] = "one of " + ", ".join(_short(c) for c in space.choices)
    return out


def describe_method(spec: TuneSpec, epochs: Sequence[int]) -> str:
    """`TPE sampler, median pruner, 2-epoch trials, scored by final val_err`."""
    sampler = {"tpe": "TPE sampler", "random": "random sampler"}[spec.sampler]
    pruner = {"median": "median pruner on val_err per epoch", "none": "no pruning"}[spec.pruner]
    spans = sorted(set(epochs))
    length = "-".join(map(str, spans[:1])) if len(spans) == 1 else "/".join(map(str, spans))
    return f"{sampler}, {pruner}, {length}-epoch trials, scored by final val_err"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def values_text(values: Mapping[str, Any]) -> str:
    """`train.lr=0.0712, train.weight_decay=0.0005`."""
    return ", ".join(f"{k}={_short(v)}" for k, v in values.items())


def settings_text(
    spec: TuneSpec, found: Sequence[Target], best: Mapping[str, Mapping[str, Any]]
) -> str:
    """`tuned: best of 8 trials (train.lr=0.071; TPE sampler, ...)` for the ablate.settings tag.

    With several configurations the values differ per cell: they are in each run's params and
    in the report, and the text names the fields instead.
    """
    method = describe_method(spec, [t.base.config.train.epochs for t in found])
    if len(found) == 1:
        chosen = values_text(best[found[0].key])
        return f"tuned: best of {spec.trials} trials ({chosen}; {method})"
    fields = ", ".join(spec.params)
    return f"tuned: best of {spec.trials} trials per configuration ({fields}; {method})"

"""A grid against its record: every cell with its state in MLflow (new, running, finished,
diverged, failed or killed), for `ablate ls`, `ablate run --dry-run` and the runner's skip and
resume. Reads the store only; imports no trainer, so listing a grid stays quick.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from . import tracking
from .config import Cell, Grid


@dataclass
class PlanRow:
    """A cell of the grid and its state in the record (`new` when it has no run yet)."""

    cell: Cell
    status: str
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)


def plan(grid: Grid, store: tracking.Store, experiment_id: str) -> list[PlanRow]:
    """Every cell with its state in the record (new when it has no run yet)."""
    runs = tracking.cell_runs(store, experiment_id)
    rows = []
    for cell in grid.cells:
        run = runs.get(cell.key)
        rows.append(
            PlanRow(
                cell=cell,
                status=tracking.cell_status(run),
                run_id=run.info.run_id if run else None,
                metrics=dict(run.data.metrics) if run else {},
            )
        )
    return rows


def states(grid: Grid, store: tracking.Store | None) -> list[PlanRow]:
    """The plan, or every cell `new` when there is no store or no experiment yet."""
    found = tracking.find_experiment(store, grid.name) if store is not None else None
    if store is None or found is None:
        return [PlanRow(cell=cell, status="new", run_id=None) for cell in grid.cells]
    return plan(grid, store, found.experiment_id)


@dataclass(frozen=True)
class OtherSettings:
    """Finished runs in the grid's experiment made with other `--set` overrides than the grid's
    (`overrides` empty: the grid file as written)."""

    overrides: tuple[str, ...]
    runs: int

    def command(self, verb: str, grid: Grid) -> str:
        """The command that shows them: `ablate ls quick.yaml --set train.epochs=8`."""
        sets = "".join(f" --set {shlex.quote(o)}" for o in self.overrides)
        return f"ablate {verb} {shlex.quote(str(grid.path))}{sets}"

    def describe(self) -> str:
        if not self.overrides:
            return f"{self.runs} finished run(s) of the grid file as written (no --set)"
        sets = " ".join(f"--set {shlex.quote(o)}" for o in self.overrides)
        return f"{self.runs} finished run(s) made with {sets}"


def other_settings(grid: Grid, store: tracking.Store | None) -> list[OtherSettings]:
    """Finished cell runs of the grid's experiment outside this grid, made with other
    overrides, grouped by them (runs from an earlier version of the grid file, with the same
    overrides, are not counted: the report lists those itself)."""
    found = tracking.find_experiment(store, grid.name) if store is not None else None
    if store is None or found is None:
        return []
    keys = {cell.key for cell in grid.cells}
    groups: dict[tuple[str, ...], int] = {}
    for key, run in tracking.cell_runs(store, found.experiment_id).items():
        overrides = tracking.tag_overrides(run)
        if key in keys or tracking.cell_status(run) not in tracking.DONE:
            continue
        if overrides != grid.overrides:
            groups[overrides] = groups.get(overrides, 0) + 1
    return [OtherSettings(overrides, n) for overrides, n in sorted(groups.items())]

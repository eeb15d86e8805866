"""A grid against its record: every cell with its state in MLflow (new, running, finished,
diverged, failed or killed), for `ablate ls`, `ablate run --dry-run` and the runner's skip and
resume. Reads the store only; imports no trainer, so listing a grid stays quick.
"""

from __future__ import annotations

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

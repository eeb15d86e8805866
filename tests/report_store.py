"""Real SQLite MLflow stores, filled through tracking.py with curves we choose, for report tests."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resnet_ablate import tracking
from resnet_ablate.bench.report import synthetic_curves, synthetic_grad_flow, write_cell
from resnet_ablate.config import Cell, Grid, load_grid

PROVENANCE = {
    "ablate.git_commit": "0123abc4567def",
    "ablate.torch_version": "2.14.1",
    "ablate.device": "cpu",
    "ablate.precision": "bf16",
}


@dataclass(frozen=True)
class Plan:
    """What one cell's run shows: its final errors, how it ended, and how far it got."""

    final_train: float
    final_test: float
    status: str = "finished"
    reason: str = ""
    epochs: int | None = None  # epochs logged; default: all
    grad_flow: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


def make_grid(
    folder: Path,
    name: str,
    axes: Mapping[str, list[Any]],
    *,
    data: str = "synthetic",
    epochs: int = 8,
    seeds: tuple[int, ...] = (0, 1, 2),
    description: str = "",
    tags: Mapping[str, str] | None = None,
) -> Grid:
    """A grid file on disk (so load_grid validates it as a user's would), loaded."""
    import yaml

    spec = {
        "name": name,
        "description": description,
        "tags": dict(tags or {}),
        "base": {
            "data": {"name": data},
            "model": {"block": "basic", "order": "post"},
            "train": {"epochs": epochs},
        },
        "grid": {k: list(v) for k, v in axes.items()},
        "seeds": list(seeds),
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return load_grid(path)


def populate(store: tracking.Store, grid: Grid, plan: Callable[[Cell], Plan | None]) -> None:
    """Write a run for every cell that `plan` gives a Plan (None: the cell stays new)."""
    rng = np.random.default_rng(0)
    experiment_id = store.experiment_id(grid.name, grid.spec.description)
    parent = tracking.grid_run_id(store, experiment_id, grid, PROVENANCE)
    for cell in grid.cells:
        p = plan(cell)
        if p is None:
            continue
        m = cell.config.model
        epochs = cell.config.train.epochs
        curves = synthetic_curves(p.final_train, p.final_test, epochs, rng)
        # Land exactly on the planned finals: the tests compare them with the report.
        curves["train_err"][-1], curves["test_err"][-1] = p.final_train, p.final_test
        logged = epochs if p.epochs is None else p.epochs
        curves = {k: v[:logged] for k, v in curves.items()}
        if p.status == "diverged":
            curves["train_err"][-1] = float("nan")
        flow = synthetic_grad_flow(m.depth, m.shortcut, epochs) if p.grad_flow else None
        write_cell(
            store,
            experiment_id,
            parent,
            cell,
            curves,
            status=p.status,
            reason=p.reason,
            params=1000.0 * m.depth,
            macs=2.0e6 * m.depth,
            grad_flow=flow,
            provenance=PROVENANCE,
        )

"""The live view of a grid run or tune: cells (or trials) done, each worker's epoch, ETA."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .tracking import DONE

if TYPE_CHECKING:
    from rich.console import Console

    from .config import Cell, Grid
    from .runner import PlanRow

STYLE = {"finished": "green", "diverged": "yellow", "failed": "red", "killed": "magenta"}


def _cost(cell: Cell) -> float:
    """Relative work of one epoch of a cell (forward MACs scale with depth and width squared)."""
    m = cell.config.model
    return m.depth * (m.width / 16) ** 2 * (cell.config.data.resize or 32) ** 2 / 1024


class GridProgress:
    """Rich progress for a grid run; `update(event)` takes the workers' events.

    The grid's bar and ETA follow epoch-weighted work (a depth-56 epoch counts more than a
    depth-20 one), so the estimate holds across a grid of unequal cells.
    """

    def __init__(
        self,
        console: Console,
        grid: Grid,
        rows: list[PlanRow],
        *,
        noun: str = "cells",
        done_states: Collection[str] = DONE,
    ):
        self.console = console
        self.noun, self.done_states = noun, frozenset(done_states)
        self.cells = {row.cell.key: row.cell for row in rows}
        self.done = sum(row.status in self.done_states for row in rows)
        self.total = len(rows)
        pending = [row.cell for row in rows if row.status not in self.done_states]
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            TextColumn("{task.fields[count]}"),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        work = sum(_cost(c) * c.config.train.epochs for c in pending)
        self.overall: TaskID = self.progress.add_task(
            f"[bold]{grid.name}[/]", total=work or 1.0, count=self._count(), note=""
        )
        self.workers: dict[int, TaskID] = {}

    def _count(self) -> str:
        return f"{self.done}/{self.total} {self.noun}"

    def __enter__(self) -> GridProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "start":
            _, worker, key, label, epochs = event
            if worker not in self.workers:
                self.workers[worker] = self.progress.add_task("", count="", note="")
            self.progress.reset(
                self.workers[worker],
                total=epochs,
                description=f"  w{worker} {label}",
                count=f"epoch 0/{epochs}",
                note="",
            )
        elif kind == "epoch":
            _, worker, key, epoch, train_err = event
            task = self.workers[worker]
            total = self.progress.tasks[task].total
            self.progress.advance(self.overall, _cost(self.cells[key]))
            self.progress.update(
                task,
                completed=epoch,
                count=f"epoch {epoch}/{total:.0f}",
                note=f"train err {train_err:5.1f}%",
            )
        elif kind == "skip":  # epochs that will not run (a pruned trial): their work is done
            _, worker, key, epochs = event
            self.progress.advance(self.overall, _cost(self.cells[key]) * epochs)
        elif kind == "end":
            _, worker, key, status, reason = event
            if status in self.done_states:
                self.done += 1
                self.progress.update(self.overall, count=self._count())
            style = STYLE.get(status, "white")
            note = f": {reason}" if reason else ""
            self.console.log(f"[{style}]{status}[/] {self.cells[key].label}{note}")
        elif kind == "crash":
            self.console.log(f"[red]worker {event[1]} crashed:[/] {event[2]}")

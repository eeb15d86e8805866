"""The live view of a grid run or tune: cells (or trials) done, each worker's epoch, ETA.

It reads the workers' events (``events.py``) and nothing else: it knows neither the runner nor
the tuner, only the cells whose work is pending.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .config import Cell
from .events import Crashed, Ended, Epoch, Event, Skipped, Started

STYLE = {"finished": "green", "diverged": "yellow", "failed": "red", "killed": "magenta"}


def _cost(cell: Cell) -> float:
    """Relative work of one epoch of a cell (forward MACs scale with depth and width squared)."""
    m = cell.config.model
    return m.depth * (m.width / 16) ** 2 * (cell.config.data.resize or 32) ** 2 / 1024


class GridProgress:
    """Rich progress for a grid run; `update(event)` takes the workers' events.

    `pending` holds one cell per training still to run (a study's base cell once per trial
    left); `done` of `total` are done already, and a training that ends in one of
    `done_states` adds one. The bar and ETA follow epoch-weighted work (a depth-56 epoch counts
    more than a depth-20 one), so the estimate holds across a grid of unequal cells.
    """

    def __init__(
        self,
        console: Console,
        title: str,
        pending: Sequence[Cell],
        *,
        done: int,
        total: int,
        done_states: Collection[str],
        noun: str = "cells",
    ):
        self.console = console
        self.noun, self.done_states = noun, frozenset(done_states)
        self.cells = {cell.key: cell for cell in pending}
        self.done, self.total = done, total
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
            f"[bold]{escape(title)}[/]", total=work or 1.0, count=self._count(), note=""
        )
        self.workers: dict[int, TaskID] = {}

    def add(self, pending: Sequence[Cell], *, total: int) -> None:
        """More cells to train (the next round of seeds), and the grid's new total of cells."""
        self.cells.update((cell.key, cell) for cell in pending)
        self.total = total
        work = sum(_cost(c) * c.config.train.epochs for c in pending)
        task = self.progress.tasks[self.overall]
        self.progress.update(self.overall, total=(task.total or 0.0) + work, count=self._count())

    def _count(self) -> str:
        return f"{self.done}/{self.total} {self.noun}"

    def __enter__(self) -> GridProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, event: Event) -> None:
        if isinstance(event, Started):
            self._started(event)
        elif isinstance(event, Epoch):
            task = self.workers[event.worker]
            total = self.progress.tasks[task].total
            self.progress.advance(self.overall, _cost(self.cells[event.key]))
            self.progress.update(
                task,
                completed=event.epoch,
                count=f"epoch {event.epoch}/{total:.0f}",
                note=f"train err {event.train_err:5.1f}%",
            )
        elif isinstance(event, Skipped):
            self.progress.advance(self.overall, _cost(self.cells[event.key]) * event.epochs)
        elif isinstance(event, Ended):
            if event.status in self.done_states:
                self.done += 1
                self.progress.update(self.overall, count=self._count())
            style = STYLE.get(event.status, "white")
            note = f": {escape(event.note)}" if event.note else ""
            self.console.log(f"[{style}]{event.status}[/] {escape(event.label)}{note}")
        elif isinstance(event, Crashed):
            self.console.log(f"[red]worker {event.worker} crashed:[/] {escape(event.error)}")

    def _started(self, event: Started) -> None:
        if event.worker not in self.workers:
            self.workers[event.worker] = self.progress.add_task("", count="", note="")
        self.progress.reset(
            self.workers[event.worker],
            total=event.epochs,
            description=f"  w{event.worker} {escape(event.label)}",
            count=f"epoch 0/{event.epochs}",
            note="",
        )

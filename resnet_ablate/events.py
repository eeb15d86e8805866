"""What a worker tells the parent while it trains: one small frozen dataclass per kind of event.

Workers (in the parent's process, or spawned processes that send them through a queue) emit
these; the parent's pool hands each to the outcome (``engine.Outcome.record``) and to the
display (``progress.GridProgress.update``), which read their fields by name. Events are plain
data and picklable; nothing here imports anything heavy.

A training emits ``Started``, then one ``Epoch`` per epoch (resumed epochs included), then
``Skipped`` if it stopped early (a pruned trial: its remaining epochs will not run) and
``Ended``. ``Crashed`` is a worker dying outside any training; ``Exited`` is the pool's own
signal that a worker process has finished.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Started:
    """A training began (or resumed) on a worker."""

    worker: int
    key: str  # the cell's key (a trial: its study's base cell), what its work is measured by
    label: str  # as the display shows it: `plain-56 basic post s0`, `plain-56 ... trial 3`
    epochs: int


@dataclass(frozen=True)
class Epoch:
    """An epoch is done (and recorded)."""

    worker: int
    key: str
    epoch: int
    train_err: float  # %


@dataclass(frozen=True)
class Skipped:
    """Epochs that will not run (a training stopped early): their share of the work is done."""

    worker: int
    key: str
    epochs: int


@dataclass(frozen=True)
class Ended:
    """A training ended: finished, diverged, complete, pruned, failed or killed."""

    worker: int
    key: str
    label: str
    status: str
    note: str = ""  # why it ended that way, or what it reached (a trial's values and score)


@dataclass(frozen=True)
class Crashed:
    """A worker died outside any training; the other workers go on."""

    worker: int
    error: str


@dataclass(frozen=True)
class Exited:
    """A worker process has finished (the pool's own bookkeeping; never shown)."""

    worker: int


Event = Started | Epoch | Skipped | Ended | Crashed | Exited
Emit = Callable[[Event], None]

"""Run a grid: plan it against MLflow, queue what is left, let the engine's workers train it.

A rerun of a grid trains only what is not done: finished and diverged cells are skipped, an
interrupted cell resumes from its checkpoint in the same MLflow run. Workers are processes
pulling cells from the grid's queue (``cellqueue.py``), so several workers, several ``ablate
run`` at once, or several machines sharing a ``--queue`` database never train a cell twice.

``run_grid`` plans, then runs one *round*: ``run_round`` enqueues cells and works the queue
until it is empty. With ``seeds: {min, max}`` (``rounds.py``) it then replays the rounds from
the record and runs the next one (one more seed for the configurations of every comparison still
open) into the same outcome and display, until the verdicts are decided or at the maximum.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from mlflow.entities import Run
from rich.console import Console

from . import tracking
from .cellqueue import CellQueue, Claim, heartbeat_seconds, host_name, storage_for
from .config import Cell, Grid
from .databases import check_urls
from .engine import (
    RESUMES,
    Job,
    Outcome,
    RunOptions,
    Session,
    Worker,
    WorkerContext,
    check_data,
    close_session,
    contexts,
    continues,
    dataset_record_for,
    invocation_status,
    open_session,
    recording_the_end,
    remove_checkpoint,
    run_pool,
    train_tracked,
)
from .events import Emit
from .plan import PlanRow, plan, states
from .preflight import check_results_dir
from .progress import GridProgress
from .rounds import Rounds, grid_rounds

#: How often a run waits for cells of its round that train elsewhere before the next round.
ROUND_POLL_SECONDS = 5.0


def checkpoint_path(results: Path, grid: Grid, cell: Cell) -> Path:
    """Where a cell's trainer keeps its resumable state while the cell runs."""
    return results / "checkpoints" / grid.name / f"{cell.key}.pt"


def queue_name(grid: Grid) -> str:
    """The Optuna study that holds the grid's queue of cells."""
    return f"cells:{grid.name}"


def grid_queue(session: Session) -> CellQueue:
    """The grid's cell queue in its Optuna storage (journal file, or the --queue database)."""
    options = session.options
    storage = storage_for(options.queue, options.results, session.grid.name)
    return CellQueue(storage, queue_name(session.grid))


# --------------------------------------------------------------------------------------------
# One worker: claim a cell, train it, record it, repeat.


def cell_job(session: Session, cell: Cell, existing: Run | None) -> Job:
    """A cell as the engine trains it: into its own run (or the interrupted one, resumed)."""
    tags = {tracking.TAG_SETTINGS: session.options.settings, tracking.TAG_HOST: host_name()}
    return Job(
        key=cell.key,
        label=cell.label,
        config=cell.config,
        run=tracking.cell_run_spec(cell, session.parent_id, tags, session.grid.overrides),
        resume=existing.info.run_id if existing is not None else None,
        checkpoint=checkpoint_path(session.options.results, session.grid, cell),
        grid_file=session.grid.path,
    )


def continuable(worker: Worker, session: Session, cell: Cell, existing: Run | None) -> Run | None:
    """The cell's unfinished run if this machine holds its checkpoint, to be continued; else
    None, and a partial run is set aside: the cell starts again in a new run. A cell whose
    worker died elsewhere thus ends as one training, never two spliced into one history."""
    if existing is None:
        return None
    checkpoint = checkpoint_path(session.options.results, session.grid, cell)
    if continues(checkpoint, existing.info.run_id):
        return existing
    reason = f"set aside: {host_name()} restarted the cell (no checkpoint of this run there)"
    tracking.supersede_run(worker.store, existing.info.run_id, reason)
    remove_checkpoint(checkpoint)
    return None


def claim_next(queue: CellQueue) -> Claim | None:
    """The next cell for this worker. With none waiting, cells whose owner stopped beating are
    taken over; while other owners still train, the worker waits to take theirs over should
    they die. None once no cell is waiting or running anywhere."""
    while (mine := queue.claim()) is None:
        if queue.take_over():
            continue
        if not queue.running_elsewhere():
            return None
        time.sleep(min(2.0, heartbeat_seconds()))
    return mine


def work(ctx: WorkerContext, emit: Emit) -> None:
    """Train cells from the queue until it is empty. Ctrl-C stops after recording the cell."""
    worker = ctx.open(emit)
    session = ctx.session
    cells = {cell.key: cell for cell in session.grid.cells}
    queue = grid_queue(session)
    while (mine := claim_next(queue)) is not None:
        cell = cells.get(mine.key)
        if cell is None:  # queued by another version of the grid file
            queue.release(mine, duplicate=True)
            continue
        with queue.heartbeat(mine):
            existing = tracking.cell_runs(worker.store, session.experiment_id).get(cell.key)
            if tracking.cell_status(existing) in tracking.DONE:
                final = existing.data.metrics.get("final_test_err", math.nan)
                queue.complete(mine, final, "done")
                continue
            existing = continuable(worker, session, cell, existing)
            try:
                ending = train_tracked(cell_job(session, cell, existing), worker)
            except KeyboardInterrupt:
                queue.release(mine, status="killed")
                raise
            except BaseException:
                queue.release(mine, status="failed")
                raise
        if ending.status in tracking.DONE:
            queue.complete(mine, ending.metrics.get("final_test_err", 100.0), ending.status)
        else:
            queue.release(mine, status=ending.status)


# --------------------------------------------------------------------------------------------
# The grid.


@dataclass
class GridOutcome(Outcome):
    """What a run of the grid did: the workers' outcome, and the cells done before or elsewhere."""

    done: int = 0
    total: int = 0
    elsewhere: int = 0
    rounds: Rounds | None = field(default=None)

    @property
    def trained(self) -> dict[str, str]:
        """Status of every cell that ended in this run, by key."""
        return {e.key: e.status for e in self.ended}


def run_grid(grid: Grid, options: RunOptions, console: Console) -> GridOutcome:
    """Train every cell of the grid that is not done; returns what happened."""
    # A shared queue's database and driver are checked before anything is written anywhere.
    check_urls(options.queue, tracking.resolve_uri(options.tracking_uri, options.results))
    store = tracking.existing_store(options.tracking_uri, options.results)
    if store is None:  # a missing dataset stops us before a new store is created
        check_data(grid.cells)
    # The store is created here, once, before any worker starts (concurrent first use races).
    store = store or tracking.open_store(options.tracking_uri, options.results)
    check_results_dir(options.results)
    with tracking.unavailable_is_one_line(store, RESUMES):
        return _run(grid, options, store, console)


def _run(grid: Grid, options: RunOptions, store: tracking.Store, console: Console) -> GridOutcome:
    """The cells not done, trained in rounds under a parent run that says how this invocation
    ended, whatever happened."""
    rows = states(grid, store)
    outcome = GridOutcome()
    pending = _plan(grid, rows, outcome)
    outcome.done = outcome.total - len(pending)
    if not pending:
        _close_left_open(grid, options, store)
        return outcome
    check_data(pending)  # ... and before any run is recorded (loaded once, then cached)
    storage = storage_for(options.queue, options.results, grid.name)
    session = open_session(grid, options, store, storage)
    for spec in {cell.config.data for cell in pending}:  # the runs table's Dataset column
        tracking.log_dataset(store, session.parent_id, dataset_record_for(spec))
    queue = CellQueue(storage, queue_name(grid))
    with (
        recording_the_end(store, RESUMES, outcome, partial(close_grid, session, store)),
        GridProgress(
            console,
            grid.name,
            pending,
            done=outcome.done,
            total=outcome.total,
            done_states=tracking.DONE,
        ) as progress,
    ):
        tried: set[str] = set()
        while pending:
            run_round(session, queue, pending, progress.update, outcome)
            tried.update(cell.key for cell in pending)
            if outcome.rounds is None or outcome.exit_code:
                break
            pending = _next_round(grid, store, queue, tried, outcome)
            progress.add(pending, total=outcome.total)
        outcome.elsewhere = len(queue.running_elsewhere())
    return outcome


def _plan(grid: Grid, rows: list[PlanRow], outcome: GridOutcome) -> list[Cell]:
    """The cells to train now: every cell not done, or with rounds, the planned cells not done.
    Records the rounds and the grid's total (its planned cells, with rounds) in `outcome`."""
    rounds = grid_rounds(grid, rows)
    if rounds is not None:
        outcome.rounds = rounds
        planned = set(rounds.planned)
        rows = [row for row in rows if row.cell.key in planned]
    outcome.total = len(rows)
    return [row.cell for row in rows if row.status not in tracking.DONE]


def _next_round(
    grid: Grid, store: tracking.Store, queue: CellQueue, tried: set[str], outcome: GridOutcome
) -> list[Cell]:
    """After a round: the next round's cells, from the record. Waits while cells of this round
    still train in another process (another `ablate run` on this queue finishes them); none when
    the grid is settled, or when a cell of the round is left without an outcome."""
    while True:
        pending = _plan(grid, states(grid, store), outcome)
        left = {cell.key for cell in pending if cell.key in tried}
        if not left:
            return pending
        if not left & queue.running_elsewhere():
            return []
        time.sleep(ROUND_POLL_SECONDS)


def _close_left_open(grid: Grid, options: RunOptions, store: tracking.Store) -> None:
    """Every cell has a result: a parent run still RUNNING was left so by an invocation killed
    after its last cell, before it ended the run; it ends now (FINISHED, with its counts)."""
    experiment = tracking.find_experiment(store, grid.name)
    if experiment is None:
        return
    parent = tracking.grid_run(store, experiment.experiment_id, grid)
    if parent is None or parent.info.status != "RUNNING":
        return
    session = Session(grid, options, store.uri, experiment.experiment_id, parent.info.run_id)
    close_grid(session, store, GridOutcome())


def close_grid(session: Session, store: tracking.Store, outcome: GridOutcome | None) -> None:
    """End the parent run's invocation: its status, and the grid's cells by state (metrics
    ``cells_total``, ``cells_done`` (a result: finished or diverged), ``cells_diverged``,
    ``cells_failed``, ``cells_killed``)."""
    rows = plan(session.grid, store, session.experiment_id)
    rounds = grid_rounds(session.grid, rows)
    if rounds is not None:  # with seeds until decided: the cells planned so far
        planned = set(rounds.planned)
        rows = [row for row in rows if row.cell.key in planned]
    count = Counter(row.status for row in rows)
    counts = {
        "cells_total": len(rows),
        "cells_done": sum(count[s] for s in tracking.DONE),
        "cells_diverged": count["diverged"],
        "cells_failed": count["failed"],
        "cells_killed": count["killed"],
    }
    all_done = counts["cells_done"] == len(rows)
    elsewhere = outcome.elsewhere if outcome is not None else 0
    close_session(session, store, invocation_status(outcome, all_done, elsewhere), counts)


def run_round(
    session: Session, queue: CellQueue, cells: list[Cell], show: Emit, outcome: GridOutcome
) -> None:
    """Queue `cells` and train the queue empty with up to `--workers` workers."""
    queue.enqueue([cell.key for cell in cells])
    workers = max(1, min(session.options.workers, len(cells)))
    run_pool(contexts(session, workers), work, show, outcome)

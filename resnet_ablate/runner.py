"""Run a grid: plan it against MLflow, queue what is left, train cells on workers, show progress.

A rerun of a grid trains only what is not done: finished and diverged cells are skipped, an
interrupted cell resumes from its checkpoint in the same MLflow run. Workers are processes
pulling cells from the grid's queue (``cellqueue.py``), so several workers, several ``ablate
run`` at once, or several machines sharing a ``--queue`` database never train a cell twice.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue as stdqueue
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import tracking
from .config import Cell, DataSpec, Grid

if TYPE_CHECKING:
    from rich.console import Console

    from .data import Dataset
    from .train import ExecOptions

Event = tuple[Any, ...]
Emit = Callable[[Event], None]


@dataclass(frozen=True)
class RunOptions:
    """How to run a grid (none of this changes what a cell computes)."""

    results: Path = Path("results")
    tracking_uri: str | None = None
    queue: str | None = None
    workers: int = 1
    exec: ExecOptions | None = None
    settings: str = "default"


@dataclass
class PlanRow:
    cell: Cell
    status: str
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)


def checkpoint_path(results: Path, grid: Grid, cell: Cell) -> Path:
    return results / "checkpoints" / grid.name / f"{cell.key}.pt"


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
    found = store.client.get_experiment_by_name(grid.name) if store is not None else None
    if found is None:
        return [PlanRow(cell=cell, status="new", run_id=None) for cell in grid.cells]
    return plan(grid, store, found.experiment_id)


def queue_name(grid: Grid) -> str:
    return f"cells:{grid.name}"


# --------------------------------------------------------------------------------------------
# Data, once per process.

_DATASETS: dict[DataSpec, Dataset] = {}


def dataset_for(spec: DataSpec) -> Dataset:
    from .data import load_dataset

    if spec not in _DATASETS:
        _DATASETS[spec] = load_dataset(spec)
    return _DATASETS[spec]


# --------------------------------------------------------------------------------------------
# One worker: claim a cell, train it, record it, repeat.


@dataclass(frozen=True)
class WorkerContext:
    """Everything a worker process needs (picklable: it crosses a process boundary)."""

    grid: Grid
    uri: str
    queue_url: str | None
    results: Path
    experiment_id: str
    parent_id: str
    exec: ExecOptions
    settings: str
    worker: int


def work(ctx: WorkerContext, emit: Emit) -> None:
    """Train cells from the queue until it is empty. Ctrl-C stops after recording the cell."""
    from .cellqueue import CellQueue, storage_for

    store = tracking.open_store(ctx.uri, ctx.results)
    cells = {cell.key: cell for cell in ctx.grid.cells}
    queue = CellQueue(storage_for(ctx.queue_url, ctx.results, ctx.grid.name), queue_name(ctx.grid))
    while (mine := queue.claim()) is not None:
        cell = cells.get(mine.key)
        if cell is None:  # queued by another version of the grid file
            queue.release(mine, duplicate=True)
            continue
        existing = tracking.cell_runs(store, ctx.experiment_id).get(cell.key)
        if tracking.cell_status(existing) in tracking.DONE:
            queue.complete(mine, existing.data.metrics.get("final_test_err", math.nan), "done")
            continue
        with queue.heartbeat(mine):
            try:
                status, value = run_cell(ctx, store, cell, existing, emit)
            except KeyboardInterrupt:
                queue.release(mine, status="killed")
                raise
            except BaseException:
                queue.release(mine, status="failed")
                raise
        if status in tracking.DONE:
            queue.complete(mine, value, status)
        else:
            queue.release(mine, status=status)


def run_cell(
    ctx: WorkerContext,
    store: tracking.Store,
    cell: Cell,
    existing: Any,
    emit: Emit,
) -> tuple[str, float]:
    """Train one cell into its MLflow run; returns (status, final test error)."""
    from .models import build_model, describe
    from .train import resolve_runtime, train_cell

    runtime = resolve_runtime(ctx.exec)
    run_id = tracking.start_cell_run(
        store,
        ctx.experiment_id,
        ctx.parent_id,
        cell,
        tags={
            "ablate.device": runtime.describe(),
            "ablate.precision": runtime.precision,
            tracking.TAG_SETTINGS: ctx.settings,
        },
        existing=existing.info.run_id if existing is not None else None,
    )
    logged = tracking.logged_steps(store, run_id) if existing is not None else set()
    emit(("start", ctx.worker, cell.key, cell.label, cell.config.train.epochs))
    tracking_seconds = 0.0

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        nonlocal tracking_seconds
        t0 = time.perf_counter()
        if epoch not in logged:
            values = {k: v for k, v in metrics.items() if k != "epoch"}
            tracking.log_metrics(store, run_id, values, step=epoch)
            logged.add(epoch)
        tracking_seconds += time.perf_counter() - t0
        emit(("epoch", ctx.worker, cell.key, epoch, metrics.get("train_err", math.nan)))

    try:
        dataset = dataset_for(cell.config.data)
        if existing is None:
            model = build_model(cell.config.model, dataset.in_channels, dataset.num_classes)
            info = describe(model, (dataset.in_channels, dataset.image_size, dataset.image_size))
            tracking.log_metrics(
                store, run_id, {"model_params": info.params, "model_macs": info.macs}, step=0
            )
            tracking.log_json(store, run_id, "config.json", _config_record(cell))
        result = train_cell(
            cell.config,
            dataset,
            key=cell.key,
            options=replace(ctx.exec),
            checkpoint=checkpoint_path(ctx.results, ctx.grid, cell),
            on_epoch=on_epoch,
        )
    except KeyboardInterrupt:
        tracking.end_cell_run(store, run_id, "killed", "interrupted (Ctrl-C); rerun to resume")
        emit(("end", ctx.worker, cell.key, "killed", "interrupted"))
        raise
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        tracking.log_text(store, run_id, "traceback.txt", traceback.format_exc())
        tracking.end_cell_run(store, run_id, "failed", reason)
        emit(("end", ctx.worker, cell.key, "failed", reason))
        return "failed", math.nan

    t0 = time.perf_counter()
    final = result.final | {"tracking_seconds": tracking_seconds}
    tracking.log_metrics(store, run_id, final, step=len(result.history))
    tracking.log_json(store, run_id, "final_metrics.json", final | {"status": result.status})
    tracking.log_json(store, run_id, "grad_flow.json", result.grad_flow)
    if result.resumed_from:
        store.client.set_tag(run_id, tracking.TAG_RESUMED, str(result.resumed_from))
    tracking.end_cell_run(store, run_id, result.status, result.reason)
    checkpoint_path(ctx.results, ctx.grid, cell).unlink(missing_ok=True)
    tracking_seconds += time.perf_counter() - t0
    emit(("end", ctx.worker, cell.key, result.status, result.reason))
    return result.status, final.get("final_test_err", 100.0)


def _config_record(cell: Cell) -> dict[str, Any]:
    return {"key": cell.key, "label": cell.label, **cell.config.model_dump(mode="json")}


def _worker_main(ctx: Any, events: mp.Queue, work_fn: Callable[[Any, Emit], None]) -> None:
    """Entry point of a worker process: `work_fn(ctx, emit)`, its events sent to the parent."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        work_fn(ctx, events.put)
    except KeyboardInterrupt:
        pass
    except Exception as err:
        events.put(("crash", ctx.worker, f"{type(err).__name__}: {err}"))
    finally:
        events.put(("exit", ctx.worker))


# --------------------------------------------------------------------------------------------
# The grid.


@dataclass
class Outcome:
    """What a run of the grid did, for the exit code and the closing lines."""

    done: int = 0
    total: int = 0
    trained: dict[str, str] = field(default_factory=dict)  # key -> status
    reasons: dict[str, str] = field(default_factory=dict)
    elsewhere: int = 0
    interrupted: bool = False
    crashes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        failed = any(s == "failed" for s in self.trained.values())
        return 1 if failed or self.crashes else 0


def check_data(cells: list[Cell]) -> None:
    """Load every dataset the pending cells need, so a missing one fails before anything starts."""
    for spec in {cell.config.data for cell in cells}:
        dataset_for(spec)


def run_grid(grid: Grid, options: RunOptions, console: Console) -> Outcome:
    """Train every cell of the grid that is not done; returns what happened."""
    from .cellqueue import CellQueue, storage_for
    from .train import ExecOptions

    exec_options = options.exec or ExecOptions()
    store = tracking.existing_store(options.tracking_uri, options.results)
    if store is None:  # a missing dataset stops us before a new store is created
        check_data(grid.cells)
    # The store is created here, once, before any worker starts (concurrent first use races).
    store = store or tracking.open_store(options.tracking_uri, options.results)
    tracking.check_results_dir(options.results)
    rows = states(grid, store)
    pending = [row.cell for row in rows if row.status not in tracking.DONE]
    outcome = Outcome(done=len(rows) - len(pending), total=len(rows))
    if not pending:
        return outcome
    check_data(pending)  # ... and before any run is recorded (loaded once, then cached)
    experiment_id = store.experiment_id(grid.name, grid.spec.description)
    parent_id = tracking.grid_run_id(store, experiment_id, grid)
    queue = CellQueue(storage_for(options.queue, options.results, grid.name), queue_name(grid))
    queue.enqueue([cell.key for cell in pending])

    workers = max(1, min(options.workers, len(pending)))
    contexts = [
        WorkerContext(
            grid=grid,
            uri=store.uri,
            queue_url=options.queue,
            results=options.results,
            experiment_id=experiment_id,
            parent_id=parent_id,
            exec=_worker_exec(exec_options, i, workers),
            settings=options.settings,
            worker=i,
        )
        for i in range(workers)
    ]
    from .progress import GridProgress

    with GridProgress(console, grid, rows) as progress:
        handle = _event_handler(progress, outcome)
        try:
            if workers == 1:
                work(contexts[0], handle)
            else:
                _run_processes(contexts, handle)
        except KeyboardInterrupt:
            outcome.interrupted = True
    outcome.elsewhere = len(queue.running_elsewhere())
    return outcome


def _worker_exec(options: ExecOptions, worker: int, workers: int) -> ExecOptions:
    """Spread workers over GPUs round-robin; on a CPU, share the cores between them."""
    import torch

    if options.device in ("auto", "cuda") and torch.cuda.is_available():
        return replace(options, device=f"cuda:{worker % torch.cuda.device_count()}")
    if workers > 1 and options.threads is None:
        return replace(options, threads=max(1, (os.cpu_count() or 1) // workers))
    return options


def _event_handler(progress: Any, outcome: Outcome) -> Emit:
    def handle(event: Event) -> None:
        kind = event[0]
        if kind == "end":
            _, _, key, status, reason = event
            outcome.trained[key] = status
            if reason:
                outcome.reasons[key] = reason
        elif kind == "crash":
            outcome.crashes.append(event[2])
        progress.update(event)

    return handle


def _run_processes(
    contexts: list[Any], handle: Emit, work_fn: Callable[[Any, Emit], None] = work
) -> None:
    """Start one process per worker context, each running `work_fn` (a module-level function,
    so it pickles), and relay their events until all have exited. Contexts have `.worker`."""
    ctx = mp.get_context("spawn")
    events: mp.Queue = ctx.Queue()
    processes = [
        ctx.Process(target=_worker_main, args=(c, events, work_fn), daemon=False) for c in contexts
    ]
    for process in processes:
        process.start()
    running = len(processes)
    try:
        while running:
            try:
                event = events.get(timeout=0.5)
            except stdqueue.Empty:
                if not any(p.is_alive() for p in processes):
                    break
                continue
            if event[0] == "exit":
                running -= 1
            else:
                handle(event)
    except KeyboardInterrupt:
        # The workers got the same SIGINT: let them record their cells as killed.
        for process in processes:
            process.join(timeout=30)
        _drain(events, handle)
        raise
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
    _drain(events, handle)


def _drain(events: mp.Queue, handle: Emit) -> None:
    while True:
        try:
            event = events.get_nowait()
        except (stdqueue.Empty, OSError, ValueError):
            return
        if event[0] != "exit":
            handle(event)

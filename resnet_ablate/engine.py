"""The run engine shared by `ablate run` and `ablate tune`: one tracked training, and the pool
of workers that run them.

Three seams, each in one place:

- ``train_tracked(job, worker, hooks)`` owns a training's life in MLflow: it creates the run
  (or reopens an interrupted one), logs every epoch once, records the end (finished, diverged,
  or what a hook decides), a crash (failed, with its traceback) or Ctrl-C (killed, then
  re-raised), and emits the typed events of ``events.py``. A grid cell and a tuning trial are
  both a ``Job``; what differs is data (``blind``, ``full_record``, the run's spec) and three
  optional ``Hooks`` (the run exists; an epoch is done, where ``Stop`` ends it early; how a
  completed training is scored).
- ``run_pool(contexts, work, show, outcome)`` runs ``work(context, emit)`` on every worker
  context: in this process for one worker, else one spawned process each, relaying their
  events to ``outcome.record`` and ``show`` (the display). Ctrl-C reaches the workers too; they
  record their runs as killed, and the pool marks the outcome interrupted (exit code 130).
- ``open_session(grid, options, store)`` is the grid's place in the record (its experiment and
  parent run) that every worker context carries.

What a command adds on top is how work is claimed: the cell queue (``runner.py``) or Optuna's
ask within a budget (``tune/``). Events are plain data, so the display (``progress.py``) and
the outcome never import this module's callers.

Where coming work plugs in:

- One parent run per grid across machines: ``open_session`` is the only place the parent is
  found or created; given the queue's storage, the processes sharing it agree on one through it
  (``cellqueue.agree_once``: the first to create the grid's entry makes the run).
- A parent run whose status tells the truth: ``open_session`` marks it RUNNING, and
  ``close_session`` after the pool (``runner.close_grid``, ``tune_grid``) ends it with
  ``invocation_status`` (interrupted: KILLED, failures or crashes: FAILED, every cell done:
  FINISHED, cells still running elsewhere: left RUNNING) and summary metrics.
- Rounds of cells (more seeds where a verdict is open): ``runner.run_round`` enqueues cells and
  runs the pool into the same outcome; call it again with the new cells (and a session whose
  grid holds them).
- Points within an epoch: the trainer's ``on_progress(iteration, metrics)`` hands
  ``_EpochLog`` an epoch's points (step = iteration) before its ``on_epoch``; they go out in the
  same batch as the epoch's metrics, or not at all when the epoch is logged already, so a
  resumed run holds each point once.
- A dead worker's cell taken over: the runner claims it from the queue; the engine continues
  its run only where this machine holds the run's checkpoint (``continues``: the file beside the
  checkpoint names the run), else the cell starts again in a new run.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import queue as stdqueue
import signal
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from . import tracking, train
from .cellqueue import agree_once
from .config import Cell, CellConfig, DataSpec, Grid
from .data import Dataset, load_dataset
from .device import ExecOptions, resolve_runtime
from .errors import StoreUnavailable, UserError
from .events import Crashed, Emit, Ended, Epoch, Event, Exited, Skipped, Started
from .models import build_model, describe
from .provenance import DatasetRecord, dataset_record, provenance
from .signals import handle_termination, signal_name, signum_of

if TYPE_CHECKING:
    import optuna

INTERRUPTED = "interrupted ({signal}); rerun to resume"
#: What a store that took no write left of the work, for its message.
RESUMES = "the cells' checkpoints are kept: the rerun resumes them"
OutcomeT = TypeVar("OutcomeT", bound="Outcome")  # an invocation's outcome, of run or tune


@dataclass(frozen=True)
class RunOptions:
    """How to run a grid (none of this changes what a cell computes)."""

    results: Path = Path("results")
    tracking_uri: str | None = None
    queue: str | None = None
    workers: int = 1
    exec: ExecOptions | None = None
    settings: str = "default"


# --------------------------------------------------------------------------------------------
# Data, once per process.

_DATASETS: dict[DataSpec, Dataset] = {}
_RECORDS: dict[DataSpec, DatasetRecord] = {}


def dataset_for(spec: DataSpec) -> Dataset:
    """The dataset of a spec, loaded on first use and kept for the process's later cells."""
    if spec not in _DATASETS:
        _DATASETS[spec] = load_dataset(spec)
    return _DATASETS[spec]


def dataset_record_for(spec: DataSpec) -> DatasetRecord:
    """The loaded dataset's record (name, digest, sizes, source), computed once a process."""
    if spec not in _RECORDS:
        _RECORDS[spec] = dataset_record(dataset_for(spec))
    return _RECORDS[spec]


def check_data(cells: Iterable[Cell]) -> None:
    """Load every dataset the cells need, so a missing one fails before anything starts."""
    for spec in {cell.config.data for cell in cells}:
        dataset_for(spec)


def blind(dataset: Dataset) -> Dataset:
    """The dataset as a tuning trial sees it: its test split replaced by the validation split."""
    assert dataset.val is not None, "tune sections require data.val_split"
    return replace(dataset, test=dataset.val)


# --------------------------------------------------------------------------------------------
# The grid's session and the workers' contexts.


@dataclass(frozen=True)
class Session:
    """A grid being run, as every worker sees it: the grid, how it runs, where it is recorded.

    Runs nest under the grid's parent run, or under the run `parents` gives for their key (a
    tuning trial under its study's tuning run).
    """

    grid: Grid
    options: RunOptions
    uri: str
    experiment_id: str
    parent_id: str
    parents: Mapping[str, str] = field(default_factory=dict)


def open_session(
    grid: Grid,
    options: RunOptions,
    store: tracking.Store,
    storage: optuna.storages.BaseStorage | None = None,
) -> Session:
    """The grid's experiment and parent run (created on first use), marked RUNNING until
    ``close_session`` ends it. Given the queue's `storage`, the processes and machines sharing
    it agree on one parent run through it, however many start the grid at the same moment."""
    experiment_id = store.experiment_id(grid.name, grid.spec.description)

    def make() -> str:
        return tracking.grid_run_id(store, experiment_id, grid, provenance(), running=True)

    if storage is None:
        parent_id = make()
    else:
        name = f"parent:{grid.name}" + "".join(f" --set {o}" for o in grid.overrides)
        parent_id = agree_once(
            storage, name, make, lambda run_id: tracking.run_active(store, run_id)
        )
        tracking.reopen_run(store, parent_id, {})
    if grid.path.is_file():  # the grid file as this invocation read it
        text = grid.path.read_text(encoding="utf-8")
        tracking.log_text(store, parent_id, f"grid/{grid.path.name}", text)
    return Session(grid, options, store.uri, experiment_id, parent_id)


def close_session(
    session: Session, store: tracking.Store, status: str, counts: Mapping[str, float] = {}
) -> None:
    """End the invocation's hold on the parent run: its MLflow `status` and summary `counts`."""
    tracking.end_grid_run(store, session.parent_id, status, counts)


@contextlib.contextmanager
def recording_the_end(
    store: tracking.Store, said: str, outcome: OutcomeT, close: Callable[[OutcomeT | None], None]
) -> Iterator[None]:
    """Within: an invocation's work. On the way out, however it went, `close` records on its
    parent run how the invocation ended: given `outcome` when the work ran to its end or was
    interrupted (Ctrl-C or SIGTERM, then marked so: KILLED), None when it raised. A store that
    takes no write is its one line ending with `said` (what became of the work); when the work
    raised, that error is the one told, and a store that took no write is not made to wait a
    second time."""
    try:
        with tracking.unavailable_is_one_line(store, said):
            yield
    except StoreUnavailable:
        raise
    except KeyboardInterrupt as err:
        outcome.interrupt(err)
        with contextlib.suppress(Exception):
            close(outcome)
        raise
    except BaseException:
        with contextlib.suppress(Exception):
            close(None)
        raise
    with tracking.unavailable_is_one_line(store, said):
        close(outcome)


def invocation_status(outcome: Outcome | None, all_done: bool, elsewhere: int) -> str:
    """How the grid's parent run stands when an invocation ends: KILLED after Ctrl-C; FAILED
    when a training failed, a worker crashed or the invocation raised (`outcome` None);
    FINISHED when every cell has a result; RUNNING while cells still run elsewhere."""
    if outcome is not None and outcome.interrupted:
        return "KILLED"
    if outcome is None or outcome.failures or outcome.crashes:
        return "FAILED"
    if all_done:
        return "FINISHED"
    return "RUNNING" if elsewhere else "FAILED"


@dataclass(frozen=True)
class Worker:
    """A worker as a training sees it: its number, device options, open store and events."""

    number: int
    exec: ExecOptions
    store: tracking.Store
    experiment_id: str
    emit: Emit


@dataclass(frozen=True)
class WorkerContext:
    """What a worker starts from (picklable: it crosses a process boundary)."""

    session: Session
    worker: int
    exec: ExecOptions

    def open(self, emit: Emit) -> Worker:
        """Open the store in this process and make the worker."""
        store = tracking.open_store(self.session.uri, self.session.options.results)
        return Worker(self.worker, self.exec, store, self.session.experiment_id, emit)


def contexts(session: Session, workers: int) -> list[WorkerContext]:
    """One context per worker started: GPUs shared round-robin; on a CPU the cores split
    between the workers asked for (``--workers``), however many are started. The thread count
    changes a CPU's float sums, so a cell trains with the same threads whether it is the only
    one left (a resumed grid) or one of many: its numbers do not depend on what was left."""
    options = session.options.exec or ExecOptions()
    share = max(workers, session.options.workers)
    return [WorkerContext(session, i, worker_exec(options, i, share)) for i in range(workers)]


def worker_exec(options: ExecOptions, worker: int, workers: int) -> ExecOptions:
    """A worker's device options: the GPUs round-robin; on a CPU, the cores shared."""
    if options.device in ("auto", "cuda") and torch.cuda.is_available():
        return replace(options, device=f"cuda:{worker % torch.cuda.device_count()}")
    if workers > 1 and options.threads is None:
        return replace(options, threads=max(1, (os.cpu_count() or 1) // workers))
    return options


# --------------------------------------------------------------------------------------------
# One tracked training.


@dataclass(frozen=True)
class Job:
    """One training to run and record: a grid cell, or a tuning trial.

    ``blind``: the validation split stands in for the test split and no metric about the test
    split is logged (a trial). ``full_record``: a cell's whole record: model size and
    ``config.json`` when the run is new; ``tracking_seconds``, ``final_metrics.json`` and
    ``grad_flow.json`` at the end. ``resume`` is the run of an interrupted training to continue
    (its epochs already logged are not logged again); ``checkpoint`` is where the trainer keeps
    its state, removed once the training has ended for good.
    """

    key: str  # the cell's key (a trial: its study's base cell)
    label: str
    config: CellConfig
    run: tracking.RunSpec
    resume: str | None = None
    checkpoint: Path | None = None
    blind: bool = False
    full_record: bool = True
    interrupted: str = INTERRUPTED  # the reason recorded for Ctrl-C or SIGTERM ({signal})
    kept: str = RESUMES  # what a store that takes no write leaves of the work, for its message
    grid_file: Path | None = None  # stored with a new run, exactly as it was read


@dataclass(frozen=True)
class Ending:
    """How a training ended: its status and reason, its final metrics, and the note the
    display shows (the reason unless given)."""

    status: str
    reason: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    note: str | None = None


class Stop(Exception):  # noqa: N818 - it is an instruction, not an error
    """Raised by an epoch hook to end the training early as `status` (a pruned trial)."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


EpochHook = Callable[[int, Mapping[str, float]], None]


@dataclass(frozen=True)
class Hooks:
    """What a caller adds to a training, each optional: `started(run_id)` once the run exists;
    `epoch(epoch, metrics)` after each epoch is logged (raise ``Stop`` to end early);
    `finish(result)` says how a completed training is recorded (default: as the trainer says)."""

    started: Callable[[str], None] | None = None
    epoch: EpochHook | None = None
    finish: Callable[[train.CellResult], Ending] | None = None


class _EpochLog:
    """The trainer's `on_epoch`: log each epoch once, time the logging, tell the display."""

    def __init__(self, job: Job, worker: Worker, run_id: str, hook: EpochHook | None):
        self.job, self.worker, self.hook = job, worker, hook
        self.metrics = tracking.MetricLog(worker.store, run_id)
        self.logged = tracking.logged_steps(worker.store, run_id) if job.resume else set()
        self.logged_points = (
            tracking.logged_steps(worker.store, run_id, train.POINT_KEYS[-1])
            if job.resume
            else set()
        )
        self.points: list[tuple[int, dict[str, float]]] = []  # the coming epoch's
        self.seconds = 0.0  # spent writing to the store
        self.reached = 0

    def point(self, iteration: int, metrics: dict[str, float]) -> None:
        """The trainer's `on_progress`: a point of the epoch whose `on_epoch` comes next."""
        self.points.append((iteration, metrics))

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        t0 = time.perf_counter()
        if epoch not in self.logged:
            for iteration, values in self.points:
                if iteration not in self.logged_points:
                    self.metrics.add(_visible(values, self.job.blind), step=iteration)
            self.metrics.add(_visible(metrics, self.job.blind), step=epoch)
            self.metrics.flush()  # one batch up to 1000 values: the points go with their epoch
            self.logged.add(epoch)
        self.points = []
        self.seconds += time.perf_counter() - t0
        self.reached = epoch
        train_err = metrics.get("train_err", math.nan)
        self.worker.emit(Epoch(self.worker.number, self.job.key, epoch, train_err))
        if self.hook is not None:
            self.hook(epoch, metrics)


def train_tracked(job: Job, worker: Worker, hooks: Hooks = Hooks()) -> Ending:
    """Train `job` into its MLflow run and return how it ended.

    A crash is recorded as failed and returned; Ctrl-C or SIGTERM is recorded as killed and
    re-raised, wherever it lands once the run is open, up to the moment its end is recorded.
    """
    store = worker.store
    run_id = _open_run(job, worker)
    record = _Record()
    try:
        if job.checkpoint is not None:  # whoever finds this checkpoint knows which run it is
            checkpoint_run(job.checkpoint).parent.mkdir(parents=True, exist_ok=True)
            checkpoint_run(job.checkpoint).write_text(run_id)
        if hooks.started is not None:
            hooks.started(run_id)
        epochs = _EpochLog(job, worker, run_id, hooks.epoch)
        worker.emit(Started(worker.number, job.key, job.label, job.config.train.epochs))
        dataset = dataset_for(job.config.data)
        if job.blind:
            dataset = blind(dataset)
        if job.resume is None:
            tracking.log_dataset(store, run_id, dataset_record_for(job.config.data))
        if job.full_record and job.resume is None:
            _record_model(store, run_id, job, dataset)
        result = train.train_cell(
            job.config,
            dataset,
            key=job.key,
            options=worker.exec,
            checkpoint=job.checkpoint,
            on_epoch=epochs,
            on_progress=epochs.point,
        )
        ending = _record_end(job, worker, run_id, result, epochs.seconds, hooks, record)
    except Stop as stop:
        tracking.end_run(store, run_id, stop.status, stop.reason)
        remove_checkpoint(job.checkpoint)
        left = job.config.train.epochs - epochs.reached
        worker.emit(Skipped(worker.number, job.key, left))
        return _ended(job, worker, Ending(stop.status, stop.reason))
    except KeyboardInterrupt as err:
        if not record.ended:  # else the end is recorded: the run stays as it ended
            reason = job.interrupted.format(signal=signal_name(signum_of(err)))
            tracking.end_run(store, run_id, "killed", reason)
            _ended(job, worker, Ending("killed", reason))
        raise
    except Exception as err:
        # A store that takes no write can record nothing: the run stays open and the checkpoint
        # kept, as after a kill, and the rerun resumes them.
        if (unavailable := tracking.store_unavailable(store.uri, err, job.kept)) is not None:
            raise unavailable from None
        if record.ended:
            raise
        reason = f"{type(err).__name__}: {err}"
        tracking.log_text(store, run_id, "traceback.txt", traceback.format_exc())
        tracking.end_run(store, run_id, "failed", reason)
        return _ended(job, worker, Ending("failed", reason))
    return _ended(job, worker, ending)


@dataclass
class _Record:
    """Whether a run's end is recorded: after that, an interruption or error leaves it alone."""

    ended: bool = False


def _open_run(job: Job, worker: Worker) -> str:
    """Reopen the interrupted run, or create one tagged with provenance and the device."""
    if job.resume is not None:
        tags = {tracking.TAG_STATUS: "running", tracking.TAG_REASON: ""}
        return tracking.reopen_run(worker.store, job.resume, tags)
    runtime = resolve_runtime(worker.exec)
    device = {tracking.TAG_DEVICE: runtime.describe(), tracking.TAG_PRECISION: runtime.precision}
    spec = replace(job.run, tags={**provenance(), **device, **job.run.tags})
    return tracking.create_run(worker.store, worker.experiment_id, spec)


def _record_model(store: tracking.Store, run_id: str, job: Job, dataset: Dataset) -> None:
    """Model size (step 0) and the resolved configuration, when a cell's run is new."""
    model = build_model(job.config.model, dataset.in_channels, dataset.num_classes)
    info = describe(model, (dataset.in_channels, dataset.image_size, dataset.image_size))
    sizes = {"model_params": info.params, "model_macs": info.macs}
    tracking.log_metrics(store, run_id, sizes, step=0)
    config = {"key": job.key, "label": job.label, **job.config.model_dump(mode="json")}
    tracking.log_json(store, run_id, "config.json", config)
    if job.grid_file is not None and job.grid_file.is_file():
        text = job.grid_file.read_text(encoding="utf-8")
        tracking.log_text(store, run_id, f"grid/{job.grid_file.name}", text)


def _record_end(
    job: Job,
    worker: Worker,
    run_id: str,
    result: train.CellResult,
    tracking_seconds: float,
    hooks: Hooks,
    record: _Record,
) -> Ending:
    """Final metrics, artifacts and tags of a training that reached its end; the run ends
    (`record.ended` says so from then on). A run resumed after a kill cut its end short has
    some final metrics already: they are not logged twice."""
    store = worker.store
    ending = hooks.finish(result) if hooks.finish else Ending(result.status, result.reason)
    final = _visible(result.final, job.blind) | dict(ending.metrics)
    if job.full_record:
        final["tracking_seconds"] = tracking_seconds
    logged = tracking.logged_keys(store, run_id) if job.resume is not None else set()
    new = {k: v for k, v in final.items() if k not in logged}
    tracking.log_metrics(store, run_id, new, step=len(result.history))
    if job.full_record:
        tracking.log_json(store, run_id, "final_metrics.json", final | {"status": result.status})
        tracking.log_json(store, run_id, "grad_flow.json", result.grad_flow)
    tags = dict(result.tags)
    if result.resumed_from:
        tags[tracking.TAG_RESUMED] = str(result.resumed_from)
    tracking.end_run(store, run_id, ending.status, ending.reason, tags)
    record.ended = True
    remove_checkpoint(job.checkpoint)
    return replace(ending, metrics=final)


def _visible(metrics: Mapping[str, float], blind: bool) -> dict[str, float]:
    """The metrics a run logs: not the epoch number (it is the step), and for a blind run
    nothing about the test split (whose place the validation split took)."""
    return {k: v for k, v in metrics.items() if k != "epoch" and not (blind and "test" in k)}


def _ended(job: Job, worker: Worker, ending: Ending) -> Ending:
    note = ending.reason if ending.note is None else ending.note
    worker.emit(Ended(worker.number, job.key, job.label, ending.status, note))
    return ending


def checkpoint_run(checkpoint: Path) -> Path:
    """The file beside a checkpoint that names the MLflow run its training is recorded in."""
    return checkpoint.with_suffix(".run")


def continues(checkpoint: Path | None, run_id: str) -> bool:
    """Whether this machine holds a checkpoint of the training recorded in `run_id`."""
    if checkpoint is None or not checkpoint.exists():
        return False
    try:
        return checkpoint_run(checkpoint).read_text().strip() == run_id
    except OSError:
        return False


def remove_checkpoint(checkpoint: Path | None) -> None:
    """Drop a checkpoint and the note of its run (the training ended, or is not continued)."""
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
        checkpoint_run(checkpoint).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# The worker pool.


@dataclass
class Outcome:
    """What the workers did, from their events: for the exit code and the closing lines."""

    ended: list[Ended] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    interrupted: bool = False
    signum: int = signal.SIGINT  # what interrupted it

    def interrupt(self, err: KeyboardInterrupt) -> None:
        """Mark the work interrupted by the signal behind `err` (Ctrl-C or SIGTERM)."""
        self.interrupted, self.signum = True, signum_of(err)

    def record(self, event: Event) -> None:
        if isinstance(event, Ended):
            self.ended.append(event)
        elif isinstance(event, Crashed):
            self.crashes.append(event.error)

    @property
    def failures(self) -> list[Ended]:
        return [e for e in self.ended if e.status == "failed"]

    @property
    def exit_code(self) -> int:
        """128 + the signal after Ctrl-C (130) or SIGTERM (143); 1 if a training failed or a
        worker crashed; else 0."""
        if self.interrupted:
            return 128 + self.signum
        return 1 if self.failures or self.crashes else 0


Work = Callable[[WorkerContext, Emit], None]


def run_pool(contexts: Sequence[WorkerContext], work: Work, show: Emit, outcome: Outcome) -> None:
    """Run `work(context, emit)` for every context (a module-level function, so it pickles):
    in this process for one, else one spawned process each. Every event goes to
    `outcome.record`, then to `show`. Ctrl-C marks the outcome interrupted."""

    def handle(event: Event) -> None:
        outcome.record(event)
        show(event)

    try:
        if len(contexts) == 1:
            work(contexts[0], handle)
        else:
            _run_processes(contexts, work, handle)
    except KeyboardInterrupt as err:
        outcome.interrupt(err)


def _worker_main(ctx: WorkerContext, events: mp.Queue, work: Work) -> None:
    """Entry point of a worker process: `work(ctx, emit)`, its events sent to the parent."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    handle_termination()
    try:
        work(ctx, events.put)
    except KeyboardInterrupt:
        pass
    except UserError as err:  # a message for the user, already one clear line
        events.put(Crashed(ctx.worker, str(err)))
    except Exception as err:
        events.put(Crashed(ctx.worker, f"{type(err).__name__}: {err}"))
    finally:
        events.put(Exited(ctx.worker))


def _run_processes(contexts: Sequence[WorkerContext], work: Work, handle: Emit) -> None:
    """Start one process per context and relay their events until all have exited. A process
    that ended without saying so (killed by the system, or dead before its work began) is a
    crashed worker: the cells it would have trained are not done, and the exit code says so."""
    ctx = mp.get_context("spawn")
    events: mp.Queue = ctx.Queue()
    processes = [
        ctx.Process(target=_worker_main, args=(c, events, work), daemon=False) for c in contexts
    ]
    for process in processes:
        process.start()
    exited: set[int] = set()

    def relay(event: Event) -> None:
        if isinstance(event, Exited):
            exited.add(event.worker)
        else:
            handle(event)

    try:
        while len(exited) < len(processes):
            try:
                event = events.get(timeout=0.5)
            except stdqueue.Empty:
                if not any(p.is_alive() for p in processes):
                    break
                continue
            relay(event)
    except KeyboardInterrupt as err:
        # Ctrl-C reaches the whole process group; a SIGTERM may have reached only this process
        # (a scheduler that signals the job's first process): pass it on. Either way, let the
        # workers record their runs as killed (a second signal is ignored there).
        if signum_of(err) != signal.SIGINT:
            for process in processes:
                if process.is_alive() and process.pid is not None:
                    os.kill(process.pid, signum_of(err))
        for process in processes:
            process.join(timeout=30)
        _drain(events, relay)
        raise
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
    _drain(events, relay)
    for context, process in zip(contexts, processes, strict=True):
        if context.worker not in exited:
            said = f"its process ended (exit code {process.exitcode}) before its work was done"
            handle(Crashed(context.worker, said))


def _drain(events: mp.Queue, relay: Emit) -> None:
    while True:
        try:
            event = events.get_nowait()
        except (stdqueue.Empty, OSError, ValueError):
            return
        relay(event)

"""Everything MLflow: the only module that talks to the MLflow client.

- The store: ``open_store`` (creating an embedded SQLite store once, under a file lock),
  ``existing_store``, ``Store.experiment_id``.
- Writing: ``create_run(store, experiment_id, RunSpec)`` (name, role, parent, tags, params),
  ``reopen_run``, ``end_run`` (``ablate.status`` and reason, MLflow's status from
  ``MLFLOW_STATUS``), and one chunked writer, ``log_batch``, behind ``log_metrics``,
  ``MetricLog`` (points held until flushed: an epoch's metrics, or points within an epoch) and
  the params of a new run. ``grid_run_id`` and ``cell_run_spec`` say what a grid's and a cell's
  runs look like; tuning runs and trials are specified in ``tune/``.
- Reading, for the runner and the report: ``find_experiment``, ``first_run``,
  ``runs_with_role``, ``cell_runs``, ``cell_status``, ``logged_steps``, ``metric_points``,
  ``download_json``, ``ui_url``.

The record a grid leaves in MLflow (the report and `ablate ls` read only this):

- experiment: named after the grid; tag ``ablate.description``.
- parent run: named after the grid; tags ``ablate.role=grid``, ``ablate.grid``.
- one child run per cell (``mlflow.parentRunId`` = the parent), named by the cell's label, tagged
  ``ablate.role=cell``, ``ablate.cell_key``, ``ablate.label``, ``ablate.status`` (running,
  finished, diverged, failed, killed), ``ablate.reason`` (why it diverged or failed),
  ``ablate.git_commit``, ``ablate.torch_version``, ``ablate.device``, ``ablate.precision``,
  ``ablate.settings`` (``default`` or how tuned values were chosen), ``ablate.host`` (the
  machine that trained it), and whatever the trainer
  reports about what actually ran (``CellResult.tags``); every config field as a flat
  param (``model.depth``); metrics ``model_params`` and ``model_macs`` (step 0); per-epoch metrics
  (step = epoch, from 1): ``train_loss``, ``train_err``, ``test_loss``, ``test_err``, ``val_loss``,
  ``val_err`` (when the grid holds out a validation split), ``lr``, ``epoch_seconds``,
  ``images_per_second``; errors in percent. Within each epoch, ``train.log_points`` points
  (step = iteration, from 1; the last at the epoch's end): ``iter_train_loss``,
  ``iter_train_err``, the running training loss and error over the iterations since the
  previous point (He et al. 2015, Fig. 6). At the end: ``final_train_err``,
  ``final_test_err``, ``best_test_err``, ``best_test_epoch``, ``wall_seconds``,
  ``tracking_seconds``, and artifacts ``config.json`` (resolved config, key, label),
  ``final_metrics.json`` and ``grad_flow.json`` (per-layer gradient norms of the main-path
  convolutions at the first and last epoch).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset as MlflowDataset
from mlflow.entities import DatasetInput, Experiment, InputTag, Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .config import Cell, Grid
from .databases import masked
from .errors import StoreUnavailable, TrackingError
from .preflight import check_results_dir, check_server
from .provenance import DatasetRecord

TAG_ROLE = "ablate.role"
TAG_GRID = "ablate.grid"
TAG_KEY = "ablate.cell_key"
TAG_LABEL = "ablate.label"
TAG_STATUS = "ablate.status"
TAG_REASON = "ablate.reason"
TAG_RESUMED = "ablate.resumed_from_epoch"
TAG_DESCRIPTION = "ablate.description"
TAG_SETTINGS = "ablate.settings"
TAG_DEVICE = "ablate.device"
TAG_PRECISION = "ablate.precision"
TAG_HOST = "ablate.host"
TAG_PARENT = "mlflow.parentRunId"
TAG_OVERRIDES = "ablate.overrides"
TAG_TRAIN_IMAGES = "ablate.data.train_images"
TAG_TEST_IMAGES = "ablate.data.test_images"

#: Cell states that are results: such a cell is not trained again. (The others: `new`, with
#: no run yet, `running`, `failed` and `killed`.)
DONE = ("finished", "diverged")
#: The MLflow run status of every ``ablate.status`` a run can end with (cells, tuning trials
#: and tuning runs): a result is FINISHED, a crash FAILED, an interruption KILLED.
MLFLOW_STATUS = {
    "running": "RUNNING",
    "finished": "FINISHED",
    "diverged": "FINISHED",
    "complete": "FINISHED",
    "pruned": "FINISHED",
    "failed": "FAILED",
    "killed": "KILLED",
}
_PROGRESS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
_QUIET_URLS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def default_uri(results: Path) -> str:
    """The embedded store: ``sqlite:///<results>/mlflow.db`` (absolute, so workers agree)."""
    return f"sqlite:///{(results / 'mlflow.db').resolve()}"


def resolve_uri(uri: str | None, results: Path) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded SQLite store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(results)


#: How long MLflow's SQLite sessions wait for a lock (its `PRAGMA busy_timeout`).
SQLITE_BUSY_SECONDS = 20


@dataclass
class Store:
    """An open MLflow tracking store and the artifact root for new experiments."""

    uri: str
    client: MlflowClient
    artifact_root: Path | None

    def experiment_id(self, name: str, description: str = "") -> str:
        """The experiment named after a grid, created (with our artifact root) if absent."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"experiment '{name}' is deleted in {self.uri}; restore it in the MLflow "
                    f"UI or rename the grid"
                )
            return found.experiment_id
        location = None
        if self.artifact_root is not None:
            location = (self.artifact_root / name).resolve().as_uri()
        try:
            return self.client.create_experiment(
                name, artifact_location=location, tags={TAG_DESCRIPTION: description}
            )
        except Exception:  # another process created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id


def open_store(uri: str | None, results: Path) -> Store:
    """Open (creating if needed) the tracking store; a clear TrackingError if it cannot be used."""
    uri = resolve_uri(uri, results)
    check_server(uri)
    artifact_root = None
    lock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        check_results_dir(db.parent)
        artifact_root = db.parent / "mlartifacts"
        lock = _file_lock(db.with_name(db.name + ".lock"))
    # The console is the tool's own: no "View run ... at" line from MLflow after every run.
    os.environ[_QUIET_URLS] = "true"
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # It logs a database error's traceback, then raises the same error: that is what is told.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    try:
        with lock, _quiet_noload():  # a new SQLite store from two processes at once races
            if uri.startswith("sqlite:///"):
                _create_whole(Path(uri.removeprefix("sqlite:///")))
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
    except Exception as err:
        if (unavailable := store_unavailable(uri, err, "nothing was recorded")) is not None:
            raise unavailable from None
        raise TrackingError(
            f"tracking store {masked(uri)} cannot be opened: {_first_line(err)}"
        ) from None
    return Store(uri=uri, client=client, artifact_root=artifact_root)


def _create_whole(db: Path) -> None:
    """A new SQLite store comes into being whole (under the store's lock): MLflow makes its
    tables, dozens of migrations, in a file beside it, which then takes its name. A kill in the
    middle leaves that file, removed at the next open, never a half-made store that MLflow
    could not open again ("table ... already exists")."""
    for left in db.parent.glob(f".{db.name}.new-*"):  # from a creation that was killed
        left.unlink(missing_ok=True)
    if db.exists():
        return
    new = db.with_name(f".{db.name}.new-{os.getpid()}")
    try:
        client = MlflowClient(tracking_uri=f"sqlite:///{new}")
        client.search_experiments(max_results=1)
        client._tracking_client.store.engine.dispose()  # no connection left on the file
        os.replace(new, db)
    finally:
        new.unlink(missing_ok=True)


def store_unavailable(uri: str, err: BaseException, said: str) -> StoreUnavailable | None:
    """The one-line error for a store that cannot take a write for now (SQLite held locked by
    another process past MLflow's wait, or its disk full), ending with `said` (what became of
    the work); None for any other error."""
    text = str(err)
    if "database is locked" in text:
        return StoreUnavailable(
            f"tracking store {masked(uri)} is locked by another process for longer than MLflow "
            f"waits ({SQLITE_BUSY_SECONDS} s); let that process finish or stop it, then run "
            f"again ({said})"
        )
    if "database or disk is full" in text:
        where = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite") else uri
        return StoreUnavailable(
            f"tracking store {masked(uri)} is full: no space left on {where}; free some, then "
            f"run again ({said})"
        )
    return None


@contextlib.contextmanager
def unavailable_is_one_line(store: Store, said: str) -> Iterator[None]:
    """Within: an error of a store that cannot take a write for now becomes its one line."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as err:
        if (unavailable := store_unavailable(store.uri, err, said)) is not None:
            raise unavailable from None
        raise


def existing_store(uri: str | None, results: Path) -> Store | None:
    """The tracking store if it is there already; an embedded one is never created here."""
    uri = resolve_uri(uri, results)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None
    return open_store(uri, results)


@contextlib.contextmanager
def _quiet_noload() -> Iterator[None]:
    """MLflow's SQL store configures SQLAlchemy's `noload` strategy, deprecated in SQLAlchemy
    2.1: its warning, raised where the store sets up its tables, is silenced there only."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"The ``noload`` loader strategy is deprecated",
            category=DeprecationWarning,
            module=r"mlflow\.store\.tracking\.sqlalchemy_store",
        )
        yield


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on a file, held for the block (one machine, many processes)."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# --------------------------------------------------------------------------------------------
# Writing: runs created, reopened and ended; metrics, params and tags in chunked batches.


@dataclass(frozen=True)
class RunSpec:
    """A run to create: its name, its role and parent, its tags and its params.

    ``status`` is the ``ablate.status`` it starts with (None: the run has no such tag, as the
    grid's parent run). Tags include the provenance (``provenance.py``) the caller gives.
    """

    name: str
    role: str
    parent_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    status: str | None = "running"


@dataclass(frozen=True)
class Point:
    """One metric value at a step (epoch, or iteration), when it was measured (ms since epoch)."""

    key: str
    value: float
    step: int
    timestamp_ms: int
    run_id: str = ""  # set when read back from the store


def create_run(store: Store, experiment_id: str, spec: RunSpec) -> str:
    """Create a run as `spec` says (params logged in chunks); returns its id."""
    fixed = {TAG_ROLE: spec.role}
    if spec.parent_id is not None:
        fixed[TAG_PARENT] = spec.parent_id
    if spec.status is not None:
        fixed[TAG_STATUS] = spec.status
    tags = {**fixed, **spec.tags}
    run = store.client.create_run(experiment_id, run_name=spec.name, tags=tags)
    log_batch(store, run.info.run_id, params=spec.params)
    return run.info.run_id


def reopen_run(store: Store, run_id: str, tags: Mapping[str, str]) -> str:
    """Mark an existing run RUNNING again (the same run continues) and set `tags` on it."""
    store.client.update_run(run_id, status="RUNNING")
    log_batch(store, run_id, tags=tags)
    return run_id


def end_run(
    store: Store, run_id: str, status: str, reason: str = "", tags: Mapping[str, str] = {}
) -> None:
    """Record how a run ended (``ablate.status``, ``ablate.reason``, more `tags`) and end it
    with the MLflow status that goes with `status` (see ``MLFLOW_STATUS``)."""
    ended = {TAG_STATUS: status, **({TAG_REASON: reason[:4000]} if reason else {}), **tags}
    log_batch(store, run_id, tags=ended)
    store.client.set_terminated(run_id, MLFLOW_STATUS[status])


def log_batch(
    store: Store,
    run_id: str,
    *,
    points: Sequence[Point] = (),
    params: Mapping[str, Any] = {},
    tags: Mapping[str, str] = {},
) -> None:
    """Write metric points, params and tags in as few calls as MLflow allows (1000 metrics,
    100 params, 100 tags a call). Params are logged as text: lists as JSON, None as `null`."""
    metrics = [Metric(p.key, float(p.value), p.timestamp_ms, p.step) for p in points]
    params_ = [Param(k, _param_value(v)) for k, v in params.items()]
    tags_ = [RunTag(k, str(v)) for k, v in tags.items()]
    for i in range(0, len(metrics), 1000):
        store.client.log_batch(run_id, metrics=metrics[i : i + 1000])
    for i in range(0, len(params_), 100):
        store.client.log_batch(run_id, params=params_[i : i + 100])
    for i in range(0, len(tags_), 100):
        store.client.log_batch(run_id, tags=tags_[i : i + 100])


def param_texts(params: Mapping[str, Any]) -> dict[str, str]:
    """Params as a run stores them: text, lists as JSON, None as `null`."""
    return {k: _param_value(v) for k, v in params.items()}


def _param_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    return "null" if value is None else str(value)


def log_metrics(store: Store, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log values at one step (an epoch's metrics, the final ones) in one batch."""
    points = MetricLog(store, run_id)
    points.add(metrics, step)
    points.flush()


class MetricLog:
    """Metric points of one run, held until `flush` writes them in chunked batches.

    The engine adds each epoch's metrics and flushes at once; points within an epoch (per
    iteration) can be added as they come and go out with the epoch's, in the same calls.
    """

    def __init__(self, store: Store, run_id: str):
        self.store, self.run_id = store, run_id
        self.points: list[Point] = []

    def add(self, values: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        self.points += [Point(k, float(v), step, now) for k, v in values.items()]

    def flush(self) -> None:
        if self.points:
            log_batch(self.store, self.run_id, points=self.points)
            self.points = []


def log_json(store: Store, run_id: str, name: str, payload: Any) -> None:
    """Store a JSON artifact (config, final metrics, gradient flow) with the run."""
    store.client.log_text(run_id, json.dumps(payload, indent=2, default=str), name)


#: How SQLite and PostgreSQL say that a row with the same key went in first.
_DUPLICATE = ("UNIQUE constraint failed", "duplicate key value", "UniqueViolation")


def log_dataset(
    store: Store, run_id: str, record: DatasetRecord, context: str = "training"
) -> None:
    """Record the dataset a run used as an MLflow dataset input (the runs table's Dataset
    column): name, digest, source and split sizes (its profile); the sizes also as tags."""
    dataset = MlflowDataset(
        name=record.name,
        digest=record.digest,
        source_type="local",
        source=json.dumps({"uri": record.source or record.name}),
        profile=json.dumps(record.sizes),
    )
    tags = [InputTag("mlflow.data.context", context)]
    for attempt in range(3):  # machines that start together insert the same dataset at once
        try:
            store.client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])
            break
        except MlflowException as err:  # the loser's retry finds it there and links to it
            if attempt == 2 or not any(m in str(err) for m in _DUPLICATE):
                raise
    sizes = {TAG_TRAIN_IMAGES: record.sizes.get("train"), TAG_TEST_IMAGES: record.sizes.get("test")}
    log_batch(store, run_id, tags={k: str(v) for k, v in sizes.items() if v is not None})


def run_datasets(store: Store, run_id: str) -> list[DatasetRecord]:
    """The datasets a run recorded as inputs."""
    run = store.client.get_run(run_id)
    records = []
    for item in run.inputs.dataset_inputs if run.inputs else []:
        data = item.dataset
        source = json.loads(data.source).get("uri", "") if data.source else ""
        sizes = json.loads(data.profile) if data.profile else {}
        records.append(DatasetRecord(data.name, data.digest, source, sizes))
    return records


def log_text(store: Store, run_id: str, name: str, text: str) -> None:
    """Store a text artifact (a crash's traceback) with the run."""
    store.client.log_text(run_id, text, name)


# --------------------------------------------------------------------------------------------
# The runs of a grid.


def grid_run_id(
    store: Store,
    experiment_id: str,
    grid: Grid,
    provenance: Mapping[str, str],
    running: bool = False,
) -> str:
    """The grid's parent run: found by grid name and overrides, created on first use (tagged
    with `provenance`). `running`: the run is (re)marked RUNNING, to be ended by
    ``end_grid_run`` when the invocation ends; else a new one is ended at once."""
    found = grid_run(store, experiment_id, grid)
    if found is not None:
        if running:
            store.client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id
    overrides = overrides_tag(grid.overrides)
    spec = RunSpec(
        name=grid.name + (f" ({overrides})" if overrides else ""),
        role="grid",
        status=None,
        tags={
            TAG_GRID: grid.name,
            **({TAG_OVERRIDES: overrides} if overrides else {}),
            "mlflow.note.content": grid.spec.description,
            **{f"grid.{k}": v for k, v in grid.spec.tags.items()},
            **provenance,
        },
        params={
            "grid.axes": ", ".join(grid.axes),
            "grid.cells": str(len(grid.cells)),
            "grid.seeds": grid.spec.seeds_text,
        },
    )
    run_id = create_run(store, experiment_id, spec)
    if not running:
        store.client.set_terminated(run_id, "FINISHED")
    return run_id


def overrides_tag(overrides: Sequence[str]) -> str:
    """The ``ablate.overrides`` tag of runs made with `--set` overrides: `a=1; b=2`."""
    return "; ".join(overrides)


def tag_overrides(run: Run) -> tuple[str, ...]:
    """The `--set` overrides a run was made with (empty: the grid file as written)."""
    text = run.data.tags.get(TAG_OVERRIDES, "")
    return tuple(text.split("; ")) if text else ()


def grid_run(store: Store, experiment_id: str, grid: Grid) -> Run | None:
    """The oldest parent run of this grid with the same overrides, or None."""
    where = f"tags.`{TAG_ROLE}` = 'grid' and tags.`{TAG_GRID}` = '{grid.name}'"
    runs = store.client.search_runs(
        [experiment_id], filter_string=where, order_by=["attributes.start_time ASC"]
    )
    for run in runs:
        if tag_overrides(run) == grid.overrides:
            return run
    return None


def end_grid_run(store: Store, run_id: str, status: str, counts: Mapping[str, float] = {}) -> None:
    """End the grid's parent run with MLflow status `status` (FINISHED, FAILED, KILLED, or
    RUNNING to leave it open while cells still run elsewhere) and its summary `counts`."""
    if counts:
        log_metrics(store, run_id, counts, step=0)
    if status != "RUNNING":
        store.client.set_terminated(run_id, status)


def publish_report(store: Store, grid: Grid, folder: Path) -> bool:
    """Store a grid's report folder (report, figures, summaries) as artifacts ``report/`` of
    its parent run, so users of a shared server find it; False when the grid has no run yet."""
    found = find_experiment(store, grid.name)
    run = grid_run(store, found.experiment_id, grid) if found is not None else None
    if run is None:
        return False
    store.client.log_artifacts(run.info.run_id, str(folder), "report")
    return True


def run_active(store: Store, run_id: str) -> bool:
    """Whether a run exists and is not deleted."""
    try:
        return get_run(store, run_id).info.lifecycle_stage == "active"
    except TrackingError:  # not found in this store
        return False


def supersede_run(store: Store, run_id: str, reason: str) -> None:
    """Set a cell's partial run aside (deleted, so the cell shows one clean history; it can be
    restored in the MLflow UI): its training is not continued, the cell starts again."""
    log_batch(store, run_id, tags={TAG_REASON: reason[:4000]})
    if store.client.get_run(run_id).info.status == "RUNNING":
        store.client.set_terminated(run_id, MLFLOW_STATUS["killed"])
    store.client.delete_run(run_id)


def cell_run_spec(
    cell: Cell, parent_id: str, tags: Mapping[str, str], overrides: Sequence[str] = ()
) -> RunSpec:
    """A cell's run: named by its label, tagged with its key (and the `--set` overrides that
    made it, if any), every config field a param."""
    extra = {TAG_OVERRIDES: overrides_tag(overrides)} if overrides else {}
    return RunSpec(
        name=cell.label,
        role="cell",
        parent_id=parent_id,
        tags={TAG_KEY: cell.key, TAG_LABEL: cell.label, **extra, **tags},
        params=cell.params,
    )


# --------------------------------------------------------------------------------------------
# Reading.


def get_run(store: Store, run_id: str) -> Run:
    """A run by id; a TrackingError that says so when the store has none. Any other error (a
    server down, a store locked) is raised as it is: it says nothing about the run."""
    try:
        return store.client.get_run(run_id)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise TrackingError(
            f"run {run_id}: no such run in {masked(store.uri)}; `ablate ls GRID` lists the "
            f"runs' ids"
        ) from None


def find_experiment(store: Store, name: str) -> Experiment | None:
    """The experiment of that name (active or deleted), or None."""
    return store.client.get_experiment_by_name(name)


def first_run(store: Store, experiment_id: str, role: str, tags: Mapping[str, str]) -> Run | None:
    """The oldest run with ``ablate.role = role`` and the given tag values, or None."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in {TAG_ROLE: role, **tags}.items())
    runs = store.client.search_runs(
        [experiment_id], filter_string=where, order_by=["attributes.start_time ASC"], max_results=1
    )
    return runs[0] if runs else None


def runs_with_role(
    store: Store, experiment_id: str, role: str, newest_first: bool = False
) -> Iterator[Run]:
    """Every run of an experiment with ``ablate.role = role``, page by page."""
    order = "DESC" if newest_first else "ASC"
    token = None
    while True:
        page = store.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{TAG_ROLE}` = '{role}'",
            order_by=[f"attributes.start_time {order}"],
            max_results=1000,
            page_token=token,
        )
        yield from page
        token = page.token
        if not token:
            return


def cell_runs(store: Store, experiment_id: str) -> dict[str, Run]:
    """The newest run of each cell key in an experiment."""
    runs: dict[str, Run] = {}
    for run in runs_with_role(store, experiment_id, "cell", newest_first=True):
        runs.setdefault(run.data.tags.get(TAG_KEY, ""), run)
    return runs


def cell_status(run: Run | None) -> str:
    """The cell state a run shows: new, running, finished, diverged, failed or killed."""
    if run is None:
        return "new"
    status = run.data.tags.get(TAG_STATUS, "running")
    if run.info.status == "RUNNING" and MLFLOW_STATUS.get(status) != "RUNNING":
        return "running"  # a kill cut its end short: the rerun continues it and ends it
    return status


def logged_keys(store: Store, run_id: str) -> set[str]:
    """The metrics a run has recorded so far, at any step."""
    return set(store.client.get_run(run_id).data.metrics)


def logged_steps(store: Store, run_id: str, key: str = "train_err") -> set[int]:
    """The steps of `key` already recorded for a run: epochs by default, iterations for a point
    metric (to fill gaps on resume without repeats)."""
    return {m.step for m in store.client.get_metric_history(run_id, key)}


def metric_points(store: Store, run_ids: Sequence[str], keys: Sequence[str]) -> list[Point]:
    """Every logged value of `keys` for `run_ids`, with their run ids. One query per key for
    all runs where the store allows it (the SQLAlchemy store behind ``sqlite:///``), else one
    call per run and key."""
    backend = getattr(getattr(store.client, "_tracking_client", None), "store", None)
    bulk = getattr(backend, "get_metric_history_bulk", None)
    points: list[Point] = []
    for key in keys:
        if bulk is not None:
            for i in range(0, len(run_ids), 500):
                for m in bulk(list(run_ids[i : i + 500]), key, max_results=2**31 - 1):
                    points.append(Point(key, m.value, m.step, m.timestamp, m.run_id))
        else:
            for run_id in run_ids:
                for m in store.client.get_metric_history(run_id, key):
                    points.append(Point(key, m.value, m.step, m.timestamp, run_id))
    return points


def download_json(store: Store, run_id: str, name: str) -> Any:
    """Fetch one small JSON artifact of a run (no progress bar on the terminal)."""
    previous = os.environ.get(_PROGRESS)
    os.environ[_PROGRESS] = "false"
    try:
        with tempfile.TemporaryDirectory(prefix="ablate-") as tmp:
            path = store.client.download_artifacts(run_id, name, tmp)
            return json.loads(Path(path).read_text(encoding="utf-8"))
    finally:
        if previous is None:
            os.environ.pop(_PROGRESS, None)
        else:
            os.environ[_PROGRESS] = previous


def runs_table_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table in the UI's "Model training" mode (MLflow 3 opens an
    experiment on its GenAI overview otherwise)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def compare_url(base: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """The UI's compare view of these runs (its route takes the ids as JSON lists)."""
    runs = urllib.parse.quote(json.dumps(list(run_ids)), safe="")
    experiments = urllib.parse.quote(json.dumps([experiment_id]), safe="")
    return f"{base.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


def server_base(uri: str) -> str | None:
    """The UI address of an http(s) tracking server (without credentials), else None."""
    if not uri.startswith(("http://", "https://")):
        return None
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]  # never put credentials into a report
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def ui_url(uri: str, experiment_id: str, run_id: str, ui_base: str | None = None) -> str:
    """Link to a run in the MLflow UI (the server itself, or `ablate ui`'s default address)."""
    base = ui_base or server_base(uri) or "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

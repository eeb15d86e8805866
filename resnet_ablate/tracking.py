"""Everything MLflow: the store, the experiment of a grid, its parent run, and one run per cell.

The record a grid leaves in MLflow (the report and `ablate ls` read only this):

- experiment: named after the grid; tag ``ablate.description``.
- parent run: named after the grid; tags ``ablate.role=grid``, ``ablate.grid``.
- one child run per cell (``mlflow.parentRunId`` = the parent), named by the cell's label, tagged
  ``ablate.role=cell``, ``ablate.cell_key``, ``ablate.label``, ``ablate.status`` (running,
  finished, diverged, failed, killed), ``ablate.reason`` (why it diverged or failed),
  ``ablate.git_commit``, ``ablate.torch_version``, ``ablate.device``, ``ablate.precision``,
  ``ablate.settings`` (``default`` or how tuned values were chosen); every config field as a flat
  param (``model.depth``); metrics ``model_params`` and ``model_macs`` (step 0); per-epoch metrics
  (step = epoch, from 1): ``train_loss``, ``train_err``, ``test_loss``, ``test_err``, ``val_loss``,
  ``val_err`` (when the grid holds out a validation split), ``lr``, ``epoch_seconds``,
  ``images_per_second``; errors in percent. At the end: ``final_train_err``,
  ``final_test_err``, ``best_test_err``, ``best_test_epoch``, ``wall_seconds``, and artifacts
  ``config.json`` (resolved config, key, label), ``final_metrics.json`` and ``grad_flow.json``
  (per-layer gradient norms of the main-path convolutions at the first and last epoch).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from .config import Cell, Grid

TAG_ROLE = "ablate.role"
TAG_GRID = "ablate.grid"
TAG_KEY = "ablate.cell_key"
TAG_LABEL = "ablate.label"
TAG_STATUS = "ablate.status"
TAG_REASON = "ablate.reason"
TAG_RESUMED = "ablate.resumed_from_epoch"
TAG_DESCRIPTION = "ablate.description"
TAG_SETTINGS = "ablate.settings"
TAG_PARENT = "mlflow.parentRunId"

#: Cell states as the record shows them. `new` cells have no run yet.
DONE = ("finished", "diverged")
STATES = ("new", "running", "finished", "diverged", "failed", "killed")
_MLFLOW_STATUS = {
    "running": "RUNNING",
    "finished": "FINISHED",
    "diverged": "FINISHED",
    "failed": "FAILED",
    "killed": "KILLED",
}


class TrackingError(UserError):
    """The tracking store cannot be used: the message says which and what to do."""


def default_uri(results: Path) -> str:
    """The embedded store: ``sqlite:///<results>/mlflow.db`` (absolute, so workers agree)."""
    return f"sqlite:///{(results / 'mlflow.db').resolve()}"


def resolve_uri(uri: str | None, results: Path) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded SQLite store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(results)


def check_results_dir(results: Path) -> None:
    """Make sure results/ can be written before anything trains."""
    if results.exists() and not results.is_dir():
        raise TrackingError(f"{results}: is a file, not a folder; pass --results DIR")
    try:
        results.mkdir(parents=True, exist_ok=True)
        probe = results / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise TrackingError(
            f"{results}: cannot write results here ({err.strerror or err}); "
            f"fix its permissions or pass --results DIR"
        ) from None


def check_server(uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking URI must answer ``/health`` before any training starts."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        problem = f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        problem = str(getattr(err, "reason", err))
    raise TrackingError(
        f"tracking server {uri} is unreachable ({problem}); start it (mlflow server) or "
        f"point --tracking-uri elsewhere"
    )


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
    import logging

    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        with lock:  # creating a new SQLite store from two processes at once races
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
    except Exception as err:
        raise TrackingError(f"tracking store {uri} cannot be opened: {_first_line(err)}") from None
    return Store(uri=uri, client=client, artifact_root=artifact_root)


def existing_store(uri: str | None, results: Path) -> Store | None:
    """The tracking store if it is there already; an embedded one is never created here."""
    uri = resolve_uri(uri, results)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None
    return open_store(uri, results)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on a file, held for the block (one machine, many processes)."""
    import fcntl

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
# Runs.


def grid_run_id(store: Store, experiment_id: str, grid: Grid) -> str:
    """The grid's parent run: found by tag, created on first use."""
    runs = store.client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_ROLE}` = 'grid' and tags.`{TAG_GRID}` = '{grid.name}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if runs:
        return runs[0].info.run_id
    run = store.client.create_run(
        experiment_id,
        run_name=grid.name,
        tags={
            TAG_ROLE: "grid",
            TAG_GRID: grid.name,
            "mlflow.note.content": grid.spec.description,
            **{f"grid.{k}": v for k, v in grid.spec.tags.items()},
            **provenance(),
        },
    )
    from mlflow.entities import Param

    params = [
        Param("grid.axes", ", ".join(grid.axes)),
        Param("grid.cells", str(len(grid.cells))),
        Param("grid.seeds", ",".join(map(str, grid.spec.seeds))),
    ]
    store.client.log_batch(run.info.run_id, params=params)
    store.client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


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
    return run.data.tags.get(TAG_STATUS, "running")


def start_cell_run(
    store: Store,
    experiment_id: str,
    parent_id: str,
    cell: Cell,
    tags: Mapping[str, str],
    existing: str | None = None,
) -> str:
    """Create the cell's run, or mark an interrupted one running again (same run continues)."""
    from mlflow.entities import Param

    if existing is not None:
        store.client.update_run(existing, status="RUNNING")
        store.client.set_tag(existing, TAG_STATUS, "running")
        store.client.set_tag(existing, TAG_REASON, "")
        return existing
    run = store.client.create_run(
        experiment_id,
        run_name=cell.label,
        tags={
            TAG_PARENT: parent_id,
            TAG_ROLE: "cell",
            TAG_KEY: cell.key,
            TAG_LABEL: cell.label,
            TAG_STATUS: "running",
            **provenance(),
            **tags,
        },
    )
    run_id = run.info.run_id
    params = [Param(k, _param_value(v)) for k, v in cell.params.items()]
    for i in range(0, len(params), 100):
        store.client.log_batch(run_id, params=params[i : i + 100])
    return run_id


def _param_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    return "null" if value is None else str(value)


def log_metrics(store: Store, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log one epoch's metrics in a single batch call."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(batch), 1000):
        store.client.log_batch(run_id, metrics=batch[i : i + 1000])


def logged_steps(store: Store, run_id: str, key: str = "train_err") -> set[int]:
    """The epochs already recorded for a run (to fill gaps on resume without repeats)."""
    return {m.step for m in store.client.get_metric_history(run_id, key)}


def log_json(store: Store, run_id: str, name: str, payload: Any) -> None:
    """Store a JSON artifact (config, final metrics, gradient flow) with the run."""
    store.client.log_text(run_id, json.dumps(payload, indent=2, default=str), name)


def log_text(store: Store, run_id: str, name: str, text: str) -> None:
    store.client.log_text(run_id, text, name)


def end_cell_run(store: Store, run_id: str, status: str, reason: str = "") -> None:
    """Record the cell's final state: finished, diverged, failed or killed."""
    store.client.set_tag(run_id, TAG_STATUS, status)
    if reason:
        store.client.set_tag(run_id, TAG_REASON, reason[:4000])
    store.client.set_terminated(run_id, _MLFLOW_STATUS[status])


@functools.cache
def provenance() -> dict[str, str]:
    """Git commit of the code that ran (``+dirty`` when modified), torch and package versions."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("resnet-ablate")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        version = "source"
    tags = {"ablate.version": version}
    try:
        import torch

        tags["ablate.torch_version"] = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        tags["ablate.git_commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        tags["ablate.git_commit"] = "unknown"
    return tags


def ui_url(uri: str, experiment_id: str, run_id: str, ui_base: str | None = None) -> str:
    """Link to a run in the MLflow UI (the server itself, or `ablate ui`'s default address)."""
    if ui_base is None and uri.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(uri)
        netloc = parts.netloc.rsplit("@", 1)[-1]  # never put credentials into a report
        ui_base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    base = ui_base or "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

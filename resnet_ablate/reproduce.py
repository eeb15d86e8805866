"""`ablate reproduce RUN_ID`: train a cell again from its MLflow record alone and say how far
the new curves are from the recorded ones.

The record holds all it takes: the resolved configuration (``config.json``, with the seed), the
code's commit and the dataset's digest (its input). Both are checked against what is here now
and every difference is said before training. The new run is a sibling of the original (same
parent), tagged ``ablate.reproduces`` = the original's id, with role ``reproduction`` so that it
never stands in for the cell in ``ablate ls`` or the report. On the same machine type and thread
count the curves match exactly; elsewhere the differences are printed next to the spread of the
same configuration's final values over its seeds in the experiment.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Run
from pydantic import ValidationError

from . import tracking
from .config import Cell, CellConfig
from .device import ExecOptions
from .engine import Ending, Hooks, Job, Worker, dataset_record_for, train_tracked
from .errors import UserError
from .provenance import TAG_COMMIT, provenance

TAG_REPRODUCES = "ablate.reproduces"
#: The per-epoch curves compared, in this order.
CURVES = ("train_loss", "train_err", "test_loss", "test_err", "lr")


@dataclass(frozen=True)
class Original:
    """A cell's run as recorded: its configuration and what it was made from."""

    run: Run
    cell: Cell
    commit: str
    digest: str


@dataclass(frozen=True)
class Difference:
    """The largest per-epoch difference of one curve between the original and the new run,
    and the sd of its final value over the seeds of the same configuration (nan: one seed)."""

    metric: str
    largest: float
    epoch: int
    seed_sd: float = math.nan
    seeds: int = 0


@dataclass
class Reproduction:
    original: Original
    run_id: str
    ending: Ending
    mismatches: list[str] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)


def load_original(store: tracking.Store, run_id: str) -> Original:
    """The cell a run trained, rebuilt from its record; a clear error if it is not a cell's run."""
    run = tracking.get_run(store, run_id)
    if run.data.tags.get(tracking.TAG_ROLE) not in ("cell", "reproduction"):
        raise UserError(f"run {run_id} is not a grid cell's run; give the id of a cell's run")
    payload = tracking.download_json(store, run_id, "config.json")
    fields = {k: payload[k] for k in ("data", "model", "train", "seed") if k in payload}
    try:
        cell = Cell(CellConfig.model_validate(fields))
    except ValidationError as err:
        raise UserError(
            f"run {run_id}: its config.json is not a configuration this version reads "
            f"({err.errors()[0]['msg']})"
        ) from None
    recorded = run.data.tags.get(tracking.TAG_KEY)
    if recorded and recorded != cell.key:
        raise UserError(
            f"run {run_id}: its config.json gives cell key {cell.key}, its tag says {recorded}; "
            f"the record was made by another version of the configuration schema"
        )
    inputs = tracking.run_datasets(store, run_id)
    return Original(
        run=run,
        cell=cell,
        commit=run.data.tags.get(TAG_COMMIT, run.data.tags.get("ablate.git_commit", "unknown")),
        digest=inputs[0].digest if inputs else "",
    )


def check(original: Original) -> list[str]:
    """What differs between the record and here: the code's commit, the dataset's digest."""
    here = provenance()
    mismatches = []
    commit = here.get(TAG_COMMIT, "unknown")
    if original.commit != commit:
        mismatches.append(f"code: the run was made at commit {original.commit}, this is {commit}")
    if here.get("ablate.git_dirty") == "true":
        mismatches.append("code: this checkout has uncommitted changes")
    if original.run.data.tags.get("ablate.git_dirty") == "true":
        mismatches.append("code: the run was made from a checkout with uncommitted changes")
    digest = dataset_record_for(original.cell.config.data).digest
    if not original.digest:
        mismatches.append("data: the run recorded no dataset digest, so the data is unchecked")
    elif original.digest != digest:
        mismatches.append(f"data: the run's dataset digest is {original.digest}, here {digest}")
    return mismatches


def reproduce(
    store: tracking.Store, run_id: str, exec_options: ExecOptions, results: Path
) -> Reproduction:
    """Check, retrain and compare one cell's run (see the module docstring)."""
    original = load_original(store, run_id)
    mismatches = check(original)
    run = original.run
    label = run.data.tags.get(tracking.TAG_LABEL, run.info.run_name)
    parent = run.data.tags.get(tracking.TAG_PARENT)
    spec = tracking.RunSpec(
        name=f"{label} (reproduction)",
        role="reproduction",
        parent_id=parent,
        tags={
            tracking.TAG_KEY: original.cell.key,
            tracking.TAG_LABEL: label,
            TAG_REPRODUCES: run_id,
        },
        params=original.cell.params,
    )
    job = Job(
        key=original.cell.key,
        label=label,
        config=original.cell.config,
        run=spec,
        checkpoint=results / "checkpoints" / "reproduce" / f"{run_id}.pt",
    )
    worker = Worker(0, exec_options, store, run.info.experiment_id, lambda event: None)
    started: list[str] = []
    ending = train_tracked(job, worker, Hooks(started=started.append))
    done = Reproduction(original, started[0], ending, mismatches)
    done.differences = compare(store, original, started[0])
    return done


def compare(store: tracking.Store, original: Original, new_id: str) -> list[Difference]:
    """The largest per-epoch difference of each curve, and its seed spread."""
    old_id = original.run.info.run_id
    points = tracking.metric_points(store, [old_id, new_id], CURVES)
    curves: dict[tuple[str, str], dict[int, float]] = {}
    for p in points:
        curves.setdefault((p.run_id, p.key), {})[p.step] = p.value
    spread = seed_spread(store, original)
    differences = []
    for metric in CURVES:
        old, new = curves.get((old_id, metric), {}), curves.get((new_id, metric), {})
        common = sorted(set(old) & set(new))
        if not common:
            continue
        gaps = [(abs(new[e] - old[e]), e) for e in common]
        largest, epoch = max(gaps)
        sd, n = spread.get(metric, (math.nan, 0))
        differences.append(Difference(metric, largest, epoch, sd, n))
    return differences


def seed_spread(store: tracking.Store, original: Original) -> dict[str, tuple[float, int]]:
    """Per curve: the sd of the last epoch's value over the finished runs of the same
    configuration with other seeds (and the original), and how many runs that is."""
    mine = {k: v for k, v in original.cell.params.items() if k != "seed"}
    siblings = []
    for run in tracking.cell_runs(store, original.run.info.experiment_id).values():
        params = {k: v for k, v in run.data.params.items() if k != "seed"}
        if tracking.cell_status(run) in tracking.DONE and params == _text(mine):
            siblings.append(run.info.run_id)
    if len(siblings) < 2:
        return {}
    last: dict[tuple[str, str], tuple[int, float]] = {}
    for p in tracking.metric_points(store, siblings, CURVES):
        if p.step >= last.get((p.run_id, p.key), (-1, 0.0))[0]:
            last[(p.run_id, p.key)] = (p.step, p.value)
    spread = {}
    for metric in CURVES:
        values = [v for (run_id, key), (_, v) in last.items() if key == metric]
        if len(values) >= 2:
            spread[metric] = (statistics.stdev(values), len(values))
    return spread


def _text(params: dict) -> dict[str, str]:
    """Params as MLflow stores them (text), to compare with a run's."""
    return tracking.param_texts(params)

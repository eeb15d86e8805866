"""`ablate tune GRID`: the same hyper-parameter budget for every variant of a grid (Optuna).

An ablation that tunes one arm and not the other proves nothing, so every configuration of the
grid gets its own study with the same number of trials, search space, sampler and pruner, and
``ablate run GRID --tuned`` then trains each cell with its study's best values.

- **One study per configuration, not per cell.** Cells that differ only in their seed share a
  study and its tuned values, so the seeds still measure the spread of one setting. Trials
  train with the configuration's first seed (the grid's first seed). A study is named
  ``tune:<grid>:<key>``; the key hashes what a trial computes: the resolved configuration
  without the tuned fields (their defaults do not matter), with the trial's seed and epochs,
  plus the search space, sampler and pruner. Changing any of those starts new studies; raising
  ``trials`` continues the old ones.
- **Objective: final validation error.** A trial trains the configuration with the suggested
  values for ``tune.epochs`` epochs (default ``train.epochs``; the learning-rate schedule spans
  the trial's epochs) and is scored by ``val_err`` (%) after its last epoch: the error a run
  ends at, not its best epoch, which would favour settings that peak early and then fall back.
  Test images never enter a trial: the trainer's test evaluation is pointed at the validation
  split and nothing it reports under ``test_*`` is logged. A trial that diverges completes with
  100 %, the worst error, so that the sampler learns to avoid its region.
- **Median pruning** (``pruner: median``): after every epoch but the last, a trial whose
  validation error is above the median of the complete trials at that epoch stops as PRUNED.
  It starts once ``max(1, min(5, trials // 4))`` trials are complete. TPE draws its first
  ``max(2, min(10, trials // 3))`` trials at random; samplers are seeded from the study key,
  the trial count and the worker, so one worker on a fresh study repeats itself.
- **Equal budget, exactly.** A study is done when it has ``trials`` finished trials (COMPLETE
  or PRUNED). A worker asks for a trial only while the finished and live running trials are
  fewer than that, and keeps a trial only if fewer than ``trials`` lower-numbered trials are
  finished, waiting or running in a live process (the storage numbers trials atomically); a
  surplus trial is withdrawn (FAIL, ``surplus``) before it trains. Several workers or several
  ``ablate tune`` at once therefore never overshoot. Failed trials do not count; they are run
  again. The best trial (lowest score, earliest on a tie) is chosen among the first ``trials``
  finished ones, so a study tuned further under a larger budget stays comparable.
- **Resumable.** Studies live in the runner's Optuna storage (``results/queue/<grid>.journal``
  or ``--queue``). A running trial carries its host, pid and a heartbeat, as a queued cell does
  (``cellqueue.py``); a rerun fails the trials whose process is gone, marks their MLflow runs
  killed, and continues every study up to its budget. The trial is the unit of resumption: an
  interrupted trial starts again, with new suggested values.
- **MLflow** (logged here: Optuna's MLflow callback is deprecated and loses parent links).
  Under the grid's parent run, one *tuning run* per configuration, named ``tune <label>``:
  tags ``ablate.role=tune``, ``ablate.cell_key`` (the study key), ``ablate.label``,
  ``ablate.study``, ``ablate.cells`` (the grid cells it tunes), ``ablate.trials_budget``,
  ``ablate.status``, and after each tune ``ablate.best_trial``, ``ablate.best_values`` (JSON),
  ``ablate.trials_finished``; params ``tune.sampler``, ``tune.pruner``, ``tune.epochs``,
  ``tune.seed``, ``tune.metric``, ``tune.space.<field>`` and the configuration's fields; metric
  ``best_val_err``. Under it, one run per trial, named ``<label> trial <n>``: tags
  ``ablate.role=trial``, ``ablate.trial`` (its number), ``ablate.cell_key``, ``ablate.study``,
  ``ablate.suggested`` (JSON of the suggested values), ``ablate.status`` (running, complete,
  pruned, diverged, failed, killed), ``ablate.reason``; every config field as a param; per
  epoch ``train_loss``, ``train_err``, ``val_loss``, ``val_err``, ``lr``, ``epoch_seconds``,
  ``images_per_second``; at the end ``objective`` (the score Optuna was given; complete and
  diverged trials) and ``final_val_err``.

Tuned cells (``apply_tuned``) keep their labels with ``settings=tuned`` added, so that default
and tuned runs of a cell tell themselves apart in the MLflow UI and the report.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import tracking
from .config import (
    EXECUTION_FIELDS,
    Cell,
    CellConfig,
    FloatRange,
    Grid,
    TuneSpec,
    expand,
    flatten,
)
from .errors import UserError

if TYPE_CHECKING:
    import optuna
    from rich.console import Console

    from .data import Dataset
    from .runner import Emit
    from .train import ExecOptions

METRIC = "val_err"
OBJECTIVE = "final val_err (%) after the trial's last epoch"
DIVERGED_SCORE = 100.0
#: Trial statuses that count toward a study's budget (Optuna COMPLETE or PRUNED).
FINISHED = ("complete", "pruned", "diverged")
TRIAL_STATUSES = ("running", *FINISHED, "failed", "killed")
_MLFLOW_STATUS = {
    "complete": "FINISHED",
    "pruned": "FINISHED",
    "diverged": "FINISHED",
    "failed": "FAILED",
    "killed": "KILLED",
}
#: Added to a tuned cell's `varying`, so its label reads `plain-56 basic post settings=tuned s0`.
TUNED = ("settings", "tuned")
TUNED_TOKEN = "settings=tuned"

TAG_TRIAL = "ablate.trial"
TAG_STUDY = "ablate.study"
TAG_SUGGESTED = "ablate.suggested"
TAG_CELLS = "ablate.cells"
TAG_BUDGET = "ablate.trials_budget"
TAG_FINISHED = "ablate.trials_finished"
TAG_BEST_TRIAL = "ablate.best_trial"
TAG_BEST_VALUES = "ablate.best_values"


# --------------------------------------------------------------------------------------------
# Studies: which configurations are tuned, and what a trial trains.


@dataclass(frozen=True)
class Target:
    """One study: a configuration of the grid (its cells at every seed) and its trials' base."""

    study: str  # Optuna study name, tune:<grid>:<key>
    key: str  # hash of what a trial computes (tuned fields left out) and the search
    label: str  # the configuration: `plain-56 basic post`
    base: Cell  # what a trial trains before the suggested values: first seed, trial epochs
    cells: tuple[Cell, ...]  # the grid's cells that take this study's values


def tune_spec(grid: Grid) -> TuneSpec:
    """The grid's tune section, or a UserError saying how to add one."""
    if grid.spec.tune is None:
        raise UserError(
            f"{grid.path}: has no tune: section; add one (params, trials, epochs) to tune "
            f"this grid, see experiments/smoke-tune.yaml"
        )
    return grid.spec.tune


def config_label(cell: Cell) -> str:
    """A cell's label without its seed (and without the tuned marker): `plain-56 basic post`."""
    return " ".join(t for t in cell.label.split(" ")[:-1] if t != TUNED_TOKEN)


def study_key(config: CellConfig, spec: TuneSpec) -> str:
    """Short stable hash of a trial's base configuration (tuned fields left out) and search."""
    flat = {
        k: v
        for k, v in flatten(config).items()
        if k not in EXECUTION_FIELDS and k not in spec.params
    }
    search = spec.model_dump(mode="json", include={"params", "sampler", "pruner"})
    blob = json.dumps(
        {"config": flat, "search": search}, sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def targets(grid: Grid) -> list[Target]:
    """One target per configuration of the grid (cells equal but for the seed), in grid order."""
    spec = tune_spec(grid)
    groups: dict[str, list[Cell]] = {}
    for cell in grid.cells:
        unseeded = Cell(cell.config.model_copy(update={"seed": 0})).key
        groups.setdefault(unseeded, []).append(cell)
    found = []
    for cells in groups.values():
        first = cells[0]
        epochs = spec.epochs or first.config.train.epochs
        train = first.config.train.model_copy(update={"epochs": epochs})
        config = first.config.model_copy(update={"train": train})
        key = study_key(config, spec)
        varying = tuple(v for v in first.varying if v != TUNED)
        found.append(
            Target(
                study=f"tune:{grid.name}:{key}",
                key=key,
                label=config_label(first),
                base=Cell(config=config, varying=varying),
                cells=tuple(cells),
            )
        )
    return found


def with_values(config: CellConfig, values: Mapping[str, Any]) -> CellConfig:
    """The configuration with tuned train.* values substituted (validated again)."""
    train = config.train.model_dump()
    for name, value in values.items():
        train[name.split(".", 1)[1]] = value
    return CellConfig.model_validate({**config.model_dump(), "train": train})


def is_tuned(cell: Cell) -> bool:
    return TUNED in cell.varying


def tuned_grid(grid: Grid, best: Mapping[str, Mapping[str, Any]]) -> Grid:
    """The grid with every cell given its study's best values (`best`: study key -> values)."""
    replaced: dict[str, Cell] = {}
    for target in targets(grid):
        for cell in target.cells:
            replaced[cell.key] = Cell(
                config=with_values(cell.config, best[target.key]),
                varying=tuple(v for v in cell.varying if v != TUNED) + (TUNED,),
            )
    return Grid(spec=grid.spec, cells=tuple(replaced[c.key] for c in grid.cells), path=grid.path)


def default_grid(grid: Grid) -> Grid:
    """The grid with its default settings: itself, or the cells `apply_tuned` started from."""
    if not any(is_tuned(cell) for cell in grid.cells):
        return grid
    raw = grid.spec.model_dump(mode="python")
    return expand(raw, grid.path, sliced=True)


def describe_space(spec: TuneSpec) -> dict[str, str]:
    """`{"train.lr": "log-uniform 0.01 to 0.3", "train.weight_decay": "one of 0.0001, 0.0005"}`."""
    out = {}
    for name, space in spec.params.items():
        if isinstance(space, FloatRange):
            kind = "log-uniform" if space.log else "uniform"
            out[name] = f"{kind} {space.low:g} to {space.high:g}"
        else:
            out[name] = "one of " + ", ".join(_short(c) for c in space.choices)
    return out


def describe_method(spec: TuneSpec, epochs: Sequence[int]) -> str:
    """`TPE sampler, median pruner, 2-epoch trials, scored by final val_err`."""
    sampler = {"tpe": "TPE sampler", "random": "random sampler"}[spec.sampler]
    pruner = {"median": "median pruner on val_err per epoch", "none": "no pruning"}[spec.pruner]
    spans = sorted(set(epochs))
    length = "-".join(map(str, spans[:1])) if len(spans) == 1 else "/".join(map(str, spans))
    return f"{sampler}, {pruner}, {length}-epoch trials, scored by final val_err"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def values_text(values: Mapping[str, Any]) -> str:
    """`train.lr=0.0712, train.weight_decay=0.0005`."""
    return ", ".join(f"{k}={_short(v)}" for k, v in values.items())


# --------------------------------------------------------------------------------------------
# Samplers, pruners, suggestions.


def make_sampler(spec: TuneSpec, seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, spec.trials // 3)))


def make_pruner(spec: TuneSpec) -> optuna.pruners.BasePruner:
    import optuna

    if spec.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=max(1, min(5, spec.trials // 4)))


def _seed(key: str, count: int, worker: int) -> int:
    """Sampler seed for the next trial: repeatable for one worker, distinct between workers."""
    return int(hashlib.sha256(f"{key}:{count}:{worker}".encode()).hexdigest()[:8], 16)


def suggest(trial: optuna.trial.Trial, spec: TuneSpec) -> dict[str, Any]:
    """Ask the trial for a value of every field of the search space."""
    values: dict[str, Any] = {}
    for name, space in spec.params.items():
        if isinstance(space, FloatRange):
            values[name] = trial.suggest_float(name, space.low, space.high, log=space.log)
        elif all(c is None or isinstance(c, bool | int | float | str) for c in space.choices):
            values[name] = trial.suggest_categorical(name, space.choices)
        else:  # lists (milestones): Optuna's categories are scalars, so go through JSON
            chosen = trial.suggest_categorical(name, [json.dumps(c) for c in space.choices])
            values[name] = json.loads(chosen)
    return values


# --------------------------------------------------------------------------------------------
# A study's state in Optuna storage.


@dataclass
class StudyState:
    """How far a study is: finished trials, live running ones, failures, and its best trial."""

    target: Target
    finished: int = 0
    running: int = 0
    failed: int = 0
    best_number: int | None = None
    best_value: float = math.nan
    best_values: dict[str, Any] = field(default_factory=dict)

    @property
    def taken(self) -> int:
        """Budget slots used: finished trials and trials running in a live process."""
        return self.finished + self.running


def _finished(trial: optuna.trial.FrozenTrial) -> bool:
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)


def study_state(
    storage: optuna.storages.BaseStorage, target: Target, budget: int
) -> StudyState | None:
    """The study's state, or None when it does not exist yet. The best trial is chosen among
    the first `budget` finished trials only (a study tuned further under a larger budget
    keeps an equal budget with the others when the budget is lowered again)."""
    from optuna.trial import TrialState

    from .cellqueue import owner_alive

    try:
        study_id = storage.get_study_id_from_name(target.study)
    except KeyError:
        return None
    now = time.time()
    state = StudyState(target)
    counted = []
    for trial in sorted(storage.get_all_trials(study_id, deepcopy=False), key=lambda t: t.number):
        if _finished(trial):
            state.finished += 1
            if len(counted) < budget:
                counted.append(trial)
        elif trial.state == TrialState.RUNNING and owner_alive(trial, now):
            state.running += 1
        elif trial.state == TrialState.FAIL and not trial.user_attrs.get("surplus"):
            state.failed += 1
    complete = [t for t in counted if t.state == TrialState.COMPLETE and t.value is not None]
    if complete:
        best = min(complete, key=lambda t: (t.value, t.number))
        state.best_number, state.best_value = best.number, float(best.value)
        state.best_values = dict(best.user_attrs.get("values") or best.params)
    return state


def _within_budget(
    storage: optuna.storages.BaseStorage, study_id: int, number: int, budget: int
) -> bool:
    """Whether a new trial fits: fewer than `budget` lower-numbered trials hold a slot."""
    from optuna.trial import TrialState

    from .cellqueue import owner_alive

    now = time.time()
    ahead = 0
    for trial in storage.get_all_trials(study_id, deepcopy=False):
        if trial.number >= number:
            continue
        live = trial.state == TrialState.RUNNING and owner_alive(trial, now)
        if _finished(trial) or live or trial.state == TrialState.WAITING:
            ahead += 1
    return ahead < budget


# --------------------------------------------------------------------------------------------
# `run --tuned`: the best values of every study, substituted into the grid.


def _existing_storage(
    grid: Grid, results: Path, queue: str | None
) -> optuna.storages.BaseStorage | None:
    """The grid's Optuna storage, or None when its journal file does not exist (never created)."""
    from .cellqueue import storage_for

    if not (queue and "://" in queue):
        path = Path(queue) if queue else results / "queue" / f"{grid.name}.journal"
        if not path.exists():
            return None
    return storage_for(queue, results, grid.name)


def apply_tuned(grid: Grid, *, results: Path, queue: str | None) -> tuple[Grid, str]:
    """Each cell with its study's best values, and the `ablate.settings` text for its runs.

    Every study must have its full budget of finished trials: a grid is run with tuned values
    only when every configuration had the same tuning.
    """
    import optuna

    spec = tune_spec(grid)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _existing_storage(grid, results, queue)
    found = targets(grid)
    best: dict[str, dict[str, Any]] = {}
    for target in found:
        state = study_state(storage, target, spec.trials) if storage is not None else None
        done = 0 if state is None else state.finished
        if state is None or done < spec.trials:
            raise UserError(
                f"{target.label}: tuning is not finished ({done} of {spec.trials} trials); "
                f"run `ablate tune {grid.path}` (with the same --set options) first"
            )
        if state.best_number is None:
            raise UserError(
                f"{target.label}: every tuning trial was pruned, so there is no best value; "
                f"raise tune.trials and run `ablate tune {grid.path}` again"
            )
        best[target.key] = state.best_values
    return tuned_grid(grid, best), settings_text(spec, found, best)


def settings_text(
    spec: TuneSpec, found: Sequence[Target], best: Mapping[str, Mapping[str, Any]]
) -> str:
    """`tuned: best of 8 trials (train.lr=0.071; TPE sampler, ...)` for the ablate.settings tag.

    With several configurations the values differ per cell: they are in each run's params and
    in the report, and the text names the fields instead.
    """
    method = describe_method(spec, [t.base.config.train.epochs for t in found])
    if len(found) == 1:
        chosen = values_text(best[found[0].key])
        return f"tuned: best of {spec.trials} trials ({chosen}; {method})"
    fields = ", ".join(spec.params)
    return f"tuned: best of {spec.trials} trials per configuration ({fields}; {method})"


# --------------------------------------------------------------------------------------------
# MLflow: a tuning run per configuration, a run per trial.


def tuning_run(
    store: tracking.Store, experiment_id: str, parent_id: str, grid: Grid, target: Target
) -> str:
    """The configuration's tuning run (found by study key, or created), marked running."""
    from mlflow.entities import Param, RunTag

    spec = tune_spec(grid)
    tags = {
        tracking.TAG_STATUS: "running",
        TAG_BUDGET: str(spec.trials),
        TAG_CELLS: ",".join(c.key for c in target.cells),
    }
    found = store.client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{tracking.TAG_ROLE}` = 'tune' and tags.`{tracking.TAG_KEY}` = '{target.key}'"
        ),
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
        store.client.update_run(run_id, status="RUNNING")
        store.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        return run_id
    run = store.client.create_run(
        experiment_id,
        run_name=f"tune {target.label}",
        tags={
            tracking.TAG_PARENT: parent_id,
            tracking.TAG_ROLE: "tune",
            tracking.TAG_GRID: grid.name,
            tracking.TAG_KEY: target.key,
            tracking.TAG_LABEL: target.label,
            TAG_STUDY: target.study,
            **tags,
            **tracking.provenance(),
        },
    )
    config = target.base.config
    params = {
        "tune.sampler": spec.sampler,
        "tune.pruner": spec.pruner,
        "tune.epochs": config.train.epochs,
        "tune.seed": config.seed,
        "tune.metric": OBJECTIVE,
        **{f"tune.space.{k}": v for k, v in describe_space(spec).items()},
        **{k: v for k, v in flatten(config).items() if k not in spec.params and k != "seed"},
    }
    batch = [Param(k, tracking._param_value(v)) for k, v in params.items()]
    for i in range(0, len(batch), 100):
        store.client.log_batch(run.info.run_id, params=batch[i : i + 100])
    return run.info.run_id


def close_tuning_run(
    store: tracking.Store, run_id: str, state: StudyState | None, budget: int, interrupted: bool
) -> None:
    """Record the study's best trial on its tuning run, and end the run."""
    from mlflow.entities import RunTag

    finished = state.finished if state else 0
    tags = {TAG_FINISHED: str(finished)}
    if state is not None and state.best_number is not None:
        tags[TAG_BEST_TRIAL] = str(state.best_number)
        tags[TAG_BEST_VALUES] = json.dumps(state.best_values)
        tracking.log_metrics(store, run_id, {"best_val_err": state.best_value}, step=finished)
    if finished >= budget:
        status, mlflow_status = "finished", "FINISHED"
    elif interrupted:
        status, mlflow_status = "killed", "KILLED"
    else:
        status, mlflow_status = "failed", "FAILED"
    tags[tracking.TAG_STATUS] = status
    store.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    store.client.set_terminated(run_id, mlflow_status)


def start_trial_run(
    store: tracking.Store,
    ctx: TuneContext,
    target: Target,
    number: int,
    config: CellConfig,
    values: Mapping[str, Any],
    device_tags: Mapping[str, str],
) -> str:
    """A trial's run, nested under its configuration's tuning run."""
    from mlflow.entities import Param

    run = store.client.create_run(
        ctx.experiment_id,
        run_name=f"{target.label} trial {number}",
        tags={
            tracking.TAG_PARENT: ctx.tuning_runs[target.key],
            tracking.TAG_ROLE: "trial",
            tracking.TAG_GRID: ctx.grid.name,
            tracking.TAG_KEY: target.key,
            tracking.TAG_LABEL: target.label,
            tracking.TAG_STATUS: "running",
            TAG_TRIAL: str(number),
            TAG_STUDY: target.study,
            TAG_SUGGESTED: json.dumps(dict(values)),
            **device_tags,
            **tracking.provenance(),
        },
    )
    params = [Param(k, tracking._param_value(v)) for k, v in flatten(config).items()]
    for i in range(0, len(params), 100):
        store.client.log_batch(run.info.run_id, params=params[i : i + 100])
    return run.info.run_id


def end_trial_run(store: tracking.Store, run_id: str, status: str, reason: str = "") -> None:
    """Record how a trial ended: complete, pruned, diverged, failed or killed."""
    store.client.set_tag(run_id, tracking.TAG_STATUS, status)
    if reason:
        store.client.set_tag(run_id, tracking.TAG_REASON, reason[:4000])
    store.client.set_terminated(run_id, _MLFLOW_STATUS[status])


# --------------------------------------------------------------------------------------------
# One worker: trials of every study until each has its budget.


@dataclass(frozen=True)
class TuneContext:
    """Everything a tuning worker needs (picklable: it crosses a process boundary)."""

    grid: Grid
    targets: tuple[Target, ...]
    tuning_runs: Mapping[str, str]  # study key -> tuning run id
    uri: str
    queue_url: str | None
    results: Path
    experiment_id: str
    exec: ExecOptions
    worker: int


def work(ctx: TuneContext, emit: Emit) -> None:
    """Run trials until every study has its budget; a study whose trial failed is left alone
    for the rest of this worker's run (a rerun tries again). Ctrl-C stops after recording."""
    import optuna

    from .cellqueue import storage_for

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = tracking.open_store(ctx.uri, ctx.results)
    storage = storage_for(ctx.queue_url, ctx.results, ctx.grid.name)
    start = ctx.worker % len(ctx.targets)  # workers begin on different studies
    for target in ctx.targets[start:] + ctx.targets[:start]:
        while run_trial(ctx, store, storage, target, emit) not in ("full", "failed"):
            pass


def run_trial(
    ctx: TuneContext,
    store: tracking.Store,
    storage: optuna.storages.BaseStorage,
    target: Target,
    emit: Emit,
) -> str:
    """Ask for one trial within the study's budget and run it: its status, or `full`."""
    import optuna
    from optuna.trial import TrialState

    from .cellqueue import Heartbeat, mark_owner

    spec = tune_spec(ctx.grid)
    study_id = storage.get_study_id_from_name(target.study)
    state = study_state(storage, target, spec.trials)
    if state is None or state.taken >= spec.trials:
        return "full"
    count = len(storage.get_all_trials(study_id, deepcopy=False))
    study = optuna.load_study(
        study_name=target.study,
        storage=storage,
        sampler=make_sampler(spec, _seed(target.key, count, ctx.worker)),
        pruner=make_pruner(spec),
    )
    trial = study.ask()
    mark_owner(storage, trial._trial_id)
    if not _within_budget(storage, study_id, trial.number, spec.trials):
        storage.set_trial_user_attr(trial._trial_id, "surplus", True)
        study.tell(trial, state=TrialState.FAIL)
        return "full"
    with Heartbeat(storage, trial._trial_id):
        return _train_trial(ctx, store, study, trial, target, emit)


def blind(dataset: Dataset) -> Dataset:
    """The dataset as a trial sees it: its test split replaced by the validation split."""
    assert dataset.val is not None, "tune sections require data.val_split"
    return replace(dataset, test=dataset.val)


def _train_trial(
    ctx: TuneContext,
    store: tracking.Store,
    study: optuna.Study,
    trial: optuna.trial.Trial,
    target: Target,
    emit: Emit,
) -> str:
    """Train one trial into its MLflow run and tell Optuna how it ended; returns its status."""
    import optuna
    from optuna.trial import TrialState

    from .runner import dataset_for
    from .train import resolve_runtime, train_cell

    spec = tune_spec(ctx.grid)
    values = suggest(trial, spec)
    trial.set_user_attr("values", values)
    progress_key, number = target.base.key, trial.number
    try:
        config = with_values(target.base.config, values)
    except ValueError as err:  # a combination of values that no cell accepts
        reason = f"trial {number}: {values_text(values)} is not a valid configuration ({err})"
        trial.set_user_attr("status", "failed")
        study.tell(trial, state=TrialState.FAIL)
        emit(("end", ctx.worker, progress_key, "failed", reason))
        return "failed"
    runtime = resolve_runtime(ctx.exec)
    device_tags = {"ablate.device": runtime.describe(), "ablate.precision": runtime.precision}
    run_id = start_trial_run(store, ctx, target, number, config, values, device_tags)
    trial.set_user_attr("mlflow_run_id", run_id)
    epochs = config.train.epochs
    emit(("start", ctx.worker, progress_key, f"{target.label} trial {number}", epochs))
    reached = [0]

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        logged = {k: v for k, v in metrics.items() if k != "epoch" and not k.startswith("test_")}
        tracking.log_metrics(store, run_id, logged, step=epoch)
        reached[0] = epoch
        emit(("epoch", ctx.worker, progress_key, epoch, metrics.get("train_err", math.nan)))
        value = metrics.get(METRIC, math.nan)
        if not math.isfinite(value):
            return
        trial.report(value, epoch)
        if epoch < epochs and trial.should_prune():
            raise optuna.TrialPruned(
                f"pruned after epoch {epoch} of {epochs}: val_err {value:.2f}% was above the "
                f"median of the complete trials"
            )

    try:
        result = train_cell(
            config, blind(dataset_for(config.data)), options=ctx.exec, on_epoch=on_epoch
        )
    except optuna.TrialPruned as pruned:
        trial.set_user_attr("status", "pruned")
        study.tell(trial, state=TrialState.PRUNED)
        end_trial_run(store, run_id, "pruned", str(pruned))
        emit(("skip", ctx.worker, progress_key, epochs - reached[0]))
        emit(("end", ctx.worker, progress_key, "pruned", f"trial {number}: {pruned}"))
        return "pruned"
    except KeyboardInterrupt:
        trial.set_user_attr("status", "killed")
        study.tell(trial, state=TrialState.FAIL)
        end_trial_run(store, run_id, "killed", "interrupted (Ctrl-C); it does not count")
        emit(("end", ctx.worker, progress_key, "killed", f"trial {number}: interrupted"))
        raise
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        tracking.log_text(store, run_id, "traceback.txt", traceback.format_exc())
        trial.set_user_attr("status", "failed")
        study.tell(trial, state=TrialState.FAIL)
        end_trial_run(store, run_id, "failed", reason)
        emit(("end", ctx.worker, progress_key, "failed", f"trial {number}: {reason}"))
        return "failed"

    final = result.final
    if result.status == "diverged":
        status, score, reason = "diverged", DIVERGED_SCORE, result.reason
    else:
        status, score, reason = "complete", final["final_val_err"], ""
    metrics = {k: v for k, v in final.items() if "test" not in k}
    tracking.log_metrics(store, run_id, metrics | {"objective": score}, step=len(result.history))
    trial.set_user_attr("status", status)
    study.tell(trial, score)
    end_trial_run(store, run_id, status, reason)
    note = f"trial {number}: {values_text(values)}, val_err {score:.2f}%"
    emit(("end", ctx.worker, progress_key, status, note + (f" ({reason})" if reason else "")))
    return status


# --------------------------------------------------------------------------------------------
# The tune of a grid.


@dataclass
class TuneOutcome:
    """What a tune did, for the exit code and the closing table."""

    budget: int
    counts: dict[str, int] = field(default_factory=dict)  # trial status -> trials run now
    failures: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    interrupted: bool = False
    states: list[StudyState] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failures or self.crashes else 0


def prepare_studies(
    storage: optuna.storages.BaseStorage,
    found: Sequence[Target],
    store: tracking.Store,
    budget: int,
) -> list[StudyState]:
    """Create missing studies, fail trials whose process is gone (and their MLflow runs)."""
    import optuna

    from .cellqueue import reap_stale

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    states = []
    for target in found:
        optuna.create_study(
            study_name=target.study, storage=storage, direction="minimize", load_if_exists=True
        )
        for trial in reap_stale(storage, storage.get_study_id_from_name(target.study)):
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id:
                end_trial_run(
                    store, run_id, "killed", "its process ended mid-trial; it does not count"
                )
        state = study_state(storage, target, budget)
        assert state is not None
        states.append(state)
    return states


def tune_grid(grid: Grid, options: Any, console: Console) -> TuneOutcome:
    """Run every study of the grid up to its budget (`options`: runner.RunOptions)."""
    from .cellqueue import storage_for
    from .progress import GridProgress
    from .runner import PlanRow, _run_processes, _worker_exec, check_data
    from .train import ExecOptions

    spec = tune_spec(grid)
    found = targets(grid)
    store = tracking.open_store(options.tracking_uri, options.results)
    tracking.check_results_dir(options.results)
    storage = storage_for(options.queue, options.results, grid.name)
    states = prepare_studies(storage, found, store, spec.trials)
    outcome = TuneOutcome(budget=spec.trials, states=states)
    remaining = sum(max(0, spec.trials - s.taken) for s in states)
    if not remaining:
        return outcome
    check_data([t.base for t in found])  # a missing dataset stops us before anything is logged
    experiment_id = store.experiment_id(grid.name, grid.spec.description)
    parent_id = tracking.grid_run_id(store, experiment_id, grid)
    runs = {t.key: tuning_run(store, experiment_id, parent_id, grid, t) for t in found}

    exec_options = options.exec or ExecOptions()
    workers = max(1, min(options.workers, remaining))
    contexts = [
        TuneContext(
            grid=grid,
            targets=tuple(found),
            tuning_runs=runs,
            uri=store.uri,
            queue_url=options.queue,
            results=options.results,
            experiment_id=experiment_id,
            exec=_worker_exec(exec_options, i, workers),
            worker=i,
        )
        for i in range(workers)
    ]
    rows = [
        PlanRow(cell=s.target.base, status="complete" if i < s.finished else "new", run_id=None)
        for s in states
        for i in range(spec.trials)
    ]
    with GridProgress(console, grid, rows, noun="trials", done_states=FINISHED) as progress:
        handle = _event_handler(progress, outcome)
        try:
            if workers == 1:
                work(contexts[0], handle)
            else:
                _run_processes(contexts, handle, work_fn=work)
        except KeyboardInterrupt:
            outcome.interrupted = True
    outcome.states = [study_state(storage, t, spec.trials) or StudyState(t) for t in found]
    for state in outcome.states:
        close_tuning_run(store, runs[state.target.key], state, spec.trials, outcome.interrupted)
    return outcome


def _event_handler(progress: Any, outcome: TuneOutcome) -> Emit:
    def handle(event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "end":
            status, reason = event[3], event[4]
            outcome.counts[status] = outcome.counts.get(status, 0) + 1
            if status == "failed":
                label = progress.cells[event[2]].label if event[2] in progress.cells else ""
                outcome.failures.append(f"{config_label_of(label)}: {reason}")
        elif kind == "crash":
            outcome.crashes.append(event[2])
        progress.update(event)

    return handle


def config_label_of(label: str) -> str:
    """`plain-8 basic post s0` -> `plain-8 basic post`."""
    return label.rsplit(" ", 1)[0]


# --------------------------------------------------------------------------------------------
# The command.


def command(
    grid: Grid,
    *,
    workers: int,
    device: str,
    results: Path,
    tracking_uri: str | None,
    queue: str | None,
    out: Console,
    err: Console,
) -> int:
    """`ablate tune`: run the studies, print their best values; returns the exit code."""
    spec = tune_spec(grid)  # before the heavy imports: a grid without one fails at once
    from rich.table import Table

    from .runner import RunOptions
    from .train import ExecOptions

    options = RunOptions(
        results=results,
        tracking_uri=tracking_uri,
        queue=queue,
        workers=workers,
        exec=ExecOptions(device=device),
    )
    outcome = tune_grid(grid, options, out)
    for failure in outcome.failures:
        err.print(f"[yellow]failed[/] {failure}", highlight=False)
    for crash in outcome.crashes:
        err.print(f"[red]worker crashed:[/] {crash}")

    table = Table(title=f"{grid.name}: tuning, {spec.trials} trials each", title_justify="left")
    for column in ["configuration", "trials", "best trial", "val err %", "best values"]:
        table.add_column(column)
    for state in outcome.states:
        best = state.best_number is not None
        failed = f" ({state.failed} failed)" if state.failed else ""
        table.add_row(
            state.target.label,
            f"{state.finished}/{spec.trials}{failed}",
            str(state.best_number) if best else "",
            f"{state.best_value:.2f}" if best else "",
            values_text(state.best_values) if best else "",
        )
    out.print(table)
    ran = sum(outcome.counts.values())
    done = sum(s.finished >= spec.trials for s in outcome.states)
    out.print(
        f"{grid.name}: {ran} trial(s) run now; {done} of {len(outcome.states)} studies have "
        f"their {spec.trials} trials"
        + (f"; next: ablate run {grid.path} --tuned" if done == len(outcome.states) else "")
    )
    if outcome.interrupted:
        err.print("Interrupted: finished trials are kept; run the same command to continue.")
    return outcome.exit_code

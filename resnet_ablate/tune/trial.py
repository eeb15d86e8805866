"""The trial worker: ask a trial within its study's budget, train it through the engine, tell
Optuna how it ended.

A trial is an engine ``Job`` that is blind (validation in place of test) and keeps a trial's
smaller record; its hooks note the MLflow run on the Optuna trial, report each epoch's
validation error (a pruned trial stops through ``engine.Stop``), and score the end.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import TrialState

from .. import tracking
from ..cellqueue import Heartbeat, storage_for
from ..config import CellConfig, flatten
from ..engine import (
    Ending,
    EpochHook,
    Hooks,
    Job,
    Session,
    Stop,
    Worker,
    WorkerContext,
    train_tracked,
)
from ..events import Emit, Ended
from ..train import CellResult
from .budget import ask, suggest
from .studies import (
    DIVERGED_SCORE,
    METRIC,
    TAG_STUDY,
    TAG_SUGGESTED,
    TAG_TRIAL,
    Target,
    targets,
    tune_spec,
    values_text,
    with_values,
)

INTERRUPTED = "interrupted ({signal}); it does not count"
#: What a store that took no write left of the work, for its message.
KEPT = "finished trials are kept: the rerun continues the studies"


def work(ctx: WorkerContext, emit: Emit) -> None:
    """Run trials until every study has its budget; a study whose trial failed is left alone
    for the rest of this worker's run (a rerun tries again). Ctrl-C stops after recording."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    session = ctx.session
    worker = ctx.open(emit)
    storage = storage_for(session.options.queue, session.options.results, session.grid.name)
    found = targets(session.grid)
    start = ctx.worker % len(found)  # workers begin on different studies
    for target in found[start:] + found[:start]:
        while run_trial(session, worker, storage, target) not in ("full", "failed"):
            pass


def run_trial(
    session: Session, worker: Worker, storage: optuna.storages.BaseStorage, target: Target
) -> str:
    """Ask for one trial within the study's budget and run it: its status, or `full`."""
    trial = ask(storage, target, tune_spec(session.grid), worker.number)
    if trial is None:
        return "full"
    with Heartbeat(storage, trial._trial_id):
        return train_trial(session, worker, trial, target)


def train_trial(session: Session, worker: Worker, trial: optuna.Trial, target: Target) -> str:
    """Train one trial into its MLflow run and tell Optuna how it ended; returns its status."""
    values = suggest(trial, tune_spec(session.grid))
    trial.set_user_attr("values", values)
    label = f"{target.label} trial {trial.number}"
    try:
        config = with_values(target.base.config, values)
    except ValueError as err:  # a combination of values that no cell accepts
        note = f"{values_text(values)} is not a valid configuration ({err})"
        worker.emit(Ended(worker.number, target.base.key, label, "failed", note))
        return tell(trial, "failed")
    job = Job(
        key=target.base.key,
        label=label,
        config=config,
        run=trial_run(session, target, trial.number, config, values),
        blind=True,
        full_record=False,
        interrupted=INTERRUPTED,
        kept=KEPT,
    )
    hooks = Hooks(
        started=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id),
        epoch=pruning(trial, config.train.epochs),
        finish=lambda result: scored(result, values),
    )
    try:
        ending = train_tracked(job, worker, hooks)
    except KeyboardInterrupt:
        tell(trial, "killed")
        raise
    return tell(trial, ending.status, ending.metrics.get("objective", math.nan))


def trial_run(
    session: Session, target: Target, number: int, config: CellConfig, values: Mapping[str, Any]
) -> tracking.RunSpec:
    """A trial's run, nested under its configuration's tuning run."""
    return tracking.RunSpec(
        name=f"{target.label} trial {number}",
        role="trial",
        parent_id=session.parents[target.key],
        tags={
            tracking.TAG_GRID: session.grid.name,
            tracking.TAG_KEY: target.key,
            tracking.TAG_LABEL: target.label,
            TAG_TRIAL: str(number),
            TAG_STUDY: target.study,
            TAG_SUGGESTED: json.dumps(dict(values)),
        },
        params=flatten(config),
    )


def pruning(trial: optuna.Trial, epochs: int) -> EpochHook:
    """Report each epoch's validation error; stop the trial when the pruner says so."""

    def report(epoch: int, metrics: Mapping[str, float]) -> None:
        value = metrics.get(METRIC, math.nan)
        if not math.isfinite(value):
            return
        trial.report(value, epoch)
        if epoch < epochs and trial.should_prune():
            raise Stop(
                "pruned",
                f"pruned after epoch {epoch} of {epochs}: val_err {value:.2f}% was above the "
                f"median of the complete trials",
            )

    return report


def scored(result: CellResult, values: Mapping[str, Any]) -> Ending:
    """A trial that trained to its end: complete with its final val_err, or diverged (100 %)."""
    if result.status == "diverged":
        status, score, reason = "diverged", DIVERGED_SCORE, result.reason
    else:
        status, score, reason = "complete", result.final["final_val_err"], ""
    note = f"{values_text(values)}, val_err {score:.2f}%" + (f" ({reason})" if reason else "")
    return Ending(status, reason, {"objective": score}, note)


def tell(trial: optuna.Trial, status: str, score: float = math.nan) -> str:
    """Record the trial's status and tell Optuna: a score, PRUNED, or FAIL (does not count)."""
    trial.set_user_attr("status", status)
    if status in ("complete", "diverged"):
        trial.study.tell(trial, score)
    elif status == "pruned":
        trial.study.tell(trial, state=TrialState.PRUNED)
    else:
        trial.study.tell(trial, state=TrialState.FAIL)
    return status

"""The tune of a grid: studies prepared, a tuning run per configuration, the engine's workers,
the tuning runs closed; and ``apply_tuned``, the grid with every study's best values.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console

from .. import tracking
from ..cellqueue import reap_stale, storage_for
from ..config import Grid, flatten
from ..databases import check_urls
from ..engine import (
    Outcome,
    RunOptions,
    Session,
    check_data,
    close_session,
    contexts,
    invocation_status,
    open_session,
    recording_the_end,
    run_pool,
)
from ..errors import UserError
from ..preflight import check_results_dir
from ..progress import GridProgress
from ..provenance import provenance
from . import trial
from .budget import StudyState, study_state
from .studies import (
    FINISHED,
    OBJECTIVE,
    TAG_BEST_TRIAL,
    TAG_BEST_VALUES,
    TAG_BUDGET,
    TAG_CELLS,
    TAG_FINISHED,
    TAG_STUDY,
    Target,
    describe_space,
    settings_text,
    targets,
    tune_spec,
    tuned_grid,
)
from .trial import KEPT


@dataclass
class TuneOutcome(Outcome):
    """What a tune did: the workers' outcome, and every study's state after it."""

    budget: int = 0
    states: list[StudyState] = field(default_factory=list)


def tune_grid(grid: Grid, options: RunOptions, console: Console) -> TuneOutcome:
    """Run every study of the grid up to its budget."""
    tune_spec(grid)
    check_urls(options.queue, tracking.resolve_uri(options.tracking_uri, options.results))
    store = tracking.open_store(options.tracking_uri, options.results)
    check_results_dir(options.results)
    with tracking.unavailable_is_one_line(store, KEPT):
        return _tune(grid, options, store, console)


def _tune(grid: Grid, options: RunOptions, store: tracking.Store, console: Console) -> TuneOutcome:
    """The studies prepared, then their remaining trials under a parent run that says how this
    invocation ended, whatever happened."""
    spec, found = tune_spec(grid), targets(grid)
    storage = storage_for(options.queue, options.results, grid.name)
    states = prepare_studies(storage, found, store, spec.trials)
    outcome = TuneOutcome(budget=spec.trials, states=states)
    if not sum(max(0, spec.trials - s.taken) for s in states):
        return outcome
    check_data([t.base for t in found])  # a missing dataset stops us before anything is logged
    session = open_session(grid, options, store, storage)

    def close(ended: Outcome | None) -> None:
        close_session(session, store, invocation_status(ended, True, 0))

    with recording_the_end(store, KEPT, outcome, close):
        _train_trials(session, store, storage, found, outcome, console)
    return outcome


def _train_trials(
    session: Session,
    store: tracking.Store,
    storage: optuna.storages.BaseStorage,
    found: Sequence[Target],
    outcome: TuneOutcome,
    console: Console,
) -> None:
    """The studies' remaining trials, trained by the engine's workers under their tuning runs,
    which then record each study's best trial; what happened goes into `outcome`."""
    budget = outcome.budget
    runs = {t.key: tuning_run(store, session, t) for t in found}
    session = replace(session, parents=runs)
    remaining = sum(max(0, budget - s.taken) for s in outcome.states)
    workers = max(1, min(session.options.workers, remaining))
    done = [min(s.finished, budget) for s in outcome.states]
    pending = [
        s.target.base for s, d in zip(outcome.states, done, strict=True) for _ in range(budget - d)
    ]
    with GridProgress(
        console,
        session.grid.name,
        pending,
        done=sum(done),
        total=budget * len(outcome.states),
        done_states=FINISHED,
        noun="trials",
    ) as progress:
        run_pool(contexts(session, workers), trial.work, progress.update, outcome)
    outcome.states = [study_state(storage, t, budget) or StudyState(t) for t in found]
    for state in outcome.states:
        close_tuning_run(store, runs[state.target.key], state, budget, outcome.interrupted)


def prepare_studies(
    storage: optuna.storages.BaseStorage,
    found: Sequence[Target],
    store: tracking.Store,
    budget: int,
) -> list[StudyState]:
    """Create missing studies, fail trials whose process is gone (and their MLflow runs)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    states = []
    for target in found:
        optuna.create_study(
            study_name=target.study, storage=storage, direction="minimize", load_if_exists=True
        )
        for stale in reap_stale(storage, storage.get_study_id_from_name(target.study)):
            run_id = stale.user_attrs.get("mlflow_run_id")
            if run_id:
                reason = "its process ended mid-trial; it does not count"
                tracking.end_run(store, run_id, "killed", reason)
        state = study_state(storage, target, budget)
        assert state is not None
        states.append(state)
    return states


# --------------------------------------------------------------------------------------------
# MLflow: a tuning run per configuration (its trials' runs nest under it, see trial.py).


def tuning_run(store: tracking.Store, session: Session, target: Target) -> str:
    """The configuration's tuning run (found by study key, or created), marked running."""
    spec = tune_spec(session.grid)
    tags = {
        tracking.TAG_STATUS: "running",
        TAG_BUDGET: str(spec.trials),
        TAG_CELLS: ",".join(c.key for c in target.cells),
    }
    found = tracking.first_run(store, session.experiment_id, "tune", {tracking.TAG_KEY: target.key})
    if found is not None:
        return tracking.reopen_run(store, found.info.run_id, tags)
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
    run = tracking.RunSpec(
        name=f"tune {target.label}",
        role="tune",
        parent_id=session.parent_id,
        tags={
            tracking.TAG_GRID: session.grid.name,
            tracking.TAG_KEY: target.key,
            tracking.TAG_LABEL: target.label,
            TAG_STUDY: target.study,
            **tags,
            **provenance(),
        },
        params=params,
    )
    return tracking.create_run(store, session.experiment_id, run)


def close_tuning_run(
    store: tracking.Store, run_id: str, state: StudyState | None, budget: int, interrupted: bool
) -> None:
    """Record the study's best trial on its tuning run, and end the run."""
    finished = state.finished if state else 0
    tags = {TAG_FINISHED: str(finished)}
    if state is not None and state.best_number is not None:
        tags[TAG_BEST_TRIAL] = str(state.best_number)
        tags[TAG_BEST_VALUES] = json.dumps(state.best_values)
        tracking.log_metrics(store, run_id, {"best_val_err": state.best_value}, step=finished)
    status = "finished" if finished >= budget else "killed" if interrupted else "failed"
    tracking.end_run(store, run_id, status, tags=tags)


# --------------------------------------------------------------------------------------------
# `run --tuned`: the best values of every study, substituted into the grid.


def _existing_storage(
    grid: Grid, results: Path, queue: str | None
) -> optuna.storages.BaseStorage | None:
    """The grid's Optuna storage, or None when its journal file does not exist (never created)."""
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

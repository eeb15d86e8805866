"""Samplers, pruners, suggestions, and a study's trials counted against its budget.

A study's budget is exact under several workers: ``ask`` hands out a trial only while fewer
than ``trials`` are finished or live, and withdraws a trial the storage numbered beyond the
budget (FAIL, ``surplus``) before it trains. See the package docstring for the rules.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..cellqueue import mark_owner, owner_alive
from ..config import FloatRange, TuneSpec
from .studies import Target, TrialScore, best_trial


def make_sampler(spec: TuneSpec, seed: int) -> optuna.samplers.BaseSampler:
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, spec.trials // 3)))


def make_pruner(spec: TuneSpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=max(1, min(5, spec.trials // 4)))


def sampler_seed(key: str, count: int, worker: int) -> int:
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


def _finished(trial: FrozenTrial) -> bool:
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)


def _score(trial: FrozenTrial) -> TrialScore:
    """A finished Optuna trial for the best-trial rule (a diverged trial is COMPLETE, 100 %)."""
    status = "complete" if trial.state == TrialState.COMPLETE else "pruned"
    score = trial.value if trial.value is not None else math.nan
    return TrialScore(trial.number, status, score, trial.user_attrs.get("values") or trial.params)


def study_state(
    storage: optuna.storages.BaseStorage, target: Target, budget: int
) -> StudyState | None:
    """The study's state, or None when it does not exist yet (best trial: ``best_trial``)."""
    try:
        study_id = storage.get_study_id_from_name(target.study)
    except KeyError:
        return None
    now = time.time()
    state = StudyState(target)
    scores = []
    for trial in storage.get_all_trials(study_id, deepcopy=False):
        if _finished(trial):
            state.finished += 1
            scores.append(_score(trial))
        elif trial.state == TrialState.RUNNING and owner_alive(trial, now):
            state.running += 1
        elif trial.state == TrialState.FAIL and not trial.user_attrs.get("surplus"):
            state.failed += 1
    best = best_trial(scores, budget)
    if best is not None:
        state.best_number, state.best_value = best.number, float(best.score)
        state.best_values = dict(best.values)
    return state


def within_budget(
    storage: optuna.storages.BaseStorage, study_id: int, number: int, budget: int
) -> bool:
    """Whether a new trial fits: fewer than `budget` lower-numbered trials hold a slot."""
    now = time.time()
    ahead = 0
    for trial in storage.get_all_trials(study_id, deepcopy=False):
        if trial.number >= number:
            continue
        live = trial.state == TrialState.RUNNING and owner_alive(trial, now)
        if _finished(trial) or live or trial.state == TrialState.WAITING:
            ahead += 1
    return ahead < budget


def ask(
    storage: optuna.storages.BaseStorage, target: Target, spec: TuneSpec, worker: int
) -> optuna.trial.Trial | None:
    """A new trial of the study owned by this process, or None when the budget is taken."""
    study_id = storage.get_study_id_from_name(target.study)
    state = study_state(storage, target, spec.trials)
    if state is None or state.taken >= spec.trials:
        return None
    count = len(storage.get_all_trials(study_id, deepcopy=False))
    study = optuna.load_study(
        study_name=target.study,
        storage=storage,
        sampler=make_sampler(spec, sampler_seed(target.key, count, worker)),
        pruner=make_pruner(spec),
    )
    trial = study.ask()
    mark_owner(storage, trial._trial_id)
    if not within_budget(storage, study_id, trial.number, spec.trials):
        storage.set_trial_user_attr(trial._trial_id, "surplus", True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    return trial

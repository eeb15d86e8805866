"""The report's tuning section, from MLflow alone: how each configuration's values were chosen,
the trial history, and whether the verdicts change between default and tuned settings.

`ablate tune` leaves one tuning run per configuration (``ablate.role=tune``) and one run per
trial under it (``ablate.role=trial``, ``ablate.suggested``, ``objective``); see ``tune/``. The
best trial is chosen by the rule ``ablate tune`` itself applies (``studies.best_trial``), here
from the trial runs. With the best values the report rebuilds the tuned cells
(``studies.tuned_grid``), finds their runs by key, and computes every verdict twice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from mlflow.entities import Run

from ..config import CellName, Grid, TuneSpec, VerdictSpec
from ..tracking import (
    TAG_KEY,
    TAG_REASON,
    TAG_STATUS,
    Store,
    runs_with_role,
    ui_url,
)
from ..tune import studies
from .records import Records, load_records
from .verdicts import judge


@dataclass
class Tuning:
    """What the tuning section shows."""

    budget: int
    method: str
    space: dict[str, str]
    seeds_note: str
    rows: list[dict[str, Any]]
    trials: pd.DataFrame  # configuration, trial, score, status (finished trials only)
    complete: bool  # every study has its budget
    comparison: list[dict[str, Any]] = field(default_factory=list)
    comparison_note: str = ""
    settings: list[str] = field(default_factory=list)  # distinct ablate.settings of tuned runs
    sibling_keys: set[str] = field(default_factory=set)  # the other variant's cell keys


def load_tuning(
    grid: Grid, store: Store, records: Records, *, context: str | None = None
) -> Tuning | None:
    """The tuning section for a grid with a tune section (None without one); `context` is the
    headline's, whose plain nets are the verdicts' primary comparison."""
    if grid.spec.tune is None:
        return None
    spec = grid.spec.tune
    default = studies.default_grid(grid)
    found = studies.targets(default)
    experiment_id = records.experiment_id
    tuning_runs, trial_runs = _runs(store, experiment_id)
    frames, rows, best = [], [], {}
    for target in found:
        trials = _trial_table(target, trial_runs.get(target.key, []), store, experiment_id)
        frames.append(trials)
        row = _row(target, trials, tuning_runs.get(target.key), spec, store, experiment_id)
        rows.append(row)
        if row["finished"] >= spec.trials and row["best_values"] is not None:
            best[target.key] = row["best_values"]
    trials = pd.concat(frames, ignore_index=True) if frames else _empty_trials()
    epochs = [t.base.config.train.epochs for t in found]
    first_seeds = sorted({t.base.config.seed for t in found})
    result = Tuning(
        budget=spec.trials,
        method=studies.describe_method(spec, epochs),
        space=studies.describe_space(spec),
        seeds_note=(
            "One study per configuration: all seeds of a configuration share its tuned values, "
            f"and its trials train with seed {', '.join(map(str, first_seeds))}, the grid's "
            "first. Trials never see the test set: they are scored on the validation split."
        ),
        rows=rows,
        trials=trials,
        complete=len(best) == len(found),
    )
    if result.complete:
        tuned = studies.tuned_grid(default, best)
        _compare(result, grid, default, tuned, store, records, context)
    elif any(r["finished"] for r in rows):
        result.comparison_note = (
            "Tuning is not finished for every configuration, so there are no tuned cells yet; "
            f"run `ablate tune {grid.path}` to finish it."
        )
    else:
        result.comparison_note = f"No trials yet: run `ablate tune {grid.path}`."
    return result


def _empty_trials() -> pd.DataFrame:
    return pd.DataFrame(columns=["configuration", "trial", "score", "status", "values", "url"])


def _runs(store: Store, experiment_id: str | None) -> tuple[dict[str, Run], dict[str, list[Run]]]:
    """Tuning runs by study key (the first made), and trial runs by study key."""
    tuning: dict[str, Run] = {}
    trials: dict[str, list[Run]] = {}
    if experiment_id is None:
        return tuning, trials
    for run in runs_with_role(store, experiment_id, "tune"):
        tuning.setdefault(run.data.tags.get(TAG_KEY, ""), run)
    for run in runs_with_role(store, experiment_id, "trial"):
        trials.setdefault(run.data.tags.get(TAG_KEY, ""), []).append(run)
    return tuning, trials


def _trial_table(
    target: studies.Target, runs: list[Run], store: Store, experiment_id: str | None
) -> pd.DataFrame:
    """One row per trial run of a study: its number, status, score and suggested values."""
    rows = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        status = tags.get(TAG_STATUS, "running")
        if status in ("complete", "diverged"):
            score = metrics.get("objective", math.nan)
        elif status == "pruned":
            score = metrics.get(studies.METRIC, math.nan)  # its last epoch's validation error
        else:
            score = math.nan
        try:
            values = json.loads(tags.get(studies.TAG_SUGGESTED, "{}"))
        except json.JSONDecodeError:
            values = {}
        rows.append(
            {
                "configuration": target.label,
                "trial": int(tags.get(studies.TAG_TRIAL, -1)),
                "score": float(score),
                "status": status,
                "values": values,
                "reason": tags.get(TAG_REASON, ""),
                "url": ui_url(store.uri, experiment_id or "", run.info.run_id),
            }
        )
    if not rows:
        return _empty_trials()
    return pd.DataFrame(rows).sort_values("trial", kind="stable").reset_index(drop=True)


def _row(
    target: studies.Target,
    trials: pd.DataFrame,
    tuning_run: Run | None,
    spec: TuneSpec,
    store: Store,
    experiment_id: str | None,
) -> dict[str, Any]:
    """A configuration's line: trials by status, its best trial and values, the defaults."""
    counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    finished = sum(int(counts.get(s, 0)) for s in studies.FINISHED)
    best = studies.best_trial(
        (
            studies.TrialScore(int(t.trial), str(t.status), float(t.score), t.values)
            for t in trials.itertuples()
        ),
        spec.trials,
    )
    url = trials.loc[trials["trial"] == best.number, "url"].iloc[0] if best else ""
    train = target.base.config.train
    defaults = {name: getattr(train, name.split(".", 1)[1]) for name in spec.params}
    return {
        "label": target.label,
        "key": target.key,
        "finished": finished,
        "counts": ", ".join(
            f"{int(counts[s])} {s}"
            for s in (*studies.FINISHED, "failed", "killed")
            if counts.get(s)
        ),
        "best_trial": best.number if best else None,
        "best_score": best.score if best else math.nan,
        "best_values": dict(best.values) if best else None,
        "best_text": studies.values_text(best.values) if best else "",
        "best_url": url,
        "defaults": studies.values_text(defaults),
        "url": ui_url(store.uri, experiment_id or "", tuning_run.info.run_id) if tuning_run else "",
    }


# --------------------------------------------------------------------------------------------
# Default against tuned verdicts.


def _compare(
    result: Tuning,
    grid: Grid,
    default: Grid,
    tuned: Grid,
    store: Store,
    records: Records,
    context: str | None,
) -> None:
    """Compute the verdicts with default and with tuned settings, and say which differ."""
    main_is_default = [c.key for c in grid.cells] == [c.key for c in default.cells]
    default_records = records if main_is_default else load_records(default, store)
    tuned_records = records if not main_is_default else load_records(tuned, store)
    result.sibling_keys = {c.key for c in (tuned if main_is_default else default).cells}
    result.settings = sorted(
        {s for s in tuned_records.provenance.get("settings", []) if s.startswith("tuned")}
    )
    missing = [
        name
        for name, r in (("default", default_records), ("tuned", tuned_records))
        if not (r.cells["status"] == "finished").any()
    ]
    if missing:
        commands = {
            "default": f"`ablate run {grid.path}`",
            "tuned": f"`ablate run {grid.path} --tuned`",
        }
        result.comparison_note = (
            f"No finished run with {' or '.join(missing)} settings yet, so the verdicts cannot "
            f"be compared; run {' and '.join(commands[m] for m in missing)}."
        )
        return
    names = {c.key: c.name for c in (*default.cells, *tuned.cells)}
    where = _untuned_context(names.values(), context)
    before = verdict_map(default_records.cells, names, grid.spec.verdicts, where)
    after = verdict_map(tuned_records.cells, names, grid.spec.verdicts, where)
    rows = []
    for key in list(before) + [k for k in after if k not in before]:
        a, b = before.get(key), after.get(key)
        rows.append(
            {
                "kind": key[0],
                "subject": key[1],
                "default": a["outcome"] if a else "—",
                "default_numbers": a["numbers"] if a else "",
                "tuned": b["outcome"] if b else "—",
                "tuned_numbers": b["numbers"] if b else "",
                "changed": (a["outcome"] if a else None) != (b["outcome"] if b else None),
            }
        )
    result.comparison = rows
    changed = [r for r in rows if r["changed"]]
    if not rows:
        result.comparison_note = "This grid has no verdicts to compare."
    elif not changed:
        result.comparison_note = (
            f"The verdicts do not change with tuned settings ({len(rows)} of {len(rows)} agree)."
        )
    else:
        which = "; ".join(f"{r['kind']} {r['subject']}" for r in changed)
        result.comparison_note = (
            f"{len(changed)} of {len(rows)} verdicts change with tuned settings: {which}."
        )


def _untuned_context(names: Iterable[CellName], context: str | None) -> str | None:
    """The headline context as default and tuned cells share it (without the tuned marker)."""
    for name in names:
        if name.context == context:
            return name.untuned().context
    return context


def verdict_map(
    cells: pd.DataFrame,
    names: Mapping[str, CellName],
    spec: VerdictSpec,
    context: str | None,
) -> dict[tuple[str, str], dict[str, str]]:
    """Every verdict the report draws from a cell table, keyed so that default and tuned cells
    match (their names without the tuned marker): (kind, subject) -> outcome and numbers."""
    untuned = cells["key"].map(lambda key: names[key].untuned())
    cells = cells.assign(
        context=untuned.map(lambda n: n.context),
        config=untuned.map(lambda n: n.config),
        extras=untuned.map(lambda n: n.extras_text),
    )
    verdicts = judge(cells, spec, context=context)
    found: dict[tuple[str, str], dict[str, str]] = {}
    for v in (*verdicts.degradation, *verdicts.residual_vs_plain):
        subject = f"{v.a.name} vs {v.b.name} ({v.context})"
        numbers = f"{v.a.short()} vs {v.b.short()}"
        found[(v.kind, subject)] = {"outcome": v.outcome, "numbers": numbers}
    for b in verdicts.best:
        outcome = f"{b.best} best" if b.best else b.outcome
        found[(f"best {b.axis}", b.context)] = {"outcome": outcome, "numbers": b.text}
    return found


def finished_trials(tuning: Tuning) -> pd.DataFrame:
    """The finished trials with a score, for the history figure."""
    frame = tuning.trials
    return frame[frame["status"].isin(studies.FINISHED) & frame["score"].notna()]

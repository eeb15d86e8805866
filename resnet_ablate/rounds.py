"""Seeds until decided: which cells of a ``seeds: {min, max}`` grid are planned, round by round.

Round 1 is every configuration at the minimum number of seeds. Once every cell planned so far
has an outcome (finished or diverged), the verdicts are computed on exactly those cells, under
the group-sequential design whose look is the number of seeds (``report.verdicts.judge`` with
the grid's :class:`~resnet_ablate.stats.Schedule`), and each configuration of a comparison still
undecided below the maximum gets its next seed: that is the next round. Seeds are added in
order, 0, 1, 2, ..., so a configuration's cells are always its first seeds.

The rounds are never stored: :func:`replay` recomputes them from round 1 out of the record (each
cell's status and final errors), so a rerun after an interruption, a second machine, `ablate ls`
and the report all arrive at the same plan. The added cells are ordinary cells of the grid (the
grid file expands to every seed up to the maximum), queued, trained, resumed and recorded like
any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from .config import Grid, VerdictSpec
from .plan import PlanRow
from .report.comparisons import headline_context
from .report.records import describe_cell
from .report.sides import Configuration
from .report.verdicts import undecided_configs
from .stats import Schedule

#: Statuses with an outcome: the cell counts in the verdicts and is never trained again.
OUTCOMES = ("finished", "diverged")
#: The metrics the verdicts read from a cell.
METRICS = ("final_train_err", "final_test_err")


def schedule_of(grid: Grid) -> Schedule | None:
    """The grid's group-sequential schedule, or None when its seeds are a fixed list."""
    seeds = grid.spec.seed_range
    return Schedule(seeds.min, seeds.max) if seeds is not None else None


@dataclass(frozen=True)
class Round:
    """One round: its number (1 is the minimum seeds) and the keys of the cells it added."""

    number: int
    added: tuple[str, ...]


@dataclass(frozen=True)
class Rounds:
    """The rounds a grid's record implies, and where they stand.

    `planned` are the keys of every cell of every round so far, in table order; `pending` those
    without an outcome yet. `settled` is true when nothing is pending and no comparison asks for
    another seed: the grid is done. `seeds` is the number of seeds planned per configuration.
    """

    schedule: Schedule
    rounds: tuple[Round, ...]
    planned: tuple[str, ...]
    pending: tuple[str, ...]
    settled: bool
    seeds: Mapping[Configuration, int]

    @property
    def current(self) -> Round:
        return self.rounds[-1]

    def round_of(self) -> dict[str, int]:
        """The round each planned cell was added in, by key."""
        return {key: r.number for r in self.rounds for key in r.added}


def cell_table(grid: Grid, rows: Sequence[PlanRow]) -> pd.DataFrame:
    """The per-cell table the verdicts read (as the report's, without the run's history): each
    cell's descriptive columns, its status and final errors."""
    records = []
    for row in rows:
        record = describe_cell(row.cell, row.status)
        for key in METRICS:
            value = row.metrics.get(key)
            record[key] = float(value) if value is not None else float("nan")
        records.append(record)
    return pd.DataFrame(records)


def to_add(
    cells: pd.DataFrame,
    seeds: Mapping[Configuration, int],
    available: Mapping[Configuration, int],
    spec: VerdictSpec,
    schedule: Schedule,
    *,
    context: str | None,
) -> list[Configuration]:
    """The configurations that get one more seed after a round: those of every comparison that
    the round's cells leave undecided below the maximum, unless they already have the maximum
    (or every seed the grid has for them). `cells` holds exactly the round's planned cells."""
    open_ = undecided_configs(cells, spec, schedule, context=context)
    return [c for c in open_ if seeds[c] < min(schedule.max, available[c])]


def replay(
    table: pd.DataFrame, spec: VerdictSpec, schedule: Schedule, *, context: str | None
) -> Rounds:
    """Recompute the rounds from round 1 out of a per-cell table of every cell of the grid
    (columns as the report's: the configuration's columns, `seed`, `key`, `status`, final
    errors). Pure: the same table gives the same rounds."""
    order: dict[Configuration, list[str]] = {}  # each configuration's keys in seed order
    for _, row in table.sort_values("seed", kind="stable").iterrows():
        order.setdefault(Configuration.of(row), []).append(str(row["key"]))
    available = {c: len(keys) for c, keys in order.items()}
    seeds = {c: min(schedule.min, n) for c, n in available.items()}
    rounds = [Round(1, tuple(k for c, keys in order.items() for k in keys[: seeds[c]]))]
    status = dict(zip(table["key"].astype(str), table["status"].astype(str), strict=True))
    while True:
        chosen = {k for c, keys in order.items() for k in keys[: seeds[c]]}
        planned = tuple(k for k in table["key"].astype(str) if k in chosen)
        pending = tuple(k for k in planned if status[k] not in OUTCOMES)
        if pending:
            return Rounds(schedule, tuple(rounds), planned, pending, False, dict(seeds))
        cells = table[table["key"].astype(str).isin(chosen)]
        more = to_add(cells, seeds, available, spec, schedule, context=context)
        if not more:
            return Rounds(schedule, tuple(rounds), planned, (), True, dict(seeds))
        added = []
        for c in more:
            added.append(order[c][seeds[c]])
            seeds[c] += 1
        rounds.append(Round(len(rounds) + 1, tuple(added)))


def grid_rounds(grid: Grid, rows: Sequence[PlanRow]) -> Rounds | None:
    """The rounds of a grid against its record (`rows`: every cell with its state), or None for
    a grid whose seeds are a fixed list."""
    schedule = schedule_of(grid)
    if schedule is None:
        return None
    return replay(
        cell_table(grid, rows), grid.spec.verdicts, schedule, context=headline_context(grid)
    )


def cell_counts(grid: Grid) -> tuple[int, int]:
    """The fewest and the most cells a grid can train: every configuration at the minimum
    seeds, and at the maximum (equal for a fixed list)."""
    seeds = grid.spec.seed_range
    if seeds is None:
        return len(grid.cells), len(grid.cells)
    fewest = sum(cell.config.seed < seeds.min for cell in grid.cells)
    return fewest, len(grid.cells)


def summary(grid: Grid, rounds: Rounds | None) -> str:
    """One line on where the rounds stand, for `ablate ls`, `--dry-run` and the end of a run;
    '' for a fixed list of seeds."""
    seeds = grid.spec.seed_range
    if seeds is None:
        return ""
    fewest, most = cell_counts(grid)
    count = seeds.max - seeds.min + 1
    head = (
        f"Seeds until decided, {seeds.min} to {seeds.max} per configuration: {fewest} to {most} "
        f"cells, at most {count} round{'s' if count != 1 else ''}"
    )
    if rounds is None:
        return f"{head}."
    r = rounds.current.number
    planned = len(rounds.planned)
    if rounds.settled:
        at_max = sum(n >= seeds.max for n in rounds.seeds.values())
        tail = f"; {at_max} configuration(s) took all {seeds.max} seeds" if at_max else ""
        return f"{head}; settled after round {r} with {planned} cells{tail}."
    return (
        f"{head}; round {r}: {planned} cells planned, {len(rounds.pending)} without a result "
        "yet (the next round is decided once they have one)."
    )

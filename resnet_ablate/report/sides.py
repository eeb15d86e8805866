"""One configuration over its seeds (:class:`Side`), how configurations are named, and how their
numbers are written.

Every seed with an outcome counts: a run that trained, a run stuck at chance (finished with a
training error within :data:`STUCK_POINTS` of chance, (1 − 1/classes) × 100), and a diverged
run, which counts at chance error. Runs without an outcome (new, running, failed, killed) are
listed in :attr:`Side.missing`, not counted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

PLAIN = "none"
#: Classes per dataset, for the chance-level error (1 − 1/classes) × 100.
CLASSES = {"cifar10": 10, "cifar100": 100, "fashion-mnist": 10, "synthetic": 10}
#: A run whose final training error is within this many points of chance is stuck.
STUCK_POINTS = 5.0
#: The columns that name a configuration (all of a cell but its seed).
CONFIG_COLUMNS = ("arch", "net", "block", "order", "extras")


def chance_error(dataset: str) -> float:
    """Error (%) of guessing: (1 − 1/classes) × 100."""
    return (1 - 1 / CLASSES.get(dataset, 10)) * 100


# --------------------------------------------------------------------------------------------
# One configuration over its seeds.


@dataclass(frozen=True)
class Side:
    """One configuration's error over the seeds that have an outcome, in seed order.

    `values` are what the tests use: the error of trained and stuck runs, chance for diverged.
    """

    name: str
    values: tuple[float, ...]
    seeds: tuple[int, ...]
    diverged: tuple[int, ...] = ()
    stuck: tuple[int, ...] = ()
    chance: float = 90.0
    missing: str = ""  # runs without an outcome: "2 new, 1 failed"

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def sd(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n >= 2 else math.nan

    def short(self, digits: int = 1) -> str:
        """`13.1 ± 0.4%`, `13.1%` (one seed) or `no finished run`."""
        if not self.values:
            return "no finished run"
        return pm(self.mean, self.sd, self.n, digits)

    def failures(self) -> str:
        """`plain-56: s2 diverged (counted at chance, 90.0%), s1 stuck at chance`, or ''."""
        parts = []
        if self.diverged:
            which = ", ".join(f"s{s}" for s in self.diverged)
            parts.append(f"{which} diverged (counted at chance, {self.chance:.1f}%)")
        if self.stuck:
            which = ", ".join(f"s{s}" for s in self.stuck)
            parts.append(f"{which} stuck at chance (training error within {STUCK_POINTS:g} points)")
        return f"{self.name}: {'; '.join(parts)}" if parts else ""


def side(cells: pd.DataFrame, name: str, metric: str) -> Side:
    """The Side of one configuration's cells (all its seeds)."""
    chance = chance_error(str(cells["dataset"].iloc[0])) if len(cells) else 90.0
    values, seeds, diverged, stuck = [], [], [], []
    missing: Counter[str] = Counter()
    for row in cells.sort_values("seed").itertuples(index=False):
        value, train = float(getattr(row, metric)), float(row.final_train_err)
        if row.status == "diverged":
            values.append(chance)
            diverged.append(int(row.seed))
        elif row.status == "finished" and math.isfinite(value):
            values.append(value)
            if math.isfinite(train) and train >= chance - STUCK_POINTS:
                stuck.append(int(row.seed))
        else:
            status = str(row.status)
            missing[f"finished without {metric}" if status == "finished" else status] += 1
            continue
        seeds.append(int(row.seed))
    return Side(
        name=name,
        values=tuple(values),
        seeds=tuple(seeds),
        diverged=tuple(diverged),
        stuck=tuple(stuck),
        chance=chance,
        missing=", ".join(f"{n} {status}" for status, n in missing.items()),
    )


def seeds(n: int, m: int | None = None) -> str:
    """`1 seed`, `3 seeds`, `3 seeds each`, `3 and 2 seeds`."""
    if m is None:
        return f"{n} seed{'s' if n != 1 else ''}"
    if n == m:
        return f"{n} seed{'s' if n != 1 else ''} each"
    return f"{n} and {m} seeds"


def p_text(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "no test"
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def pm(mean: float, sd: float, n: int, digits: int = 1) -> str:
    """`13.1 ± 0.4%`; `13.1%` with one seed or no finite spread."""
    spread = f" ± {sd:.{digits}f}" if n >= 2 and math.isfinite(sd) else ""
    return f"{mean:.{digits}f}{spread}%"


def points(x: float, digits: int = 1) -> str:
    """`1.0 point`, `2.5 points`."""
    return f"{x:.{digits}f} point" + ("" if round(abs(x), digits) == 1 else "s")


# --------------------------------------------------------------------------------------------
# Configurations, by columns.


@dataclass(frozen=True)
class Configuration:
    """One configuration of the grid (every column of a cell but its seed)."""

    arch: str
    net: str
    block: str
    order: str
    extras: str

    @classmethod
    def of(cls, row: pd.Series) -> Configuration:
        return cls(*(str(row[c]) for c in CONFIG_COLUMNS))


def config_name(cells: pd.DataFrame, without: Sequence[str] = ()) -> pd.Series:
    """Each cell's configuration name, with the given columns (`block`, `order`) left out."""
    columns = [c for c in CONFIG_COLUMNS if c not in without]

    def name(row: pd.Series) -> str:
        parts = [str(row[c]) for c in columns if not (c == "arch" and row[c] == "cifar")]
        return " ".join(p for p in parts if p)

    return cells.apply(name, axis=1) if len(cells) else pd.Series([], dtype=str)

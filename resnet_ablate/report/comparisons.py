"""The comparisons a per-cell table holds, and the records of what each concluded.

- :class:`Pair`: `a` against `b` on final training error: the deepest against the shallowest net
  of a shortcut kind and context (degradation), or the plain net against a residual net at the
  deepest depth both have (residual vs plain). Its verdict is a :class:`PairVerdict`.
- :class:`Group`: the values of an axis (block, unit order, or both) in one context, on final
  test error. Its verdict is a :class:`BestVerdict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from ..config import Grid
from ..stats import Decision
from .sides import PLAIN, Configuration, Side, config_name, side

REPRODUCED, NOT_REPRODUCED, UNDECIDED = "reproduced", "not reproduced", "undecided"


@dataclass(frozen=True)
class PairVerdict:
    """`a` against `b`: degradation (a = deepest, b = shallowest net of a kind) or residual
    against plain (a = the plain net, b = the residual net, at one depth)."""

    kind: str  # "degradation" or "residual vs plain"
    shortcut: str  # the shortcut kind judged (for residual vs plain: the residual's)
    family: str
    context: str
    a: Side
    b: Side
    primary: bool
    decision: Decision
    outcome: str
    text: str
    configurations: tuple[Configuration, ...] = ()

    @property
    def diff(self) -> float:
        """Difference of means a − b at the deciding (or latest) look; NaN without a test."""
        look = self.decision.look
        return look.welch.diff if look is not None else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return self.decision.interval

    @property
    def p(self) -> float:
        """The p-value of the test that decided ('greater' when undecided)."""
        d = self.decision
        return d.p_not_greater if d.outcome == "not_greater" else d.p_greater

    @property
    def deep(self) -> Side:
        return self.a

    @property
    def shallow(self) -> Side:
        return self.b


@dataclass(frozen=True)
class BestVerdict:
    """Which value of an axis gives the lowest test error in one context, if any can be named."""

    axis: str
    context: str
    values: tuple[str, ...]  # in ranking order at the deciding (or latest) look
    sides: tuple[Side, ...]  # likewise
    decision: Decision
    best: str  # the value decided best, or ""
    outcome: str  # "best", "within margin" or "undecided"
    text: str
    configurations: tuple[Configuration, ...] = ()


# --------------------------------------------------------------------------------------------
# The comparisons a table holds.


@dataclass(frozen=True)
class Pair:
    """Two sides to compare on final training error, with what the wording needs."""

    prefix: str  # `At depth 56 (basic pre): ` for residual against plain, else ''
    kind: str
    shortcut: str
    family: str
    context: str
    a: Side
    b: Side
    primary: bool
    epochs: int
    datasets: tuple[str, ...]
    configs: tuple[Configuration, ...]


@dataclass(frozen=True)
class Group:
    """The values of an axis in one context, to rank on final test error."""

    axis: str
    context: str
    names: tuple[str, ...]
    sides: tuple[Side, ...]
    epochs: int
    datasets: tuple[str, ...]
    configs: tuple[Configuration, ...]


def _configs(cells: pd.DataFrame) -> tuple[Configuration, ...]:
    return tuple(dict.fromkeys(Configuration.of(row) for _, row in cells.iterrows()))


def degradation_items(cells: pd.DataFrame, context: str | None) -> list[Pair]:
    """Deepest against shallowest net, per shortcut kind and context with two depths or more."""
    items = []
    for (shortcut, where), group in cells.groupby(["shortcut", "context"], sort=False):
        depths = sorted(group["depth"].unique())
        if len(depths) < 2:
            continue
        deep, shallow = group[group["depth"] == depths[-1]], group[group["depth"] == depths[0]]
        items.append(
            Pair(
                prefix="",
                kind="degradation",
                shortcut=str(shortcut),
                family=str(group["family"].iloc[0]),
                context=str(where),
                a=side(deep, str(deep["net"].iloc[0]), "final_train_err"),
                b=side(shallow, str(shallow["net"].iloc[0]), "final_train_err"),
                primary=shortcut == PLAIN and where == context,
                epochs=int(group["epochs"].max()),
                datasets=tuple(sorted(group["dataset"].unique())),
                configs=_configs(pd.concat([deep, shallow])),
            )
        )
    return items


def residual_items(cells: pd.DataFrame) -> list[Pair]:
    """Each residual kind against the plain net at the deepest depth both have, per context."""
    items = []
    many = cells["context"].nunique() > 1
    for where, group in cells.groupby("context", sort=False):
        plain = group[group["shortcut"] == PLAIN]
        if plain.empty:
            continue
        for shortcut, res in group[group["shortcut"] != PLAIN].groupby("shortcut", sort=False):
            common = sorted(set(plain["depth"]) & set(res["depth"]))
            if not common:
                continue
            p, r = plain[plain["depth"] == common[-1]], res[res["depth"] == common[-1]]
            items.append(
                Pair(
                    prefix=f"At depth {common[-1]}" + (f" ({where})" if many else "") + ": ",
                    kind="residual vs plain",
                    shortcut=str(shortcut),
                    family=str(r["family"].iloc[0]),
                    context=str(where),
                    a=side(p, str(p["net"].iloc[0]), "final_train_err"),
                    b=side(r, str(r["net"].iloc[0]), "final_train_err"),
                    primary=False,
                    epochs=int(group["epochs"].max()),
                    datasets=tuple(sorted(group["dataset"].unique())),
                    configs=_configs(pd.concat([p, r])),
                )
            )
    return items


def best_items(cells: pd.DataFrame) -> list[Group]:
    """For each varying axis among block and order (and both together), per context."""
    axes = [a for a in ("block", "order") if cells[a].nunique() > 1]
    if len(axes) == 2:
        axes.append("block+order")
    items = []
    for axis in axes:
        columns = axis.split("+")
        frame = cells.assign(
            value=cells[columns].astype(str).agg(" ".join, axis=1),
            where=config_name(cells, without=columns),
        )
        for where, group in frame.groupby("where", sort=False):
            values = list(dict.fromkeys(group["value"]))
            if len(values) < 2:
                continue
            items.append(
                Group(
                    axis=axis,
                    context=str(where),
                    names=tuple(values),
                    sides=tuple(
                        side(group[group["value"] == v], v, "final_test_err") for v in values
                    ),
                    epochs=int(group["epochs"].max()),
                    datasets=tuple(sorted(group["dataset"].unique())),
                    configs=_configs(group),
                )
            )
    return items


def headline_context(grid: Grid) -> str:
    """The context the headline speaks of: the base configuration's values of the other axes
    (block, order, ...) when the grid has them, else each axis's first value."""
    base = grid.spec.base
    preferred = {}
    for axis, values in grid.spec.grid.items():
        if axis in ("model.shortcut", "model.depth"):
            continue
        section, name = axis.split(".", 1)
        value = getattr(base, section).get(name)
        same = [v for v in values if v == value or str(v) == str(value)]
        preferred[axis] = same[0] if same else values[0]
    for cell in grid.cells:
        chosen = dict(cell.varying)
        if all(str(chosen[a]) == str(v) for a, v in preferred.items()):
            return cell.name.context
    return grid.cells[0].name.context

"""The report's conclusions, computed from the per-cell table: never written by hand.

**Runs.** Every seed of a configuration with an outcome counts: a run that trained, a run stuck
at chance (finished with a training error within :data:`STUCK_POINTS` of chance,
(1 − 1/classes) × 100), and a diverged run (a non-finite loss), which counts at chance error.
Failing to train is thus the worst error a configuration can have: for a plain net it *is* the
degradation, and in a block/order ranking it counts against its configuration. Runs without an
outcome (new, running, failed, killed) are listed, not counted.

**Comparisons** (:mod:`resnet_ablate.stats`): `a` against `b` on an error rate, by two one-sided
Welch t-tests with disjoint null hypotheses: "worse" (the difference a − b is above 0) and "not
worse" (it is below the grid's margin, a non-inferiority test). Neither shown: undecided.

- Degradation (He et al. 2015), per shortcut kind and context (every column but the shortcut,
  the depth and the seed): the deepest net against the shallowest, on final training error.
  Plain nets: "worse" reproduces the paper, "not worse" does not. Residual nets: "not worse"
  reproduces it (no degradation beyond the margin), "worse" does not.
- Residual against plain at the deepest depth both have: the plain net "worse" means the
  residual net trains better; "not worse" that it is no better by the margin or more.
- The best block / unit order (final test error): multiple comparisons with the best.

**Multiplicity.** The headline comparison (plain nets in the headline context) is the one
primary test, at α. Every other comparison of the grid belongs to one family whose familywise
error rate is held at α by Holm's step-down procedure (:func:`resnet_ablate.stats.holm`).

**Seeds until decided.** With ``seeds: {min, max}`` the comparisons are group-sequential (one
look per round of seeds); :func:`undecided_configs` names the configurations of the comparisons
that are still open, for the runner to give one more seed.

**Scope.** Every verdict says so when the grid trained fewer epochs than the paper (164) or on
another dataset than CIFAR-10: deeper nets converge later, so a short run can both show and hide
a gap.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import stats
from ..config import VerdictSpec
from ..stats import Decision, Schedule, Trail

PAPER_EPOCHS = 164
PAPER_DATASET = "cifar10"
PLAIN = "none"
REPRODUCED, NOT_REPRODUCED, UNDECIDED = "reproduced", "not reproduced", "undecided"
#: Classes per dataset, for the chance-level error (1 − 1/classes) × 100.
CLASSES = {"cifar10": 10, "cifar100": 100, "fashion-mnist": 10, "synthetic": 10}
#: A run whose final training error is within this many points of chance is stuck.
STUCK_POINTS = 5.0
#: The columns that name a configuration (all of a cell but its seed).
CONFIG_COLUMNS = ("arch", "net", "block", "order", "extras")
#: Names of the axes a comparison can be about, in the paper's words.
AXIS_NAMES = {"block": "block", "order": "unit order", "block+order": "block and unit order"}
_DATASET_NAMES = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "fashion-mnist": "Fashion-MNIST",
    "synthetic": "synthetic data",
}


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
        return _pm(self.mean, self.sd, self.n, digits)

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


def _pm(mean: float, sd: float, n: int, digits: int = 1) -> str:
    spread = f" ± {sd:.{digits}f}" if n >= 2 and math.isfinite(sd) else ""
    return f"{mean:.{digits}f}{spread}%"


def _points(x: float, digits: int = 1) -> str:
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


# --------------------------------------------------------------------------------------------
# Verdicts.


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


@dataclass(frozen=True)
class Verdicts:
    """Every verdict of a grid, the headline, and how they were reached."""

    headline: str
    headline_outcome: str  # reproduced, not reproduced, undecided or untested
    degradation: tuple[PairVerdict, ...]
    residual_vs_plain: tuple[PairVerdict, ...]
    best: tuple[BestVerdict, ...]
    method: tuple[str, ...]
    schedule: Schedule | None

    def undecided(self) -> list[Configuration]:
        """Configurations of comparisons that are open below the maximum number of seeds."""
        found: dict[Configuration, None] = {}
        for v in (*self.degradation, *self.residual_vs_plain, *self.best):
            d = v.decision
            if not d.decided and not d.trail.at_max:
                found.update(dict.fromkeys(v.configurations))
        return list(found)


def judge(
    cells: pd.DataFrame,
    spec: VerdictSpec,
    *,
    context: str | None,
    schedule: Schedule | None = None,
) -> Verdicts:
    """Every verdict of the per-cell table: the primary (plain nets of `context`) at α, the rest
    as one Holm family; block/order rankings for the axes that vary."""
    pairs = _degradation_items(cells, context) + _residual_items(cells)
    groups = _best_items(cells)
    margin = spec.margin
    trails = [stats.trail(i.a.values, i.b.values, margin=margin, schedule=schedule) for i in pairs]
    best_trails = [
        stats.best_trail([s.values for s in g.sides], margin=margin, schedule=schedule)
        for g in groups
    ]
    decisions, best_decisions = _decide(pairs, trails, groups, best_trails, spec.alpha)
    family = sum(not item.primary for item in pairs)
    wording = _Wording(spec, schedule)
    made = [wording.pair(item, d) for item, d in zip(pairs, decisions, strict=True)]
    degradation = tuple(v for v in made if v.kind == "degradation")
    residual = tuple(v for v in made if v.kind == "residual vs plain")
    best = tuple(wording.best(g, d) for g, d in zip(groups, best_decisions, strict=True))
    primary = next((v for v in degradation if v.primary), None)
    text, outcome = _headline(primary, degradation, cells, context)
    method = wording.method(primary, family + len(groups), bool(groups))
    return Verdicts(text, outcome, degradation, residual, best, method, schedule)


def undecided_configs(
    cells: pd.DataFrame, spec: VerdictSpec, schedule: Schedule, *, context: str | None
) -> list[Configuration]:
    """The configurations that need one more seed: those of every comparison still undecided
    below the schedule's maximum (the runner's question after each round)."""
    return judge(cells, spec, context=context, schedule=schedule).undecided()


def _decide(
    pairs: Sequence[_Pair],
    trails: Sequence[Trail],
    groups: Sequence[_Group],
    best_trails: Sequence[Trail],
    alpha: float,
) -> tuple[list[Decision], list[Decision]]:
    """The primary comparison at α; every other one in one Holm family.

    A pair's two tests are one block (at most one of their nulls is true). A group's two claims
    are separate hypotheses: "this one is best", its p-value multiplied by the number of values
    (any could have come out lowest), and "all within the margin".
    """
    family = [k for k, item in enumerate(pairs) if not item.primary]
    blocks = [_seq(trails[k]) for k in family]
    for g, t in zip(groups, best_trails, strict=True):
        best, within = _seq(t)
        blocks += [[min(1.0, len(g.sides) * best)], [within]]
    levels = iter(stats.holm(blocks, alpha))
    family_levels = {k: next(levels) for k in family}
    decisions = []
    for k, t in enumerate(trails):
        if k not in family_levels:
            decisions.append(stats.decide(t, alpha=alpha))
            continue
        greater, not_greater = family_levels[k]
        decisions.append(stats.decide(t, alpha=alpha, greater=greater, not_greater=not_greater))
    best_decisions = []
    for g, t in zip(groups, best_trails, strict=True):
        (greater,), (not_greater,) = next(levels), next(levels)
        best = greater.per(len(g.sides))
        best_decisions.append(stats.decide(t, alpha=alpha, greater=best, not_greater=not_greater))
    return decisions, best_decisions


def _seq(t: Trail) -> list[float]:
    """A trail's sequential p-values (greater, not greater) at its latest look; 1 without one."""
    if not t.looks:
        return [1.0, 1.0]
    return [t.looks[-1].seq_greater, t.looks[-1].seq_not_greater]


# --------------------------------------------------------------------------------------------
# The comparisons a table holds.


@dataclass(frozen=True)
class _Pair:
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
class _Group:
    axis: str
    context: str
    names: tuple[str, ...]
    sides: tuple[Side, ...]
    epochs: int
    datasets: tuple[str, ...]
    configs: tuple[Configuration, ...]


def _configs(cells: pd.DataFrame) -> tuple[Configuration, ...]:
    return tuple(dict.fromkeys(Configuration.of(row) for _, row in cells.iterrows()))


def _degradation_items(cells: pd.DataFrame, context: str | None) -> list[_Pair]:
    """Deepest against shallowest net, per shortcut kind and context with two depths or more."""
    items = []
    for (shortcut, where), group in cells.groupby(["shortcut", "context"], sort=False):
        depths = sorted(group["depth"].unique())
        if len(depths) < 2:
            continue
        deep, shallow = group[group["depth"] == depths[-1]], group[group["depth"] == depths[0]]
        items.append(
            _Pair(
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


def _residual_items(cells: pd.DataFrame) -> list[_Pair]:
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
                _Pair(
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


def _best_items(cells: pd.DataFrame) -> list[_Group]:
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
                _Group(
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


# --------------------------------------------------------------------------------------------
# Wording: each sentence says what its numbers say.


@dataclass(frozen=True)
class _Wording:
    spec: VerdictSpec
    schedule: Schedule | None

    @property
    def margin(self) -> str:
        return _points(self.spec.margin)

    def p(self, p: float, primary: bool) -> str:
        kind = "" if primary else "Holm-adjusted "
        seq = "sequential " if self.schedule is not None else ""
        return f"{kind}{seq}{p_text(p)}"

    def seeds_taken(self, d: Decision) -> str:
        """How many seeds the decision took, with a schedule: ` Decided at 4 seeds each ...`."""
        if self.schedule is None or d.look is None:
            return ""
        na, nb = d.seeds
        look = f"look {d.look.index} of {self.schedule.looks}"
        if d.decided:
            return f" Decided with {seeds(na, nb)} ({look})."
        if d.trail.at_max:
            return f" Undecided at the maximum of {seeds(na, nb)}."
        return f" Open after {seeds(na, nb)} ({look}): the next round adds a seed."

    def scope(self, epochs: int, datasets: tuple[str, ...], tail: str) -> str:
        """The caveat when the run is shorter than the paper's or on another dataset."""
        short = epochs < PAPER_EPOCHS
        other = tuple(datasets) != (PAPER_DATASET,)
        if not (short or other):
            return ""
        names = " and ".join(_DATASET_NAMES.get(d, d) for d in datasets)
        length = f"{epochs} epoch{'s' if epochs != 1 else ''}"
        if short and other:
            scope = f"{length} on {names}, not the paper's {PAPER_EPOCHS} on CIFAR-10"
        elif short:
            scope = f"{length}, not the paper's {PAPER_EPOCHS}"
        else:
            scope = f"{names}, not the paper's CIFAR-10"
        return f" Scope: {scope}; deeper nets converge later, so {tail}."

    def pair(self, item: _Pair, d: Decision) -> PairVerdict:
        outcome, text = self._pair_text(item, d)
        text = item.prefix + text
        notes = [s.failures() for s in (item.a, item.b) if s.failures()]
        if notes:
            text += f" Failed to train, counted against its net: {'; '.join(notes)}."
        uncounted = [f"{s.name}: {s.missing}" for s in (item.a, item.b) if s.n and s.missing]
        if uncounted:
            text += f" Not counted ({'; '.join(uncounted)})."
        return PairVerdict(
            item.kind,
            item.shortcut,
            item.family,
            item.context,
            item.a,
            item.b,
            item.primary,
            d,
            outcome,
            text,
            item.configs,
        )

    def _pair_text(self, item: _Pair, d: Decision) -> tuple[str, str]:
        if d.look is None:
            return UNDECIDED, self._untested(item, d)
        w = d.look.welch
        residual = item.kind == "residual vs plain"
        # Said of the deeper net (degradation) or of the residual net (against plain).
        subject, other = (item.b, item.a) if residual else (item.a, item.b)
        sign = -1.0 if residual else 1.0
        a_stats, b_stats = (w.mean_a, w.sd_a, w.n_a), (w.mean_b, w.sd_b, w.n_b)
        mine, theirs = (b_stats, a_stats) if residual else (a_stats, b_stats)
        diff = sign * w.diff
        head = (
            f"{subject.name} trains to {_pm(*mine)} vs {_pm(*theirs)} for {other.name} "
            f"({seeds(mine[2], theirs[2])}): {_points(abs(diff))} "
            f"{'higher' if diff > 0 else 'lower'}"
        )
        lo, hi = sorted(sign * x for x in d.interval)
        g = f", Hedges' g {sign * w.hedges_g:.1f}" if math.isfinite(w.hedges_g) else ""
        evidence = f"{_level(d.confidence)} CI {lo:.1f} to {hi:.1f} points{g}"
        worse, margin = ("better", f"-{self.margin}") if residual else ("worse", self.margin)
        adjusted = "" if item.primary else "Holm-adjusted "
        if d.outcome == "greater":
            sentence = f"{head}, significant ({self.p(d.p_greater, item.primary)}, {evidence})"
            if d.within_margin:
                sentence += f", but by less than the margin of {self.margin}"
            outcome, tail, why = self._greater(item, d.within_margin)
        elif d.outcome == "not_greater":
            sentence = (
                f"{head}; not {worse} by {self.margin} or more "
                f"({self.p(d.p_not_greater, item.primary)} against '{worse} by {self.margin}', "
                f"{evidence})"
            )
            if (hi < 0) if not residual else (lo > 0):
                sentence += f"; the whole interval is {'above' if residual else 'below'} zero"
            outcome, tail, why = self._not_greater(item)
        else:
            seq = "sequential " if self.schedule is not None else ""
            sentence = (
                f"{head}, not significant ({adjusted}{seq}{p_text(d.p_greater)} for '{worse}', "
                f"{p_text(d.p_not_greater)} for 'not {worse} by {self.margin}'): the "
                f"{evidence.split(',')[0]} holds both 0 and {margin}, so neither is shown"
            )
            outcome, tail, why = UNDECIDED, "a full run may decide it either way", ""
        text = f"{sentence}.{why}{self.seeds_taken(d)}"
        return outcome, text + self.scope(item.epochs, item.datasets, tail)

    @staticmethod
    def _greater(item: _Pair, within: bool) -> tuple[str, str, str]:
        """Outcome, scope tail and conclusion when `a` is significantly worse than `b`."""
        if item.kind == "residual vs plain":
            return (
                "residual better",
                "the gap may change with a full run",
                " The residual net trains better than the plain net at this depth.",
            )
        if item.shortcut == PLAIN:
            return (
                REPRODUCED,
                "the deeper plain net may only be slower, not worse at convergence",
                " The deeper plain net is harder to optimise.",
            )
        if within:
            return (
                REPRODUCED,
                "the deeper residual net may yet pull ahead",
                " No degradation beyond the margin.",
            )
        return (
            NOT_REPRODUCED,
            "the deeper residual net may not have caught up yet; compare the training curves",
            " The deeper residual net trains worse here.",
        )

    @staticmethod
    def _not_greater(item: _Pair) -> tuple[str, str, str]:
        """Outcome, scope tail and conclusion when `a` is shown not worse than `b`."""
        if item.kind == "residual vs plain":
            return (
                "no better",
                "a gap may open with a full run",
                " The residual net is no better than the plain net at this depth.",
            )
        if item.shortcut == PLAIN:
            return (
                NOT_REPRODUCED,
                "a gap may open with a full run",
                " The deeper plain net is not harder to optimise here.",
            )
        return (
            REPRODUCED,
            "this may change with a full run",
            " Depth does not hurt the residual net: no degradation.",
        )

    def _untested(self, item: _Pair, d: Decision) -> str:
        a, b = (item.b, item.a) if item.kind == "residual vs plain" else (item.a, item.b)
        measured = ""
        if a.n and b.n:
            measured = f"; as measured, {a.name} {a.short()} vs {b.name} {b.short()}"
        if d.trail.waiting and a.n and b.n:
            need = self.schedule.min if self.schedule else 2
            return f"Waiting for {need} seeds each before the first look{measured}."
        why = {
            "no_values": _no_run(a, b),
            "one_seed": _one_seed(a, b),
            "no_spread": "every seed gave the same error on both sides, so there is no "
            "seed-to-seed spread to test against",
        }[d.trail.problem or "no_values"]
        return f"Cannot test: {why}{measured}."

    def best(self, g: _Group, d: Decision) -> BestVerdict:
        name = f"{AXIS_NAMES[g.axis].capitalize()} at {g.context}"
        if d.look is None:
            why = {
                "no_values": "a value has no finished run",
                "one_seed": "one seed for "
                + ", ".join(s.name for s in g.sides if s.n == 1)
                + ", and a best is never named from one seed",
                "no_spread": "every seed gave the same error, so there is no spread to test",
            }[d.trail.problem or "no_values"]
            if d.trail.waiting:
                why = f"waiting for {self.schedule.min if self.schedule else 2} seeds each"
            text = f"{name}: no best can be named yet: {why}."
            return BestVerdict(
                g.axis, g.context, g.names, g.sides, d, "", UNDECIDED, text, g.configs
            )
        ranking = d.look.ranking
        values = tuple(g.names[i] for i in ranking)
        sides = tuple(g.sides[i] for i in ranking)
        w0 = d.look.versus[0]
        lead = f"{values[0]} {_pm(w0.mean_b, w0.sd_b, w0.n_b, 2)}"
        others = ", ".join(
            f"{v} {_pm(w.mean_a, w.sd_a, w.n_a, 2)} ({w.diff:+.2f})"
            for v, w in zip(values[1:], d.look.versus, strict=True)
        )
        same = len({w.n_a for w in d.look.versus} | {w0.n_b}) == 1
        count = f" ({seeds(w0.n_b)} each)" if same else ""
        if d.outcome == "greater":
            outcome, best = "best", values[0]
            text = (
                f"{name}: {values[0]} gives the lowest test error, {lead}, significantly lower "
                f"than every other: {others}{count}; multiple comparisons "
                f"with the best, {self.p(d.p_greater, False)}."
            )
        elif d.outcome == "not_greater":
            outcome, best = "within margin", ""
            text = (
                f"{name}: no value is worse than another by {self.margin} or more "
                f"({self.p(d.p_not_greater, False)}); lowest mean {lead}; then {others}."
            )
        else:
            outcome, best = UNDECIDED, ""
            text = (
                f"{name}: no best can be named: the lowest mean, {lead}, is not significantly "
                f"lower than every other ({self.p(d.p_greater, False)}); {others}"
                f"{count}."
            )
        text += self.seeds_taken(d)
        notes = [s.failures() for s in g.sides if s.failures()]
        if notes:
            text += f" Failed to train, counted against its configuration: {'; '.join(notes)}."
        text += self.scope(g.epochs, g.datasets, "a longer run may rank them differently")
        return BestVerdict(g.axis, g.context, values, sides, d, best, outcome, text, g.configs)

    def method(self, primary: PairVerdict | None, secondary: int, groups: bool) -> tuple[str, ...]:
        """How the verdicts were reached, in sentences for the report."""
        alpha = f"α = {self.spec.alpha:g}"
        out = [
            f"Each comparison is two one-sided Welch t-tests at {alpha}: 'worse' (the difference "
            f"of mean error is above 0) and 'not worse' (it is below the margin of {self.margin}, "
            "a non-inferiority test; verdicts.margin in the grid file, 1 point unless set). With "
            "evidence for neither the "
            "verdict is undecided, whatever the sign of the difference. Intervals are "
            "Welch–Satterthwaite confidence intervals at the level that decides; g is Hedges' g.",
        ]
        if primary is not None:
            first = (
                f"The headline comparison ({primary.a.name} against {primary.b.name}, "
                f"{primary.context}) is the one primary test, at {alpha}."
            )
            if secondary:
                first += (
                    f" The other {secondary} comparison{'s' if secondary != 1 else ''} form one "
                    f"family whose familywise error rate is held at {self.spec.alpha:g} by Holm's "
                    "step-down procedure (the two one-sided tests of a comparison share one part "
                    "of α); their p-values are Holm-adjusted."
                )
            out.append(first)
        elif secondary:
            out.append(
                f"No primary comparison: all {secondary} comparisons form one family whose "
                f"familywise error rate is held at {self.spec.alpha:g} by Holm's step-down "
                "procedure; their p-values are Holm-adjusted."
            )
        if groups:
            out.append(
                "A best block or unit order is named by multiple comparisons with the best: the "
                "lowest mean test error must be significantly lower than every other "
                "(one-sided Welch), at the family's level divided by the number of values "
                "compared, since any of them could have come out lowest; never from one seed."
            )
        out.append(
            "Diverged runs count at chance error, (1 − 1/classes) × 100%, and runs stuck at "
            f"chance (final training error within {STUCK_POINTS:g} points of it) at their own "
            "error: failing to train counts against the configuration."
        )
        if self.schedule is None:
            out.append("Seeds are a fixed list: one look at the full α.")
        else:
            out.append(
                f"Seeds until decided ({self.schedule.min} to {self.schedule.max} per "
                "configuration): a group-sequential design with one look after each round of "
                f"seeds; each one-sided test spends its α over the looks ({stats.SPENDING}, at "
                "information fractions (n − 1)/(max − 1)), applied as nominal p-value levels "
                "to the Welch tests; a comparison stops at the first look where either test "
                "rejects. p-values are sequential p-values: the smallest α at which the design "
                "would have rejected by the deciding look (the latest while undecided)."
            )
        return tuple(out)


def _level(confidence: float) -> str:
    """`90%`, `97.5%`."""
    pct = 100 * confidence
    return f"{pct:.0f}%" if abs(pct - round(pct)) < 0.05 else f"{pct:.1f}%"


def _no_run(a: Side, b: Side) -> str:
    empty = [s for s in (a, b) if not s.n]
    parts = []
    for s in empty:
        why = f" ({s.missing})" if s.missing else ""
        parts.append(f"{s.name} has no finished run{why}")
    return "; ".join(parts)


def _one_seed(a: Side, b: Side) -> str:
    if a.n < 2 and b.n < 2:
        return "one seed for each side, so the seed-to-seed spread is unknown"
    who = a.name if a.n < 2 else b.name
    return f"one seed for {who}, so its seed-to-seed spread is unknown"


def _headline(
    primary: PairVerdict | None,
    degradation: Sequence[PairVerdict],
    cells: pd.DataFrame,
    context: str | None,
) -> tuple[str, str]:
    """The report's first sentence, about the plain nets of the headline context."""
    mine = cells[cells["context"] == context] if context is not None else cells.iloc[:0]
    if primary is None:
        plain = mine[mine["shortcut"] == PLAIN]
        if plain.empty:
            first = "No plain nets in this grid, so degradation is not tested"
        else:
            depths = ", ".join(map(str, sorted(plain["depth"].unique())))
            first = f"Only one depth of plain net ({depths}): degradation needs two"
        residual = [v for v in degradation if v.shortcut != PLAIN and v.context == context]
        extra = " ".join(
            f"{v.family}: {v.outcome}, {v.a.name} {v.a.short()} vs {v.b.name} {v.b.short()} "
            f"({seeds(v.a.n, v.b.n)})."
            for v in residual
        )
        return f"{first}." + (f" {extra}" if extra else ""), "untested"
    d = primary.decision
    if d.look is None:
        why = primary.text.removeprefix("Cannot test: ")
        return f"Degradation {primary.outcome}: {why}", primary.outcome
    w = d.look.welch
    lo, hi = d.interval
    p = d.p_greater if d.outcome != "not_greater" else d.p_not_greater
    first = (
        f"Degradation {primary.outcome}: {primary.a.name} trains to {w.mean_a:.1f}% error vs "
        f"{w.mean_b:.1f}% for {primary.b.name} ({seeds(w.n_a, w.n_b)}; {w.diff:+.1f} points, "
        f"{_level(d.confidence)} CI {lo:.1f} to {hi:.1f}, {p_text(p)})"
    )
    others = []
    depth = int(mine.loc[mine["net"] == primary.a.name, "depth"].iloc[0])
    for _, group in mine[(mine["shortcut"] != PLAIN) & (mine["depth"] == depth)].groupby(
        "shortcut", sort=False
    ):
        s = side(group, str(group["net"].iloc[0]), "final_train_err")
        failed = len(s.diverged) + len(s.stuck)
        note = f" ({failed} of {seeds(s.n)} failed to train, counted)" if failed else ""
        others.append(f"{s.name} {s.mean:.1f}%{note}" if s.n else f"{s.name} has no finished run")
    return first + (f"; {', '.join(others)}" if others else "") + ".", primary.outcome


# --------------------------------------------------------------------------------------------
# Gradient flow.

_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def sci(x: float) -> str:
    """`9.1×10⁶` for large or small numbers, plain digits between 0.1 and 100."""
    if not math.isfinite(x) or x == 0:
        return str(x)
    if 0.1 <= abs(x) < 100:
        return f"{x:.2g}"
    exponent = math.floor(math.log10(abs(x)))
    mantissa = x / 10**exponent
    return f"{mantissa:.1f}×10{str(exponent).translate(_SUPERSCRIPT)}"


def gradient_ratios(flows: pd.DataFrame) -> pd.DataFrame:
    """First-layer over last-layer gradient norm per net, seed and epoch (columns net, family,
    seed, epoch, ratio); NaN where a norm is zero or not finite."""
    rows = []
    for (net, family, seed, epoch), g in flows.groupby(["net", "family", "seed", "epoch"]):
        g = g.sort_values("layer")
        first, last = float(g["norm"].iloc[0]), float(g["norm"].iloc[-1])
        ok = first > 0 and last > 0 and math.isfinite(first) and math.isfinite(last)
        rows.append((net, family, seed, epoch, first / last if ok else math.nan))
    return pd.DataFrame(rows, columns=["net", "family", "seed", "epoch", "ratio"])


def gradient_summary(flows: pd.DataFrame) -> list[str]:
    """What the gradient norms at the first logged epoch show, in words that follow the data."""
    if flows.empty:
        return []
    ratios = gradient_ratios(flows)
    epoch = int(ratios["epoch"].min())
    first = ratios[(ratios["epoch"] == epoch) & ratios["ratio"].notna()]
    when = flows.loc[flows["epoch"] == epoch, "when"].iloc[0] if "when" in flows else ""
    at = f"epoch {epoch}" + (f" — {when}" if when else "")
    out, typical = [], {}
    for net, g in first.groupby("net", sort=False):
        r = float(np.exp(np.log(g["ratio"]).mean()))  # geometric mean over seeds
        typical[g["family"].iloc[0]] = (net, r)
        low, high = sci(g["ratio"].min()), sci(g["ratio"].max())
        spread = f" (over {seeds(len(g))}: {low} to {high})" if low != high else ""
        trend = "grows toward the input" if r > 1 else "shrinks toward the input"
        out.append(
            f"{net}, {at}: the gradient norm of the first conv layer is {sci(r)} times that of "
            f"the last{spread}, so the gradient {trend}."
        )
    if "plain" in typical:
        net, r = typical["plain"]
        res = [typical[f] for f in ("res", "res-proj") if f in typical]
        if r > 1:
            text = (
                f"In {net} the gradient does not vanish toward the input at epoch {epoch}; "
                f"it grows by {sci(r)} from the last layer to the first"
            )
        else:
            text = (
                f"In {net} the gradient vanishes toward the input at epoch {epoch}: it shrinks "
                f"by {sci(1 / r)} from the last layer to the first"
            )
        if res:
            rnet, rr = res[0]
            text += f", against a factor of {sci(rr)} in {rnet}"
        out.append(text + ".")
    return out

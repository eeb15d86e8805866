"""Wording: each sentence of a verdict says what its numbers say.

:class:`Wording` turns a comparison and its decision into a verdict with its text (the numbers,
the evidence, the conclusion, failed runs, seeds taken, and the scope when the run is shorter
than the paper's or on another dataset), and says how the verdicts were reached;
:func:`headline` is the report's first sentence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from .. import stats
from ..config import VerdictSpec
from ..stats import Decision, Schedule
from .comparisons import (
    NOT_REPRODUCED,
    REPRODUCED,
    UNDECIDED,
    BestVerdict,
    Group,
    Pair,
    PairVerdict,
)
from .sides import PLAIN, STUCK_POINTS, Side, p_text, pm, points, seeds, side

PAPER_EPOCHS = 164
PAPER_DATASET = "cifar10"
#: Names of the axes a comparison can be about, in the paper's words.
AXIS_NAMES = {"block": "block", "order": "unit order", "block+order": "block and unit order"}
_DATASET_NAMES = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "fashion-mnist": "Fashion-MNIST",
    "synthetic": "synthetic data",
}


@dataclass(frozen=True)
class Wording:
    """The sentences of a grid's verdicts, under its margin and α (`spec`) and seed schedule."""

    spec: VerdictSpec
    schedule: Schedule | None

    @property
    def margin(self) -> str:
        return points(self.spec.margin)

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

    def pair(self, item: Pair, d: Decision) -> PairVerdict:
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

    def _pair_text(self, item: Pair, d: Decision) -> tuple[str, str]:
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
            f"{subject.name} trains to {pm(*mine)} vs {pm(*theirs)} for {other.name} "
            f"({seeds(mine[2], theirs[2])}): {points(abs(diff))} "
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
    def _greater(item: Pair, within: bool) -> tuple[str, str, str]:
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
    def _not_greater(item: Pair) -> tuple[str, str, str]:
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

    def _untested(self, item: Pair, d: Decision) -> str:
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

    def best(self, g: Group, d: Decision) -> BestVerdict:
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
        lead = f"{values[0]} {pm(w0.mean_b, w0.sd_b, w0.n_b, 2)}"
        others = ", ".join(
            f"{v} {pm(w.mean_a, w.sd_a, w.n_a, 2)} ({w.diff:+.2f})"
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


def headline(
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

"""The report's conclusions, computed from the per-cell table: never written by hand.

**Runs.** Every seed of a configuration with an outcome counts: a run that trained, a run stuck
at chance (finished with a training error within :data:`.sides.STUCK_POINTS` of chance,
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

Here: :func:`judge` (the comparisons decided, worded and gathered in :class:`Verdicts`) and
:func:`undecided_configs`. The pieces: ``sides.py`` (one configuration over its seeds),
``comparisons.py`` (what a table compares, and the verdicts' records), ``wording.py`` (their
sentences and the headline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from .. import stats
from ..config import VerdictSpec
from ..stats import Decision, Schedule, Trail
from .comparisons import (
    BestVerdict,
    Group,
    Pair,
    PairVerdict,
    best_items,
    degradation_items,
    residual_items,
)
from .sides import Configuration
from .wording import AXIS_NAMES, Wording, headline


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

    def max_undecided(self) -> list[str]:
        """The comparisons undecided at the maximum number of seeds (or a fixed list's), named
        `plain-56 against plain-20 (basic post)` or `Unit order at res-110 basic`."""
        found = [
            f"{v.a.name} against {v.b.name} ({v.context})"
            for v in (*self.degradation, *self.residual_vs_plain)
            if v.decision.max_undecided
        ]
        found += [
            f"{AXIS_NAMES[v.axis].capitalize()} at {v.context}"
            for v in self.best
            if v.decision.max_undecided
        ]
        return found


def judge(
    cells: pd.DataFrame,
    spec: VerdictSpec,
    *,
    context: str | None,
    schedule: Schedule | None = None,
) -> Verdicts:
    """Every verdict of the per-cell table: the primary (plain nets of `context`) at α, the rest
    as one Holm family; block/order rankings for the axes that vary."""
    pairs = degradation_items(cells, context) + residual_items(cells)
    groups = best_items(cells)
    margin = spec.margin
    trails = [stats.trail(i.a.values, i.b.values, margin=margin, schedule=schedule) for i in pairs]
    best_trails = [
        stats.best_trail([s.values for s in g.sides], margin=margin, schedule=schedule)
        for g in groups
    ]
    decisions, best_decisions = _decide(pairs, trails, groups, best_trails, spec.alpha)
    family = sum(not item.primary for item in pairs)
    wording = Wording(spec, schedule)
    made = [wording.pair(item, d) for item, d in zip(pairs, decisions, strict=True)]
    degradation = tuple(v for v in made if v.kind == "degradation")
    residual = tuple(v for v in made if v.kind == "residual vs plain")
    best = tuple(wording.best(g, d) for g, d in zip(groups, best_decisions, strict=True))
    primary = next((v for v in degradation if v.primary), None)
    text, outcome = headline(primary, degradation, cells, context)
    method = wording.method(primary, family + len(groups), bool(groups))
    return Verdicts(text, outcome, degradation, residual, best, method, schedule)


def undecided_configs(
    cells: pd.DataFrame, spec: VerdictSpec, schedule: Schedule, *, context: str | None
) -> list[Configuration]:
    """The configurations that need one more seed: those of every comparison still undecided
    below the schedule's maximum (the runner's question after each round)."""
    return judge(cells, spec, context=context, schedule=schedule).undecided()


def _decide(
    pairs: Sequence[Pair],
    trails: Sequence[Trail],
    groups: Sequence[Group],
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

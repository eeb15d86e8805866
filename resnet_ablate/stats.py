"""Decisions about sets of seeds, and the error rates they keep: pure statistics.

A comparison is of a configuration `a` against a configuration `b` on an error rate (percent),
seed against seed. The effect is the difference of means, Δ = mean(a) − mean(b), in error
points, positive when `a` is worse. Two one-sided claims can be made about it:

- **greater** — `a` is worse than `b` (Δ > 0): the one-sided Welch t-test of H0: Δ ≤ 0, as
  ``scipy.stats.ttest_ind(a, b, equal_var=False, alternative="greater")``;
- **not greater** — `a` is not worse than `b` by the margin δ or more (Δ < δ): the
  non-inferiority test, the one-sided Welch t-test of H0: Δ ≥ δ (``ttest_ind(a - δ, b,
  alternative="less")``). It is one of the two one-sided tests (TOST) of equivalence within ±δ;
  the other, H0: Δ ≤ −δ, is :meth:`Welch.p_above`.

The two null hypotheses are disjoint (Δ ≤ 0 and Δ ≥ δ), so at most one of the two claims can be
false; each is made at level α, and a comparison draws a false conclusion with probability at
most α. With evidence for neither the comparison is **undecided**, whatever the sign of the
difference. A look reports the difference with its Welch–Satterthwaite confidence interval, read
at the level that decides (two-sided 1 − 2π: it excludes 0 exactly when the "greater" test
rejects at π, and lies below δ exactly when the non-inferiority test does), and Hedges' g: the
difference over the pooled standard deviation times 1 − 3 / (4 (n_a + n_b) − 9).

**Seeds until decided** (:class:`Schedule`, ``seeds: {min, max}``) is a group-sequential design
with one look after each round of seeds, at n_j = min, min + 1, ..., max seeds per configuration
(K = max − min + 1 looks). Each one-sided test spends its α over the looks with the Lan–DeMets
spending function of Pocock type, α(t) = α·ln(1 + (e − 1)·t), at information fractions
t_j = (n_j − 1) / (max − 1), the share of degrees of freedom (with the share of seeds, n_j / max,
the t-statistics at 3 seeds, less correlated from look to look than the normal theory assumes,
exceeded α in simulation). The boundaries are those of a Brownian motion observed at t_j
(recursive numerical integration, Armitage, McPherson and Rowe 1969) and are applied to the Welch
t-test as nominal p-value levels: at look j a test rejects when p_j ≤ π_j(α). The
non-inferiority test is the futility boundary of the "greater" test and the "greater" test the
futility boundary of the non-inferiority test; both are non-binding (stopping for one can only
lower the other's error rate). A comparison is decided at the first look where either rejects,
or reaches the maximum undecided. With a fixed list of seeds there is one look at the full α
(π_1(α) = α): the plain fixed-sample tests.

The **sequential p-value** of a test is the smallest α at which the design would have rejected
by the current look, min_j π_j⁻¹(p_j) (one look: the p-value). Holm's procedure applied to
sequential p-values is the graphical procedure of Maurer and Bretz (2013) for group-sequential
designs. :func:`holm` computes Holm's step-down procedure as its closed test, in which an
intersection holds only hypotheses that can be true together (Shaffer 1986): the two one-sided
tests of one comparison share one part of α.

"The best" of several configurations (:func:`best_trail`) is multiple comparisons with the best:
the configuration with the lowest mean error is claimed best when every other one is worse than
it by the one-sided Welch test (an intersection-union test); the claim's level is divided by the
number of configurations, because any of them could have been picked (Bonferroni). The opposite
claim, that no configuration is worse than another by the margin or more, is the
intersection-union test of non-inferiority over every ordered pair.

Only numpy and scipy: the runner imports this module to decide which comparisons need a seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy import optimize, special

Outcome = Literal["greater", "not_greater", "undecided"]
#: Why values cannot be tested: no value on a side, one seed on a side, no spread on either.
Problem = Literal["", "no_values", "one_seed", "no_spread"]
#: The spending function, in the reports' words.
SPENDING = "Lan–DeMets alpha spending of Pocock type, α·ln(1 + (e − 1)·t)"


# --------------------------------------------------------------------------------------------
# Welch's two-sample t-test, on one pair of samples or on many at once.


def welch_arrays(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Difference of means, its standard error and the Welch–Satterthwaite degrees of freedom,
    per row of `a` and `b` (seeds along the last axis; at least two each)."""
    na, nb = a.shape[-1], b.shape[-1]
    va = np.var(a, axis=-1, ddof=1) / na
    vb = np.var(b, axis=-1, ddof=1) / nb
    diff = np.mean(a, axis=-1) - np.mean(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    return diff, np.sqrt(va + vb), df


def p_greater(diff: float | np.ndarray, se, df, shift: float = 0.0):
    """One-sided p of H0: Δ ≤ shift (a t distribution with Welch's degrees of freedom)."""
    return special.stdtr(df, (shift - diff) / se)


def p_below(diff: float | np.ndarray, se, df, margin: float):
    """One-sided p of H0: Δ ≥ margin."""
    return special.stdtr(df, (diff - margin) / se)


@dataclass(frozen=True)
class Welch:
    """Welch's comparison of `a` against `b` at one look (difference a − b, in error points)."""

    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    sd_a: float
    sd_b: float

    @property
    def diff(self) -> float:
        return self.mean_a - self.mean_b

    @property
    def se(self) -> float:
        """Standard error of the difference, sqrt(s_a²/n_a + s_b²/n_b)."""
        return math.sqrt(self.sd_a**2 / self.n_a + self.sd_b**2 / self.n_b)

    @property
    def df(self) -> float:
        """Welch–Satterthwaite degrees of freedom."""
        va, vb = self.sd_a**2 / self.n_a, self.sd_b**2 / self.n_b
        return (va + vb) ** 2 / (va**2 / (self.n_a - 1) + vb**2 / (self.n_b - 1))

    @property
    def hedges_g(self) -> float:
        """The difference over the pooled sd, with the small-sample correction (Hedges' g)."""
        n = self.n_a + self.n_b
        pooled = math.sqrt(
            ((self.n_a - 1) * self.sd_a**2 + (self.n_b - 1) * self.sd_b**2) / (n - 2)
        )
        return (1 - 3 / (4 * n - 9)) * self.diff / pooled

    def p_greater(self) -> float:
        """One-sided p of H0: Δ ≤ 0 (is `a` worse?)."""
        return float(p_greater(self.diff, self.se, self.df))

    def p_below(self, margin: float) -> float:
        """One-sided p of H0: Δ ≥ margin (is `a` not worse by the margin or more?)."""
        return float(p_below(self.diff, self.se, self.df, margin))

    def p_above(self, margin: float) -> float:
        """One-sided p of H0: Δ ≤ −margin (is `a` not better by the margin or more?)."""
        return float(p_greater(self.diff, self.se, self.df, -margin))

    def interval(self, level: float) -> tuple[float, float]:
        """Two-sided confidence interval for Δ at `level` (0.9: the 90% interval)."""
        half = float(special.stdtrit(self.df, 1 - (1 - level) / 2)) * self.se
        return self.diff - half, self.diff + half


def problem(a: Sequence[float], b: Sequence[float]) -> Problem:
    """Why Welch's test cannot be run on these values ('' when it can)."""
    if not len(a) or not len(b):
        return "no_values"
    if min(len(a), len(b)) < 2:
        return "one_seed"
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return "no_spread"
    return ""


def welch(a: Sequence[float], b: Sequence[float]) -> Welch:
    """Welch's statistics of two samples that pass :func:`problem`."""
    return Welch(
        len(a),
        len(b),
        float(np.mean(a)),
        float(np.mean(b)),
        float(np.std(a, ddof=1)),
        float(np.std(b, ddof=1)),
    )


# --------------------------------------------------------------------------------------------
# Looks and their boundaries.


@dataclass(frozen=True)
class Schedule:
    """Seeds per configuration at the first and at the last look (`seeds: {min, max}`)."""

    min: int
    max: int

    def __post_init__(self) -> None:
        if not 2 <= self.min <= self.max:
            raise ValueError(f"need 2 <= min <= max seeds, got min {self.min}, max {self.max}")

    @property
    def looks(self) -> int:
        return self.max - self.min + 1

    def seeds(self, look: int) -> int:
        """Seeds per configuration at look `look` (1-based)."""
        return self.min + look - 1

    @property
    def fractions(self) -> tuple[float, ...]:
        """Information fraction at each look, as the share of degrees of freedom,
        (n_j − 1) / (max − 1)."""
        return tuple((self.seeds(j) - 1) / (self.max - 1) for j in range(1, self.looks + 1))


def fractions(schedule: Schedule | None) -> tuple[float, ...]:
    """The looks' information fractions; one look at 1 without a schedule."""
    return schedule.fractions if schedule is not None else (1.0,)


def spend(t: float, alpha: float) -> float:
    """Alpha spent by information fraction t (Lan–DeMets, Pocock type)."""
    return alpha * math.log(1 + (math.e - 1) * min(t, 1.0))


_GRID = 300  # points per look in the recursive integration


@lru_cache(maxsize=4096)
def nominal_levels(fractions: tuple[float, ...], alpha: float) -> tuple[float, ...]:
    """π_j(α): the one-sided p-value level of each look of a design spending α over `fractions`.

    Z_j = S(t_j)/sqrt(t_j) for a standard Brownian motion S; the level at look j is set so that
    the chance of crossing first there, under H0, is what the spending function adds at t_j.
    """
    spent = [spend(t, alpha) for t in fractions]
    bounds = [float(-special.ndtri(spent[0]))]
    t_prev = fractions[0]
    x = np.linspace(-10 * math.sqrt(t_prev), bounds[0] * math.sqrt(t_prev), _GRID)
    density = _pdf(x / math.sqrt(t_prev)) / math.sqrt(t_prev)  # S(t_1), not yet crossed
    for j in range(1, len(fractions)):
        t, step = fractions[j], math.sqrt(fractions[j] - t_prev)
        target = spent[j] - spent[j - 1]
        z = optimize.brentq(_crossing, -20.0, 40.0, args=(x, density, t, step, target), xtol=1e-10)
        bounds.append(z)
        y = np.linspace(-10 * math.sqrt(t), z * math.sqrt(t), _GRID)
        kernel = _pdf((y[:, None] - x[None, :]) / step) / step
        density = np.trapezoid(kernel * density[None, :], x, axis=1)
        x, t_prev = y, t
    return (spent[0], *(float(special.ndtr(-z)) for z in bounds[1:]))


def _crossing(
    z: float, x: np.ndarray, density: np.ndarray, t: float, step: float, target: float
) -> float:
    """Chance of reaching time t uncrossed and crossing z·sqrt(t) there, less `target`."""
    return float(np.trapezoid(density * special.ndtr((x - z * math.sqrt(t)) / step), x)) - target


def _pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


_ALPHAS = np.geomspace(1e-7, 0.5, 80)


@lru_cache(maxsize=256)
def _level_table(fractions: tuple[float, ...]) -> np.ndarray:
    """log π_j(α) on a grid of α (one row per look), to invert the boundaries."""
    return np.log([nominal_levels(fractions, float(a)) for a in _ALPHAS]).T


def sequential_p(p_values: Sequence[float], fractions: tuple[float, ...]) -> float:
    """The smallest α at which the design rejects by the last of `p_values` (one per look).

    One look: the p-value itself. Several: min over looks of π_j⁻¹(p_j), with π_j interpolated
    (log-log) between 80 levels of α from 1e-7 to 0.5; beyond 0.5 it is reported as 1.
    """
    if len(fractions) == 1:
        return float(p_values[0])
    table = _level_table(fractions)
    best = 1.0
    for j, p in enumerate(p_values):
        if not p > 0:
            return 0.0
        if math.log(p) <= table[j][-1]:
            best = min(best, float(np.exp(np.interp(math.log(p), table[j], np.log(_ALPHAS)))))
    return best


# --------------------------------------------------------------------------------------------
# One comparison over its looks.


@dataclass(frozen=True)
class Look:
    """A comparison at one look: Welch's statistics and the p-values of both tests.

    For a best-of-several comparison (:func:`best_trail`), `ranking` orders the configurations
    by mean (best first), `versus` holds each other one against the best in that order, and
    `welch` is the runner-up against the best.
    """

    index: int  # 1-based
    welch: Welch
    p_greater: float  # nominal p of the "greater" test at this look
    p_not_greater: float  # nominal p of the non-inferiority test at this look
    seq_greater: float  # sequential p-values, up to and including this look
    seq_not_greater: float
    ranking: tuple[int, ...] = ()
    versus: tuple[Welch, ...] = ()


@dataclass(frozen=True)
class Trail:
    """Every look of one comparison so far; none when it cannot be tested (`problem` says why)
    or when it is waiting for the schedule's first look."""

    looks: tuple[Look, ...]
    margin: float
    schedule: Schedule | None
    available: int  # seeds with a value on the side (configuration) that has fewest
    problem: Problem = ""
    waiting: bool = False

    @property
    def fractions(self) -> tuple[float, ...]:
        return fractions(self.schedule)

    @property
    def at_max(self) -> bool:
        """Every side has the schedule's maximum of seeds (with a fixed list: always)."""
        return self.schedule is None or self.available >= self.schedule.max


def _trail(
    looks: list[tuple[Welch, float, float, tuple[int, ...], tuple[Welch, ...]]],
    margin: float,
    schedule: Schedule | None,
    available: int,
) -> Trail:
    """A Trail from each look's (welch, p_greater, p_not_greater, ranking, versus)."""
    frac = fractions(schedule)
    out: list[Look] = []
    for j, (w, pg, pn, ranking, versus) in enumerate(looks, start=1):
        seq_g = sequential_p([lk[1] for lk in looks[:j]], frac)
        seq_n = sequential_p([lk[2] for lk in looks[:j]], frac)
        out.append(Look(j, w, pg, pn, seq_g, seq_n, ranking, versus))
    return Trail(tuple(out), margin, schedule, available)


def _sizes(available: int, schedule: Schedule | None) -> list[int | None]:
    """Seeds per configuration at each look that the data allow (None: all of them)."""
    if schedule is None:
        return [None]
    n = min(available, schedule.max)
    return [schedule.seeds(j) for j in range(1, schedule.looks + 1) if schedule.seeds(j) <= n]


def trail(
    a: Sequence[float],
    b: Sequence[float],
    *,
    margin: float,
    schedule: Schedule | None = None,
) -> Trail:
    """The looks of `a` against `b`, values in seed order: look j uses the first n_j of each.

    Without a schedule there is one look with every value. With one, look j exists once both
    sides have n_j values; values beyond the maximum are left out.
    """
    available = min(len(a), len(b))
    sizes = _sizes(available, schedule)
    if not sizes:
        return Trail((), margin, schedule, available, problem(a, b), waiting=True)
    looks = []
    for n in sizes:
        x, y = list(a[:n]), list(b[:n])
        why = problem(x, y)
        if why:
            return Trail((), margin, schedule, available, why)
        w = welch(x, y)
        looks.append((w, w.p_greater(), w.p_below(margin), (), ()))
    return _trail(looks, margin, schedule, available)


def best_trail(
    samples: Sequence[Sequence[float]],
    *,
    margin: float,
    schedule: Schedule | None = None,
) -> Trail:
    """The looks of "which configuration is best (lowest error)?", values in seed order.

    At each look the best is the lowest mean; the "greater" p-value is the largest one-sided
    Welch p of "this one is worse than the best" over the others (the claim needs them all),
    the non-inferiority p the largest over every ordered pair (no configuration worse than
    another by the margin or more). Pairs without spread on either side count as p = 1. Decide
    the "greater" test at level/len(samples) (:func:`decide`'s `share`).
    """
    available = min(len(s) for s in samples)
    sizes = _sizes(available, schedule)
    if not sizes:
        return Trail((), margin, schedule, available, _group_problem(samples), waiting=True)
    looks = []
    for n in sizes:
        values = [list(s[:n]) for s in samples]
        why = _group_problem(values)
        if why:
            return Trail((), margin, schedule, available, why)
        ranking = tuple(int(i) for i in np.argsort([np.mean(v) for v in values], kind="stable"))
        best = values[ranking[0]]
        versus = tuple(_summary(values[i], best) for i in ranking[1:])
        pg = max(_p(values[i], best, lambda w: w.p_greater()) for i in ranking[1:])
        pn = max(
            _p(values[i], values[k], lambda w: w.p_below(margin))
            for i in range(len(values))
            for k in range(len(values))
            if i != k
        )
        looks.append((versus[0], pg, pn, ranking, versus))
    return _trail(looks, margin, schedule, available)


def _p(a: list[float], b: list[float], test: Callable[[Welch], float]) -> float:
    """A test's p-value, or 1 where the pair cannot be tested (no spread on either side)."""
    return test(welch(a, b)) if not problem(a, b) else 1.0


def _summary(a: list[float], b: list[float]) -> Welch:
    """Welch's summary of a pair, with sds of 0 where neither side has spread."""
    if problem(a, b):
        return Welch(len(a), len(b), float(np.mean(a)), float(np.mean(b)), 0.0, 0.0)
    return welch(a, b)


def _group_problem(samples: Sequence[Sequence[float]]) -> Problem:
    if any(not len(s) for s in samples):
        return "no_values"
    if any(len(s) < 2 for s in samples):
        return "one_seed"
    if all(np.ptp(s) == 0 for s in samples):
        return "no_spread"
    return ""


@dataclass(frozen=True)
class Decision:
    """What a comparison concludes, on which look, at which levels."""

    outcome: Outcome
    trail: Trail
    look: Look | None  # the deciding look, or the latest when undecided; None: no test
    level: float  # the level its confidence interval is read at (the deciding test's)
    p_greater: float  # sequential p-values, after any multiplicity correction
    p_not_greater: float
    within_margin: bool  # the non-inferiority test rejected at the deciding look

    @property
    def seeds(self) -> tuple[int, int]:
        """Seeds per side at the deciding (or latest) look."""
        if self.look is None:
            return (0, 0)
        return (self.look.welch.n_a, self.look.welch.n_b)

    @property
    def nominal(self) -> float:
        """π_j(level) at the look: the one-sided p-value level the look is read at."""
        if self.look is None:
            return math.nan
        return nominal_levels(self.trail.fractions, self.level)[self.look.index - 1]

    @property
    def confidence(self) -> float:
        """The two-sided confidence level of :attr:`interval`, 1 − 2·π_j(level)."""
        return 1 - 2 * self.nominal

    @property
    def interval(self) -> tuple[float, float]:
        """Confidence interval for Δ at the look: it excludes 0 when the "greater" test rejects,
        and lies below the margin when the non-inferiority test does."""
        if self.look is None:
            return (math.nan, math.nan)
        return self.look.welch.interval(self.confidence)

    @property
    def decided(self) -> bool:
        return self.outcome != "undecided"

    @property
    def max_undecided(self) -> bool:
        """Undecided although the last look (the maximum seeds, or a fixed list's) is reached."""
        return self.outcome == "undecided" and self.trail.at_max


@dataclass(frozen=True)
class Level:
    """The level a test is decided at, and how its reported p-value is adjusted.

    A test rejects when its sequential p-value is at most `critical`. The reported p-value is
    Holm's adjustment (:func:`holm`) of `factor` × p against `others`, the largest p-value of
    every other block in descending order; alone (no others, factor 1) it is p itself.
    """

    critical: float
    others: tuple[float, ...] = ()
    factor: float = 1.0

    def adjusted(self, p: float) -> float:
        p = min(1.0, self.factor * p)
        out = p
        for s, q in enumerate(self.others, start=1):
            out = max(out, (s + 1) * min(p, q))
        return min(1.0, out)

    def per(self, k: int) -> Level:
        """The level of one of `k` candidates, any of which could have been picked (Bonferroni):
        the critical level divided by k, the p-value multiplied by k."""
        return Level(self.critical / k, self.others, self.factor * k)


def decide(
    t: Trail,
    *,
    alpha: float,
    greater: Level | None = None,
    not_greater: Level | None = None,
) -> Decision:
    """Decide at the first look where either test rejects: "greater" when the "greater" test
    rejects there, else "not_greater"; "undecided" when no look rejects.

    Each test is at `alpha` unless a multiplicity correction gives its :class:`Level`. The
    p-values reported are the sequential p-values of the deciding look (the latest when
    undecided), adjusted.
    """
    lg = greater or Level(alpha)
    ln = not_greater or Level(alpha)
    if not t.looks:
        return Decision(
            "undecided", t, None, min(lg.critical, ln.critical), math.nan, math.nan, False
        )
    g_levels = nominal_levels(t.fractions, lg.critical)
    n_levels = nominal_levels(t.fractions, ln.critical)

    def at(look: Look, outcome: Outcome, level: float, within: bool) -> Decision:
        pg, pn = lg.adjusted(look.seq_greater), ln.adjusted(look.seq_not_greater)
        return Decision(outcome, t, look, level, pg, pn, within)

    for look in t.looks:
        rejects_greater = look.p_greater <= g_levels[look.index - 1]
        rejects_below = look.p_not_greater <= n_levels[look.index - 1]
        if rejects_greater:
            return at(look, "greater", lg.critical, rejects_below)
        if rejects_below:
            return at(look, "not_greater", ln.critical, True)
    return at(t.looks[-1], "undecided", min(lg.critical, ln.critical), False)


def compare(
    a: Sequence[float],
    b: Sequence[float],
    *,
    margin: float,
    alpha: float,
    schedule: Schedule | None = None,
) -> Decision:
    """`a` against `b` at `alpha`: :func:`trail` then :func:`decide`."""
    return decide(trail(a, b, margin=margin, schedule=schedule), alpha=alpha)


@dataclass(frozen=True)
class Outcomes:
    """:func:`compare` on many repetitions at once: per row, which test decided, and when."""

    greater: np.ndarray  # bool: decided "greater"
    not_greater: np.ndarray  # bool: decided "not_greater"
    within_margin: np.ndarray  # bool: the non-inferiority test rejected at the deciding look
    seeds: np.ndarray  # int: seeds per side at the deciding look (the last look if undecided)


def compare_many(
    a: np.ndarray,
    b: np.ndarray,
    *,
    margin: float,
    alpha: float,
    schedule: Schedule | None = None,
) -> Outcomes:
    """:func:`compare` for every row of `a` and `b` (repetitions × seeds), vectorised, for
    simulations. Rows must be testable at every look (continuous values, two seeds or more)."""
    sizes = _sizes(min(a.shape[1], b.shape[1]), schedule)
    g_levels = nominal_levels(fractions(schedule), alpha)
    rows = a.shape[0]
    open_ = np.ones(rows, dtype=bool)
    greater = np.zeros(rows, dtype=bool)
    not_greater = np.zeros(rows, dtype=bool)
    within = np.zeros(rows, dtype=bool)
    seeds = np.zeros(rows, dtype=int)
    for j, n in enumerate(sizes):
        diff, se, df = welch_arrays(a[:, :n], b[:, :n])
        g = open_ & (p_greater(diff, se, df) <= g_levels[j])
        below = open_ & (p_below(diff, se, df, margin) <= g_levels[j])
        greater |= g
        not_greater |= below & ~g
        within |= below
        seeds[open_] = a.shape[1] if n is None else n
        open_ &= ~(g | below)
    return Outcomes(greater, not_greater, within, seeds)


# --------------------------------------------------------------------------------------------
# Many comparisons: Holm's step-down procedure as a closed test.


def holm(blocks: Sequence[Sequence[float]], alpha: float) -> list[list[Level]]:
    """The :class:`Level` of each hypothesis of `blocks` under Holm's step-down procedure.

    A block holds hypotheses of which at most one can be true (the two one-sided tests of one
    comparison); a hypothesis on its own is a block of one. A hypothesis is rejected at α when
    every intersection that contains it and can be true is rejected by Bonferroni's test: with
    Q_1 ≥ Q_2 ≥ ... the largest p-value of each other block, when for every s ≥ 0 either
    p ≤ α/(s+1) or Q_s ≤ α/(s+1). Its critical level is the smallest α/(s+1) over the s for which
    Q_s > α/(s+1) (and α itself); its adjusted p-value, max over s of (s+1)·min(p, Q_s), is at
    most α exactly when p is at most the critical level. With blocks of one hypothesis each this
    is Holm's procedure.
    """
    tops = [max(block) if len(block) else 1.0 for block in blocks]
    out = []
    for i, block in enumerate(blocks):
        others = tuple(sorted((q for k, q in enumerate(tops) if k != i), reverse=True))
        critical = alpha
        for s, q in enumerate(others, start=1):
            if q > alpha / (s + 1):
                critical = min(critical, alpha / (s + 1))
        out.append([Level(critical, others) for _ in block])
    return out


def simulate(
    delta: float,
    sd_a: float,
    sd_b: float,
    *,
    margin: float,
    alpha: float,
    reps: int,
    rng: np.random.Generator,
    seeds: int = 3,
    schedule: Schedule | None = None,
) -> Outcomes:
    """:func:`compare_many` on `reps` draws of normal seed-to-seed noise: `a` ~ N(delta, sd_a),
    `b` ~ N(0, sd_b), `seeds` each (the schedule's maximum with a schedule)."""
    n = schedule.max if schedule is not None else seeds
    a = rng.normal(delta, sd_a, (reps, n))
    b = rng.normal(0.0, sd_b, (reps, n))
    return compare_many(a, b, margin=margin, alpha=alpha, schedule=schedule)

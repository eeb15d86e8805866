"""The verdicts: the tests behind them (against scipy and by simulation), and what they say.

The statistics (resnet_ablate.stats) are checked against scipy and, by simulating the decision
rules alone, for the error rates they promise; the verdicts (report/verdicts.py) on small
per-cell tables whose right answer is known, and on the quick grid's committed numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from resnet_ablate import stats
from resnet_ablate.config import GridError, VerdictSpec, load_grid
from resnet_ablate.report.comparisons import NOT_REPRODUCED, REPRODUCED, UNDECIDED, PairVerdict
from resnet_ablate.report.sides import Configuration, p_text
from resnet_ablate.report.verdicts import Verdicts, judge, undecided_configs

ROOT = Path(__file__).resolve().parents[1]
FAMILY = {"none": "plain", "identity": "res", "projection": "res-proj"}
ALPHA = 0.05


# --------------------------------------------------------------------------------------------
# Welch's tests against scipy.

SAMPLES = [
    ([12.0, 13.1, 14.2], [6.4, 6.6, 6.8]),
    ([25.5208, 23.0511, 27.5706], [22.6815, 20.1445, 22.1774]),  # quick grid, res-56 vs res-20
    ([13.0, 13.0, 13.0], [6.4, 6.6, 6.8]),  # no spread on one side
    ([6.0, 6.5, 7.0, 9.0, 5.5], [6.4, 6.6]),  # unequal seeds
]


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy, on [13, 13, 13]
@pytest.mark.parametrize(("a", "b"), SAMPLES)
def test_welch_matches_scipy_one_sided_tests_and_interval(a, b):
    w = stats.welch(a, b)
    greater = sps.ttest_ind(a, b, equal_var=False, alternative="greater")
    assert w.p_greater() == pytest.approx(greater.pvalue, rel=1e-9)
    assert w.df == pytest.approx(greater.df, rel=1e-9)
    below = sps.ttest_ind(np.subtract(a, 1.0), b, equal_var=False, alternative="less")
    assert w.p_below(1.0) == pytest.approx(below.pvalue, rel=1e-9)
    above = sps.ttest_ind(np.add(a, 1.0), b, equal_var=False, alternative="greater")
    assert w.p_above(1.0) == pytest.approx(above.pvalue, rel=1e-9)
    ci = sps.ttest_ind(a, b, equal_var=False).confidence_interval(0.9)
    assert w.interval(0.9) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_hedges_g_is_the_pooled_standardised_difference_corrected_for_small_samples():
    w = stats.welch([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])  # sds 2 and 1, pooled sqrt(2.5)
    assert w.hedges_g == pytest.approx((1 - 3 / (4 * 6 - 9)) * 2.0 / math.sqrt(2.5))


def test_untestable_samples_are_named():
    assert stats.problem([1.0], [1.0, 2.0]) == "one_seed"
    assert stats.problem([], [1.0, 2.0]) == "no_values"
    assert stats.problem([3.0, 3.0], [1.0, 1.0]) == "no_spread"
    assert stats.problem([3.0, 3.0], [1.0, 1.5]) == ""


# --------------------------------------------------------------------------------------------
# Group-sequential boundaries, sequential p-values, Holm.


def test_one_look_is_the_fixed_sample_test_at_full_alpha():
    assert stats.nominal_levels((1.0,), ALPHA) == (ALPHA,)
    assert stats.sequential_p([0.031], (1.0,)) == 0.031


@pytest.mark.parametrize("schedule", [stats.Schedule(3, 6), stats.Schedule(3, 10)])
def test_boundaries_spend_exactly_alpha_over_the_looks(schedule):
    fractions = schedule.fractions
    levels = stats.nominal_levels(fractions, ALPHA)
    assert fractions[-1] == 1.0 and len(levels) == schedule.looks
    assert levels[0] == pytest.approx(stats.spend(fractions[0], ALPHA))
    assert all(level < ALPHA for level in levels)
    # A Brownian motion observed at the looks crosses some boundary with probability alpha.
    rng = np.random.default_rng(0)
    t = np.array(fractions)
    steps = rng.standard_normal((400_000, len(t))) * np.sqrt(np.diff(t, prepend=0.0))
    z = np.cumsum(steps, axis=1) / np.sqrt(t)
    crossed = (z >= sps.norm.isf(np.array(levels))).any(axis=1).mean()
    assert crossed == pytest.approx(ALPHA, abs=4 * math.sqrt(ALPHA * (1 - ALPHA) / 400_000))


def test_sequential_p_is_the_smallest_alpha_that_rejects():
    fractions = stats.Schedule(3, 10).fractions
    for alpha in (0.05, 0.01, 0.002):
        levels = stats.nominal_levels(fractions, alpha)
        for j in (0, 3, 7):
            p = [0.9] * j + [levels[j]]
            assert stats.sequential_p(p, fractions) == pytest.approx(alpha, rel=1e-3)


def holm_reference(p: list[float], alpha: float) -> list[bool]:
    """Holm's step-down procedure as textbooks give it."""
    rejected = [False] * len(p)
    for rank, i in enumerate(sorted(range(len(p)), key=p.__getitem__)):
        if p[i] > alpha / (len(p) - rank):
            break
        rejected[i] = True
    return rejected


def test_holm_with_one_hypothesis_per_block_is_holms_procedure():
    rng = np.random.default_rng(1)
    for _ in range(300):
        p = list(rng.uniform(0, 0.08, rng.integers(1, 7)))
        levels = [level for (level,) in stats.holm([[x] for x in p], ALPHA)]
        rejected = [x <= level.critical for x, level in zip(p, levels, strict=True)]
        assert rejected == holm_reference(p, ALPHA)
        assert rejected == [level.adjusted(x) <= ALPHA for x, level in zip(p, levels, strict=True)]


def test_holm_counts_a_comparison_once_and_passes_its_share_on_only_when_both_tests_reject():
    # Comparison A is decided "not worse" (its other test far from significant): B keeps α/2.
    (_, a_below), (b_worse, _) = stats.holm([[0.9, 0.001], [0.04, 0.8]], ALPHA)
    assert a_below.critical >= 0.001 and b_worse.critical == ALPHA / 2
    assert b_worse.adjusted(0.04) == pytest.approx(0.08)
    # Both of A's tests reject (worse, by less than the margin): B may use all of α.
    _, (b_worse, _) = stats.holm([[0.01, 0.001], [0.04, 0.8]], ALPHA)
    assert b_worse.critical == ALPHA and b_worse.adjusted(0.04) == pytest.approx(0.04)


def test_vectorised_decisions_equal_one_at_a_time():
    rng = np.random.default_rng(5)
    a, b = rng.normal(1.0, 2.0, (300, 10)), rng.normal(0.0, 1.0, (300, 10))
    for schedule in (None, stats.Schedule(3, 10)):
        many = stats.compare_many(a, b, margin=1.0, alpha=ALPHA, schedule=schedule)
        for i in range(300):
            d = stats.compare(a[i], b[i], margin=1.0, alpha=ALPHA, schedule=schedule)
            assert (d.outcome == "greater", d.outcome == "not_greater") == (
                many.greater[i],
                many.not_greater[i],
            )
            assert (d.within_margin, d.seeds[0]) == (many.within_margin[i], many.seeds[i])


# --------------------------------------------------------------------------------------------
# The decision rules alone, simulated (scripts/verdict_simulation.py prints the figures).

REPS = 20_000
TOLERANCE = 3 * math.sqrt(ALPHA * (1 - ALPHA) / REPS)  # three Monte-Carlo standard errors
DESIGNS = [(3, None), (5, None), (10, None), (6, stats.Schedule(3, 6)), (10, stats.Schedule(3, 10))]


def simulate(delta: float, sd_a: float, sd_b: float, seeds: int, schedule, seed: int):
    return stats.simulate(
        delta,
        sd_a,
        sd_b,
        margin=1.0,
        alpha=ALPHA,
        reps=REPS,
        rng=np.random.default_rng(seed),
        seeds=seeds,
        schedule=schedule,
    )


@pytest.mark.parametrize(("seeds", "schedule"), DESIGNS)
@pytest.mark.parametrize("sds", [(2.3, 1.3), (1.3, 2.3), (1.0, 1.0)])
def test_without_a_difference_worse_is_concluded_at_most_at_alpha(seeds, schedule, sds):
    found = simulate(0.0, *sds, seeds, schedule, seed=11).greater.mean()
    assert found <= ALPHA + TOLERANCE


@pytest.mark.parametrize(("seeds", "schedule"), DESIGNS)
@pytest.mark.parametrize("sds", [(2.3, 1.3), (0.5, 0.5)])
def test_a_true_one_point_degradation_is_called_not_worse_at_most_at_alpha(seeds, schedule, sds):
    found = simulate(1.0, *sds, seeds, schedule, seed=12).within_margin.mean()
    assert found <= ALPHA + TOLERANCE


@pytest.mark.parametrize("schedule", [stats.Schedule(3, 6), stats.Schedule(3, 10)])
def test_seeds_until_decided_stops_early_on_the_quick_grids_effect(schedule):
    quick = (3.71, 2.3, 1.3)  # res-56 against res-20 in results/quick/summary.csv
    sequential = simulate(*quick, schedule.max, schedule, seed=13)
    fixed_min = simulate(*quick, schedule.min, None, seed=13)
    assert sequential.seeds.mean() < 0.8 * schedule.max
    assert sequential.greater.mean() > fixed_min.greater.mean() + 0.2
    assert sequential.not_greater.mean() < 0.01


@pytest.mark.parametrize("k", [2, 3])
def test_a_best_among_equal_configurations_is_named_at_most_at_alpha(k):
    rng = np.random.default_rng(14)
    reps, named = 3000, 0
    for _ in range(reps):
        t = stats.best_trail(list(rng.normal(0.0, 1.0, (k, 3))), margin=1.0)
        best = stats.Level(ALPHA).per(k)
        named += stats.decide(t, alpha=ALPHA, greater=best).outcome == "greater"
    assert named / reps <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / reps)


# --------------------------------------------------------------------------------------------
# Verdicts on small tables.


def table(
    results: dict[tuple[str, int], list], *, order: str = "post", **columns: object
) -> pd.DataFrame:
    """Cells of a basic grid: {(shortcut, depth): final training error per seed}.

    None is a diverged seed, a string a status without numbers (new, failed).
    """
    rows = []
    for (shortcut, depth), values in results.items():
        for seed, value in enumerate(values):
            status, reason = "finished", ""
            if value is None:
                status, reason, value = "diverged", "training loss became nan in epoch 3", math.nan
            elif isinstance(value, str):
                status, value = value, math.nan
            net = f"{FAMILY[shortcut]}-{depth}"
            row = {
                "label": f"{net} basic {order} s{seed}",
                "status": status,
                "reason": reason,
                "config": f"{net} basic {order}",
                "context": f"basic {order}",
                "net": net,
                "extras": "",
                "family": FAMILY[shortcut],
                "shortcut": shortcut,
                "depth": depth,
                "block": "basic",
                "order": order,
                "arch": "cifar",
                "dataset": "cifar10",
                "seed": seed,
                "final_train_err": value,
                "final_test_err": value + 1.5,
                "epochs": 164,
            }
            rows.append({**row, **columns})
    return pd.DataFrame(rows)


def verdicts(cells: pd.DataFrame, schedule=None, context="basic post", **spec) -> Verdicts:
    return judge(cells, VerdictSpec(**spec), context=context, schedule=schedule)


def of(v: Verdicts, shortcut: str) -> PairVerdict:
    (found,) = [x for x in v.degradation if x.shortcut == shortcut]
    return found


PLAIN_20 = [6.4, 6.6, 6.8]
PAPER_LIKE = {
    ("none", 20): PLAIN_20,
    ("none", 56): [12.0, 13.1, 14.2],
    ("identity", 20): [8.0, 8.1, 8.2],
    ("identity", 56): [6.6, 6.7, 6.8],
}


def test_headline_is_the_primary_one_sided_welch_test_with_its_interval():
    v = verdicts(table(PAPER_LIKE))
    plain, res = of(v, "none"), of(v, "identity")
    assert plain.primary and not res.primary
    assert (plain.outcome, res.outcome) == (REPRODUCED, REPRODUCED)
    test = sps.ttest_ind([12.0, 13.1, 14.2], PLAIN_20, equal_var=False, alternative="greater")
    ci = sps.ttest_ind([12.0, 13.1, 14.2], PLAIN_20, equal_var=False).confidence_interval(0.9)
    assert plain.p == pytest.approx(test.pvalue)
    assert plain.interval == pytest.approx((ci.low, ci.high))
    assert v.headline == (
        "Degradation reproduced: plain-56 trains to 13.1% error vs 6.6% for plain-20 (3 seeds "
        f"each; +6.5 points, 90% CI {ci.low:.1f} to {ci.high:.1f}, p=0.0039); res-56 6.7%."
    )
    assert "6.5 points higher, significant (p=0.0039, 90% CI" in plain.text
    assert "Hedges' g" in plain.text
    # The residual verdict is secondary: Holm-adjusted, and read at the level that decides it.
    assert "not worse by 1.0 point or more (Holm-adjusted p" in res.text
    assert "Scope" not in plain.text + res.text  # 164 epochs of CIFAR-10: the paper's setting


def test_deeper_plain_net_shown_not_worse_is_not_reproduced():
    v = verdicts(table({("none", 20): PLAIN_20, ("none", 56): [6.0, 6.1, 6.2]}))
    plain = of(v, "none")
    assert plain.outcome == NOT_REPRODUCED
    assert "not worse by 1.0 point or more" in plain.text
    assert "; the whole interval is below zero." in plain.text and plain.interval[1] < 0
    assert v.headline.startswith("Degradation not reproduced: plain-56 trains to 6.1% error")


@pytest.mark.parametrize("deep", [[5.0, 6.5, 8.0], [5.9, 7.4, 8.9]], ids=["below", "above"])
@pytest.mark.parametrize("shortcut", ["none", "identity"])
def test_a_gap_without_evidence_is_undecided_whatever_its_sign(deep, shortcut):
    v = verdicts(table({(shortcut, 20): PLAIN_20, (shortcut, 56): deep}))
    found = of(v, shortcut)
    assert found.outcome == UNDECIDED
    assert "not significant" in found.text
    assert "holds both 0 and 1.0 point, so neither is shown" in found.text
    assert "spread" not in found.text


def test_residual_deeper_and_worse_is_not_reproduced_with_the_short_run_caveat():
    cells = table({("identity", 20): PLAIN_20, ("identity", 56): [9.0, 9.2, 9.4]}, epochs=12)
    res = of(verdicts(cells), "identity")
    assert res.outcome == NOT_REPRODUCED
    assert "2.6 points higher, significant" in res.text
    assert "Scope: 12 epochs, not the paper's 164" in res.text
    assert "may not have caught up" in res.text


@pytest.mark.parametrize(
    ("epochs", "dataset", "scope"),
    [
        (12, "cifar10", "Scope: 12 epochs, not the paper's 164;"),
        (164, "fashion-mnist", "Scope: Fashion-MNIST, not the paper's CIFAR-10;"),
        (3, "fashion-mnist", "Scope: 3 epochs on Fashion-MNIST, not the paper's 164 on CIFAR-10;"),
    ],
)
def test_every_verdict_carries_the_scope_caveat_in_both_directions(epochs, dataset, scope):
    v = verdicts(table(PAPER_LIKE, epochs=epochs, dataset=dataset))
    plain, res = of(v, "none"), of(v, "identity")
    assert (plain.outcome, res.outcome) == (REPRODUCED, REPRODUCED)
    assert scope in plain.text and "may only be slower, not worse at convergence" in plain.text
    assert scope in res.text
    (residual,) = v.residual_vs_plain
    assert scope in residual.text


def test_one_seed_cannot_be_tested():
    v = verdicts(table({("none", 20): PLAIN_20, ("none", 56): [13.1]}))
    assert of(v, "none").outcome == UNDECIDED
    assert v.headline.startswith(
        "Degradation undecided: one seed for plain-56, so its seed-to-seed spread is unknown; "
        "as measured, plain-56 13.1% vs plain-20 6.6 ± 0.2%"
    )
    assert v.headline_outcome == UNDECIDED


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")
def test_zero_variance_on_one_side_is_tested_on_the_other_sides_spread():
    plain = of(verdicts(table({("none", 20): PLAIN_20, ("none", 56): [13.0, 13.0, 13.0]})), "none")
    expected = sps.ttest_ind([13.0] * 3, PLAIN_20, equal_var=False, alternative="greater")
    assert plain.outcome == REPRODUCED
    assert plain.p == pytest.approx(expected.pvalue)
    assert plain.decision.look.welch.df == pytest.approx(2.0)


def test_zero_variance_on_both_sides_is_undecided():
    cells = table({("none", 20): [6.6, 6.6, 6.6], ("none", 56): [13.0, 13.0, 13.0]})
    plain = of(verdicts(cells), "none")
    assert plain.outcome == UNDECIDED
    assert "every seed gave the same error on both sides" in plain.text


def test_a_plain_net_that_fails_to_train_is_degraded():
    cells = table({("none", 20): PLAIN_20, ("none", 56): [None, None, None]})
    plain = of(verdicts(cells), "none")
    assert plain.outcome == REPRODUCED
    assert plain.deep.values == (90.0, 90.0, 90.0)
    assert "plain-56: s0, s1, s2 diverged (counted at chance, 90.0%)" in plain.text


def test_stuck_runs_count_with_their_own_error_and_are_named():
    cells = table(
        {("none", 20): PLAIN_20, ("none", 56): [88.6, 89.1, 89.7]}, dataset="fashion-mnist"
    )
    plain = of(verdicts(cells), "none")
    assert plain.outcome == REPRODUCED
    assert plain.deep.stuck == (0, 1, 2)
    assert "s0, s1, s2 stuck at chance" in plain.text


def test_a_diverged_seed_is_counted_never_dropped():
    cells = table({("none", 20): PLAIN_20, ("none", 56): [12.9, 13.1, None]})
    plain = of(verdicts(cells), "none")
    assert plain.deep.values == (12.9, 13.1, 90.0)  # not the survivors alone
    assert plain.outcome == UNDECIDED  # one seed at chance makes the spread wide
    assert "s2 diverged (counted at chance, 90.0%)" in plain.text
    # On the shallow side, failing to train counts against the claim.
    cells = table({("none", 20): [6.4, None, None], ("none", 56): [12.9, 13.1, 13.3]})
    assert of(verdicts(cells), "none").outcome != REPRODUCED


def test_runs_without_an_outcome_are_listed():
    cells = table({("none", 20): PLAIN_20, ("none", 56): ["new", "new", "failed"]})
    v = verdicts(cells)
    assert v.headline == ("Degradation undecided: plain-56 has no finished run (2 new, 1 failed).")


def test_headline_without_plain_nets_or_without_two_depths():
    res_only = table({("identity", 20): PLAIN_20, ("identity", 56): [6.0, 6.1, 6.2]})
    assert verdicts(res_only).headline.startswith("No plain nets in this grid")
    one_depth = table({("none", 56): PLAIN_20})
    assert verdicts(one_depth).headline.startswith("Only one depth of plain net (56)")


def test_secondary_comparisons_are_holm_corrected():
    res = {
        ("identity", 20): [22.6815, 20.1445, 22.1774],
        ("identity", 56): [25.5208, 23.0511, 27.5706],
    }
    p = sps.ttest_ind(res[("identity", 56)], res[("identity", 20)], equal_var=False).pvalue / 2
    alone = of(verdicts(table(res)), "identity")  # the only comparison: Holm = itself
    assert alone.outcome == NOT_REPRODUCED and alone.p == pytest.approx(p)
    plain = {("none", 20): [24.7, 23.1, 23.2], ("none", 56): [46.8, 56.9, 64.6]}
    shared = of(verdicts(table({**res, **plain})), "identity")  # with residual vs plain
    assert shared.outcome == UNDECIDED
    assert shared.p == pytest.approx(2 * p)
    assert f"Holm-adjusted p={2 * p:.2g} for 'worse'" in shared.text


def test_the_quick_grids_committed_numbers():
    cells = pd.read_csv(ROOT / "results" / "quick" / "summary.csv")
    cells = cells.assign(
        net=cells["family"] + "-" + cells["depth"].astype(str), extras="", context="basic post"
    )
    v = verdicts(cells)
    plain, res = of(v, "none"), of(v, "identity")
    (residual,) = v.residual_vs_plain
    assert (plain.outcome, res.outcome, residual.outcome) == (
        REPRODUCED,
        UNDECIDED,
        "residual better",
    )
    assert plain.p == pytest.approx(0.00296, abs=5e-5)
    assert res.p == pytest.approx(0.1106, abs=5e-4)
    assert "res-56 trains to 24.8 ± 2.1% vs 21.7 ± 1.6% for res-20 (3 seeds each)" in res.text
    assert "3.1 points higher, not significant (Holm-adjusted p=0.11 for 'worse'" in res.text
    assert "Scope: 3 epochs on Fashion-MNIST" in res.text
    # With seeds until decided (3 to 6), only the residual comparison asks for more seeds.
    spec, schedule = VerdictSpec(), stats.Schedule(3, 6)
    assert undecided_configs(cells, spec, schedule, context="basic post") == [
        Configuration("cifar", "res-56", "basic", "post", ""),
        Configuration("cifar", "res-20", "basic", "post", ""),
    ]


def test_sequential_verdicts_say_how_many_seeds_they_took():
    schedule = stats.Schedule(3, 6)
    deep = [11.0, 12.0, 12.0, 12.0, 11.8, 12.1]
    shallow = [10.9, 10.5, 10.7, 10.6, 10.8, 10.4]
    v = verdicts(table({("none", 20): shallow, ("none", 56): deep}), schedule=schedule)
    plain = of(v, "none")
    assert plain.outcome == REPRODUCED and plain.decision.seeds == (4, 4)
    assert "Decided with 4 seeds each (look 2 of 4)." in plain.text
    p = plain.decision.trail.looks[1].seq_greater  # at the deciding look, not the last
    assert plain.p == p and f"significant (sequential {p_text(p)}, " in plain.text
    # The first look alone (3 seeds) did not decide: the next round adds a seed.
    early = of(
        verdicts(table({("none", 20): shallow[:3], ("none", 56): deep[:3]}), schedule), "none"
    )
    assert early.outcome == UNDECIDED
    assert "Open after 3 seeds each (look 1 of 4): the next round adds a seed." in early.text
    # Undecided at the maximum, and before the first look.
    flat = {
        ("none", 20): [10.5, 11.0, 10.8, 10.2, 11.2, 10.4],
        ("none", 56): [10.0, 12.0, 11.0, 10.5, 11.5, 10.8],
    }
    last = of(verdicts(table(flat), schedule), "none")
    assert last.outcome == UNDECIDED and last.decision.max_undecided
    assert "Undecided at the maximum of 6 seeds each." in last.text
    waiting = of(
        verdicts(table({("none", 20): PLAIN_20[:2], ("none", 56): deep[:2]}), schedule), "none"
    )
    assert "Waiting for 3 seeds each before the first look" in waiting.text


def test_undecided_configs_are_named_by_columns_and_stop_at_the_maximum():
    schedule = stats.Schedule(3, 6)
    flat = {
        ("none", 20): [10.5, 11.0, 10.8, 10.2, 11.2, 10.4],
        ("none", 56): [10.0, 12.0, 11.0, 10.5, 11.5, 10.8],
    }
    spec = VerdictSpec()
    five = table({k: v[:5] for k, v in flat.items()})
    assert undecided_configs(five, spec, schedule, context="basic post") == [
        Configuration("cifar", "plain-56", "basic", "post", ""),
        Configuration("cifar", "plain-20", "basic", "post", ""),
    ]
    assert undecided_configs(table(flat), spec, schedule, context="basic post") == []
    # Untestable (no spread on either side) is open too, until the maximum.
    same = {("none", 20): [10.0] * 3, ("none", 56): [12.0] * 3}
    assert len(undecided_configs(table(same), spec, schedule, context="basic post")) == 2
    same = {k: v * 2 for k, v in same.items()}
    assert undecided_configs(table(same), spec, schedule, context="basic post") == []


def orders(pre: list, post: list) -> pd.DataFrame:
    return pd.concat(
        [table({("identity", 110): post}), table({("identity", 110): pre}, order="pre")]
    )


def test_a_best_order_is_named_only_when_lower_than_every_other():
    (clear,) = verdicts(orders([6.0, 6.05, 6.1], [6.6, 6.7, 6.8]), context=None).best
    assert (clear.best, clear.outcome, clear.values) == ("pre", "best", ("pre", "post"))
    assert clear.text.startswith("Unit order at res-110 basic: pre gives the lowest test error")
    assert "multiple comparisons with the best" in clear.text
    (noisy,) = verdicts(orders([5.4, 8.1, 7.6], [6.6, 6.7, 6.8]), context=None).best
    assert (noisy.best, noisy.outcome) == ("", UNDECIDED)
    assert "no best can be named" in noisy.text


def test_a_best_resting_on_one_seed_is_never_named():
    (v,) = verdicts(orders([5.0], [6.6, 6.7, 6.8]), context=None).best
    assert (v.best, v.outcome) == ("", UNDECIDED)
    assert "one seed for pre, and a best is never named from one seed" in v.text


def test_diverged_seeds_count_against_their_order():
    (v,) = verdicts(orders([6.0, 6.05, None], [6.6, 6.7, 6.8]), context=None).best
    assert v.best != "pre" and v.values[0] == "post"  # the survivors are not crowned
    assert "pre: s2 diverged (counted at chance, 90.0%)" in v.text


# --------------------------------------------------------------------------------------------
# The grid's verdicts section.


def test_grid_file_declares_margin_and_alpha(write_grid):
    text = """
        name: g
        grid: {model.depth: [20, 56]}
        """
    assert load_grid(write_grid(text)).spec.verdicts == VerdictSpec(margin=1.0, alpha=0.05)
    spec = load_grid(write_grid(text + "verdicts: {margin: 0.5, alpha: 0.01}\n")).spec
    assert (spec.verdicts.margin, spec.verdicts.alpha) == (0.5, 0.01)
    with pytest.raises(GridError, match=r"verdicts\.alpha"):
        load_grid(write_grid(text + "verdicts: {alpha: 0.7}\n"))
    with pytest.raises(GridError, match=r"verdicts\.margins: unknown key"):
        load_grid(write_grid(text + "verdicts: {margins: 0.5}\n"))


def test_residual_no_better_than_plain_is_said_with_its_interval():
    cells = table({("none", 20): PLAIN_20, ("identity", 20): [6.5, 6.6, 6.7]})
    (v,) = verdicts(cells).residual_vs_plain
    assert v.outcome == "no better"
    assert v.text.startswith("At depth 20: res-20 trains to 6.6 ± 0.1% vs 6.6 ± 0.2% for plain-20")
    assert "not better by 1.0 point or more (Holm-adjusted p" in v.text


def test_orders_within_the_margin_of_each_other_have_no_best():
    (v,) = verdicts(orders([6.60, 6.65, 6.70], [6.62, 6.67, 6.72]), context=None).best
    assert (v.best, v.outcome) == ("", "within margin")
    assert "no value is worse than another by 1.0 point or more" in v.text

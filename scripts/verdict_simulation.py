"""The report's decision rules alone, simulated: error rates and seeds used, for the README.

Normal seed-to-seed noise, no training: `python scripts/verdict_simulation.py [--reps N]`.
Every figure comes from resnet_ablate.stats, the code the report and the runner use.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from resnet_ablate import stats

ALPHA, MARGIN = 0.05, 1.0
FIXED = (3, 5, 10)
SCHEDULES = (stats.Schedule(3, 6), stats.Schedule(3, 10))
#: The quick grid's res-56 against res-20 (results/quick/summary.csv): +3.7 points.
QUICK = (3.71, 2.3, 1.3)


def columns() -> list[tuple[str, int, stats.Schedule | None]]:
    fixed = [(f"{n} seeds", n, None) for n in FIXED]
    return fixed + [(f"seq {s.min}→{s.max}", s.max, s) for s in SCHEDULES]


def run(
    delta: float, sd_a: float, sd_b: float, reps: int, seed: int, alpha: float = ALPHA
) -> list[stats.Outcomes]:
    return [
        stats.simulate(
            delta,
            sd_a,
            sd_b,
            margin=MARGIN,
            alpha=alpha,
            reps=reps,
            rng=np.random.default_rng(seed),
            seeds=n,
            schedule=schedule,
        )
        for _, n, schedule in columns()
    ]


def table(title: str, rows: list[tuple[str, list[str]]], first: str = "sd a / sd b") -> None:
    print(f"\n{title}")
    head = [first] + [name for name, _, _ in columns()]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, cells in rows:
        print("| " + " | ".join([label, *cells]) + " |")


def best_null(k: int, reps: int, seed: int, schedule: stats.Schedule | None) -> float:
    """How often a best is named among k configurations that are all equal."""
    rng = np.random.default_rng(seed)
    n = schedule.max if schedule else 3
    named = 0
    for _ in range(reps):
        samples = list(rng.normal(0.0, 1.0, (k, n)))
        t = stats.best_trail(samples, margin=MARGIN, schedule=schedule)
        best = stats.Level(ALPHA).per(k)
        named += stats.decide(t, alpha=ALPHA, greater=best).outcome == "greater"
    return named / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=40_000, help="repetitions per case")
    args = parser.parse_args()
    reps = args.reps
    start = time.perf_counter()
    se = math.sqrt(ALPHA * (1 - ALPHA) / reps)
    print(
        f"Decision rules alone: normal noise, α = {ALPHA}, margin {MARGIN} point, {reps:,} "
        f"repetitions per case (Monte-Carlo standard error of a 5% rate: {100 * se:.2f} "
        "points). 'seq 3→6': seeds until decided, min 3, max 6."
    )
    sds = [(2.3, 1.3), (1.3, 2.3), (1.0, 1.0), (3.0, 0.5)]
    table(
        "No true difference: how often 'worse' is concluded (at most α = 5%)",
        [
            (f"{a} / {b}", [f"{100 * o.greater.mean():.2f}%" for o in run(0.0, a, b, reps, 1)])
            for a, b in sds
        ],
    )
    table(
        "The deeper residual net truly 1 point worse (= the margin): how often 'not worse' is "
        "concluded (at most α = 5%)",
        [
            (
                f"{a} / {b}",
                [f"{100 * o.within_margin.mean():.2f}%" for o in run(MARGIN, a, b, reps, 2)],
            )
            for a, b in [(2.3, 1.3), (1.0, 1.0), (0.5, 0.5), (0.3, 0.3)]
        ],
    )
    delta, sd_a, sd_b = QUICK
    for alpha, where in ((ALPHA, "alone, at α"), (ALPHA / 2, "at Holm's α/2, as in the grid")):
        quick = run(*QUICK, reps, 3, alpha=alpha)
        table(
            f"The quick grid's res-56 vs res-20 (+{delta} points, sds {sd_a} and {sd_b}), "
            f"{where}: how it ends, and the average seeds per configuration it takes",
            [
                ("decided 'worse'", [f"{100 * o.greater.mean():.1f}%" for o in quick]),
                ("decided 'not worse'", [f"{100 * o.not_greater.mean():.1f}%" for o in quick]),
                (
                    "undecided",
                    [f"{100 * (1 - o.greater.mean() - o.not_greater.mean()):.1f}%" for o in quick],
                ),
                ("average seeds", [f"{o.seeds.mean():.2f}" for o in quick]),
            ],
            first="",
        )
    best_reps = max(1000, reps // 10)
    print(
        f"\nA best named among k equal configurations (at most α = 5%; {best_reps:,} repetitions):"
    )
    for k in (2, 4):
        for schedule in (None, SCHEDULES[0]):
            where = f"seq {schedule.min}→{schedule.max}" if schedule else "3 seeds"
            rate = best_null(k, best_reps, 4 + k, schedule)
            print(f"- k = {k}, {where}: {100 * rate:.2f}%")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

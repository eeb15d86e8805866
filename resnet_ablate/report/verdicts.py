"""The report's conclusions, computed from the per-cell table: never written by hand.

Statistics are over seeds: mean, sample sd, n, and Welch's t-test (two-sided) when both sides
have at least two seeds. A difference counts only when it is significant (p < 0.05) *and* larger
than the seed-to-seed spread (the sum of the two sds, i.e. the mean ± sd intervals do not touch).

Degradation (He et al. 2015) is judged per shortcut kind and per *context* (everything that is
neither the shortcut, the depth nor the seed, e.g. `bottleneck pre`): the deepest against the
shallowest net of the family, on final training error.

- plain (claim: deeper trains worse): deeper significantly worse -> reproduced; deeper better, or
  not worse at all -> not reproduced; worse but within the spread -> inconclusive.
- residual (claim: deeper does not train worse): deeper significantly better, or not worse ->
  reproduced; deeper significantly worse -> not reproduced (a short run may be the cause, and the
  text says so); worse but within the spread -> inconclusive.
- either: a side without a finished run, a diverged run on either side, or one seed on a side ->
  inconclusive, with the reason.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

ALPHA = 0.05
PAPER_EPOCHS = 164
PLAIN = "none"
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
#: Names of the axes a comparison can be about, in the paper's words.
AXIS_NAMES = {"block": "block", "order": "unit order", "block+order": "block and unit order"}


# --------------------------------------------------------------------------------------------
# One side of a comparison, and the comparison.


@dataclass(frozen=True)
class Side:
    """One configuration's metric over its seeds (finished runs with a value only)."""

    name: str
    values: tuple[float, ...]
    planned: int
    diverged: tuple[str, ...] = ()
    missing: str = ""

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
        sd = f" ± {self.sd:.{digits}f}" if self.n >= 2 else ""
        return f"{self.mean:.{digits}f}{sd}%"

    def text(self, digits: int = 1) -> str:
        """`13.1 ± 0.4% (3 seeds)`, `13.1% (1 seed)`, or `no finished run`."""
        if not self.values:
            return "no finished run"
        sd = f" ± {self.sd:.{digits}f}" if self.n >= 2 else ""
        return f"{self.mean:.{digits}f}{sd}% ({seeds(self.n)})"


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


def side(cells: pd.DataFrame, name: str, metric: str) -> Side:
    """The Side of the cells given (one configuration, all its seeds)."""
    finished = cells[(cells["status"] == "finished") & np.isfinite(cells[metric])]
    diverged = cells[cells["status"] == "diverged"]
    notes = [
        f"{n} {status}"
        for status, n in cells["status"].value_counts().items()
        if status not in ("finished", "diverged")
    ]
    no_value = (cells["status"] == "finished").sum() - len(finished)
    if no_value:
        notes.append(f"{no_value} finished without {metric}")
    return Side(
        name=name,
        values=tuple(float(v) for v in finished.sort_values("seed")[metric]),
        planned=len(cells),
        diverged=tuple(
            f"{row.label} diverged" + (f" ({row.reason})" if row.reason else "")
            for row in diverged.itertuples()
        ),
        missing=", ".join(notes),
    )


@dataclass(frozen=True)
class Comparison:
    """`a` against `b`: difference of means (a - b), spread, Welch p, and what it amounts to."""

    a: Side
    b: Side
    diff: float
    spread: float
    p: float | None
    effect: str  # "higher", "lower", "within spread" or "unknown"
    problem: str = ""

    def stats(self, digits: int = 1) -> str:
        """`spread 0.7 points, p=0.002`."""
        return f"spread {self.spread:.{digits}f} points, {p_text(self.p)}"


def compare(a: Side, b: Side) -> Comparison:
    """Is `a` higher or lower than `b` beyond the seed-to-seed spread, or can't we tell (why)?"""
    diff = a.mean - b.mean
    spread = a.sd + b.sd
    problem = ""
    for s in (a, b):
        if s.n == 0:
            why = f" ({s.missing})" if s.missing else ""
            if s.diverged:
                why = f" ({'; '.join(s.diverged)})"
            problem = problem or f"{s.name} has no finished run{why}"
    if not problem and (a.diverged or b.diverged):
        problem = "; ".join(a.diverged + b.diverged) + ", so the seeds that remain may be biased"
    if not problem and min(a.n, b.n) < 2:
        who = "each side" if a.n == b.n else (a.name if a.n < 2 else b.name)
        problem = f"one seed for {who}, so the seed-to-seed spread is unknown"
    if not problem and a.sd == 0 and b.sd == 0:
        problem = "every seed gave the same result, so there is no spread to test against"
    if problem:
        return Comparison(a, b, diff, spread, None, "unknown", problem)
    p = welch(a.values, b.values)
    if p < ALPHA and abs(diff) > spread:
        effect = "higher" if diff > 0 else "lower"
    else:
        effect = "within spread"
    return Comparison(a, b, diff, spread, p, effect)


def welch(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Two-sided Welch t-test p-value."""
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


# --------------------------------------------------------------------------------------------
# Degradation.


@dataclass(frozen=True)
class DepthVerdict:
    """Deepest against shallowest net of one shortcut kind in one context."""

    family: str
    shortcut: str
    context: str
    comparison: Comparison
    outcome: str
    text: str

    @property
    def deep(self) -> Side:
        return self.comparison.a

    @property
    def shallow(self) -> Side:
        return self.comparison.b


def degradation(cells: pd.DataFrame) -> list[DepthVerdict]:
    """One verdict per (shortcut kind, context) that has at least two depths."""
    verdicts = []
    for (shortcut, context), group in cells.groupby(["shortcut", "context"], sort=False):
        depths = sorted(group["depth"].unique())
        if len(depths) < 2:
            continue
        family = group["family"].iloc[0]
        deep = side(
            group[group["depth"] == depths[-1]], f"{family}-{depths[-1]}", "final_train_err"
        )
        shallow = side(
            group[group["depth"] == depths[0]], f"{family}-{depths[0]}", "final_train_err"
        )
        comparison = compare(deep, shallow)
        epochs = int(group["epochs"].max())
        outcome, text = _judge(comparison, shortcut == PLAIN, epochs)
        verdicts.append(DepthVerdict(family, shortcut, context, comparison, outcome, text))
    return verdicts


def _judge(c: Comparison, plain: bool, epochs: int) -> tuple[str, str]:
    deep, shallow = c.a, c.b
    numbers = f"{deep.short()} vs {shallow.short()} for {shallow.name} ({seeds(deep.n, shallow.n)})"
    outcome, text = _judge_effect(c, plain, epochs, numbers)
    uncounted = [f"{s.name}: {s.missing}" for s in (deep, shallow) if s.n and s.missing]
    if uncounted:
        text += f" Not counted ({'; '.join(uncounted)})."
    return outcome, text


def _judge_effect(c: Comparison, plain: bool, epochs: int, numbers: str) -> tuple[str, str]:
    deep = c.a
    gap = f"{abs(c.diff):.1f} points"
    beyond = f"beyond the seed-to-seed spread ({c.stats()})"
    if c.effect == "unknown":
        measured = f"; as measured, {deep.name} {numbers}" if c.a.n and c.b.n else ""
        return INCONCLUSIVE, f"Cannot tell: {c.problem}{measured}."
    if c.effect == "higher":
        text = f"{deep.name} trains to {numbers}: {gap} higher, {beyond}."
        if plain:
            return REPRODUCED, text + " The deeper plain net is harder to optimise."
        later = (
            f" (the paper trained {PAPER_EPOCHS} epochs; this grid {epochs})"
            if epochs < PAPER_EPOCHS
            else ""
        )
        return NOT_REPRODUCED, (
            text + " The deeper residual net has not caught up: deeper nets converge later, "
            f"so a short run can leave them behind{later}; compare the training curves."
        )
    if c.effect == "lower":
        text = f"{deep.name} trains to {numbers}: {gap} lower, {beyond}."
        if plain:
            return NOT_REPRODUCED, text + " The deeper plain net trains better here."
        return REPRODUCED, text + " Depth helps the residual net; no degradation."
    # Within the spread.
    direction = "above" if c.diff > 0 else "below"
    text = (
        f"{deep.name} trains to {numbers}: {gap} {direction}, within the seed-to-seed spread "
        f"({c.stats()})."
    )
    if c.diff > 0:
        tail = " No clear degradation, and no gain from depth either."
        return INCONCLUSIVE, text + ("" if plain else tail)
    if plain:
        return NOT_REPRODUCED, text + " The deeper plain net is not worse."
    return REPRODUCED, text + " The deeper residual net is not worse: no degradation."


def headline(verdicts: list[DepthVerdict], cells: pd.DataFrame, context: str) -> str:
    """The report's first sentence, about the plain nets of the headline context."""
    plain = [v for v in verdicts if v.shortcut == PLAIN and v.context == context]
    mine = cells[cells["context"] == context]
    if not plain:
        if not (mine["shortcut"] == PLAIN).any():
            first = "No plain nets in this grid, so degradation is not tested"
        else:
            depth = ", ".join(
                map(str, sorted(mine.loc[mine["shortcut"] == PLAIN, "depth"].unique()))
            )
            first = f"Only one depth of plain net ({depth}): degradation needs two"
        residual = [v for v in verdicts if v.shortcut != PLAIN and v.context == context]
        extra = " ".join(
            f"{v.family}: {v.outcome}, {v.deep.name} {v.deep.short()} vs {v.shallow.name} "
            f"{v.shallow.short()} ({seeds(v.deep.n, v.shallow.n)})."
            for v in residual
        )
        return f"{first}." + (f" {extra}" if extra else "")
    v = plain[0]
    c = v.comparison
    deep, shallow = c.a, c.b
    if deep.n and shallow.n:
        numbers = (
            f"{deep.name} trains to {deep.mean:.1f}% error vs {shallow.mean:.1f}% for "
            f"{shallow.name} ({seeds(deep.n, shallow.n)}, {p_text(c.p)})"
        )
        first = f"Degradation {v.outcome}: {numbers}"
        if c.effect == "unknown":
            first += f", but {c.problem}"
    else:
        first = f"Degradation {v.outcome}: {c.problem}"
    depth = int(deep.name.rsplit("-", 1)[1])
    others = []
    for _shortcut, group in mine[mine["shortcut"] != PLAIN].groupby("shortcut", sort=False):
        at = group[group["depth"] == depth]
        if len(at):
            s = side(at, f"{group['family'].iloc[0]}-{depth}", "final_train_err")
            others.append(f"{s.name} {s.mean:.1f}%" if s.n else f"{s.name} has no finished run")
    return first + (f"; {', '.join(others)}" if others else "") + "."


def residual_vs_plain(cells: pd.DataFrame) -> list[str]:
    """At the deepest depth both have, does each residual kind train better than the plain net?"""
    out = []
    for context, group in cells.groupby("context", sort=False):
        plain = group[group["shortcut"] == PLAIN]
        if plain.empty:
            continue
        for _shortcut, res in group[group["shortcut"] != PLAIN].groupby("shortcut", sort=False):
            common = sorted(set(plain["depth"]) & set(res["depth"]))
            if not common:
                continue
            d = common[-1]
            family = res["family"].iloc[0]
            a = side(res[res["depth"] == d], f"{family}-{d}", "final_train_err")
            b = side(plain[plain["depth"] == d], f"plain-{d}", "final_train_err")
            c = compare(a, b)
            where = f" ({context})" if cells["context"].nunique() > 1 else ""
            head = (
                f"At depth {d}{where}, {a.name} trains to {a.short()} vs {b.short()} for "
                f"{b.name} ({seeds(a.n, b.n)})"
            )
            if c.effect == "unknown":
                out.append(f"{head}; {c.problem}." if a.n and b.n else f"{head}: {c.problem}.")
            elif c.effect == "within spread":
                out.append(f"{head}: within the seed-to-seed spread ({c.stats()}).")
            else:
                word = "lower" if c.effect == "lower" else "higher"
                out.append(
                    f"{head}: {abs(c.diff):.1f} points {word}, beyond the seed-to-seed spread "
                    f"({c.stats()})."
                )
    return out


# --------------------------------------------------------------------------------------------
# Block and unit order.


@dataclass(frozen=True)
class AxisVerdict:
    """Which value of an axis gave the lowest test error in one context, and by how much."""

    axis: str
    context: str
    best: str
    runner_up: str
    comparison: Comparison | None
    ranking: tuple[tuple[str, Side], ...]
    text: str


def axis_comparisons(cells: pd.DataFrame, varied: list[str]) -> list[AxisVerdict]:
    """For each varied axis among block and order (and both together), per context."""
    axes = [a for a in ("block", "order") if a in varied]
    if len(axes) == 2:
        axes.append("block+order")
    verdicts = []
    for axis in axes:
        columns = axis.split("+")
        frame = cells.assign(
            value=cells[columns].astype(str).agg(" ".join, axis=1),
            where=config_without(cells, columns),
        )
        for where, group in frame.groupby("where", sort=False):
            verdict = _axis_verdict(axis, where, group)
            if verdict is not None:
                verdicts.append(verdict)
    return verdicts


def config_without(cells: pd.DataFrame, columns: list[str]) -> pd.Series:
    """Each cell's configuration name with the given axes left out (`res-110 basic`)."""

    def name(row: pd.Series) -> str:
        tokens = row["config"].split(" ")
        at = tokens.index(f"{row['family']}-{row['depth']}")
        drop = {at + 1} if "block" in columns else set()
        drop |= {at + 2} if "order" in columns else set()
        return " ".join(t for i, t in enumerate(tokens) if i not in drop)

    return cells.apply(name, axis=1)


def _axis_verdict(axis: str, where: str, group: pd.DataFrame) -> AxisVerdict | None:
    sides = [
        (value, side(g, value, "final_test_err")) for value, g in group.groupby("value", sort=False)
    ]
    if len(sides) < 2:
        return None
    ranked = sorted((s for s in sides if s[1].n), key=lambda s: s[1].mean)
    ranking = tuple(ranked + [s for s in sides if not s[1].n])
    name = AXIS_NAMES[axis]
    if len(ranked) < 2:
        text = f"{name.capitalize()} at {where}: fewer than two values have finished runs."
        return AxisVerdict(axis, where, "", "", None, ranking, text)
    (best, b), (second, s) = ranked[0], ranked[1]
    c = compare(s, b)
    head = (
        f"{name.capitalize()} at {where}: {best} gave the lowest test error, {b.short(2)} vs "
        f"{s.short(2)} for {second} ({seeds(b.n, s.n)}), {c.diff:.2f} points lower"
    )
    if c.effect == "unknown":
        tail = f"; {c.problem}."
    elif c.effect == "higher":
        tail = f"; more than the seed-to-seed spread ({c.stats(2)})."
    else:
        tail = f"; within the seed-to-seed spread ({c.stats(2)})."
    return AxisVerdict(axis, where, best, second, c, ranking, head + tail)


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

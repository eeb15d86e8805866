"""Gradient flow in words: how the gradient norm changes from the last conv layer to the first."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .sides import seeds

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

"""The papers' CIFAR-10 numbers, carried in the package, matched to the configurations of a grid.

Each file in `resnet_ablate/reference/` starts with a `# source` line (shown as the table's label)
followed by a CSV table with some of the columns shortcut, block, order, depth and
`test_error_percent`. A row matches a configuration on the columns it has; a file without a
shortcut column (He et al. 2016, residual nets only) matches residual configurations only.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from importlib import resources

import pandas as pd

FILES = ("he2015_cifar10.csv", "he2016_cifar10_orderings.csv")
MATCH_COLUMNS = ("shortcut", "block", "order", "depth")


@dataclass(frozen=True)
class Reference:
    """One paper's table: where it comes from, and its rows."""

    name: str
    source: str
    table: pd.DataFrame


def load_reference(name: str) -> Reference:
    """Read one reference file from the package data."""
    text = resources.files("resnet_ablate").joinpath("reference", name).read_text(encoding="utf-8")
    first, _, body = text.partition("\n")
    source = first.lstrip("#").strip()
    table = pd.read_csv(io.StringIO(body))
    return Reference(name=name.removesuffix(".csv"), source=source, table=table)


def compare_with_papers(by_config: pd.DataFrame) -> list[dict[str, object]]:
    """For each reference file: its source and the rows of ours it matches, paper beside ours.

    `by_config` is the per-configuration summary (columns shortcut, block, order, depth, config,
    final_test_err_mean, final_test_err_sd, n_finished, params).
    """
    out = []
    for name in FILES:
        ref = load_reference(name)
        rows = []
        for ours in by_config.itertuples(index=False):
            match = _match(ref.table, ours._asdict())
            if match is None:
                continue
            mean = ours.final_test_err_mean
            rows.append(
                {
                    "config": ours.config,
                    "paper": float(match["test_error_percent"]),
                    "paper_params": _millions(match.get("params_millions")) * 1e6,
                    "note": "" if pd.isna(match.get("note", "")) else str(match.get("note", "")),
                    "ours_mean": mean,
                    "ours_sd": ours.final_test_err_sd,
                    "n": int(ours.n_finished),
                    "ours_params": ours.params,
                    "difference": mean - float(match["test_error_percent"]),
                }
            )
        if rows:
            out.append({"name": ref.name, "source": ref.source, "rows": rows})
    return out


def paper_error(by_config: pd.DataFrame, name: str) -> pd.Series:
    """The paper's test error for each configuration (NaN where the paper has none)."""
    table = load_reference(name).table
    values = []
    for row in by_config.to_dict("records"):
        match = _match(table, row)
        values.append(math.nan if match is None else float(match["test_error_percent"]))
    return pd.Series(values, index=by_config.index, dtype=float)


def _match(table: pd.DataFrame, ours: dict[str, object]) -> pd.Series | None:
    if ours.get("arch", "cifar") != "cifar":
        return None
    mask = pd.Series(True, index=table.index)
    for column in MATCH_COLUMNS:
        if column in table.columns:
            mask &= table[column].astype(str) == str(ours[column])
    if "shortcut" not in table.columns:
        mask &= ours["shortcut"] != "none"
    hits = table[mask]
    return None if hits.empty else hits.iloc[0]


def _millions(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan

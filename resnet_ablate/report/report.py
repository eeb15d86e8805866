"""Build a grid's report from MLflow: verdicts, figures, tables, provenance -> one HTML file.

`build_report(grid, store, out_dir)` writes `report.html` (self-contained: figures are PNG data
URIs, the style sheet is inline, no script), `summary.csv` (one row per cell of the grid file,
runs or not), `summary_by_config.csv` (mean and sd over seeds) and `figures/*.png`.

Cells of the grid with no run are listed as `new`; runs in the experiment whose cell is no longer
in the grid file (a value removed from an axis, a changed base) are listed separately, by label
and link, and take no part in verdicts, figures or summaries.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jinja2
import pandas as pd

from ..config import SECTIONS, CellConfig, Grid
from ..plan import other_settings
from ..rounds import Rounds, replay, schedule_of
from ..tracking import Store
from . import plots
from .comparisons import headline_context
from .gradient_flow import gradient_summary
from .records import Records, load_grad_flow, load_records
from .reference import FILES, compare_with_papers, paper_error
from .sides import config_name, p_text
from .tuning import Tuning, finished_trials, load_tuning
from .verdicts import Verdicts, judge

#: summary.csv: one row per cell; the run's numbers are empty for cells without a run.
SUMMARY_COLUMNS = [
    "label", "status", "reason", "family", "shortcut", "depth", "block", "order", "arch",
    "dataset", "seed", "settings", "params", "macs", "final_train_err", "final_test_err",
    "best_test_err", "best_test_epoch", "epochs_done", "epochs", "wall_seconds",
    "images_per_second", "key", "run_id", "url",
]  # fmt: skip
SUMMARY_METRICS = (
    "final_train_err",
    "final_test_err",
    "best_test_err",
    "wall_seconds",
    "images_per_second",
)
#: At most this many seeds per net in the gradient figure (one artifact download each).
GRAD_SEEDS = 3


@dataclass(frozen=True)
class Figure:
    name: str
    title: str
    caption: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def build_report(grid: Grid, store: Store, out_dir: Path) -> Path:
    """Write the grid's report and summaries into `out_dir`; return the path of report.html."""
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    records = load_records(grid, store)
    context = headline_context(grid)
    tuning = load_tuning(grid, store, records, context=context)
    if tuning is not None:  # the other settings' runs belong to the tuning section
        records.others = records.others[~records.others["key"].isin(tuning.sibling_keys)]
    schedule = schedule_of(grid)
    rounds = None
    if schedule is not None:
        rounds = replay(records.cells, grid.spec.verdicts, schedule, context=context)
        _keep_planned(records, rounds)
    cells = records.cells
    by_config = summarise(cells)
    papers = _papers(by_config)
    _write_csv(cells[SUMMARY_COLUMNS], out_dir / "summary.csv")
    _write_csv(by_config, out_dir / "summary_by_config.csv")

    verdicts = judge(cells, grid.spec.verdicts, context=context, schedule=schedule)
    varied = [a.split(".", 1)[1] for a in grid.spec.grid if a in ("model.block", "model.order")]
    varied = [a for a in varied if cells[a].nunique() > 1]
    flows = _grad_flows(store, cells, context)
    figures = _figures(records, context, varied, flows)
    tuning_figure = _tuning_figure(tuning)
    _write_figures(figures + ([tuning_figure] if tuning_figure else []), out_dir / "figures")

    context_values = {
        "grid": grid,
        "spec": grid.spec,
        "built": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "headline": verdicts.headline,
        "headline_outcome": verdicts.headline_outcome,
        "headline_context": context,
        "verdicts": verdicts.degradation,
        "residual_vs_plain": verdicts.residual_vs_plain,
        "axis_verdicts": verdicts.best,
        "method": verdicts.method + _rounds_note(verdicts, rounds),
        "gradients": gradient_summary(flows),
        "figures": figures,
        "tuning": tuning,
        "tuning_figure": tuning_figure,
        "missing_figures": _missing_figures(records, flows),
        "papers": papers,
        "by_config": by_config.to_dict("records"),
        "cells": cells.to_dict("records"),
        "counts": cells["status"].value_counts().to_dict(),
        "others": records.others.to_dict("records"),
        "provenance": _provenance(grid, store, records),
        "epochs": sorted(cells["epochs"].unique().tolist()),
        "datasets": sorted(cells["dataset"].unique().tolist()),
        "overrides": grid.overrides_text,
        "ran": what_ran(cells),
        "other_settings": [
            {"text": o.describe(), "command": o.command("report", grid)}
            for o in other_settings(grid, store)
        ],
    }
    html = render(context_values)
    path = out_dir / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# Seeds until decided.


def _keep_planned(records: Records, rounds: Rounds) -> None:
    """Only the cells of the rounds take part; runs of later seeds (from another margin or α,
    say) are listed with the runs outside the grid."""
    planned = records.cells["key"].isin(set(rounds.planned))
    extra = records.cells[~planned & (records.cells["run_id"] != "")]
    if len(extra):
        moved = extra[["label", "status", "key", "url"]]
        records.others = pd.concat([records.others, moved]).sort_values("label")
    records.cells = records.cells[planned].reset_index(drop=True)
    records.curves = records.curves[records.curves["run_id"].isin(set(records.cells["run_id"]))]


def _rounds_note(verdicts: Verdicts, rounds: Rounds | None) -> tuple[str, ...]:
    """Where the rounds stand: how many, the seeds each configuration got, and which
    comparisons reached the maximum undecided."""
    if rounds is None:
        return ()
    count = len(rounds.rounds)
    many = len({(c.arch, c.block, c.order, c.extras) for c in rounds.seeds}) > 1
    seeds = ", ".join(
        # With several contexts each configuration is named in full.
        f"{' '.join(p for p in (c.net, c.block, c.order, c.extras) if p) if many else c.net} {n}"
        for c, n in rounds.seeds.items()
    )
    state = (
        f"Settled after {count} round{'s' if count != 1 else ''}"
        if rounds.settled
        else f"Round {count} is under way ({len(rounds.pending)} cell(s) without a result yet; "
        "the verdicts are at the latest look the finished seeds allow)"
    )
    text = f"{state}; seeds per configuration: {seeds}."
    at_max = verdicts.max_undecided()
    if at_max:
        text += f" Undecided at the maximum of {rounds.schedule.max} seeds: {'; '.join(at_max)}."
    elif rounds.settled and any(n >= rounds.schedule.max for n in rounds.seeds.values()):
        most = rounds.schedule.max
        text += f" Every comparison was decided, the last with the maximum of {most} seeds."
    elif rounds.settled:
        text += " Every comparison was decided before the maximum."
    return (text,)


# --------------------------------------------------------------------------------------------
# Tables.


def what_ran(cells: pd.DataFrame) -> str:
    """Epochs and images of the cells that have runs, read from the runs (their params and
    dataset tags), e.g. `3 epochs of 6,000 training images, tested on 2,000`; empty without."""
    ran = cells[cells["run_id"] != ""]
    epochs = _alternatives(ran["run_epochs"])
    if not epochs:
        return ""
    text = f"{epochs} epoch" + ("" if epochs == "1" else "s")
    if train := _alternatives(ran["train_images"]):
        text += f" of {train} training images"
    if test := _alternatives(ran["test_images"]):
        text += f", tested on {test}"
    return text


def _alternatives(values: pd.Series) -> str:
    """`3`, or `3 or 8` when the runs differ; empty when none has a value."""
    return " or ".join(f"{n:,}" for n in sorted({int(v) for v in values.dropna()}))


def summarise(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: mean and sd over the finished seeds, and how many there are."""
    rows = []
    for config, g in cells.groupby("config", sort=False):
        done = g[g["status"] == "finished"]
        counts = g["status"].value_counts()
        row: dict[str, Any] = {"config": config}
        for column in ("family", "shortcut", "depth", "block", "order", "arch", "dataset"):
            row[column] = g[column].iloc[0]
        row.update(
            seeds=len(g),
            n_finished=int(counts.get("finished", 0)),
            n_diverged=int(counts.get("diverged", 0)),
            n_failed=int(counts.get("failed", 0)),
            statuses=", ".join(f"{n} {s}" for s, n in counts.items()),
            params=_first(g["params"]),
            macs=_first(g["macs"]),
        )
        for metric in SUMMARY_METRICS:
            values = done[metric].dropna()
            row[f"{metric}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{metric}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _papers(by_config: pd.DataFrame) -> list[dict[str, object]]:
    """For CIFAR-10 configurations: the papers' tables for the report, and their numbers added
    to `by_config` as columns `paper_he2015_test_err`, ... (NaN where a paper has none)."""
    cifar = by_config["dataset"] == "cifar10"
    if not cifar.any():
        return []
    for name in FILES:
        column = f"paper_{name.split('_')[0]}_test_err"
        by_config[column] = paper_error(by_config, name).where(cifar)
    return compare_with_papers(by_config[cifar])


def _first(values: pd.Series) -> float:
    finite = values.dropna()
    return float(finite.iloc[0]) if len(finite) else math.nan


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    frame = frame.copy()
    for column in ("params", "macs", "best_test_epoch", "epochs_done", "epochs"):
        if column in frame.columns:
            frame[column] = frame[column].round().astype("Int64")
    tmp = path.with_suffix(".csv.tmp")
    frame.to_csv(tmp, index=False, float_format="%.4f")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Figures.


def _grad_flows(store: Store, cells: pd.DataFrame, context: str) -> pd.DataFrame:
    """Per-layer gradient norms of the deepest finished net of each kind in the headline context."""
    rows = []
    mine = cells[(cells["context"] == context) & (cells["status"] == "finished")]
    for _, family in mine.groupby("family", sort=False):
        deepest = family[family["depth"] == family["depth"].max()].sort_values("seed")
        for cell in deepest.head(GRAD_SEEDS).itertuples():
            payload = load_grad_flow(store, cell.run_id, cell.artifact_uri)
            if payload is None:
                continue
            when = payload.get("when") or {}
            for epoch, norms in payload["epochs"].items():
                note = str(when.get(epoch, ""))
                for layer, norm in enumerate(norms):
                    rows.append(
                        (cell.net, cell.family, cell.seed, int(epoch), note, layer, float(norm))
                    )
    columns = ["net", "family", "seed", "epoch", "when", "layer", "norm"]
    frame = pd.DataFrame(rows, columns=columns)
    if frame.empty:
        return frame
    epochs = sorted(frame["epoch"].unique())
    return frame[frame["epoch"].isin({epochs[0], epochs[-1]})]


def _figures(
    records: Records, context: str, varied: list[str], flows: pd.DataFrame
) -> list[Figure]:
    cells = records.cells
    finished = cells[cells["status"] == "finished"]
    figures = []
    palette = plots.depth_palette(cells["depth"].tolist())
    many = cells["context"].nunique() > 1
    iterations = _in_context(records.iterations, context)
    curves = _in_context(records.curves, context)
    if len(iterations):
        figures.append(_iterations_figure(iterations, context, palette, many))
    if len(curves):
        n = curves.groupby("config")["seed"].nunique()
        if n.max() == 1:
            lines = "one seed each, so no band"
        else:
            count = f"{n.min()}" if n.min() == n.max() else f"{n.min()} to {n.max()}"
            lines = f"the mean over {count} seeds, the band ± 1 sd"
        others = f" Other contexts are in Figure {len(figures) + 2}." if many else ""
        figures.append(
            Figure(
                "error_curves",
                "Training and test error per epoch",
                f"Error per epoch of the {context} nets, one line per depth ({lines}); columns "
                f"are shortcut kinds, as in He et al. (2015), Fig. 6. Finished runs only.{others}",
                plots.error_curves(curves, palette),
            )
        )
    if len(finished):
        many = finished["context"].nunique() > 1
        figures.append(
            Figure(
                "error_vs_depth",
                "Final error against depth",
                "Final training and test error by depth for each shortcut kind; points are "
                "means over seeds, bars ± 1 sd (none with one seed)."
                + (" Line styles tell the contexts apart." if many else ""),
                plots.error_vs_depth(finished, "context" if many else None),
            )
        )
    if varied and len(finished):
        bars = finished.assign(
            where=config_name(finished, without=varied),
            value=finished[varied].astype(str).agg(" ".join, axis=1),
        )
        label = " and ".join("unit order" if a == "order" else a for a in varied)
        figures.append(
            Figure(
                "block_order",
                "Block and unit order",
                f"Final test error for each {label}; bars are means over seeds, whiskers "
                "± 1 sd. Each group holds the other fields equal.",
                plots.axis_bars(bars, "where", "value", label),
            )
        )
    if len(flows):
        epochs = sorted(flows["epoch"].unique())
        which = " and ".join(f"{e}" for e in epochs)
        figures.append(
            Figure(
                "gradient_norms",
                "Gradient norm by layer",
                f"L2 norm of each main-path conv layer's weight gradient at epoch {which}, "
                f"layer 0 at the input; log scale. The deepest finished net of each shortcut "
                f"kind ({context}), one line per seed.",
                plots.gradient_norms(flows),
            )
        )
    return figures


def _in_context(frame: pd.DataFrame, context: str) -> pd.DataFrame:
    """The finished runs of the headline context: the nets a curve figure compares."""
    if frame.empty:
        return frame
    return frame[(frame["context"] == context) & (frame["status"] == "finished")]


def _iterations_figure(
    frame: pd.DataFrame, context: str, palette: dict[int, tuple], many: bool
) -> Figure:
    """He et al. (2015) Fig. 6 as drawn there: error against iterations, plain | residual."""
    n = frame.groupby("config")["seed"].nunique()
    if n.max() == 1:
        lines = "each line is one seed"
    else:
        count = f"{n.min()}" if n.min() == n.max() else f"{n.min()} to {n.max()}"
        lines = f"lines are the mean over {count} seeds, the band spans their minimum to maximum"
    counts = frame.groupby(["run_id", "split"]).size().unstack(fill_value=0)
    per_epoch = (counts.get("train", 0) / counts.get("test", 0)).replace(math.inf, math.nan)
    points = f"{per_epoch.median():.0f}" if per_epoch.notna().any() else "several"
    others = " Other contexts are in the figures below." if many else ""
    return Figure(
        "error_iterations",
        "Error against iterations (He et al. 2015, Fig. 6)",
        f"The {context} nets as He et al. (2015) draw Fig. 6: plain nets left, residual nets "
        f"right, one colour per depth. Thin lines: training error, the running mean over the "
        f"iterations since the previous point ({points} points per epoch, training mode, "
        f"augmented images); bold lines: test error at the end of each epoch. {lines[0].upper()}"
        f"{lines[1:]}. Finished runs only; the y axis leaves out the near-chance error of early "
        f"training.{others}",
        plots.error_against_iterations(frame, palette),
    )


def _tuning_figure(tuning: Tuning | None) -> Figure | None:
    """The trial history of every study, when there are finished trials."""
    if tuning is None:
        return None
    trials = finished_trials(tuning)
    if trials.empty:
        return None
    return Figure(
        "tuning",
        "Tuning trials",
        f"Validation error of each finished trial by trial number ({tuning.method}); one "
        "panel per configuration. Grey crosses are pruned trials, at the error they were "
        "stopped at; the line follows the best complete trial so far and the ring marks the "
        "best, whose values the tuned runs use. Failed and killed "
        "trials are not drawn (they do not count toward the budget).",
        plots.trial_history(trials, tuning.budget),
    )


def _missing_figures(records: Records, flows: pd.DataFrame) -> list[str]:
    notes = []
    if not (records.cells["status"] == "finished").any():
        notes.append("No cell has finished yet, so there are no curves or summaries to draw.")
    elif flows.empty:
        notes.append("No finished run has a grad_flow.json artifact: no gradient figure.")
    return notes


def _write_figures(figures: list[Figure], folder: Path) -> None:
    names = {f"{f.name}.png" for f in figures}
    stale_names = (
        "error_iterations",
        "error_curves",
        "error_vs_depth",
        "block_order",
        "gradient_norms",
        "tuning",
    )
    for stale in stale_names:
        if f"{stale}.png" not in names:
            (folder / f"{stale}.png").unlink(missing_ok=True)
    for figure in figures:
        (folder / f"{figure.name}.png").write_bytes(figure.png)


# --------------------------------------------------------------------------------------------
# Provenance and HTML.


def _provenance(grid: Grid, store: Store, records: Records) -> dict[str, Any]:
    base = CellConfig.model_validate({s: dict(getattr(grid.spec.base, s)) for s in SECTIONS})
    resolved = base.model_dump(mode="json")
    resolved.pop("seed", None)
    versions = {}
    for package in ("mlflow", "seaborn", "pandas"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "runs": records.provenance,
        "grid_file": str(grid.path),
        "base": json.dumps(resolved, indent=2),
        "axes": json.dumps(
            {
                "grid": grid.spec.grid,
                "seeds": dataclasses.asdict(grid.spec.seed_range)
                if grid.spec.seed_range is not None
                else grid.spec.seeds,
                "exclude": grid.spec.exclude,
            },
            indent=2,
            default=str,
        ),
        "tracking_uri": _without_password(store.uri),
        "experiment_id": records.experiment_id or "(none yet)",
        "report_versions": versions,
    }


def _without_password(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def render(values: dict[str, Any]) -> str:
    """The HTML page; jinja2 escapes every value (descriptions, tags and labels included)."""
    env = jinja2.Environment(
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(pct=_pct, millions=_millions, duration=_duration, count=_count, p=_p_value)
    text = resources.files("resnet_ablate.report").joinpath("template.html").read_text("utf-8")
    return env.from_string(text).render(**values)


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _pct(x: Any, digits: int = 2) -> str:
    return "—" if _missing(x) else f"{x:.{digits}f}"


def _millions(x: Any) -> str:
    if _missing(x):
        return "—"
    if x >= 1e9:
        return f"{x / 1e9:.2f}G"
    return f"{x / 1e6:.2f}M" if x >= 1e4 else f"{x:.0f}"


def _duration(seconds: Any) -> str:
    if _missing(seconds):
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _p_value(p: Any) -> str:
    return "—" if _missing(p) else p_text(p).removeprefix("p=").removeprefix("p")


def _count(x: Any) -> str:
    return "—" if _missing(x) else f"{x:,.0f}"

"""What a grid left in MLflow, as tables: one row per grid cell, and the epoch curves.

Everything is read from the tracking store through ``tracking.py`` (never from the trainer), so a
report can be rebuilt at any time. A cell's descriptive columns come from its structured name
(``Cell.name``): the report never parses a label.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pandas as pd
from mlflow.entities import Run

from ..config import Cell, Grid
from ..tracking import (
    TAG_LABEL,
    TAG_REASON,
    TAG_SETTINGS,
    TAG_TEST_IMAGES,
    TAG_TRAIN_IMAGES,
    Store,
    cell_runs,
    cell_status,
    download_json,
    find_experiment,
    metric_points,
    ui_url,
)

#: Per-epoch metrics the report draws or summarises.
CURVE_KEYS = ("train_err", "test_err")
#: The running training error within epochs (step = iteration), as He et al. (2015) Fig. 6.
POINT_KEY = "iter_train_err"
SPEED_KEY = "images_per_second"
FINAL_KEYS = (
    "final_train_err",
    "final_test_err",
    "best_test_err",
    "best_test_epoch",
    "wall_seconds",
    "model_params",
    "model_macs",
)
PROVENANCE_TAGS = {
    "ablate.git_commit": "git commit",
    "ablate.torch_version": "torch",
    "ablate.version": "resnet-ablate",
    "ablate.device": "device",
    "ablate.precision": "precision",
    "ablate.settings": "settings",
}
#: Columns of the per-cell table, in the order of summary.csv.
CELL_COLUMNS = [
    "label",
    "status",
    "reason",
    "config",
    "context",
    "net",
    "extras",
    "family",
    "shortcut",
    "depth",
    "block",
    "order",
    "arch",
    "dataset",
    "seed",
    "settings",
    "params",
    "macs",
    "final_train_err",
    "final_test_err",
    "best_test_err",
    "best_test_epoch",
    "epochs_done",
    "epochs",
    "wall_seconds",
    "images_per_second",
    "key",
    "run_id",
    "url",
    "artifact_uri",
    "run_epochs",
    "train_images",
    "test_images",
]


@dataclass
class Records:
    """The grid's cells joined with their runs, the epoch curves and the runs outside the grid."""

    cells: pd.DataFrame
    curves: pd.DataFrame
    others: pd.DataFrame
    experiment_id: str | None
    provenance: dict[str, list[str]] = field(default_factory=dict)
    #: Error against iterations: the points within epochs (split `train`) and the test error at
    #: each epoch's last iteration (split `test`), for runs that logged points; see
    #: :func:`iteration_curves`.
    iterations: pd.DataFrame = field(default_factory=pd.DataFrame)


def load_records(grid: Grid, store: Store) -> Records:
    """Read the grid's experiment: every cell of the grid file, with its run when it has one."""
    found = find_experiment(store, grid.name)
    if found is None or found.lifecycle_stage != "active":
        runs: dict[str, Run] = {}
        experiment_id = None
    else:
        experiment_id = found.experiment_id
        runs = cell_runs(store, experiment_id)

    keys = {cell.key for cell in grid.cells}
    mine = [runs[c.key].info.run_id for c in grid.cells if c.key in runs]
    histories = read_histories(store, mine, (*CURVE_KEYS, SPEED_KEY, POINT_KEY))
    speed = _median_speed(histories)
    epochs_done = _epochs_done(histories)

    tuned_fields = list(grid.spec.tune.params) if grid.spec.tune else []
    rows = [
        _cell_row(cell, runs.get(cell.key), store, experiment_id, speed, epochs_done, tuned_fields)
        for cell in grid.cells
    ]
    cells = pd.DataFrame(rows, columns=CELL_COLUMNS)
    curves = _curves(histories, cells)
    others = _other_runs(runs, keys, store, experiment_id)
    provenance = _provenance([runs[c.key] for c in grid.cells if c.key in runs])
    iterations = iteration_curves(histories, cells)
    return Records(cells, curves, others, experiment_id, provenance, iterations)


def _number(metrics: dict[str, float], key: str) -> float:
    value = metrics.get(key)
    return float(value) if value is not None else math.nan


def describe_cell(cell: Cell, status: str) -> dict[str, Any]:
    """A cell's descriptive columns of the per-cell table (from its structured name), with its
    status; the run's columns (`run_id`, `url`, `artifact_uri`, `reason`, `settings`) empty."""
    m = cell.config.model
    name = cell.name
    return {
        "label": name.label,
        "status": status,
        "reason": "",
        "config": name.config,
        "context": name.context,
        "net": name.net,
        "extras": name.extras_text,
        "family": m.family,
        "shortcut": m.shortcut,
        "depth": m.depth,
        "block": m.block,
        "order": m.order,
        "arch": m.arch,
        "dataset": cell.config.data.name,
        "seed": cell.config.seed,
        "settings": "",
        "epochs": cell.config.train.epochs,
        "key": cell.key,
        "run_id": "",
        "url": "",
        "artifact_uri": "",
    }


def _cell_row(
    cell: Cell,
    run: Run | None,
    store: Store,
    experiment_id: str | None,
    speed: dict[str, float],
    epochs_done: dict[str, int],
    tuned_fields: list[str],
) -> dict[str, Any]:
    row = describe_cell(cell, cell_status(run))
    metrics: dict[str, float] = {}
    if run is not None:
        run_id = run.info.run_id
        metrics = run.data.metrics
        row["reason"] = run.data.tags.get(TAG_REASON, "")
        row["settings"] = run_settings(run, tuned_fields)
        row["run_id"] = run_id
        row["artifact_uri"] = run.info.artifact_uri or ""
        row["url"] = ui_url(store.uri, experiment_id or "", run_id)
        row["images_per_second"] = speed.get(run_id, math.nan)
        row["epochs_done"] = epochs_done.get(run_id, 0)
        row["run_epochs"] = _number(_floats(run.data.params), "train.epochs")
        row["train_images"] = _number(_floats(run.data.tags), TAG_TRAIN_IMAGES)
        row["test_images"] = _number(_floats(run.data.tags), TAG_TEST_IMAGES)
    else:
        row["images_per_second"] = math.nan
        row["epochs_done"] = 0
        row["run_epochs"] = row["train_images"] = row["test_images"] = math.nan
    row["params"] = _number(metrics, "model_params")
    row["macs"] = _number(metrics, "model_macs")
    for key in FINAL_KEYS[:5]:
        row[key] = _number(metrics, key)
    return row


def _floats(values: dict[str, str]) -> dict[str, float]:
    """The values of a run's params or tags that are numbers."""
    out = {}
    for key, text in values.items():
        try:
            out[key] = float(text)
        except ValueError:
            continue
    return out


def run_settings(run: Run, tuned_fields: list[str]) -> str:
    """Which settings a run trained with, from its ``ablate.settings`` tag: `default`, or
    `tuned (train.lr=0.071, ...)` with the tuned values it used (its params); empty without."""
    settings = run.data.tags.get(TAG_SETTINGS, "")
    if not settings.startswith("tuned"):
        return settings
    params = run.data.params
    values = ", ".join(f"{k}={_short(params[k])}" for k in tuned_fields if k in params)
    return f"tuned ({values})" if values else "tuned"


def _short(text: str) -> str:
    """A logged param as the report shows it: floats to 3 significant digits."""
    try:
        return f"{float(text):.3g}" if any(c in text for c in ".eE") else text
    except ValueError:
        return text


# --------------------------------------------------------------------------------------------
# Metric histories.


def read_histories(store: Store, run_ids: list[str], keys: tuple[str, ...]) -> pd.DataFrame:
    """Every logged value of `keys` for `run_ids`: columns run_id, key, step, value.

    When a step was logged twice (a resumed epoch), the later value wins.
    """
    records = [
        (p.run_id, p.key, p.step, p.value, p.timestamp_ms)
        for p in metric_points(store, run_ids, keys)
    ]
    frame = pd.DataFrame(records, columns=["run_id", "key", "step", "value", "timestamp"])
    frame = frame.sort_values(["run_id", "key", "step", "timestamp"], kind="stable")
    frame = frame.drop_duplicates(["run_id", "key", "step"], keep="last")
    return frame.drop(columns="timestamp").reset_index(drop=True)


def _median_speed(histories: pd.DataFrame) -> dict[str, float]:
    """Median images/s over epochs, leaving out the first epoch (warm-up, graph capture)."""
    speed = histories[histories["key"] == SPEED_KEY]
    later = speed[speed["step"] > 1]
    chosen = pd.concat([later, speed[~speed["run_id"].isin(later["run_id"])]])
    return chosen.groupby("run_id")["value"].median().to_dict()


def _epochs_done(histories: pd.DataFrame) -> dict[str, int]:
    train = histories[histories["key"] == "train_err"]
    return train.groupby("run_id")["step"].max().astype(int).to_dict()


def _curves(histories: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Long table: run_id, key, epoch, error (%), joined with each cell's descriptive columns."""
    curves = histories[histories["key"].isin(CURVE_KEYS)].rename(
        columns={"step": "epoch", "value": "error"}
    )
    info = cells.loc[
        cells["run_id"] != "",
        ["run_id", "label", "config", "context", "family", "depth", "seed", "status"],
    ]
    return curves.merge(info, on="run_id", how="inner")


def iteration_curves(histories: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Long table of error against iterations: run_id, split (`train`: the points within
    epochs; `test`: the per-epoch test error placed at the epoch's last iteration), iteration,
    error (%), joined with each cell's descriptive columns. Only runs that logged points: their
    last point of an epoch is its last iteration, which places the epochs."""
    points = histories[histories["key"] == POINT_KEY]
    epochs = histories[histories["key"].isin(CURVE_KEYS)]
    last_point = points.groupby("run_id")["step"].max()
    last_epoch = epochs[epochs["key"] == "train_err"].groupby("run_id")["step"].max()
    per_epoch = (last_point / last_epoch.reindex(last_point.index)).dropna().round()
    test = epochs[(epochs["key"] == "test_err") & epochs["run_id"].isin(per_epoch.index)]
    frame = pd.concat(
        [
            points.assign(split="train", iteration=points["step"]),
            test.assign(split="test", iteration=test["step"] * test["run_id"].map(per_epoch)),
        ],
        ignore_index=True,
    )
    frame = frame[["run_id", "split", "iteration", "value"]].rename(columns={"value": "error"})
    frame["iteration"] = frame["iteration"].astype("int64")
    info = cells.loc[
        cells["run_id"] != "",
        ["run_id", "label", "config", "context", "family", "depth", "seed", "status"],
    ]
    return frame.merge(info, on="run_id", how="inner")


def _other_runs(
    runs: dict[str, Run], keys: set[str], store: Store, experiment_id: str | None
) -> pd.DataFrame:
    rows = [
        {
            "label": run.data.tags.get(TAG_LABEL, run.info.run_name or ""),
            "status": cell_status(run),
            "key": key,
            "url": ui_url(store.uri, experiment_id or "", run.info.run_id),
        }
        for key, run in runs.items()
        if key not in keys
    ]
    return pd.DataFrame(rows, columns=["label", "status", "key", "url"]).sort_values("label")


def _provenance(runs: list[Run]) -> dict[str, list[str]]:
    """Each provenance tag's distinct values over the grid's runs (one commit, ideally)."""
    found: dict[str, list[str]] = {}
    for tag, name in PROVENANCE_TAGS.items():
        values = sorted({run.data.tags[tag] for run in runs if run.data.tags.get(tag)})
        if values:
            found[name] = values
    return found


# --------------------------------------------------------------------------------------------
# Artifacts.


def load_grad_flow(store: Store, run_id: str, artifact_uri: str = "") -> dict[str, Any] | None:
    """The run's grad_flow.json (layers in depth order, norms per logged epoch), or None."""
    try:
        if artifact_uri.startswith("file:"):  # local artifacts: read in place, no copy
            path = Path(url2pathname(urlsplit(artifact_uri).path)) / "grad_flow.json"
            payload = json.loads(path.read_text(encoding="utf-8"))
        else:
            payload = download_json(store, run_id, "grad_flow.json")
    except Exception:  # missing artifact, unreadable file: the report says so instead
        return None
    if not isinstance(payload, dict) or not payload.get("layers") or not payload.get("epochs"):
        return None
    return payload

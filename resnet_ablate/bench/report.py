"""How long `build_report` takes on a large grid: fill a temporary store, then time the report.

    python -m resnet_ablate.bench.report --runs 100 --epochs 164

The store is filled through tracking.py, as the runner fills it (a run per cell, flat params,
per-epoch metrics, final metrics, config/final/grad_flow artifacts), with synthetic curves shaped
like the paper's: plain nets train worse the deeper they are, residual nets better. Exit code 1
when the report takes longer than --budget seconds. The helpers here also fill the test stores.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import tracking
from ..config import Cell, Grid, load_grid
from ..report.report import build_report
from ..tracking import Store

#: Provenance that synthetic runs carry instead of the real one (no torch import, no git call).
SYNTHETIC_PROVENANCE = {
    "ablate.git_commit": "synthetic",
    "ablate.torch_version": "synthetic",
    "ablate.device": "synthetic",
    "ablate.precision": "fp32",
}


def synthetic_curves(
    final_train: float,
    final_test: float,
    epochs: int,
    rng: np.random.Generator,
    start: float = 90.0,
) -> dict[str, list[float]]:
    """Error curves (%) that fall from `start` to the given final values, with a little noise."""
    t = np.arange(1, epochs + 1) / epochs
    shape = np.exp(-6.0 * t)
    shape = (shape - shape[-1]) / (shape[0] - shape[-1])  # 1 at epoch 1, 0 at the last epoch
    noise = rng.normal(0.0, 0.15, epochs) * shape
    train = final_train + (start - final_train) * shape + noise
    test = final_test + (start - final_test) * shape + noise
    return {"train_err": train.tolist(), "test_err": test.tolist()}


def synthetic_grad_flow(depth: int, shortcut: str, epochs: int) -> dict[str, Any]:
    """Per-layer gradient norms that grow toward the input: steeply for plain nets, gently for
    residual ones (as measured with batch norm at initialisation), flatter after training."""
    layers = ["stem.conv"] + [f"stage{1 + 3 * i // (depth - 2)}.{i}.conv" for i in range(depth - 2)]
    decades = (6.0 if shortcut == "none" else 2.0) * depth / 110
    position = np.linspace(1.0, 0.0, len(layers))  # 1 at the input, 0 at the last conv
    first = 1e-3 * 10 ** (decades * position)
    last = 1e-3 * 10 ** (0.3 * decades * position)
    return {
        "layers": layers,
        "epochs": {"1": first.tolist(), str(epochs): last.tolist()},
        "when": {"1": "initialisation (before the first step)", str(epochs): "end of training"},
    }


def write_cell(
    store: Store,
    experiment_id: str,
    parent_id: str,
    cell: Cell,
    curves: Mapping[str, list[float]],
    *,
    status: str = "finished",
    reason: str = "",
    params: float = 0.85e6,
    macs: float = 125e6,
    seconds_per_epoch: float = 20.0,
    grad_flow: dict[str, Any] | None = None,
    provenance: Mapping[str, str] = SYNTHETIC_PROVENANCE,
    points: int = 20,
    iterations_per_epoch: int = 390,
) -> str:
    """Write one cell's run as the runner would, with the given curves; return its run id.

    Each epoch also gets `points` points within it (``iter_train_err``, ``iter_train_loss``,
    step = iteration, the last at the epoch's end), on a line from the previous epoch's
    training error (90% before the first) to this one's."""
    spec = tracking.cell_run_spec(cell, parent_id, dict(provenance))
    run_id = tracking.create_run(store, experiment_id, spec)
    tracking.log_metrics(store, run_id, {"model_params": params, "model_macs": macs}, step=0)
    tracking.log_json(store, run_id, "config.json", {"key": cell.key, "label": cell.label})
    epochs = len(curves["train_err"])
    t0 = int(time.time() * 1000)
    points_log = tracking.MetricLog(store, run_id)
    for i in range(epochs):
        values = {k: v[i] for k, v in curves.items()}
        values.setdefault("lr", 0.1)
        values.setdefault("epoch_seconds", seconds_per_epoch)
        values.setdefault("images_per_second", 50_000 / seconds_per_epoch)
        values.setdefault("train_loss", values["train_err"] / 40)
        values.setdefault("test_loss", values.get("test_err", math.nan) / 40)
        before = curves["train_err"][i - 1] if i else 90.0
        for mark in range(1, points + 1):
            share = mark / points
            err = before + (values["train_err"] - before) * share
            iteration = i * iterations_per_epoch + round(share * iterations_per_epoch)
            within = {"iter_train_err": err, "iter_train_loss": err / 40}
            points_log.add(within, step=iteration, timestamp_ms=t0 + 1000 * i)
        points_log.add(values, step=i + 1, timestamp_ms=t0 + 1000 * i)
    # One batch call per 1000 values: the record is the same as the runner's per-epoch batches.
    points_log.flush()
    if status in ("finished", "diverged") and epochs:
        test = [v for v in curves.get("test_err", []) if math.isfinite(v)]
        final = {
            "final_train_err": curves["train_err"][-1],
            "wall_seconds": seconds_per_epoch * epochs,
        }
        if test:
            best = int(np.argmin(test))
            final |= {
                "final_test_err": test[-1],
                "best_test_err": test[best],
                "best_test_epoch": best + 1,
            }
        tracking.log_metrics(store, run_id, final, step=epochs)
        tracking.log_json(store, run_id, "final_metrics.json", final | {"status": status})
    if grad_flow is not None:
        tracking.log_json(store, run_id, "grad_flow.json", grad_flow)
    if status != "running":
        tracking.end_run(store, run_id, status, reason)
    return run_id


def benchmark_grid(folder: Path, runs: int, epochs: int) -> Grid:
    """plain/residual × 5 depths × post/pre order, seeds enough for `runs` cells (CIFAR-10)."""
    seeds = max(1, math.ceil(runs / 20))
    path = folder / "bench-report.yaml"
    path.write_text(
        "name: bench-report\n"
        "description: synthetic runs for the report benchmark\n"
        "base:\n"
        "  data: {name: cifar10}\n"
        f"  train: {{epochs: {epochs}}}\n"
        "grid:\n"
        "  model.shortcut: [none, identity]\n"
        "  model.depth: [20, 32, 44, 56, 110]\n"
        "  model.order: [post, pre]\n"
        f"seeds: {list(range(seeds))}\n",
        encoding="utf-8",
    )
    return load_grid(path)


def fill(store: Store, grid: Grid, runs: int, seed: int = 0) -> None:
    """Write synthetic runs for the first `runs` cells of the grid (the rest stay new)."""
    rng = np.random.default_rng(seed)
    experiment_id = store.experiment_id(grid.name, grid.spec.description)
    parent = tracking.grid_run_id(store, experiment_id, grid, SYNTHETIC_PROVENANCE)
    for cell in grid.cells[:runs]:
        m = cell.config.model
        epochs = cell.config.train.epochs
        final = 5.0 + 0.08 * m.depth if m.shortcut == "none" else 7.0 - 0.02 * m.depth
        final += rng.normal(0, 0.2)
        curves = synthetic_curves(final, final + 1.5, epochs, rng)
        flow = synthetic_grad_flow(m.depth, m.shortcut, epochs)
        write_cell(store, experiment_id, parent, cell, curves, grad_flow=flow)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=164)
    parser.add_argument("--budget", type=float, default=15.0, help="seconds allowed")
    parser.add_argument(
        "--keep", type=Path, help="write store and report here instead of a temp dir"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ablate-bench-report-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        grid = benchmark_grid(folder, args.runs, args.epochs)
        t0 = time.perf_counter()
        store = tracking.open_store(tracking.default_uri(folder), folder)
        fill(store, grid, args.runs)
        filled = time.perf_counter() - t0
        print(f"filled {args.runs} runs × {args.epochs} epochs in {filled:.1f} s")

        t0 = time.perf_counter()
        store = tracking.open_store(tracking.default_uri(folder), folder)
        opened = time.perf_counter() - t0
        t0 = time.perf_counter()
        path = build_report(grid, store, folder / grid.name)
        seconds = time.perf_counter() - t0
        size = path.stat().st_size / 1e6
        print(f"opened the store in {opened:.2f} s")
        print(f"build_report: {seconds:.2f} s for {args.runs} runs ({size:.1f} MB of HTML)")
        if seconds > args.budget:
            print(f"SLOW: over the {args.budget:g} s budget", file=sys.stderr)
            return 1
        print(f"OK: under the {args.budget:g} s budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the points within epochs (``train.log_points``) cost, on one cell of a grid, on the CPU.

    python scripts/point_cost.py experiments/quick.yaml --label "plain-20 basic post s0" --repeats 3

Trains the cell one epoch with the grid's ``log_points`` and one epoch with 0, alternating, in
one process, and prints each epoch's training seconds; then times the extra work on its own (the
device snapshots of an epoch, their read-back, and the longer MLflow batch that carries them),
which the side-by-side epochs can only bound within their noise. With ``--full`` it first trains
the cell to its end with the points on and prints its final errors, to compare with the grid's
committed summary.csv (recording the points must not move a digit).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from resnet_ablate import tracking
from resnet_ablate.config import load_grid
from resnet_ablate.data import load_dataset
from resnet_ablate.device import ExecOptions
from resnet_ablate.train import epoch_points, point_marks, train_cell


def side_by_side(
    cell, dataset, repeats: int, points: int, options: ExecOptions
) -> dict[int, list[float]]:
    """Training seconds of the first epoch (images/s turned back into seconds, warm-up left
    out as the trainer does) with `points` and with 0, alternating which goes first."""
    seconds: dict[int, list[float]] = {points: [], 0: []}
    images = (len(dataset.train.y) // cell.config.train.batch_size) * cell.config.train.batch_size
    for r in range(repeats):
        order = (points, 0) if r % 2 == 0 else (0, points)
        for n in order:
            config = cell.config.model_copy(
                update={"train": cell.config.train.model_copy(update={"log_points": n})}
            )
            result = train_cell(config, dataset, options=options, max_epochs=1)
            seconds[n].append(images / result.history[0]["images_per_second"])
    return seconds


def extra_work(steps: int, points: int, batch: int, repeats: int = 200) -> float:
    """Seconds an epoch spends on the points: the per-step mark check, the snapshot copies,
    the read-back and the arithmetic (as the trainer does them, on the CPU)."""
    sums = torch.zeros(2)
    marks = point_marks(steps, points)
    t0 = time.perf_counter()
    for _ in range(repeats):
        snapshots = torch.zeros(len(marks), 2)
        mark = 0
        for i in range(steps):
            if mark < len(marks) and i + 1 == marks[mark]:
                snapshots[mark].copy_(sums)
                mark += 1
        epoch_points(0, marks, snapshots.tolist(), batch)
    return (time.perf_counter() - t0) / repeats


def logging_cost(points: int, repeats: int = 20) -> tuple[float, float]:
    """Seconds to log one epoch's metrics to a fresh SQLite store, without and with points."""
    with tempfile.TemporaryDirectory() as tmp:
        store = tracking.open_store(tracking.default_uri(Path(tmp)), Path(tmp))
        experiment = store.experiment_id("cost")
        run_id = tracking.create_run(store, experiment, tracking.RunSpec(name="r", role="cell"))
        epoch = {k: 1.0 for k in ("train_loss", "train_err", "test_loss", "test_err", "lr")}
        times: dict[bool, list[float]] = {False: [], True: []}
        for e in range(1, 2 * repeats + 1):
            with_points = e % 2 == 0
            log = tracking.MetricLog(store, run_id)
            if with_points:
                for k in range(points):
                    log.add({"iter_train_loss": 1.0, "iter_train_err": 1.0}, step=e * 1000 + k)
            log.add(epoch, step=e)
            t0 = time.perf_counter()
            log.flush()
            times[with_points].append(time.perf_counter() - t0)
        return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("--label", default="plain-20 basic post s0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    options = ExecOptions(threads=args.threads)
    grid = load_grid(args.grid)
    (cell,) = [c for c in grid.cells if c.label == args.label]
    dataset = load_dataset(cell.config.data)
    train = cell.config.train
    steps = len(dataset.train.y) // train.batch_size
    print(f"{cell.label} ({cell.key}), {steps} iterations an epoch, log_points {train.log_points}")
    print(f"torch {torch.__version__}, threads: {args.threads or torch.get_num_threads()}")
    if args.full:
        result = train_cell(cell.config, dataset, options=options)
        final = result.final
        print(
            f"full run with points: final_train_err {final['final_train_err']:.4f}, "
            f"final_test_err {final['final_test_err']:.4f}, "
            f"points logged {sum(len(p) for p in result.points.values())}"
        )
    seconds = side_by_side(cell, dataset, args.repeats, train.log_points, options)
    for n, values in seconds.items():
        print(f"epoch with log_points {n:>3}: " + ", ".join(f"{v:.3f}" for v in values) + " s")
    on, off = statistics.median(seconds[train.log_points]), statistics.median(seconds[0])
    print(f"median: {on:.3f} s with, {off:.3f} s without: {100 * (on / off - 1):+.2f}%")
    work = extra_work(steps, train.log_points, train.batch_size)
    print(f"the points' own work: {1e3 * work:.3f} ms an epoch = {100 * work / off:.4f}%")
    plain, with_points = logging_cost(train.log_points)
    extra = with_points - plain
    print(
        f"logging an epoch: {1e3 * plain:.1f} ms without points, {1e3 * with_points:.1f} ms "
        f"with: +{1e3 * extra:.1f} ms = {100 * extra / off:.2f}% of the epoch"
    )


if __name__ == "__main__":
    main()

"""The output of ``ablate bench``: a rich table and a headline, or JSON; the command itself.

:func:`command` checks the arguments, times (:func:`~resnet_ablate.bench.step.bench_step` or
:func:`~resnet_ablate.bench.sweep.workers_sweep`) and prints; :func:`show` prints saved results
again::

    python -m resnet_ablate.bench.tables RESULT.json ...  (from ablate bench --json)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from ..device import resolve_device
from ..errors import UserError
from .step import bench_dataset, bench_step, parse_features, parse_model
from .sweep import workers_sweep


def _rate(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def step_table(result: dict[str, Any]) -> Table:
    """The rows of :func:`bench_step` as a table: what each configuration trains per second."""
    c, h, w = result["shape"]
    title = (
        f"{result['model']} ({result['params'] / 1e6:.2f}M params, {result['macs'] / 1e6:.0f}M "
        f"MACs), {result['dataset']} {c}x{h}x{w}, batch {result['batch']}, "
        f"{result['device_name']}, torch {result['torch']}: median of {result['repeats']} x "
        f"{result['steps']} steps after {result['warmup']} warm-up steps"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("config")
    table.add_column("features")
    for column in ("images/s", "spread", "vs standard", "compile/capture s"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        if row["standard"]:
            features = (
                f"DataLoader+PIL ({_plural(result['loader_workers'], 'worker')}), fp32, NCHW, "
                "eager, torch.optim.SGD"
            )
        else:
            features = ", ".join(row["features"])
        if row.get("skipped"):
            reason = f"{features} [dim](skipped: {row['skipped']})[/]"
            table.add_row(row["name"], reason, "[dim]skipped[/]", "", "", "")
            continue
        note = f" [yellow]({row['note']})[/]" if row["note"] else ""
        table.add_row(
            row["name"],
            features + note,
            _rate(row["images_per_second"]),
            f"±{row['spread_pct'] / 2:.0f}%",
            f"{row['ratio']:.2f}x",
            f"{row['setup_seconds']:.1f}",
        )
    return table


def headline(result: dict[str, Any]) -> str:
    best = result["headline"]
    if best is None:
        return "Only the standard loop was timed: no trainer features were asked for."
    return (
        f"{best['name']}: {best['ratio']:.2f}x the standard loop "
        f"({best['images_per_second']:,.0f} vs {best['standard_images_per_second']:,.0f} "
        f"images/s; load average {result['load_average']['before']} before, "
        f"{result['load_average']['after']} after)"
    )


def sweep_table(result: dict[str, Any]) -> Table:
    title = (
        f"{result['model']}, {result['dataset']}, batch {result['batch']}, "
        f"{result['device_name']}: N trainers at once ({result['pack']}, "
        f"{', '.join(result['features'])}), {result['seconds']:g} s each; standard loop "
        f"{result['standard_images_per_second']:,.0f} images/s"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("workers", justify="right")
    for column in ("images/s (all)", "per worker", "vs 1st", "vs standard"):
        table.add_column(column, justify="right")
    for point in result["points"]:
        if point["images_per_second"] is None:
            table.add_row(str(point["workers"]), f"[red]failed[/]: {point['error']}", "", "", "")
            continue
        table.add_row(
            str(point["workers"]),
            _rate(point["images_per_second"]),
            _rate(point["per_worker"]),
            f"{point['scaling']:.2f}x",
            f"{point['ratio']:.2f}x",
        )
    return table


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UserError(f"--workers-sweep {text}: give worker counts of at least 1, e.g. 1,2,4,8")
    return counts


def command(
    *,
    model: str,
    batch: int,
    device: str,
    dataset: str,
    steps: int | None,
    repeats: int | None,
    warmup: int | None,
    features: str | None,
    each: bool,
    loader_workers: int | None,
    workers_sweep_counts: str | None,
    pack: str,
    seconds: float | None,
    as_json: bool,
    out: Console,
    err: Console,
) -> None:
    """`ablate bench`: checks the arguments, times, then prints JSON or a table and a headline."""
    spec = parse_model(model)  # a wrong label fails before anything is loaded
    counts = parse_counts(workers_sweep_counts) if workers_sweep_counts is not None else None
    resolved = resolve_device(device)
    chosen = parse_features(features, resolved)
    data = bench_dataset(dataset)

    def say(message: str) -> None:
        err.print(f"[dim]{message}[/]", highlight=False)

    common = dict(batch=batch, device=resolved, dataset=data, features=chosen, warmup=warmup)
    if counts is not None:
        result = workers_sweep(
            spec,
            counts=counts,
            pack=pack,
            seconds=seconds,
            loader_workers=loader_workers,
            progress=say,
            **common,
        )
    else:
        result = bench_step(
            spec,
            each=each,
            steps=steps,
            repeats=repeats,
            loader_workers=loader_workers,
            progress=say,
            **common,
        )
    if as_json:
        print(json.dumps(result, indent=2))
    elif counts is not None:
        out.print(sweep_table(result))
    else:
        out.print(step_table(result))
        out.print(headline(result), highlight=False)


def show(paths: Sequence[str], console: Console | None = None) -> None:
    """Print the table of each saved `ablate bench --json` result (bench or sweep)."""
    console = console or Console(width=160)
    for path in paths:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        if "points" in result:
            console.print(sweep_table(result))
        else:
            console.print(step_table(result))
            console.print(headline(result), highlight=False)


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(
            "usage: python -m resnet_ablate.bench.tables RESULT.json ...  "
            "(from ablate bench --json)"
        )
        sys.exit(2)
    show(sys.argv[1:])

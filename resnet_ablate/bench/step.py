"""Training images/s of one step: this trainer against the loop a tutorial writes.

Every row trains the same network (same spec, same initial weights) at the same batch size on the
same device, all in this one process:

- **standard loop**: a torchvision ``DataLoader`` over PIL images with ``RandomCrop(padding)`` +
  ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize`` (the pipeline of ``bench/loader.py``),
  ``.to(device)``, fp32, NCHW, eager, ``torch.optim.SGD``: ``zero_grad``, ``backward``, ``step``.
- **this trainer**: the step ``step.build_step`` builds, the one ``train_cell`` trains with
  (``step.GraphStep`` with a CUDA graph, after the process's graph self-check), in a process set
  up by ``device.setup_device`` as ``ablate run`` sets up its workers (cuDNN benchmark mode on a
  GPU: process-wide, so the standard loop has it too, which can only flatter it), with each speed
  feature switchable:

  =============  ===========================================================================
  resident       batches from ``DeviceLoader`` (data on the device, batched pad-crop + flip)
                 instead of the DataLoader above
  bf16           bf16 autocast
  channels_last  channels-last model and batches
  cuda_graph     the whole step replayed as one CUDA graph (fused SGD, device-tensor lr)
  compile        ``torch.compile`` of the model (captured inside the graph when both are on)
  =============  ===========================================================================

The rows add the requested features one at a time, in the order given, so each row shows what one
more feature buys; ``each=True`` also times each feature alone. Timing: warm-up steps first (what
they take beyond steady-state steps is the compile/capture time, reported apart), then ``repeats``
timed runs of ``steps`` steps, the rows' repeats interleaved so that a noisy neighbour slows every
row alike; device-synchronised (CUDA events on a GPU, ``perf_counter`` on a CPU); the median
images/s and the spread (min to max) of the repeats. Speed is measured here, never assumed. The
JSON records the device set-up, and a row whose CUDA graph fell back to eager says so (``step``,
``note``).


N trainers packed onto the device at once are ``bench/sweep.py``'s; the tables and the
``ablate bench`` command are ``bench/tables.py``'s.
"""

from __future__ import annotations

import itertools
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

import torch
from pydantic import ValidationError
from torch import nn

from ..config import Block, DatasetName, DataSpec, ModelSpec, Order, TrainSpec
from ..data import Dataset, DeviceLoader, load_dataset, make_synthetic
from ..device import (
    ExecOptions,
    Runtime,
    device_name,
    resolve_device,
    resolve_runtime,
    setup_device,
)
from ..errors import UserError
from ..models import build_model, describe
from ..step import TAG_STEP, Step, build_step, graph_status
from .loader import standard_loader

FEATURES = ("resident", "bf16", "channels_last", "cuda_graph", "compile")
FEATURE_NAMES = {
    "resident": "resident data",
    "bf16": "bf16",
    "channels_last": "channels_last",
    "cuda_graph": "CUDA graph",
    "compile": "torch.compile",
}
CUDA_ONLY = frozenset({"cuda_graph"})
#: Training images of the generated dataset: enough that epoch ends are rare at batch 128.
SYNTHETIC_IMAGES = 10_000
FAMILIES = {"plain": "none", "res": "identity", "res-proj": "projection"}
Progress = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# What to run: the model, the dataset, the features.


def parse_model(label: str) -> ModelSpec:
    """A CIFAR ModelSpec from a label: `plain-56`, `res-110`, `res-proj-56`, `res-164-bottleneck`,
    `res-110-pre-w32`, or a cell label's words (`res-110 bottleneck pre`).

    FAMILY-DEPTH, then any of a block, a unit order and `w<width>`; UserError otherwise.
    """
    usage = (
        f"--model {label!r}: expected FAMILY-DEPTH[-BLOCK][-ORDER][-wWIDTH], e.g. plain-56, "
        f"res-110, res-164-bottleneck, res-proj-56-pre-w32; families {', '.join(FAMILIES)}; "
        f"blocks {', '.join(get_args(Block))}; orders {', '.join(get_args(Order))}"
    )
    tokens = label.strip().lower().replace(" ", "-").split("-")
    family = "res-proj" if tokens[:2] == ["res", "proj"] else tokens[0]
    rest = tokens[family.count("-") + 1 :]
    if family not in FAMILIES or not rest or not rest[0].isdigit():
        raise UserError(usage)
    fields: dict[str, Any] = {"shortcut": FAMILIES[family], "depth": int(rest[0])}
    for token in rest[1:]:
        if token in get_args(Block):
            fields["block"] = token
        elif token in get_args(Order):
            fields["order"] = token
        elif re.fullmatch(r"w[1-9]\d*", token):
            fields["width"] = int(token[1:])
        else:
            raise UserError(f"{usage} (unknown part {token!r})")
    try:
        return ModelSpec(**fields)
    except ValidationError as err:
        reason = err.errors()[0]["msg"].removeprefix("Value error, ")
        raise UserError(f"--model {label!r}: {reason}") from None


def model_label(spec: ModelSpec) -> str:
    """The short label of a CIFAR spec, the inverse of :func:`parse_model`."""
    label = f"{spec.family}-{spec.depth}"
    if spec.block != "basic":
        label += f"-{spec.block}"
    if spec.order != "post":
        label += f"-{spec.order}"
    return label + (f"-w{spec.width}" if spec.width != 16 else "")


def bench_dataset(name: str, synthetic_images: int = SYNTHETIC_IMAGES) -> Dataset:
    """The named dataset; `synthetic` is generated with `synthetic_images` training images."""
    if name not in get_args(DatasetName):
        raise UserError(f"--dataset {name}: choose {', '.join(get_args(DatasetName))}")
    if name != "synthetic":
        return load_dataset(DataSpec(name=name))
    train, test, classes = make_synthetic(synthetic_images, 10)
    from ..data import channel_stats

    mean, std = channel_stats(train.x)
    return Dataset("synthetic", train, test, None, classes, mean, std, "synthetic (generated)")


def default_features(device: torch.device) -> list[str]:
    """What `ablate run` uses on this device: resident data, plus bf16, channels_last and the
    CUDA graph where the trainer turns them on (torch.compile is opt-in there, so here too)."""
    runtime = resolve_runtime(ExecOptions(device=str(device)))
    chosen = ["resident"]
    chosen += ["bf16"] if runtime.dtype is not None else []
    chosen += ["channels_last"] if runtime.channels_last else []
    chosen += ["cuda_graph"] if runtime.cuda_graph else []
    return chosen


def parse_features(text: str | None, device: torch.device) -> list[str]:
    """`resident,bf16,...` (any order, `-` or `_`) as a list; None or `auto`: the defaults."""
    if text is None or text.strip() == "auto":
        return default_features(device)
    names = [t.strip().replace("-", "_") for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise UserError(
            f"--features: unknown {', '.join(unknown)}; choose from {', '.join(FEATURES)} "
            f"(comma-separated, added in that order) or auto"
        )
    return list(dict.fromkeys(names))


def default_loader_workers(device: torch.device) -> int:
    """DataLoader workers of the standard loop: what a tutorial would pick for this device.

    On a GPU the PIL work must keep pace with the device: up to 8 processes (the issue's
    measurement used 8), one core left to the training process. On a CPU the workers take cores
    from the step itself: a quarter of the cores, none on 2 cores (where 0, 1 and 2 workers ran
    plain-56 equally fast, 152, 148 and 147 images/s, and workers made it erratic whenever other
    work shared the cores).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return min(4, cores // 4)


@dataclass(frozen=True)
class RowSpec:
    """One configuration to time: the standard loop, or the trainer with some features on."""

    name: str
    features: tuple[str, ...] = ()
    standard: bool = False
    skipped: str = ""


def plan_rows(features: Sequence[str], device: torch.device, each: bool = False) -> list[RowSpec]:
    """The standard loop, [each feature alone,] then the features added one at a time; a
    feature this device cannot run becomes one visibly skipped row and stays out of the rest."""
    runnable = [f for f in features if f not in CUDA_ONLY or device.type == "cuda"]
    rows = [RowSpec("standard loop", standard=True)]
    if each and len(runnable) > 1:
        rows += [RowSpec(f"only {FEATURE_NAMES[f]}", (f,)) for f in runnable[1:]]
    rows += [
        RowSpec(f"+ {FEATURE_NAMES[f]}", tuple(runnable[: i + 1])) for i, f in enumerate(runnable)
    ]
    rows += [
        RowSpec(f"+ {FEATURE_NAMES[f]}", (f,), skipped=f"needs CUDA ({device.type} here)")
        for f in features
        if f not in runnable
    ]
    return rows


# --------------------------------------------------------------------------------------------
# Building a row: a model, its optimizer, its batches, and one callable that trains one step.


@dataclass
class Row:
    spec: RowSpec
    run: Callable[[], None]
    settle: int  # untimed steps before each repeat: drains what a DataLoader prefetched
    step: Step | None = None  # the trainer's step (None for the standard loop)
    rates: list[float] = field(default_factory=list)
    warmup_seconds: float = 0.0
    warmup_steps: int = 0


def _runtime(device: torch.device, features: Sequence[str]) -> Runtime:
    return Runtime(
        device=device,
        dtype=torch.bfloat16 if "bf16" in features else None,
        channels_last="channels_last" in features,
        cuda_graph="cuda_graph" in features and device.type == "cuda",
        compile="compile" in features,
    )


def _endless_device(loader: DeviceLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for epoch in itertools.count(1):
        yield from loader.epoch(epoch)


def _endless_loader(
    loader: Any, device: torch.device, channels_last: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """DataLoader batches moved to the device (channels-last if asked), epoch after epoch."""
    while True:
        for x, y in loader:
            x = x.to(device, non_blocking=True)  # (B, C, H, W) float32
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(device, non_blocking=True)


def _model(spec: ModelSpec, dataset: Dataset, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # every row starts from the same weights
    return build_model(spec, dataset.in_channels, dataset.num_classes).to(device)


def _standard_row(
    row: RowSpec, spec: ModelSpec, dataset: Dataset, batch: int, device: torch.device, workers: int
) -> Row:
    """The tutorial's loop: DataLoader+PIL, fp32, NCHW, eager, torch.optim.SGD."""
    hyper = TrainSpec(batch_size=batch)
    model = _model(spec, dataset, device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=hyper.lr, momentum=hyper.momentum, weight_decay=hyper.weight_decay
    )
    criterion = nn.CrossEntropyLoss()
    loader = standard_loader(
        dataset.train, dataset, batch_size=batch, workers=workers, device=device
    )
    batches = _endless_loader(loader, device, channels_last=False)

    def run() -> None:
        x, y = next(batches)
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()

    return Row(row, run, settle=1 + 2 * workers)  # 2: the DataLoader's prefetch per worker


def trainer_row(
    row: RowSpec, spec: ModelSpec, dataset: Dataset, batch: int, device: torch.device, workers: int
) -> Row:
    """`train_cell`'s step (`build_step`) with the row's features, fed as the features say."""
    runtime = _runtime(device, row.features)
    hyper = TrainSpec(batch_size=batch)
    step = build_step(_model(spec, dataset, device), hyper, dataset, runtime)
    if "resident" in row.features:
        loader = DeviceLoader(
            dataset.train,
            batch_size=batch,
            mean=dataset.mean,
            std=dataset.std,
            device=device,
            train=True,
            augment=True,
            channels_last=runtime.channels_last,
        )
        batches, settle = _endless_device(loader), 1
    else:
        data_loader = standard_loader(
            dataset.train, dataset, batch_size=batch, workers=workers, device=device
        )
        batches = _endless_loader(data_loader, device, runtime.channels_last)
        settle = 1 + 2 * workers

    def run() -> None:
        x, y = next(batches)
        step.set_lr(hyper.lr)  # as train_cell does every step (a device-side fill in a graph)
        step(x, y)

    return Row(row, run, settle, step=step)


def _build(
    row: RowSpec, spec: ModelSpec, dataset: Dataset, batch: int, device: torch.device, workers: int
) -> Row:
    make = _standard_row if row.standard else trainer_row
    return make(row, spec, dataset, batch, device, workers)


# --------------------------------------------------------------------------------------------
# Timing.


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls, device work included: CUDA events on a GPU, else a clock."""
    sync(device)
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    return time.perf_counter() - t0


def warm(row: Row, steps: int, device: torch.device) -> None:
    """Run the warm-up steps (compilation and graph capture happen here) and time them."""
    if row.step is not None:  # past the step's own warm-up (eager steps, capture, compiling)
        steps = max(steps, row.step.warmup_steps + 1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        row.run()
    sync(device)
    row.warmup_seconds, row.warmup_steps = time.perf_counter() - t0, steps


def _summary(row: Row, batch: int, baseline: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": row.spec.name,
        "features": list(row.spec.features),
        "standard": row.spec.standard,
    }
    if row.spec.skipped:
        return out | {"images_per_second": None, "skipped": row.spec.skipped}
    median = statistics.median(row.rates)
    setup = max(0.0, row.warmup_seconds - row.warmup_steps * batch / median)
    note = f"ran eagerly: {row.step.fallback}" if row.step is not None and row.step.fallback else ""
    return out | {
        "images_per_second": median,
        "min": min(row.rates),
        "max": max(row.rates),
        "spread_pct": 100.0 * (max(row.rates) - min(row.rates)) / median,
        "repeats": row.rates,
        "ratio": median / baseline if baseline else None,
        "setup_seconds": setup,
        "step": row.step.tags()[TAG_STEP] if row.step is not None else "standard",
        "note": note,
    }


def timing_defaults(
    device: torch.device, steps: int | None, repeats: int | None, warmup: int | None
):
    gpu = device.type == "cuda"
    return (steps or (50 if gpu else 6), repeats or (5 if gpu else 3), warmup or (10 if gpu else 2))


def resolve_args(
    model: str | ModelSpec,
    device: str | torch.device,
    dataset: str | Dataset,
    features: Sequence[str] | str | None,
) -> tuple[ModelSpec, torch.device, Dataset, list[str]]:
    """The benchmark's arguments as objects: names are parsed, objects pass through."""
    spec = parse_model(model) if isinstance(model, str) else model
    device = resolve_device(device) if isinstance(device, str) else device
    data = bench_dataset(dataset) if isinstance(dataset, str) else dataset
    names = features if isinstance(features, str | None) else ",".join(features)
    return spec, device, data, parse_features(names, device)


def bench_step(
    model: str | ModelSpec = "plain-56",
    *,
    batch: int = 128,
    device: str | torch.device = "auto",
    dataset: str | Dataset = "synthetic",
    features: Sequence[str] | str | None = None,
    each: bool = False,
    steps: int | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    loader_workers: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Time the standard loop and the trainer's step, feature by feature; a JSON-ready dict.

    Returns {"model", "params", "macs", "dataset", "shape", "batch", "device", "device_setup"
    (what `setup_device` set), "graph_fallback" (None: no graph row; "": graphs in use; else why
    they were turned off), "rows": [{"name", "features", "images_per_second" (median), "min",
    "max", "spread_pct", "repeats", "ratio" (vs the standard loop), "setup_seconds"
    (compile/capture), "step" (standard, eager or cuda_graph: what ran), "note" | "skipped"}],
    "headline"}.
    """
    say = progress or (lambda message: None)
    spec, device, data, chosen = resolve_args(model, device, dataset, features)
    setup = setup_device(ExecOptions(device=str(device)))
    steps, repeats, warmup = timing_defaults(device, steps, repeats, warmup)
    workers = default_loader_workers(device) if loader_workers is None else loader_workers
    if len(data.train) < batch:
        raise UserError(f"--batch {batch} is larger than the {len(data.train)} training images")
    info = describe(build_model(spec, data.in_channels, data.num_classes), data.train.x.shape[1:])
    load_before = load_average()

    plan = plan_rows(list(chosen), device, each)
    rows = [Row(r, lambda: None, 0) if r.skipped else None for r in plan]
    for i, r in enumerate(plan):
        if not r.skipped:
            say(f"warming up: {r.name}")
            rows[i] = _build(r, spec, data, batch, device, workers)
            warm(rows[i], warmup, device)
    live = [row for row in rows if row is not None and not row.spec.skipped]
    for repeat in range(repeats):
        say(f"repeat {repeat + 1}/{repeats}")
        for row in live:  # interleaved: a busy neighbour slows every row alike
            for _ in range(row.settle):
                row.run()
            row.rates.append(steps * batch / _timed(row.run, steps, device))

    baseline = statistics.median(rows[0].rates)
    summaries = [_summary(row, batch, baseline) for row in rows if row is not None]
    ladder = [s for s in summaries if s["name"].startswith("+") and not s.get("skipped")]
    best = ladder[-1] if ladder else None
    c, h, w = data.train.x.shape[1:]
    return {
        "model": model_label(spec),
        "params": info.params,
        "macs": info.macs,
        "dataset": data.name,
        "shape": [c, h, w],
        "train_images": len(data.train),
        "batch": batch,
        "device": str(device),
        "device_name": device_name(device),
        "device_setup": setup.record(),
        "graph_fallback": graph_status(device),
        "torch": torch.__version__,
        "git_commit": _commit(),
        "loader_workers": workers,
        "steps": steps,
        "repeats": repeats,
        "warmup": warmup,
        "load_average": {"before": load_before, "after": load_average()},
        "rows": summaries,
        "headline": None
        if best is None
        else {
            "name": "this trainer (" + ", ".join(best["features"]) + ")",
            "features": best["features"],
            "images_per_second": best["images_per_second"],
            "standard_images_per_second": baseline,
            "ratio": best["ratio"],
        },
    }


def _commit() -> str:
    """The git commit of the code that made the numbers (`+dirty` when modified), if known."""
    from ..provenance import provenance

    return provenance().get("ablate.git_commit", "")


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None

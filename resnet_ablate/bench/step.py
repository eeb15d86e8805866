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

:func:`workers_sweep` instead packs N trainers (all features on) onto the device at once, either
as ``ablate run --workers N`` does (``pack="processes"``: one process each, GPUs and CPU threads
split by the runner's own rule) or as N models on N CUDA streams of one process
(``pack="streams"``), and reports their aggregate images/s against one standard loop.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import re
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, get_args

import torch
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
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
class _Row:
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
) -> _Row:
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

    return _Row(row, run, settle=1 + 2 * workers)  # 2: the DataLoader's prefetch per worker


def _trainer_row(
    row: RowSpec, spec: ModelSpec, dataset: Dataset, batch: int, device: torch.device, workers: int
) -> _Row:
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

    return _Row(row, run, settle, step=step)


def _build(
    row: RowSpec, spec: ModelSpec, dataset: Dataset, batch: int, device: torch.device, workers: int
) -> _Row:
    make = _standard_row if row.standard else _trainer_row
    return make(row, spec, dataset, batch, device, workers)


# --------------------------------------------------------------------------------------------
# Timing.


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls, device work included: CUDA events on a GPU, else a clock."""
    _sync(device)
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


def _warm(row: _Row, steps: int, device: torch.device) -> None:
    """Run the warm-up steps (compilation and graph capture happen here) and time them."""
    if row.step is not None:  # past the step's own warm-up (eager steps, capture, compiling)
        steps = max(steps, row.step.warmup_steps + 1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        row.run()
    _sync(device)
    row.warmup_seconds, row.warmup_steps = time.perf_counter() - t0, steps


def _summary(row: _Row, batch: int, baseline: float | None) -> dict[str, Any]:
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


def _defaults(device: torch.device, steps: int | None, repeats: int | None, warmup: int | None):
    gpu = device.type == "cuda"
    return (steps or (50 if gpu else 6), repeats or (5 if gpu else 3), warmup or (10 if gpu else 2))


def _resolve(
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
    spec, device, data, chosen = _resolve(model, device, dataset, features)
    setup = setup_device(ExecOptions(device=str(device)))
    steps, repeats, warmup = _defaults(device, steps, repeats, warmup)
    workers = default_loader_workers(device) if loader_workers is None else loader_workers
    if len(data.train) < batch:
        raise UserError(f"--batch {batch} is larger than the {len(data.train)} training images")
    info = describe(build_model(spec, data.in_channels, data.num_classes), data.train.x.shape[1:])
    load_before = _load()

    plan = plan_rows(list(chosen), device, each)
    rows = [_Row(r, lambda: None, 0) if r.skipped else None for r in plan]
    for i, r in enumerate(plan):
        if not r.skipped:
            say(f"warming up: {r.name}")
            rows[i] = _build(r, spec, data, batch, device, workers)
            _warm(rows[i], warmup, device)
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
        "load_average": {"before": load_before, "after": _load()},
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


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# Packing: N trainers on one device at once.


class _Throttle:
    """Keeps the host at most `depth` steps ahead of the GPU without draining its queue."""

    def __init__(self, device: torch.device, depth: int = 8) -> None:
        self.cuda = device.type == "cuda"
        self.events: deque[torch.cuda.Event] = deque()
        self.depth = depth

    def __call__(self) -> None:
        if not self.cuda:
            return
        event = torch.cuda.Event()
        event.record()
        self.events.append(event)
        if len(self.events) > self.depth:
            self.events.popleft().synchronize()


@dataclass(frozen=True)
class _Job:
    spec: ModelSpec
    dataset: Dataset
    batch: int
    device: str
    features: tuple[str, ...]
    warmup: int
    seconds: float
    workers: int


@dataclass(frozen=True)
class Packed:
    """What one packed trainer did: images over [start, end] on the monotonic clock (comparable
    between processes), or the error that stopped it; its process's device set-up."""

    worker: int
    start: float
    end: float
    images: int
    error: str = ""
    setup: dict[str, Any] = field(default_factory=dict)


def _sweep_worker(job: _Job, index: int, ready: Any, results: Any) -> None:
    """One packed trainer, set up as `ablate run` sets up its worker `index` (the runner's
    options for it, then `setup_device`): warm up, wait for the others, step, report."""
    try:
        from ..engine import worker_exec

        options = worker_exec(ExecOptions(device=job.device), index, job.workers)
        setup = setup_device(options)
        device = resolve_device(options.device)
        row = _trainer_row(
            RowSpec("packed", job.features), job.spec, job.dataset, job.batch, device, 0
        )
        _warm(row, job.warmup, device)
        ready.wait(timeout=900)
        images, t0, t1 = _run_for(row, job.seconds, job.batch, device)
        results.put(Packed(index, t0, t1, images, setup=setup.record()))
    except BaseException as err:  # reported by the parent, which must not wait forever
        results.put(Packed(index, 0.0, 0.0, 0, f"{type(err).__name__}: {err}"))


def _run_for(
    row: _Row,
    seconds: float,
    images_per_call: int,
    device: torch.device,
    throttle: Callable[[], None] | None = None,
) -> tuple[int, float, float]:
    """Call `row.run` until `seconds` have passed; (images, start, end) on the monotonic clock
    (comparable between processes), the end taken once the device has finished every step."""
    throttle = throttle or _Throttle(device)
    _sync(device)
    t0 = time.monotonic()
    images = 0
    while time.monotonic() - t0 < seconds:
        row.run()
        throttle()
        images += images_per_call
    _sync(device)
    return images, t0, time.monotonic()


def _packed_processes(job: _Job, n: int) -> list[Packed]:
    """N processes, one trainer each, started together behind a barrier."""
    ctx = mp.get_context("spawn")
    ready, results = ctx.Barrier(n), ctx.Queue()
    job = _Job(**{**job.__dict__, "workers": n})
    processes = [ctx.Process(target=_sweep_worker, args=(job, i, ready, results)) for i in range(n)]
    for process in processes:
        process.start()
    out: list[Packed] = []
    try:
        for _ in range(n):
            out.append(results.get(timeout=900))
            if out[-1].error:
                ready.abort()  # a failed worker must not leave the others at the barrier
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()
    return out


def _packed_streams(job: _Job, n: int) -> list[Packed]:
    """N trainers in this process, each on its own CUDA stream, stepped round-robin (on a CPU
    they simply take turns)."""
    device = resolve_device(job.device)
    streams = [torch.cuda.Stream(device) if device.type == "cuda" else None for _ in range(n)]

    def on(stream: torch.cuda.Stream | None) -> AbstractContextManager[Any]:
        return torch.cuda.stream(stream) if stream is not None else nullcontext()

    rows, throttles = [], []
    for stream in streams:
        with on(stream):
            row = _trainer_row(
                RowSpec("packed", job.features), job.spec, job.dataset, job.batch, device, 0
            )
            _warm(row, job.warmup, device)
        rows.append(row)
        throttles.append(_Throttle(device))

    def round_robin() -> None:
        for stream, row, throttle in zip(streams, rows, throttles, strict=True):
            with on(stream):
                row.run()
                throttle()  # records on this stream

    together = _Row(RowSpec("streams"), round_robin, 0)
    images, t0, t1 = _run_for(together, job.seconds, job.batch * n, device, lambda: None)
    return [Packed(0, t0, t1, images)]


def workers_sweep(
    model: str | ModelSpec = "plain-56",
    *,
    counts: Sequence[int] = (1, 2, 4, 8),
    pack: str = "processes",
    batch: int = 128,
    device: str | torch.device = "auto",
    dataset: str | Dataset = "synthetic",
    features: Sequence[str] | str | None = None,
    seconds: float | None = None,
    warmup: int | None = None,
    loader_workers: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Aggregate images/s of N trainers at once for each N in `counts`, against the standard
    loop (one process, timed as in :func:`bench_step`).

    Returns {"model", "dataset", "batch", "device", "pack", "features", "seconds",
    "standard_images_per_second", "device_setup", "graph_fallback", "points": [{"workers",
    "images_per_second" (aggregate: all images over the span from the first start to the last
    end), "per_worker", "scaling" (vs the first count), "ratio" (vs the standard loop), "error",
    "setups" (each worker process's device set-up; empty for streams: the parent's)}]}.
    """
    if pack not in ("processes", "streams"):
        raise UserError(f"--pack {pack}: choose processes or streams")
    if not counts or min(counts) < 1:
        raise UserError("--workers-sweep: give worker counts of at least 1, e.g. 1,2,4,8")
    say = progress or (lambda message: None)
    spec, device, data, chosen = _resolve(model, device, dataset, features)
    runnable = tuple(f for f in chosen if f not in CUDA_ONLY or device.type == "cuda")
    steps, repeats, warmup = _defaults(device, None, None, warmup)
    seconds = seconds or (8.0 if device.type == "cuda" else 4.0)

    say("timing the standard loop")
    standard = bench_step(
        spec,
        batch=batch,
        device=device,
        dataset=data,
        features=[],
        steps=steps,
        repeats=repeats,
        warmup=warmup,
        loader_workers=loader_workers,
    )
    baseline = standard["rows"][0]["images_per_second"]
    job = _Job(spec, data, batch, str(device), runnable, warmup, seconds, 1)
    points = []
    for n in counts:
        say(f"{n} trainer(s) at once ({pack})")
        results = (_packed_processes if pack == "processes" else _packed_streams)(job, n)
        error = "; ".join(f"worker {r.worker}: {r.error}" for r in results if r.error)
        setups = [r.setup for r in sorted(results, key=lambda r: r.worker) if r.setup]
        if error:
            points.append(
                {"workers": n, "images_per_second": None, "error": error, "setups": setups}
            )
            continue
        span = max(r.end for r in results) - min(r.start for r in results)
        rate = sum(r.images for r in results) / span
        points.append(
            {
                "workers": n,
                "images_per_second": rate,
                "per_worker": rate / n,
                "error": "",
                "setups": setups,
            }
        )
    first = next((p["images_per_second"] for p in points if p["images_per_second"]), None)
    for point in points:
        rate = point["images_per_second"]
        point["scaling"] = rate / first if rate and first else None
        point["ratio"] = rate / baseline if rate else None
    return {
        "model": model_label(spec),
        "dataset": data.name,
        "batch": batch,
        "device": str(device),
        "device_name": device_name(device),
        "device_setup": standard["device_setup"],
        "graph_fallback": graph_status(device),
        "torch": torch.__version__,
        "pack": pack,
        "features": list(runnable),
        "seconds": seconds,
        "standard_images_per_second": baseline,
        "load_average": _load(),
        "points": points,
    }


# --------------------------------------------------------------------------------------------
# Output: a rich table and a headline, or JSON; the `ablate bench` command.


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
            "usage: python -m resnet_ablate.bench.step RESULT.json ...  (from ablate bench --json)"
        )
        sys.exit(2)
    show(sys.argv[1:])

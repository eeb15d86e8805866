"""Packing: N trainers on one device at once, against one standard loop.

:func:`workers_sweep` packs N trainers (all features on) onto the device, either as ``ablate run
--workers N`` does (``pack="processes"``: one process each, GPUs and CPU threads split by the
runner's own rule) or as N models on N CUDA streams of one process (``pack="streams"``), and
reports their aggregate images/s against one standard loop timed as ``bench/step.py`` times it.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ModelSpec
from ..data import Dataset
from ..device import ExecOptions, device_name, resolve_device, setup_device
from ..errors import UserError
from ..step import graph_status
from .step import (
    CUDA_ONLY,
    Progress,
    Row,
    RowSpec,
    bench_step,
    load_average,
    model_label,
    resolve_args,
    sync,
    timing_defaults,
    trainer_row,
    warm,
)


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
        row = trainer_row(
            RowSpec("packed", job.features), job.spec, job.dataset, job.batch, device, 0
        )
        warm(row, job.warmup, device)
        ready.wait(timeout=900)
        images, t0, t1 = _run_for(row, job.seconds, job.batch, device)
        results.put(Packed(index, t0, t1, images, setup=setup.record()))
    except BaseException as err:  # reported by the parent, which must not wait forever
        results.put(Packed(index, 0.0, 0.0, 0, f"{type(err).__name__}: {err}"))


def _run_for(
    row: Row,
    seconds: float,
    images_per_call: int,
    device: torch.device,
    throttle: Callable[[], None] | None = None,
) -> tuple[int, float, float]:
    """Call `row.run` until `seconds` have passed; (images, start, end) on the monotonic clock
    (comparable between processes), the end taken once the device has finished every step."""
    throttle = throttle or _Throttle(device)
    sync(device)
    t0 = time.monotonic()
    images = 0
    while time.monotonic() - t0 < seconds:
        row.run()
        throttle()
        images += images_per_call
    sync(device)
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
            row = trainer_row(
                RowSpec("packed", job.features), job.spec, job.dataset, job.batch, device, 0
            )
            warm(row, job.warmup, device)
        rows.append(row)
        throttles.append(_Throttle(device))

    def round_robin() -> None:
        for stream, row, throttle in zip(streams, rows, throttles, strict=True):
            with on(stream):
                row.run()
                throttle()  # records on this stream

    together = Row(RowSpec("streams"), round_robin, 0)
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
    spec, device, data, chosen = resolve_args(model, device, dataset, features)
    runnable = tuple(f for f in chosen if f not in CUDA_ONLY or device.type == "cuda")
    steps, repeats, warmup = timing_defaults(device, None, None, warmup)
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
        "load_average": load_average(),
        "points": points,
    }

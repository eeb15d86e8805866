"""Train one cell: the schedule, the loop, evaluation, checkpoints, resume and diagnostics.

The loop is the paper's: SGD with momentum and weight decay, the learning rate divided by
``gamma`` at fixed fractions of the run (or a cosine), an optional constant warm-up. What makes
it fast is where the work happens: the data already lives on the device (see ``data.py``), the
step runs in bf16 with channels-last tensors, on a GPU the whole step (forward, backward, SGD
update) is replayed as one CUDA graph (see ``step.py``), and metrics are summed on the device so
an epoch never waits for the host until it ends. Where and how it runs is ``device.py``'s.
"""

from __future__ import annotations

import errno
import io
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import CellConfig, TrainSpec
from .data import Dataset, DeviceLoader, Split
from .device import ExecOptions, Runtime, resolve_runtime
from .models import build_model, main_path_convs
from .step import build_step, load_optimizer_state, plain_optimizer_state

CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------------
# The schedule.


def lr_at(spec: TrainSpec, iteration: int, total: int) -> float:
    """Learning rate for an iteration (0-based) of a run of `total` iterations."""
    if spec.warmup_lr is not None and iteration < spec.warmup_iters:
        return spec.warmup_lr
    if spec.schedule == "constant":
        return spec.lr
    if spec.schedule == "cosine":
        start = spec.warmup_iters if spec.warmup_lr is not None else 0
        span = max(total - start, 1)
        return 0.5 * spec.lr * (1.0 + math.cos(math.pi * (iteration - start) / span))
    drops = sum(iteration >= round(m * total) for m in spec.milestones)
    return spec.lr * spec.gamma**drops


# --------------------------------------------------------------------------------------------
# Results.


@dataclass
class CellResult:
    """What training a cell produced: its state, per-epoch history and diagnostics."""

    status: Literal["finished", "diverged"]
    history: list[dict[str, float]]
    grad_flow: dict[str, Any]
    reason: str = ""
    #: Points within each epoch: epoch (as text) -> `[iteration, loss, error %]` rows.
    points: dict[str, list[list[float]]] = field(default_factory=dict)
    resumed_from: int = 0
    wall_seconds: float = 0.0
    runtime: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        """Summary numbers: final and best errors, time and throughput.

        `mean_images_per_second` is the mean of the epochs' `images_per_second`, each of which
        leaves out the step's warm-up (eager warm-up steps, graph capture, compilation): see
        :class:`SteadyClock`.
        """
        if not self.history:
            return {}
        last = self.history[-1]
        final = {
            "final_train_err": last["train_err"],
            "final_train_loss": last["train_loss"],
            "wall_seconds": self.wall_seconds,
            "epochs_done": float(len(self.history)),
        }
        tested = [h for h in self.history if math.isfinite(h.get("test_err", math.nan))]
        if tested:
            best = min(tested, key=lambda h: h["test_err"])
            final |= {
                "final_test_err": tested[-1]["test_err"],
                "final_test_loss": tested[-1]["test_loss"],
                "best_test_err": best["test_err"],
                "best_test_epoch": best["epoch"],
            }
        validated = [h for h in self.history if math.isfinite(h.get("val_err", math.nan))]
        if validated:
            final |= {
                "final_val_err": validated[-1]["val_err"],
                "best_val_err": min(h["val_err"] for h in validated),
            }
        speeds = [h["images_per_second"] for h in self.history if "images_per_second" in h]
        if speeds:
            final["mean_images_per_second"] = sum(speeds) / len(speeds)
        return final


EpochCallback = Callable[[int, dict[str, float]], None]
#: `on_progress(iteration, metrics)`: a point within an epoch (step = iteration, from 1).
ProgressCallback = Callable[[int, dict[str, float]], None]


# --------------------------------------------------------------------------------------------
# Points within an epoch.

#: The metrics of a point within an epoch: training loss and error (%) over the iterations
#: since the previous point, named apart from the per-epoch `train_loss` / `train_err`
#: (step = epoch) because their step is the iteration.
POINT_KEYS = ("iter_train_loss", "iter_train_err")


def point_marks(steps: int, points: int) -> list[int]:
    """The iterations of an epoch (counted from 1) after which a point is taken: `points` of
    them spread evenly, the last at the epoch's end; every iteration when there are fewer."""
    if points <= 0 or steps <= 0:
        return []
    return sorted({max(1, round(k * steps / points)) for k in range(1, points + 1)})


def epoch_points(
    first_iteration: int, marks: list[int], sums: list[list[float]], batch: int
) -> list[list[float]]:
    """`[iteration, loss, error %]` for each mark of an epoch whose iterations before it number
    `first_iteration`, from the running (loss, wrong) sums taken at each mark: each point is
    the mean over the iterations since the previous one."""
    points, before, previous = [], 0, (0.0, 0.0)
    for mark, (loss_sum, wrong_sum) in zip(marks, sums, strict=True):
        images = (mark - before) * batch
        loss, err = (loss_sum - previous[0]) / images, 100.0 * (wrong_sum - previous[1]) / images
        points.append([float(first_iteration + mark), loss, err])
        before, previous = mark, (loss_sum, wrong_sum)
    return points


def _send_points(on_progress: ProgressCallback, points: list[list[float]]) -> None:
    for iteration, loss, err in points:
        on_progress(int(iteration), dict(zip(POINT_KEYS, (loss, err), strict=True)))


# --------------------------------------------------------------------------------------------
# Timing an epoch.


class SteadyClock:
    """Times an epoch's training for its images/s, leaving out the step's warm-up.

    The first `warmup` steps a step ever trains (eager warm-up steps and graph capture,
    torch.compile's compilation) are no measure of its speed: when step `warmup` of the epoch
    begins, the device is synchronised and the clock restarts, counting only the images from
    there. With no warm-up, or an epoch no longer than it, the whole epoch is timed.
    """

    def __init__(
        self,
        steps: int,
        batch: int,
        warmup: int,
        sync: Callable[[], None],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.steps, self.batch, self.warmup = steps, batch, warmup
        self.sync, self.clock = sync, clock
        self.start, self.images = clock(), steps * batch

    def before_step(self, i: int) -> None:
        """Called before step `i` (0-based) of the epoch."""
        if i == self.warmup and i > 0:
            self.sync()
            self.start, self.images = self.clock(), (self.steps - i) * self.batch

    def images_per_second(self) -> float:
        """Images/s since the clock (re)started; call once the device has finished the epoch."""
        return self.images / (self.clock() - self.start)


# --------------------------------------------------------------------------------------------
# Evaluation and gradient flow.


@torch.no_grad()
def evaluate(model: nn.Module, loader: DeviceLoader, runtime: Runtime) -> tuple[float, float]:
    """(mean loss, error in %) over every example of a split, one host sync at the end."""
    model.eval()
    sums = torch.zeros(2, device=runtime.device, dtype=torch.float64)
    count = 0
    for x, y in loader.epoch(0):
        with runtime.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        wrong = (logits.argmax(dim=1) != y).sum()
        sums += torch.stack([loss.double(), wrong.double()])
        count += y.shape[0]
    model.train()
    loss_sum, wrong_sum = sums.tolist()
    return loss_sum / count, 100.0 * wrong_sum / count


def gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """L2 norm of the loss gradient for each main-path conv weight, input side first.

    One fp32 forward/backward in training mode on a fixed batch; the batch-norm running
    statistics are restored afterwards so the probe leaves training untouched.
    """
    convs = [conv.weight for _, conv in main_path_convs(model)]
    saved = {name: b.clone() for name, b in model.named_buffers()}
    model.train()
    loss = F.cross_entropy(model(x).float(), y)
    grads = torch.autograd.grad(loss, convs)
    norms = torch.stack([g.float().norm() for g in grads]).tolist()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(saved[name])
    return norms


# --------------------------------------------------------------------------------------------
# Checkpoints: tensors and plain data only, written atomically, read with weights_only=True.


class DiskFull(OSError):
    """A write found no space left: the message names the folder, the last checkpoint stays."""

    def __init__(self, folder: Path):
        super().__init__(errno.ENOSPC, f"no space left on {folder}; free some and run again")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` atomically: to a temporary file, then renamed over the last checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    buffer = io.BytesIO()  # serialised first, so that a failed write is a plain OSError
    torch.save(state, buffer)
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise DiskFull(path.parent) from None
        raise
    os.replace(tmp, path)


def load_checkpoint(path: Path, key: str) -> dict[str, Any] | None:
    """The checkpoint of this cell, or None (absent, another cell's, or unreadable).

    A write cut short by a kill leaves only its temporary file (the rename is atomic): those
    are removed here, when the cell starts again, since nothing else would ever read them.
    """
    for orphan in path.parent.glob(f".{path.name}.*.tmp"):
        orphan.unlink(missing_ok=True)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        warnings.warn(
            f"{path}: unreadable checkpoint ({err}); starting the cell again", stacklevel=2
        )
        path.rename(path.with_suffix(".unreadable"))
        return None
    if state.get("version") != CHECKPOINT_VERSION or state.get("key") != key:
        warnings.warn(
            f"{path}: checkpoint of another cell or version; starting again", stacklevel=2
        )
        return None
    return state


# --------------------------------------------------------------------------------------------
# The loop.


def _loader(
    split: Split,
    dataset: Dataset,
    runtime: Runtime,
    *,
    train: bool,
    batch: int,
    augment: bool = False,
    seed: int = 0,
) -> DeviceLoader:
    return DeviceLoader(
        split,
        batch_size=batch,
        mean=dataset.mean,
        std=dataset.std,
        device=runtime.device,
        train=train,
        augment=augment,
        seed=seed,
        channels_last=runtime.channels_last,
    )


def train_cell(
    config: CellConfig,
    dataset: Dataset,
    *,
    key: str = "",
    options: ExecOptions | None = None,
    checkpoint: Path | None = None,
    on_epoch: EpochCallback | None = None,
    on_progress: ProgressCallback | None = None,
    max_epochs: int | None = None,
) -> CellResult:
    """Train one cell to the end (or to divergence), resuming from `checkpoint` if it exists.

    `on_epoch(epoch, metrics)` is called after each epoch's checkpoint is on disk, and on resume
    once for every epoch the checkpoint already holds (so a tracker can fill any gap).
    `on_progress(iteration, metrics)` gets the epoch's points within it (``train.log_points``
    of them, :data:`POINT_KEYS`) just before its `on_epoch`, and on resume with it. The points
    are snapshots of the step's device sums, read with the epoch's one host sync.
    `max_epochs` stops early (tuning trials) without changing the schedule's length.
    The result's `runtime` and `tags` say what actually ran (eager when a graph fell back).
    """
    runtime = resolve_runtime(options or ExecOptions())
    spec = config.train
    on_epoch = on_epoch or (lambda epoch, metrics: None)
    on_progress = on_progress or (lambda iteration, metrics: None)
    torch.manual_seed(config.seed)
    model = build_model(config.model, dataset.in_channels, dataset.num_classes)

    train_loader = _loader(
        dataset.train,
        dataset,
        runtime,
        train=True,
        batch=spec.batch_size,
        augment=config.data.augment,
        seed=config.seed,
    )
    eval_batch = 1024 if runtime.device.type == "cuda" else 500
    evals = {"test": _loader(dataset.test, dataset, runtime, train=False, batch=eval_batch)}
    if dataset.val is not None:
        evals["val"] = _loader(dataset.val, dataset, runtime, train=False, batch=eval_batch)
    probe_n = min(spec.batch_size, dataset.train.y.shape[0])
    probe = next(
        _loader(
            Split(dataset.train.x[:probe_n], dataset.train.y[:probe_n]),
            dataset,
            runtime,
            train=False,
            batch=probe_n,
        ).epoch(0)
    )

    history: list[dict[str, float]] = []
    points: dict[str, list[list[float]]] = {}  # epoch -> [iteration, loss, error %] rows
    grad_flow: dict[str, Any] = {
        "layers": [name for name, _ in main_path_convs(model)],
        "epochs": {},
        "when": {},
    }
    start_epoch, elapsed = 0, 0.0
    state = load_checkpoint(checkpoint, key) if checkpoint else None
    if state is not None:
        model.load_state_dict(state["model"])  # before the graph self-check: the same state
    step = build_step(model, spec, dataset, runtime)
    runtime = step.runtime  # without the graph when this process has turned it off
    if state is not None:
        load_optimizer_state(step.optimizer, state["optimizer"])
        history, grad_flow = state["history"], state["grad_flow"]
        start_epoch, elapsed = state["epoch"], state["elapsed"]
        points = state.get("points", {})
        torch.set_rng_state(state["rng_cpu"])
        for record in history:
            _send_points(on_progress, points.get(str(int(record["epoch"])), []))
            on_epoch(int(record["epoch"]), record)
    else:
        grad_flow["epochs"]["1"] = gradient_norms(model, *probe)
        grad_flow["when"]["1"] = "initialisation (before the first step)"

    steps_per_epoch = len(train_loader)
    total_iters = steps_per_epoch * spec.epochs
    last_epoch = min(spec.epochs, max_epochs or spec.epochs)
    images = steps_per_epoch * spec.batch_size
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    marks = point_marks(steps_per_epoch, spec.log_points)
    # (points, 2): the step's running sums at each mark, copied on the device (no host sync).
    snapshots = torch.zeros(len(marks), 2, device=runtime.device, dtype=step.sums.dtype)

    status, reason = "finished", ""
    for epoch in range(start_epoch + 1, last_epoch + 1):
        t0 = time.perf_counter()
        warmup = step.warmup_steps if epoch == start_epoch + 1 else 0
        clock = SteadyClock(steps_per_epoch, spec.batch_size, warmup, sync)
        model.train()
        step.sums.zero_()
        iteration = (epoch - 1) * steps_per_epoch
        lr = spec.lr
        mark = 0
        for i, (x, y) in enumerate(train_loader.epoch(epoch)):
            clock.before_step(i)
            lr = lr_at(spec, iteration + i, total_iters)
            step.set_lr(lr)
            step(x, y)
            if mark < len(marks) and i + 1 == marks[mark]:
                snapshots[mark].copy_(step.sums)
                mark += 1
        loss_sum, wrong_sum = step.sums.tolist()  # the epoch's one host sync
        sync()
        if marks:
            sums = snapshots.tolist()
            points[str(epoch)] = epoch_points(iteration, marks, sums, spec.batch_size)
            _send_points(on_progress, points[str(epoch)])
        metrics = {
            "epoch": float(epoch),
            "train_loss": loss_sum / images,
            "train_err": 100.0 * wrong_sum / images,
            "lr": lr,
            "images_per_second": clock.images_per_second(),
        }
        if not math.isfinite(loss_sum):
            status = "diverged"
            reason = f"training loss became {loss_sum} in epoch {epoch} (lr {lr:g})"
            metrics["epoch_seconds"] = time.perf_counter() - t0
            history.append(metrics)
            elapsed += metrics["epoch_seconds"]
            on_epoch(epoch, metrics)
            break
        for name, loader in evals.items():
            metrics[f"{name}_loss"], metrics[f"{name}_err"] = evaluate(model, loader, runtime)
        if epoch == spec.epochs:
            grad_flow["epochs"][str(epoch)] = gradient_norms(model, *probe)
            grad_flow["when"][str(epoch)] = "end of training"
        metrics["epoch_seconds"] = time.perf_counter() - t0
        elapsed += metrics["epoch_seconds"]
        history.append(metrics)
        if checkpoint is not None:
            save_checkpoint(
                checkpoint,
                {
                    "version": CHECKPOINT_VERSION,
                    "key": key,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": plain_optimizer_state(step.optimizer),
                    "history": history,
                    "points": points,
                    "grad_flow": grad_flow,
                    "rng_cpu": torch.get_rng_state(),
                    "elapsed": elapsed,
                },
            )
        on_epoch(epoch, metrics)

    return CellResult(
        status=status,
        history=history,
        grad_flow=grad_flow,
        reason=reason,
        points=points,
        resumed_from=start_epoch,
        wall_seconds=elapsed,
        runtime=step.ran.describe(),
        tags=step.tags(),
    )

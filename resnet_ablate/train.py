"""Train one cell: the step, the schedule, evaluation, checkpoints, resume and diagnostics.

The loop is the paper's: SGD with momentum and weight decay, the learning rate divided by
``gamma`` at fixed fractions of the run (or a cosine), an optional constant warm-up. What makes
it fast is where the work happens: the data already lives on the device (see ``data.py``), the
step runs in bf16 with channels-last tensors, on a GPU the whole step (forward, backward, SGD
update) is replayed as one CUDA graph, and metrics are summed on the device so an epoch never
waits for the host until it ends.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import CellConfig, TrainSpec
from .data import Dataset, DeviceLoader, Split
from .models import build_model, main_path_convs

Precision = Literal["auto", "bf16", "fp32"]
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Where and how to run: execution settings, not part of what a cell computes.


@dataclass(frozen=True)
class ExecOptions:
    """Execution settings: they change speed, never what a cell is (not in its key)."""

    device: str = "auto"
    precision: Precision = "auto"
    channels_last: bool | None = None  # None: wherever bf16 runs or on CUDA
    cuda_graph: bool = True
    compile: bool = False
    threads: int | None = None


@dataclass(frozen=True)
class Runtime:
    """ExecOptions resolved against the machine."""

    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    channels_last: bool
    cuda_graph: bool
    compile: bool

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype is torch.bfloat16 else "fp32"

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype is None:
            return nullcontext()
        # The autocast weight cache must be off while a CUDA graph is captured.
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=not self.cuda_graph)

    def describe(self) -> str:
        features = [self.precision] + [
            name
            for name, on in (
                ("channels_last", self.channels_last),
                ("cuda_graph", self.cuda_graph),
                ("compile", self.compile),
            )
            if on
        ]
        return f"{device_name(self.device)} ({', '.join(features)})"


def resolve_device(name: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from .errors import UserError

        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


@cache
def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_runtime(options: ExecOptions) -> Runtime:
    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    if device.type == "cuda":
        # Small-channel convolutions vary most in speed between cuDNN's algorithms; the
        # benchmark picks during the eager warm-up steps, before any graph is captured.
        torch.backends.cudnn.benchmark = True
    if options.precision == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        dtype = torch.bfloat16 if fast else None
    else:
        dtype = torch.bfloat16 if options.precision == "bf16" else None
    channels_last = (
        options.channels_last
        if options.channels_last is not None
        else device.type == "cuda" or dtype is not None
    )
    return Runtime(
        device=device,
        dtype=dtype,
        channels_last=channels_last,
        cuda_graph=options.cuda_graph and device.type == "cuda",
        compile=options.compile,
    )


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
    resumed_from: int = 0
    wall_seconds: float = 0.0
    runtime: str = ""
    tags: dict[str, str] = field(default_factory=dict)  # what actually ran, set on the run

    @property
    def final(self) -> dict[str, float]:
        """Summary numbers: final and best errors, time and throughput."""
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


# --------------------------------------------------------------------------------------------
# The step: eager, or one CUDA graph.


class Step:
    """One training step that sums loss and errors into device tensors (no host sync)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime):
        self.model, self.optimizer, self.runtime = model, optimizer, runtime
        # (2,): summed loss and wrong predictions since the last reset.
        self.sums = torch.zeros(2, device=runtime.device, dtype=torch.float32)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.runtime.autocast():
            logits = self.model(x)  # (B, classes)
            loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        wrong = (logits.argmax(dim=1) != y).sum()
        self.sums += torch.stack([loss.detach() * y.shape[0], wrong.float()])

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._forward_backward(x, y)


class GraphStep(Step):
    """The whole step (forward, backward, SGD update, metric sums) replayed as one CUDA graph.

    The learning rate lives in a device tensor that the fused SGD reads, so the schedule still
    applies to a captured graph. A few eager warm-up steps (real training steps) come first, as
    capture needs allocated optimizer state; if capture fails we warn and stay eager.
    """

    WARMUP_STEPS = 3

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime):
        super().__init__(model, optimizer, runtime)
        self.lr = optimizer.param_groups[0]["lr"]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        self.eager_steps = 0
        self.failed = False

    def set_lr(self, lr: float) -> None:
        self.lr.fill_(lr)  # a device-side fill: no host sync

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.failed:
            return self._forward_backward(x, y)
        if self.graph is None and self.eager_steps < self.WARMUP_STEPS:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._forward_backward(x, y)
            torch.cuda.current_stream().wait_stream(stream)
            self.eager_steps += 1
            return None
        if self.graph is None:
            self._capture(x, y)
            if self.graph is None:
                return self._forward_backward(x, y)
        assert self.static is not None
        self.static[0].copy_(x)
        self.static[1].copy_(y)
        self.graph.replay()
        return None

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        static = (x.clone(), y.clone())
        graph = torch.cuda.CUDAGraph()
        try:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                self._forward_backward(*static)
        except Exception as err:  # capture is an optimisation: fall back, never crash
            torch.cuda.synchronize()
            warnings.warn(
                f"CUDA graph capture failed ({type(err).__name__}: {err}); training eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            self.failed = True
            return
        self.graph, self.static = graph, static


def make_optimizer(model: nn.Module, spec: TrainSpec, runtime: Runtime) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay; fused with a device-tensor lr for CUDA graphs."""
    common = dict(momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=spec.nesterov)
    if runtime.cuda_graph:
        lr = torch.tensor(spec.lr, device=runtime.device, dtype=torch.float32)
        return torch.optim.SGD(model.parameters(), lr=lr, fused=True, **common)
    return torch.optim.SGD(model.parameters(), lr=spec.lr, foreach=True, **common)


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


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, key: str) -> dict[str, Any] | None:
    """The checkpoint of this cell, or None (absent, another cell's, or unreadable)."""
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


@dataclass
class _Loop:
    config: CellConfig
    dataset: Dataset
    runtime: Runtime
    key: str
    checkpoint: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    grad_flow: dict[str, Any] = field(default_factory=dict)
    elapsed: float = 0.0


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
    max_epochs: int | None = None,
) -> CellResult:
    """Train one cell to the end (or to divergence), resuming from `checkpoint` if it exists.

    `on_epoch(epoch, metrics)` is called after each epoch's checkpoint is on disk, and on resume
    once for every epoch the checkpoint already holds (so a tracker can fill any gap).
    `max_epochs` stops early (tuning trials) without changing the schedule's length.
    """
    runtime = resolve_runtime(options or ExecOptions())
    spec = config.train
    on_epoch = on_epoch or (lambda epoch, metrics: None)
    torch.manual_seed(config.seed)

    model = build_model(config.model, dataset.in_channels, dataset.num_classes)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, spec, runtime)

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
    grad_flow: dict[str, Any] = {
        "layers": [name for name, _ in main_path_convs(model)],
        "epochs": {},
        "when": {},
    }
    start_epoch, elapsed = 0, 0.0
    state = load_checkpoint(checkpoint, key) if checkpoint else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if runtime.cuda_graph:  # fused SGD reads the lr from a device tensor
            lr = torch.tensor(spec.lr, device=runtime.device)
            for group in optimizer.param_groups:
                group["lr"] = lr
        history, grad_flow = state["history"], state["grad_flow"]
        start_epoch, elapsed = state["epoch"], state["elapsed"]
        torch.set_rng_state(state["rng_cpu"])
        for record in history:
            on_epoch(int(record["epoch"]), record)
    else:
        grad_flow["epochs"]["1"] = gradient_norms(model, *probe)
        grad_flow["when"]["1"] = "initialisation (before the first step)"

    compiled = torch.compile(model) if runtime.compile else model
    step: Step = (GraphStep if runtime.cuda_graph else Step)(compiled, optimizer, runtime)
    steps_per_epoch = len(train_loader)
    total_iters = steps_per_epoch * spec.epochs
    last_epoch = min(spec.epochs, max_epochs or spec.epochs)
    images = steps_per_epoch * spec.batch_size
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)

    status, reason = "finished", ""
    for epoch in range(start_epoch + 1, last_epoch + 1):
        t0 = time.perf_counter()
        model.train()
        step.sums.zero_()
        iteration = (epoch - 1) * steps_per_epoch
        lr = spec.lr
        for i, (x, y) in enumerate(train_loader.epoch(epoch)):
            lr = lr_at(spec, iteration + i, total_iters)
            step.set_lr(lr)
            step(x, y)
        loss_sum, wrong_sum = step.sums.tolist()  # the epoch's one host sync
        sync()
        train_seconds = time.perf_counter() - t0
        metrics = {
            "epoch": float(epoch),
            "train_loss": loss_sum / images,
            "train_err": 100.0 * wrong_sum / images,
            "lr": lr,
            "images_per_second": images / train_seconds,
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
                    "optimizer": _plain_optimizer_state(optimizer),
                    "history": history,
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
        resumed_from=start_epoch,
        wall_seconds=elapsed,
        runtime=runtime.describe(),
    )


def _plain_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with a device-tensor lr stored as a float."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
    return state

"""Train one cell: the step, the schedule, evaluation, checkpoints, resume and diagnostics.

The loop is the paper's: SGD with momentum and weight decay, the learning rate divided by
``gamma`` at fixed fractions of the run (or a cosine), an optional constant warm-up. What makes
it fast is where the work happens: the data already lives on the device (see ``data.py``), the
step runs in bf16 with channels-last tensors, on a GPU the whole step (forward, backward, SGD
update) is replayed as one CUDA graph, and metrics are summed on the device so an epoch never
waits for the host until it ends.

The CUDA graph checks itself: before the first graph cell of a process, a few steps run both
eagerly and as a graph from the same state (:func:`graph_self_check`); a disagreement, or a
capture that fails at any time, turns the graph off for the process with one warning, and the
result's tags say what actually ran (:data:`TAG_STEP`, :data:`TAG_GRAPH_FALLBACK`).
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
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
Batch = tuple[torch.Tensor, torch.Tensor]  # x (B, C, H, W) float, y (B,) int64
CHECKPOINT_VERSION = 1
#: Run tags (CellResult.tags) that say what actually ran: `cuda_graph` or `eager`, and, when a
#: requested CUDA graph was turned off, the one-line reason; `ablate.device` as Runtime.describe.
TAG_STEP = "ablate.step"
TAG_GRAPH_FALLBACK = "ablate.graph_fallback"
TAG_DEVICE = "ablate.device"


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
    from .errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
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


@dataclass(frozen=True)
class DeviceSetup:
    """The process-wide settings for training on a device: what :func:`setup_device` sets."""

    device: str
    cuda_device: int | None  # torch.cuda.set_device(this); None: the current device stays
    cudnn_benchmark: bool | None  # torch.backends.cudnn.benchmark; None: untouched (no CUDA)
    threads: int | None  # torch.set_num_threads(this); None: torch's own choice stays

    def apply(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.cuda_device is not None:
            torch.cuda.set_device(self.cuda_device)
        if self.cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = self.cudnn_benchmark

    def record(self) -> dict[str, Any]:
        """What was set, and the thread count in effect: for a benchmark's JSON."""
        return asdict(self) | {"threads_in_effect": torch.get_num_threads()}


def plan_device(device: torch.device, threads: int | None = None) -> DeviceSetup:
    """The settings for `device`: on CUDA, that GPU as the process's current device (`cuda:N`:
    the runner spreads workers round-robin, and streams, graphs and their capture pools are
    made on the current device) and cuDNN's benchmark mode (small-channel convolutions vary
    most between its algorithms; it picks during the eager warm-up steps, before any capture).
    `threads` (the runner's share of a CPU's cores per worker) wherever given."""
    cuda = device.type == "cuda"
    return DeviceSetup(
        device=str(device),
        cuda_device=device.index if cuda else None,
        cudnn_benchmark=True if cuda else None,
        threads=threads,
    )


def setup_device(options: ExecOptions) -> DeviceSetup:
    """Set this process up for `options.device` (see :func:`plan_device`); the one place that
    does, for `ablate run`, `ablate tune` and `ablate bench` alike. Idempotent."""
    setup = plan_device(resolve_device(options.device), options.threads)
    setup.apply()
    return setup


def resolve_runtime(options: ExecOptions) -> Runtime:
    """Set the device up (:func:`setup_device`) and resolve the options against it."""
    setup_device(options)
    device = resolve_device(options.device)
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


# --------------------------------------------------------------------------------------------
# The optimizer. Where a CUDA graph replays the step, the learning rate is a device tensor that
# fused SGD reads, so the schedule reaches a captured graph: made here, filled by Step.set_lr,
# kept by load_optimizer_state, stored as a float by plain_optimizer_state.


def make_optimizer(model: nn.Module, spec: TrainSpec, runtime: Runtime) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay; fused with a device-tensor lr for CUDA graphs."""
    common = dict(momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=spec.nesterov)
    if runtime.cuda_graph:
        lr = torch.tensor(spec.lr, device=runtime.device, dtype=torch.float32)
        return torch.optim.SGD(model.parameters(), lr=lr, fused=True, **common)
    return torch.optim.SGD(model.parameters(), lr=spec.lr, foreach=True, **common)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer state (momentum buffers) and keep this run's own choices in
    every param group: a checkpoint written in another mode (eager, on a CPU) holds
    `foreach=True` and a float lr, which would make fused SGD read a float (or call `.item()` on
    the device lr) and break the capture. The hyper-parameters are the cell's either way."""
    chosen = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, chosen, strict=True):
        group.update(settings)


def plain_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with a device-tensor lr stored as a float."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
    return state


# --------------------------------------------------------------------------------------------
# The step: eager, or one CUDA graph.


class Step:
    """One eager training step that sums loss and errors into device tensors (no host sync).

    `model` is the module trained (its state is what a checkpoint saves); `net` is what the
    step calls (the model, or its torch.compile wrapper). `fallback` says why a CUDA graph that
    was asked for is not used ("" when it is, or when none was asked for).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        runtime: Runtime,
        net: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.model, self.optimizer, self.runtime = model, optimizer, runtime
        self.net = net if net is not None else model
        self.fallback = ""
        # (2,): summed loss and wrong predictions since the last reset.
        self.sums = torch.zeros(2, device=runtime.device, dtype=torch.float32)

    @property
    def uses_graph(self) -> bool:
        return False

    @property
    def warmup_steps(self) -> int:
        """The first steps that are not steady-state speed (compilation happens in the first)."""
        return 1 if self.runtime.compile else 0

    @property
    def ran(self) -> Runtime:
        """The runtime that actually trains: without the CUDA graph when it fell back."""
        return replace(self.runtime, cuda_graph=self.uses_graph)

    def tags(self) -> dict[str, str]:
        """What actually ran, as run tags (see TAG_STEP, TAG_GRAPH_FALLBACK, TAG_DEVICE)."""
        tags = {
            TAG_STEP: "cuda_graph" if self.uses_graph else "eager",
            TAG_DEVICE: self.ran.describe(),
        }
        if self.fallback:
            tags[TAG_GRAPH_FALLBACK] = self.fallback
        return tags

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)  # a device-side fill: no host sync, seen by a graph
            else:
                group["lr"] = lr

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.runtime.autocast():
            logits = self.net(x)  # (B, classes)
            loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        wrong = (logits.argmax(dim=1) != y).sum()
        self.sums += torch.stack([loss.detach() * y.shape[0], wrong.float()])

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._forward_backward(x, y)


@contextmanager
def restored_stream(
    current: Callable[[], Any] = torch.cuda.current_stream,
    use: Callable[[Any], None] = torch.cuda.set_stream,
) -> Iterator[None]:
    """Make the stream that is current on entry current again on exit, even when the body
    fails: torch's graph context ends a failed capture without restoring the stream it
    replaced, and every later kernel would then queue on the dead capture stream."""
    previous = current()
    try:
        yield
    finally:
        use(previous)


class GraphStep(Step):
    """The whole step (forward, backward, SGD update, metric sums) replayed as one CUDA graph.

    The learning rate lives in a device tensor that the fused SGD reads, so the schedule still
    applies to a captured graph. A few eager warm-up steps (real training steps) come first, as
    capture needs allocated optimizer state. The capture is thread-local (a DataLoader's
    pin-memory thread may touch CUDA meanwhile) and on this step's own side stream; if it fails,
    the step trains eagerly from then on, `fallback` says why, and the graph is turned off for
    the process (one warning).
    """

    WARMUP_STEPS = 3

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        runtime: Runtime,
        net: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__(model, optimizer, runtime, net)
        self.side = torch.cuda.Stream(runtime.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: Batch | None = None
        self.eager_steps = 0

    @property
    def uses_graph(self) -> bool:
        return not self.fallback

    @property
    def warmup_steps(self) -> int:
        return self.WARMUP_STEPS + 1  # the eager warm-up steps and the capture

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.fallback:
            return self._forward_backward(x, y)
        if self.graph is None and self.eager_steps < self.WARMUP_STEPS:
            current = torch.cuda.current_stream(self.runtime.device)
            self.side.wait_stream(current)
            with torch.cuda.stream(self.side):
                self._forward_backward(x, y)
            current.wait_stream(self.side)
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
        device = self.runtime.device
        static = (x.clone(), y.clone())
        graph = torch.cuda.CUDAGraph()
        try:
            with restored_stream(lambda: torch.cuda.current_stream(device)):
                self.optimizer.zero_grad(set_to_none=True)
                with torch.cuda.graph(graph, stream=self.side, capture_error_mode="thread_local"):
                    self._forward_backward(*static)
        except Exception as err:  # capture is an optimisation: fall back, never crash
            _synchronize_quietly(device)
            self.fallback = f"CUDA graph capture failed ({one_line(err)})"
            turn_graph_off(device, self.fallback)
            return
        self.graph, self.static = graph, static


def one_line(err: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, at most `limit` characters: for tags and warnings."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _synchronize_quietly(device: torch.device) -> None:
    try:
        torch.cuda.synchronize(device)
    except Exception as err:  # the failure is reported already; a second error adds nothing
        warnings.warn(f"after a failed CUDA graph capture: {one_line(err)}", stacklevel=2)


def build_step(model: nn.Module, spec: TrainSpec, dataset: Dataset, runtime: Runtime) -> Step:
    """The training step that `ablate run` trains with and `ablate bench` times.

    Moves `model` to the device (channels-last where asked), makes the optimizer (fused, with a
    device-tensor lr, where the graph is used), wraps the model in torch.compile where asked and
    returns a GraphStep or a Step. Where the runtime asks for a CUDA graph, the process's
    verdict on graphs for this device comes first (:func:`graph_verdict`, which runs
    :func:`graph_self_check` with this model and dataset the first time): if the graph is off,
    the step is built eagerly, with the reason in `step.fallback`.
    """
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    fallback = ""
    if runtime.cuda_graph:
        fallback = graph_verdict(
            runtime.device, lambda: graph_self_check(model, spec, dataset, runtime)
        )
        runtime = replace(runtime, cuda_graph=not fallback)
    optimizer = make_optimizer(model, spec, runtime)
    net = torch.compile(model) if runtime.compile else model
    step = (GraphStep if runtime.cuda_graph else Step)(model, optimizer, runtime, net)
    step.fallback = fallback
    return step


# --------------------------------------------------------------------------------------------
# The graph's self-check, and the process's verdict on graphs: checked once per process and
# device, turned off at the first failure with one warning.

#: Steps of the self-check: the graph step's eager warm-up, its capture (and first replay), and
#: two more replays.
SELF_CHECK_STEPS = GraphStep.WARMUP_STEPS + 3
#: Tolerances of the self-check. Both ways run the same kernels on the same batches from the
#: same state, so they differ only by the reduction order of cuDNN's non-deterministic
#: algorithms (a bf16 rounding is 0.4%): each step's loss within 2% of the eager one, and the
#: final weights (and, apart, the buffers) within 5% of how far the eager steps moved them. A
#: graph that replays a stale batch or a stale learning rate misses by far more (on a CPU check
#: of ResNet-8: a stale lr puts the weights 31% of their update off, a stale batch 209%).
SELF_CHECK_LOSS_RTOL = 0.02
SELF_CHECK_STATE_RTOL = 0.05

_graph_verdicts: dict[str, str] = {}  # device -> "" (the graph may be used) or why it may not


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def graph_status(device: torch.device) -> str | None:
    """This process's verdict on CUDA graphs for `device`: "" (in use), the reason they are
    off, or None when no graph was asked for yet."""
    return _graph_verdicts.get(_device_key(device))


def turn_graph_off(device: torch.device, reason: str) -> None:
    """Train eagerly on `device` for the rest of this process; warn the first time only."""
    key = _device_key(device)
    if _graph_verdicts.get(key):
        return
    _graph_verdicts[key] = reason
    warnings.warn(
        f"CUDA graph turned off for this process on {key}: {reason}. Training goes on eagerly "
        f"(the same arithmetic, slower); runs record this in their {TAG_GRAPH_FALLBACK} tag.",
        RuntimeWarning,
        stacklevel=2,
    )


def graph_verdict(device: torch.device, check: Callable[[], str]) -> str:
    """Why this process may not use a CUDA graph on `device`, or "" when it may. The first
    call per device runs `check` ("" or a reason; an exception is a reason too)."""
    key = _device_key(device)
    if key not in _graph_verdicts:
        _graph_verdicts[key] = ""
        try:
            reason = check()
        except Exception as err:
            reason = f"the graph self-check raised {one_line(err)}"
        if reason:
            turn_graph_off(device, reason)
    return _graph_verdicts[key]


def graph_self_check(model: nn.Module, spec: TrainSpec, dataset: Dataset, runtime: Runtime) -> str:
    """Train two copies of `model` for SELF_CHECK_STEPS steps from its current state on the same
    training batches, one eagerly and one as a CUDA graph, with the same optimizer (fused, device
    lr) and a learning rate that changes every step; "" when they agree, else why not.

    Without torch.compile: the check is of the graph, and compiling twice would cost minutes.
    """
    batches = _check_batches(dataset, runtime, spec.batch_size, SELF_CHECK_STEPS)
    if not batches:
        return ""  # no full batch: nothing would be captured either
    lrs = [spec.lr * (0.5 if i % 2 else 1.0) for i in range(len(batches))]
    plain = replace(runtime, compile=False)
    eager_model, graph_model = copy.deepcopy(model), copy.deepcopy(model)
    eager = Step(eager_model, make_optimizer(eager_model, spec, plain), plain)
    graph = GraphStep(graph_model, make_optimizer(graph_model, spec, plain), plain)
    reason = compare_to_eager(eager, graph, batches, lrs)
    return graph.fallback or reason  # after a failed capture the steps agree, eagerly


def compare_to_eager(
    eager: Step, graph: Step, batches: Sequence[Batch], lrs: Sequence[float]
) -> str:
    """Train `eager` and `graph` (each on its own model, from the same state) step by step on
    the same batches at the same learning rates; "" when every step's loss agrees within
    SELF_CHECK_LOSS_RTOL, and the final weights, and apart the buffers (whose running statistics
    move far more and hardly with the learning rate), within SELF_CHECK_STATE_RTOL of how far the
    eager steps moved them; else what differed, in one line."""
    start = _float_state(eager.model)
    for i, ((x, y), lr) in enumerate(zip(batches, lrs, strict=True), start=1):
        a, b = (_loss_of_one_step(step, x, y, lr) for step in (eager, graph))
        finite = math.isfinite(a) and math.isfinite(b)
        if (finite and abs(b - a) > SELF_CHECK_LOSS_RTOL * abs(a)) or (
            not finite and math.isfinite(a) != math.isfinite(b)
        ):
            return (
                f"self-check: step {i} loss {b:.6g} with the graph, {a:.6g} eagerly "
                f"(tolerance {SELF_CHECK_LOSS_RTOL:.0%})"
            )
    after, other = _float_state(eager.model), _float_state(graph.model)
    weights = {name for name, _ in eager.model.named_parameters()}
    for what, names in (
        ("weights", [k for k in start if k in weights]),
        ("buffers", [k for k in start if k not in weights]),  # batch-norm statistics
    ):
        moved = math.sqrt(sum(float((after[k] - start[k]).norm()) ** 2 for k in names))
        gaps = {k: float((other[k] - after[k]).norm()) for k in names}
        gap = math.sqrt(sum(g**2 for g in gaps.values()))
        if math.isfinite(moved) and not gap <= SELF_CHECK_STATE_RTOL * moved:
            worst = max(gaps, key=lambda k: gaps[k])
            share = f"{gap / moved:.1%}" if moved > 0 else "all"
            return (
                f"self-check: after {len(batches)} steps the {what} differ by {share} of the "
                f"eager update (tolerance {SELF_CHECK_STATE_RTOL:.0%}; most in {worst})"
            )
    return ""


def _loss_of_one_step(step: Step, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
    step.sums.zero_()
    step.set_lr(lr)
    step(x, y)
    return float(step.sums[0]) / y.shape[0]


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the floating-point weights and buffers (batch-norm statistics) of a model."""
    return {
        k: v.detach().float().clone()
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    }


def _check_batches(dataset: Dataset, runtime: Runtime, batch: int, n: int) -> list[Batch]:
    """`n` full batches of the first training images, in order, unaugmented (cycled when the
    set holds fewer); none when it holds no full batch."""
    split = Split(dataset.train.x[: n * batch], dataset.train.y[: n * batch])
    loader = DeviceLoader(
        split,
        batch_size=batch,
        mean=dataset.mean,
        std=dataset.std,
        device=runtime.device,
        train=False,
        channels_last=runtime.channels_last,
    )
    full = [(x, y) for x, y in loader.epoch(0) if y.shape[0] == batch]
    return [full[i % len(full)] for i in range(n)] if full else []


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
    The result's `runtime` and `tags` say what actually ran (eager when a graph fell back).
    """
    runtime = resolve_runtime(options or ExecOptions())
    spec = config.train
    on_epoch = on_epoch or (lambda epoch, metrics: None)
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
        torch.set_rng_state(state["rng_cpu"])
        for record in history:
            on_epoch(int(record["epoch"]), record)
    else:
        grad_flow["epochs"]["1"] = gradient_norms(model, *probe)
        grad_flow["when"]["1"] = "initialisation (before the first step)"

    steps_per_epoch = len(train_loader)
    total_iters = steps_per_epoch * spec.epochs
    last_epoch = min(spec.epochs, max_epochs or spec.epochs)
    images = steps_per_epoch * spec.batch_size
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)

    status, reason = "finished", ""
    for epoch in range(start_epoch + 1, last_epoch + 1):
        t0 = time.perf_counter()
        warmup = step.warmup_steps if epoch == start_epoch + 1 else 0
        clock = SteadyClock(steps_per_epoch, spec.batch_size, warmup, sync)
        model.train()
        step.sums.zero_()
        iteration = (epoch - 1) * steps_per_epoch
        lr = spec.lr
        for i, (x, y) in enumerate(train_loader.epoch(epoch)):
            clock.before_step(i)
            lr = lr_at(spec, iteration + i, total_iters)
            step.set_lr(lr)
            step(x, y)
        loss_sum, wrong_sum = step.sums.tolist()  # the epoch's one host sync
        sync()
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
        runtime=step.ran.describe(),
        tags=step.tags(),
    )

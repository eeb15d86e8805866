"""The training step, eager or one CUDA graph, and the process's check of the graph.

The step runs in bf16 with channels-last tensors where the runtime says so, sums loss and errors
on the device (no host sync), and on a GPU is replayed as one CUDA graph: forward, backward and
the fused SGD update, with the learning rate in a device tensor the schedule fills.
:func:`build_step` makes it, for ``ablate run`` and ``ablate bench`` alike.

The CUDA graph checks itself: before the first graph cell of a process, a few steps run both
eagerly and as a graph from the same state (:func:`graph_self_check`); a disagreement, or a
capture that fails at any time, turns the graph off for the process with one warning, and the
result's tags say what actually ran (:data:`TAG_STEP`, :data:`TAG_GRAPH_FALLBACK`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainSpec
from .data import Dataset, DeviceLoader, Split
from .device import Runtime

Batch = tuple[torch.Tensor, torch.Tensor]  # x (B, C, H, W) float, y (B,) int64
#: Run tags (CellResult.tags) that say what actually ran: `cuda_graph` or `eager`, and, when a
#: requested CUDA graph was turned off, the one-line reason; `ablate.device` as Runtime.describe.
TAG_STEP = "ablate.step"
TAG_GRAPH_FALLBACK = "ablate.graph_fallback"
TAG_DEVICE = "ablate.device"


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

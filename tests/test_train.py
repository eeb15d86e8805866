"""The training engine: schedule, learning, divergence, checkpoints and resume, and the logic of
the GPU path that runs without a GPU (device set-up, optimizer state across modes, the graph's
self-check and fallback, timing). What needs CUDA itself is in test_cuda.py."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import warnings

import pytest
import torch

from resnet_ablate.config import CellConfig, DataSpec, ModelSpec, TrainSpec
from resnet_ablate.data import DeviceLoader, load_dataset
from resnet_ablate.device import (
    ExecOptions,
    Runtime,
    plan_device,
    resolve_device,
    resolve_runtime,
    setup_device,
)
from resnet_ablate.errors import UserError
from resnet_ablate.models import build_model, main_path_convs
from resnet_ablate.step import (
    SELF_CHECK_STEPS,
    TAG_DEVICE,
    TAG_GRAPH_FALLBACK,
    TAG_STEP,
    Step,
    build_step,
    compare_to_eager,
    graph_status,
    graph_verdict,
    load_optimizer_state,
    make_optimizer,
    plain_optimizer_state,
    restored_stream,
    turn_graph_off,
)
from resnet_ablate.train import (
    POINT_KEYS,
    SteadyClock,
    gradient_norms,
    load_checkpoint,
    lr_at,
    point_marks,
    train_cell,
)

CPU = ExecOptions(device="cpu")
#: Where a test checks a threshold, the precision is pinned: bf16 is used only where the CPU
#: has it, and a threshold must not depend on that.
FP32 = ExecOptions(device="cpu", precision="fp32")
#: fp32 on the CPU: bit-reproducible, so two equal steps agree exactly.
CPU_FP32 = Runtime(torch.device("cpu"), None, channels_last=False, cuda_graph=False, compile=False)


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset(DataSpec(name="synthetic"))


def tiny(**train) -> CellConfig:
    return CellConfig(
        data=DataSpec(name="synthetic"),
        model=ModelSpec(depth=8, width=8, shortcut="identity"),
        train=TrainSpec(**{"epochs": 3, "batch_size": 64, "lr": 0.05, **train}),
        seed=0,
    )


def test_step_schedule_drops_at_milestones():
    spec = TrainSpec(lr=0.1, milestones=(0.5, 0.75), gamma=0.1)
    assert lr_at(spec, 0, 1000) == pytest.approx(0.1)
    assert lr_at(spec, 499, 1000) == pytest.approx(0.1)
    assert lr_at(spec, 500, 1000) == pytest.approx(0.01)
    assert lr_at(spec, 750, 1000) == pytest.approx(0.001)


def test_warmup_then_schedule():
    spec = TrainSpec(lr=0.1, warmup_lr=0.01, warmup_iters=400)
    assert lr_at(spec, 0, 64000) == 0.01 and lr_at(spec, 399, 64000) == 0.01
    assert lr_at(spec, 400, 64000) == pytest.approx(0.1)


def test_cosine_goes_from_lr_to_zero():
    spec = TrainSpec(lr=0.2, schedule="cosine")
    assert lr_at(spec, 0, 100) == pytest.approx(0.2)
    assert lr_at(spec, 50, 100) == pytest.approx(0.1)
    assert lr_at(spec, 100, 100) == pytest.approx(0.0, abs=1e-12)


def test_precision_follows_the_request():
    assert resolve_runtime(ExecOptions(device="cpu", precision="fp32")).dtype is None
    bf16 = resolve_runtime(ExecOptions(device="cpu", precision="bf16"))
    assert bf16.dtype is torch.bfloat16 and bf16.channels_last
    assert not bf16.cuda_graph  # graphs are a CUDA feature


@pytest.mark.slow
def test_training_learns_and_records_every_epoch(synthetic, tmp_path):
    seen = []
    result = train_cell(
        tiny(),
        synthetic,
        key="k",
        options=FP32,
        checkpoint=tmp_path / "c.pt",
        on_epoch=lambda epoch, metrics: seen.append(epoch),
    )
    assert result.status == "finished"
    assert seen == [1, 2, 3]
    first, last = result.history[0], result.history[-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["test_err"] < 60.0  # chance is 90%
    for record in result.history:
        assert {
            "train_loss",
            "train_err",
            "test_loss",
            "test_err",
            "lr",
            "epoch_seconds",
            "images_per_second",
        } <= set(record)
    final = result.final
    assert final["final_test_err"] == last["test_err"]
    assert final["best_test_err"] == min(h["test_err"] for h in result.history)
    layers = result.grad_flow["layers"]
    assert len(layers) == 7  # depth 8: every conv but the classifier
    assert result.tags == {TAG_STEP: "eager", TAG_DEVICE: result.runtime}  # what ran, no fallback
    assert "cuda_graph" not in result.runtime
    assert set(result.grad_flow["epochs"]) == {"1", "3"}
    assert all(n > 0 and math.isfinite(n) for n in result.grad_flow["epochs"]["1"])


#: Timings differ from run to run; every other number must be equal to the last bit.
TIMINGS = ("epoch_seconds", "images_per_second", "wall_seconds", "mean_images_per_second")


@pytest.mark.slow
def test_resume_continues_exactly_where_it_stopped(synthetic, tmp_path):
    config = tiny(epochs=3, milestones=(0.5,))
    whole_checkpoint = tmp_path / "whole.pt"
    whole = train_cell(config, synthetic, key="k", options=CPU, checkpoint=whole_checkpoint)

    checkpoint = tmp_path / "cell.pt"
    part = train_cell(config, synthetic, key="k", options=CPU, checkpoint=checkpoint, max_epochs=2)
    assert [h["epoch"] for h in part.history] == [1, 2]
    assert not list(tmp_path.glob(".*tmp"))  # written atomically
    replayed, points = [], []
    rest = train_cell(
        config,
        synthetic,
        key="k",
        options=CPU,
        checkpoint=checkpoint,
        on_epoch=lambda epoch, metrics: replayed.append(epoch),
        on_progress=lambda iteration, metrics: points.append((iteration, metrics)),
    )
    assert rest.resumed_from == 2
    assert replayed == [1, 2, 3]  # the gap-filling replay, then the new epoch
    # The points within the epochs come back with them, then continue: no gap, no repeat.
    steps = len(synthetic.train.y) // 64
    marks = point_marks(steps, 20)
    assert [i for i, _ in points] == [(e - 1) * steps + m for e in (1, 2, 3) for m in marks]
    assert rest.points["1"] == part.points["1"] and rest.points["2"] == part.points["2"]
    for a, b in zip(whole.points["3"], rest.points["3"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)  # the resumed epoch trains as the whole run's
    assert [h["epoch"] for h in rest.history] == [1, 2, 3]
    for a, b in zip(whole.history, rest.history, strict=True):
        assert {k: v for k, v in a.items() if k not in TIMINGS} == {
            k: v for k, v in b.items() if k not in TIMINGS
        }
    assert rest.grad_flow == whole.grad_flow
    assert {k: v for k, v in rest.final.items() if k not in TIMINGS} == {
        k: v for k, v in whole.final.items() if k not in TIMINGS
    }
    resumed, uninterrupted = (
        torch.load(p, weights_only=True) for p in (checkpoint, whole_checkpoint)
    )
    assert resumed["model"].keys() == uninterrupted["model"].keys()
    for name, tensor in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name  # the final weights, exactly


def test_checkpoint_holds_plain_data_only(synthetic, tmp_path):
    checkpoint = tmp_path / "cell.pt"
    train_cell(tiny(epochs=1), synthetic, key="abc", options=CPU, checkpoint=checkpoint)
    state = torch.load(checkpoint, weights_only=True)  # no code can run from a checkpoint
    assert state["key"] == "abc" and state["epoch"] == 1
    assert load_checkpoint(checkpoint, "abc") is not None
    with pytest.warns(UserWarning, match="another cell"):
        assert load_checkpoint(checkpoint, "other") is None


def test_truncated_checkpoint_starts_again(synthetic, tmp_path):
    checkpoint = tmp_path / "cell.pt"
    checkpoint.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable"):
        result = train_cell(tiny(epochs=1), synthetic, key="k", options=CPU, checkpoint=checkpoint)
    assert result.resumed_from == 0 and result.status == "finished"


def test_divergence_is_a_result_not_a_crash(synthetic):
    # A channel with zero spread normalises to inf: the loss is non-finite from the first step.
    broken = dataclasses.replace(synthetic, std=(0.0, *synthetic.std[1:]))
    result = train_cell(tiny(epochs=3), broken, key="k", options=CPU)
    assert result.status == "diverged"
    assert "training loss became nan in epoch 1" in result.reason
    assert len(result.history) == 1 and not math.isfinite(result.history[0]["train_loss"])


def test_gradient_probe_leaves_training_state_untouched(synthetic):
    model = build_model(ModelSpec(depth=14, width=8, shortcut="none"), 3, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = synthetic.train.x[:32].float() / 255
    norms = gradient_norms(model, x, synthetic.train.y[:32])
    assert len(norms) == len(main_path_convs(model)) == 13
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------------------
# The device set-up: one place, for `ablate run` and `ablate bench`.


def test_device_plan_sets_the_gpu_of_a_worker_and_cudnn_benchmark_only_on_cuda():
    worker = plan_device(torch.device("cuda:1"))  # the runner's round-robin gives cuda:N
    assert (worker.cuda_device, worker.cudnn_benchmark, worker.threads) == (1, True, None)
    assert plan_device(torch.device("cuda")).cuda_device is None  # the current device stays
    cpu = plan_device(torch.device("cpu"), threads=2)
    assert (cpu.cuda_device, cpu.cudnn_benchmark, cpu.threads) == (None, None, 2)


def test_setup_device_applies_the_threads_and_records_them():
    before = torch.get_num_threads()
    try:
        setup = setup_device(ExecOptions(device="cpu", threads=1))
        assert torch.get_num_threads() == 1
        assert setup.record() == {
            "device": "cpu",
            "cuda_device": None,
            "cudnn_benchmark": None,
            "threads": 1,
            "threads_in_effect": 1,
        }
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
@pytest.mark.parametrize(
    ("name", "says"), [("cuda:1", "CUDA is not available"), ("gpu0", "choose auto, cpu")]
)
def test_a_device_that_cannot_be_used_is_one_clear_error(name, says):
    with pytest.raises(UserError, match=says):
        resolve_device(name)


# --------------------------------------------------------------------------------------------
# The optimizer across modes: a checkpoint written eagerly (or on a CPU) resumed for a graph.

GRAPH_ON_CPU = dataclasses.replace(CPU_FP32, cuda_graph=True)  # the graph path's optimizer


def _one_sgd_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(8, 3, 16, 16)).sum().backward()
    optimizer.step()


def test_a_checkpoint_from_another_mode_keeps_this_runs_optimizer_choices():
    spec = TrainSpec(lr=0.1)
    torch.manual_seed(0)
    eager_model = build_model(ModelSpec(depth=8, width=4), 3, 10)
    eager = make_optimizer(eager_model, spec, CPU_FP32)
    _one_sgd_step(eager_model, eager)
    buffer = io.BytesIO()
    torch.save(plain_optimizer_state(eager), buffer)  # as a checkpoint holds it
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["param_groups"][0]["foreach"] is True

    graph_model = copy.deepcopy(eager_model)
    graph = make_optimizer(graph_model, spec, GRAPH_ON_CPU)
    lr = graph.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and graph.param_groups[0]["fused"] is True
    plain = make_optimizer(copy.deepcopy(eager_model), spec, GRAPH_ON_CPU)
    plain.load_state_dict(saved)  # what torch alone does: the eager checkpoint's flags win
    assert plain.param_groups[0]["foreach"] and not isinstance(
        plain.param_groups[0]["lr"], torch.Tensor
    )

    load_optimizer_state(graph, saved)
    (group,) = graph.param_groups
    assert group["fused"] is True and not group["foreach"]
    assert group["lr"] is lr  # the very tensor a captured graph reads
    for p_graph, p_eager in zip(graph_model.parameters(), eager_model.parameters(), strict=True):
        assert torch.equal(
            graph.state[p_graph]["momentum_buffer"], eager.state[p_eager]["momentum_buffer"]
        )
    step = Step(graph_model, graph, GRAPH_ON_CPU)
    step.set_lr(0.02)
    assert lr.item() == pytest.approx(0.02)  # the schedule still reaches it


def test_a_graph_checkpoint_resumed_eagerly_gets_a_float_lr_and_foreach():
    spec = TrainSpec(lr=0.1)
    model = build_model(ModelSpec(depth=8, width=4), 3, 10)
    graph = make_optimizer(model, spec, GRAPH_ON_CPU)
    _one_sgd_step(model, graph)
    saved = plain_optimizer_state(graph)
    assert isinstance(saved["param_groups"][0]["lr"], float)
    eager = make_optimizer(model, spec, CPU_FP32)
    load_optimizer_state(eager, saved)
    assert eager.param_groups[0]["foreach"] is True and not eager.param_groups[0]["fused"]
    assert eager.param_groups[0]["lr"] == 0.1


# --------------------------------------------------------------------------------------------
# The graph's self-check, tested on the CPU with steps that differ from the eager one as a
# broken graph would: a stale learning rate, a stale batch, a wrong loss.


class StaleLr(Step):
    """Keeps the first learning rate it is given, as a graph that captured a float lr would."""

    def set_lr(self, lr: float) -> None:
        if not hasattr(self, "_first"):
            self._first = lr
        super().set_lr(self._first)


class StaleBatch(Step):
    """Trains on its first batch every time, as a graph that never copies its input would."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not hasattr(self, "_batch"):
            self._batch = (x.clone(), y.clone())
        super().__call__(*self._batch)


class WrongLoss(Step):
    """Trains right but sums a loss 5% too high."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__call__(x, y)
        self.sums[0] *= 1.05


@pytest.fixture
def check_batches(synthetic):
    loader = DeviceLoader(
        synthetic.train, batch_size=32, mean=synthetic.mean, std=synthetic.std, train=False
    )
    batches = [b for _, b in zip(range(SELF_CHECK_STEPS), loader.epoch(0), strict=False)]
    lrs = [0.1 * (0.5 if i % 2 else 1.0) for i in range(len(batches))]
    return batches, lrs


def _pair(kind: type[Step]) -> tuple[Step, Step]:
    torch.manual_seed(0)
    model = build_model(ModelSpec(depth=8, width=8, shortcut="identity"), 3, 10)
    spec = TrainSpec(lr=0.1)
    twin = copy.deepcopy(model)
    eager = Step(model, make_optimizer(model, spec, CPU_FP32), CPU_FP32)
    return eager, kind(twin, make_optimizer(twin, spec, CPU_FP32), CPU_FP32)


def test_the_self_check_accepts_a_step_that_trains_alike(check_batches):
    assert compare_to_eager(*_pair(Step), *check_batches) == ""


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        (StaleLr, "the weights differ by"),
        (StaleBatch, "step 2 loss"),
        (WrongLoss, "step 1 loss"),
    ],
)
def test_the_self_check_names_a_step_that_differs(check_batches, kind, says):
    reason = compare_to_eager(*_pair(kind), *check_batches)
    assert reason.startswith("self-check: ") and says in reason
    assert "\n" not in reason  # one line: it becomes a tag


@pytest.fixture
def fresh_verdicts(monkeypatch):
    """This process's verdicts on CUDA graphs, empty for the test and restored after it."""
    monkeypatch.setattr("resnet_ablate.step._graph_verdicts", {})


def test_the_verdict_is_checked_once_and_a_failure_warns_once(fresh_verdicts):
    cpu, calls = torch.device("cpu"), []

    def check() -> str:
        calls.append(1)
        return "self-check: step 4 loss 3 with the graph, 2 eagerly (tolerance 2%)"

    assert graph_status(cpu) is None
    with pytest.warns(RuntimeWarning, match="CUDA graph turned off for this process on cpu"):
        reason = graph_verdict(cpu, check)
    assert reason.startswith("self-check: step 4") and graph_status(cpu) == reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would fail here
        assert graph_verdict(cpu, check) == reason
        turn_graph_off(cpu, "CUDA graph capture failed (another reason)")
    assert calls == [1] and graph_status(cpu) == reason


def test_a_passing_verdict_stays_until_a_capture_fails(fresh_verdicts):
    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert graph_verdict(cpu, lambda: "") == ""
    with pytest.warns(RuntimeWarning, match="capture failed"):
        turn_graph_off(cpu, "CUDA graph capture failed (RuntimeError: x)")
    assert graph_verdict(cpu, lambda: "") == "CUDA graph capture failed (RuntimeError: x)"


def test_a_self_check_that_raises_turns_the_graph_off_with_the_reason(fresh_verdicts):
    def check() -> str:
        raise RuntimeError("CUDA error: an illegal memory access\nmore lines")

    with pytest.warns(RuntimeWarning):
        reason = graph_verdict(torch.device("cpu"), check)
    assert (
        reason == "the graph self-check raised RuntimeError: CUDA error: an illegal memory access"
    )


def test_build_step_falls_back_to_eager_and_tags_why(synthetic, fresh_verdicts):
    # A graph asked for where none can be made (no CUDA): the self-check fails, the step is
    # eager, and its tags and description say so.
    model = build_model(ModelSpec(depth=8, width=8), 3, 10)
    with pytest.warns(RuntimeWarning, match="CUDA graph turned off"):
        step = build_step(model, TrainSpec(batch_size=32), synthetic, GRAPH_ON_CPU)
    assert type(step) is Step and not step.uses_graph
    assert step.optimizer.param_groups[0]["foreach"] is True  # the eager optimizer
    assert step.fallback.startswith("the graph self-check raised")
    assert step.tags()[TAG_STEP] == "eager"
    assert step.tags()[TAG_GRAPH_FALLBACK] == step.fallback
    assert "cuda_graph" not in step.tags()[TAG_DEVICE] == step.ran.describe()


def test_build_step_moves_the_model_and_makes_the_eager_optimizer():
    model = build_model(ModelSpec(depth=8, width=8), 3, 10)
    runtime = dataclasses.replace(CPU_FP32, channels_last=True)
    step = build_step(model, TrainSpec(lr=0.05), load_dataset(DataSpec(name="synthetic")), runtime)
    assert step.model is model and step.net is model and step.fallback == ""
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    (group,) = step.optimizer.param_groups
    assert group["foreach"] is True and group["lr"] == 0.05


def test_restored_stream_puts_back_the_stream_a_failed_capture_left_current():
    class Streams:  # stands for torch.cuda's current stream: an explicit object here
        current = "default"

    def use(stream: str) -> None:
        Streams.current = stream

    with pytest.raises(RuntimeError), restored_stream(lambda: Streams.current, use):
        use("capture")  # torch.cuda.graph makes its stream current, then the capture fails
        raise RuntimeError("operation not permitted when stream is capturing")
    assert Streams.current == "default"


# --------------------------------------------------------------------------------------------
# Timing: images/s leave out the step's warm-up.


class FakeClock:
    def __init__(self, *times: float) -> None:
        self.times, self.synced = list(times), 0

    def __call__(self) -> float:
        return self.times.pop(0)

    def sync(self) -> None:
        self.synced += 1


def test_images_per_second_leave_out_the_warmup_steps():
    clock = FakeClock(0.0, 5.0, 9.0)  # start; step 4 begins at 5 s; the epoch ends at 9 s
    timer = SteadyClock(steps=10, batch=4, warmup=4, sync=clock.sync, clock=clock)
    for i in range(10):
        timer.before_step(i)
    assert timer.images_per_second() == 6 * 4 / 4.0  # steps 4..9 in 4 s
    assert clock.synced == 1  # the device finished the warm-up before the clock restarted


@pytest.mark.parametrize("warmup", [0, 12])
def test_without_a_warmup_or_with_a_short_epoch_the_whole_epoch_is_timed(warmup):
    clock = FakeClock(0.0, 8.0)
    timer = SteadyClock(steps=10, batch=4, warmup=warmup, sync=clock.sync, clock=clock)
    for i in range(10):
        timer.before_step(i)
    assert timer.images_per_second() == 40 / 8.0 and clock.synced == 0


# --------------------------------------------------------------------------------------------
# Points within an epoch (He et al. 2015, Fig. 6: error against iterations).


def test_point_marks_spread_evenly_and_end_at_the_epoch_end():
    assert point_marks(100, 4) == [25, 50, 75, 100]
    assert point_marks(93, 20)[-1] == 93 and len(point_marks(93, 20)) == 20
    assert point_marks(5, 20) == [1, 2, 3, 4, 5]  # fewer iterations than points: every one
    assert point_marks(100, 0) == [] and point_marks(0, 5) == []


@pytest.mark.slow
def test_points_within_epochs_add_up_to_the_epoch_and_change_nothing(synthetic):
    seen: list[tuple[int, dict[str, float]]] = []
    config = tiny(epochs=2, log_points=4)
    result = train_cell(
        config, synthetic, options=CPU, on_progress=lambda i, m: seen.append((i, m))
    )
    silent = train_cell(tiny(epochs=2, log_points=0), synthetic, options=CPU)
    # Recording points touches neither the training nor the per-epoch record.
    strip = ("epoch_seconds", "images_per_second")
    for a, b in zip(result.history, silent.history, strict=True):
        assert {k: v for k, v in a.items() if k not in strip} == {
            k: v for k, v in b.items() if k not in strip
        }
    assert silent.points == {}

    iterations = [i for i, _ in seen]
    per_epoch = len(iterations) // 2
    assert per_epoch == 4 and iterations == sorted(set(iterations))  # each iteration once
    steps = iterations[per_epoch - 1]  # the first epoch's last point is at its end
    assert steps == len(synthetic.train.y) // 64
    assert iterations == [(e - 1) * steps + m for e in (1, 2) for m in point_marks(steps, 4)]
    assert {k for _, m in seen for k in m} == set(POINT_KEYS)
    for epoch, record in enumerate(result.history, start=1):
        mine = seen[(epoch - 1) * per_epoch : epoch * per_epoch]
        starts = [(epoch - 1) * steps] + [i for i, _ in mine]
        widths = [i - before for (i, _), before in zip(mine, starts, strict=False)]
        total = sum(widths)
        # The points are means over their stretch: weighted, they give the epoch's mean.
        err = sum(w * m["iter_train_err"] for w, (_, m) in zip(widths, mine, strict=True))
        loss = sum(w * m["iter_train_loss"] for w, (_, m) in zip(widths, mine, strict=True))
        err, loss = err / total, loss / total
        assert err == pytest.approx(record["train_err"], abs=1e-6)
        assert loss == pytest.approx(record["train_loss"], rel=1e-5)
    # Training learns within the first epoch: its last stretch beats its first.
    assert seen[per_epoch - 1][1]["iter_train_loss"] < seen[0][1]["iter_train_loss"]

"""The GPU path where CUDA exists: the CUDA graph trains like the eager step and says what ran,
its self-check passes for a real model and catches a broken graph, the points within epochs
are read from the graph's sums, a failed capture falls back
once and leaves the stream as it was, a checkpoint from a CPU resumes into a graph, the device
set-up picks the worker's GPU, and the bench's graph rows capture even when a pinned DataLoader
feeds them. Every test here needs CUDA and is skipped, with that reason, without it;
`scripts/gpu_check.sh` runs this module on a GPU. The logic that does not need CUDA is tested
on the CPU in test_train.py and test_bench.py.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from resnet_ablate.bench.step import bench_step
from resnet_ablate.bench.sweep import workers_sweep
from resnet_ablate.config import CellConfig, DataSpec, ModelSpec, TrainSpec
from resnet_ablate.data import load_dataset
from resnet_ablate.device import ExecOptions, resolve_runtime, setup_device
from resnet_ablate.models import build_model
from resnet_ablate.step import (
    SELF_CHECK_STEPS,
    TAG_GRAPH_FALLBACK,
    TAG_STEP,
    GraphStep,
    Step,
    _check_batches,
    build_step,
    compare_to_eager,
    graph_self_check,
    graph_status,
    make_optimizer,
)
from resnet_ablate.train import point_marks, train_cell

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the GPU path"),
]
CUDA = torch.device("cuda")
GRAPH = ExecOptions(device="cuda")
TINY = "plain-8-w4"


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    """Each test starts as a new process would: no verdict on CUDA graphs yet."""
    monkeypatch.setattr("resnet_ablate.step._graph_verdicts", {})


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset(DataSpec(name="synthetic"))


@pytest.fixture(scope="module")
def small():
    return load_dataset(DataSpec(name="synthetic", train_subset=256))


def tiny(**train_fields) -> CellConfig:
    return CellConfig(
        data=DataSpec(name="synthetic"),
        model=ModelSpec(depth=8, width=8, shortcut="identity"),
        train=TrainSpec(**{"epochs": 2, "batch_size": 64, "lr": 0.05, **train_fields}),
        seed=0,
    )


def _rows(result: dict) -> dict[str, dict]:
    return {row["name"]: row for row in result["rows"]}


def _fallbacks(caught: list[warnings.WarningMessage]) -> list[str]:
    """The warnings that turned the CUDA graph off."""
    return [str(w.message) for w in caught if "CUDA graph turned off" in str(w.message)]


# --------------------------------------------------------------------------------------------
# Training with the graph.


def test_a_graph_cell_trains_as_a_graph_and_says_so(synthetic):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_cell(tiny(), synthetic, key="k", options=GRAPH)
    assert not _fallbacks(caught)
    assert result.status == "finished"
    assert result.tags[TAG_STEP] == "cuda_graph" and TAG_GRAPH_FALLBACK not in result.tags
    assert "cuda_graph" in result.runtime
    assert graph_status(CUDA) == ""  # the self-check ran and passed
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert all(h["images_per_second"] > 0 for h in result.history)


def test_cuda_graph_matches_eager(synthetic):
    config = tiny(epochs=2)
    fp32 = dict(device="cuda", precision="fp32", channels_last=False)
    eager = train_cell(config, synthetic, key="k", options=ExecOptions(**fp32, cuda_graph=False))
    with torch.backends.cudnn.flags(deterministic=True, benchmark=False):
        graph = train_cell(config, synthetic, key="k", options=ExecOptions(**fp32))
    assert eager.tags[TAG_STEP] == "eager" and graph.tags[TAG_STEP] == "cuda_graph"
    for a, b in zip(eager.history, graph.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=2e-2)
        assert a["lr"] == pytest.approx(b["lr"])


def test_points_within_epochs_from_the_graph_add_up_to_its_epochs(synthetic):
    """The points are snapshots of the graph's static sums, taken between replays: each
    epoch's points, weighted by their stretch, give that epoch's training error, and the
    first points (taken during the eager warm-up and the capture) are in place too."""
    seen: list[tuple[int, dict[str, float]]] = []
    result = train_cell(
        tiny(log_points=8), synthetic, options=GRAPH, on_progress=lambda i, m: seen.append((i, m))
    )
    assert result.tags[TAG_STEP] == "cuda_graph"
    steps = len(synthetic.train.y) // 64
    marks = point_marks(steps, 8)
    assert marks[0] <= GraphStep.WARMUP_STEPS + 1  # a point falls inside the warm-up
    assert [i for i, _ in seen] == [(e - 1) * steps + m for e in (1, 2) for m in marks]
    for epoch, record in enumerate(result.history, start=1):
        mine = seen[(epoch - 1) * len(marks) : epoch * len(marks)]
        widths = [b - a for a, b in zip([0, *marks], marks, strict=False)]
        err = sum(w * m["iter_train_err"] for w, (_, m) in zip(widths, mine, strict=True))
        assert err / steps == pytest.approx(record["train_err"], abs=1e-4)
        assert all(0.0 <= m["iter_train_err"] <= 100.0 for _, m in mine)


def test_a_cpu_checkpoint_resumes_into_a_graph(synthetic, tmp_path):
    config, checkpoint = tiny(epochs=3), tmp_path / "cell.pt"
    cpu = ExecOptions(device="cpu")
    train_cell(config, synthetic, key="k", options=cpu, checkpoint=checkpoint, max_epochs=1)
    written = torch.load(checkpoint, weights_only=True)["optimizer"]["param_groups"][0]
    assert written["foreach"] is True and isinstance(written["lr"], float)  # the eager mode's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rest = train_cell(config, synthetic, key="k", options=GRAPH, checkpoint=checkpoint)
    assert not _fallbacks(caught)  # the capture did not fail on the checkpoint's flags
    assert rest.resumed_from == 1 and [h["epoch"] for h in rest.history] == [1, 2, 3]
    assert rest.tags[TAG_STEP] == "cuda_graph" and TAG_GRAPH_FALLBACK not in rest.tags


# --------------------------------------------------------------------------------------------
# The self-check and the fallback.


def test_the_self_check_passes_for_a_real_model(synthetic):
    runtime = resolve_runtime(GRAPH)
    model = build_model(ModelSpec(depth=20, width=16), 3, 10).to(CUDA)
    model.to(memory_format=torch.channels_last)
    before = copy.deepcopy(model.state_dict())
    assert graph_self_check(model, TrainSpec(batch_size=64), synthetic, runtime) == ""
    for name, value in model.state_dict().items():  # it trained copies, not the model
        assert torch.equal(value, before[name]), name


class StaleInputGraph(GraphStep):
    """Replays without copying the new batch in: the graph bug the self-check must catch."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        super().__call__(x, y)


def test_the_self_check_catches_a_graph_that_replays_a_stale_batch(synthetic):
    runtime = resolve_runtime(GRAPH)
    spec = TrainSpec(batch_size=64)
    model = build_model(ModelSpec(depth=8, width=8), 3, 10).to(CUDA)
    model.to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    eager = Step(model, make_optimizer(model, spec, runtime), runtime)
    broken = StaleInputGraph(twin, make_optimizer(twin, spec, runtime), runtime)
    batches = _check_batches(synthetic, runtime, 64, SELF_CHECK_STEPS)
    lrs = [0.1 * (0.5 if i % 2 else 1.0) for i in range(len(batches))]
    assert compare_to_eager(eager, broken, batches, lrs).startswith("self-check: ")


class HostSync(nn.Module):
    """A model that reads a value back to the host in its forward: capture cannot hold that."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_model(ModelSpec(depth=8, width=4), 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if out.sum().item() == float("inf"):  # a host sync: illegal while capturing
            out = out * 0
        return out


def test_a_failed_capture_falls_back_once_and_restores_the_stream(synthetic):
    runtime = resolve_runtime(GRAPH)
    model = HostSync().to(CUDA)
    step = GraphStep(model, make_optimizer(model, TrainSpec(), runtime), runtime)
    batches = _check_batches(synthetic, runtime, 32, GraphStep.WARMUP_STEPS + 2)
    stream = torch.cuda.current_stream()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches:
            step(x, y)
    assert len(_fallbacks(caught)) == 1
    assert torch.cuda.current_stream() == stream  # not the dead capture stream
    assert step.fallback.startswith("CUDA graph capture failed (") and not step.uses_graph
    assert step.tags()[TAG_STEP] == "eager" and "cuda_graph" not in step.ran.describe()
    assert torch.isfinite(step.sums).all()  # the steps after the failure trained eagerly
    # The process now builds eager steps, without a second warning, and tags why.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = build_step(
            build_model(ModelSpec(depth=8, width=4), 3, 10), TrainSpec(), synthetic, runtime
        )
    assert type(again) is Step and again.fallback == step.fallback and not _fallbacks(caught)


def test_a_self_check_that_fails_capture_turns_the_graph_off_for_the_cell(synthetic):
    runtime = resolve_runtime(GRAPH)
    stream = torch.cuda.current_stream()
    with pytest.warns(RuntimeWarning, match="capture failed"):
        step = build_step(HostSync(), TrainSpec(batch_size=32), synthetic, runtime)
    assert torch.cuda.current_stream() == stream
    assert type(step) is Step and step.tags()[TAG_GRAPH_FALLBACK].startswith("CUDA graph capture")
    assert step.optimizer.param_groups[0]["foreach"] is True  # built as the eager path builds it


# --------------------------------------------------------------------------------------------
# The device set-up.


def test_setup_device_picks_the_workers_gpu_and_cudnn_benchmark():
    last = torch.cuda.device_count() - 1
    try:
        setup = setup_device(ExecOptions(device=f"cuda:{last}"))
        assert torch.cuda.current_device() == last and torch.backends.cudnn.benchmark
        assert setup.record()["cuda_device"] == last
    finally:
        torch.cuda.set_device(0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: a worker on cuda:1")
def test_a_worker_on_the_second_gpu_captures_there(synthetic):
    try:
        result = train_cell(
            tiny(epochs=1), synthetic, key="k", options=ExecOptions(device="cuda:1")
        )
        assert torch.cuda.current_device() == 1
    finally:
        torch.cuda.set_device(0)
    assert result.tags[TAG_STEP] == "cuda_graph"


# --------------------------------------------------------------------------------------------
# The bench's graph rows.


def test_graph_rows_capture_even_fed_by_a_pinned_dataloader(small):
    # `only CUDA graph` is fed by the standard DataLoader (pinned memory, worker processes):
    # its pin-memory thread touches CUDA while the graph is captured.
    result = bench_step(
        TINY,
        batch=32,
        device="cuda",
        dataset=small,
        features="resident,cuda_graph",
        each=True,
        steps=5,
        repeats=2,
        loader_workers=2,
    )
    rows = _rows(result)
    for name in ("only CUDA graph", "+ CUDA graph"):
        assert rows[name]["step"] == "cuda_graph" and rows[name]["note"] == "", rows[name]
        assert rows[name]["images_per_second"] > 0
    assert rows["+ resident data"]["step"] == "eager"
    assert result["device_setup"]["cudnn_benchmark"] is True
    assert result["graph_fallback"] == ""


def test_cuda_graph_and_eager_rows_both_timed(small):
    result = bench_step(
        TINY,
        batch=32,
        device="cuda",
        dataset=small,
        features="resident,bf16,channels_last,cuda_graph",
        steps=5,
        repeats=2,
        loader_workers=0,
    )
    rows = _rows(result)
    eager, graph = rows["+ channels_last"], rows["+ CUDA graph"]
    assert graph["features"] == [*eager["features"], "cuda_graph"]
    assert graph["note"] == "" and graph["step"] == "cuda_graph"
    assert eager["images_per_second"] > 0 and graph["images_per_second"] > 0


def test_cuda_streams_pack_graphed_trainers(small):
    result = workers_sweep(
        TINY,
        counts=(1, 2),
        pack="streams",
        batch=32,
        device="cuda",
        dataset=small,
        features=["resident", "bf16", "channels_last", "cuda_graph"],
        seconds=0.5,
        loader_workers=0,
    )
    assert all(p["error"] == "" and p["images_per_second"] > 0 for p in result["points"])
    assert result["graph_fallback"] == ""


def test_worker_processes_are_set_up_on_their_gpus(small):
    result = workers_sweep(
        TINY,
        counts=(2,),
        batch=32,
        device="cuda",
        dataset=small,
        features=["resident", "cuda_graph"],
        seconds=0.5,
        loader_workers=0,
    )
    (point,) = result["points"]
    assert point["error"] == "", point["error"]
    gpus = torch.cuda.device_count()
    assert [s["cuda_device"] for s in point["setups"]] == [i % gpus for i in range(2)]
    assert all(s["cudnn_benchmark"] is True for s in point["setups"])

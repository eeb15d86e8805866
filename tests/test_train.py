"""The training engine: schedule, learning, divergence, checkpoints and resume, CUDA graphs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from resnet_ablate.config import CellConfig, DataSpec, ModelSpec, TrainSpec
from resnet_ablate.data import load_dataset
from resnet_ablate.models import build_model, main_path_convs
from resnet_ablate.train import (
    ExecOptions,
    gradient_norms,
    load_checkpoint,
    lr_at,
    resolve_runtime,
    train_cell,
)

CPU = ExecOptions(device="cpu")


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


def test_training_learns_and_records_every_epoch(synthetic, tmp_path):
    seen = []
    result = train_cell(
        tiny(),
        synthetic,
        key="k",
        options=CPU,
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
    assert set(result.grad_flow["epochs"]) == {"1", "3"}
    assert all(n > 0 and math.isfinite(n) for n in result.grad_flow["epochs"]["1"])


def test_resume_continues_exactly_where_it_stopped(synthetic, tmp_path):
    config = tiny(epochs=3, milestones=(0.5,))
    whole = train_cell(config, synthetic, key="k", options=CPU)

    checkpoint = tmp_path / "cell.pt"
    part = train_cell(config, synthetic, key="k", options=CPU, checkpoint=checkpoint, max_epochs=2)
    assert [h["epoch"] for h in part.history] == [1, 2]
    assert not list(tmp_path.glob(".*tmp"))  # written atomically
    replayed = []
    rest = train_cell(
        config,
        synthetic,
        key="k",
        options=CPU,
        checkpoint=checkpoint,
        on_epoch=lambda epoch, metrics: replayed.append(epoch),
    )
    assert rest.resumed_from == 2
    assert replayed == [1, 2, 3]  # the gap-filling replay, then the new epoch
    assert [h["epoch"] for h in rest.history] == [1, 2, 3]
    for a, b in zip(whole.history, rest.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_err"] == pytest.approx(b["test_err"], abs=1e-9)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the graph path is GPU-only")
def test_cuda_graph_matches_eager(synthetic):
    config = tiny(epochs=2)
    options = ExecOptions(device="cuda", precision="fp32", channels_last=False)
    eager = train_cell(
        config,
        synthetic,
        key="k",
        options=ExecOptions(device="cuda", precision="fp32", channels_last=False, cuda_graph=False),
    )
    with torch.backends.cudnn.flags(deterministic=True, benchmark=False):
        graph = train_cell(config, synthetic, key="k", options=options)
    for a, b in zip(eager.history, graph.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=2e-2)
        assert a["lr"] == pytest.approx(b["lr"])

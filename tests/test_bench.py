"""`ablate bench`: the step benchmark times the standard loop and this trainer side by side.

Speed is measured, never asserted: these tests check that every row runs and reports a positive
rate, that the ratios are computed from those rates, that rows a device cannot run are skipped
visibly, that the JSON says how the device was set up and what each row ran, and that the
command's output and errors are what a user and a script expect. The CUDA rows are tested in
test_cuda.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from resnet_ablate.bench.step import (
    bench_step,
    model_label,
    parse_features,
    parse_model,
    plan_rows,
)
from resnet_ablate.bench.sweep import workers_sweep
from resnet_ablate.config import DataSpec
from resnet_ablate.data import load_dataset
from resnet_ablate.errors import UserError
from resnet_ablate.models import build_model, describe

from .conftest import ablate

TINY = "plain-8-w4"
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One compute thread here and in the processes started: tiny models then take milliseconds
    a step, and other work on the same cores cannot stall every parallel region."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small():
    return load_dataset(DataSpec(name="synthetic", train_subset=256))


def _rows(result: dict) -> dict[str, dict]:
    return {row["name"]: row for row in result["rows"]}


def _check_rates(result: dict) -> None:
    """Every timed row: a positive median inside its repeats, and its ratio to the standard."""
    standard = result["rows"][0]
    assert standard["standard"] and standard["name"] == "standard loop"
    for row in result["rows"]:
        if row.get("skipped"):
            continue
        assert row["images_per_second"] > 0
        assert row["min"] <= row["images_per_second"] <= row["max"]
        assert len(row["repeats"]) == result["repeats"]
        assert row["ratio"] == pytest.approx(
            row["images_per_second"] / standard["images_per_second"]
        )
        assert row["setup_seconds"] >= 0


# --------------------------------------------------------------------------------------------
# Model labels and features.


@pytest.mark.parametrize(
    ("label", "fields", "params"),
    [
        ("plain-56", dict(shortcut="none", depth=56, block="basic", order="post"), 853_018),
        ("res-20", dict(shortcut="identity", depth=20, width=16), 269_722),
        ("res-110", dict(shortcut="identity", depth=110), 1_727_962),
        ("res-164-bottleneck", dict(block="bottleneck", depth=164), 1_661_274),
        ("res-proj-164-bottleneck-pre", dict(shortcut="projection", order="pre"), 1_703_258),
        ("res-110 bottleneck pre", dict(depth=110, block="bottleneck", order="pre"), None),
        ("plain-8-w4", dict(shortcut="none", depth=8, width=4), None),
    ],
)
def test_model_labels_name_the_papers_networks(label, fields, params):
    spec = parse_model(label)
    for name, value in fields.items():
        assert getattr(spec, name) == value, name
    assert parse_model(model_label(spec)) == spec
    if params is not None:  # the parameter counts of models.py's table (He et al. 2015, 2016)
        assert describe(build_model(spec, 3, 10), (3, 32, 32)).params == params


@pytest.mark.parametrize(
    ("label", "says"),
    [
        ("resnet56", "FAMILY-DEPTH"),
        ("res-57", "depth 57 is impossible"),
        ("plain-56-huge", "unknown part 'huge'"),
        ("res-", "FAMILY-DEPTH"),
        ("plain-56-w0", "unknown part 'w0'"),
    ],
)
def test_a_wrong_model_label_is_one_clear_error(label, says):
    with pytest.raises(UserError, match="--model") as err:
        parse_model(label)
    assert says in str(err.value)


def test_features_parse_in_order_and_reject_unknown_names():
    assert parse_features("bf16, channels-last,resident", CPU) == [
        "bf16",
        "channels_last",
        "resident",
    ]
    assert parse_features(None, CPU)[0] == "resident"  # what `ablate run` uses on this device
    assert "cuda_graph" not in parse_features("auto", CPU)
    with pytest.raises(UserError, match="unknown turbo"):
        parse_features("bf16,turbo", CPU)


def test_rows_add_one_feature_at_a_time():
    rows = plan_rows(["resident", "bf16", "channels_last"], CPU, each=True)
    assert [(r.name, r.features) for r in rows] == [
        ("standard loop", ()),
        ("only bf16", ("bf16",)),
        ("only channels_last", ("channels_last",)),
        ("+ resident data", ("resident",)),
        ("+ bf16", ("resident", "bf16")),
        ("+ channels_last", ("resident", "bf16", "channels_last")),
    ]


# --------------------------------------------------------------------------------------------
# Timing on the CPU.


def test_bench_times_the_standard_loop_and_each_trainer_row(small):
    result = bench_step(
        TINY,
        batch=32,
        device="cpu",
        dataset=small,
        features="resident,bf16,channels_last",
        steps=2,
        repeats=2,
        warmup=1,
        loader_workers=0,
    )
    rows = _rows(result)
    assert list(rows) == ["standard loop", "+ resident data", "+ bf16", "+ channels_last"]
    _check_rates(result)
    assert rows["+ channels_last"]["features"] == ["resident", "bf16", "channels_last"]
    assert result["headline"]["ratio"] == rows["+ channels_last"]["ratio"]
    standard = rows["standard loop"]["images_per_second"]
    assert result["headline"]["standard_images_per_second"] == standard
    assert (result["model"], result["shape"], result["batch"]) == (TINY, [3, 32, 32], 32)
    assert result["params"] == describe(build_model(parse_model(TINY), 3, 10), (3, 32, 32)).params
    assert [row["step"] for row in result["rows"]] == ["standard", "eager", "eager", "eager"]
    setup = result["device_setup"]  # what the one device set-up of `ablate run` set here
    assert setup["device"] == "cpu" and setup["cuda_device"] is None
    assert setup["cudnn_benchmark"] is None and setup["threads_in_effect"] == 1
    assert result["graph_fallback"] is None  # no graph row ran


def test_cuda_rows_are_skipped_visibly_where_there_is_no_cuda(small):
    result = bench_step(
        TINY,
        batch=32,
        device="cpu",
        dataset=small,
        features="resident,cuda_graph,bf16",
        steps=1,
        repeats=1,
        warmup=1,
        loader_workers=0,
    )
    rows = _rows(result)
    assert rows["+ CUDA graph"]["images_per_second"] is None
    assert rows["+ CUDA graph"]["skipped"] == "needs CUDA (cpu here)"
    assert rows["+ bf16"]["features"] == ["resident", "bf16"]  # the ladder goes on without it
    assert result["headline"]["features"] == ["resident", "bf16"]
    _check_rates(result)


def test_the_standard_loop_with_dataloader_workers_and_the_trainer_fed_by_it(small):
    result = bench_step(
        TINY,
        batch=32,
        device="cpu",
        dataset=small,
        features="bf16",
        steps=2,
        repeats=1,
        warmup=1,
        loader_workers=1,
    )
    assert [r["name"] for r in result["rows"]] == ["standard loop", "+ bf16"]
    assert result["loader_workers"] == 1
    _check_rates(result)


def test_workers_sweep_reports_the_aggregate_of_packed_trainers(small):
    result = workers_sweep(
        TINY,
        counts=(1, 2),
        pack="streams",  # in this process: on a CPU the trainers take turns
        batch=32,
        device="cpu",
        dataset=small,
        features=["resident"],
        seconds=0.3,
        warmup=1,
        loader_workers=0,
    )
    assert [p["workers"] for p in result["points"]] == [1, 2]
    for point in result["points"]:
        assert point["error"] == "" and point["images_per_second"] > 0
        assert point["per_worker"] == pytest.approx(point["images_per_second"] / point["workers"])
        assert point["ratio"] == pytest.approx(
            point["images_per_second"] / result["standard_images_per_second"]
        )
    assert result["points"][0]["scaling"] == 1.0


@pytest.mark.slow
def test_workers_sweep_in_processes_as_the_runner_starts_them(small):
    result = workers_sweep(
        TINY,
        counts=(2,),
        batch=32,
        device="cpu",
        dataset=small,
        features=["resident"],
        seconds=0.3,
        warmup=1,
        loader_workers=0,
    )
    (point,) = result["points"]
    assert point["error"] == "", point["error"]
    assert point["workers"] == 2 and point["images_per_second"] > 0
    # Each worker process was set up as the runner sets up its workers: the cores shared.
    assert [s["device"] for s in point["setups"]] == ["cpu", "cpu"]
    assert all(s["threads"] == s["threads_in_effect"] >= 1 for s in point["setups"])


# --------------------------------------------------------------------------------------------
# The command.


@pytest.mark.slow
def test_bench_command_prints_json_that_parses(tmp_path):
    proc = ablate(
        *("bench", "--model", TINY, "--batch", "16", "--device", "cpu"),
        *("--steps", "1", "--repeats", "1", "--warmup", "1", "--json"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["rows"][0]["name"] == "standard loop" and len(result["rows"]) >= 2
    assert result["headline"]["ratio"] > 0
    assert result["dataset"] == "synthetic" and result["shape"] == [3, 32, 32]


@pytest.mark.slow
def test_bench_command_prints_a_table_and_the_headline(tmp_path):
    proc = ablate(
        *("bench", "--model", TINY, "--batch", "16", "--device", "cpu", "--dataset", "synthetic"),
        *("--steps", "1", "--repeats", "1", "--warmup", "1", "--features", "resident"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "standard loop" in proc.stdout and "+ resident data" in proc.stdout
    assert "x the standard loop" in proc.stdout and "compile/capture s" in proc.stdout


@pytest.mark.slow
def test_an_unknown_model_label_exits_2_with_a_clear_message(tmp_path):
    proc = ablate("bench", "--model", "resnet-56", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--model 'resnet-56': expected FAMILY-DEPTH" in proc.stderr
    assert "plain-56" in proc.stderr and "Traceback" not in proc.stderr

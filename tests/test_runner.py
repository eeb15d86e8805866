"""`ablate run` end to end on a CPU: the MLflow record, reruns, kills, workers, a real server;
and the run engine's seams in-process (events, outcome, pool, one tracked training, writes)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from rich.console import Console

from resnet_ablate import tracking
from resnet_ablate.config import DataSpec, TrainSpec, load_grid
from resnet_ablate.data import load_dataset
from resnet_ablate.device import ExecOptions
from resnet_ablate.engine import (
    Hooks,
    Outcome,
    RunOptions,
    Session,
    Stop,
    WorkerContext,
    contexts,
    open_session,
    recording_the_end,
    run_pool,
    train_tracked,
)
from resnet_ablate.events import Crashed, Ended, Epoch, Skipped, Started
from resnet_ablate.progress import GridProgress
from resnet_ablate.runner import GridOutcome, cell_job, close_grid
from resnet_ablate.signals import Interrupted
from resnet_ablate.train import CellResult, point_marks

from .conftest import EXPERIMENTS, MANY_SHORT_EPOCHS, SHORT_EPOCHS, ablate, wait_for
from .mlflow_server import free_port
from .mlflow_server import mlflow_server as real_mlflow_server
from .records import cell_runs, client_for, steps

SMOKE = EXPERIMENTS / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One real run of the smoke grid, shared by the read-back tests."""
    workdir = tmp_path_factory.mktemp("smoke")
    done = ablate("run", str(SMOKE), "--no-report", cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    return workdir, done


@pytest.mark.slow
def test_run_records_everything_in_mlflow(smoke_run):
    workdir, done = smoke_run
    client = client_for(workdir)
    experiment = client.get_experiment_by_name("smoke")
    parents = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`ablate.role` = 'grid'"
    )
    assert len(parents) == 1
    parent = parents[0]
    runs = cell_runs(client)
    assert sorted(r.info.run_name for r in runs) == ["plain-8 basic post s0", "res-8 basic post s0"]
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["ablate.status"] == "finished" and run.info.status == "FINISHED"
        assert len(tags["ablate.cell_key"]) == 12
        assert tags["ablate.torch_version"] and tags["ablate.git_commit"]
        assert params["model.depth"] == "8" and params["data.name"] == "synthetic"
        assert params["model.shortcut"] in ("none", "identity")
        assert params["train.milestones"] == "[0.67]" and params["seed"] == "0"
        assert steps(client, run.info.run_id) == [1, 2, 3]
        assert steps(client, run.info.run_id, "test_err") == [1, 2, 3]
        history = client.get_metric_history(run.info.run_id, "test_err")
        last = max(history, key=lambda m: m.step).value
        assert metrics["final_test_err"] == last
        assert metrics["best_test_err"] == min(m.value for m in history)
        # 3x3 convs 3>8, 2 x 8>8, 8>16, 16>16, 16>32, 32>32; BN scale and shift; the fc 32>10.
        # The identity shortcut (option A) adds nothing.
        assert metrics["model_params"] == 18_648 + 2 * 120 + 330 == 19_218
        # Per output position: 32x32 for the stem and stage 1, 16x16 and 8x8 for the others.
        macs = 216 * 1024 + 2 * 576 * 1024 + (1152 + 2304) * 256 + (4608 + 9216) * 64 + 320
        assert metrics["model_macs"] == macs == 3_170_624
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.json", "final_metrics.json", "grad_flow.json"} <= artifacts
        local = client.download_artifacts(run.info.run_id, "grad_flow.json", str(workdir))
        flow = json.loads(Path(local).read_text())
        assert len(flow["layers"]) == 7 and set(flow["epochs"]) == {"1", "3"}
    assert not list((workdir / "results" / "checkpoints").rglob("*.pt"))


@pytest.mark.slow
def test_time_spent_tracking_is_recorded(smoke_run):
    # Measured, not asserted against a clock: the share is what the README reports.
    workdir, _ = smoke_run
    for run in cell_runs(client_for(workdir)):
        metrics = run.data.metrics
        assert metrics["tracking_seconds"] > 0 and metrics["wall_seconds"] > 0


@pytest.mark.slow
def test_rerun_trains_nothing(smoke_run):
    workdir, _ = smoke_run
    before = {r.info.run_id for r in cell_runs(client_for(workdir))}
    again = ablate("run", str(SMOKE), "--no-report", cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert "0 cell(s) trained, 2 already done" in again.stdout
    assert {r.info.run_id for r in cell_runs(client_for(workdir))} == before


@pytest.mark.slow
def test_ls_and_dry_run_show_states(smoke_run):
    workdir, _ = smoke_run
    listing = ablate("ls", str(SMOKE), cwd=workdir)
    assert listing.returncode == 0
    assert listing.stdout.count("finished") >= 2 and "plain-8 basic post s0" in listing.stdout
    dry = ablate("run", str(SMOKE), "--dry-run", cwd=workdir)
    assert dry.returncode == 0 and dry.stdout.count("finished") == 2


@pytest.mark.slow
def test_ui_serves_the_grid_store(smoke_run):
    workdir, _ = smoke_run
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnet_ablate", "ui", "--port", str(port)],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=smoke"
    try:
        wait_for(lambda: _get(url) is not None or proc.poll() is not None, timeout=90, every=0.5)
        body = _get(url)
        assert body is not None, "the UI did not answer"
        assert json.loads(body)["experiment"]["name"] == "smoke"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _get(url: str) -> str | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


#: The smoke grid's plain cell, as many short epochs.
LONG_CELL = [*MANY_SHORT_EPOCHS, "--set", "model.shortcut=none"]
LONG_EPOCHS = SHORT_EPOCHS


def _slow_smoke(tmp_path: Path) -> list[str]:
    """The smoke grid's plain cell as many short epochs, without the report."""
    return [*LONG_CELL, "--no-report"]


@pytest.mark.slow
def test_sigkill_mid_run_resumes_from_the_checkpoint(tmp_path):
    args = ["-m", "resnet_ablate", "run", str(SMOKE), *_slow_smoke(tmp_path)]
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = tmp_path / "results" / "checkpoints" / "smoke"
    try:
        wait_for(lambda: any(checkpoints.glob("*.pt")))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (checkpoint,) = checkpoints.glob("*.pt")
    saved_epoch = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= saved_epoch < LONG_EPOCHS
    client = client_for(tmp_path)
    (killed,) = cell_runs(client)
    assert killed.data.tags["ablate.status"] == "running"  # as a SIGKILL leaves it
    # The checkpoint is written before the epoch's metrics are sent, so a kill in between
    # leaves MLflow one epoch behind; the resume must fill that gap.
    done_before = steps(client, killed.info.run_id)
    assert done_before in (list(range(1, saved_epoch + 1)), list(range(1, saved_epoch)))

    again = ablate("run", str(SMOKE), *_slow_smoke(tmp_path), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    (resumed,) = cell_runs(client)
    assert resumed.info.run_id == killed.info.run_id  # the same run continues
    assert resumed.data.tags["ablate.status"] == "finished"
    assert resumed.data.tags["ablate.resumed_from_epoch"] == str(saved_epoch)
    epochs = list(range(1, LONG_EPOCHS + 1))
    assert steps(client, resumed.info.run_id) == epochs  # no gap, no repeat
    # The points within epochs too: every iteration-step once, whatever epoch the kill cut.
    per_epoch = len(load_dataset(DataSpec(name="synthetic", train_subset=256)).train.y) // 64
    marks = point_marks(per_epoch, TrainSpec().log_points)
    expected = [(e - 1) * per_epoch + m for e in epochs for m in marks]
    assert steps(client, resumed.info.run_id, "iter_train_err") == expected


@pytest.mark.slow
def test_ctrl_c_exits_130_and_marks_the_run_killed(tmp_path):
    args = ["-m", "resnet_ablate", "run", str(SMOKE), *_slow_smoke(tmp_path)]
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = tmp_path / "results" / "checkpoints" / "smoke"
    wait_for(lambda: any(checkpoints.glob("*.pt")))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "resume" in err
    (run,) = cell_runs(client_for(tmp_path))
    assert run.data.tags["ablate.status"] == "killed" and run.info.status == "KILLED"
    assert any(checkpoints.glob("*.pt"))
    listing = ablate("ls", str(SMOKE), *LONG_CELL, cwd=tmp_path)
    assert "killed" in listing.stdout


@pytest.mark.slow
def test_two_workers_and_two_runs_at_once_train_each_cell_once(tmp_path):
    grid = ["run", str(SMOKE), "--set", "train.epochs=2", "--set", "seeds=[0, 1]", "--no-report"]
    # Create the store first, as the runner would, so both launches race only on the queue.
    first = subprocess.Popen(
        [sys.executable, "-m", "resnet_ablate", *grid, "--workers", "2"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    second = subprocess.Popen(
        [sys.executable, "-m", "resnet_ablate", *grid],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for proc in (first, second):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out + err
    runs = cell_runs(client_for(tmp_path))
    keys = [r.data.tags["ablate.cell_key"] for r in runs]
    assert len(keys) == 4 and len(set(keys)) == 4  # four cells, one run each
    for run in runs:
        assert run.data.tags["ablate.status"] == "finished"
        assert steps(client_for(tmp_path), run.info.run_id) == [1, 2]


@pytest.mark.slow
def test_missing_dataset_stops_before_anything_is_recorded(tmp_path, write_grid):
    grid = write_grid(SMOKE.read_text().replace("name: synthetic", "name: cifar10"))
    done = ablate("run", str(grid), cwd=tmp_path, env={"ABLATE_DATA": str(tmp_path / "none")})
    assert done.returncode == 2
    assert "cifar" in done.stderr.lower() and "Traceback" not in done.stderr
    assert not (tmp_path / "results").exists()  # not even an empty store


@pytest.mark.slow
def test_unreachable_tracking_server_is_one_clear_message(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = ablate("run", str(SMOKE), "--tracking-uri", f"http://127.0.0.1:{port}", cwd=tmp_path)
    assert done.returncode == 2
    assert "unreachable" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_unwritable_results_is_one_clear_message(tmp_path):
    if os.geteuid() == 0:
        results = tmp_path / "file-not-folder"
        results.write_text("")
        target = results / "results"
    else:  # pragma: no cover - CI runs as root
        target = tmp_path / "ro"
        target.mkdir(mode=0o500)
    done = ablate("run", str(SMOKE), "--results", str(target), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert str(target) in done.stderr.replace("\n", "") and "Traceback" not in done.stderr


@pytest.mark.slow
def test_results_that_is_a_file_is_one_clear_message(tmp_path):
    (tmp_path / "results").write_text("keep me")
    done = ablate("run", str(SMOKE), cwd=tmp_path)
    assert done.returncode == 2
    assert "is a file, not a folder" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "results").read_text() == "keep me"


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback, started and stopped by the test."""
    with real_mlflow_server(tmp_path / "server") as url:
        yield url


@pytest.mark.slow
def test_a_real_mlflow_server_as_tracking_uri(tmp_path, mlflow_server):
    done = ablate(
        "run", str(SMOKE), "--set", "train.epochs=1", "--tracking-uri", mlflow_server, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    client = MlflowClient(mlflow_server)
    runs = cell_runs(client)
    assert len(runs) == 2
    for run in runs:
        assert steps(client, run.info.run_id) == [1]
        assert "grad_flow.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not (tmp_path / "results" / "mlflow.db").exists()
    assert (tmp_path / "results" / "smoke+train.epochs=1" / "report.html").exists()


# --------------------------------------------------------------------------------------------
# The engine's seams, in-process: events, the outcome, the pool, one tracked training, and
# chunked writes to a real store.


def smoke_session(tmp_path: Path, **options) -> Session:
    grid = load_grid(SMOKE, ["train.epochs=3"])
    store = tracking.open_store(None, tmp_path / "results")
    return open_session(grid, RunOptions(results=tmp_path / "results", **options), store)


def test_the_outcome_counts_ends_and_crashes_into_the_exit_code():
    outcome = Outcome()
    outcome.record(Ended(0, "k1", "plain-8 basic post s0", "finished"))
    outcome.record(Ended(0, "k2", "res-8 basic post s0", "diverged", "loss became nan"))
    assert outcome.exit_code == 0 and not outcome.failures
    outcome.record(Ended(1, "k3", "res-8 basic post s1", "failed", "RuntimeError: boom"))
    assert outcome.exit_code == 1 and [e.key for e in outcome.failures] == ["k3"]
    crashed = Outcome()
    crashed.record(Crashed(1, "OSError: disk full"))
    assert crashed.exit_code == 1 and crashed.crashes == ["OSError: disk full"]
    crashed.interrupted = True
    assert crashed.exit_code == 130


@pytest.mark.parametrize(
    ("raised", "status", "exit_code"),
    [
        (None, "FAILED", 0),  # ran to its end with cells not done (nothing was trained here)
        (KeyboardInterrupt(), "KILLED", 130),
        (Interrupted(signal.SIGTERM), "KILLED", 143),
        (RuntimeError("boom"), "FAILED", None),
    ],
)
def test_how_an_invocation_ended_is_its_parent_run_s_status(tmp_path, raised, status, exit_code):
    """Whatever ends the work, the parent run says how: an interruption anywhere in the
    invocation (between rounds, say, outside the pool) is KILLED, not FAILED."""
    session = smoke_session(tmp_path)
    store = tracking.open_store(session.uri, tmp_path / "results")
    outcome = GridOutcome()
    closed: list[GridOutcome | None] = []

    def close(ended: GridOutcome | None) -> None:
        closed.append(ended)
        close_grid(session, store, ended)

    def work() -> None:
        with recording_the_end(store, "kept", outcome, close):
            if raised is not None:
                raise raised

    if raised is None:
        work()
    else:
        with pytest.raises(type(raised)):
            work()
    parent = MlflowClient(session.uri).get_run(session.parent_id)
    assert parent.info.status == status
    assert parent.data.metrics["cells_total"] == 2 and parent.data.metrics["cells_done"] == 0
    assert closed == [None if exit_code is None else outcome]
    if exit_code is not None:
        assert outcome.exit_code == exit_code


def test_the_display_follows_the_events(tmp_path):
    cell = load_grid(SMOKE).cells[0]
    out = io.StringIO()
    console = Console(file=out, width=200)
    with GridProgress(
        console, "smoke", [cell], done=1, total=2, done_states=tracking.DONE
    ) as progress:
        progress.update(Started(0, cell.key, cell.label, 3))
        progress.update(Epoch(0, cell.key, 1, 42.0))
        progress.update(Skipped(0, cell.key, 2))
        progress.update(Ended(0, cell.key, cell.label, "finished"))
        progress.update(Crashed(1, "OSError: disk full"))
    assert progress.done == 2
    overall = progress.progress.tasks[progress.overall]
    assert overall.completed == pytest.approx(overall.total)  # 1 epoch + 2 skipped of 3
    text = out.getvalue()
    assert f"finished {cell.label}" in text and "worker 1 crashed: OSError: disk full" in text


def emit_and_maybe_crash(ctx: WorkerContext, emit) -> None:
    """A worker's work for the pool test: one training's events; worker 1 then crashes, and
    worker 2's process dies at once, as one the system kills (no exception, no last word)."""
    if ctx.worker == 2:
        os._exit(3)
    emit(Started(ctx.worker, f"k{ctx.worker}", f"cell {ctx.worker}", 1))
    emit(Epoch(ctx.worker, f"k{ctx.worker}", 1, 10.0))
    emit(Ended(ctx.worker, f"k{ctx.worker}", f"cell {ctx.worker}", "finished"))
    if ctx.worker == 1:
        raise RuntimeError("lost the queue")


@pytest.mark.slow
def test_the_pool_relays_every_worker_s_events_and_crashes(tmp_path):
    session = smoke_session(tmp_path)
    shown: list = []
    outcome = Outcome()
    run_pool(contexts(session, 3), emit_and_maybe_crash, shown.append, outcome)
    assert sorted(e.key for e in outcome.ended) == ["k0", "k1"]
    assert outcome.crashes == [
        "RuntimeError: lost the queue",
        "its process ended (exit code 3) before its work was done",
    ]
    assert outcome.exit_code == 1 and not outcome.interrupted
    assert sorted(type(e).__name__ for e in shown) == sorted(
        ["Started", "Epoch", "Ended"] * 2 + ["Crashed"] * 2
    )


@pytest.mark.slow
def test_a_tracked_training_stops_early_and_records_what_ran(tmp_path, monkeypatch):
    session = smoke_session(tmp_path)
    events: list = []
    worker = WorkerContext(session, 0, ExecOptions(device="cpu")).open(events.append)
    cell = session.grid.cells[0]
    job = cell_job(session, cell, None)

    def stop_after_two(epoch: int, metrics) -> None:
        if epoch == 2:
            raise Stop("pruned", "enough after epoch 2")

    ending = train_tracked(job, worker, Hooks(epoch=stop_after_two))
    assert (ending.status, ending.reason) == ("pruned", "enough after epoch 2")
    assert [type(e).__name__ for e in events] == ["Started", "Epoch", "Epoch", "Skipped", "Ended"]
    assert events[3].epochs == 1 and events[-1].note == "enough after epoch 2"
    client = MlflowClient(session.uri)
    (run,) = cell_runs(client)
    assert run.data.tags["ablate.status"] == "pruned" and run.info.status == "FINISHED"
    assert steps(client, run.info.run_id) == [1, 2]
    assert not job.checkpoint.exists()  # ended for good: nothing to resume

    # What actually ran (the trainer's tags) is set on the run when it ends.
    def trainer(config, dataset, *, on_epoch, **_):
        metrics = {"epoch": 1.0, "train_err": 50.0, "train_loss": 1.0}
        metrics |= {"test_err": 40.0, "test_loss": 1.2}
        on_epoch(1, metrics)
        return CellResult("finished", [metrics], {}, tags={"ablate.step": "eager"})

    monkeypatch.setattr("resnet_ablate.train.train_cell", trainer)
    other = session.grid.cells[1]
    ending = train_tracked(cell_job(session, other, None), worker)
    assert ending.status == "finished" and ending.metrics["final_test_err"] == 40.0
    run = tracking.cell_runs(worker.store, session.experiment_id)[other.key]
    assert run.data.tags["ablate.step"] == "eager" and run.data.tags["ablate.status"] == "finished"


@pytest.mark.slow
def test_an_interruption_while_the_end_is_recorded_is_killed_and_resumes(tmp_path):
    """Ctrl-C or SIGTERM while a finished training's end is being written: the run is marked
    killed, its checkpoint of the last epoch kept, and the rerun records the end, with every
    epoch once. Once the end is recorded, an interruption leaves the run as it ended."""
    grid = load_grid(SMOKE, ["train.epochs=2", "data.train_subset=256", "model.shortcut=none"])
    store = tracking.open_store(None, tmp_path / "results")
    session = open_session(grid, RunOptions(results=tmp_path / "results"), store)
    events: list = []
    worker = WorkerContext(session, 0, ExecOptions(device="cpu")).open(events.append)
    (cell,) = grid.cells
    job = cell_job(session, cell, None)

    def interrupted(result) -> None:  # the first thing the final record does
        raise Interrupted(signal.SIGTERM)

    with pytest.raises(Interrupted):
        train_tracked(job, worker, Hooks(finish=interrupted))
    client = MlflowClient(session.uri)
    (killed,) = cell_runs(client)
    assert (killed.info.status, killed.data.tags["ablate.status"]) == ("KILLED", "killed")
    assert killed.data.tags["ablate.reason"] == "interrupted (SIGTERM); rerun to resume"
    assert isinstance(events[-1], Ended) and events[-1].status == "killed"
    assert torch.load(job.checkpoint, weights_only=True)["epoch"] == 2

    ending = train_tracked(cell_job(session, cell, killed), worker)
    (resumed,) = cell_runs(client)
    assert ending.status == "finished" and resumed.info.run_id == killed.info.run_id
    assert resumed.data.tags["ablate.resumed_from_epoch"] == "2"
    assert resumed.info.status == "FINISHED" and steps(client, resumed.info.run_id) == [1, 2]
    assert "final_test_err" in resumed.data.metrics and not job.checkpoint.exists()

    other = replace(cell_job(session, cell, None), key="another", label="another")
    with pytest.MonkeyPatch.context() as patch:  # lands just after the end is recorded
        patch.setattr("resnet_ablate.engine.remove_checkpoint", interrupted)
        with pytest.raises(Interrupted):
            train_tracked(other, worker)
    ended = [r for r in cell_runs(client) if r.info.run_id != resumed.info.run_id]
    assert [(r.info.status, r.data.tags["ablate.status"]) for r in ended] == [
        ("FINISHED", "finished")
    ]


@pytest.mark.slow
def test_writes_are_chunked_to_mlflow_s_limits(tmp_path):
    store = tracking.open_store(None, tmp_path)
    experiment_id = store.experiment_id("chunks")
    params = {f"p{i}": i for i in range(250)}  # MLflow takes 100 params a call
    tags = {f"t{i}": str(i) for i in range(150)}
    run_id = tracking.create_run(
        store, experiment_id, tracking.RunSpec("many", "cell", tags=tags, params=params)
    )
    log = tracking.MetricLog(store, run_id)
    for step in range(1, 1201):  # 2400 points: three calls of at most 1000
        log.add({"a": step / 10, "b": -step}, step=step)
    log.flush()
    run = MlflowClient(store.uri).get_run(run_id)
    assert run.data.params == {k: str(v) for k, v in params.items()}
    assert {k: run.data.tags[k] for k in tags} == tags
    assert run.data.tags["ablate.role"] == "cell" and run.data.tags["ablate.status"] == "running"
    points = tracking.metric_points(store, [run_id], ["a", "b"])
    assert len(points) == 2400 and {p.run_id for p in points} == {run_id}
    assert sorted(p.step for p in points if p.key == "a") == list(range(1, 1201))
    tracking.end_run(store, run_id, "diverged", "x" * 5000, tags={"extra": "1"})
    run = MlflowClient(store.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and len(run.data.tags["ablate.reason"]) == 4000
    assert run.data.tags["extra"] == "1"


def test_a_cpu_worker_s_threads_follow_the_workers_asked_for_not_those_started(
    tmp_path, monkeypatch
):
    """A CPU's float sums change with the thread count: a cell left alone in a resumed grid of
    `--workers 4` trains with the threads it had among four, so its numbers stay the same."""
    monkeypatch.setattr("resnet_ablate.engine.os.cpu_count", lambda: 8)
    session = smoke_session(tmp_path, workers=4, exec=ExecOptions(device="cpu"))
    assert [c.exec.threads for c in contexts(session, 4)] == [2, 2, 2, 2]
    assert [c.exec.threads for c in contexts(session, 1)] == [2]
    alone = replace(session, options=replace(session.options, workers=1))
    assert [c.exec.threads for c in contexts(alone, 1)] == [None]  # torch's own choice
    threads = ExecOptions(device="cpu", threads=3)
    chosen = replace(session, options=replace(session.options, exec=threads))
    assert [c.exec.threads for c in contexts(chosen, 1)] == [3]

"""`ablate run` end to end on a CPU: the MLflow record, reruns, kills, workers, a real server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from .conftest import EXPERIMENTS, ablate, wait_for

SMOKE = EXPERIMENTS / "smoke.yaml"


def client_for(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'results' / 'mlflow.db'}")


def cell_runs(client: MlflowClient, grid: str = "smoke"):
    experiment = client.get_experiment_by_name(grid)
    assert experiment is not None
    return client.search_runs(
        [experiment.experiment_id], filter_string="tags.`ablate.role` = 'cell'"
    )


def steps(client: MlflowClient, run_id: str, key: str = "train_err") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One real run of the smoke grid, shared by the read-back tests."""
    workdir = tmp_path_factory.mktemp("smoke")
    done = ablate("run", str(SMOKE), "--no-report", cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    return workdir, done


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
        assert 0 <= metrics["final_test_err"] < 90
        assert metrics["model_params"] > 10_000 and metrics["model_macs"] > 1e6
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.json", "final_metrics.json", "grad_flow.json"} <= artifacts
        local = client.download_artifacts(run.info.run_id, "grad_flow.json", str(workdir))
        flow = json.loads(Path(local).read_text())
        assert len(flow["layers"]) == 7 and set(flow["epochs"]) == {"1", "3"}
    assert not list((workdir / "results" / "checkpoints").rglob("*.pt"))


def test_time_spent_tracking_is_recorded(smoke_run):
    # Measured, not asserted against a clock: the share is what the README reports.
    workdir, _ = smoke_run
    for run in cell_runs(client_for(workdir)):
        metrics = run.data.metrics
        assert metrics["tracking_seconds"] > 0 and metrics["wall_seconds"] > 0


def test_rerun_trains_nothing(smoke_run):
    workdir, _ = smoke_run
    before = {r.info.run_id for r in cell_runs(client_for(workdir))}
    again = ablate("run", str(SMOKE), "--no-report", cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert "0 cell(s) trained, 2 already done" in again.stdout
    assert {r.info.run_id for r in cell_runs(client_for(workdir))} == before


def test_ls_and_dry_run_show_states(smoke_run):
    workdir, _ = smoke_run
    listing = ablate("ls", str(SMOKE), cwd=workdir)
    assert listing.returncode == 0
    assert listing.stdout.count("finished") >= 2 and "plain-8 basic post s0" in listing.stdout
    dry = ablate("run", str(SMOKE), "--dry-run", cwd=workdir)
    assert dry.returncode == 0 and dry.stdout.count("finished") == 2


def test_ui_serves_the_grid_store(smoke_run):
    workdir, _ = smoke_run
    port = _free_port()
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


def _slow_smoke(tmp_path: Path) -> list[str]:
    """The smoke grid with longer epochs, so that a kill lands mid-run."""
    return ["--set", "train.epochs=4", "--set", "model.shortcut=none", "--no-report"]


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
    assert 1 <= saved_epoch < 4
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
    assert steps(client, resumed.info.run_id) == [1, 2, 3, 4]  # no gap, no repeat


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
    listing = ablate(
        "ls", str(SMOKE), "--set", "train.epochs=4", "--set", "model.shortcut=none", cwd=tmp_path
    )
    assert "killed" in listing.stdout


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


def test_missing_dataset_stops_before_anything_is_recorded(tmp_path, write_grid):
    grid = write_grid(SMOKE.read_text().replace("name: synthetic", "name: cifar10"))
    done = ablate("run", str(grid), cwd=tmp_path, env={"ABLATE_DATA": str(tmp_path / "none")})
    assert done.returncode == 2
    assert "cifar" in done.stderr.lower() and "Traceback" not in done.stderr
    assert not (tmp_path / "results").exists()  # not even an empty store


def test_unreachable_tracking_server_is_one_clear_message(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = ablate("run", str(SMOKE), "--tracking-uri", f"http://127.0.0.1:{port}", cwd=tmp_path)
    assert done.returncode == 2
    assert "unreachable" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "results").exists()


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


def test_results_that_is_a_file_is_one_clear_message(tmp_path):
    (tmp_path / "results").write_text("keep me")
    done = ablate("run", str(SMOKE), cwd=tmp_path)
    assert done.returncode == 2
    assert "is a file, not a folder" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "results").read_text() == "keep me"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback, started and stopped by the test."""
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",
            (store / "artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=store,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return proc.poll() is not None  # stop waiting if the server died

    try:
        wait_for(healthy, timeout=90, every=0.5)
        assert proc.poll() is None, "mlflow server exited"
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


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
    assert (tmp_path / "results" / "smoke" / "report.html").exists()

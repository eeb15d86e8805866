"""The grid's record in MLflow as its users meet it: runs made with `--set` kept apart and
pointed to, the parent run's status through a grid, provenance and the dataset input on every
run, and the report stored with the parent run (on a real `mlflow server` too)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from resnet_ablate import engine
from resnet_ablate.config import load_grid
from resnet_ablate.engine import RunOptions
from resnet_ablate.provenance import LIBRARIES
from resnet_ablate.runner import run_grid

from .conftest import ablate, wait_for
from .mlflow_server import free_port, mlflow_server, stop
from .report_browser import Chromium, find_chromium

TINY = """\
name: tiny
description: Two tiny cells on a few synthetic images, one epoch each.
base:
  data:  {name: synthetic, augment: false, train_subset: 256, test_subset: 128}
  model: {block: basic, order: post, depth: 8, width: 4}
  train: {epochs: 1, batch_size: 64, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4,
          schedule: constant}
grid:
  model.shortcut: [none, identity]
seeds: [0]
"""


def runs(client: MlflowClient, role: str, grid: str = "tiny"):
    experiment = client.get_experiment_by_name(grid)
    return client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`ablate.role` = '{role}'"
    )


def local_client(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'results' / 'mlflow.db'}")


@pytest.fixture(scope="module")
def two_settings(tmp_path_factory):
    """The tiny grid run as written, then with `--set train.epochs=2`."""
    workdir = tmp_path_factory.mktemp("settings")
    grid = workdir / "tiny.yaml"
    grid.write_text(TINY)
    plain = ablate("run", str(grid), cwd=workdir)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    longer = ablate("run", str(grid), "--set", "train.epochs=2", cwd=workdir)
    assert longer.returncode == 0, longer.stdout + longer.stderr
    return workdir, grid, plain, longer


@pytest.mark.slow
def test_runs_with_overrides_keep_their_own_report_and_are_pointed_to(two_settings):
    workdir, grid, plain, longer = two_settings
    results = workdir / "results"
    own = results / "tiny" / "report.html"
    other = results / "tiny+train.epochs=2" / "report.html"
    assert own.exists() and other.exists()
    assert "tiny also holds 2 finished run(s) of the grid file as written" in longer.stdout
    own_html, other_html = own.read_text(), other.read_text()
    assert "What ran (read from the runs): 1 epoch of 256 training images" in own_html
    assert "What ran (read from the runs): 2 epochs of 256 training images" in other_html
    assert "<code>--set train.epochs=2</code>" in other_html  # the overrides it was made with
    assert f"ablate report {grid}</code> shows them" in other_html  # and where the others are

    # Rebuilding without --set leaves the other report alone and says where the other runs are.
    before = other.read_bytes()
    again = ablate("report", str(grid), cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert other.read_bytes() == before
    assert f"see them with: ablate report {grid} --set train.epochs=2" in again.stdout
    assert f"ablate report {grid} --set train.epochs=2</code> shows them" in own.read_text()
    listing = ablate("ls", str(grid), cwd=workdir)
    assert "\n2 finished\n" in listing.stdout  # its own two cells, the others not among them
    assert f"ablate ls {grid} --set train.epochs=2" in listing.stdout
    overridden = ablate("ls", str(grid), "--set", "train.epochs=2", cwd=workdir)
    assert "tiny: 2 cells (--set train.epochs=2)" in overridden.stdout
    assert f"see them with: ablate ls {grid}\n" in overridden.stdout


@pytest.mark.slow
def test_each_setting_has_its_parent_run_which_tells_the_truth(two_settings):
    workdir, grid, _, _ = two_settings
    client = local_client(workdir)
    parents = {r.data.tags.get("ablate.overrides", ""): r for r in runs(client, "grid")}
    assert set(parents) == {"", "train.epochs=2"}
    assert parents["train.epochs=2"].info.run_name == "tiny (train.epochs=2)"
    cells = runs(client, "cell")
    assert len(cells) == 4
    for overrides, parent in parents.items():
        mine = [c for c in cells if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert len(mine) == 2
        assert {c.data.tags.get("ablate.overrides", "") for c in mine} == {overrides}
        assert parent.info.status == "FINISHED"
        metrics = parent.data.metrics
        assert metrics["cells_total"] == 2 and metrics["cells_done"] == 2
        assert metrics["cells_diverged"] == 0 and metrics["cells_failed"] == 0
        # Its duration spans the grid: from before the first cell to after the last.
        assert parent.info.start_time <= min(c.info.start_time for c in mine)
        assert parent.info.end_time >= max(c.info.end_time for c in mine)
        artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
        assert {"report/report.html", "report/summary.csv", "report/figures"} <= artifacts
        assert client.list_artifacts(parent.info.run_id, "grid")[0].path == "grid/tiny.yaml"


@pytest.mark.slow
def test_every_run_carries_its_provenance_and_dataset(two_settings):
    workdir, grid, _, _ = two_settings
    client = local_client(workdir)
    head = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    digests = set()
    for run in runs(client, "cell") + runs(client, "grid"):
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == head
        assert tags["ablate.git_dirty"] in ("true", "false")
        assert tags["mlflow.source.name"].startswith("ablate run ")
        assert tags["mlflow.user"]
        for library in LIBRARIES:
            assert re.match(r"\d+\.\d+", tags[f"ablate.{library}_version"]), library
        assert tags["ablate.cpu"] and tags["ablate.gpu"]
    for run in runs(client, "cell"):
        (found,) = run.inputs.dataset_inputs
        assert found.dataset.name == "synthetic"
        assert json.loads(found.dataset.profile) == {"train": 256, "test": 128}
        assert found.tags[0].value == "training"
        digests.add(found.dataset.digest)
        folder = client.download_artifacts(run.info.run_id, "grid", str(workdir / "dl"))
        assert (Path(folder) / "tiny.yaml").read_text() == grid.read_text()
        config = client.download_artifacts(run.info.run_id, "config.json", str(workdir / "dl"))
        resolved = json.loads(Path(config).read_text())
        assert resolved["train"]["epochs"] == int(run.data.params["train.epochs"])
    assert len(digests) == 1 and len(digests.pop()) == 32  # the same data, every time
    # The Dataset column's filter works on it.
    experiment = client.get_experiment_by_name("tiny")
    named = client.search_runs([experiment.experiment_id], "dataset.name = 'synthetic'")
    assert len(named) == 6  # the four cells and the two parent runs


@pytest.mark.slow
def test_the_parent_is_running_while_cells_run_killed_by_ctrl_c_and_reopened(tmp_path):
    grid = tmp_path / "tiny.yaml"
    grid.write_text(TINY)
    longer = ["--set", "train.epochs=30", "--set", "model.shortcut=none", "--no-report"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnet_ablate", "run", str(grid), *longer],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = tmp_path / "results" / "checkpoints" / "tiny"
    wait_for(lambda: any(checkpoints.glob("*.pt")))
    client = local_client(tmp_path)
    (parent,) = runs(client, "grid")
    assert parent.info.status == "RUNNING"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    (killed,) = runs(client, "grid")
    assert killed.info.status == "KILLED" and killed.data.metrics["cells_killed"] == 1
    assert killed.data.metrics["cells_done"] == 0

    shorter = ["--set", "train.epochs=30", "--set", "model.shortcut=none", "--no-report"]
    done = ablate("run", str(grid), *shorter, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (finished,) = runs(client, "grid")
    assert finished.info.run_id == parent.info.run_id  # the same parent, reopened
    assert finished.info.status == "FINISHED" and finished.data.metrics["cells_done"] == 1
    assert finished.info.start_time == parent.info.start_time
    assert finished.info.end_time > killed.info.end_time


@pytest.mark.slow
def test_a_crashed_cell_fails_the_parent_run(tmp_path, monkeypatch):
    grid_file = tmp_path / "tiny.yaml"
    grid_file.write_text(TINY)
    grid = load_grid(grid_file)
    real = engine.train.train_cell

    def crash_plain(config, *args, **kwargs):
        if config.model.shortcut == "none":
            raise RuntimeError("out of memory in the plain net")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(engine.train, "train_cell", crash_plain)
    options = RunOptions(results=tmp_path / "results")
    outcome = run_grid(grid, options, Console(file=io.StringIO()))
    assert outcome.exit_code == 1
    client = local_client(tmp_path)
    (parent,) = runs(client, "grid")
    assert parent.info.status == "FAILED"
    metrics = parent.data.metrics
    assert metrics["cells_failed"] == 1 and metrics["cells_done"] == 1
    assert metrics["cells_total"] == 2
    # The failed cell keeps its traceback; the other cell trained; a rerun retries only it.
    (failed,) = [r for r in runs(client, "cell") if r.data.tags["ablate.status"] == "failed"]
    assert "out of memory in the plain net" in failed.data.tags["ablate.reason"]
    text = Path(client.download_artifacts(failed.info.run_id, "traceback.txt", str(tmp_path)))
    assert "RuntimeError: out of memory in the plain net" in text.read_text()
    monkeypatch.setattr(engine.train, "train_cell", real)
    again = run_grid(grid, options, Console(file=io.StringIO()))
    assert again.exit_code == 0 and again.done == 1 and again.total == 2
    statuses = sorted(r.data.tags["ablate.status"] for r in runs(client, "cell"))
    assert statuses.count("finished") == 2


@pytest.mark.slow
def test_on_a_real_server_the_report_and_dataset_are_there_for_everyone(tmp_path):
    grid = tmp_path / "tiny.yaml"
    grid.write_text(TINY)
    with mlflow_server(tmp_path / "server") as url:
        done = ablate("run", str(grid), "--tracking-uri", url, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        client = MlflowClient(url)
        (parent,) = runs(client, "grid")
        assert parent.info.status == "FINISHED"
        html = client.download_artifacts(
            parent.info.run_id, "report/report.html", str(tmp_path / "dl")
        )
        assert Path(html).read_text() == (tmp_path / "results" / "tiny" / "report.html").read_text()
        summary = client.download_artifacts(
            parent.info.run_id, "report/summary.csv", str(tmp_path / "dl")
        )
        assert "plain-8 basic post s0" in Path(summary).read_text()
        experiment = client.get_experiment_by_name("tiny")
        found = client.search_runs([experiment.experiment_id], "dataset.name = 'synthetic'")
        assert len(found) == 3  # the two cells and their parent
        for run in found:
            assert json.loads(run.inputs.dataset_inputs[0].dataset.profile)["train"] == 256


def start_ui(workdir: Path, grid: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """`ablate ui GRID` on a free port (another tried if it cannot bind); its printed URLs."""
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "resnet_ablate", "ui", str(grid), "--port", str(free_port())],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "1000"},
            start_new_session=True,
        )
        urls = {}
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when the process does (a port taken meanwhile)
            if line.startswith("Runs table: "):
                urls["runs"] = line.removeprefix("Runs table: ").strip()
            elif line.startswith("Compare the cells: "):
                urls["compare"] = line.removeprefix("Compare the cells: ").strip()
            if "(--open" in line:
                return proc, urls
        stop(proc)
    raise AssertionError("ablate ui did not start")


@pytest.mark.slow
@pytest.mark.skipif(find_chromium() is None, reason="needs Chromium")
def test_ui_lands_on_the_runs_table_and_the_compare_view(two_settings, tmp_path):
    workdir, grid, _, _ = two_settings
    proc, urls = start_ui(workdir, grid)
    try:
        experiment = local_client(workdir).get_experiment_by_name("tiny").experiment_id
        assert urls["runs"].endswith(f"/#/experiments/{experiment}?workflowType=machine_learning")
        with Chromium(find_chromium(), tmp_path / "profile", timeout=60) as browser:
            expected = ["tiny (train.epochs=2)", "Dataset", "Duration"]
            text, shot = browser.render(urls["runs"], expected, width=1800)
            assert "synthetic" in text  # the Dataset column has the input
            (tmp_path / "ui.png").write_bytes(shot)
            assert shot.startswith(b"\x89PNG") and len(shot) > 20_000
            text, _ = browser.render(
                urls["compare"], ["plain-8 basic post s0", "res-8 basic post s0"]
            )
            assert "model.shortcut" in text
    finally:
        stop(proc)


@pytest.mark.slow
def test_reproduce_rebuilds_a_cell_from_its_record_and_matches_exactly(two_settings):
    workdir, grid, _, _ = two_settings
    client = local_client(workdir)
    (original,) = [
        r
        for r in runs(client, "cell")
        if r.info.run_name == "plain-8 basic post s0" and "ablate.overrides" not in r.data.tags
    ]
    done = ablate("reproduce", original.info.run_id, cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "The curves are identical." in done.stdout
    (copy,) = runs(client, "reproduction")
    assert copy.data.tags["ablate.reproduces"] == original.info.run_id
    assert copy.data.tags["mlflow.parentRunId"] == original.data.tags["mlflow.parentRunId"]
    assert copy.data.params == original.data.params
    for key in ("train_loss", "train_err", "test_err"):
        old = [(m.step, m.value) for m in client.get_metric_history(original.info.run_id, key)]
        new = [(m.step, m.value) for m in client.get_metric_history(copy.info.run_id, key)]
        assert sorted(new) == sorted(old) and old
    listing = ablate("ls", str(grid), cwd=workdir)  # the cell is still its original run
    assert original.info.run_id in listing.stdout

    wrong = ablate("reproduce", "0123456789abcdef", cwd=workdir)
    assert wrong.returncode == 2 and "no such run" in wrong.stderr
    assert len(runs(client, "reproduction")) == 1


def test_only_a_missing_run_is_told_as_no_such_run(tmp_path):
    """A store that cannot be read says so as itself, never as "no such run": the run may well
    be there (and a shared grid's parent run must not be taken for gone)."""
    from resnet_ablate import tracking

    store = tracking.open_store(None, tmp_path / "results")
    for missing in ("0123456789abcdef0123456789abcdef", "../etc"):
        with pytest.raises(tracking.TrackingError, match=f"run {re.escape(missing)}: no such run"):
            tracking.get_run(store, missing)
        assert not tracking.run_active(store, missing)
    with contextlib.closing(sqlite3.connect(tmp_path / "results" / "mlflow.db")) as db:
        db.execute("DROP TABLE runs")  # a broken store: its runs cannot be read
    with pytest.raises(Exception, match="no such table") as caught:
        tracking.run_active(store, "0123456789abcdef0123456789abcdef")
    assert not isinstance(caught.value, tracking.TrackingError)

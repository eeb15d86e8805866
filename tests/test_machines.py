"""Several machines, one grid: a real PostgreSQL queue and a real `mlflow server` on PostgreSQL.

Each "machine" is an `ablate run` in its own folder with its own results/ and its own host
identity (ABLATE_HOST), sharing only the queue database and the tracking server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from .conftest import ablate, wait_for
from .services import Postgres, free_port, mlflow_server, postgres_cluster

pytestmark = pytest.mark.slow

STALE = "4"  # seconds a silent owner counts as alive (default 120)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def server(postgres: Postgres, tmp_path_factory):
    with mlflow_server(postgres, tmp_path_factory.mktemp("mlflow")) as running:
        yield running


def grid_file(folder: Path, name: str, epochs: int, seeds: int = 3) -> Path:
    """A grid of 2 x `seeds` tiny cells on synthetic data."""
    path = folder / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name: {name}
            description: tiny cells shared by several machines
            base:
              data:  {{name: synthetic, augment: false, train_subset: 200, test_subset: 100,
                      resize: 16}}
              model: {{block: basic, order: post, depth: 8, width: 4}}
              train: {{epochs: {epochs}, batch_size: 50, lr: 0.05, schedule: step,
                      milestones: [0.67], gamma: 0.1}}
            grid:
              model.shortcut: [none, identity]
            seeds: {list(range(seeds))}
            """
        )
    )
    return path


def start_machine(
    root: Path, number: int, grid: Path, queue: str, tracking: str
) -> subprocess.Popen:
    """`ablate run` as machine `number`: its own folder, results and host identity."""
    folder = root / f"machine-{number}"
    folder.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "ABLATE_HOST": f"machine-{number}",
        "ABLATE_STALE_SECONDS": STALE,
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "200",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "resnet_ablate", "run", str(grid), "--no-report"]
    return subprocess.Popen(
        [*command, "--queue", queue, "--tracking-uri", tracking],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, out


def runs(client: MlflowClient, grid: str, role: str, view=ViewType.ACTIVE_ONLY) -> list:
    experiment = client.get_experiment_by_name(grid)
    assert experiment is not None
    return client.search_runs(
        [experiment.experiment_id], f"tags.`ablate.role` = '{role}'", run_view_type=view
    )


def history(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train_err"))


def assert_one_clean_run_per_cell(client: MlflowClient, grid: str, cells: int, epochs: int):
    """Every cell finished once, in one run under the grid's one parent, epochs 1..E once."""
    (parent,) = runs(client, grid, "grid")
    cell_runs = runs(client, grid, "cell")
    keys = Counter(r.data.tags["ablate.cell_key"] for r in cell_runs)
    assert len(keys) == cells and set(keys.values()) == {1}, keys
    for run in cell_runs:
        assert run.data.tags["ablate.status"] == "finished", run.data.tags
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert history(client, run.info.run_id) == list(range(1, epochs + 1))
    return cell_runs


def test_three_machines_train_each_cell_once_under_one_parent(postgres, server, tmp_path):
    grid = grid_file(tmp_path, "three-machines", epochs=2)
    queue = postgres.create_database("queue_three")
    machines = [start_machine(tmp_path, n, grid, queue, server.url) for n in range(3)]
    outputs = [finish(proc) for proc in machines]
    for code, out in outputs:
        assert code == 0, out
        assert "View run" not in out and "View experiment" not in out  # the tool's own console
    client = MlflowClient(server.url)
    cell_runs = assert_one_clean_run_per_cell(client, "three-machines", cells=6, epochs=2)
    assert not runs(client, "three-machines", "cell", ViewType.DELETED_ONLY)  # none retrained
    trained_here = sum(int(out.split(" cell(s) trained")[0].split()[-1]) for _, out in outputs)
    assert trained_here == 6
    # The report is built from the tracking server, from any machine's folder.
    folder = tmp_path / "machine-2"
    done = ablate(
        "report", str(grid), "--tracking-uri", server.url, "--results", "results", cwd=folder
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (folder / "results" / "three-machines" / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 6
    html = (folder / "results" / "three-machines" / "report.html").read_text()
    for run in cell_runs:
        assert run.info.run_id in html  # every cell links to its run


def test_a_killed_machine_s_cell_is_taken_over_and_trained_once(postgres, server, tmp_path):
    name = "killed-machine"
    grid = grid_file(tmp_path, name, epochs=6)
    queue = postgres.create_database("queue_killed")
    client = MlflowClient(server.url)
    victim = start_machine(tmp_path, 0, grid, queue, server.url)

    def victim_mid_cell() -> str | None:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            return None
        for run in runs(client, name, "cell"):
            tags = run.data.tags
            if tags.get("ablate.status") == "running" and history(client, run.info.run_id):
                return tags["ablate.cell_key"]
        return None

    wait_for(lambda: victim_mid_cell() is not None, timeout=300, every=0.5)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    key = victim_mid_cell()
    assert key is not None  # left running, mid-cell, as a SIGKILL leaves it
    others = [start_machine(tmp_path, n, grid, queue, server.url) for n in (1, 2)]
    for proc in others:
        code, out = finish(proc)
        assert code == 0, out
    cell_runs = assert_one_clean_run_per_cell(client, name, cells=6, epochs=6)
    (taken,) = [r for r in cell_runs if r.data.tags["ablate.cell_key"] == key]
    assert taken.data.tags["ablate.host"] in ("machine-1", "machine-2")
    # The dead machine's partial run is set aside (deleted, restorable), and is the only one.
    (aside,) = runs(client, name, "cell", ViewType.DELETED_ONLY)
    assert aside.data.tags["ablate.cell_key"] == key
    assert aside.data.tags["ablate.host"] == "machine-0"


def test_a_tracking_server_restart_mid_grid_loses_and_duplicates_nothing(
    postgres, server, tmp_path
):
    name = "server-restart"
    grid = grid_file(tmp_path, name, epochs=3)
    queue = postgres.create_database("queue_restart")
    client = MlflowClient(server.url)
    machines = [start_machine(tmp_path, n, grid, queue, server.url) for n in range(2)]

    def finished() -> list[str]:
        if client.get_experiment_by_name(name) is None:
            return []
        done = [r for r in runs(client, name, "cell") if r.data.tags["ablate.status"] != "running"]
        return [r.info.run_id for r in done]

    wait_for(lambda: len(finished()) >= 2, timeout=300, every=0.5)
    server.stop()
    time.sleep(3)
    server.start()
    before = set(finished())
    outputs = [finish(proc) for proc in machines]
    if any(code != 0 for code, _ in outputs):  # a clear failure of a cell; a rerun repairs it
        code, out = finish(start_machine(tmp_path, 0, grid, queue, server.url))
        assert code == 0, out
    cell_runs = assert_one_clean_run_per_cell(client, name, cells=6, epochs=3)
    assert before <= {r.info.run_id for r in cell_runs}  # nothing recorded before was lost


def _one_line_exit_2(code: int, out: str) -> str:
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return lines[0]


def test_bad_database_urls_are_one_line_exit_2_and_write_nothing(postgres, server, tmp_path):
    grid = grid_file(tmp_path, "bad-urls", epochs=1, seeds=1)
    untouched = postgres.create_database("untouched")
    down = f"postgresql://ablate:x@127.0.0.1:{free_port()}/queue"
    tracking = ["--tracking-uri", server.url]
    # The default driver (psycopg 3) missing from this Python, as if the extra were not installed.
    hide = "import sys; sys.modules['psycopg'] = None; from resnet_ablate.cli import main; main()"
    cases = {
        "psycopg2": (
            ["--queue", postgres.url("untouched", scheme="postgresql+psycopg2")] + tracking,
            "resnet-ablate[postgres]",
        ),
        "no-driver": (["--queue", untouched, *tracking], "resnet-ablate[postgres]"),
        "password": (
            ["--queue", postgres.url("untouched", password="wrong"), *tracking],
            "password authentication failed",
        ),
        "down": (["--queue", down, *tracking], "Connection refused"),
        # A shared queue with this machine's own SQLite store: refused, naming the URI to use.
        "local-store": (["--queue", untouched], "--tracking-uri http://"),
    }
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "COLUMNS": "400"}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = {}
    for case, (args, _) in cases.items():  # all at once: each is a Python start-up
        folder = tmp_path / case
        folder.mkdir()
        entry = ["-c", hide] if case == "no-driver" else ["-m", "resnet_ablate"]
        started[case] = subprocess.Popen(
            [sys.executable, *entry, "run", str(grid), *args],
            cwd=folder,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    for case, (_, expected) in cases.items():
        _, err = started[case].communicate(timeout=300)
        line = _one_line_exit_2(started[case].returncode, err)
        assert expected in line, line
        assert "grid-secret" not in line and ":wrong@" not in line  # no password printed
        assert not any((tmp_path / case).iterdir())  # nothing written here
    assert postgres.tables("untouched") == []  # no queue was created
    assert MlflowClient(server.url).get_experiment_by_name("bad-urls") is None

"""Shared fixtures: grid files written to a temporary folder, and the CLI run as users run it."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# Two test processes share the cores (`make test` runs pytest with xdist), and every training
# they start sizes its torch threads to all of them: threads that wait for work must sleep,
# not spin (GNU OpenMP's default), or the trainings slow each other many times over. Set here,
# before anything imports torch; the `ablate` processes the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Tests press Ctrl-C by sending SIGINT to the `ablate` processes they start. A suite started in
# the background by a script (`make test &`) has SIGINT ignored, which its children inherit and
# Python keeps, so they would never see it: handle it here (a handler, unlike "ignored", is not
# passed on), and each child starts with SIGINT as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"

#: `--set`s that make a grid's cells many short epochs (four steps of 64 images, a checkpoint
#: after each): a signal sent once a cell's first checkpoint is there lands mid-run however fast
#: the machine, and the run still ends in seconds.
SHORT_EPOCHS = 16
MANY_SHORT_EPOCHS = ["--set", f"train.epochs={SHORT_EPOCHS}", "--set", "data.train_subset=256"]
MANY_SHORT_EPOCHS += ["--set", "data.test_subset=100"]


#: The test files that take longest (minutes: several processes, servers, real trainings),
#: longest first. `make test` hands whole files to its pytest processes in collection order,
#: so these go first and the short files fill in around them; the rest keep their order.
LONGEST_FIRST = (
    "test_faults.py",
    "test_runner.py",
    "test_machines.py",
    "test_mlflow_record.py",
    "test_tune.py",
    "test_gpu_check.py",
    "test_seeds.py",
    "test_cli.py",
    "test_report.py",
    "test_bench.py",
    "test_hostile.py",
    "test_train.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within


@pytest.fixture
def write_grid(tmp_path: Path):
    """Write YAML text (dedented) to a grid file and return its path."""

    def write(text: str, name: str = "grid.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


def ablate(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    """Run `python -m resnet_ablate ARGS` in `cwd`, as a user would; returns the process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None) if "MLFLOW_TRACKING_URI" not in (env or {}) else None
    return subprocess.run(
        [sys.executable, "-m", "resnet_ablate", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for(predicate, timeout: float = 240.0, every: float = 0.2) -> None:
    """Poll `predicate` until it is true; fail the test after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError("timed out waiting")


def ablate_here(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """`ablate ARGS` in this process, run from `cwd` (the console script's `main`, without a
    process's start-up): exit code, out, err."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, sys.stdout, sys.stderr, os.getcwd(), signal.getsignal(signal.SIGTERM)
    sys.argv, sys.stdout, sys.stderr = ["ablate", *args], out, err
    os.chdir(cwd)
    try:
        from resnet_ablate import cli

        cli.main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    finally:
        sys.argv, sys.stdout, sys.stderr = saved[:3]
        os.chdir(saved[3])
        signal.signal(signal.SIGTERM, saved[4])
    return code, out.getvalue(), err.getvalue()


# The SQLite store held locked by another process for longer than MLflow waits.

HOLD_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


@contextlib.contextmanager
def store_locked(db: Path):
    """Another process holds the SQLite store `db` locked while the block runs."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)

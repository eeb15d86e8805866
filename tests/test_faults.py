"""Faults a long grid meets, each through the command users run: a scheduler's SIGTERM, a
checkpoint cut short or planted, a corrupt queue journal, a locked store, a full disk."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import multiprocessing
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from rich.console import Console

from resnet_ablate import tracking
from resnet_ablate.cellqueue import CellQueue, storage_for
from resnet_ablate.config import CellConfig, DataSpec, ModelSpec, TrainSpec, load_grid
from resnet_ablate.data import load_dataset
from resnet_ablate.device import ExecOptions
from resnet_ablate.engine import (
    Ending,
    Hooks,
    RunOptions,
    WorkerContext,
    open_session,
    train_tracked,
)
from resnet_ablate.errors import UserError
from resnet_ablate.runner import cell_job, run_grid
from resnet_ablate.train import load_checkpoint, train_cell

from . import queue_claimer
from .conftest import (
    EXPERIMENTS,
    MANY_SHORT_EPOCHS,
    ROOT,
    SHORT_EPOCHS,
    ablate,
    store_locked,
    wait_for,
)
from .records import cell_runs, client_for, steps

SMOKE = EXPERIMENTS / "smoke.yaml"
SCRIPTS = EXPERIMENTS.parent / "scripts"
CPU = ExecOptions(device="cpu")


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [sys.executable, "-m", "resnet_ablate", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


# --------------------------------------------------------------------------------------------
# SIGTERM: what SLURM and Kubernetes send before they kill a job.

#: Long enough that a signal sent after the first checkpoint lands well before the end.
LONG = [*MANY_SHORT_EPOCHS, "--no-report"]


@pytest.mark.slow
def test_sigterm_marks_the_runs_killed_exits_143_and_the_rerun_resumes(tmp_path):
    grid = ["run", str(SMOKE), *LONG, "--workers", "2"]
    proc = start(grid, tmp_path)
    checkpoints = tmp_path / "results" / "checkpoints" / "smoke"
    wait_for(lambda: len(list(checkpoints.glob("*.pt"))) == 2 or proc.poll() is not None, 900)
    # Only the parent gets it, as from a scheduler that signals the job's first process:
    # the parent passes it on to its workers.
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err
    assert "Interrupted (SIGTERM)" in err and "Traceback" not in err
    client = client_for(tmp_path)
    killed = {r.info.run_id: r for r in cell_runs(client)}
    assert len(killed) == 2
    for run in killed.values():
        tags = run.data.tags
        ended = (run.info.status, tags.get("ablate.status"), tags.get("ablate.reason"))
        assert ended == ("KILLED", "killed", "interrupted (SIGTERM); rerun to resume"), err
    saved = {p.stem: torch.load(p, weights_only=True)["epoch"] for p in checkpoints.glob("*.pt")}
    assert len(saved) == 2 and all(1 <= epoch < SHORT_EPOCHS for epoch in saved.values())

    again = ablate(*grid, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = cell_runs(client)
    assert {r.info.run_id for r in resumed} == set(killed)  # the same runs continue
    for run in resumed:
        key = run.data.tags["ablate.cell_key"]
        assert run.data.tags["ablate.status"] == "finished" and run.info.status == "FINISHED"
        assert run.data.tags["ablate.resumed_from_epoch"] == str(saved[key])
        assert steps(client, run.info.run_id) == list(range(1, SHORT_EPOCHS + 1))  # no gap
    assert not list(checkpoints.glob("*"))


# --------------------------------------------------------------------------------------------
# Checkpoints cut short by the kill itself, or planted to run code.


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset(DataSpec(name="synthetic"))


def tiny(epochs: int) -> CellConfig:
    return CellConfig(
        data=DataSpec(name="synthetic"),
        model=ModelSpec(depth=8, width=8, shortcut="identity"),
        train=TrainSpec(epochs=epochs, batch_size=64, lr=0.05),
        seed=0,
    )


@pytest.mark.slow
def test_a_checkpoint_cut_short_mid_file_starts_the_cell_again(synthetic, tmp_path):
    checkpoint = tmp_path / "cell.pt"
    whole = train_cell(tiny(2), synthetic, key="k", options=CPU)
    train_cell(tiny(2), synthetic, key="k", options=CPU, checkpoint=checkpoint, max_epochs=1)
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])  # the kill landed mid-write
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        again = train_cell(tiny(2), synthetic, key="k", options=CPU, checkpoint=checkpoint)
    assert again.resumed_from == 0 and again.status == "finished"
    assert again.history == [
        {**h, "epoch_seconds": a["epoch_seconds"], "images_per_second": a["images_per_second"]}
        for h, a in zip(whole.history, again.history, strict=True)
    ]  # a clean restart: the same numbers as a training never interrupted
    assert (tmp_path / "cell.unreadable").exists()  # kept aside for a look, never read again


def test_a_write_cut_short_leaves_no_temporary_file_behind(synthetic, tmp_path):
    checkpoint = tmp_path / "cell.pt"
    orphan = tmp_path / ".cell.pt.4242.tmp"  # what a kill mid-write leaves (pid 4242)
    orphan.write_bytes(b"PK\x03\x04 half a checkpoint")
    train_cell(tiny(1), synthetic, key="k", options=CPU, checkpoint=checkpoint)
    assert not orphan.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell.pt"]


class _Plant:
    """Unpickling this object would create the marker file: code run from a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("form", ["torch zip", "plain pickle"])
def test_a_checkpoint_that_would_run_code_runs_nothing(synthetic, tmp_path, form):
    checkpoint = tmp_path / "cell.pt"
    marker = tmp_path / "code-ran"
    state = {"version": 1, "key": "k", "epoch": 1, "model": _Plant(marker)}
    if form == "torch zip":
        torch.save(state, checkpoint)
    else:
        checkpoint.write_bytes(pickle.dumps(state))
    # Read the unsafe way, the planted file does run code: a switch to it would fail this test.
    if form == "torch zip":
        torch.load(checkpoint, weights_only=False)
    else:
        pickle.loads(checkpoint.read_bytes())
    assert marker.exists()
    marker.unlink()
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        assert load_checkpoint(checkpoint, "k") is None
    assert not marker.exists()
    planted = (tmp_path / "cell.unreadable").read_bytes()
    checkpoint.write_bytes(planted)
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        result = train_cell(tiny(1), synthetic, key="k", options=CPU, checkpoint=checkpoint)
    assert result.resumed_from == 0 and result.status == "finished"
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# The queue journal after a crash mid-write.


def journal_with_cells(tmp_path: Path, keys: list[str]) -> Path:
    queue = CellQueue(storage_for(None, tmp_path, "g"), "cells:g")
    queue.enqueue(keys)
    return tmp_path / "queue" / "g.journal"


def test_a_torn_last_journal_line_is_dropped_and_the_queue_works_on(tmp_path):
    path = journal_with_cells(tmp_path, ["a", "b", "c"])
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])  # the last write cut short: "c" was never queued
    # Left as it is, Optuna's next append glues onto the torn line and every later read fails.
    spoiled = tmp_path / "spoiled.journal"
    spoiled.write_bytes(whole[:-7])
    raw = JournalStorage(JournalFileBackend(str(spoiled)))
    study_id = raw.get_study_id_from_name("cells:g")
    with pytest.raises((ValueError, AttributeError)):  # the glued line cannot be read back
        raw.create_new_trial(study_id)
        JournalStorage(JournalFileBackend(str(spoiled)))

    queue = CellQueue(storage_for(None, tmp_path, "g"), "cells:g")
    kept = whole[: whole.rindex(b"\n", 0, len(whole) - 1) + 1]
    assert path.read_bytes().startswith(kept) and path.read_bytes().endswith(b"\n")
    assert queue.enqueue(["a", "b", "c"]) == 1  # "c" again; "a" and "b" were kept
    claimed = [queue.claim(), queue.claim(), queue.claim(), queue.claim()]
    assert sorted(c.key for c in claimed if c) == ["a", "b", "c"] and claimed[-1] is None
    reopened = CellQueue(storage_for(None, tmp_path, "g"), "cells:g")
    assert len(reopened._trials(TrialState.RUNNING)) == 3


def test_a_corrupt_journal_line_is_one_clear_message(tmp_path):
    path = journal_with_cells(tmp_path, ["a", "b"])
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([*lines[:1], b'{"op_code": 0, "wor\n', *lines[1:]]))
    with pytest.raises(UserError) as err:
        storage_for(None, tmp_path, "g")
    message = str(err.value)
    assert message.startswith(f"{path}: the queue journal is corrupt")
    assert "move it aside and run again" in message


# --------------------------------------------------------------------------------------------
# The SQLite store held locked by another process for longer than MLflow waits.


@pytest.mark.slow
def test_a_store_locked_too_long_is_one_clear_message_and_the_rerun_completes(tmp_path):
    make_store = "from pathlib import Path; from resnet_ablate import tracking; "
    make_store += "tracking.open_store(None, Path('results'))"
    subprocess.run([sys.executable, "-c", make_store], cwd=tmp_path, check=True)
    db = tmp_path / "results" / "mlflow.db"  # the store exists, empty
    grid = ["run", str(SMOKE), "--set", "train.epochs=1", "--no-report"]
    with store_locked(db):
        locked = ablate(*grid, cwd=tmp_path, timeout=300)
    assert locked.returncode == 2, locked.stdout + locked.stderr
    err = " ".join(locked.stderr.split())
    assert f"tracking store sqlite:///{db} is locked by another process" in err
    assert "Traceback" not in locked.stderr
    with contextlib.closing(sqlite3.connect(db)) as read:
        assert read.execute("SELECT name FROM experiments").fetchall() == [("Default",)]

    again = ablate(*grid, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    client = client_for(tmp_path)
    runs = cell_runs(client)
    assert sorted(r.data.tags["ablate.status"] for r in runs) == ["finished", "finished"]
    assert all(steps(client, r.info.run_id) == [1] for r in runs)


@pytest.mark.slow
def test_a_store_locked_mid_run_stops_with_one_line_and_the_rerun_resumes(tmp_path):
    grid = ["run", str(SMOKE), *MANY_SHORT_EPOCHS, "--set", "model.shortcut=none", "--no-report"]
    run = start(grid, tmp_path)
    checkpoints = tmp_path / "results" / "checkpoints" / "smoke"
    wait_for(lambda: any(checkpoints.glob("*.pt")) or run.poll() is not None)
    db = tmp_path / "results" / "mlflow.db"
    with store_locked(db):
        out, err = run.communicate(timeout=300)  # the next epoch's write waits, then gives up
    assert run.returncode == 2, out + err
    said = " ".join(err.split())
    assert said == (
        f"error: tracking store sqlite:///{db} is locked by another process for longer than "
        "MLflow waits (20 s); let that process finish or stop it, then run again (the cells' "
        "checkpoints are kept: the rerun resumes them)"
    )
    assert any(checkpoints.glob("*.pt"))

    again = ablate(*grid, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    client = client_for(tmp_path)
    (resumed,) = cell_runs(client)
    assert resumed.data.tags["ablate.status"] == "finished"
    assert int(resumed.data.tags["ablate.resumed_from_epoch"]) >= 1
    assert steps(client, resumed.info.run_id) == list(range(1, SHORT_EPOCHS + 1))


CREATE_STORE = """
import sys
from pathlib import Path
from resnet_ablate import tracking
tracking.open_store(None, Path(sys.argv[1]))
print("created", flush=True)
"""


@pytest.mark.slow
def test_a_kill_while_the_store_is_created_leaves_no_half_made_store(tmp_path):
    """MLflow makes a new SQLite store's tables in dozens of migrations; a process killed among
    them left a file no later run could open ("table ... already exists"). Killed at moments
    spread over the creation, the store is absent or whole, and the next open works."""
    results = tmp_path / "results"
    outcomes = set()
    for i, delay in enumerate((0.3, 0.6, 1.0, 1.5, 2.0, 2.5, 3.5, 5.0)):
        folder = results / str(i)
        proc = subprocess.Popen(
            [sys.executable, "-c", CREATE_STORE, str(folder)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            out, _ = proc.communicate(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        db = folder / "mlflow.db"
        outcomes.add(
            "created"
            if "created" in out
            else ("killed, store there" if db.exists() else "killed, no store")
        )
        if db.exists():  # whole: MLflow opens it as it is, creating nothing
            with contextlib.closing(sqlite3.connect(db)) as con:
                (version,) = con.execute("select version_num from alembic_version").fetchone()
            assert version
        store = tracking.open_store(None, folder)  # the next run opens it, or creates it whole
        assert store.experiment_id("after") and not list(folder.glob(".mlflow.db.new-*"))
    assert "killed, no store" in outcomes  # some kills landed before the store was whole


def test_a_full_sqlite_store_is_one_line_naming_it(tmp_path):
    """SQLite's own error when its file can grow no more (here: a page limit), as MLflow
    passes it on, becomes one line that names the store and its folder."""
    db = tmp_path / "results" / "mlflow.db"
    db.parent.mkdir()
    with contextlib.closing(sqlite3.connect(db)) as full:
        full.execute("CREATE TABLE t (x BLOB)")
        full.execute(f"PRAGMA max_page_count = {full.execute('PRAGMA page_count').fetchone()[0]}")
        with pytest.raises(sqlite3.OperationalError) as caught:
            full.execute("INSERT INTO t VALUES (zeroblob(1000000))")
    error = tracking.store_unavailable(f"sqlite:///{db}", caught.value, "nothing was lost")
    assert str(error) == (
        f"tracking store sqlite:///{db} is full: no space left on {db.parent}; free some, then "
        "run again (nothing was lost)"
    )
    assert tracking.store_unavailable("sqlite:///x", ValueError("other"), "") is None


# --------------------------------------------------------------------------------------------
# A full disk under results/.


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs where the checkpoints go; skipped, saying why, where mounting is denied."""
    where = tmp_path / "results" / "checkpoints"
    where.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): full disk not tested")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.slow
def test_a_full_disk_fails_the_cell_clearly_and_the_rerun_completes(tmp_path, small_disk):
    grid = ["run", str(SMOKE), "--set", "train.epochs=2", "--set", "model.shortcut=none"]
    grid += ["--no-report"]
    full = ablate(*grid, cwd=tmp_path)
    assert full.returncode == 1, full.stdout + full.stderr
    folder = small_disk / "smoke"
    says = "no space left on results/checkpoints/smoke"  # as given: --results is relative
    assert says in " ".join(full.stderr.split())
    assert "Traceback" not in full.stderr
    client = client_for(tmp_path)  # the store stays readable
    (run,) = cell_runs(client)
    assert run.info.status == "FAILED" and run.data.tags["ablate.status"] == "failed"
    assert says in run.data.tags["ablate.reason"]
    # No half-written checkpoint left to fill the disk (the `.run` file beside it names the run).
    assert [p.name for p in folder.iterdir() if p.suffix != ".run"] == []

    subprocess.run(["umount", str(small_disk)], check=True)  # space is freed
    again = ablate(*grid, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    (run,) = cell_runs(client)
    assert run.data.tags["ablate.status"] == "finished" and run.info.status == "FINISHED"
    assert steps(client, run.info.run_id) == [1, 2]


#: lr x weight decay = 5 > 2: each step's decay flips the weights' sign and grows them fivefold,
#: until the unnormalised last layer overflows. lr 100 with the usual decay stays finite.
DIVERGING = """\
name: smoke
base:
  data:  {name: synthetic, augment: false}
  model: {block: basic, order: post, depth: 8, width: 8, shortcut: identity}
  train: {epochs: 2, batch_size: 64, lr: 100, momentum: 0.9}
grid:
  train.weight_decay: [1.0e-4, 0.05]
"""


@pytest.mark.slow
def test_a_diverging_cell_is_a_result_others_go_on_and_the_rerun_trains_nothing(
    tmp_path, write_grid
):
    grid = write_grid(DIVERGING)
    first = ablate("run", str(grid), "--device", "cpu", "--precision", "fp32", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr  # divergence is a finding
    said = " ".join(first.stdout.split())
    assert "res-8 basic post weight_decay=0.05 s0: training loss became nan in epoch 1" in said
    client = client_for(tmp_path)
    runs = {r.data.params["train.weight_decay"]: r for r in cell_runs(client)}
    diverged, finished = runs["0.05"], runs["0.0001"]
    assert diverged.info.status == "FINISHED" and diverged.data.tags["ablate.status"] == "diverged"
    assert diverged.data.tags["ablate.reason"] == "training loss became nan in epoch 1 (lr 100)"
    assert steps(client, diverged.info.run_id) == [1]  # the epoch it diverged in, nothing after
    assert finished.data.tags["ablate.status"] == "finished"
    assert steps(client, finished.info.run_id) == [1, 2]
    assert not any((tmp_path / "results" / "checkpoints" / "smoke").glob("*.pt"))

    again = ablate("run", str(grid), "--device", "cpu", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 cell(s) trained, 2 already done" in again.stdout
    assert {r.info.run_id for r in cell_runs(client)} == {r.info.run_id for r in runs.values()}

    (tmp_path / "results" / "smoke" / "report.html").unlink()
    report = ablate("report", str(grid), cwd=tmp_path)  # the report alone, from the store
    assert report.returncode == 0, report.stdout + report.stderr
    html = (tmp_path / "results" / "smoke" / "report.html").read_text()
    assert html.count('class="status-diverged"') == 1
    assert "training loss became nan in epoch 1" in html


def test_several_claimers_take_every_cell_exactly_once(tmp_path):
    keys = [f"cell{i:02d}" for i in range(24)]
    # Two launches enqueue the same cells, as two `ablate run` started at once do.
    CellQueue(storage_for(None, tmp_path, "g"), "cells:g").enqueue(keys)
    CellQueue(storage_for(None, tmp_path, "g"), "cells:g").study.enqueue_trial(
        {}, user_attrs={"cell_key": "cell00"}
    )
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        taken = pool.map(queue_claimer.claim_all, [str(tmp_path)] * 4)
    assert sorted(k for mine in taken for k in mine) == keys  # every cell once, none twice


# --------------------------------------------------------------------------------------------
# The fault campaign's judge: it must see every kind of violation.


def load_campaign():
    spec = importlib.util.spec_from_file_location("fault_campaign", SCRIPTS / "fault_campaign.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_campaign"] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_the_campaign_flags_every_kind_of_violation():
    campaign = load_campaign()

    def cell(run_id="r1", errs=(50.0, 40.0), status="FINISHED", end=7, flow=(1.0, 2.0)):
        history = {
            "train_err": [(i + 1, e) for i, e in enumerate(errs)],
            "epoch_seconds": [(i + 1, 3.0 + i) for i in range(len(errs))],  # timings may differ
            "final_test_err": [(2, 38.0)],
        }
        return {
            "run_id": run_id,
            "status": status,
            "ablate_status": status.lower(),
            "end_time": end,
            "history": history,
            "grad_flow": {"epochs": {"1": list(flow)}},
        }

    reference = {"k": [cell()]}

    def judge(record, running=(), early=None):
        return campaign.violations(record, list(running), reference, early or {}, 2)

    assert judge({"k": [cell()]}) == []
    assert judge({"k": [{**cell(), "history": {**cell()["history"], "epoch_seconds": []}}]})
    assert judge({"k": [cell(), cell("r2")]}) == ["k: 2 runs, not one"]
    assert sorted(judge({"k": [cell(errs=(50.0,))]})) == [
        "k: epoch_seconds steps [1]",
        "k: train_err differs from the uninterrupted run",
        "k: train_err steps [1]",
    ]
    assert judge({"k": [cell(errs=(50.0, 40.000001))]}) == [
        "k: train_err differs from the uninterrupted run"
    ]
    assert judge({"k": [cell(flow=(1.0, 2.5))]}) == [
        "k: gradient flow differs from the uninterrupted run"
    ]
    assert judge({"k": [cell(end=9)]}, early={"k": ("r1", 7)}) == [
        "k: trained again after it had finished"
    ]
    assert judge({"k": [cell()]}, running=["p"]) == ["runs left RUNNING: ['p']"]
    assert judge({"k": [cell(status="KILLED")]}) == ["k: ended KILLED / killed"]
    assert judge({}) == ["cells [] != reference ['k']"]


@pytest.mark.slow
def test_a_grid_killed_after_its_last_cell_has_its_parent_run_ended_by_the_rerun(tmp_path):
    """A kill between the last cell's end and the parent run's end leaves the parent RUNNING
    with every cell done (the fault campaign found it): the rerun trains nothing and ends it."""
    grid = ["run", str(SMOKE), "--set", "train.epochs=1", "--no-report"]
    first = ablate(*grid, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    client = client_for(tmp_path)
    experiment = client.get_experiment_by_name("smoke")
    (parent,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`ablate.role` = 'grid'"
    )
    client.update_run(parent.info.run_id, status="RUNNING")  # as the kill leaves it
    again = ablate(*grid, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 cell(s) trained, 2 already done" in again.stdout
    ended = client.get_run(parent.info.run_id)
    assert ended.info.status == "FINISHED"
    assert ended.data.metrics["cells_done"] == ended.data.metrics["cells_total"] == 2


# --------------------------------------------------------------------------------------------
# A kill at each write that records a training's end.

#: One cell, two short epochs: the kill lands in its end record.
ONE_CELL = ["train.epochs=2", "data.train_subset=256", "model.shortcut=none"]
#: The writes that record a training's end, in order: final metrics, final_metrics.json,
#: grad_flow.json, the end's tags, and MLflow's status.
END_WRITES = ["log_batch", "log_text", "log_text", "log_batch", "set_terminated"]


class Killed(BaseException):
    """What a SIGKILL leaves: the process stops at this write and nothing after it runs."""


def train_then_rerun(workdir: Path, kill_at: int | None) -> list[str]:
    """Train the one cell in-process, killed before the end record's write number `kill_at`
    (None: not killed), then rerun the grid as `ablate run` does; the end's writes made."""
    grid = load_grid(SMOKE, ONE_CELL)
    options = RunOptions(results=workdir / "results")
    session = open_session(grid, options, tracking.open_store(None, options.results))
    worker = WorkerContext(session, 0, CPU).open(lambda event: None)
    writes: list[str] = []
    armed = False

    def counted(name: str, write):
        def wrapped(*args, **kwargs):
            if armed:
                if len(writes) == kill_at:
                    raise Killed(name)
                writes.append(name)
            return write(*args, **kwargs)

        return wrapped

    for name in ("log_batch", "log_text", "log_metric", "set_tag", "set_terminated", "update_run"):
        setattr(worker.store.client, name, counted(name, getattr(worker.store.client, name)))

    def arm(result) -> Ending:  # the first thing the end record does
        nonlocal armed
        armed = True
        return Ending(result.status, result.reason)

    (cell,) = grid.cells
    with pytest.raises(Killed) if kill_at is not None else contextlib.nullcontext():
        train_tracked(cell_job(session, cell, None), worker, Hooks(finish=arm))
    outcome = run_grid(grid, options, Console(file=io.StringIO()))
    assert outcome.exit_code == 0
    return writes


@pytest.fixture(scope="module")
def uninterrupted_end(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    assert train_then_rerun(workdir, None) == END_WRITES
    return load_campaign().cell_record(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", range(len(END_WRITES)))
def test_a_kill_at_any_write_of_a_training_s_end_is_completed_by_the_rerun(
    tmp_path, uninterrupted_end, kill_at
):
    """Wherever in its end record a kill lands, the cell reads as unfinished until its run has
    ended in MLflow too, and the rerun continues the same run: one run, FINISHED and
    `finished`, no final metric twice, every number equal to the uninterrupted run's (the
    campaign's judge)."""
    assert train_then_rerun(tmp_path, kill_at) == END_WRITES[:kill_at]
    campaign = load_campaign()
    assert campaign.check(tmp_path, uninterrupted_end, {}, epochs=2) == []
    (run,) = cell_runs(client_for(tmp_path))
    assert run.data.tags["ablate.resumed_from_epoch"] == "2"  # continued, not trained again

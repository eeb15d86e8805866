"""`ablate tune`: studies and nested MLflow runs, an exact budget under kills, failures and
workers, `run --tuned`, the report's tuning section, and bad input.

The CLI is run as users run it (subprocesses on the smoke-tune grid: tiny nets, synthetic data);
the trial lifecycle (pruned, diverged, failed, interrupted) is driven in-process by a stand-in
trainer whose validation errors are chosen, so that each outcome happens for certain.
"""

from __future__ import annotations

import csv
import io
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from rich.console import Console

from resnet_ablate.cellqueue import reap_stale
from resnet_ablate.config import load_grid
from resnet_ablate.errors import UserError
from resnet_ablate.train import CellResult
from resnet_ablate.tune.budget import within_budget
from resnet_ablate.tune.grid import apply_tuned, tune_grid
from resnet_ablate.tune.studies import DIVERGED_SCORE, FINISHED, TrialScore, best_trial, targets

from .conftest import EXPERIMENTS, ablate, store_locked, wait_for

SMOKE_TUNE = EXPERIMENTS / "smoke-tune.yaml"
BUDGET = 3
PLAIN_ONLY = ["--set", "model.shortcut=none"]


def journal(workdir: Path, grid: str = "smoke-tune") -> optuna.storages.BaseStorage:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(
        JournalFileBackend(str(workdir / "results" / "queue" / f"{grid}.journal"))
    )


def studies(workdir: Path, overrides: list[str] | None = None):
    """{configuration label: (target, trials)} read back from the Optuna journal."""
    storage = journal(workdir)
    found = {}
    for target in targets(load_grid(SMOKE_TUNE, overrides or [])):
        study_id = storage.get_study_id_from_name(target.study)
        found[target.label] = (target, storage.get_all_trials(study_id))
    return found


def finished(trials) -> list:
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def client_for(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'results' / 'mlflow.db'}")


def runs(client: MlflowClient, role: str, grid: str = "smoke-tune"):
    experiment = client.get_experiment_by_name(grid)
    assert experiment is not None
    return client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`ablate.role` = '{role}'"
    )


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# --------------------------------------------------------------------------------------------
# A real tune of the smoke-tune grid, read back.


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tune")
    done = ablate("tune", str(SMOKE_TUNE), "--device", "cpu", cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    return workdir, done


@pytest.mark.slow
def test_every_study_gets_exactly_its_budget(tuned):
    workdir, done = tuned
    found = studies(workdir)
    assert sorted(found) == ["plain-8 basic post", "res-8 basic post"]
    for target, trials in found.values():
        assert target.study == f"tune:smoke-tune:{target.key}"
        assert len(trials) == BUDGET and len(finished(trials)) == BUDGET
        for trial in trials:
            values = trial.user_attrs["values"]
            assert 0.01 <= values["train.lr"] <= 0.3
            assert values["train.weight_decay"] in (1.0e-4, 5.0e-4)
            assert trial.user_attrs["status"] in FINISHED
            if trial.state == TrialState.COMPLETE:
                assert sorted(trial.intermediate_values) == [1, 2]  # reported every epoch
                assert trial.value == trial.intermediate_values[2]  # scored by the final epoch
    assert "2 of 2 studies have their 3 trials" in done.stdout


@pytest.mark.slow
def test_tuning_and_trial_runs_nest_under_the_grid_run(tuned):
    workdir, _ = tuned
    client = client_for(workdir)
    (grid_run,) = runs(client, "grid")
    tuning = {r.data.tags["ablate.cell_key"]: r for r in runs(client, "tune")}
    trials = runs(client, "trial")
    assert len(tuning) == 2 and len(trials) == 2 * BUDGET
    for target, optuna_trials in studies(workdir).values():
        parent = tuning[target.key]
        tags, params = parent.data.tags, parent.data.params
        assert parent.info.run_name == f"tune {target.label}"
        assert tags["mlflow.parentRunId"] == grid_run.info.run_id
        assert tags["ablate.status"] == "finished" and parent.info.status == "FINISHED"
        assert params["tune.sampler"] == "tpe" and params["tune.pruner"] == "median"
        assert params["tune.epochs"] == "2" and params["tune.space.train.lr"].startswith("log")
        complete = [t for t in optuna_trials if t.state == TrialState.COMPLETE]
        best = min(complete, key=lambda t: (t.value, t.number))
        assert tags["ablate.best_trial"] == str(best.number)
        assert parent.data.metrics["best_val_err"] == pytest.approx(best.value)

        mine = [r for r in trials if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        by_number = {int(r.data.tags["ablate.trial"]): r for r in mine}
        assert sorted(by_number) == [t.number for t in optuna_trials]
        for trial in optuna_trials:
            run = by_number[trial.number]
            assert run.data.tags["ablate.role"] == "trial"
            assert run.data.tags["ablate.status"] == trial.user_attrs["status"]
            assert run.info.run_name == f"{target.label} trial {trial.number}"
            assert run.data.params["train.lr"] == str(trial.user_attrs["values"]["train.lr"])
            assert run.data.params["train.epochs"] == "2"
            epochs = steps(client, run.info.run_id, "val_err")
            assert epochs == sorted(trial.intermediate_values)
            assert steps(client, run.info.run_id, "train_err") == epochs
            assert not client.get_metric_history(run.info.run_id, "test_err")  # never tested
            if trial.state == TrialState.COMPLETE:
                assert epochs == [1, 2]
                assert run.data.metrics["objective"] == pytest.approx(trial.value)
            else:
                assert trial.state == TrialState.PRUNED and epochs == [1]
                assert "pruned after epoch 1" in run.data.tags["ablate.reason"]


@pytest.mark.slow
def test_a_rerun_with_the_budget_met_trains_nothing(tuned):
    workdir, _ = tuned
    before = {label: len(trials) for label, (_, trials) in studies(workdir).items()}
    again = ablate("tune", str(SMOKE_TUNE), "--device", "cpu", cwd=workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 trial(s) run now" in again.stdout
    assert {label: len(trials) for label, (_, trials) in studies(workdir).items()} == before


@pytest.mark.slow
def test_run_tuned_trains_with_each_study_s_best_values_and_reports_them(tuned):
    workdir, _ = tuned
    short = ["--set", "train.epochs=1"]  # the cells change, the trials (2 epochs) do not
    default = ablate("run", str(SMOKE_TUNE), *short, "--no-report", cwd=workdir)
    assert default.returncode == 0, default.stdout + default.stderr
    done = ablate("run", str(SMOKE_TUNE), *short, "--tuned", cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr

    client = client_for(workdir)
    cells = runs(client, "cell")
    assert len(cells) == 4
    tuned_runs = [r for r in cells if r.data.tags["ablate.settings"].startswith("tuned")]
    assert len(tuned_runs) == 2
    settings = tuned_runs[0].data.tags["ablate.settings"]
    assert {r.data.tags["ablate.settings"] for r in cells} == {"default", settings}
    for target, trials in studies(workdir).values():
        best = min(
            (t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: (t.value, t.number)
        )
        (run,) = [r for r in tuned_runs if r.info.run_name.startswith(target.label)]
        assert run.info.run_name == f"{target.label} settings=tuned s0"
        assert run.data.params["train.lr"] == str(best.user_attrs["values"]["train.lr"])
        assert run.data.params["train.weight_decay"] == str(
            best.user_attrs["values"]["train.weight_decay"]
        )
        assert run.data.params["train.epochs"] == "1"
        assert "train.lr" in run.data.tags["ablate.settings"]

    report = workdir / "results" / "smoke-tune+train.epochs=1"  # the overrides make its folder
    html = (report / "report.html").read_text()
    assert '<section id="tuning">' in html and "fig-tuning" in html
    assert "best of 3 trials per configuration" in html
    # One seed each: residual against plain cannot be told apart under either setting.
    assert "The verdicts do not change with tuned settings (1 of 1 agree)" in html
    table = html.split('class="tuning-verdicts"')[1].split("</table>")[0]
    assert "residual vs plain" in table and table.count("undecided") == 2
    assert (report / "figures" / "tuning.png").stat().st_size > 5000
    with open(report / "summary.csv", newline="") as f:
        settings = [row["settings"] for row in csv.DictReader(f)]
    assert len(settings) == 2 and all(s.startswith("tuned (train.lr=") for s in settings)


# --------------------------------------------------------------------------------------------
# Interrupted, failed, pruned, diverged: the budget stays exact.


@pytest.mark.slow
def test_a_killed_tune_resumes_to_exactly_the_budget(tmp_path):
    args = ["-m", "resnet_ablate", "tune", str(SMOKE_TUNE), *PLAIN_ONLY, "--device", "cpu"]
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def one_finished_one_running() -> bool:
        if not (tmp_path / "results" / "queue" / "smoke-tune.journal").exists():
            return False
        try:
            (_, trials), *_ = studies(tmp_path, ["model.shortcut=none"]).values()
        except Exception:  # the study is not there yet
            return False
        running = [
            t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs
        ]
        return len(finished(trials)) >= 1 and bool(running)

    try:
        wait_for(one_finished_one_running)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (_, trials), *_ = studies(tmp_path, ["model.shortcut=none"]).values()
    (killed,) = [t for t in trials if t.state == TrialState.RUNNING]
    kept = len(finished(trials))
    assert 1 <= kept < BUDGET

    again = ablate("tune", str(SMOKE_TUNE), *PLAIN_ONLY, "--device", "cpu", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    (_, trials), *_ = studies(tmp_path, ["model.shortcut=none"]).values()
    assert len(finished(trials)) == BUDGET  # the killed trial does not count
    stale = {t.number: t for t in trials}[killed.number]
    assert stale.state == TrialState.FAIL and stale.user_attrs["stale"]
    assert len(trials) == BUDGET + 1

    client = client_for(tmp_path)
    run = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert run.data.tags["ablate.status"] == "killed" and run.info.status == "KILLED"
    counted = [r for r in runs(client, "trial") if r.data.tags["ablate.status"] in FINISHED]
    assert len(counted) == BUDGET
    (parent,) = runs(client, "tune")
    assert parent.data.tags["ablate.status"] == "finished"


@pytest.mark.slow
def test_a_store_locked_mid_tune_is_one_line_and_the_rerun_completes_the_budget(tmp_path):
    args = ["-m", "resnet_ablate", "tune", str(SMOKE_TUNE), *PLAIN_ONLY, "--device", "cpu"]
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def a_trial_running() -> bool:
        if proc.poll() is not None:
            return True
        if not (tmp_path / "results" / "queue" / "smoke-tune.journal").exists():
            return False
        try:
            (_, trials), *_ = studies(tmp_path, ["model.shortcut=none"]).values()
        except Exception:  # the study is not there yet
            return False
        running = [t for t in trials if t.state == TrialState.RUNNING]
        return any("mlflow_run_id" in t.user_attrs for t in running)

    db = tmp_path / "results" / "mlflow.db"
    try:
        wait_for(a_trial_running)
        with store_locked(db):  # the trial's next write waits, then gives up
            out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 2, out + err
    assert " ".join(err.split()) == (
        f"error: tracking store sqlite:///{db} is locked by another process for longer than "
        "MLflow waits (20 s); let that process finish or stop it, then run again (finished "
        "trials are kept: the rerun continues the studies)"
    )

    again = ablate("tune", str(SMOKE_TUNE), *PLAIN_ONLY, "--device", "cpu", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    (_, trials), *_ = studies(tmp_path, ["model.shortcut=none"]).values()
    assert len(finished(trials)) == BUDGET
    assert all(t.state != TrialState.RUNNING for t in trials)
    client = client_for(tmp_path)
    experiment = client.get_experiment_by_name("smoke-tune")
    every = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in every if r.info.status == "RUNNING"] == []
    counted = [r for r in runs(client, "trial") if r.data.tags["ablate.status"] in FINISHED]
    assert len(counted) == BUDGET
    (parent,) = runs(client, "tune")
    assert parent.data.tags["ablate.status"] == "finished"


@pytest.mark.slow
def test_two_workers_never_exceed_the_budget(tmp_path):
    done = ablate("tune", str(SMOKE_TUNE), "--workers", "2", "--device", "cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    pids = set()
    for _, trials in studies(tmp_path).values():
        assert len(finished(trials)) == BUDGET
        extra = [t for t in trials if t not in finished(trials)]
        assert all(t.state == TrialState.FAIL and t.user_attrs.get("surplus") for t in extra)
        pids |= {t.user_attrs["pid"] for t in finished(trials)}
    assert len(pids) == 2  # both workers trained trials
    counted = [r for r in runs(client_for(tmp_path), "trial")]
    assert len(counted) == 2 * BUDGET


class ChosenTrainer:
    """Stands in for `train_cell`: each call plays the next outcome (a validation error per
    epoch, `diverged`, or an exception), reporting epochs through `on_epoch` as training does."""

    def __init__(self, outcomes: list):
        self.outcomes = list(outcomes)
        self.calls = 0

    def __call__(self, config, dataset, *, on_epoch=None, **_):
        assert dataset.test is dataset.val  # a trial never sees the test images
        outcome = self.outcomes[self.calls]
        self.calls += 1
        if isinstance(outcome, BaseException):
            raise outcome
        history = []
        for epoch in range(1, config.train.epochs + 1):
            metrics = {
                "epoch": float(epoch),
                "train_loss": 1.0,
                "train_err": 50.0,
                "lr": config.train.lr,
                "images_per_second": 1000.0,
                "epoch_seconds": 0.01,
            }
            if outcome == "diverged":
                metrics["train_loss"] = math.nan
                history.append(metrics)
                on_epoch(epoch, metrics)
                return CellResult("diverged", history, {}, reason="training loss became nan")
            metrics |= {"val_loss": outcome / 50, "val_err": float(outcome)}
            metrics |= {"test_loss": 9.0, "test_err": 99.0}
            history.append(metrics)
            on_epoch(epoch, metrics)
        return CellResult("finished", history, {})


@pytest.mark.slow
def test_failed_interrupted_pruned_and_diverged_trials(tmp_path, write_grid, monkeypatch):
    from resnet_ablate.device import ExecOptions
    from resnet_ablate.engine import RunOptions

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    path = write_grid(SMOKE_TUNE.read_text().replace("trials: 3", "trials: 4"), "smoke-tune.yaml")
    grid = load_grid(path, ["model.shortcut=none"])
    trainer = ChosenTrainer(
        [20.0, RuntimeError("out of memory"), KeyboardInterrupt(), 80.0, "diverged", 10.0]
    )
    monkeypatch.setattr("resnet_ablate.train.train_cell", trainer)
    options = RunOptions(results=tmp_path / "results", exec=ExecOptions(device="cpu"))
    quiet = Console(file=io.StringIO())

    first = tune_grid(grid, options, quiet)  # trial 0 completes, trial 1 fails: stop
    assert trainer.calls == 2 and first.exit_code == 1
    assert "out of memory" in first.failures[0].note
    second = tune_grid(grid, options, quiet)  # trial 2 is interrupted
    assert second.interrupted and second.exit_code == 130
    third = tune_grid(grid, options, quiet)  # trials 3 (pruned), 4 (diverged), 5
    assert third.exit_code == 0 and trainer.calls == 6
    (state,) = third.states
    assert state.finished == 4 and state.best_number == 5 and state.best_value == 10.0

    storage = journal(tmp_path)
    (target,) = targets(grid)
    trials = storage.get_all_trials(storage.get_study_id_from_name(target.study))
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.FAIL,
        TrialState.PRUNED,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert [t.user_attrs["status"] for t in trials] == [
        "complete",
        "failed",
        "killed",
        "pruned",
        "diverged",
        "complete",
    ]
    assert trials[4].value == DIVERGED_SCORE

    client = client_for(tmp_path)
    by_number = {int(r.data.tags["ablate.trial"]): r for r in runs(client, "trial")}
    assert [by_number[n].info.status for n in range(6)] == [
        "FINISHED",
        "FAILED",
        "KILLED",
        "FINISHED",
        "FINISHED",
        "FINISHED",
    ]
    assert "out of memory" in by_number[1].data.tags["ablate.reason"]
    assert steps(client, by_number[3].info.run_id, "val_err") == [1]
    assert not client.get_metric_history(by_number[0].info.run_id, "test_err")
    (parent,) = runs(client, "tune")
    assert parent.data.tags["ablate.status"] == "finished"
    assert parent.data.tags["ablate.best_trial"] == "5"

    tuned_grid, settings = apply_tuned(grid, results=tmp_path / "results", queue=None)
    (cell,) = tuned_grid.cells
    assert cell.config.train.lr == trials[5].user_attrs["values"]["train.lr"]
    assert settings.startswith("tuned: best of 4 trials (train.lr=")


def test_budget_counts_finished_and_live_trials_only(tmp_path):
    (tmp_path / "results" / "queue").mkdir(parents=True, exist_ok=True)
    storage = journal(tmp_path)
    study = optuna.create_study(study_name="tune:x:k", storage=storage)
    study_id = storage.get_study_id_from_name("tune:x:k")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def running(pid: int) -> int:
        trial = study.ask()
        storage.set_trial_user_attr(trial._trial_id, "host", socket.gethostname())
        storage.set_trial_user_attr(trial._trial_id, "pid", pid)
        storage.set_trial_user_attr(trial._trial_id, "heartbeat", time.time())
        return trial._trial_id

    study.tell(study.ask(), 1.0)  # 0: complete
    running(dead.pid)  # 1: its process is gone
    running(os.getpid())  # 2: alive (this process)
    assert within_budget(storage, study_id, 3, budget=3)
    assert not within_budget(storage, study_id, 3, budget=2)
    assert not within_budget(storage, study_id, 2, budget=1)  # trial 0 holds the slot
    (reaped,) = reap_stale(storage, study_id)
    assert reaped.number == 1
    assert [t.state for t in storage.get_all_trials(study_id)] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.RUNNING,
    ]


# --------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.slow
def test_run_tuned_before_tuning_is_one_clear_message(tmp_path):
    done = ablate("run", str(SMOKE_TUNE), "--tuned", cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "plain-8 basic post" in done.stderr and "ablate tune" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "results" / "queue").exists()


@pytest.mark.parametrize(
    ("grid", "needle"),
    [(EXPERIMENTS / "smoke.yaml", "no tune: section"), (Path("nope.yaml"), "no such grid file")],
)
def test_bad_input_exits_2_with_one_sentence(tmp_path, grid, needle):
    done = ablate("tune", str(grid), cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "results").exists()


def test_apply_tuned_without_a_tune_section_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no tune: section"):
        apply_tuned(load_grid(EXPERIMENTS / "smoke.yaml"), results=tmp_path, queue=None)


def test_the_best_trial_rule():
    def trial(number, status, score=math.nan):
        return TrialScore(number, status, score, {"train.lr": number / 10})

    trials = [
        trial(4, "complete", 5.0),  # lowest score, but beyond the first 3 finished
        trial(0, "complete", 20.0),
        trial(1, "failed"),  # does not count toward the budget
        trial(2, "pruned", 1.0),  # counts, but has no score to compete with
        trial(3, "diverged", DIVERGED_SCORE),
        trial(5, "complete", 20.0),
    ]
    assert best_trial(trials, budget=3).number == 0  # 0, 2 and 3 are the first three
    assert best_trial(trials, budget=4).number == 4
    tie = [trial(7, "complete", 10.0), trial(6, "complete", 10.0)]
    assert best_trial(tie, budget=2).number == 6  # the earliest on a tie
    assert best_trial([trial(0, "pruned", 1.0)], budget=1) is None
    assert best_trial([trial(0, "diverged", DIVERGED_SCORE)], budget=1).number == 0


def test_study_keys_stay_those_of_existing_studies():
    """A field added to the config later (data.normalize) leaves the study keys as they were
    while at its original value, so an existing tune continues instead of starting again."""
    found = targets(load_grid(SMOKE_TUNE))
    assert [t.key for t in found] == ["a0f152d1310d", "fc98484511cd"]

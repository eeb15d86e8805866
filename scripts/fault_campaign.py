"""The fault campaign: kill `ablate run` at random moments until it finishes, and check that
nothing was lost, repeated or changed.

Each round runs a small real grid (synthetic data, 4 cells, 8 short epochs, `--workers 2`)
in a fresh folder. Every start of `ablate run` is killed (SIGKILL to its whole process group,
as a node that dies or a scheduler that loses patience) at a moment drawn uniformly over the
expected run time, the wall time of the same grid run once without interruption; a start
that finishes before its moment ends the round. Then the invariants are checked:

- every cell has exactly one finished MLflow run, and no run is left RUNNING;
- every cell's metric history holds each epoch exactly once, with no gap;
- no cell was trained again after it had finished (its run and end time stay as they were);
- the numbers (every metric at every epoch but the timings, and the gradient-flow data) equal
  those of the uninterrupted reference run, exactly.

After each kill it looks at what the kill left to say where it landed: a checkpoint's
temporary file (mid-checkpoint-write), SQLite's rollback journal next to the store, or a
checkpoint ahead of the run's MLflow record (mid-MLflow-write), a cell run open (mid-epoch),
or none of these (start-up, between cells, the end). Usage:

    python scripts/fault_campaign.py --kills 100 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.yaml"
#: Timings differ from run to run; every other metric must be equal to the last bit.
TIMINGS = (
    "epoch_seconds",
    "images_per_second",
    "mean_images_per_second",
    "tracking_seconds",
    "wall_seconds",
)
MAX_STARTS = 40  # a round that needs more starts than this is itself a violation


@dataclass
class Figures:
    rounds: int = 0
    starts: int = 0
    kills: int = 0
    landed: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        where = ", ".join(f"{n} {k}" for k, n in sorted(self.landed.items()))
        return [
            f"rounds (grids run to the end): {self.rounds}",
            f"starts of `ablate run`: {self.starts}",
            f"kills (SIGKILL to the process group): {self.kills}",
            f"where the kills landed: {where or 'none'}",
            f"invariant violations: {len(self.violations)}",
        ]


def grid_args(epochs: int, workers: int) -> list[str]:
    """The smoke grid's 4 cells (2 shortcuts, 2 seeds) as short epochs of 512 images: many
    checkpoint and MLflow writes, each a moment where a kill may land."""
    return [
        "run",
        str(SMOKE),
        "--set",
        f"train.epochs={epochs}",
        "--set",
        "data.train_subset=512",
        "--set",
        "data.test_subset=200",
        "--set",
        "seeds=[0, 1]",
        "--workers",
        str(workers),
        "--no-report",
        "--device",
        "cpu",
        "--precision",
        "fp32",
    ]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [sys.executable, "-m", "resnet_ablate", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the kill takes the workers too
    )


def client_for(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'results' / 'mlflow.db'}")


def all_runs(workdir: Path) -> list:
    if not (workdir / "results" / "mlflow.db").exists():
        return []
    client = client_for(workdir)
    experiment = client.get_experiment_by_name("smoke")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def cell_record(workdir: Path) -> dict[str, dict]:
    """Every cell's run: its id, statuses, end time, metric histories and gradient flow."""
    client = client_for(workdir)
    cells: dict[str, dict] = {}
    for run in all_runs(workdir):
        if run.data.tags.get("ablate.role") != "cell":
            continue
        key = run.data.tags["ablate.cell_key"]
        history = {
            name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
            for name in run.data.metrics
        }
        entry = {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "ablate_status": run.data.tags.get("ablate.status"),
            "end_time": run.info.end_time,
            "history": history,
        }
        if run.info.status == "FINISHED":
            path = client.download_artifacts(run.info.run_id, "grad_flow.json", str(workdir))
            entry["grad_flow"] = json.loads(Path(path).read_text())
        cells.setdefault(key, []).append(entry)  # type: ignore[attr-defined]
    return cells  # type: ignore[return-value]


def where_it_landed(workdir: Path) -> str:
    """What the kill left behind says where it landed."""
    results = workdir / "results"
    checkpoints = results / "checkpoints" / "smoke"
    if checkpoints.exists() and any(checkpoints.glob(".*.tmp")):
        return "mid-checkpoint-write"
    if (results / "mlflow.db-journal").exists() or (results / "mlflow.db-wal").exists():
        return "mid-MLflow-write"
    running = [
        r
        for r in all_runs(workdir)
        if r.info.status == "RUNNING" and r.data.tags.get("ablate.role") == "cell"
    ]
    if not running:  # the grid's parent run alone may be open: between cells or at the end
        return "start-up, between cells or at the end"
    client = client_for(workdir)
    for run in running:
        path = checkpoints / f"{run.data.tags.get('ablate.cell_key')}.pt"
        if not path.exists():
            continue
        epoch = torch.load(path, weights_only=True)["epoch"]
        logged = {m.step for m in client.get_metric_history(run.info.run_id, "train_err")}
        if epoch not in logged:
            return "mid-MLflow-write"  # the checkpoint is written, its epoch not yet recorded
    return "mid-epoch"


def check(workdir: Path, reference: dict, finished_early: dict, epochs: int) -> list[str]:
    """The invariants of a grid run to the end, against the uninterrupted reference."""
    left_running = [r.info.run_id for r in all_runs(workdir) if r.info.status == "RUNNING"]
    return violations(cell_record(workdir), left_running, reference, finished_early, epochs)


def violations(
    record: dict, left_running: list[str], reference: dict, finished_early: dict, epochs: int
) -> list[str]:
    """What breaks an invariant in `record` (a grid's cells as `cell_record` reads them)."""
    problems = []
    if left_running:
        problems.append(f"runs left RUNNING: {left_running}")
    if set(record) != set(reference):
        problems.append(f"cells {sorted(record)} != reference {sorted(reference)}")
    for key, runs in record.items():
        if len(runs) != 1:
            problems.append(f"{key}: {len(runs)} runs, not one")
            continue
        (run,) = runs
        if (run["status"], run["ablate_status"]) != ("FINISHED", "finished"):
            problems.append(f"{key}: ended {run['status']} / {run['ablate_status']}")
        want = reference.get(key, [{}])[0]
        every_epoch = list(range(1, epochs + 1))
        for name, points in want.get("history", {}).items():
            if sorted(step for step, _ in points) != every_epoch:
                continue  # a summary (final, best, sizes), logged once
            steps = sorted(step for step, _ in run["history"].get(name, []))
            if steps != every_epoch:
                problems.append(f"{key}: {name} steps {steps}")
        if key in finished_early and finished_early[key] != (run["run_id"], run["end_time"]):
            problems.append(f"{key}: trained again after it had finished")
        for name, points in want.get("history", {}).items():
            if name in TIMINGS:
                continue
            if sorted(run["history"].get(name, [])) != sorted(points):
                problems.append(f"{key}: {name} differs from the uninterrupted run")
        if run.get("grad_flow", {}).get("epochs") != want.get("grad_flow", {}).get("epochs"):
            problems.append(f"{key}: gradient flow differs from the uninterrupted run")
    return problems


def reference_run(base: Path, args: list[str]) -> tuple[dict, float]:
    workdir = base / "reference"
    workdir.mkdir()
    t0 = time.monotonic()
    proc = start(args, workdir)
    _, err = proc.communicate()
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the reference run failed ({proc.returncode}):\n{err}")
    return cell_record(workdir), seconds


def one_round(base: Path, n: int, args: list[str], plan: dict, figures: Figures) -> None:
    """One grid, killed at random moments until a start finishes; then its invariants."""
    workdir = base / f"round-{n:03d}"
    workdir.mkdir()
    rng, expected = plan["rng"], plan["seconds"]
    finished_early: dict[str, tuple[str, int]] = {}
    for _ in range(MAX_STARTS):
        figures.starts += 1
        at = rng.uniform(0.0, expected)
        proc = start(args, workdir)
        try:
            _, err = proc.communicate(timeout=at)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            figures.kills += 1
            figures.landed[where_it_landed(workdir)] += 1
            for key, runs in cell_record(workdir).items():
                for run in runs:  # finished as the plan reads it: its end whole in MLflow
                    if (run["status"], run["ablate_status"]) == ("FINISHED", "finished"):
                        finished_early.setdefault(key, (run["run_id"], run["end_time"]))
            continue
        if proc.returncode != 0:
            figures.violations.append(f"round {n}: exit {proc.returncode}: {err.strip()[-300:]}")
        break
    else:
        figures.violations.append(f"round {n}: not finished after {MAX_STARTS} starts")
    figures.rounds += 1
    for problem in check(workdir, plan["reference"], finished_early, plan["epochs"]):
        figures.violations.append(f"round {n}: {problem}")
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100, help="stop after this many kills")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of each cell")
    parser.add_argument("--workers", type=int, default=2, help="ablate run --workers")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    options = parser.parse_args(argv)
    base = options.keep or Path(tempfile.mkdtemp(prefix="fault-campaign-"))
    base.mkdir(parents=True, exist_ok=True)
    args = grid_args(options.epochs, options.workers)
    t0 = time.monotonic()
    reference, seconds = reference_run(base, args)
    print(f"reference run: {len(reference)} cells, {seconds:.1f} s", flush=True)
    plan = {
        "rng": random.Random(options.seed),
        "seconds": seconds,
        "reference": reference,
        "epochs": options.epochs,
    }
    figures = Figures()
    while figures.kills < options.kills:
        n = figures.rounds + 1
        try:
            one_round(base, n, args, plan, figures)
        except Exception as err:  # a record that cannot even be read is a violation too
            figures.rounds = n
            first = (str(err).strip().splitlines() or [""])[0][:300]
            figures.violations.append(f"round {n}: {type(err).__name__}: {first}")
        print(f"round {figures.rounds}: {figures.kills} kills so far", flush=True)
    if options.keep is None:
        shutil.rmtree(base, ignore_errors=True)
    print(f"fault campaign (seed {options.seed}, {time.monotonic() - t0:.0f} s):")
    for line in figures.lines():
        print(f"  {line}")
    for violation in figures.violations:
        print(f"  VIOLATION {violation}")
    return 1 if figures.violations else 0


if __name__ == "__main__":
    sys.exit(main())

"""Seeds until decided: `seeds: {min, max}` in a grid file, the rounds replayed from a record
(pure, no training), and a tiny sequential grid through the CLI, interrupted and resumed."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from resnet_ablate.config import GridError, load_grid
from resnet_ablate.plan import PlanRow
from resnet_ablate.report.comparisons import headline_context
from resnet_ablate.report.verdicts import judge
from resnet_ablate.rounds import cell_counts, cell_table, grid_rounds, replay, schedule_of
from resnet_ablate.seeds import SeedRange

from .conftest import EXPERIMENTS, ablate, wait_for

QUICK = EXPERIMENTS / "quick.yaml"
SMOKE = EXPERIMENTS / "smoke.yaml"

# --------------------------------------------------------------------------------------------
# The grid file.


def test_a_seed_range_expands_to_every_seed_up_to_the_maximum():
    grid = load_grid(QUICK, ["seeds={min: 3, max: 10}"])
    assert grid.spec.seeds == SeedRange(3, 10) and grid.spec.seeds_text == "3:10"
    assert sorted({c.config.seed for c in grid.cells}) == list(range(10))
    assert len(grid.cells) == 4 * 10 and cell_counts(grid) == (12, 40)
    assert grid.axes[-1] == "seed"
    assert (schedule_of(grid).min, schedule_of(grid).max, schedule_of(grid).looks) == (3, 10, 8)


def test_a_list_of_seeds_keeps_its_meaning():
    grid = load_grid(QUICK)
    assert grid.spec.seeds == [0, 1, 2] and grid.spec.seed_range is None
    assert len(grid.cells) == 12 and cell_counts(grid) == (12, 12)
    assert schedule_of(grid) is None
    rows = [PlanRow(cell, "new", None) for cell in grid.cells]
    assert grid_rounds(grid, rows) is None


def test_the_quick_sequential_experiment_is_the_quick_grid_with_a_seed_range():
    fixed, sequential = load_grid(QUICK), load_grid(EXPERIMENTS / "quick-sequential.yaml")
    assert sequential.name == "quick-sequential" and sequential.spec.seeds == SeedRange(3, 6)
    assert sequential.spec.base == fixed.spec.base and sequential.spec.grid == fixed.spec.grid
    # The same cells (the first three seeds hash as the fixed grid's do), in another experiment.
    assert {c.key for c in fixed.cells} < {c.key for c in sequential.cells}


BAD_SEEDS = {
    "min below 2": ("{min: 1, max: 4}", "min is 1; a seed range starts at 2 seeds"),
    "max below min": ("{min: 4, max: 3}", "max (3) is below min (4)"),
    "no max": ("{min: 3}", "needs max as a whole number"),
    "a float": ("{min: 3, max: 4.5}", "needs max as a whole number"),
    "a boolean": ("{min: true, max: 4}", "needs min as a whole number"),
    "unknown key": ("{min: 3, most: 4}", "unknown key 'most'"),
    "too many": ("{min: 3, max: 5000}", "above 1000 seeds"),
    "empty list": ("[]", "give a list of seeds"),
    "a number": ("3", "give a list of seeds"),
    "repeated": ("[1, 1]", "must not repeat"),
}


@pytest.mark.parametrize(("value", "expected"), BAD_SEEDS.values(), ids=BAD_SEEDS.keys())
def test_bad_seeds_are_one_clear_message(write_grid, value, expected):
    text = QUICK.read_text().replace("seeds: [0, 1, 2]", f"seeds: {value}")
    with pytest.raises(GridError) as err:
        load_grid(write_grid(text))
    message = str(err.value)
    assert f"{Path('grid.yaml').name}: seeds: " in message and expected in message
    assert "\n" not in message


# --------------------------------------------------------------------------------------------
# The rounds, from a record (no training).

#: Final training error per configuration, in seed order (test error is 1 point more). The
#: plain nets degrade clearly; the residual nets differ by 0.5 points with a 1.2-point spread,
#: which no number of seeds up to 6 decides against a 1-point margin.
CLEAR = {
    "plain-20": [10.0, 10.4, 10.8, 10.2, 10.6, 10.1],
    "plain-56": [20.0, 20.5, 21.0, 20.2, 20.9, 20.4],
    "res-20": [10.0, 10.1, 10.2, 10.1, 10.0, 10.2],
    "res-56": [10.0, 10.1, 10.2, 10.0, 10.2, 10.1],
}
OPEN = {
    **CLEAR,
    "res-20": [10.0, 10.6, 9.4, 8.5, 11.5, 9.5],
    "res-56": [9.0, 11.5, 10.2, 12.0, 8.8, 11.0],
}


def sequential(low: int = 3, high: int = 6):
    return load_grid(QUICK, [f"seeds={{min: {low}, max: {high}}}"])


def record(grid, values, done: dict[str, int], status: dict[tuple[str, int], str] | None = None):
    """Plan rows as the store would give them: seeds below done[net] have their outcome."""
    rows = []
    for cell in grid.cells:
        net, seed = cell.name.net, cell.config.seed
        state = (status or {}).get((net, seed))
        if state is None:
            state = "finished" if seed < done.get(net, 0) else "new"
        metrics = {}
        if state in ("finished", "diverged"):
            value = values[net][seed] if state == "finished" else math.nan
            metrics = {"final_train_err": value, "final_test_err": value + 1.0}
        rows.append(PlanRow(cell, state, "run" if state != "new" else None, metrics))
    return rows


def planned_seeds(grid, rounds) -> dict[str, list[int]]:
    cells = {c.key: c for c in grid.cells}
    out: dict[str, list[int]] = {}
    for key in rounds.planned:
        out.setdefault(cells[key].name.net, []).append(cells[key].config.seed)
    return out


def test_round_one_is_every_configuration_at_the_minimum():
    grid = sequential()
    rounds = grid_rounds(grid, record(grid, OPEN, {}))
    assert len(rounds.rounds) == 1 and not rounds.settled
    assert planned_seeds(grid, rounds) == {n: [0, 1, 2] for n in OPEN}
    assert set(rounds.pending) == set(rounds.planned) and len(rounds.planned) == 12


def test_when_every_comparison_is_decided_no_seed_is_added():
    grid = sequential()
    rounds = grid_rounds(grid, record(grid, CLEAR, dict.fromkeys(CLEAR, 3)))
    assert rounds.settled and len(rounds.rounds) == 1 and rounds.pending == ()
    assert planned_seeds(grid, rounds) == {n: [0, 1, 2] for n in CLEAR}


def test_an_open_comparison_gets_one_seed_per_round_for_its_configurations_only():
    grid = sequential()
    rounds = grid_rounds(grid, record(grid, OPEN, dict.fromkeys(OPEN, 3)))
    assert not rounds.settled and len(rounds.rounds) == 2
    cells = {c.key: c for c in grid.cells}
    added = sorted((cells[k].name.net, cells[k].config.seed) for k in rounds.current.added)
    assert added == [("res-20", 3), ("res-56", 3)]
    assert set(rounds.pending) == set(rounds.current.added)
    # The next round is decided only once the added cells have their outcome.
    done = {"plain-20": 3, "plain-56": 3, "res-20": 4, "res-56": 4}
    later = grid_rounds(grid, record(grid, OPEN, done))
    assert len(later.rounds) == 3 and later.rounds[:2] == rounds.rounds


def test_rounds_stop_at_the_maximum_and_name_what_stayed_undecided():
    grid = sequential()
    done = {"plain-20": 3, "plain-56": 3, "res-20": 6, "res-56": 6}
    rows = record(grid, OPEN, done)
    rounds = grid_rounds(grid, rows)
    assert rounds.settled and len(rounds.rounds) == 4
    assert planned_seeds(grid, rounds) == {
        "plain-20": [0, 1, 2],
        "plain-56": [0, 1, 2],
        "res-20": list(range(6)),
        "res-56": list(range(6)),
    }
    assert {c.net: n for c, n in rounds.seeds.items()} == {
        "plain-20": 3,
        "plain-56": 3,
        "res-20": 6,
        "res-56": 6,
    }
    table = cell_table(grid, rows)
    mine = table[table["key"].isin(set(rounds.planned))]
    verdicts = judge(
        mine, grid.spec.verdicts, context=headline_context(grid), schedule=schedule_of(grid)
    )
    assert verdicts.max_undecided() == ["res-56 against res-20 (basic post)"]
    assert "Undecided at the maximum of 6 seeds each" in verdicts.degradation[1].text


def test_replaying_the_same_record_gives_the_same_rounds():
    grid = sequential()
    table = cell_table(
        grid, record(grid, OPEN, {"plain-20": 3, "plain-56": 3, "res-20": 4, "res-56": 3})
    )
    context = headline_context(grid)
    first = replay(table, grid.spec.verdicts, schedule_of(grid), context=context)
    shuffled = table.sample(frac=1.0, random_state=0)  # row order does not matter
    second = replay(shuffled, grid.spec.verdicts, schedule_of(grid), context=context)
    assert [(r.number, set(r.added)) for r in first.rounds] == [
        (r.number, set(r.added)) for r in second.rounds
    ]
    assert set(first.planned) == set(second.planned)
    assert len(first.rounds) == 2 and not first.settled  # res-56 s3 still to run


def test_a_cell_without_an_outcome_holds_the_round_and_a_diverged_one_counts():
    grid = sequential()
    failed = grid_rounds(
        grid, record(grid, CLEAR, dict.fromkeys(CLEAR, 3), {("res-20", 1): "failed"})
    )
    assert len(failed.rounds) == 1 and not failed.settled and len(failed.pending) == 1
    # A diverged seed is an outcome, counted at chance (90%): plain-56's spread becomes so wide
    # that its comparisons stay open, and round 2 gives its configurations a seed.
    diverged = {("plain-56", 0): "diverged"}
    rounds = grid_rounds(grid, record(grid, CLEAR, dict.fromkeys(CLEAR, 3), diverged))
    assert len(rounds.rounds) == 2 and set(rounds.pending) == set(rounds.current.added)
    cells = {c.key: c for c in grid.cells}
    added = {(cells[k].name.net, cells[k].config.seed) for k in rounds.current.added}
    assert ("plain-56", 3) in added and ("res-20", 3) not in added


def test_min_equal_to_max_is_one_look():
    grid = sequential(3, 3)
    rounds = grid_rounds(grid, record(grid, OPEN, dict.fromkeys(OPEN, 3)))
    assert rounds.settled and len(rounds.rounds) == 1 and len(rounds.planned) == 12


# --------------------------------------------------------------------------------------------
# The CLI.


@pytest.mark.slow
def test_dry_run_states_the_fewest_and_most_cells(tmp_path):
    done = ablate("run", str(SMOKE), "--seeds", "2:4", "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Seeds until decided, 2 to 4 per configuration: 4 to 8 cells, at most 3 rounds" in (
        done.stdout
    )
    assert "4 cells planned now; dry run, nothing trained or written." in done.stdout
    assert "round" in done.stdout and "s2" not in done.stdout  # only round 1's cells
    bad = ablate("run", str(SMOKE), "--seeds", "1:4", "--dry-run", cwd=tmp_path)
    assert bad.returncode == 2 and "min is 1" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    worse = ablate("ls", str(SMOKE), "--seeds", "three", cwd=tmp_path)
    assert worse.returncode == 2 and "--seeds three: give MIN:MAX" in worse.stderr
    assert not (tmp_path / "results").exists()


def cell_runs(workdir: Path) -> dict[str, object]:
    client = MlflowClient(f"sqlite:///{workdir / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("seq-smoke")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`ablate.role` = 'cell'"
    )
    return {run.data.tags["ablate.cell_key"]: run for run in runs}


@pytest.mark.slow
def test_a_sequential_grid_runs_its_rounds_and_resumes_after_an_interruption(tmp_path, write_grid):
    # Two configurations, 2 to 3 seeds; at α = 0.001 two seeds cannot decide, so round 2 runs.
    text = SMOKE.read_text().replace("name: smoke", "name: seq-smoke")
    text = text.replace("seeds: [0]", "seeds: {min: 2, max: 3}\nverdicts: {alpha: 0.001}")
    path = write_grid(text)
    args = ["--set", "train.epochs=3", "--set", "data.train_subset=256"]
    args += ["--set", "data.test_subset=100"]
    grid = load_grid(path, args[1::2])
    second_round = [c for c in grid.cells if c.config.seed == 2]
    checkpoints = tmp_path / "results" / "checkpoints" / "seq-smoke"
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnet_ablate", "run", str(path), *args, "--no-report"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:  # interrupt round 2 as soon as its first cell has a checkpoint
        wait_for(lambda: any((checkpoints / f"{c.key}.pt").exists() for c in second_round), 600)
    finally:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    before = cell_runs(tmp_path)
    assert len(before) == 5  # round 1's four cells and the interrupted one
    (killed,) = [c.key for c in second_round if c.key in before]
    assert before[killed].data.tags["ablate.status"] == "killed"

    listing = ablate("ls", str(path), *args, cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "round 2: 6 cells planned, 2 without a result yet" in listing.stdout

    again = ablate("run", str(path), *args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 cell(s) trained, 4 already done, 6 in the grid" in again.stdout
    assert "settled after round 2 with 6 cells; 2 configuration(s) took all 3 seeds" in (
        again.stdout
    )
    after = cell_runs(tmp_path)
    assert set(after) == {c.key for c in grid.cells}  # one run per cell, nothing beyond max
    assert all(run.data.tags["ablate.status"] == "finished" for run in after.values())
    assert after[killed].info.run_id == before[killed].info.run_id  # resumed in its own run

    folder = "seq-smoke+data.test_subset=100+data.train_subset=256+train.epochs=3"  # overrides
    html = (tmp_path / "results" / folder / "report.html").read_text()
    assert "Seeds until decided (2 to 3 per configuration): a group-sequential design" in html
    assert "Settled after 2 rounds; seeds per configuration: plain-8 3, res-8 3." in html
    assert "Undecided at the maximum of 3 seeds: plain-8 against res-8 (basic post)." in html
    rerun = ablate("run", str(path), *args, "--no-report", cwd=tmp_path)
    assert "0 cell(s) trained, 6 already done, 6 in the grid" in rerun.stdout

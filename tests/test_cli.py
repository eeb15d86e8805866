"""The `ablate` command as users meet it: help, dry runs, and mistakes that exit with code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import EXPERIMENTS, ROOT, ablate, ablate_here

QUICK = EXPERIMENTS / "quick.yaml"


def test_help_does_not_import_torch_or_mlflow():
    code = (
        "import sys, runpy\n"
        "sys.argv = ['ablate', '--help']\n"
        "try:\n"
        "    runpy.run_module('resnet_ablate', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'mlflow', 'optuna', 'pandas') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr
    for command in ("run", "report", "ls", "ui"):
        assert command in done.stdout


@pytest.mark.parametrize("command", ["run", "report", "ls", "ui"])
def test_subcommand_help(tmp_path, command):
    done = ablate(command, "--help", cwd=tmp_path)
    assert done.returncode == 0 and "Usage" in done.stdout


@pytest.mark.slow
def test_dry_run_lists_the_quick_grid_and_writes_nothing(tmp_path):
    done = ablate("run", str(QUICK), "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for label in ("plain-20 basic post s0", "plain-56 basic post s1", "res-56 basic post s0"):
        assert label in done.stdout
    assert "12 cells" in done.stdout
    assert "0.85M" in done.stdout  # ResNet-56's parameter count, as published
    assert list(tmp_path.iterdir()) == []


GOOD = QUICK.read_text()


def swap(old: str, new: str, text: str = GOOD) -> str:
    """GOOD with one change; fails loudly if the grid no longer contains `old`."""
    assert old in text, old
    return text.replace(old, new)


BAD_FILES = {
    "unknown key": (swap("width: 16", "widht: 16"), "base.model.widht"),
    "yaml syntax": (swap("seeds: [0, 1, 2]", "seeds: [0, 1"), "YAML syntax error"),
    "wrong type": (swap("epochs: 3", "epochs: three"), "base.train.epochs"),
    "unknown choice": (swap("block: basic", "block: bottlenek"), "bottlenek"),
    "impossible depth": (swap("[20, 56]", "[20, 21]"), "6n+2"),
    "bottleneck depth": (
        swap("block: basic", "block: bottleneck").replace("[20, 56]", "[20, 32]"),
        "9n+2",
    ),
    "axis names no field": (swap("model.depth:", "model.layers:"), "model.layers"),
    "empty axis": (swap("[20, 56]", "[]"), "empty"),
    "no seeds": (swap("seeds: [0, 1, 2]", "seeds: []"), "seeds"),
    "bad name": (swap("name: quick", "name: Quick Grid"), "name"),
    "exclude names no field": (GOOD + "exclude:\n  - {model.deep: 20}\n", "model.deep"),
    "binary file": ("\x00\x01\x02", "grid"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_FILES), ids=str)
def test_bad_grid_files_exit_2_with_one_clear_line(tmp_path, case):
    text, needle = BAD_FILES[case]
    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    done = ablate("run", str(grid), cwd=tmp_path)  # as users run it: a process of its own
    said = [(done.returncode, done.stderr)]
    for command in (["run", "--dry-run"], ["ls"], ["report"]):  # the same main, in this process
        code, _, err = ablate_here([*command, str(grid)], tmp_path)
        said.append((code, err))
    for code, err in said:
        assert code == 2, err
        assert needle in err and "grid.yaml" in err, err
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) <= 3, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]  # nothing written


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "missing.yaml"], "no such grid file"),
        (["run", str(QUICK), "--set", "train.epochs"], "key=value"),
        (["run", str(QUICK), "--set", "train.epoch=2"], "train.epoch"),
        (["run", str(QUICK), "--set", "model.depth=21"], "6n+2"),
        (["run", str(QUICK), "--precision", "fp16"], "--precision"),
        (["run", str(QUICK), "--workers", "0"], "workers"),
        (["report", str(QUICK)], "no MLflow store"),
    ],
)
@pytest.mark.slow
def test_bad_arguments_exit_2(tmp_path, args, needle):
    done = ablate(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_set_override_reaches_the_cells(tmp_path):
    done = ablate(
        "run",
        str(QUICK),
        "--dry-run",
        "--set",
        "model.depth=20",
        "--set",
        "seeds=[3]",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "plain-20 basic post s3" in done.stdout and "2 cells" in done.stdout
    assert "-56" not in done.stdout

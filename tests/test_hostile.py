"""User text shown exactly as written: the console never reads a user's brackets as markup,
and generated bad grid files exit 0 or 2 with one clear line, never a traceback."""

from __future__ import annotations

import io
import signal
import sys

import pytest
from rich.console import Console

from resnet_ablate import cli, tracking
from resnet_ablate.config import load_grid
from resnet_ablate.events import Crashed, Ended, Started
from resnet_ablate.progress import GridProgress

from .conftest import EXPERIMENTS

SMOKE = EXPERIMENTS / "smoke.yaml"


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`ablate ARGS` in this process (as the console script runs it): exit code, out, err."""
    monkeypatch.setattr(sys, "argv", ["ablate", *args])
    monkeypatch.setenv("COLUMNS", "300")
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as done:
            cli.main()
    finally:
        signal.signal(signal.SIGTERM, handler)
    out, err = capsys.readouterr()
    return done.value.code, out, err


def test_a_bad_grid_name_shows_the_real_pattern(tmp_path, monkeypatch, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(SMOKE.read_text().replace("name: smoke", "name: Bad Name/../../etc"))
    code, _, err = run_cli(["ls", str(grid)], monkeypatch, capsys)
    assert code == 2
    assert "^[a-z0-9-]+$" in err and "Traceback" not in err


def test_a_set_value_with_brackets_is_echoed_verbatim(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["ls", str(SMOKE), "--set", "model.depth=[bold]x"], monkeypatch, capsys)
    assert code == 2
    assert "model.depth=[bold]x" in err and "Traceback" not in err


def test_a_results_path_with_brackets_is_shown_verbatim(tmp_path, monkeypatch, capsys):
    results = tmp_path / "[red]res[/]"
    code, _, err = run_cli(["report", str(SMOKE), "--results", str(results)], monkeypatch, capsys)
    assert code == 2
    assert f"{results / 'mlflow.db'}: no MLflow store yet" in " ".join(err.split())


def test_the_display_shows_failure_reasons_and_labels_verbatim():
    cell = load_grid(SMOKE).cells[0]
    out = io.StringIO()
    console = Console(file=out, width=300)
    reason = "ValueError: [bold]x[/] and [link=file:///etc]here[/link]"
    with GridProgress(console, "smoke", [cell], done=0, total=1, done_states=tracking.DONE) as p:
        p.update(Started(0, cell.key, cell.label, 3))
        p.update(Ended(0, cell.key, cell.label, "failed", reason))
        p.update(Crashed(1, "OSError: [red]disk[/]"))
    text = out.getvalue()
    assert f"failed {cell.label}: {reason}" in text
    assert "worker 1 crashed: OSError: [red]disk[/]" in text

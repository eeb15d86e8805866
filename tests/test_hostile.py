"""User text shown exactly as written: the console never reads a user's brackets as markup,
and generated bad grid files exit 0 or 2 with one clear line, never a traceback."""

from __future__ import annotations

import copy
import io
import signal
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from resnet_ablate import cli, tracking
from resnet_ablate.config import load_grid
from resnet_ablate.events import Crashed, Ended, Started
from resnet_ablate.progress import GridProgress

from .conftest import EXPERIMENTS, ablate_here

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


# --------------------------------------------------------------------------------------------
# Generated bad input: valid grid files, mutated.

VALID = [yaml.safe_load(p.read_text()) for p in (SMOKE, EXPERIMENTS / "quick.yaml")]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 10**400, 6 * 10**6 + 2]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["basic", "none", "identity", "pre", "fashion-mnist", "1e-4", "[bold]x[/]"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
#: Raw YAML that safe_load must refuse or read as data: tags, aliases, odd scalars.
RAW = st.sampled_from(
    [
        "!!python/object/apply:os.system ['touch pwned']",
        "!!python/name:os.system",
        "!!binary aGVsbG8=",
        "&a [*a]",
        "!!set {a, b}",
        "!!timestamp 2001-12-14",
        "0x1F",
        "0o17",
        ".inf",
        "~",
        "'\u202e\u0000'",
        "\u00e9\u00e8\U0001f600",
        "{",
        "- [",
        "!custom tag",
    ]
)


def paths(node, prefix=()):
    """Every key path of a nested grid (dicts and lists), the root included."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from paths(value, (*prefix, i))


def mutate(doc, path, how, value):
    """`doc` with the node at `path` replaced, deleted, given a new key, or nested deeper."""
    doc = copy.deepcopy(doc)
    if not path:
        return value if how == "replace" else {"grid": doc} if how == "nest" else doc
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if how == "replace":
        parent[last] = value
    elif how == "delete":
        del parent[last]
    elif how == "nest":
        parent[last] = {"x": parent[last]} if isinstance(value, dict) else [parent[last]]
    elif how == "add" and isinstance(parent[last], dict):
        parent[last][str(value)[:20]] = value
    return doc


@st.composite
def grid_texts(draw) -> str:
    doc = draw(st.sampled_from(VALID))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths(doc))))
        how = draw(st.sampled_from(["replace", "delete", "nest", "add"]))
        doc = mutate(doc, path, how, draw(values))
    try:
        text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    except (yaml.YAMLError, ValueError, RecursionError):
        text = "name: x\n"
    if draw(st.booleans()):  # a raw YAML value in place of one line's value
        lines = text.splitlines()
        at = draw(st.integers(0, max(0, len(lines) - 1)))
        head = lines[at].split(":", 1)[0] if lines else "name"
        lines[at : at + 1] = [f"{head}: {draw(RAW)}"]
        text = "\n".join(lines) + "\n"
    return text


@pytest.mark.slow  # in-process, yet a thousand runs of the command take a minute or more
@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=grid_texts())
def test_mutated_grid_files_exit_0_or_2_with_one_clear_line(text, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    grid = folder / "grid.yaml"
    grid.write_text(text, encoding="utf-8", errors="surrogatepass")
    code, out, err = ablate_here(["ls", str(grid)], folder)
    assert code in (0, 2), (text, err)
    assert "Traceback" not in err and "Traceback" not in out
    if code == 2:
        assert err.startswith("error: ") and str(grid) in " ".join(err.split()), err
        assert sorted(p.name for p in folder.iterdir()) == ["grid.yaml"]  # nothing written
    assert not (folder / "pwned").exists() and not Path("pwned").exists()

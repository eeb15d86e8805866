"""`ablate`: run a grid, rebuild its report, list its cells, open the MLflow UI, benchmark, tune.

Heavy imports (torch, mlflow) happen inside the commands, so `ablate --help` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import UserError

if TYPE_CHECKING:
    from . import tracking
    from .config import Grid
    from .engine import Outcome
    from .plan import PlanRow
    from .rounds import Rounds
    from .tune.grid import TuneOutcome

app = typer.Typer(
    name="ablate",
    help="Architecture ablations of residual networks, tracked in MLflow, reported in HTML.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)

GridArg = Annotated[Path, typer.Argument(help="Grid file (YAML).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a field: --set train.epochs=2 (repeatable).", metavar="KEY=VALUE"
    ),
]
SeedsOpt = Annotated[
    str | None,
    typer.Option(
        "--seeds",
        help="Seeds until decided, MIN:MAX (e.g. 3:10), or a fixed list, e.g. 0,1,2; "
        "replaces the grid's seeds.",
        metavar="MIN:MAX",
    ),
]
ResultsOpt = Annotated[
    Path, typer.Option(help="Folder for reports, the embedded MLflow store and checkpoints.")
]
UriOpt = Annotated[
    str | None,
    typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or results/mlflow.db)."),
]


def _grid(path: Path, overrides: list[str] | None, seeds: str | None = None) -> Grid:
    from .config import load_grid

    return load_grid(path, [*(overrides or []), *([_seeds_override(seeds)] if seeds else [])])


def _seeds_override(text: str) -> str:
    """`--seeds 3:10` as `seeds={min: 3, max: 10}`; `--seeds 0,1,2` as `seeds=[0, 1, 2]`."""
    low, colon, high = text.partition(":")
    parts = [low, high] if colon else text.split(",")
    if not all(p.strip().isdigit() for p in parts):
        raise UserError(
            f"--seeds {text}: give MIN:MAX to add seeds until decided (e.g. 3:10) or a list "
            "of seeds (e.g. 0,1,2)"
        )
    if colon:
        return f"seeds={{min: {int(low)}, max: {int(high)}}}"
    return f"seeds=[{', '.join(str(int(p)) for p in parts)}]"


# --------------------------------------------------------------------------------------------
# run


@app.command()
def run(
    grid_file: GridArg,
    set_: SetOpt = None,
    seeds: SeedsOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List cells; train nothing.")] = False,
    workers: Annotated[int, typer.Option(min=1, help="Cells trained at once.")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 where fast), bf16 or fp32.")] = "auto",
    cuda_graph: Annotated[bool, typer.Option(help="Replay each step as a CUDA graph.")] = True,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    results: ResultsOpt = Path("results"),
    tracking_uri: UriOpt = None,
    queue: Annotated[
        str | None,
        typer.Option(help="Queue storage: a journal file or a database URL shared by machines."),
    ] = None,
    tuned: Annotated[
        bool, typer.Option("--tuned", help="Use each cell's best values from `ablate tune`.")
    ] = False,
    report: Annotated[bool, typer.Option(help="Write the HTML report at the end.")] = True,
) -> None:
    """Train every cell of a grid that is not done yet, then write its report."""
    grid = _grid(grid_file, set_, seeds)
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"--precision {precision}: choose auto, bf16 or fp32")
    settings = "default"
    if tuned:
        from .tune.grid import apply_tuned

        grid, settings = apply_tuned(grid, results=results, queue=queue)
    if dry_run:
        _dry_run(grid, results, tracking_uri)
        return

    from .device import ExecOptions
    from .engine import RunOptions
    from .runner import run_grid

    options = RunOptions(
        results=results,
        tracking_uri=tracking_uri,
        queue=queue,
        workers=workers,
        exec=ExecOptions(
            device=device, precision=precision, cuda_graph=cuda_graph, compile=compile_
        ),
        settings=settings,
    )
    outcome = run_grid(grid, options, console)
    for ended in outcome.ended:
        if ended.note:  # why a cell diverged, failed or was killed
            errors.print(f"[yellow]{escape(ended.label)}[/]: {escape(ended.note)}")
    _print_crashes(outcome)
    if outcome.interrupted:
        errors.print(
            f"Interrupted ({_signal_name(outcome.signum)}): checkpoints are kept; "
            "run the same command again to resume."
        )
        raise typer.Exit(outcome.exit_code)
    trained = len(outcome.trained)
    console.print(
        f"{grid.name}: {trained} cell(s) trained, {outcome.done} already done, "
        f"{outcome.total} in the grid"
        + (f"; {outcome.elsewhere} still running elsewhere" if outcome.elsewhere else "")
    )
    if outcome.rounds is not None:
        from .rounds import summary

        console.print(summary(grid, outcome.rounds))
    if report:
        _write_report(grid, results, tracking_uri)
    raise typer.Exit(outcome.exit_code)


def _print_crashes(outcome: Outcome) -> None:
    for crash in outcome.crashes:
        errors.print(f"[red]worker crashed:[/] {escape(crash)}")


def _dry_run(grid: Grid, results: Path, tracking_uri: str | None) -> None:
    """The cell table with sizes and states; reads the store only if it exists."""
    from .data import input_shape
    from .models import build_model, describe
    from .plan import states

    store = _existing_store(results, tracking_uri)
    listed, rounds = _planned(grid, states(grid, store))
    rows = {row.cell.key: row.status for row in listed}
    shown = [row.cell for row in listed]
    sizes: dict[Any, Any] = {}
    table = Table(title=f"{grid.name}: {len(shown)} cells", title_justify="left")
    extra = ["round"] if rounds is not None else []
    for column in ["label", "key", *grid.axes, "params", "MACs", "status", *extra]:
        table.add_column(column, justify="right" if column in ("params", "MACs") else "left")
    added = rounds.round_of() if rounds is not None else {}
    for cell in shown:
        channels, size, classes = input_shape(cell.config.data)
        spec = (cell.config.model, channels, size, classes)
        if spec not in sizes:
            model = build_model(cell.config.model, channels, classes)
            sizes[spec] = describe(model, (channels, size, size))
        info = sizes[spec]
        flat = cell.params
        table.add_row(
            cell.label,
            cell.key,
            *[escape(_fmt(flat[a])) for a in grid.axes],
            f"{info.params / 1e6:.2f}M",
            f"{info.macs / 1e6:.1f}M",
            rows[cell.key],
            *([str(added[cell.key])] if rounds is not None else []),
        )
    console.print(table)
    if rounds is not None:
        from .rounds import summary

        console.print(summary(grid, rounds))
        console.print(f"{len(shown)} cells planned now; dry run, nothing trained or written.")
        return
    console.print(f"{len(grid.cells)} cells; dry run, nothing trained or written.")


def _planned(grid: Grid, rows: list[PlanRow]) -> tuple[list[PlanRow], Rounds | None]:
    """The rows of the cells planned so far (with `seeds: {min, max}`: the rounds replayed from
    the record), and the rounds (None for a fixed list of seeds)."""
    from .rounds import grid_rounds

    rounds = grid_rounds(grid, rows)
    if rounds is None:
        return rows, None
    planned = set(rounds.planned)
    return [row for row in rows if row.cell.key in planned], rounds


def _existing_store(results: Path, tracking_uri: str | None) -> tracking.Store | None:
    from . import tracking

    return tracking.existing_store(tracking_uri, results)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _write_report(grid: Grid, results: Path, tracking_uri: str | None) -> Path:
    from . import tracking
    from .report import build_report

    store = tracking.open_store(tracking_uri, results)
    path = build_report(grid, store, results / grid.folder)
    published = tracking.publish_report(store, grid, path.parent)
    console.print(
        f"report: {path}" + (" (also stored with the grid's run)" if published else ""),
        markup=False,
    )
    _print_other_settings(grid, store, "report")
    return path


def _print_other_settings(grid: Grid, store: tracking.Store | None, verb: str) -> None:
    """Say which finished runs of other `--set` settings the grid's experiment holds."""
    from .plan import other_settings

    for other in other_settings(grid, store):
        console.print(
            f"{grid.name} also holds {other.describe()}; see them with: "
            f"{other.command(verb, grid)}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


# --------------------------------------------------------------------------------------------
# report, ls, ui


@app.command()
def report(
    grid_file: GridArg,
    set_: SetOpt = None,
    seeds: SeedsOpt = None,
    results: ResultsOpt = Path("results"),
    tracking_uri: UriOpt = None,
) -> None:
    """Rebuild a grid's HTML report from MLflow alone."""
    grid = _grid(grid_file, set_, seeds)
    _require_store(grid, results, tracking_uri)
    _write_report(grid, results, tracking_uri)


def _require_store(grid: Grid, results: Path, tracking_uri: str | None) -> None:
    if _existing_store(results, tracking_uri) is None:
        raise UserError(
            f"{results / 'mlflow.db'}: no MLflow store yet; run `ablate run {grid.path}` first, "
            f"or pass --results/--tracking-uri"
        )


@app.command("ls")
def list_cells(
    grid_file: GridArg,
    set_: SetOpt = None,
    seeds: SeedsOpt = None,
    results: ResultsOpt = Path("results"),
    tracking_uri: UriOpt = None,
) -> None:
    """List a grid's cells with their state and final errors (with seeds until decided: the
    cells of the rounds so far, and the round that added each)."""
    from .plan import states

    grid = _grid(grid_file, set_, seeds)
    store = _existing_store(results, tracking_uri)
    rows, rounds = _planned(grid, states(grid, store))
    _print_rows(grid, rows, rounds.round_of() if rounds is not None else None)
    if rounds is not None:
        from .rounds import summary

        console.print(summary(grid, rounds))
    _print_other_settings(grid, store, "ls")


def _print_rows(grid: Grid, rows: list[PlanRow], added: dict[str, int] | None = None) -> None:
    from .progress import STYLE

    title = f"{grid.name}: {len(rows)} cells" + (
        f" ({grid.overrides_text})" if grid.overrides else ""
    )
    table = Table(title=title, title_justify="left")
    extra = ["round"] if added is not None else []
    for column in ["label", "key", "status", "epochs", "train err %", "test err %", "run", *extra]:
        table.add_column(column, no_wrap=column == "label")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
        m = row.metrics
        epochs = m.get("epochs_done")
        table.add_row(
            escape(row.cell.label),
            row.cell.key,
            f"[{STYLE.get(row.status, 'white')}]{row.status}[/]",
            f"{epochs:.0f}" if epochs is not None else "",
            _pct(m.get("final_train_err", m.get("train_err"))),
            _pct(m.get("final_test_err", m.get("test_err"))),
            row.run_id or "",
            *([str(added[row.cell.key])] if added is not None else []),
        )
    console.print(table)
    console.print(", ".join(f"{n} {status}" for status, n in counts.items()))


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


@app.command()
def ui(
    grid_file: Annotated[
        Path | None,
        typer.Argument(help="Grid file: print the URLs of its runs.", show_default=False),
    ] = None,
    set_: SetOpt = None,
    results: ResultsOpt = Path("results"),
    tracking_uri: UriOpt = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
    open_: Annotated[
        bool, typer.Option("--open", help="Open the runs table in a browser.")
    ] = False,
) -> None:
    """Start the MLflow UI on 127.0.0.1 over the grid store, with the URL of a grid's runs table
    (in the "Model training" mode) and of the compare view of its cells."""
    from . import tracking

    grid = _grid(grid_file, set_) if grid_file is not None else None
    uri = tracking.resolve_uri(tracking_uri, results)
    remote = tracking.server_base(uri)
    base = remote or f"http://127.0.0.1:{port}"
    urls = _ui_urls(grid, _existing_store(results, tracking_uri), base)
    if remote is not None:
        console.print(f"The tracking server {remote} has its own UI.", markup=False)
        _show_urls(urls, open_)
        return
    tracking.open_store(tracking_uri, results)  # a new store is made whole before it is served
    _serve_ui(uri, port, urls, open_)


def _ui_urls(grid: Grid | None, store: tracking.Store | None, base: str) -> dict[str, str]:
    """What to open: the grid's runs table and the compare view of its cells (the experiment
    list without a grid or before its first run)."""
    from . import tracking

    found = tracking.find_experiment(store, grid.name) if grid and store else None
    if grid is None or store is None or found is None:
        if grid is not None:
            console.print(
                f"{grid.name} has no runs yet: run `ablate run {grid.path}` first.", markup=False
            )
        return {"runs": base + "/#/experiments?workflowType=machine_learning"}
    eid = found.experiment_id
    keys = {cell.key for cell in grid.cells}
    cells = [r.info.run_id for k, r in tracking.cell_runs(store, eid).items() if k in keys]
    urls = {"runs": tracking.runs_table_url(base, eid)}
    if cells:
        urls["compare"] = tracking.compare_url(base, eid, cells)
    return urls


def _show_urls(urls: dict[str, str], open_browser: bool) -> None:
    console.print(f"Runs table: {urls['runs']}", markup=False, highlight=False, soft_wrap=True)
    if "compare" in urls:
        console.print(
            f"Compare the cells: {urls['compare']}", markup=False, highlight=False, soft_wrap=True
        )
    if open_browser:
        import webbrowser

        webbrowser.open(urls["runs"])
    else:
        console.print("(--open opens the runs table in a browser)")


def _serve_ui(uri: str, port: int, urls: dict[str, str], open_browser: bool) -> None:
    """Run `mlflow server` on loopback over the store until Ctrl-C; the URLs once it answers."""
    import subprocess
    import time
    import urllib.request

    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    # One worker: a UI on loopback has one user, and four (the default) starve a small machine.
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if uri.startswith("sqlite:///"):
        root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
        command += ["--artifacts-destination", root.resolve().as_uri()]
    console.print(f"Starting the MLflow UI on http://127.0.0.1:{port} (Ctrl-C to stop) ...")
    server = subprocess.Popen(command)
    try:
        while server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        if server.poll() is not None:
            raise UserError(f"the MLflow UI did not start on port {port}; is it taken? try --port")
        _show_urls(urls, open_browser)
        server.wait()
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)


# --------------------------------------------------------------------------------------------
# reproduce


@app.command()
def reproduce(
    run_id: Annotated[str, typer.Argument(help="The MLflow id of a cell's run.")],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads (default: as `ablate run` uses).")
    ] = None,
    results: ResultsOpt = Path("results"),
    tracking_uri: UriOpt = None,
) -> None:
    """Train a cell again from its run's record alone; print how far the curves are apart."""
    from . import tracking

    store = tracking.existing_store(tracking_uri, results)
    if store is None:
        raise UserError(
            f"{results / 'mlflow.db'}: no MLflow store here; pass --results/--tracking-uri"
        )
    from .device import ExecOptions
    from .reproduce import load_original
    from .reproduce import reproduce as retrain

    load_original(store, run_id)  # a wrong id or a run that is no cell's fails before anything
    done = retrain(store, run_id, ExecOptions(device=device, threads=threads), results)
    for line in done.mismatches:
        errors.print(f"[yellow]differs[/] {line}", highlight=False)
    label = done.original.run.info.run_name
    console.print(f"{label}: reproduced as run {done.run_id} ({done.ending.status})")
    table = Table(title=f"Largest per-epoch difference from run {run_id}", title_justify="left")
    for column in ["metric", "largest |difference|", "at epoch", "seed sd of final value"]:
        table.add_column(column)
    for d in done.differences:
        spread = f"{d.seed_sd:.4g} ({d.seeds} seeds)" if d.seeds else "(one seed only)"
        table.add_row(d.metric, f"{d.largest:.6g}", str(d.epoch), spread)
    console.print(table)
    identical = all(d.largest == 0 for d in done.differences)
    console.print("The curves are identical." if identical else "The curves differ (see above).")


# --------------------------------------------------------------------------------------------
# bench


@app.command()
def bench(
    model: Annotated[
        str, typer.Option(help="Model label: plain-56, res-110, res-164-bottleneck, ...")
    ] = "plain-56",
    batch: Annotated[int, typer.Option(min=1, help="Images per training step.")] = 128,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dataset: Annotated[str, typer.Option(help="synthetic, fashion-mnist, cifar10.")] = "synthetic",
    steps: Annotated[
        int | None, typer.Option(min=1, help="Timed steps a repeat (default: 6 CPU, 50 GPU).")
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(min=1, help="Timed repeats, for a median (default: 3 CPU, 5 GPU).")
    ] = None,
    warmup: Annotated[int | None, typer.Option(min=1, help="Untimed warm-up steps.")] = None,
    features: Annotated[
        str | None,
        typer.Option(
            help="Added one row at a time: resident,bf16,channels_last,cuda_graph,compile "
            "(default: what `ablate run` uses here)."
        ),
    ] = None,
    each: Annotated[bool, typer.Option("--each", help="Also time each feature alone.")] = False,
    loader_workers: Annotated[
        int | None, typer.Option(min=0, help="DataLoader workers of the standard loop.")
    ] = None,
    workers_sweep: Annotated[
        str | None,
        typer.Option(help="Instead: aggregate images/s of N trainers at once, e.g. 1,2,4,8."),
    ] = None,
    pack: Annotated[
        str, typer.Option(help="Sweep as `processes` (like run --workers) or CUDA `streams`.")
    ] = "processes",
    seconds: Annotated[float | None, typer.Option(help="Sweep: seconds per point.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Training images/s of one step: this trainer, feature by feature, vs the standard loop."""
    from .bench.tables import command

    command(
        model=model,
        batch=batch,
        device=device,
        dataset=dataset,
        steps=steps,
        repeats=repeats,
        warmup=warmup,
        features=features,
        each=each,
        loader_workers=loader_workers,
        workers_sweep_counts=workers_sweep,
        pack=pack,
        seconds=seconds,
        as_json=json_,
        out=console,
        err=errors,
    )


# --------------------------------------------------------------------------------------------
# tune


@app.command()
def tune(
    grid_file: GridArg,
    set_: SetOpt = None,
    workers: Annotated[int, typer.Option(min=1, help="Trials trained at once.")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    results: ResultsOpt = Path("results"),
    tracking_uri: UriOpt = None,
    queue: Annotated[
        str | None,
        typer.Option(help="Study storage: a journal file or a database URL shared by machines."),
    ] = None,
) -> None:
    """Tune each configuration with the same budget (the grid's tune: section), for --tuned."""
    from .tune.studies import tune_spec

    grid = _grid(grid_file, set_)
    tune_spec(grid)  # a grid without one fails before the heavy imports
    from .device import ExecOptions
    from .engine import RunOptions
    from .tune.grid import tune_grid

    options = RunOptions(
        results=results,
        tracking_uri=tracking_uri,
        queue=queue,
        workers=workers,
        exec=ExecOptions(device=device),
    )
    outcome = tune_grid(grid, options, console)
    for failure in outcome.failures:
        errors.print(
            f"[yellow]failed[/] {escape(failure.label)}: {escape(failure.note)}", highlight=False
        )
    _print_crashes(outcome)
    _print_studies(grid, outcome)
    if outcome.interrupted:
        errors.print(
            f"Interrupted ({_signal_name(outcome.signum)}): finished trials are kept; "
            "run the same command to continue."
        )
    raise typer.Exit(outcome.exit_code)


def _print_studies(grid: Grid, outcome: TuneOutcome) -> None:
    """Each study's trials and best values, and what to run next."""
    from .tune.studies import values_text

    budget = outcome.budget
    table = Table(title=f"{grid.name}: tuning, {budget} trials each", title_justify="left")
    for column in ["configuration", "trials", "best trial", "val err %", "best values"]:
        table.add_column(column)
    for state in outcome.states:
        best = state.best_number is not None
        failed = f" ({state.failed} failed)" if state.failed else ""
        table.add_row(
            state.target.label,
            f"{state.finished}/{budget}{failed}",
            str(state.best_number) if best else "",
            f"{state.best_value:.2f}" if best else "",
            values_text(state.best_values) if best else "",
        )
    console.print(table)
    done = sum(s.finished >= budget for s in outcome.states)
    console.print(
        f"{grid.name}: {len(outcome.ended)} trial(s) run now; {done} of {len(outcome.states)} "
        f"studies have their {budget} trials"
        + (f"; next: ablate run {grid.path} --tuned" if done == len(outcome.states) else "")
    )


# --------------------------------------------------------------------------------------------
# Entry point.


def _signal_name(signum: int) -> str:
    from .signals import signal_name

    return signal_name(signum)


def main() -> None:
    """Console script: user errors become one line and exit code 2; Ctrl-C exits 130 and
    SIGTERM (a scheduler's preemption) 143, both after recording what ran as killed."""
    from .signals import exit_code, handle_termination, signum_of

    handle_termination()
    try:
        code = app(standalone_mode=False)
    except UserError as err:
        # The message is plain text: brackets in it (an extra's name) are not markup.
        errors.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        errors.print("Interrupted.")
        sys.exit(130)
    except KeyboardInterrupt as err:
        errors.print(f"Interrupted ({_signal_name(signum_of(err))}).")
        sys.exit(exit_code(signum_of(err)))
    except typer.TyperException as err:  # usage errors, as click reports them
        err.show()  # type: ignore[attr-defined]
        sys.exit(getattr(err, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)

"""The report: verdicts from numbers, every cell accounted for, escaping, papers, a real browser.

The verdicts' logic is tested on small tables in test_verdicts.py; here, the report is built from
real SQLite MLflow stores filled through tracking.py with curves chosen so that the right answer
is known.
"""

from __future__ import annotations

import csv
import math
import re
import shutil
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from resnet_ablate import tracking
from resnet_ablate.config import load_grid
from resnet_ablate.report import build_report
from resnet_ablate.report.gradient_flow import gradient_summary, sci
from resnet_ablate.report.records import load_grad_flow, load_records, read_histories
from tests.conftest import EXPERIMENTS, ablate
from tests.report_browser import Chromium, find_chromium
from tests.report_store import PROVENANCE, Plan, make_grid, populate

# --------------------------------------------------------------------------------------------
# Gradient-flow text (the verdicts are tested in test_verdicts.py).


def flows(ratio_by_net: dict[str, float], layers: int = 20) -> pd.DataFrame:
    rows = []
    for net, ratio in ratio_by_net.items():
        norms = np.geomspace(ratio, 1.0, layers) * 1e-3  # first layer / last layer = ratio
        rows += [
            (net, net.rsplit("-", 1)[0], 0, 1, "initialisation", i, n) for i, n in enumerate(norms)
        ]
    return pd.DataFrame(rows, columns=["net", "family", "seed", "epoch", "when", "layer", "norm"])


def test_gradient_text_follows_the_data_not_the_tutorial():
    grows = " ".join(gradient_summary(flows({"plain-110": 9e6, "res-110": 2e2})))
    assert "plain-110" in grows and "9.0×10⁶" in grows and "2.0×10²" in grows
    assert "grows toward the input" in grows and "does not vanish" in grows
    vanishes = " ".join(gradient_summary(flows({"plain-20": 1e-3, "res-20": 0.5})))
    assert "shrinks toward the input" in vanishes and "vanishes" in vanishes
    assert "grows" not in vanishes.replace("grows toward", "")


def test_sci_formats_like_a_paper():
    assert sci(9.1e6) == "9.1×10⁶"
    assert sci(2.3e-4) == "2.3×10⁻⁴"
    assert sci(12.0) == "12"


# --------------------------------------------------------------------------------------------
# Reports from real MLflow stores.

EPOCHS = 8
FINALS = {  # (shortcut, depth) -> final training error per seed
    ("none", 20): [6.4, 6.6, 6.8],
    ("none", 56): [12.9, 13.1, 13.3],
    ("identity", 20): [8.0, 8.1, 8.2],
    ("identity", 56): [6.6, 6.7, 6.8],
    ("projection", 20): [7.9, 8.0, 8.1],
    ("projection", 56): [6.5, 6.6, 6.7],
}
DIVERGED = "training loss became nan in epoch 3 (lr 0.1)"
FAILED = "RuntimeError: <b>CUDA</b> out of memory & [bold]more[/]"  # shown as written
NASTY = "<script>alert('x')</script> & <b>bold</b>"


def cifar_plan(cell) -> Plan | None:
    m, seed = cell.config.model, cell.config.seed
    if (m.shortcut, m.depth, seed) == ("projection", 56, 1):
        return Plan(math.nan, math.nan, status="diverged", reason=DIVERGED, epochs=3)
    if (m.shortcut, m.depth, seed) == ("projection", 20, 2):
        return Plan(math.nan, math.nan, status="failed", reason=FAILED, epochs=2)
    if (m.shortcut, m.depth, seed) == ("projection", 56, 2):
        return None  # never started: "new"
    train = FINALS[(m.shortcut, m.depth)][seed]
    return Plan(train, train + 1.5, grad_flow=m.depth == 56)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Two grids in one store (CIFAR-10 with every status; synthetic with markup), built."""
    root = tmp_path_factory.mktemp("report")
    store = tracking.open_store(tracking.default_uri(root), root)
    axes = {"model.shortcut": ["none", "identity", "projection"], "model.depth": [20, 56]}
    cifar = make_grid(root, "e2e-cifar", axes, data="cifar10", epochs=EPOCHS)
    populate(store, cifar, cifar_plan)
    # A run of a cell the grid file no longer has (depth 32 was removed from the axis).
    older = make_grid(
        root, "e2e-cifar", {**axes, "model.depth": [32]}, data="cifar10", epochs=EPOCHS, seeds=(0,)
    )
    populate(
        store, older, lambda cell: Plan(9.0, 10.0) if cell.config.model.shortcut == "none" else None
    )
    synth = make_grid(
        root,
        "e2e-synth",
        {
            "model.shortcut": ["none", "identity"],
            "model.depth": [20, 56],
            "model.order": ["post", "pre"],
        },
        seeds=(0,),
        description=NASTY,
        tags={"note": "<img src=x onerror=alert(1)>", "<i>key</i>": "v"},
    )
    populate(store, synth, lambda c: Plan(5.0 + c.config.model.depth / 10, 7.0, grad_flow=True))
    empty = make_grid(root, "e2e-empty", axes)
    return {
        "store": store,
        "cifar": (cifar, build_report(cifar, store, root / "out" / "cifar")),
        "synth": (synth, build_report(synth, store, root / "out" / "synth")),
        "empty": (empty, build_report(empty, store, root / "out" / "empty")),
    }


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_report_writes_html_csvs_and_embedded_figures(reports):
    _, html_path = reports["cifar"]
    out = html_path.parent
    assert {p.name for p in (out / "figures").iterdir()} == {
        "error_iterations.png", "error_curves.png", "error_vs_depth.png", "gradient_norms.png",
    }  # fmt: skip
    html = html_path.read_text(encoding="utf-8")
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    # Self-contained: nothing to fetch, no script.
    assert not re.search(r"<(script|link|iframe)\b", html)
    assert "url(" not in html and "@import" not in html
    assert "@media print" in html


@pytest.mark.slow
def test_the_first_figure_is_fig6_error_against_iterations(reports):
    grid, html_path = reports["cifar"]
    html = html_path.read_text(encoding="utf-8")
    order = re.findall(r'<figure id="fig-([a-z_]+)"', html)
    assert order[:2] == ["error_iterations", "error_curves"]  # the per-epoch figure follows
    caption = html[html.index('id="fig-error_iterations"') : html.index('id="fig-error_curves"')]
    assert "plain nets left, residual nets right" in caption
    assert "20 points per epoch" in caption and "3 seeds" in caption
    assert "minimum to maximum" in caption
    # One panel per shortcut kind, side by side.
    png = (html_path.parent / "figures" / "error_iterations.png").read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 2.5 * height

    frame = load_records(grid, reports["store"]).iterations
    run = frame[(frame["label"] == "plain-56 basic post s0")]
    train = sorted(run.loc[run["split"] == "train", "iteration"])
    test = run[run["split"] == "test"].sort_values("iteration")
    assert train == [390 * e + round(k / 20 * 390) for e in range(EPOCHS) for k in range(1, 21)]
    assert list(test["iteration"]) == [390 * e for e in range(1, EPOCHS + 1)]
    assert test["error"].iloc[-1] == pytest.approx(FINALS[("none", 56)][0] + 1.5)
    # The run that diverged in epoch 3: its points and test errors up to there.
    diverged = frame[frame["label"] == "res-proj-56 basic post s1"]
    assert diverged["iteration"].max() == 3 * 390 and set(diverged["status"]) == {"diverged"}


@pytest.mark.slow
def test_summary_csv_has_every_cell_with_status_and_reason(reports):
    grid, html_path = reports["cifar"]
    rows = read_csv(html_path.parent / "summary.csv")
    assert [r["label"] for r in rows] == [c.label for c in grid.cells]
    by_label = {r["label"]: r for r in rows}
    assert by_label["res-proj-56 basic post s1"]["status"] == "diverged"
    assert by_label["res-proj-56 basic post s1"]["reason"] == DIVERGED
    assert by_label["res-proj-20 basic post s2"]["status"] == "failed"
    assert by_label["res-proj-20 basic post s2"]["reason"] == FAILED
    assert by_label["res-proj-56 basic post s2"]["status"] == "new"
    assert by_label["res-proj-56 basic post s2"]["run_id"] == ""
    plain = by_label["plain-56 basic post s1"]
    assert float(plain["final_train_err"]) == pytest.approx(13.1)
    assert float(plain["final_test_err"]) == pytest.approx(14.6)
    assert int(plain["params"]) == 56_000 and int(plain["epochs_done"]) == EPOCHS
    assert float(plain["images_per_second"]) == pytest.approx(2500)
    assert plain["url"].endswith(f"/runs/{plain['run_id']}")
    assert not any("32" in r["label"] for r in rows)  # the removed cell is not in the grid


@pytest.mark.slow
def test_summary_by_config_is_mean_and_sd_over_finished_seeds(reports):
    _, html_path = reports["cifar"]
    rows = {r["config"]: r for r in read_csv(html_path.parent / "summary_by_config.csv")}
    plain = rows["plain-56 basic post"]
    assert float(plain["final_train_err_mean"]) == pytest.approx(13.1, abs=1e-4)
    assert float(plain["final_train_err_sd"]) == pytest.approx(0.2, abs=1e-4)
    proj = rows["res-proj-56 basic post"]
    assert (proj["n_finished"], proj["n_diverged"]) == ("1", "1")
    assert proj["statuses"] == "1 finished, 1 diverged, 1 new"
    assert float(proj["final_train_err_mean"]) == pytest.approx(6.5, abs=1e-4)
    assert proj["final_train_err_sd"] == ""  # one seed: no sd
    # The papers' numbers: He et al. 2015 for option A (identity), none for plain nets.
    assert float(rows["res-20 basic post"]["paper_he2015_test_err"]) == pytest.approx(8.75)
    assert float(rows["res-56 basic post"]["paper_he2015_test_err"]) == pytest.approx(6.97)
    assert rows["plain-20 basic post"]["paper_he2015_test_err"] == ""


@pytest.mark.slow
def test_html_verdict_table_links_and_other_runs(reports):
    grid, html_path = reports["cifar"]
    html = html_path.read_text(encoding="utf-8")
    assert (
        "Degradation reproduced: plain-56 trains to 13.1% error vs 6.6% for plain-20 (3 seeds each"
        in html
    )
    assert "res-56 6.7%, res-proj-56 48.2% (1 of 2 seeds failed to train, counted)" in html
    # res-proj: the diverged seed counts at chance error, which leaves it undecided; said so.
    assert re.search(r"res-proj-56 vs res-proj-20.*?undecided.*?s1 diverged", html, re.S)
    for cell in grid.cells:
        assert f"<td>{cell.label}</td>" in html
    assert html.count('class="status-diverged"') == 1
    assert html.count('class="status-failed"') == 1
    assert html.count('class="status-new"') == 1
    assert DIVERGED in html and html_escape(FAILED) in html and "<b>CUDA" not in html
    store = reports["store"]
    experiment = store.client.get_experiment_by_name(grid.name).experiment_id
    run = tracking.cell_runs(store, experiment)[grid.cells[0].key]
    assert f'href="{tracking.ui_url(store.uri, experiment, run.info.run_id)}"' in html
    others = html.split('id="others"')[1]
    assert "plain-32 basic post s0" in others
    # Provenance from the runs' tags and the resolved base config.
    provenance = html.split('id="provenance"')[1]
    assert PROVENANCE["ablate.git_commit"] in provenance
    assert PROVENANCE["ablate.torch_version"] in provenance
    assert "&#34;epochs&#34;: 8" in provenance or "&quot;epochs&quot;: 8" in provenance


@pytest.mark.slow
def test_gradient_ratio_in_text_is_computed_from_the_runs(reports):
    html = reports["cifar"][1].read_text(encoding="utf-8")
    # synthetic_grad_flow: plain-56 spans 6*56/110 decades at initialisation, res-56 2*56/110.
    assert f"is {sci(10 ** (6 * 56 / 110))} times that of the last" in html
    assert f"is {sci(10 ** (2 * 56 / 110))} times that of the last" in html
    assert "grows toward the input" in html


@pytest.mark.slow
def test_user_text_is_escaped(reports):
    grid, html_path = reports["synth"]
    html = html_path.read_text(encoding="utf-8")
    assert "<script" not in html and "<b>bold" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;i&gt;key&lt;/i&gt;: v" in html and "<i>key" not in html  # tag keys too


@pytest.mark.slow
def test_user_text_in_the_tuning_section_is_escaped(tmp_path):
    """The tuning section quotes the grid's path in its commands: shown as written, never markup."""
    folder = tmp_path / "<b>grids & [bold]x"  # a folder's name cannot hold a slash
    folder.mkdir()
    path = folder / "hostile-tune.yaml"
    text = (EXPERIMENTS / "smoke-tune.yaml").read_text().replace("smoke-tune", "hostile-tune")
    path.write_text(text)
    grid = load_grid(path)
    store = tracking.open_store(tracking.default_uri(tmp_path), tmp_path)
    html = build_report(grid, store, tmp_path / "out").read_text(encoding="utf-8")
    section = html.split('<section id="tuning">')[1].split("</section>")[0]
    assert "<b>grids" not in section
    assert f"run `ablate tune {html_escape(str(path))}`" in section
    assert "&lt;b&gt;grids &amp; [bold]x" in section


@pytest.mark.slow
def test_papers_only_for_cifar10_grids(reports):
    cifar = reports["cifar"][1].read_text(encoding="utf-8")
    assert 'id="papers"' in cifar
    assert "He, Zhang, Ren, Sun (2015) Deep Residual Learning for Image Recognition" in cifar
    assert '<td class="num">8.75</td>' in cifar
    synth_path = reports["synth"][1]
    synth = synth_path.read_text(encoding="utf-8")
    assert 'id="papers"' not in synth and "He, Zhang, Ren, Sun" not in synth
    header = read_csv(synth_path.parent / "summary_by_config.csv")[0]
    assert not any(k.startswith("paper_") for k in header)


@pytest.mark.slow
def test_grid_varying_order_gets_comparison_and_figure(reports):
    _, html_path = reports["synth"]
    html = html_path.read_text(encoding="utf-8")
    assert (html_path.parent / "figures" / "block_order.png").is_file()
    assert "Unit order at plain-56 basic:" in html
    assert "one seed for each side" in html
    assert "Degradation undecided: one seed for each side" in html


@pytest.mark.slow
def test_grid_without_runs_lists_every_cell_as_new(reports):
    grid, html_path = reports["empty"]
    rows = read_csv(html_path.parent / "summary.csv")
    assert len(rows) == len(grid.cells) and {r["status"] for r in rows} == {"new"}
    html = html_path.read_text(encoding="utf-8")
    assert "No cell has finished yet" in html and "<img" not in html
    assert not any((html_path.parent / "figures").iterdir())


@pytest.mark.slow
def test_report_only_reads_the_store(reports):
    # Building the empty grid's report created no experiment for it.
    assert reports["store"].client.get_experiment_by_name("e2e-empty") is None


class NoBulkClient:
    """A client without the SQL store's bulk history call, as with a remote tracking server."""

    def __init__(self, client):
        self._client = client

    def get_metric_history(self, run_id, key):
        return self._client.get_metric_history(run_id, key)

    def download_artifacts(self, run_id, path, dst_path=None):
        return self._client.download_artifacts(run_id, path, dst_path)


@pytest.mark.slow
def test_bulk_and_per_run_reads_agree(reports):
    store = reports["store"]
    grid = reports["cifar"][0]
    experiment = store.client.get_experiment_by_name(grid.name).experiment_id
    runs = tracking.cell_runs(store, experiment)
    ids = sorted(r.info.run_id for r in runs.values())
    remote = tracking.Store(store.uri, NoBulkClient(store.client), None)
    keys = ("train_err", "test_err", "images_per_second")
    bulk, single = read_histories(store, ids, keys), read_histories(remote, ids, keys)
    assert len(bulk) > 0
    pd.testing.assert_frame_equal(bulk, single)
    deep = runs[next(c.key for c in grid.cells if c.label == "plain-56 basic post s0")]
    local = load_grad_flow(store, deep.info.run_id, deep.info.artifact_uri)
    assert local is not None and len(local["layers"]) == 55
    assert load_grad_flow(remote, deep.info.run_id) == local


# --------------------------------------------------------------------------------------------
# A real browser.

BROKEN_PAGE = """<!DOCTYPE html><html><body>
<img src="data:image/png;base64,AAAA" alt="broken"><img src="missing.png" alt="missing">
<script>console.error("boom"); notDefined();</script></body></html>"""


@pytest.mark.slow
def test_report_opens_in_headless_chromium(reports, tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    with Chromium(binary, tmp_path / "profile") as browser:
        # The checks must be able to fail: a page with broken images and errors.
        broken = tmp_path / "broken.html"
        broken.write_text(BROKEN_PAGE, encoding="utf-8")
        bad = browser.open(broken.as_uri())
        assert [i["width"] for i in bad.images] == [0, 0]
        assert any("boom" in e for e in bad.errors)
        assert any("notDefined" in e for e in bad.errors)
        assert any("missing.png" in e for e in bad.errors)

        for name in ("cifar", "synth"):
            html_path = reports[name][1]
            page = browser.open(html_path.as_uri())
            shot = tmp_path / f"report-{name}.png"
            shot.write_bytes(page.screenshot)
            figures = len(list((html_path.parent / "figures").iterdir()))
            assert len(page.images) == figures >= 3
            assert all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in page.images)
            assert page.errors == []
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


@pytest.mark.slow
def test_a_real_run_s_report_opens_on_error_against_iterations(tmp_path):
    """The smoke grid trained for real: its runs hold the points within epochs, and its report
    shows them first, as Fig. 6 is drawn, in a real browser where one is installed."""
    done = ablate("run", str(EXPERIMENTS / "smoke.yaml"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    results = tmp_path / "results"
    store = tracking.open_store(tracking.default_uri(results), results)
    grid = load_grid(EXPERIMENTS / "smoke.yaml")
    frame = load_records(grid, store).iterations
    steps = 2000 // 64  # the synthetic training split at the smoke grid's batch size
    for _, run in frame.groupby("run_id"):
        train = sorted(run.loc[run["split"] == "train", "iteration"])
        assert len(train) == 3 * 20 == len(set(train)) and train[-1] == 3 * steps
        assert sorted(run.loc[run["split"] == "test", "iteration"]) == [steps, 2 * steps, 3 * steps]
        assert run["error"].between(0, 100).all()
    assert set(frame["family"]) == {"plain", "res"}

    html_path = tmp_path / "results" / "smoke" / "report.html"
    html = html_path.read_text(encoding="utf-8")
    assert re.findall(r'<figure id="fig-([a-z_]+)"', html)[0] == "error_iterations"
    binary = find_chromium()
    if binary is None:
        return
    with Chromium(binary, tmp_path / "profile") as browser:
        page = browser.open(html_path.as_uri())
    first = page.images[0]
    assert first["alt"] == "Error against iterations (He et al. 2015, Fig. 6)"
    assert first["complete"] and first["width"] > 2 * first["height"] > 0  # two panels
    assert page.errors == []
    (tmp_path / "report.png").write_bytes(page.screenshot)
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)

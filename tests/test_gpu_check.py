"""scripts/gpu_check.sh, dry-run on a CPU with a tiny model and tiny budgets: every step runs and
passes, writes what its header says it writes (and nothing else), and the CUDA tests it runs are
collected and skipped visibly rather than missed. The numbers of a CPU dry run mean nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from .conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
DRY_RUN = {
    "DEVICE": "cpu",
    "MODEL": "plain-8-w4",
    "BATCH": "32",
    "BENCH_ARGS": "--steps 1 --repeats 1 --warmup 1 --loader-workers 0",
    "WORKERS": "1,2",
    "SWEEP_SECONDS": "0.3",
    "SMOKE_DEPTHS": "8",
    "SMOKE_WIDTH": "4",
    "SMOKE_EPOCHS": "1",
    "SMOKE_SUBSET": "500",
    "SMOKE_BATCH": "50",
    "SMOKE_WORKERS": "1",
}


def header_files() -> set[str]:
    """The files the script's header says it writes (`#   name   what it holds`)."""
    header = SCRIPT.read_text().split("\nset -uo pipefail")[0]
    return set(re.findall(r"^#   (\S+\.(?:json|txt|xml|yaml|log))\s", header, flags=re.M))


@pytest.mark.slow
def test_the_gpu_check_dry_runs_on_a_cpu(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        **DRY_RUN,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "WHEELS": str(tmp_path / "no-wheels"),  # everything is installed here: none needed
    }
    proc = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900
    )
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + log[-4000:]

    assert {p.name for p in out.iterdir()} == header_files() != set()
    summary = (out / "summary.txt").read_text()
    for name in ("cuda-tests", "bench", "smoke-grid", "sweep", "cuda-model-tests"):
        assert f"{name}: passed in " in summary, summary
    assert "every step passed" in summary

    tests = (out / "cuda-tests.txt").read_text()  # collected, and skipped with the reason
    assert re.search(r"\b1[0-9] skipped\b", tests) and "needs CUDA: the GPU path" in tests
    models = (out / "cuda-model-tests.txt").read_text()
    assert re.search(r"\b5 skipped, \d+ deselected\b", models), models

    bench = json.loads((out / "bench.json").read_text())
    rows = {row["name"]: row for row in bench["rows"]}
    assert rows["+ CUDA graph"]["skipped"] == "needs CUDA (cpu here)"
    assert {rows[name]["step"] for name in ("only bf16", "+ channels_last")} == {"eager"}
    assert bench["device_setup"]["device"] == "cpu"
    assert "standard loop" in (out / "bench.txt").read_text()

    cells = json.loads((out / "smoke-cells.json").read_text())
    assert sorted(c["run"] for c in cells) == ["plain-8 basic post s0", "res-8 basic post s0"]
    assert all(c["status"] == "finished" for c in cells)
    assert all(c["metrics"]["mean_images_per_second"] > 0 for c in cells)

    sweep = json.loads((out / "sweep.json").read_text())
    assert [p["workers"] for p in sweep["points"]] == [1, 2]
    assert all(p["error"] == "" for p in sweep["points"])

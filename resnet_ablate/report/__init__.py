"""The HTML report of a grid, built from MLflow alone: `build_report(grid, store, out_dir)`.

Imported lazily so that `ablate --help` does not pay for pandas, seaborn and matplotlib.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_report"]


def __getattr__(name: str) -> Any:
    if name == "build_report":
        from .report import build_report

        return build_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

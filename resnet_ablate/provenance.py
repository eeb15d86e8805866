"""What code made a run: this package's version, torch's, and the git commit of the checkout.

Every run the engine creates (the grid's parent run, cells, tuning runs, trials) carries these
as tags, so a result can be traced to the code that produced it. Torch is imported where its
version is read, not at the top: ``tracking`` hands ``provenance`` on (the benchmark reads it
there), and the store's readers (``ablate ls``, the report) import ``tracking`` without torch.
"""

from __future__ import annotations

import functools
import importlib.metadata
import subprocess
from pathlib import Path


@functools.cache
def provenance() -> dict[str, str]:
    """Git commit of the code that ran (``+dirty`` when modified), torch and package versions."""
    try:
        version = importlib.metadata.version("resnet-ablate")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        version = "source"
    import torch  # see the module docstring

    tags = {"ablate.version": version, "ablate.torch_version": torch.__version__}
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        tags["ablate.git_commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        tags["ablate.git_commit"] = "unknown"
    return tags

"""What made a run: the code (git commit, package versions), who and how, on what machine, from
which data.

Every run the engine creates (the grid's parent run, cells, tuning runs, trials) carries
``provenance()`` as tags, in MLflow's own fields where MLflow has one (``mlflow.source.*``,
``mlflow.user``), so a result can be traced to the code that produced it. A cell's run also
records its dataset (``DatasetRecord``: name, digest of the loaded tensors, split sizes,
source), which ``tracking`` logs as an MLflow dataset input. Torch is imported where its
version and devices are read, not at the top: ``tracking`` hands ``provenance`` on (the
benchmark reads it there), and the store's readers (``ablate ls``, the report) import
``tracking`` without torch.
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import importlib.metadata
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .data import Dataset

#: Libraries whose versions every run records (tag ``ablate.<name>_version``).
LIBRARIES = ("torch", "torchvision", "mlflow", "optuna", "numpy", "scipy")
TAG_COMMIT = "mlflow.source.git.commit"
TAG_DIRTY = "ablate.git_dirty"


@functools.cache
def provenance() -> dict[str, str]:
    """Git commit (MLflow's field, plus ``ablate.git_commit`` with ``+dirty`` when the checkout
    was modified, and ``ablate.git_dirty``), source, user, library versions and hardware."""
    try:
        version = importlib.metadata.version("resnet-ablate")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        version = "source"
    tags = {
        "ablate.version": version,
        "mlflow.source.name": source_name(),
        "mlflow.source.type": "LOCAL",
        "mlflow.user": _user(),
        **library_versions(),
        **hardware(),
    }
    commit, dirty = git_state(Path(__file__).resolve().parent)
    if commit is None:
        tags["ablate.git_commit"] = "unknown"
    else:
        tags[TAG_COMMIT] = commit
        tags[TAG_DIRTY] = "true" if dirty else "false"
        tags["ablate.git_commit"] = commit + ("+dirty" if dirty else "")
    return tags


def source_name() -> str:
    """The command that made the run, as typed: `ablate run experiments/quick.yaml ...`."""
    args = sys.argv[1:] if sys.argv and Path(sys.argv[0]).name in ("ablate", "__main__.py") else []
    return " ".join(["ablate", *args]) if args else "resnet_ablate"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def library_versions() -> dict[str, str]:
    """``ablate.torch_version`` ... ``ablate.scipy_version``, as installed."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[f"ablate.{name}_version"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[f"ablate.{name}_version"] = "not installed"
    import torch  # see the module docstring

    versions["ablate.torch_version"] = torch.__version__
    return versions


def hardware() -> dict[str, str]:
    """The CPU model (``ablate.cpu``) and the GPUs this process sees (``ablate.gpu``)."""
    import torch  # see the module docstring

    tags = {"ablate.cpu": cpu_model()}
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        tags["ablate.gpu"] = ", ".join(names)
    else:
        tags["ablate.gpu"] = "none"
    return tags


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def git_state(folder: Path) -> tuple[str | None, bool]:
    """The checkout's HEAD commit and whether tracked files differ from it (None: no git)."""
    try:
        commit = _git(folder, "rev-parse", "HEAD")
        dirty = _git(folder, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit, bool(dirty)


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(folder), *args],
        capture_output=True,
        text=True,
        timeout=5,
        check=True,
    ).stdout.strip()


# --------------------------------------------------------------------------------------------
# The dataset a run trained on.


@dataclass(frozen=True)
class DatasetRecord:
    """A loaded dataset as a run records it: `digest` is a SHA-256 (first 32 hex digits) of
    its tensors, images and labels of every split in order, so equal digests mean equal data."""

    name: str
    digest: str
    source: str
    sizes: dict[str, int] = field(default_factory=dict)


def dataset_record(dataset: Dataset) -> DatasetRecord:
    """Name, digest, source and split sizes of a loaded dataset."""
    digest = hashlib.sha256()
    sizes = {}
    splits = {"train": dataset.train, "test": dataset.test, "val": dataset.val}
    for split, data in splits.items():
        if data is None:
            continue
        sizes[split] = len(data)
        for tensor in (data.x, data.y):
            digest.update(split.encode() + str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return DatasetRecord(dataset.name, digest.hexdigest()[:32], dataset.source or "", sizes)

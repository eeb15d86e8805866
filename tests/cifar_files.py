"""Small CIFAR-10/100 folders in the real on-disk format, for tests.

The official batches are Python 2 pickles (protocol 2) of dicts whose keys and strings are
Python 2 ``str``: read with ``encoding="latin1"`` (as torchvision does) the keys are ``'data'``,
with ``encoding="bytes"`` they are ``b'data'``. :class:`_Py2Pickler` writes ``bytes`` as Python 2
strings (BINSTRING opcodes) so the generated files behave the same way under both readings.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


class _Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that stores bytes as Python 2 str, as the CIFAR files do."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + n.to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj: object) -> bytes:
    """`obj` pickled as Python 2 would have (keys and strings given as bytes)."""
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3072) uint8 rows: 1024 red, 1024 green, 1024 blue values, each row-major 32x32."""
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)


def _labels(rng: np.random.Generator, n: int, num_classes: int) -> list[int]:
    return [int(v) for v in rng.permutation(np.arange(n) % num_classes)]


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 30, seed: int = 0) -> dict:
    """Write `root/cifar-10-batches-py/` (5 training batches, a test batch, batches.meta).

    Returns {"folder", "train": (data (N, 3072), labels), "test": (...), "classes"}.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    datas, labels = [], []
    for i in range(1, 6):
        data, lab = _images(rng, per_batch), _labels(rng, per_batch, 10)
        entry = {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": lab,
            b"data": data,
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
        }
        (folder / f"data_batch_{i}").write_bytes(py2_pickle(entry))
        datas.append(data)
        labels += lab
    test_data, test_labels = _images(rng, n_test), _labels(rng, n_test, 10)
    entry = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": test_labels,
        b"data": test_data,
        b"filenames": [f"test_{j}.png".encode() for j in range(n_test)],
    }
    (folder / "test_batch").write_bytes(py2_pickle(entry))
    meta = {
        b"num_cases_per_batch": per_batch,
        b"label_names": [c.encode() for c in CIFAR10_CLASSES],
        b"num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return {
        "folder": folder,
        "train": (np.concatenate(datas), labels),
        "test": (test_data, test_labels),
        "classes": list(CIFAR10_CLASSES),
    }


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> dict:
    """Write `root/cifar-100-python/` (train, test, meta); returns what write_cifar10 does."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    fine = [f"fine_class_{i:02d}" for i in range(100)]
    coarse = [f"coarse_class_{i:02d}" for i in range(20)]
    out: dict = {"folder": folder, "classes": fine}
    for split, n in (("train", n_train), ("test", n_test)):
        data, lab = _images(rng, n), _labels(rng, n, 100)
        entry = {
            b"filenames": [f"{split}_{j}.png".encode() for j in range(n)],
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": lab,
            b"coarse_labels": [v // 5 for v in lab],
            b"data": data,
        }
        (folder / split).write_bytes(py2_pickle(entry))
        out[split] = (data, lab)
    meta = {
        b"fine_label_names": [c.encode() for c in fine],
        b"coarse_label_names": [c.encode() for c in coarse],
    }
    (folder / "meta").write_bytes(py2_pickle(meta))
    return out

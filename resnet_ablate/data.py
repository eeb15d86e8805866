"""Datasets as uint8 tensors, and a loader that keeps them resident on the training device.

:func:`load_dataset` turns a :class:`~resnet_ablate.config.DataSpec` into a :class:`Dataset`:
uint8 NCHW images and int64 labels for train, test and (optionally) validation, with class names
and the per-channel mean/std used for normalisation.

- **Where files are found.** ``data.root``, then ``$ABLATE_DATA``, then system copies (Debian's
  ``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist/*.gz``), then ``./data``
  (where downloads go when neither ``data.root`` nor ``$ABLATE_DATA`` is set), then a torchvision
  download when ``data.download`` is true. A miss is one :class:`DatasetNotFound` that lists every
  place looked in and the remedies.
- **CIFAR** is read by torchvision's own ``CIFAR10``/``CIFAR100`` classes. Their per-file md5
  check is replaced by an existence check so that the same code reads files that are not the
  official release (the generated files of the tests); instead the loaded content is validated
  (shapes, dtypes, label ranges, counts) and a corrupt or truncated file is a :class:`DataError`
  naming that file. Whether the files are byte-identical to the official release (md5) is recorded
  in :attr:`Dataset.source`, never assumed. A download still checks the archive's md5. CIFAR's
  format is a Python pickle: load it only from folders you trust.
- **Fashion-MNIST** idx files (plain or ``.gz``) are read with torchvision's idx readers.
- **synthetic** is generated (fixed seed, independent of the global RNG): stripes whose
  orientation and frequency give the class, with random phase, tint and noise.
- **Order of operations.** resize -> hold out ``val_split`` (class-stratified) -> mean/std from the
  remaining training images -> ``train_subset`` (class-balanced); ``test_subset`` likewise picks
  a class-balanced part of the test set, for short runs. The selections use a fixed seed, not
  the cell's seed, so every cell of a grid trains and validates on the same images, and the
  normalisation does not change with the subset size. The test set is never touched.
- **mean/std** (``data.normalize: mean_std``, the default) are computed exactly (from a
  per-channel histogram), in [0, 1] units, population std. For the full CIFAR-10 training set
  they are the published values (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616).
  ``data.normalize: half`` is the PyTorch tutorial's ``(x - 0.5) / 0.5`` instead: mean and std
  0.5 in every channel, pixels to [-1, 1]. Either way the loader applies them on the device.

:class:`DeviceLoader` moves a split to the device once and serves normalised float batches; the
shuffle and the augmentation (pad-crop + horizontal flip, :func:`augment_batch`) are batched tensor
ops drawing from a device generator seeded by (seed, epoch), so epoch *e* is the same batches
whether or not the run was interrupted. :func:`augment_batch` and :func:`normalize` make no host
synchronisation, so a trainer can run them inside a captured CUDA graph (register the generator
with the graph).
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import check_integrity
from torchvision.transforms.v2.functional import resize as tv_resize

from .config import DataSpec, Normalize
from .errors import UserError

ENV_VAR = "ABLATE_DATA"
#: Where downloads go (and are looked for) when neither data.root nor $ABLATE_DATA is set.
DEFAULT_ROOT = Path("data")
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
    "cifar10": (),
    "cifar100": (),
}
APT_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}
#: The seed of the val split and the train subset: fixed, so all cells see the same images.
SPLIT_SEED = 20151210
SYNTHETIC_SEED = 0
_RESIZE_CHUNK = 2048


class DataError(UserError):
    """A dataset problem the user can fix: the message is meant for the user as it is."""


class DatasetNotFound(DataError):
    """The dataset is in none of the places looked in (and was not, or could not be, downloaded)."""


@dataclass
class Split:
    """Images and labels of one split: x (N, C, H, W) uint8, y (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    """A loaded dataset; mean/std normalise it, per channel in [0, 1] units (`normalization`)."""

    name: str
    train: Split
    test: Split
    val: Split | None
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""

    @property
    def in_channels(self) -> int:
        return self.train.x.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return self.train.x.shape[2]


# --------------------------------------------------------------------------------------------
# Loading.


def load_dataset(spec: DataSpec) -> Dataset:
    """Load, resize, split and subset the dataset a spec names; :class:`DataError` on failure."""
    train, test, classes, source = _LOADERS[spec.name](spec)
    if spec.resize is not None and spec.resize != train.x.shape[2]:
        train = Split(resize_images(train.x, spec.resize), train.y)
        test = Split(resize_images(test.x, spec.resize), test.y)
    num_classes = len(classes)
    val = None
    if spec.val_split is not None:
        train, val = _hold_out(train, spec.val_split, num_classes, spec.name)
    mean, std = normalization(spec.normalize, train.x)
    if spec.train_subset is not None:
        held = " left after data.val_split" if val is not None else ""
        train = _subset(train, spec.train_subset, num_classes, f"{spec.name} training", held)
    if spec.test_subset is not None:
        test = _subset(
            test, spec.test_subset, num_classes, f"{spec.name} test", "", field="test_subset"
        )
    return Dataset(spec.name, train, test, val, classes, mean, std, source)


def _roots(spec: DataSpec) -> list[tuple[str, Path | None]]:
    """(label, folder) in lookup order; folder None where a setting is absent."""
    env = os.environ.get(ENV_VAR)
    roots: list[tuple[str, Path | None]] = [
        ("data.root", Path(spec.root).expanduser() if spec.root else None),
        (f"${ENV_VAR}", Path(env).expanduser() if env else None),
    ]
    roots += [("system copy", d) for d in SYSTEM_DIRS.get(spec.name, ())]
    roots.append(("default download folder", DEFAULT_ROOT.absolute()))
    return roots


def _download_root(spec: DataSpec) -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(spec.root or env or DEFAULT_ROOT).expanduser().absolute()


def _not_found(
    spec: DataSpec, looked: list[str], wanted: str, failure: str = ""
) -> DatasetNotFound:
    remedies = []
    if spec.name in APT_PACKAGES:
        remedies.append(f"install it (`apt-get install {APT_PACKAGES[spec.name]}`)")
    if not spec.download:
        where = _download_root(spec)
        remedies.append(f"set `data.download: true` to download it with torchvision into {where}")
    remedies.append(f"point ${ENV_VAR} (or data.root) at a folder that holds it")
    failed = f" {failure}." if failure else ""
    return DatasetNotFound(
        f"{spec.name} not found: looked for {wanted} in {'; '.join(looked)}.{failed} "
        f"To get it, {', or '.join(remedies)}."
    )


def _describe_root(label: str, root: Path | None, note: str = "") -> str:
    if root is None:
        return f"{label} (not set)"
    return f"{root} ({label}{', ' + note if note else ''})"


# ---- CIFAR


class _CIFAR10Files(CIFAR10):
    """torchvision's CIFAR10 reader with its md5 checks replaced by existence checks."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class _CIFAR100Files(CIFAR100):
    """torchvision's CIFAR100 reader with its md5 checks replaced by existence checks."""

    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


_CIFAR = {
    "cifar10": (_CIFAR10Files, CIFAR10, 10, "labels"),
    "cifar100": (_CIFAR100Files, CIFAR100, 100, "fine_labels"),
}


def _cifar_files(official: type[CIFAR10]) -> list[tuple[str, str]]:
    """(file name, official md5) of every file a CIFAR folder holds."""
    files = official.train_list + official.test_list
    return [(name, md5) for name, md5 in files] + [
        (official.meta["filename"], official.meta["md5"])
    ]


def _load_cifar(spec: DataSpec) -> tuple[Split, Split, list[str], str]:
    reader, official, num_classes, _ = _CIFAR[spec.name]
    base = official.base_folder
    names = [name for name, _ in _cifar_files(official)]
    looked, root = [], None
    for label, candidate in _roots(spec):
        if candidate is None:
            looked.append(_describe_root(label, None))
            continue
        # The root may hold cifar-10-batches-py/, or be that folder itself.
        parent = candidate.parent if candidate.name == base else candidate
        missing = [n for n in names if not (parent / base / n).is_file()]
        if not missing:
            root = parent
            break
        present = len(missing) < len(names)
        looked.append(
            _describe_root(
                label, candidate, f"incomplete: no {', '.join(missing)}" if present else ""
            )
        )
    wanted = f"{base}/"
    if root is None:
        if not spec.download:
            raise _not_found(spec, looked, wanted)
        root = _download_root(spec)
        try:  # torchvision downloads the archive, checks its md5, extracts, reads the test batch
            reader(root=str(root), train=False, download=True)
        except Exception as err:
            if not all((root / base / n).is_file() for n in names):
                failure = f"Downloading into {root} failed ({_reason(err)})"
                raise _not_found(spec, looked, wanted, failure) from None
            # Downloaded but unreadable: the load below names the file.
    folder = root / base
    try:
        train_set = reader(root=str(root), train=True)
        test_set = reader(root=str(root), train=False)
        train = _cifar_split(train_set, num_classes)
        test = _cifar_split(test_set, num_classes)
        classes = list(train_set.classes)
        if len(classes) != num_classes or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"expected {num_classes} class names")
    except Exception as err:  # a corrupt pickle can raise almost anything: find the bad file
        raise _diagnose_cifar(spec.name, folder, err) from None
    same = all(check_integrity(folder / name, md5) for name, md5 in _cifar_files(official))
    note = "md5 matches the official release" if same else "files differ from the official release"
    return train, test, classes, f"{spec.name} from {folder} ({note})"


def _cifar_split(dataset: CIFAR10, num_classes: int) -> Split:
    data = dataset.data  # (N, H, W, C) uint8, as torchvision builds it
    if data.dtype.name != "uint8" or data.ndim != 4 or data.shape[1:] != (32, 32, 3):
        raise ValueError(f"images are {data.dtype} {data.shape}, expected uint8 (N, 32, 32, 3)")
    y = torch.as_tensor(dataset.targets, dtype=torch.int64)
    if len(y) != len(data):
        raise ValueError(f"{len(data)} images but {len(y)} labels")
    _check_labels(y, num_classes)
    x = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    return Split(x, y)


def _check_labels(y: torch.Tensor, num_classes: int) -> None:
    if len(y) == 0:
        raise ValueError("no images")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels {int(y.min())}..{int(y.max())} outside 0..{num_classes - 1}")


def _diagnose_cifar(name: str, folder: Path, err: Exception) -> DataError:
    """Check each CIFAR file on its own, to name the one that is broken."""
    _, official, num_classes, label_key = _CIFAR[name]
    meta = official.meta["filename"]
    for file_name, _ in _cifar_files(official):
        path = folder / file_name
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            if file_name == meta:
                names = entry[official.meta["key"]]
                if len(names) != num_classes:
                    raise ValueError(f"{len(names)} class names, expected {num_classes}")
                continue
            data = entry["data"]
            if data.dtype.name != "uint8" or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
            y = torch.as_tensor(entry[label_key], dtype=torch.int64)
            if len(y) != len(data):
                raise ValueError(f"{len(data)} images but {len(y)} labels")
            _check_labels(y, num_classes)
        except Exception as file_err:
            return DataError(
                f"{path}: not a valid {name} file ({_reason(file_err)}); delete {folder} and get "
                f"the dataset again (data.download: true)."
            )
    return DataError(
        f"{folder}: could not read {name} ({_reason(err)}); delete the folder and get the "
        f"dataset again (data.download: true)."
    )


def _reason(err: BaseException) -> str:
    """An exception as one line: `Type: message`."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ---- Fashion-MNIST

_FMNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _fmnist_folder(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The idx files found in one folder (plain preferred over .gz), and the names missing."""
    found, missing = {}, []
    for name in _FMNIST_FILES:
        for path in (folder / name, folder / f"{name}.gz"):
            if path.is_file():
                found[name] = path
                break
        else:
            missing.append(name)
    return found, missing


def _load_fmnist(spec: DataSpec) -> tuple[Split, Split, list[str], str]:
    looked, files = [], None
    for label, root in _roots(spec):
        if root is None:
            looked.append(_describe_root(label, None))
            continue
        note = ""
        # Flat (as Debian installs it), in fashion-mnist/, or torchvision's own layout.
        for folder in (root, root / "fashion-mnist", root / "FashionMNIST" / "raw"):
            found, missing = _fmnist_folder(folder)
            if not missing:
                files = found
                break
            if found and not note:
                note = f"incomplete: {folder} has no {', '.join(missing)}"
        if files is not None:
            break
        looked.append(_describe_root(label, root, note))
    wanted = (
        "train/t10k-{images-idx3,labels-idx1}-ubyte[.gz] "
        "(flat, in fashion-mnist/ or in FashionMNIST/raw/)"
    )
    if files is None:
        if not spec.download:
            raise _not_found(spec, looked, wanted)
        root = _download_root(spec)
        try:  # torchvision downloads, checks md5s, extracts into root/FashionMNIST/raw/
            FashionMNIST(root=str(root), train=False, download=True)
        except Exception as err:
            if _fmnist_folder(root / "FashionMNIST" / "raw")[1]:
                failure = f"Downloading into {root} failed ({_reason(err)})"
                raise _not_found(spec, looked, wanted, failure) from None
            # Downloaded but unreadable: the reads below name the file.
        files, _ = _fmnist_folder(root / "FashionMNIST" / "raw")
    train = _idx_split(files["train-images-idx3-ubyte"], files["train-labels-idx1-ubyte"])
    test = _idx_split(files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"])
    folder = files["train-images-idx3-ubyte"].parent
    return train, test, list(FashionMNIST.classes), f"fashion-mnist from {folder}"


def _idx_split(images: Path, labels: Path) -> Split:
    x = _read_idx(images, read_image_file)  # (N, H, W) uint8
    y = _read_idx(labels, read_label_file)  # (N,) int64
    if len(x) != len(y):
        raise DataError(
            f"{images} holds {len(x)} images but {labels} holds {len(y)} labels; the files do "
            f"not belong together: get the dataset again."
        )
    try:
        _check_labels(y, 10)
    except ValueError as err:
        raise DataError(f"{labels}: {err}; get the dataset again.") from None
    return Split(x.unsqueeze(1).contiguous(), y)


def _read_idx(path: Path, reader: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """An idx file through torchvision's reader; a .gz is decompressed to a temporary file."""
    try:
        if path.suffix != ".gz":
            return reader(str(path))
        with tempfile.TemporaryDirectory(prefix="ablate-idx-") as tmp:
            plain = Path(tmp) / path.stem
            with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            return reader(str(plain))
    except Exception as err:  # truncated gzip, bad magic, wrong size: all the same to the user
        raise DataError(
            f"{path}: not a valid idx file ({_reason(err)}); it is truncated or corrupt: "
            f"delete it and get the dataset again."
        ) from None


# ---- synthetic


def make_synthetic(
    n_train: int = 2000,
    n_test: int = 500,
    *,
    num_classes: int = 10,
    channels: int = 3,
    size: int = 32,
    seed: int = SYNTHETIC_SEED,
) -> tuple[Split, Split, list[str]]:
    """Stripes: class c has orientation c % 2 (horizontal, vertical) and c // 2 + 2 cycles.

    Each image has a random phase (so a crop only shifts it), a random tint and Gaussian noise
    strong enough that a small CNN needs a few epochs to separate neighbouring frequencies.
    Deterministic: its own generator, never the global RNG.
    """
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    y = torch.cat(
        [(torch.arange(k) % num_classes)[torch.randperm(k, generator=g)] for k in (n_train, n_test)]
    )
    cycles = (y // 2 + 2).float()  # (N,)
    vertical = (y % 2).bool()
    phase = torch.rand(n, generator=g) * 2 * torch.pi
    coord = torch.arange(size, dtype=torch.float32) / size  # (S,)
    t = torch.where(vertical[:, None, None], coord[None, None, :], coord[None, :, None])  # (N,S,S)
    wave = torch.sin(2 * torch.pi * cycles[:, None, None] * t + phase[:, None, None])
    tint = 0.5 + 0.5 * torch.rand(n, channels, 1, 1, generator=g)  # (N, C, 1, 1)
    noise = torch.randn(n, channels, size, size, generator=g)
    img = 0.5 + 0.2 * tint * wave[:, None] + 0.25 * noise  # (N, C, S, S)
    x = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    names = [f"{'vertical' if c % 2 else 'horizontal'}-{c // 2 + 2}" for c in range(num_classes)]
    return Split(x[:n_train], y[:n_train]), Split(x[n_train:], y[n_train:]), names


def _load_synthetic(spec: DataSpec) -> tuple[Split, Split, list[str], str]:
    train, test, classes = make_synthetic()
    return train, test, classes, f"synthetic (generated, seed {SYNTHETIC_SEED})"


#: (channels, image size, classes) of each dataset as stored, before `resize`.
SHAPES = {
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
    "fashion-mnist": (1, 28, 10),
    "synthetic": (3, 32, 10),
}


def input_shape(spec: DataSpec) -> tuple[int, int, int]:
    """(channels, image size, classes) a spec gives, without loading anything."""
    channels, size, classes = SHAPES[spec.name]
    return channels, spec.resize or size, classes


_LOADERS = {
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "fashion-mnist": _load_fmnist,
    "synthetic": _load_synthetic,
}


# --------------------------------------------------------------------------------------------
# Resize, split, subset, statistics.


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) uint8 -> (N, C, size, size) uint8: bilinear with antialias, in chunks."""
    chunks = [tv_resize(chunk, [size, size], antialias=True) for chunk in x.split(_RESIZE_CHUNK)]
    return torch.cat(chunks).contiguous()


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std in [0, 1] units, via 256-bin histograms."""
    levels = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        total = counts.sum()
        mean = (counts * levels).sum() / total
        var = (counts * levels**2).sum() / total - mean**2
        means.append(float(mean))
        stds.append(float(var.clamp_min(0).sqrt()))
    return tuple(means), tuple(stds)


def normalization(
    kind: Normalize, train_x: torch.Tensor
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) in [0, 1] units that the loader normalises with.

    `mean_std`: those of the training images (:func:`channel_stats`). `half`: 0.5 and 0.5 in
    every channel, so that `(x / 255 - 0.5) / 0.5` maps pixels to [-1, 1], as the tutorial does.
    """
    if kind == "half":
        channels = train_x.shape[1]
        return (0.5,) * channels, (0.5,) * channels
    return channel_stats(train_x)


def _class_ranks(
    y: torch.Tensor, num_classes: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed shuffle of all indices, and each shuffled index's rank within its class."""
    perm = torch.randperm(len(y), generator=generator)
    ys = y[perm]
    order = torch.argsort(ys, stable=True)  # group by class, keeping the shuffled order
    counts = torch.bincount(ys, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(ys)
    rank[order] = torch.arange(len(ys)) - starts[ys[order]]
    return perm, ys, rank


def _hold_out(train: Split, fraction: float, num_classes: int, name: str) -> tuple[Split, Split]:
    """Split off round(fraction * n_c) images of every class c as the validation set."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    perm, ys, rank = _class_ranks(train.y, num_classes, g)
    per_class = torch.round(torch.bincount(ys, minlength=num_classes) * fraction).long()
    is_val = rank < per_class[ys]
    val_idx, keep_idx = perm[is_val].sort().values, perm[~is_val].sort().values
    if len(val_idx) == 0 or len(keep_idx) == 0:
        side = "no images" if len(val_idx) == 0 else "every image"
        raise DataError(
            f"data.val_split {fraction} holds out {side} of the {len(train)}-image {name} "
            f"training set; choose a fraction that leaves images on both sides."
        )
    return Split(train.x[keep_idx], train.y[keep_idx]), Split(train.x[val_idx], train.y[val_idx])


def _subset(
    split: Split, k: int, num_classes: int, which: str, held: str, field: str = "train_subset"
) -> Split:
    """The first k images of a class-interleaved fixed order: balanced, and nested in k."""
    if k > len(split):
        raise DataError(
            f"data.{field} is {k} but the {which} set has {len(split)} images{held}; "
            f"lower data.{field} or remove it."
        )
    g = torch.Generator().manual_seed(SPLIT_SEED + 1)
    perm, ys, rank = _class_ranks(split.y, num_classes, g)
    interleaved = perm[torch.argsort(rank * num_classes + ys)]
    idx = interleaved[:k].sort().values
    return Split(split.x[idx], split.y[idx])


# --------------------------------------------------------------------------------------------
# The device-resident loader.


def default_pad(image_size: int) -> int:
    """Crop padding of He et al.: 4 pixels for 32x32 and larger, 2 for smaller (28x28)."""
    return 4 if image_size >= 32 else 2


def augment_batch(
    x: torch.Tensor, pad: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop of the zero-padded image and horizontal flip (p=0.5), per sample, batched.

    (B, C, H, W) uint8 -> (B, C, H, W) uint8, no host synchronisation. Every window of the padded
    batch and of its mirror image is a view (unfold); one indexing op copies out each sample's
    window. A flipped crop at column offset dx is the mirror's window at 2 * pad - dx.
    """
    b, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p), zeros outside
    both = torch.stack([padded, padded.flip(3)])  # (2, B, C, H+2p, W+2p)
    windows = both.unfold(3, h, 1).unfold(4, w, 1)  # (2, B, C, 2p+1, 2p+1, H, W), a view
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    flip = torch.rand((b,), generator=generator, device=dev) < 0.5
    mirrored_dx = torch.where(flip, 2 * pad - dx, dx)
    return windows[flip.long(), torch.arange(b, device=dev), :, dy, mirrored_dx]  # (B, C, H, W)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (x / 255 - mean) / std; mean, std are (1, C, 1, 1) tensors.

    Keeps the input's memory format (channels_last in, channels_last out).
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {x.dtype}")
    return x.to(torch.float32).mul_(1 / 255).sub_(mean).div_(std)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A generator seed for (seed, epoch): distinct for distinct pairs, any epoch count."""
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


class DeviceLoader:
    """A split resident on the device, served as normalised float batches.

    Training (``train=True``): every epoch is a permutation drawn from a device generator seeded
    by (seed, epoch), cut into ``len(self)`` full batches (the partial last batch is dropped, so
    shapes are static), augmented when ``augment``. Evaluation: every example once, in order, the
    last batch possibly partial.
    """

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        train: bool,
        augment: bool = False,
        seed: int = 0,
        channels_last: bool = False,
        pad: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.x = split.x.to(self.device)  # (N, C, H, W) uint8, moved once
        self.y = split.y.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.augment = augment and train
        self.seed = seed
        self.channels_last = channels_last
        self.pad = default_pad(self.x.shape[2]) if pad is None else pad
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(shape)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(shape)
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1 (got {batch_size}).")
        if train and len(self.y) < batch_size:
            raise DataError(
                f"train.batch_size {batch_size} is larger than the {len(self.y)}-image training "
                f"set, so an epoch has no full batch; lower train.batch_size."
            )

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def epoch(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches (x float32 (B, C, H, W), y int64 (B,)) of one epoch (ignored in evaluation)."""
        if not self.train:
            for start in range(0, len(self.y), self.batch_size):
                end = start + self.batch_size
                yield self._finish(self.x[start:end]), self.y[start:end]
            return
        g = torch.Generator(device=self.device)
        g.manual_seed(_epoch_seed(self.seed, epoch))
        perm = torch.randperm(len(self.y), generator=g, device=self.device)
        for i in range(len(self)):
            idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.x[idx]
            if self.augment:
                x = augment_batch(x, self.pad, g)
            yield self._finish(x), self.y[idx]

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return normalize(x, self.mean, self.std)

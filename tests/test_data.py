"""Datasets through the public functions, and the device-resident loader."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from resnet_ablate import data as data_module
from resnet_ablate.config import DataSpec
from resnet_ablate.data import (
    DataError,
    DatasetNotFound,
    DeviceLoader,
    Split,
    augment_batch,
    load_dataset,
    normalize,
)
from tests.cifar_files import write_cifar10, write_cifar100

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
FMNIST_NAMES += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No $ABLATE_DATA, no system copies, an empty working directory: only what a test sets."""
    monkeypatch.delenv("ABLATE_DATA", raising=False)
    monkeypatch.setattr(data_module, "SYSTEM_DIRS", {k: () for k in data_module.SYSTEM_DIRS})
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)


def images_of(x: torch.Tensor, rows: np.ndarray) -> None:
    """Assert that NCHW tensor x holds CIFAR rows (N, 3072: R plane, G plane, B plane)."""
    assert torch.equal(x, torch.from_numpy(rows).view(-1, 3, 32, 32))


# --------------------------------------------------------------------------------------------
# CIFAR, generated in the real on-disk format and read by torchvision's classes.


@pytest.mark.parametrize(
    ("name", "writer", "num_classes"),
    [("cifar10", write_cifar10, 10), ("cifar100", write_cifar100, 100)],
)
def test_cifar_loads_through_torchvision(tmp_path, name, writer, num_classes):
    written = writer(tmp_path)
    ds = load_dataset(DataSpec(name=name, root=str(tmp_path)))
    train_rows, train_labels = written["train"]
    test_rows, test_labels = written["test"]
    assert ds.train.x.dtype == torch.uint8 and ds.train.y.dtype == torch.int64
    assert ds.train.x.shape == (len(train_labels), 3, 32, 32)
    assert ds.test.x.shape == (len(test_labels), 3, 32, 32)
    images_of(ds.train.x, train_rows)
    images_of(ds.test.x, test_rows)
    assert ds.train.y.tolist() == train_labels and ds.test.y.tolist() == test_labels
    assert int(ds.train.y.min()) >= 0 and int(ds.train.y.max()) < num_classes
    assert ds.classes == written["classes"] and ds.num_classes == num_classes
    assert (ds.in_channels, ds.image_size, ds.val) == (3, 32, None)
    assert "differ from the official release" in ds.source


def test_cifar_root_may_be_the_batches_folder(tmp_path):
    written = write_cifar10(tmp_path)
    ds = load_dataset(DataSpec(name="cifar10", root=str(written["folder"])))
    images_of(ds.test.x, written["test"][0])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a pickle" * 10)


def _rewrite(path: Path, **changes) -> None:
    import pickle

    from tests.cifar_files import py2_pickle

    entry = pickle.loads(path.read_bytes(), encoding="bytes")
    entry.update({k.encode(): v for k, v in changes.items()})
    path.write_bytes(py2_pickle(entry))


@pytest.mark.parametrize(
    ("file_name", "damage"),
    [
        ("data_batch_3", _truncate),
        ("test_batch", _garbage),
        ("batches.meta", _truncate),
        ("data_batch_2", lambda p: _rewrite(p, data=np.zeros((20, 100), np.uint8))),
        ("data_batch_1", lambda p: _rewrite(p, labels=[10] * 20)),
        ("data_batch_4", lambda p: _rewrite(p, labels=[1] * 19)),
    ],
    ids=["truncated", "garbage", "truncated-meta", "wrong-shape", "label-range", "label-count"],
)
def test_corrupt_cifar_file_is_named(tmp_path, file_name, damage):
    folder = write_cifar10(tmp_path)["folder"]
    damage(folder / file_name)
    with pytest.raises(DataError) as err:
        load_dataset(DataSpec(name="cifar10", root=str(tmp_path)))
    assert not isinstance(err.value, DatasetNotFound)
    assert str(folder / file_name) in str(err.value)


def test_cifar_missing_batch_is_reported_as_incomplete(tmp_path):
    folder = write_cifar10(tmp_path)["folder"]
    (folder / "data_batch_5").unlink()
    with pytest.raises(DatasetNotFound, match=r"incomplete: no data_batch_5"):
        load_dataset(DataSpec(name="cifar10", root=str(tmp_path)))


def test_cifar_download_goes_through_torchvision(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **_):
        calls.append((url, md5))
        write_cifar10(Path(download_root))

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", fake_download)
    spec = DataSpec(name="cifar10", root=str(tmp_path / "dl"), download=True)
    assert len(load_dataset(spec).train) == 100
    assert len(load_dataset(spec).train) == 100  # present now: not downloaded again
    assert len(calls) == 1 and calls[0][0].endswith("cifar-10-python.tar.gz") and calls[0][1]


def test_failed_download_is_one_message(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", offline)
    spec = DataSpec(name="fashion-mnist", root=str(tmp_path / "dl"), download=True)
    with pytest.raises(DatasetNotFound, match=r"Downloading into .*dl failed .*no network"):
        load_dataset(spec)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST.


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file (big-endian header, uint8 payload), gzipped when the name ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    blob = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(blob) if path.suffix == ".gz" else blob)


def write_fmnist(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True) -> dict:
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels)
        out[split] = (images, labels)
    return out


@pytest.mark.skipif(
    not all((SYSTEM_FMNIST / f"{n}.gz").is_file() for n in FMNIST_NAMES),
    reason="real Fashion-MNIST absent: apt-get install dataset-fashion-mnist",
)
def test_fashion_mnist_from_the_system_copy(monkeypatch):
    monkeypatch.setattr(data_module, "SYSTEM_DIRS", {"fashion-mnist": (SYSTEM_FMNIST,)})
    ds = load_dataset(DataSpec(name="fashion-mnist"))
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)
    assert ds.train.x.dtype == torch.uint8 and ds.test.y.dtype == torch.int64
    assert torch.bincount(ds.train.y).tolist() == [6000] * 10
    assert torch.bincount(ds.test.y).tolist() == [1000] * 10
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    # The published Fashion-MNIST statistics.
    assert ds.mean[0] == pytest.approx(0.2860, abs=1e-4)
    assert ds.std[0] == pytest.approx(0.3530, abs=1e-4)
    assert str(SYSTEM_FMNIST) in ds.source


@pytest.mark.parametrize(
    ("layout", "gz"),
    [(".", True), (".", False), ("fashion-mnist", True), ("FashionMNIST/raw", False)],
)
def test_fashion_mnist_from_data_root(tmp_path, layout, gz):
    written = write_fmnist(tmp_path / "fm" / layout, gz=gz)
    ds = load_dataset(DataSpec(name="fashion-mnist", root=str(tmp_path / "fm")))
    assert torch.equal(ds.train.x, torch.from_numpy(written["train"][0])[:, None])
    assert torch.equal(ds.test.x, torch.from_numpy(written["t10k"][0])[:, None])
    assert ds.test.y.tolist() == written["t10k"][1].tolist()
    assert (ds.in_channels, ds.image_size, ds.num_classes) == (1, 28, 10)


def test_fashion_mnist_copy_in_torchvision_layout(tmp_path):
    """The layout torchvision's own download leaves: FashionMNIST/raw/ with .gz and plain files."""
    raw = tmp_path / "FashionMNIST" / "raw"
    written = write_fmnist(raw, gz=True)
    for name in FMNIST_NAMES:
        with gzip.open(raw / f"{name}.gz") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    ds = load_dataset(DataSpec(name="fashion-mnist", root=str(tmp_path)))
    assert ds.train.y.tolist() == written["train"][1].tolist()
    assert "FashionMNIST/raw" in ds.source


def test_fashion_mnist_download_goes_through_torchvision(tmp_path, monkeypatch):
    staged = tmp_path / "staged"
    written = write_fmnist(staged)

    def fake_download(url, download_root, filename=None, md5=None, **_):
        shutil.copy(staged / filename, Path(download_root) / filename)
        plain = Path(download_root) / filename.removesuffix(".gz")
        plain.write_bytes(gzip.decompress((staged / filename).read_bytes()))

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", fake_download)
    ds = load_dataset(DataSpec(name="fashion-mnist", download=True))  # into ./data
    assert ds.test.y.tolist() == written["t10k"][1].tolist()
    assert str(Path.cwd() / "data" / "FashionMNIST" / "raw") in ds.source
    assert len(load_dataset(DataSpec(name="fashion-mnist")).train) == 40  # found there again


def test_ablate_data_is_honoured_and_data_root_comes_first(tmp_path, monkeypatch):
    write_fmnist(tmp_path / "env", n_train=30)
    monkeypatch.setenv("ABLATE_DATA", str(tmp_path / "env"))
    assert len(load_dataset(DataSpec(name="fashion-mnist")).train) == 30
    write_fmnist(tmp_path / "root", n_train=50)
    assert (
        len(load_dataset(DataSpec(name="fashion-mnist", root=str(tmp_path / "root"))).train) == 50
    )


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[:-100]),  # truncated gzip
        lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-5])),  # short
        lambda p: p.write_bytes(gzip.compress(b"\x00\x00\x09\x03" + bytes(100))),  # bad type
        lambda p: write_idx(p, np.full(20, 10, np.uint8)),  # labels out of range
    ],
    ids=["truncated-gzip", "short-payload", "bad-magic", "label-range"],
)
def test_corrupt_idx_file_is_named(tmp_path, damage, request):
    write_fmnist(tmp_path)
    kind = "labels-idx1" if "label" in request.node.callspec.id else "images-idx3"
    bad = tmp_path / f"t10k-{kind}-ubyte.gz"
    damage(bad)
    with pytest.raises(DataError, match=str(bad)):
        load_dataset(DataSpec(name="fashion-mnist", root=str(tmp_path)))


def test_images_and_labels_that_disagree_are_an_error(tmp_path):
    write_fmnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(39, np.uint8))
    with pytest.raises(DataError, match="40 images but .* 39 labels"):
        load_dataset(DataSpec(name="fashion-mnist", root=str(tmp_path)))


def test_missing_dataset_lists_places_and_remedies(tmp_path, monkeypatch):
    system = tmp_path / "usr-share-fm"
    monkeypatch.setattr(data_module, "SYSTEM_DIRS", {"fashion-mnist": (system,)})
    half = tmp_path / "half"
    write_fmnist(half)
    (half / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFound) as err:
        load_dataset(DataSpec(name="fashion-mnist", root=str(half)))
    message = str(err.value)
    assert "\n" not in message
    for place in (str(half), "$ABLATE_DATA (not set)", str(system), str(Path.cwd() / "data")):
        assert place in message
    assert "incomplete" in message and "t10k-labels-idx1-ubyte" in message
    for remedy in ("apt-get install dataset-fashion-mnist", "data.download: true", "$ABLATE_DATA"):
        assert remedy in message

    monkeypatch.setenv("ABLATE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFound) as err:
        load_dataset(DataSpec(name="cifar100"))
    message = str(err.value)
    assert "cifar-100-python" in message and str(tmp_path / "nowhere") in message
    assert "data.download: true" in message and "apt-get" not in message


# --------------------------------------------------------------------------------------------
# Subset, validation split, resize, statistics (on the synthetic set: 2000 train, 200 a class).


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(img.numpy().tobytes()) for img in x}


def test_train_subset_is_fixed_and_class_balanced():
    torch.manual_seed(1)
    a = load_dataset(DataSpec(name="synthetic", train_subset=105))
    torch.manual_seed(2)
    b = load_dataset(DataSpec(name="synthetic", train_subset=105))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    counts = torch.bincount(a.train.y, minlength=10)
    assert counts.sum() == 105 and counts.min() == 10 and counts.max() == 11
    full = load_dataset(DataSpec(name="synthetic"))
    assert _rows(a.train.x) <= _rows(full.train.x)
    assert torch.equal(a.test.x, full.test.x)
    assert a.mean == full.mean  # normalisation does not change with the subset
    smaller = load_dataset(DataSpec(name="synthetic", train_subset=50))
    assert _rows(smaller.train.x) <= _rows(a.train.x)


def test_test_subset_is_fixed_class_balanced_and_leaves_training_alone():
    full = load_dataset(DataSpec(name="synthetic"))
    a = load_dataset(DataSpec(name="synthetic", test_subset=100))
    b = load_dataset(DataSpec(name="synthetic", test_subset=100))
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)
    assert torch.bincount(a.test.y, minlength=10).tolist() == [10] * 10
    assert torch.equal(a.train.x, full.train.x)

    # every kept test image is one of the originals, with its own label
    def pairs(split):
        return {(img.numpy().tobytes(), int(y)) for img, y in zip(split.x, split.y, strict=True)}

    originals, kept = pairs(full.test), pairs(a.test)
    assert len(kept) == 100 and kept <= originals
    with pytest.raises(DataError, match=r"data\.test_subset is 501 .* test set has 500 images"):
        load_dataset(DataSpec(name="synthetic", test_subset=501))


def test_train_subset_larger_than_the_set_is_an_error():
    with pytest.raises(DataError, match=r"data\.train_subset is 2001 .* has 2000 images"):
        load_dataset(DataSpec(name="synthetic", train_subset=2001))
    with pytest.raises(DataError, match=r"data\.train_subset is 1900 .* 1800 images left"):
        load_dataset(DataSpec(name="synthetic", train_subset=1900, val_split=0.1))


def test_val_split_is_disjoint_class_balanced_and_spares_the_test_set():
    full = load_dataset(DataSpec(name="synthetic"))
    ds = load_dataset(DataSpec(name="synthetic", val_split=0.1))
    assert ds.val is not None and len(ds.val) == 200 and len(ds.train) == 1800
    assert torch.bincount(ds.val.y, minlength=10).tolist() == [20] * 10
    train_rows, val_rows = _rows(ds.train.x), _rows(ds.val.x)
    assert not train_rows & val_rows
    assert train_rows | val_rows == _rows(full.train.x)
    assert torch.equal(ds.test.x, full.test.x) and torch.equal(ds.test.y, full.test.y)
    sub = load_dataset(DataSpec(name="synthetic", val_split=0.1, train_subset=100))
    assert torch.equal(sub.val.x, ds.val.x)  # the subset is taken after the hold-out
    assert _rows(sub.train.x) <= train_rows
    assert ds.mean == sub.mean != full.mean  # statistics from the training images only


def test_val_split_that_holds_out_nothing_is_an_error():
    with pytest.raises(DataError, match=r"data\.val_split 0\.001 holds out no images"):
        load_dataset(DataSpec(name="synthetic", val_split=0.001))


def test_resize_keeps_uint8_and_resizes_every_split():
    ds = load_dataset(DataSpec(name="synthetic", resize=48, val_split=0.1))
    for split in (ds.train, ds.val, ds.test):
        assert split.x.shape[1:] == (3, 48, 48) and split.x.dtype == torch.uint8
    assert ds.image_size == 48
    flat = data_module.resize_images(torch.full((2, 1, 28, 28), 77, dtype=torch.uint8), 96)
    assert flat.shape == (2, 1, 96, 96) and bool((flat == 77).all())


def test_mean_and_std_are_those_of_the_training_images():
    ds = load_dataset(DataSpec(name="synthetic"))
    x = ds.train.x.double() / 255
    assert ds.mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)
    assert ds.std == pytest.approx(x.std(dim=(0, 2, 3), correction=0).tolist(), abs=1e-9)


# --------------------------------------------------------------------------------------------
# Synthetic.


def test_synthetic_is_deterministic_balanced_and_cheap():
    torch.manual_seed(3)
    a = load_dataset(DataSpec(name="synthetic"))
    torch.manual_seed(4)
    b = load_dataset(DataSpec(name="synthetic"))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert a.train.x.shape == (2000, 3, 32, 32) and a.test.x.shape == (500, 3, 32, 32)
    assert torch.bincount(a.train.y).tolist() == [200] * 10
    assert a.num_classes == 10 and len(set(a.classes)) == 10
    # Cheap: 2500 uint8 images of 3x32x32, 7.7 MB in memory (time is not asserted: it depends
    # on the machine and its load).
    assert a.train.x.dtype == torch.uint8 and a.train.x.nbytes + a.test.x.nbytes == 7_680_000


def test_synthetic_is_learnable_but_not_at_once():
    ds = load_dataset(DataSpec(name="synthetic"))
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    train = DeviceLoader(
        ds.train, batch_size=64, mean=ds.mean, std=ds.std, train=True, augment=True
    )
    test = DeviceLoader(ds.test, batch_size=250, mean=ds.mean, std=ds.std, train=False)

    def test_err() -> float:
        net.eval()
        with torch.no_grad():
            wrong = sum(int((net(x).argmax(1) != y).sum()) for x, y in test.epoch())
        net.train()
        return wrong / len(ds.test)

    errors = []
    for epoch in range(4):
        for x, y in train.epoch(epoch):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        errors.append(test_err())
    assert errors[0] > 0.5  # one epoch does not solve it (0.77 here)
    assert errors[-1] < 0.5  # far below chance (0.9) after four (0.31 here)


# --------------------------------------------------------------------------------------------
# DeviceLoader.


def _indexed(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> Split:
    """Random images whose label is their index, so a batch says where each image came from."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    return Split(x, torch.arange(n))


def _raw(x: torch.Tensor) -> torch.Tensor:
    """Undo normalisation with mean 0, std 1: float x / 255 back to uint8."""
    return (x * 255).round().to(torch.uint8)


def _identity(channels: int) -> dict:
    return {"mean": (0.0,) * channels, "std": (1.0,) * channels}


def _window(src: torch.Tensor, out: torch.Tensor, pad: int) -> tuple[int, int, bool] | None:
    """The (dy, dx, flipped) whose window of the zero-padded src is out, if any."""
    padded = F.pad(src, (pad, pad, pad, pad))
    h, w = src.shape[-2:]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[:, dy : dy + h, dx : dx + w]
            for flipped in (False, True):
                if torch.equal(window.flip(-1) if flipped else window, out):
                    return dy, dx, flipped
    return None


@pytest.mark.parametrize(("channels", "size", "pad"), [(3, 32, 4), (1, 28, 2)])
def test_augmented_images_are_crops_of_the_padded_image_and_half_flipped(channels, size, pad):
    split = _indexed(600, channels, size)
    loader = DeviceLoader(split, batch_size=100, train=True, augment=True, **_identity(channels))
    assert loader.pad == pad
    offsets, flips = set(), []
    for epoch in range(2):
        for x, y in loader.epoch(epoch):
            for img, i in zip(_raw(x), y.tolist(), strict=True):
                found = _window(split.x[i], img, pad)
                assert found is not None, f"image {i} is no crop of its padded source"
                offsets.add(found[:2])
                flips.append(found[2])
    assert len(flips) == 1200
    assert 0.42 < sum(flips) / len(flips) < 0.58
    assert len(offsets) == (2 * pad + 1) ** 2  # every offset, the padded borders included


def test_augment_batch_without_padding_only_flips():
    x = _indexed(64).x
    out = augment_batch(x, 0, torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all()) and 10 < int(flipped.sum()) < 54


def test_training_batches_have_static_shape_and_drop_the_partial_batch():
    loader = DeviceLoader(_indexed(100), batch_size=32, train=True, **_identity(3))
    batches = list(loader.epoch(0))
    assert len(loader) == len(batches) == 3
    assert all(x.shape == (32, 3, 32, 32) and y.shape == (32,) for x, y in batches)
    seen = torch.cat([y for _, y in batches])
    assert len(set(seen.tolist())) == 96  # a permutation: no image twice in an epoch
    assert seen.tolist() != sorted(seen.tolist())


def test_without_augment_training_images_are_untouched():
    split = _indexed(64)
    loader = DeviceLoader(split, batch_size=16, train=True, augment=False, **_identity(3))
    for x, y in loader.epoch(0):
        assert torch.equal(_raw(x), split.x[y])


def test_evaluation_covers_every_example_once_in_order():
    split = _indexed(100)
    loader = DeviceLoader(split, batch_size=32, train=False, augment=True, **_identity(3))
    batches = list(loader.epoch(5))
    assert len(loader) == len(batches) == 4
    assert [len(y) for _, y in batches] == [32, 32, 32, 4]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(100))
    assert torch.equal(_raw(torch.cat([x for x, _ in batches])), split.x)  # no augmentation


def _epoch(loader: DeviceLoader, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader.epoch(epoch), strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_same_seed_same_batches_and_epochs_differ():
    split = _indexed(256)

    def make(seed: int) -> DeviceLoader:
        return DeviceLoader(
            split, batch_size=64, train=True, augment=True, seed=seed, **_identity(3)
        )

    x0, y0 = _epoch(make(0), 3)
    x1, y1 = _epoch(make(0), 3)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    x2, y2 = _epoch(make(1), 3)
    assert not torch.equal(y0, y2)
    _, y_next = _epoch(make(0), 4)
    assert not torch.equal(y0, y_next)


def test_an_epoch_is_the_same_after_a_resume():
    split = _indexed(256)
    kwargs = dict(batch_size=64, train=True, augment=True, seed=7, **_identity(3))
    uninterrupted = DeviceLoader(split, **kwargs)
    for epoch in range(2):
        for _ in uninterrupted.epoch(epoch):
            pass
    half = iter(uninterrupted.epoch(2))
    next(half)  # an epoch abandoned halfway (the interruption) must not shift the next one
    x_a, y_a = _epoch(uninterrupted, 3)
    x_b, y_b = _epoch(DeviceLoader(split, **kwargs), 3)  # a fresh process resuming at epoch 3
    assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b)


def test_normalisation_uses_mean_and_std():
    split = _indexed(50)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    loader = DeviceLoader(split, batch_size=50, mean=mean, std=std, train=False)
    ((x, _),) = loader.epoch()
    expected = (
        split.x.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1).double()
    ) / torch.tensor(std).view(1, 3, 1, 1).double()
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.double(), expected, atol=1e-5, rtol=0)
    with pytest.raises(TypeError):
        normalize(x, loader.mean, loader.std)


@pytest.mark.parametrize("name", ["synthetic", "fashion-mnist"])
def test_normalize_half_maps_pixels_to_minus_one_to_one_as_the_tutorial_does(tmp_path, name):
    if name == "fashion-mnist":
        write_fmnist(tmp_path)
    spec = DataSpec(name=name, root=str(tmp_path), normalize="half", resize=48)
    ds = load_dataset(spec)
    channels = ds.in_channels
    assert (ds.mean, ds.std) == ((0.5,) * channels, (0.5,) * channels)
    assert load_dataset(spec.model_copy(update={"normalize": "mean_std"})).mean != ds.mean
    loader = DeviceLoader(ds.test, batch_size=len(ds.test), mean=ds.mean, std=ds.std, train=False)
    ((x, _),) = loader.epoch()
    # The tutorial: float32 pixels / 255, then (x - 0.5) / 0.5; equal to float32 rounding.
    tutorial = (ds.test.x.numpy().astype(np.float32) / 255 - 0.5) / 0.5
    torch.testing.assert_close(x, torch.from_numpy(tutorial), rtol=0, atol=2.5e-7)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert float(x.min()) < -0.9 and float(x.max()) > 0.9  # the range is used, not squeezed


def test_resize_is_pils_bilinear_resize():
    """The tutorial resizes each PIL image with `resize((96, 96), 2)`; this is the same."""
    x = load_dataset(DataSpec(name="synthetic")).train.x[:20]
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()).resize((96, 96), 2) for img in x]
    expected = torch.stack([torch.from_numpy(np.array(img)).permute(2, 0, 1) for img in pil])
    assert torch.equal(data_module.resize_images(x, 96), expected)


@pytest.mark.parametrize("train", [True, False])
def test_channels_last_is_honoured(train):
    split = _indexed(64)
    kwargs = dict(batch_size=32, train=train, augment=True, mean=(0.5,) * 3, std=(0.25,) * 3)
    x_cl, _ = next(iter(DeviceLoader(split, channels_last=True, **kwargs).epoch(0)))
    x_std, _ = next(iter(DeviceLoader(split, **kwargs).epoch(0)))
    assert x_cl.is_contiguous(memory_format=torch.channels_last) and not x_cl.is_contiguous()
    assert x_std.is_contiguous()
    assert torch.equal(x_cl, x_std)


def test_training_batch_larger_than_the_set_is_an_error():
    with pytest.raises(DataError, match=r"train\.batch_size 128 .* 100-image"):
        DeviceLoader(_indexed(100), batch_size=128, train=True, **_identity(3))
    assert len(DeviceLoader(_indexed(100), batch_size=128, train=False, **_identity(3))) == 1


# --------------------------------------------------------------------------------------------
# The loader benchmark (numbers in the note; here only that it runs and reports).


def test_loader_benchmark_reports_both_pipelines(capsys):
    from resnet_ablate.bench.loader import main

    assert (
        main(["--dataset", "synthetic", "--batches", "2", "--repeats", "1", "--workers", "0"]) == 0
    )
    table = capsys.readouterr().out
    assert "DeviceLoader" in table and "DataLoader+PIL, 0 workers" in table
    assert main(["--dataset", "cifar10", "--workers", "0"]) == 2
    assert "cifar10 not found" in capsys.readouterr().err


def test_loader_benchmark_result():
    from resnet_ablate.bench.loader import bench_loader

    ds = load_dataset(DataSpec(name="synthetic", train_subset=300))
    result = bench_loader(ds, batch_size=64, batches=2, repeats=1, workers=(0,))
    rates = result["images_per_second"]
    assert set(rates) == {"DeviceLoader", "DataLoader+PIL, 0 workers"}
    assert all(rate > 0 for rate in rates.values())
    assert result["ratio"] == pytest.approx(
        rates["DeviceLoader"] / rates["DataLoader+PIL, 0 workers"]
    )
    assert result["shape"] == (3, 32, 32) and result["batches"] == 2

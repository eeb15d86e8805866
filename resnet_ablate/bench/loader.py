"""How fast does DeviceLoader serve augmented batches, against torchvision's DataLoader?

Both pipelines do the same work on the same training images: shuffle, random crop with zero
padding, horizontal flip, conversion to normalised float32 (B, C, H, W) batches on the device.
DeviceLoader does it as batched tensor ops on resident uint8 data; the baseline is the standard
recipe (PIL ``RandomCrop(padding)`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize`` in a
``DataLoader``, then ``.to(device)``) with 0 and 2 worker processes. Both run in one process, one
after the other, each with a warm-up and the median of several timed repeats.

    python -m resnet_ablate.bench.loader --dataset fashion-mnist
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import get_args

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from resnet_ablate.config import DatasetName, DataSpec
from resnet_ablate.data import DataError, Dataset, DeviceLoader, Split, default_pad, load_dataset


class PILImages(torch.utils.data.Dataset):
    """A torchvision-style dataset over uint8 NCHW images: PIL image in, transform applied."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable) -> None:
        self.images = x.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C), as PIL wants
        self.labels = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        return self.transform(pil), self.labels[i]


def standard_transform(
    size: int, pad: int, mean: Sequence[float], std: Sequence[float]
) -> transforms.Compose:
    """The tutorial's per-image augmentation: PIL pad-crop and flip, ToTensor, Normalize."""
    return transforms.Compose(
        [
            transforms.RandomCrop(size, padding=pad),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def standard_loader(
    split: Split,
    dataset: Dataset,
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
) -> DataLoader:
    """The standard training loader over a split: shuffled, augmented per image with PIL, full
    batches only, `workers` worker processes (kept alive between epochs), pinned for CUDA."""
    size = split.x.shape[2]
    pipeline = standard_transform(size, default_pad(size), dataset.mean, dataset.std)
    return DataLoader(
        PILImages(split.x, split.y, pipeline),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(run: Callable[[int], int], repeats: int, device: torch.device) -> float:
    """Median images/s of run(repeat) (which returns the images it produced), after a warm-up."""
    run(-1)
    rates = []
    for r in range(repeats):
        _sync(device)
        start = time.perf_counter()
        images = run(r)
        _sync(device)
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def _take(batches: object, n: int, device: torch.device) -> int:
    """Consume n batches (moving them to the device); the number of images seen."""
    images = 0
    for i, (x, _) in enumerate(batches):
        if i == n:
            break
        x = x.to(device, non_blocking=True)
        images += len(x)
    return images


def bench_loader(
    source: DataSpec | Dataset,
    batch_size: int = 128,
    batches: int = 40,
    repeats: int = 5,
    device: torch.device | str = "cpu",
    workers: Sequence[int] = (0, 2),
) -> dict:
    """Images/s of DeviceLoader and of DataLoader+PIL (per worker count) on the training set.

    Returns {"dataset", "shape", "batch_size", "batches", "device", "images_per_second":
    {loader: rate}, "ratio": DeviceLoader rate / the fastest DataLoader rate}.
    """
    dataset = source if isinstance(source, Dataset) else load_dataset(source)
    device = torch.device(device)
    split = dataset.train
    size = dataset.image_size
    pad = default_pad(size)
    loader = DeviceLoader(
        split,
        batch_size=batch_size,
        mean=dataset.mean,
        std=dataset.std,
        device=device,
        train=True,
        augment=True,
        pad=pad,
    )
    batches = min(batches, len(loader))
    rates = {
        "DeviceLoader": _time(
            lambda r: _take(loader.epoch(r + 1), batches, device), repeats, device
        )
    }
    for n in workers:
        data_loader = standard_loader(
            split, dataset, batch_size=batch_size, workers=n, device=device
        )
        label = f"DataLoader+PIL, {n} worker{'s' if n != 1 else ''}"
        rates[label] = _time(lambda r, dl=data_loader: _take(dl, batches, device), repeats, device)
        del data_loader  # stops its workers before the next configuration is timed
    baseline = max((v for k, v in rates.items() if k != "DeviceLoader"), default=None)
    return {
        "dataset": dataset.name,
        "shape": tuple(split.x.shape[1:]),
        "train_images": len(split),
        "batch_size": batch_size,
        "batches": batches,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "images_per_second": rates,
        "ratio": rates["DeviceLoader"] / baseline if baseline else None,
    }


def format_table(result: dict) -> str:
    c, h, w = result["shape"]
    lines = [
        f"{result['dataset']} train ({result['train_images']} x {c}x{h}x{w}), batch "
        f"{result['batch_size']}, {result['batches']} batches a repeat, {result['device']} "
        f"({result['threads']} threads): "
        f"pad-crop + flip + normalise to float32",
        f"{'loader':<28}{'images/s':>12}{'DeviceLoader is':>18}",
    ]
    fast = result["images_per_second"]["DeviceLoader"]
    for name, rate in result["images_per_second"].items():
        lines.append(f"{name:<28}{rate:>12,.0f}{fast / rate:>17.1f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_ablate.bench.loader", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dataset", default="synthetic", choices=get_args(DatasetName))
    parser.add_argument("--root", default=None, help="folder holding the dataset (data.root)")
    parser.add_argument("--resize", type=int, default=None, help="resize images to N x N first")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=40, help="batches in one timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts, e.g. 0,2")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        spec = DataSpec(name=args.dataset, root=args.root, resize=args.resize)
        result = bench_loader(
            spec,
            batch_size=args.batch_size,
            batches=args.batches,
            repeats=args.repeats,
            device=args.device,
            workers=[int(n) for n in args.workers.split(",") if n.strip()],
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where and how a cell trains: execution options, resolved against the machine.

:class:`ExecOptions` are what a user asks for (device, precision, channels-last, CUDA graph,
torch.compile, threads): they change speed, never what a cell computes, so they are not in its
key. :func:`resolve_runtime` turns them into the :class:`Runtime` a step runs with, after
:func:`setup_device` has set the process up for the device (the one place that does, for
``ablate run``, ``ablate tune`` and ``ablate bench`` alike).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch

Precision = Literal["auto", "bf16", "fp32"]


@dataclass(frozen=True)
class ExecOptions:
    """Execution settings: they change speed, never what a cell is (not in its key)."""

    device: str = "auto"
    precision: Precision = "auto"
    channels_last: bool | None = None  # None: wherever bf16 runs or on CUDA
    cuda_graph: bool = True
    compile: bool = False
    threads: int | None = None


@dataclass(frozen=True)
class Runtime:
    """ExecOptions resolved against the machine."""

    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    channels_last: bool
    cuda_graph: bool
    compile: bool

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype is torch.bfloat16 else "fp32"

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype is None:
            return nullcontext()
        # The autocast weight cache must be off while a CUDA graph is captured.
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=not self.cuda_graph)

    def describe(self) -> str:
        features = [self.precision] + [
            name
            for name, on in (
                ("channels_last", self.channels_last),
                ("cuda_graph", self.cuda_graph),
                ("compile", self.compile),
            )
            if on
        ]
        return f"{device_name(self.device)} ({', '.join(features)})"


def resolve_device(name: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    from .errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


@cache
def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


@dataclass(frozen=True)
class DeviceSetup:
    """The process-wide settings for training on a device: what :func:`setup_device` sets."""

    device: str
    cuda_device: int | None  # torch.cuda.set_device(this); None: the current device stays
    cudnn_benchmark: bool | None  # torch.backends.cudnn.benchmark; None: untouched (no CUDA)
    threads: int | None  # torch.set_num_threads(this); None: torch's own choice stays

    def apply(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.cuda_device is not None:
            torch.cuda.set_device(self.cuda_device)
        if self.cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = self.cudnn_benchmark

    def record(self) -> dict[str, Any]:
        """What was set, and the thread count in effect: for a benchmark's JSON."""
        return asdict(self) | {"threads_in_effect": torch.get_num_threads()}


def plan_device(device: torch.device, threads: int | None = None) -> DeviceSetup:
    """The settings for `device`: on CUDA, that GPU as the process's current device (`cuda:N`:
    the runner spreads workers round-robin, and streams, graphs and their capture pools are
    made on the current device) and cuDNN's benchmark mode (small-channel convolutions vary
    most between its algorithms; it picks during the eager warm-up steps, before any capture).
    `threads` (the runner's share of a CPU's cores per worker) wherever given."""
    cuda = device.type == "cuda"
    return DeviceSetup(
        device=str(device),
        cuda_device=device.index if cuda else None,
        cudnn_benchmark=True if cuda else None,
        threads=threads,
    )


def setup_device(options: ExecOptions) -> DeviceSetup:
    """Set this process up for `options.device` (see :func:`plan_device`); the one place that
    does, for `ablate run`, `ablate tune` and `ablate bench` alike. Idempotent."""
    setup = plan_device(resolve_device(options.device), options.threads)
    setup.apply()
    return setup


def resolve_runtime(options: ExecOptions) -> Runtime:
    """Set the device up (:func:`setup_device`) and resolve the options against it."""
    setup_device(options)
    device = resolve_device(options.device)
    if options.precision == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        dtype = torch.bfloat16 if fast else None
    else:
        dtype = torch.bfloat16 if options.precision == "bf16" else None
    channels_last = (
        options.channels_last
        if options.channels_last is not None
        else device.type == "cuda" or dtype is not None
    )
    return Runtime(
        device=device,
        dtype=dtype,
        channels_last=channels_last,
        cuda_graph=options.cuda_graph and device.type == "cuda",
        compile=options.compile,
    )

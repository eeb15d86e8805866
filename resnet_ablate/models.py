"""Residual and plain networks with every ablation axis of He et al. (2015, 2016) as one argument.

`build_model(spec, in_channels, num_classes)` reads the axes of a `ModelSpec`; each changes one
place below: `block` the branch's convolutions (`_branch_convs`), `order` where BN and ReLU sit
(`RECIPES`), `shortcut` what is added (`_shortcut`), `arch` the stem and the number of stages.

Parameters for 3 input channels and 10 classes, and forward multiply-accumulates (convolutions
and the classifier) for one input, as `describe` counts them; tests/test_models.py checks every
row, and the published sizes (He et al. 2015 Table 6, 2016 Table 3) within 2%:

    arch      block       shortcut    order     depth       params            MACs  input  paper
    cifar     basic       identity    post         20      269,722      40,551,040  32x32  0.27M
    cifar     basic       identity    post         32      464,154      68,862,592  32x32  0.46M
    cifar     basic       identity    post         44      658,586      97,174,144  32x32  0.66M
    cifar     basic       identity    post         56      853,018     125,485,696  32x32  0.85M
    cifar     basic       identity    post        110    1,727,962     252,887,680  32x32  1.7M
    cifar     basic       identity    post       1202   19,421,274   2,829,238,912  32x32  19.4M
    cifar     bottleneck  identity    post        164    1,661,274     242,403,840  32x32  -
    cifar     bottleneck  projection  post        164    1,704,154     247,646,720  32x32  1.7M
    cifar     bottleneck  projection  pre         164    1,703,258     247,646,720  32x32  1.7M
    tutorial  basic       projection  tutorial     18   11,180,682     304,858,816  96x96  -

A plain net (`shortcut: none`) has exactly the parameters of its option-A twin.

Choices the papers leave open, and what this module does:

- Bottleneck with option A: the first unit of stage 1 widens 16 -> 64 channels at full
  resolution; it is zero-padded like every other change of shape, so `identity` stays
  parameter-free. That gives 1.66M for ResNet-164, 2.4% under the published 1.7M: He et al.
  (2016) used projections (option B) wherever the shape changes, which gives 1.70M; use
  `shortcut: projection` to reproduce their ResNet-164.
- Projection (option B) ends as the branch ends: 1x1 conv + BN where the branch's last conv is
  followed by BN (post, relu_before_add, relu_only_pre, tutorial), the conv alone where it is
  not (pre, as in He et al.'s code and timm; bn_after_add, whose BN follows the addition).
- Pre-activation (`pre`, and `relu_only_pre`, which pre-activates with ReLU alone): the stem is
  a bare conv (conv + BN for relu_only_pre) because the first unit activates its input; a
  projection reads the pre-activated input (the recipe says so: `projection_reads_preact`); an
  identity or option-A shortcut reads the raw input; the network ends with the unit's
  activation (BN-ReLU, or ReLU) before pooling.
- `arch: tutorial` with `order: tutorial` is the PyTorch tutorial's network as its code has it:
  a bare 7x7 stride-2 stem conv with bias and no padding, straight into the max-pool (no BN, no
  ReLU); 3x3 convs without bias, each followed by BN and ReLU; a 1x1 projection with bias and
  without BN, reading the unit's raw input; PyTorch's default initialisation, since the
  tutorial sets none. Every other order on that arch follows this module's conventions:
  bias-free convs with BN, the recipe's stem activation, He initialisation. Pooling is global:
  on 96x96 input the last stage is 3x3, so it equals the tutorial's AvgPool2d(3), and other
  input sizes still work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from resnet_ablate.config import STAGES, ModelSpec, units_per_stage

#: Channels out of a bottleneck unit per inner (3x3) channel: 1x1-3x3-1x1 with 4x expansion.
EXPANSION = 4


class Recipe(NamedTuple):
    """Where BN (`b`) and ReLU (`r`) sit around each convolution (`c`) for one unit order."""

    stem: str  # after the stem convolution
    inner: str  # every branch layer but the last
    last: str  # the branch's last layer
    after_add: str  # on the sum (on the branch output alone in a plain net)
    final: str  # after the last unit, before global pooling
    # Pre-activation orders only: a projection shortcut reads the pre-activated input, as He et
    # al.'s code and timm's resnetv2 do, not the raw one. Orders that do not pre-activate have
    # nothing else to read (False). Identity and option-A shortcuts always read the raw input.
    projection_reads_preact: bool = False


#: He et al. 2016, Fig. 4 (a)-(e), plus the PyTorch tutorial's unit. Pre-activation orders (d, e)
#: begin each unit with its own activation, so their stem stops short of it (the first unit
#: activates the stem's output) and the network ends with that activation once more: the sum that
#: leaves the last unit has not been activated by anyone.
RECIPES: dict[str, Recipe] = {
    "post": Recipe(stem="br", inner="cbr", last="cb", after_add="r", final=""),  # (a)
    "bn_after_add": Recipe(stem="br", inner="cbr", last="c", after_add="br", final=""),  # (b)
    "relu_before_add": Recipe(stem="br", inner="cbr", last="cbr", after_add="", final=""),  # (c)
    "relu_only_pre": Recipe(  # (d)
        stem="b", inner="rcb", last="rcb", after_add="", final="r", projection_reads_preact=True
    ),
    "pre": Recipe(  # (e)
        stem="", inner="brc", last="brc", after_add="", final="br", projection_reads_preact=True
    ),
    "tutorial": Recipe(stem="br", inner="cbr", last="cbr", after_add="r", final=""),
}


# --------------------------------------------------------------------------------------------
# Convolutions and the layers around them.


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BN or the next conv absorbs it)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """1x1 convolution: the bottleneck's reduce/expand layers and the projection shortcut."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias)


def _wrap(conv: nn.Conv2d, pattern: str) -> list[nn.Module]:
    """`conv` with BN and ReLU placed as `pattern` says; a BN before the conv sees its input."""
    ops: list[nn.Module] = []
    channels = conv.in_channels
    for op in pattern:
        if op == "c":
            ops.append(conv)
            channels = conv.out_channels
        elif op == "b":
            ops.append(nn.BatchNorm2d(channels))
        else:
            ops.append(nn.ReLU())
    return ops


def _activation(pattern: str, channels: int) -> nn.Sequential:
    """BN/ReLU ops without a convolution (after an addition, before pooling)."""
    return nn.Sequential(*(nn.BatchNorm2d(channels) if op == "b" else nn.ReLU() for op in pattern))


class ZeroPadShortcut(nn.Module):
    """Option A (He et al. 2015): subsample by `stride`, append `extra` all-zero channels.

    Parameter-free. A named module, not a lambda, so the model pickles. The kept pixels are the
    top-left ones of each stride x stride block: those a 1x1 stride-2 convolution would read.
    """

    def __init__(self, stride: int, extra: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, C, H/s, W/s), ceil as the 3x3 conv
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))  # (B, C + extra, H/s, W/s)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra={self.extra}"


def _shortcut(
    kind: str,
    reshapes: bool,
    in_channels: int,
    out_channels: int,
    stride: int,
    norm: bool,
    bias: bool,
) -> nn.Module | None:
    """The shortcut of one unit: None in a plain net, identity wherever the shape is kept."""
    if kind == "none":
        return None
    if not reshapes:
        return nn.Identity()
    if kind == "identity":
        return ZeroPadShortcut(stride, out_channels - in_channels)
    conv = conv1x1(in_channels, out_channels, stride, bias=bias)  # option B
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels)) if norm else nn.Sequential(conv)


# --------------------------------------------------------------------------------------------
# Units.


def _branch_convs(block: str, in_channels: int, width: int, stride: int) -> list[nn.Conv2d]:
    """The residual branch's convolutions; a bottleneck strides in its 3x3 (torchvision v1.5)."""
    if block == "basic":
        return [conv3x3(in_channels, width, stride), conv3x3(width, width)]
    return [
        conv1x1(in_channels, width),  # reduce
        conv3x3(width, width, stride),
        conv1x1(width, width * EXPANSION),  # expand
    ]


class Unit(nn.Module):
    """One residual unit: `after_add(branch(preact(x)) + shortcut(x))`.

    `preact` holds the ops of a pre-activation order before the first convolution (empty
    otherwise). The shortcut reads the pre-activated input where `shortcut_reads_preact` (a
    projection in a pre-activation order, see `Recipe`), the raw input otherwise, so an identity
    path stays clean. With `shortcut=None` (plain net) nothing is added.
    """

    def __init__(
        self,
        preact: nn.Module,
        branch: nn.Module,
        shortcut: nn.Module | None,
        after_add: nn.Module,
        shortcut_reads_preact: bool,
    ) -> None:
        super().__init__()
        self.preact = preact
        self.branch = branch
        self.shortcut = shortcut
        self.after_add = after_add
        self.shortcut_reads_preact = shortcut_reads_preact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.preact(x)
        out = self.branch(a)  # (B, C_out, H/s, W/s)
        if self.shortcut is not None:  # fixed at construction: no data-dependent control flow
            out = out + self.shortcut(a if self.shortcut_reads_preact else x)
        return self.after_add(out)


def _unit(
    spec: ModelSpec, in_channels: int, width: int, stride: int, as_written: bool
) -> tuple[Unit, int]:
    """A unit of `spec`'s block, order and shortcut; returns it and its output channels."""
    recipe = RECIPES[spec.order]
    convs = _branch_convs(spec.block, in_channels, width, stride)
    patterns = [recipe.inner] * (len(convs) - 1) + [recipe.last]
    ops = [op for conv, pattern in zip(convs, patterns, strict=True) for op in _wrap(conv, pattern)]
    n_pre = patterns[0].index("c")  # ops of the first layer that come before its convolution
    out_channels = convs[-1].out_channels
    reshapes = in_channels != out_channels or stride != 1
    shortcut = _shortcut(
        spec.shortcut,
        reshapes,
        in_channels,
        out_channels,
        stride,
        # The projection ends as the branch does: normalised where the last conv is followed
        # by BN. In `pre` the stream is un-normalised (timm, He et al.'s code: conv alone).
        norm="cb" in recipe.last and not as_written,
        bias=as_written,
    )
    projects = spec.shortcut == "projection" and reshapes
    unit = Unit(
        preact=nn.Sequential(*ops[:n_pre]),
        branch=nn.Sequential(*ops[n_pre:]),
        shortcut=shortcut,
        after_add=_activation(recipe.after_add, out_channels),
        shortcut_reads_preact=projects and recipe.projection_reads_preact,
    )
    return unit, out_channels


# --------------------------------------------------------------------------------------------
# The network.


class ResNet(nn.Module):
    """stem -> (maxpool) -> stages of units -> final activation -> global average pool -> fc."""

    def __init__(self, spec: ModelSpec, in_channels: int, num_classes: int) -> None:
        super().__init__()
        n = units_per_stage(spec.arch, spec.block, spec.depth)
        recipe = RECIPES[spec.order]
        tutorial = spec.arch == "tutorial"
        # The tutorial's own network as its code has it: a bare stem conv with bias (no BN, no
        # ReLU before the max-pool), projections with bias and without BN, default init.
        as_written = tutorial and spec.order == "tutorial"
        stem_ops = "" if as_written else recipe.stem
        if tutorial:  # 96x96 -> 45x45 (7x7 stride 2, no padding) -> 22x22 after the max-pool
            stem_conv = nn.Conv2d(in_channels, spec.width, 7, stride=2, bias=as_written)
        else:  # 32x32 -> 32x32
            stem_conv = conv3x3(in_channels, spec.width)
        self.stem = nn.Sequential(*_wrap(stem_conv, "c" + stem_ops))
        self.maxpool = nn.MaxPool2d(3, stride=2) if tutorial else nn.Identity()

        # Stage i has inner width w * 2**i; all but the first halve the resolution in their
        # first unit (CIFAR 32 -> 16 -> 8; tutorial 22 -> 11 -> 6 -> 3).
        stages, channels = [], spec.width
        for i in range(STAGES[spec.arch]):
            units = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                unit, channels = _unit(spec, channels, spec.width * 2**i, stride, as_written)
                units.append(unit)
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.final = _activation(recipe.final, channels)
        # Global pooling: on the tutorial's 96x96 input the last stage is 3x3, so this is its
        # AvgPool2d(3) exactly, and other input sizes still work.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        if not as_written:  # the tutorial sets no initialisation: PyTorch's defaults stand
            _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))  # (B, w, H, W) for CIFAR
        x = self.final(self.stages(x))  # (B, C, H/4, W/4) for CIFAR, C = 4w (basic) or 16w
        return self.fc(torch.flatten(self.pool(x), 1))  # (B, num_classes)


def _init(model: nn.Module) -> None:
    """He (Kaiming) normal for convolutions (fan_out, as torchvision); BN scale 1, shift 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(spec: ModelSpec, in_channels: int, num_classes: int) -> nn.Module:
    """The network `spec` describes, for `in_channels`-channel images and `num_classes` classes.

    Raises ValueError naming the possible depths when `spec.depth` does not fit its block.
    """
    units_per_stage(spec.arch, spec.block, spec.depth)  # loud, even for unvalidated specs
    return ResNet(spec, in_channels, num_classes)


# --------------------------------------------------------------------------------------------
# Inspection.


@dataclass(frozen=True)
class ModelInfo:
    """Size of a model: parameters, and multiply-accumulates of one forward pass on one input."""

    params: int
    macs: int


def describe(model: nn.Module, input_shape: tuple[int, int, int]) -> ModelInfo:
    """Parameters and forward MACs (convolutions and linear layers) for one (C, H, W) input.

    Runs one forward pass in eval mode without gradients, so BN running statistics are left as
    they were; every module's train/eval mode is restored afterwards.
    """
    macs = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        per_output = output.numel() // output.shape[0]
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs += per_output * (module.in_channels // module.groups) * kh * kw
        else:
            macs += per_output * module.in_features

    modes = {m: m.training for m in model.modules()}
    hooks = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    param = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return ModelInfo(params=sum(p.numel() for p in model.parameters()), macs=macs)


def main_path_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The convolutions along the main path in depth order: stem, then each unit's branch.

    Shortcut projections are left out; the trainer logs the gradient norm of each of these.
    """
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and "shortcut" not in name.split(".")
    ]

"""Models: the papers' sizes, and each axis checked by what the network computes."""

from __future__ import annotations

import copy
import pickle
import re
import typing

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_ablate import models
from resnet_ablate.config import ModelSpec, Order
from resnet_ablate.models import Unit, build_model, describe, main_path_convs

BLOCKS = ["basic", "bottleneck"]
SHORTCUTS = ["none", "identity", "projection"]
ORDERS = list(typing.get_args(Order))
PRE_ACTIVATION = ["pre", "relu_only_pre"]


def spec(**fields: typing.Any) -> ModelSpec:
    return ModelSpec(**fields)


def small(
    block: str = "basic", shortcut: str = "identity", order: str = "post", width: int = 4
) -> nn.Module:
    """A depth-20 CIFAR net (3 basic or 2 bottleneck units a stage), `width` channels wide."""
    torch.manual_seed(0)
    return build_model(spec(block=block, shortcut=shortcut, order=order, width=width), 3, 10)


def units(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, Unit)]


def record(model: nn.Module, watched: list[nn.Module], x: torch.Tensor):
    """Run `model(x)`, returning its output and each watched module's (input, output)."""
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module, inputs, output):
        seen[module] = (inputs[0].detach().clone(), output.detach().clone())

    handles = [m.register_forward_hook(hook) for m in watched]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, [seen[m] for m in watched]


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Train-mode BN with scale 1 and shift 0: per channel over (batch, height, width)."""
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def option_a(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """He et al. 2015 option A by hand: subsample by 2 if the resolution halves, zero-pad."""
    if x.shape[-1] != like.shape[-1]:
        x = x[:, :, ::2, ::2]
    return F.pad(x, (0, 0, 0, 0, 0, like.shape[1] - x.shape[1]))


def zero_last_convs(model: nn.Module) -> None:
    """Zero the last convolution of every residual branch: each branch then outputs zeros."""
    with torch.no_grad():
        for unit in units(model):
            convs = [m for m in unit.branch.modules() if isinstance(m, nn.Conv2d)]
            convs[-1].weight.zero_()


# --------------------------------------------------------------------------------------------
# Every combination builds and trains.


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 1, 28, 28)], ids=["cifar", "fmnist"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shortcut", SHORTCUTS)
@pytest.mark.parametrize("block", BLOCKS)
def test_every_combination_runs_forward_and_backward(block, shortcut, order, shape):
    num_classes = 10 if shape[1] == 3 else 7
    torch.manual_seed(0)
    model = build_model(
        spec(block=block, shortcut=shortcut, order=order, width=8), shape[1], num_classes
    )
    out = model(torch.randn(shape))
    assert out.shape == (2, num_classes)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} is not used in forward"
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Sizes: the papers' parameter counts and MACs, and the table in the module docstring.


@pytest.mark.parametrize(
    ("depth", "paper"), [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6), (110, 1.7e6)]
)
def test_cifar_resnet_parameters_as_published(depth, paper):
    model = build_model(spec(depth=depth, shortcut="identity"), 3, 10)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - paper) / paper < 0.02, params


@pytest.mark.parametrize("order", ["post", "pre"])
def test_resnet164_bottleneck_parameters_as_published(order):
    # He et al. 2016 project wherever the shape changes (option B): 1.7M.
    model = build_model(
        spec(block="bottleneck", depth=164, shortcut="projection", order=order), 3, 10
    )
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 1.7e6) / 1.7e6 < 0.02, params
    # Option A is parameter-free at the three changes of shape (16->64, 64->128, 128->256).
    option_a_net = build_model(spec(block="bottleneck", depth=164, order=order), 3, 10)
    proj = (16 * 64 + 128 * 64 + 256 * 128) + (2 * (64 + 128 + 256) if order == "post" else 0)
    assert params - sum(p.numel() for p in option_a_net.parameters()) == proj


@pytest.mark.parametrize(("depth", "paper"), [(20, 40.6e6), (56, 125.5e6)])
def test_macs_as_published(depth, paper):
    info = describe(build_model(spec(depth=depth), 3, 10), (3, 32, 32))
    assert abs(info.macs - paper) / paper < 0.01, info.macs


def _table_rows() -> list[tuple[str, ...]]:
    row = re.compile(
        r"^\s+(cifar|tutorial)\s+(basic|bottleneck)\s+(\w+)\s+(\w+)\s+(\d+)\s+([\d,]+)\s+([\d,]+)"
        r"\s+(\d+)x\d+\s+(\S+)$"
    )
    rows = [m.groups() for line in models.__doc__.splitlines() if (m := row.match(line))]
    assert len(rows) >= 8, "the module docstring lost its table"
    return rows


@pytest.mark.parametrize("row", _table_rows(), ids=lambda r: "-".join(r[:5]))
def test_docstring_table_is_true(row):
    arch, block, shortcut, order, depth, params, macs, size, paper = row
    model = build_model(
        spec(arch=arch, block=block, shortcut=shortcut, order=order, depth=int(depth)), 3, 10
    )
    info = describe(model, (3, int(size), int(size)))
    assert (info.params, info.macs) == (int(params.replace(",", "")), int(macs.replace(",", "")))
    if paper.endswith("M"):
        published = float(paper[:-1]) * 1e6
        assert abs(info.params - published) / published < 0.02


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("block", BLOCKS)
def test_plain_net_has_the_parameters_of_its_option_a_twin(block, order):
    plain, res = (small(block, s, order, width=16) for s in ("none", "identity"))
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in res.parameters())


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("block", BLOCKS)
def test_projection_adds_parameters_only_where_the_shape_changes(block, order):
    res, proj = (small(block, s, order, width=16) for s in ("identity", "projection"))
    changes = [(16, 32), (32, 64)] if block == "basic" else [(16, 64), (64, 128), (128, 256)]
    with_bn = order in ("post", "relu_before_add", "relu_only_pre", "tutorial")
    expected = sum(i * o + (2 * o if with_bn else 0) for i, o in changes)
    extra = sum(p.numel() for p in proj.parameters()) - sum(p.numel() for p in res.parameters())
    assert extra == expected
    # ...and only in the units whose shape changes.
    x = torch.randn(2, 3, 32, 32)
    _, io = record(proj, units(proj), x)
    for unit, (inp, out) in zip(units(proj), io, strict=True):
        owned = sum(p.numel() for p in unit.shortcut.parameters())
        assert (owned > 0) == (inp.shape != out.shape)


def test_describe_leaves_the_model_as_it_was():
    model = small()
    model.stages[0].eval()  # a mixed state must be restored as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = describe(model, (3, 32, 32))
    assert info.params == sum(p.numel() for p in model.parameters())
    assert model.training and not model.stages[0].training and model.stages[1].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert describe(model, (3, 28, 28)).macs < info.macs  # counts what the input needs


# --------------------------------------------------------------------------------------------
# Behaviour: what is added, where BN and ReLU sit.


@pytest.mark.parametrize("block", BLOCKS)
def test_post_units_with_zero_last_bn_scale_are_identity_maps_and_plain_units_are_not(block):
    x = torch.randn(4, 3, 32, 32)
    for shortcut in ("identity", "none"):
        model = small(block, shortcut, "post")
        with torch.no_grad():
            for unit in units(model):
                bns = [m for m in unit.branch.modules() if isinstance(m, nn.BatchNorm2d)]
                bns[-1].weight.zero_()  # the branch's last BN: its output is now zero
        _, io = record(model, units(model), x)
        for inp, out in io:
            if shortcut == "none":  # nothing added: relu(BN with zero scale) is zero
                assert torch.equal(out, torch.zeros_like(out))
            else:  # relu(0 + shortcut(x)) == x: x is itself the output of a ReLU
                assert (inp >= 0).all()
                assert torch.allclose(out, option_a(inp, out))
                assert out.abs().sum() > 0


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shortcut", SHORTCUTS)
@pytest.mark.parametrize("block", BLOCKS)
def test_zero_branches_leave_exactly_the_shortcut(block, shortcut, order):
    model = small(block, shortcut, order)
    zero_last_convs(model)
    _, io = record(model, units(model), torch.randn(4, 3, 32, 32))
    for inp, out in io:
        if shortcut == "none":  # plain: no addition, so a zero branch is a zero unit
            assert torch.allclose(out, torch.zeros_like(out), atol=1e-6)
        elif order == "bn_after_add":  # (b): the sum is normalised and rectified
            if inp.shape == out.shape:
                assert torch.allclose(out, F.relu(normalize(inp)), atol=1e-4)
        elif shortcut == "identity" or inp.shape == out.shape:
            assert torch.allclose(out, option_a(inp, out), atol=1e-6)


@pytest.mark.parametrize("order", PRE_ACTIVATION)
def test_pre_activation_net_with_zero_branches_is_stem_final_activation_pool_fc(order):
    model = small("basic", "identity", order)
    zero_last_convs(model)
    x = torch.randn(4, 3, 32, 32)
    h = model.stem(x)
    for _ in range(2):  # the two changes of shape, by hand
        h = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 0, h.shape[1]))
    h = F.relu(normalize(h) if order == "pre" else h)  # the final activation
    expected = model.fc(h.mean((2, 3)))
    assert torch.allclose(model(x), expected, atol=1e-5)


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(generator=g)
                m.running_mean.normal_(generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)


# He et al. 2016 Fig. 4 for a basic unit whose shape is kept; convs c1, c2 and BNs b1, b2 in the
# order the data meets them.
PAPER_UNITS = {
    "post": lambda x, c1, c2, b1, b2: F.relu(b2(c2(F.relu(b1(c1(x))))) + x),
    "bn_after_add": lambda x, c1, c2, b1, b2: F.relu(b2(c2(F.relu(b1(c1(x)))) + x)),
    "relu_before_add": lambda x, c1, c2, b1, b2: F.relu(b2(c2(F.relu(b1(c1(x)))))) + x,
    "relu_only_pre": lambda x, c1, c2, b1, b2: b2(c2(F.relu(b1(c1(F.relu(x)))))) + x,
    "pre": lambda x, c1, c2, b1, b2: c2(F.relu(b2(c1(F.relu(b1(x)))))) + x,
    "tutorial": lambda x, c1, c2, b1, b2: F.relu(F.relu(b2(c2(F.relu(b1(c1(x)))))) + x),
}


@pytest.mark.parametrize("order", ORDERS)
def test_unit_computes_the_papers_order(order):
    model = small("basic", "identity", order)
    _randomize_bn(model)
    model.eval()
    unit = model.stages[1][1]  # a unit that keeps its shape
    convs = [m for m in unit.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in unit.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        assert torch.allclose(unit(x), PAPER_UNITS[order](x, *convs, *bns), atol=1e-5)
        # The same unit without its addition is not the paper's unit: the test can tell.
        assert not torch.allclose(unit.after_add(unit.branch(unit.preact(x))), unit(x))


@pytest.mark.parametrize("order", ORDERS)
def test_stem_activation_and_final_activation(order):
    """Pre-activation: no activation after the stem, one before pooling. Others: the reverse."""
    model = small("basic", "projection", order)
    stem_conv = main_path_convs(model)[0][1]
    first, last = units(model)[0], units(model)[-1]
    _, [(_, conv_out), (unit_in, _), (_, unit_out), (pool_in, _)] = record(
        model, [stem_conv, first, last, model.pool], torch.randn(4, 3, 32, 32)
    )
    if order == "pre":
        assert torch.equal(unit_in, conv_out)  # the raw stem conv output
    if order == "relu_only_pre":
        assert torch.allclose(unit_in, normalize(conv_out), atol=1e-4)  # conv-BN, no ReLU
    if order in PRE_ACTIVATION:
        assert (unit_in < 0).any()
        final = normalize(unit_out) if order == "pre" else unit_out
        assert torch.allclose(pool_in, F.relu(final), atol=1e-4)
    else:
        assert torch.allclose(unit_in, F.relu(normalize(conv_out)), atol=1e-4)  # conv-BN-ReLU
        assert torch.equal(pool_in, unit_out)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shortcut", ["identity", "projection"])
@pytest.mark.parametrize("block", BLOCKS)
def test_what_the_shortcut_reads_follows_the_order(block, shortcut, order):
    """A projection in a pre-activation order reads the pre-activated input; all else the raw.

    He et al. 2016 (their code) and timm's resnetv2: the projection sees what the branch's first
    convolution sees; an identity or option-A shortcut keeps the signal path clean.
    """
    model = small(block, shortcut, order)
    pre_activates = order in PRE_ACTIVATION
    assert models.RECIPES[order].projection_reads_preact == pre_activates
    seen: dict[nn.Module, torch.Tensor] = {}
    watched = [m for u in units(model) for m in (u, u.shortcut)]
    hooks = [
        m.register_forward_pre_hook(lambda m, args: seen.update({m: args[0]})) for m in watched
    ]
    try:
        model(torch.randn(4, 3, 32, 32))
    finally:
        for h in hooks:
            h.remove()
    projected = 0
    for unit in units(model):
        x = seen[unit]
        preactivated = unit.preact(x)
        projects = any(isinstance(m, nn.Conv2d) for m in unit.shortcut.modules())
        projected += projects
        assert unit.shortcut_reads_preact == (projects and pre_activates)
        if projects and pre_activates:
            assert (x < 0).any() and not torch.equal(preactivated, x)  # so reading x would fail
            assert torch.equal(seen[unit.shortcut], preactivated)
        else:
            assert torch.equal(seen[unit.shortcut], x)
    assert projected == (0 if shortcut == "identity" else 2 if block == "basic" else 3)


# --------------------------------------------------------------------------------------------
# The tutorial's network, transcribed from its code (a `resnet` of `residual_block`s, PyTorch of
# 2017 without `Variable`). Its published printout for one (3, 96, 96) input:
#   block 1 output: (64, 45, 45)     the 7x7 stride-2 conv, no padding: 96 -> 45
#   block 2 output: (64, 22, 22)     3x3 stride-2 max-pool, no padding: 45 -> 22; two units
#   block 3 output: (128, 11, 11)    stride-2 units with 3x3 convs, padding 1: 22 -> 11
#   block 4 output: (256, 6, 6)      11 -> 6
#   block 5 output: (512, 1, 1)      6 -> 3, then AvgPool2d(3): 3 -> 1
# and 11,180,682 parameters for 10 classes.

TUTORIAL_PRINTOUT = [(64, 45, 45), (64, 22, 22), (128, 11, 11), (256, 6, 6), (512, 1, 1)]
TUTORIAL_PARAMS = 11_180_682


class TutorialResidualBlock(nn.Module):
    """The tutorial's unit: relu(x' + relu(bn2(conv2(relu(bn1(conv1(x))))))).

    x' is x where the shape is kept, else conv3(x): a 1x1 stride-2 conv with bias, no BN.
    """

    def __init__(self, in_channel: int, out_channel: int, same_shape: bool = True) -> None:
        super().__init__()
        self.same_shape = same_shape
        stride = 1 if same_shape else 2
        self.conv1 = nn.Conv2d(in_channel, out_channel, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channel)
        self.conv2 = nn.Conv2d(out_channel, out_channel, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channel)
        if not same_shape:
            self.conv3 = nn.Conv2d(in_channel, out_channel, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = F.relu(self.bn1(out), True)
        out = self.conv2(out)
        out = F.relu(self.bn2(out), True)
        if not self.same_shape:
            x = self.conv3(x)
        return F.relu(x + out, True)


class TutorialResNet(nn.Module):
    """The tutorial's `resnet`: no initialisation of its own, so PyTorch's defaults."""

    def __init__(self, in_channel: int, num_classes: int) -> None:
        super().__init__()
        self.block1 = nn.Conv2d(in_channel, 64, 7, 2)
        self.block2 = nn.Sequential(
            nn.MaxPool2d(3, 2), TutorialResidualBlock(64, 64), TutorialResidualBlock(64, 64)
        )
        self.block3 = nn.Sequential(
            TutorialResidualBlock(64, 128, False), TutorialResidualBlock(128, 128)
        )
        self.block4 = nn.Sequential(
            TutorialResidualBlock(128, 256, False), TutorialResidualBlock(256, 256)
        )
        self.block5 = nn.Sequential(
            TutorialResidualBlock(256, 512, False),
            TutorialResidualBlock(512, 512),
            nn.AvgPool2d(3),
        )
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        x = self.block4(x)
        x = self.block5(x)
        x = x.view(x.shape[0], -1)
        return self.classifier(x)


def tutorial_as_written() -> nn.Module:
    """Our build of the tutorial's network: the spec `experiments/tutorial.yaml` starts with."""
    return build_model(
        spec(arch="tutorial", order="tutorial", block="basic", shortcut="projection", depth=18),
        3,
        10,
    )


def layer_list(model: nn.Module, x: torch.Tensor) -> list[tuple]:
    """Each layer that runs, in the order it runs, as (kind, configuration).

    ReLU is left out: the tutorial calls it as a function, so it is no module there; the
    forward-pass test checks where it acts. Pooling is described by its output shape, since
    AvgPool2d(3) and global average pooling are the same on a 3x3 map.
    """
    ran: list[tuple] = []

    def describe_layer(m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        if isinstance(m, nn.Conv2d):
            has_bias = m.bias is not None
            ran.append(
                (
                    "conv",
                    m.in_channels,
                    m.out_channels,
                    m.kernel_size,
                    m.stride,
                    m.padding,
                    has_bias,
                )
            )
        elif isinstance(m, nn.BatchNorm2d):
            ran.append(("bn", m.num_features, m.eps, m.momentum, m.affine))
        elif isinstance(m, nn.MaxPool2d):
            ran.append(("maxpool", m.kernel_size, m.stride, m.padding, m.ceil_mode))
        elif isinstance(m, nn.AvgPool2d | nn.AdaptiveAvgPool2d):
            ran.append(("avgpool", tuple(out.shape[1:])))
        elif isinstance(m, nn.Linear):
            ran.append(("linear", m.in_features, m.out_features, m.bias is not None))

    hooks = [m.register_forward_hook(describe_layer) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return ran


def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Load `source`'s state into `target`, entry by entry in order; shapes must agree."""
    src, dst = source.state_dict(), target.state_dict()
    assert len(src) == len(dst)
    for (a, va), (b, vb) in zip(src.items(), dst.items(), strict=True):
        assert va.shape == vb.shape and a.split(".")[-1] == b.split(".")[-1], (a, b)
    target.load_state_dict(dict(zip(dst, src.values(), strict=True)))


def test_tutorial_transcription_matches_its_published_printout():
    reference = TutorialResNet(3, 10)
    watched = [reference.block1, reference.block2, reference.block3, reference.block4]
    out, io = record(reference, [*watched, reference.block5], torch.zeros(1, 3, 96, 96))
    assert [tuple(o.shape[1:]) for _, o in io] == TUTORIAL_PRINTOUT
    assert out.shape == (1, 10)
    assert sum(p.numel() for p in reference.parameters()) == TUTORIAL_PARAMS


def test_tutorial_network_as_written_has_its_shapes_and_parameters():
    model = tutorial_as_written()
    assert sum(p.numel() for p in model.parameters()) == TUTORIAL_PARAMS
    watched = [model.stem, *model.stages, model.pool]
    out, io = record(model, watched, torch.zeros(1, 3, 96, 96))
    shapes = [tuple(o.shape[1:]) for _, o in io]
    # The printout's block 2 is the max-pool and the first stage; block 5 ends with the pooling.
    assert [shapes[0], *shapes[1:4], shapes[5]] == TUTORIAL_PRINTOUT
    assert shapes[4] == (512, 3, 3)
    assert out.shape == (1, 10)
    # A bare stem: the convolution alone, straight into the max-pool.
    assert [type(m) for m in model.stem] == [nn.Conv2d]


def test_tutorial_network_as_written_is_the_tutorials_layer_for_layer():
    reference, model = TutorialResNet(3, 10), tutorial_as_written()
    x = torch.randn(1, 3, 96, 96)
    assert layer_list(model, x) == layer_list(reference, x)
    # Three ReLUs a unit (after each BN, after the addition) and none anywhere else.
    relus = [name for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 3 * 8 and all(name.startswith("stages.") for name in relus)


def test_tutorial_network_as_written_computes_what_the_tutorial_computes():
    """Bit for bit up to the pooling; AvgPool2d(3) and a global mean round differently.

    The pooled values differ in the last bit of float32 (sum / 9 against a mean), so the
    logits and the gradients are compared at float32 precision.
    """
    torch.manual_seed(0)
    reference, model = TutorialResNet(3, 10), tutorial_as_written()
    _randomize_bn(reference)
    copy_weights(reference, model)
    x = torch.randn(4, 3, 96, 96)
    for mode in ("train", "eval"):  # batch statistics, then running statistics
        reference.train(mode == "train")
        model.train(mode == "train")
        expected, [(ref_features, _)] = record(reference, [reference.block5[2]], x)
        out, [(features, _)] = record(model, [model.pool], x)
        assert torch.equal(features, ref_features), mode  # (4, 512, 3, 3)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # Training moved the BN running statistics identically.
    states = zip(reference.state_dict().values(), model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in states)
    for net in (reference, model):
        net.train()
        net(x).logsumexp(1).sum().backward()
    grads = zip(reference.parameters(), model.parameters(), strict=True)
    for a, b in grads:
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)
    # A stem with a ReLU (as this module once built it) fails the same comparison.
    model.stem.append(nn.ReLU())
    expected, out = reference.eval()(x), model.eval()(x)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_tutorial_network_as_written_keeps_pytorchs_default_initialisation():
    """The tutorial initialises nothing: the same seed gives the very same weights."""
    torch.manual_seed(7)
    reference = TutorialResNet(3, 10)
    torch.manual_seed(7)
    model = tutorial_as_written()
    pairs = zip(reference.state_dict().values(), model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    conv_biases = [
        m.bias for m in model.modules() if isinstance(m, nn.Conv2d) and m.bias is not None
    ]
    assert len(conv_biases) == 4 and all(b.abs().sum() > 0 for b in conv_biases)


@pytest.mark.parametrize("order", [o for o in ORDERS if o != "tutorial"])
def test_other_orders_on_the_tutorial_arch_keep_their_stem_and_he_init(order):
    model = build_model(spec(arch="tutorial", order=order, shortcut="projection", width=8), 3, 10)
    stem = {"br": [nn.BatchNorm2d, nn.ReLU], "b": [nn.BatchNorm2d], "": []}
    assert [type(m) for m in model.stem] == [nn.Conv2d, *stem[models.RECIPES[order].stem]]
    conv = model.stem[0]
    assert conv.bias is None
    fan_out = conv.out_channels * 7 * 7
    assert abs(conv.weight.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.1


def test_tutorial_order_on_cifar_keeps_conv_bn_relu_stem():
    model = small("basic", "projection", "tutorial")
    assert [type(m) for m in model.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("block", BLOCKS)
def test_tutorial_arch_takes_every_order_and_block(block, order):
    torch.manual_seed(0)
    model = build_model(
        spec(arch="tutorial", block=block, order=order, shortcut="projection", width=4), 3, 10
    )
    expansion = 1 if block == "basic" else 4
    out, io = record(model, [model.stem, *model.stages], torch.randn(2, 3, 96, 96))
    assert [tuple(o.shape[1:]) for _, o in io] == [
        (4, 45, 45),
        (4 * expansion, 22, 22),
        (8 * expansion, 11, 11),
        (16 * expansion, 6, 6),
        (32 * expansion, 3, 3),
    ]
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    if order != "tutorial":  # the usual conventions: no biases before a BN
        assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_tutorial_plain_twin_has_its_parameters():
    twins = [
        build_model(spec(arch="tutorial", order="tutorial", shortcut=s), 3, 10)
        for s in ("none", "identity")
    ]
    assert len({sum(p.numel() for p in m.parameters()) for m in twins}) == 1


# --------------------------------------------------------------------------------------------
# Persistence: pickling, copying, saving.


def test_option_a_is_a_named_module_and_the_model_pickles():
    model = small("basic", "identity", "post")
    option_a_modules = [u.shortcut for u in units(model) if not isinstance(u.shortcut, nn.Identity)]
    assert len(option_a_modules) == 2  # the two changes of shape
    for m in option_a_modules:
        assert list(m.parameters()) == []
        assert getattr(models, type(m).__name__) is type(m)  # importable by name: picklable
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(clone(x), model(x))


@pytest.mark.parametrize("shortcut", SHORTCUTS)
def test_deepcopy_is_independent(shortcut):
    model = small("bottleneck", shortcut, "pre").eval()
    clone = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(clone(x), model(x))
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    assert not torch.equal(clone(x), model(x))


@pytest.mark.parametrize("shortcut", SHORTCUTS)
def test_state_dict_round_trip(tmp_path, shortcut):
    model = small("basic", shortcut, "pre")
    model(torch.randn(8, 3, 32, 32))  # move the BN running statistics off their start
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(123)
    fresh = build_model(spec(shortcut=shortcut, order="pre", width=4), 3, 10)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(fresh.eval()(x), model.eval()(x))
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert torch.equal(fresh(x), model(x))


# --------------------------------------------------------------------------------------------
# Impossible specs, the convolutions the trainer watches, initialisation.


@pytest.mark.parametrize(
    ("arch", "block", "depth", "possible"),
    [
        ("cifar", "basic", 21, "6n+2 (8, 14, 20"),
        ("cifar", "bottleneck", 56 + 1, "9n+2 (11, 20, 29"),
        ("tutorial", "basic", 20, "8n+2 (10, 18, 26"),
    ],
)
def test_impossible_depth_names_the_possible_ones(arch, block, depth, possible):
    with pytest.raises(ValueError, match=re.escape(possible)):
        ModelSpec(arch=arch, block=block, depth=depth)
    unchecked = ModelSpec.model_construct(arch=arch, block=block, depth=depth, width=4)
    with pytest.raises(ValueError, match=re.escape(possible)):
        build_model(unchecked, 3, 10)


@pytest.mark.parametrize(
    ("block", "shortcut", "order", "depth"),
    [
        ("basic", "projection", "post", 20),
        ("basic", "none", "pre", 32),
        ("bottleneck", "projection", "pre", 29),
        ("bottleneck", "identity", "relu_only_pre", 20),
    ],
)
def test_main_path_convs_in_depth_order_without_shortcuts(block, shortcut, order, depth):
    model = build_model(
        spec(block=block, shortcut=shortcut, order=order, depth=depth, width=4), 3, 10
    )
    listed = main_path_convs(model)
    assert len(listed) == depth - 1  # every weighted layer but the classifier
    ran: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: ran.append(m))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    model(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    main = [conv for _, conv in listed]
    assert [m for m in ran if any(m is c for c in main)] == main  # depth order
    projections = [m for m in ran if not any(m is c for c in main)]
    assert len(projections) == (0 if shortcut != "projection" else 2 if block == "basic" else 3)
    assert all(m.kernel_size == (1, 1) for m in projections)
    assert dict(model.named_modules())[listed[0][0]] is listed[0][1]


@pytest.mark.parametrize("block", BLOCKS)
def test_initialisation(block):
    model = build_model(spec(block=block, shortcut="projection", width=32), 3, 10)
    checked = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() >= 4096:
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            std = m.weight.std().item()
            assert abs(std / (2 / fan_out) ** 0.5 - 1) < 0.06, (m, std)
            checked += 1
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    # Convs whose fan-in differs from their fan-out were among those checked.
    assert checked > 10


# --------------------------------------------------------------------------------------------
# The fast training path.


@pytest.mark.parametrize(
    ("shortcut", "order"), [("identity", "pre"), ("projection", "post"), ("none", "bn_after_add")]
)
def test_bf16_autocast_channels_last(shortcut, order):
    model = small("basic", shortcut, order).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("shortcut", "order"), [("identity", "pre"), ("projection", "post"), ("none", "tutorial")]
)
def test_traces_as_one_graph(shortcut, order):
    # fullgraph=True fails on a graph break: host syncs, data-dependent control flow.
    model = small("basic", shortcut, order).eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(compiled(x), model(x), atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shortcut", SHORTCUTS)
def test_cuda_graph_capture_of_a_training_step(shortcut):
    model = small("basic", shortcut, "pre", width=16).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(loss).item()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("order", ["post", "pre"])
def test_inductor_compiles_bf16_channels_last_on_cuda(order):
    model = small("bottleneck", "identity", order, width=16).cuda()
    model = model.to(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(x)
        expected = model(x)
    out.float().sum().backward()
    assert torch.allclose(out.float(), expected.float(), atol=0.1, rtol=0.05)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

"""The grid file: expansion into cells, keys, labels, overrides, and every user mistake."""

from __future__ import annotations

import csv

import pytest

from resnet_ablate.config import (
    KEY_OMITTED_AT_DEFAULT,
    SECTIONS,
    Cell,
    CellConfig,
    CellName,
    DataSpec,
    GridError,
    ModelSpec,
    TrainSpec,
    field_names,
    load_grid,
    units_per_stage,
)
from resnet_ablate.plan import PlanRow
from resnet_ablate.rounds import grid_rounds

from .conftest import EXPERIMENTS, ROOT

RESULTS = ROOT / "results"

GRID = """
name: degradation-fmnist
description: Plain vs residual at increasing depth
base:
  data:  {name: fashion-mnist, augment: true}
  model: {block: basic, shortcut: identity, order: post, width: 16}
  train: {epochs: 12, batch_size: 128, lr: 0.1, momentum: 0.9, weight_decay: 1e-4,
          schedule: step, milestones: [0.5, 0.75], gamma: 0.1, warmup_lr: 0.01, warmup_iters: 400}
grid:
  model.shortcut: [none, identity]
  model.depth: [20, 56, 110]
seeds: [0, 1, 2]
exclude:
  - {model.shortcut: none, model.depth: 110}
"""


def test_expansion_is_the_product_minus_exclusions(write_grid):
    grid = load_grid(write_grid(GRID))
    assert len(grid.cells) == (2 * 3 - 1) * 3
    combos = {(c.config.model.shortcut, c.config.model.depth, c.config.seed) for c in grid.cells}
    assert ("none", 110, 0) not in combos and ("identity", 110, 2) in combos
    assert grid.axes == ["model.shortcut", "model.depth", "seed"]


def test_yaml11_scientific_numbers_are_numbers(write_grid):
    cell = load_grid(write_grid(GRID)).cells[0]
    assert cell.config.train.weight_decay == pytest.approx(1e-4)
    assert isinstance(cell.config.train.weight_decay, float)


def test_labels_read_like_the_paper(write_grid):
    labels = [c.label for c in load_grid(write_grid(GRID)).cells]
    assert "plain-56 basic post s0" in labels
    assert "res-110 basic post s2" in labels
    assert len(set(labels)) == len(labels)


def test_other_varying_fields_appear_in_labels(write_grid):
    text = GRID.replace("model.depth: [20, 56, 110]", "train.lr: [0.1, 0.05]")
    path = write_grid(text.split("exclude:")[0])
    labels = {c.label for c in load_grid(path).cells}
    assert "plain-20 basic post lr=0.05 s1" in labels


NAMES = [  # name, label, configuration, context, net, extras
    (
        CellName("plain", 56, "basic", "post", seed=0),
        "plain-56 basic post s0",
        "plain-56 basic post",
        "basic post",
        "plain-56",
        "",
    ),
    (
        CellName("res-proj", 110, "bottleneck", "pre", extras=(("train.lr", "0.05"),), seed=2),
        "res-proj-110 bottleneck pre lr=0.05 s2",
        "res-proj-110 bottleneck pre lr=0.05",
        "bottleneck pre lr=0.05",
        "res-proj-110",
        "lr=0.05",
    ),
    (
        CellName("res", 18, "basic", "tutorial", arch="tutorial", seed=1, tuned=True),
        "tutorial res-18 basic tutorial settings=tuned s1",
        "tutorial res-18 basic tutorial settings=tuned",
        "tutorial basic tutorial settings=tuned",
        "res-18",
        "settings=tuned",
    ),
]


@pytest.mark.parametrize(("name", "label", "config", "context", "net", "extras"), NAMES)
def test_a_name_is_fields_and_its_strings_are_made_from_them(
    name, label, config, context, net, extras
):
    assert (name.label, name.config, name.context) == (label, config, context)
    assert (name.net, name.extras_text) == (net, extras)
    assert name.untuned().label == label.replace(" settings=tuned", "")


def test_a_cell_s_name_reads_its_configuration_and_grid_values(write_grid):
    text = GRID.replace("model.depth: [20, 56, 110]", "train.lr: [0.1, 0.05]")
    text = text.replace("block: basic", "block: bottleneck, depth: 20")
    grid = load_grid(write_grid(text.split("exclude:")[0]))
    cell = next(c for c in grid.cells if c.label.startswith("plain") and c.config.seed == 1)
    assert cell.name == CellName(
        family="plain",
        depth=20,
        block="bottleneck",
        order="post",
        extras=(("train.lr", "0.1"),),
        seed=1,
    )
    assert cell.label == cell.name.label == "plain-20 bottleneck post lr=0.1 s1"
    tuned = Cell(cell.config, cell.varying, tuned=True)
    assert tuned.label == "plain-20 bottleneck post lr=0.1 settings=tuned s1"
    assert tuned.key == cell.key  # the marker names the run; the configuration is the same


def test_keys_are_stable_and_ignore_where_data_lives(write_grid):
    first = load_grid(write_grid(GRID)).cells
    again = load_grid(write_grid(GRID)).cells
    assert [c.key for c in first] == [c.key for c in again]
    assert len({c.key for c in first}) == len(first)
    moved = load_grid(write_grid(GRID), ["data.root=/elsewhere", "data.download=true"]).cells
    assert [c.key for c in moved] == [c.key for c in first]
    changed = load_grid(write_grid(GRID), ["train.epochs=3"]).cells
    assert not {c.key for c in changed} & {c.key for c in first}


def test_log_points_is_recorded_but_not_keyed(write_grid):
    """How often a run is recorded changes no result: the cell is the same, its params say it."""
    with open(RESULTS / "quick" / "summary.csv", newline="") as f:
        committed = {row["key"] for row in csv.DictReader(f)}
    for points in ("0", "5", "200"):
        cells = load_grid(EXPERIMENTS / "quick.yaml", [f"train.log_points={points}"]).cells
        assert {c.key for c in cells} == committed
        assert {c.params["train.log_points"] for c in cells} == {int(points)}
    assert TrainSpec().log_points == 20
    with pytest.raises(GridError, match=r"train\.log_points"):
        load_grid(write_grid(GRID), ["train.log_points=-1"])


def test_key_matches_a_hand_built_cell(write_grid):
    cell = load_grid(write_grid(GRID)).cells[0]
    twin = Cell(config=CellConfig.model_validate(cell.config.model_dump()))
    assert twin.key == cell.key


def test_set_overrides_base_and_replaces_axes(write_grid):
    grid = load_grid(write_grid(GRID), ["train.epochs=2", "model.depth=20", "seeds=[5]"])
    assert {c.config.train.epochs for c in grid.cells} == {2}
    assert {c.config.model.depth for c in grid.cells} == {20}
    assert {c.config.seed for c in grid.cells} == {5}
    assert len(grid.cells) == 2


def test_defaults_resolve_per_architecture():
    assert ModelSpec().depth == 20 and ModelSpec().width == 16
    tutorial = ModelSpec(arch="tutorial")
    assert (tutorial.depth, tutorial.width) == (18, 64)
    assert ModelSpec(block="bottleneck").depth == 20  # 9n+2 with n=2


@pytest.mark.parametrize(
    ("arch", "block", "depth", "units"),
    [
        ("cifar", "basic", 20, 3),
        ("cifar", "basic", 110, 18),
        ("cifar", "bottleneck", 164, 18),
        ("tutorial", "basic", 18, 2),
        ("tutorial", "bottleneck", 26, 2),
    ],
)
def test_units_per_stage(arch, block, depth, units):
    assert units_per_stage(arch, block, depth) == units


def test_every_field_name_is_addressable():
    names = field_names()
    assert "model.depth" in names and "train.lr" in names and "data.train_subset" in names
    assert len(names) == len(set(names))


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_file_validates(path):
    grid = load_grid(path)
    assert grid.cells
    assert grid.name == path.stem


@pytest.mark.parametrize(
    "summary", sorted(RESULTS.glob("*/summary.csv")), ids=lambda p: p.parent.name
)
def test_committed_results_match_their_grid_file(summary):
    """A committed summary covers exactly the cells its grid file defines now, all finished; for
    seeds until decided, exactly the cells its rounds planned, replayed from the summary."""
    grid = load_grid(EXPERIMENTS / f"{summary.parent.name}.yaml")
    with open(summary, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {row["status"] for row in rows} == {"finished"}
    keys = sorted(row["key"] for row in rows)
    rounds = grid_rounds(grid, _plan_rows(grid, rows))
    if rounds is None:
        assert keys == sorted(cell.key for cell in grid.cells)
    else:
        assert rounds.settled
        assert keys == sorted(rounds.planned)
        assert len(rounds.rounds) > 1  # the committed sequential grid did add seeds


def _plan_rows(grid, rows: list[dict[str, str]]) -> list[PlanRow]:
    """The grid's cells with their state as a committed summary records it (`new` when absent)."""
    by_key = {row["key"]: row for row in rows}
    out = []
    for cell in grid.cells:
        row = by_key.get(cell.key)
        if row is None:
            out.append(PlanRow(cell, "new", None))
            continue
        metrics = {k: float(row[k]) for k in ("final_train_err", "final_test_err")}
        out.append(PlanRow(cell, row["status"], row["run_id"], metrics))
    return out


# --- normalisation, and keys that outlive new fields ---------------------------------------

TUTORIAL_CELL = {
    "data": {"name": "cifar10", "resize": 96},
    "model": {"arch": "tutorial", "order": "tutorial", "shortcut": "projection"},
}


@pytest.mark.parametrize(
    ("config", "key_before_normalize_existed"),
    [({}, "0674090503c5"), (TUTORIAL_CELL, "93372cde5b22")],
    ids=["defaults", "tutorial"],
)
def test_a_field_at_its_original_value_leaves_the_key_as_it_was(
    config, key_before_normalize_existed
):
    cell = Cell(CellConfig.model_validate(config))
    assert cell.config.data.normalize == "mean_std"
    assert cell.key == key_before_normalize_existed
    config = {**config, "data": {**config.get("data", {}), "normalize": "half"}}
    half = Cell(CellConfig.model_validate(config))
    assert half.key != cell.key
    # MLflow params hold the field whatever its value.
    assert cell.params["data.normalize"] == "mean_std" and half.params["data.normalize"] == "half"


def test_keys_omitted_at_default_name_fields_at_their_default():
    for name, value in KEY_OMITTED_AT_DEFAULT.items():
        section, _, fname = name.partition(".")
        assert SECTIONS[section].model_fields[fname].default == value, name


def test_normalize_rejects_other_values(write_grid):
    path = write_grid(GRID.replace("augment: true}", "augment: true, normalize: minmax}"))
    with pytest.raises(GridError, match=r"base\.data\.normalize: 'minmax' is not allowed"):
        load_grid(path)
    assert DataSpec(normalize="half").normalize == "half"


def test_normalize_half_gives_the_committed_quick_cells_new_keys():
    """The committed keys hold (test_committed_results_match_their_grid_file); `half` is new."""
    with open(RESULTS / "quick" / "summary.csv", newline="") as f:
        committed = {row["key"] for row in csv.DictReader(f)}
    halved = load_grid(EXPERIMENTS / "quick.yaml", ["data.normalize=half"]).cells
    assert len(halved) == len(committed) and not {c.key for c in halved} & committed


def test_tutorial_grid_starts_with_the_tutorial_as_written():
    grid = load_grid(EXPERIMENTS / "tutorial.yaml")
    first = grid.cells[0].config
    assert first.data == DataSpec(
        name="cifar10", download=True, augment=False, resize=96, normalize="half"
    )
    assert first.model == ModelSpec(
        arch="tutorial", block="basic", shortcut="projection", order="tutorial", depth=18, width=64
    )
    assert first.train == TrainSpec(
        epochs=20,
        batch_size=64,
        lr=0.01,
        momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
        schedule="constant",
        warmup_lr=None,
        warmup_iters=0,
    )
    # The paper's unit orders follow, on the same network and setup.
    orders = [c.config.model.order for c in grid.cells]
    assert orders[0] == "tutorial"
    assert {"post", "bn_after_add", "relu_before_add", "relu_only_pre", "pre"} <= set(orders)
    for cell in grid.cells:
        assert cell.config.data == first.data and cell.config.train == first.train
        assert cell.config.model == first.model.model_copy(
            update={"order": cell.config.model.order}
        )


# --- mistakes -----------------------------------------------------------------------------

BAD = {
    "unknown top-level key": (GRID + "sedes: [1]\n", ["sedes", "unknown key"]),
    "unknown base section": (GRID.replace("base:", "base:\n  optim: {lr: 1}"), ["base.optim"]),
    "unknown model key": (GRID.replace("width: 16", "widht: 16"), ["base.model.widht", "width"]),
    "unknown train key": (GRID.replace("gamma: 0.1", "gama: 0.1"), ["base.train.gama", "gamma"]),
    "wrong type": (GRID.replace("epochs: 12", "epochs: twelve"), ["base.train.epochs", "integer"]),
    "bool is not an int": (GRID.replace("epochs: 12", "epochs: yes"), ["base.train.epochs"]),
    "unknown choice": (
        GRID.replace("block: basic", "block: bottlenek"),
        ["base.model.block", "bottlenek", "bottleneck"],
    ),
    "basic depth 21": (GRID.replace("[20, 56, 110]", "[20, 21]"), ["model.depth", "6n+2", "21"]),
    "bottleneck depth 32": (
        GRID.replace("block: basic", "block: bottleneck").replace("[20, 56, 110]", "[32]"),
        ["depth 32", "9n+2"],
    ),
    "axis names no field": (
        GRID.replace("model.depth:", "model.deep:"),
        ["grid", "model.deep", "not a field"],
    ),
    "axis without section": (GRID.replace("model.depth:", "depth:"), ["'depth'", "model.depth"]),
    "empty axis": (GRID.replace("[20, 56, 110]", "[]"), ["grid.model.depth", "empty"]),
    "empty grid": (GRID.split("grid:")[0] + "grid: {}\nseeds: [0]\n", ["grid", "empty"]),
    "missing grid": (GRID.split("grid:")[0] + "seeds: [0]\n", ["grid", "empty"]),
    "no seeds": (GRID.replace("seeds: [0, 1, 2]", "seeds: []"), ["seeds"]),
    "repeated seed": (GRID.replace("seeds: [0, 1, 2]", "seeds: [1, 1]"), ["seeds", "repeat"]),
    "exclude names no field": (
        GRID.replace("{model.shortcut: none,", "{model.shortcat: none,"),
        ["exclude[0]", "model.shortcat"],
    ),
    "exclude everything": (
        GRID.replace("{model.shortcut: none, model.depth: 110}", "{data.name: fashion-mnist}"),
        ["exclude", "every cell"],
    ),
    "bad name": (GRID.replace("degradation-fmnist", "Degradation FMNIST"), ["name", "a-z0-9"]),
    "milestone beyond the run": (GRID.replace("[0.5, 0.75]", "[0.5, 1.5]"), ["milestones"]),
    "negative lr": (GRID.replace("lr: 0.1,", "lr: -0.1,"), ["base.train.lr"]),
    "val split out of range": (
        GRID.replace("augment: true", "augment: true, val_split: 1.5"),
        ["val_split"],
    ),
    "grid is a list": (
        GRID.replace("grid:\n", "grid:\n  - x\n").split("  model.shortcut")[0] + "seeds: [0]\n",
        ["grid"],
    ),
    "not a mapping": ("- just\n- a list\n", ["mapping"]),
    "exclude matches nothing": (
        GRID.replace("model.depth: 110}", "model.depth: 100}"),
        ["exclude[0]", "matches no cell"],
    ),
    "duplicate axis value": (GRID.replace("[20, 56, 110]", "[20, 20]"), ["listed twice"]),
}


@pytest.mark.parametrize("case", sorted(BAD), ids=str)
def test_mistakes_get_one_clear_message(write_grid, case):
    text, needles = BAD[case]
    path = write_grid(text)
    with pytest.raises(GridError) as err:
        load_grid(path)
    message = str(err.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message
    assert "\n" not in message.strip()
    assert "Traceback" not in message and "pydantic" not in message


TUNE = (
    GRID.replace("augment: true}", "augment: true, val_split: 0.1}")
    + """
tune:
  params:
    train.lr: {low: 0.01, high: 0.5, log: true}
    train.schedule: {choices: [step, cosine]}
  trials: 4
  epochs: 2
"""
)


def test_a_tune_section_validates(write_grid):
    spec = load_grid(write_grid(TUNE)).spec.tune
    assert spec.trials == 4 and spec.sampler == "tpe" and spec.pruner == "median"
    assert spec.params["train.lr"].log


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        (("train.lr:", "train.lrr:"), ["tune.params", "train.lrr", "not a field"]),
        (("low: 0.01, high: 0.5", "low: 0.5, high: 0.01"), ["train.lr", "above high"]),
        (("low: 0.01", "low: 0.0"), ["train.lr", "above zero"]),
        (("train.lr:", "model.width:"), ["model.width", "only train"]),
        (("[step, cosine]", "[step, cosin]"), ["train.schedule", "cosin"]),
        (("low: 0.01", "low: -1.0, log: false, x: 1"), ["x", "unknown key"]),
        (("val_split: 0.1", "augment: true"), ["val_split", "test set"]),
        (("trials: 4", "trials: 0"), ["tune.trials"]),
    ],
)
def test_tune_mistakes(write_grid, change, needles):
    text = TUNE.replace(*change)
    if "augment: true, augment" in text:
        text = text.replace("augment: true, augment: true", "augment: true")
    with pytest.raises(GridError) as err:
        load_grid(write_grid(text))
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_tuning_a_grid_axis_is_an_error(write_grid):
    text = TUNE.replace("model.depth: [20, 56, 110]", "train.lr: [0.1, 0.05]")
    text = text.replace("  - {model.shortcut: none, model.depth: 110}\n", "").replace(
        "exclude:\n", ""
    )
    with pytest.raises(GridError, match="also a grid axis"):
        load_grid(write_grid(text))


def test_yaml_syntax_error_names_the_line(write_grid):
    path = write_grid("name: x\nbase: {model: {depth: 20}\ngrid:\n  model.depth: [20]\n")
    with pytest.raises(GridError, match=r"grid\.yaml:\d+:\d+: YAML syntax error"):
        load_grid(path)


def test_missing_file(tmp_path):
    with pytest.raises(GridError, match="no such grid file"):
        load_grid(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.epochs", "key=value"),
        ("=3", "key=value"),
        ("train.epoch=3", "train.epoch"),
        ("train.epochs=0", "base.train.epochs"),
        ("model.block=bottlenek", "bottlenek"),
        ("model.depth=21", "6n+2"),
        ("epochs=3", "did you mean train.epochs"),
    ],
)
def test_bad_overrides(write_grid, override, needle):
    with pytest.raises(GridError) as err:
        load_grid(write_grid(GRID), [override])
    assert needle in str(err.value)

"""The grid file: its schema, its expansion into cells, and the errors a user can make in it.

A grid file (YAML) names a base configuration and a set of axes; the cartesian product of the
axes, times the seeds, minus the excluded combinations, is the list of :class:`Cell` s to train.
Everything here is plain data (pydantic models) and imports neither torch nor mlflow, so the CLI
can validate a grid in milliseconds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import GridError
from .seeds import SeedRange, check_seeds
from .yamlfile import read_yaml

Arch = Literal["cifar", "tutorial"]
Block = Literal["basic", "bottleneck"]
Shortcut = Literal["none", "identity", "projection"]
Order = Literal["post", "pre", "bn_after_add", "relu_before_add", "relu_only_pre", "tutorial"]
DatasetName = Literal["cifar10", "cifar100", "fashion-mnist", "synthetic"]
Schedule = Literal["step", "cosine", "constant"]
#: `mean_std`: per-channel mean/std of the training images; `half`: `(x - 0.5) / 0.5`, pixels to
#: [-1, 1], as the PyTorch tutorial normalises.
Normalize = Literal["mean_std", "half"]
#: Integers are strict: YAML 1.1 reads `yes`/`on` as true, which must not become 1 epoch.
Int = Annotated[int, Strict()]

# Convolutions per unit, and stages per network: depth = stages * units * convs + 2
# (the stem convolution and the classifier).
CONVS_PER_UNIT = {"basic": 2, "bottleneck": 3}
STAGES = {"cifar": 3, "tutorial": 4}
DEFAULT_WIDTH = {"cifar": 16, "tutorial": 64}
DEFAULT_DEPTH = {"cifar": 20, "tutorial": 18}


def depth_step(arch: str, block: str) -> int:
    """Layers added by one more unit in every stage (6 for CIFAR basic, 9 for bottleneck)."""
    return STAGES[arch] * CONVS_PER_UNIT[block]


def units_per_stage(arch: str, block: str, depth: int) -> int:
    """Units in each stage for a depth, or ValueError naming the depths that are possible."""
    step = depth_step(arch, block)
    n, rest = divmod(depth - 2, step)
    if rest or n < 1:
        examples = ", ".join(str(step * k + 2) for k in (1, 2, 3, 4, 5, 6, 9, 18))
        raise ValueError(
            f"depth {depth} is impossible for {arch} {block} blocks: depth must be "
            f"{step}n+2 ({examples}, ...)"
        )
    return n


class Spec(BaseModel):
    """Base of every section: unknown keys are errors, never ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(Spec):
    name: DatasetName = "cifar10"
    root: str | None = None
    download: bool = False
    augment: bool = True
    train_subset: Int | None = Field(default=None, ge=10)
    test_subset: Int | None = Field(default=None, ge=10)
    val_split: float | None = Field(default=None, gt=0.0, lt=1.0)
    resize: Int | None = Field(default=None, ge=8, le=512)
    normalize: Normalize = "mean_std"


class ModelSpec(Spec):
    arch: Arch = "cifar"
    block: Block = "basic"
    shortcut: Shortcut = "identity"
    order: Order = "post"
    # Depth and width default per architecture; the resolved value is what is hashed and logged.
    depth: Int | None = Field(default=None, ge=2, le=10_000, validate_default=True)
    width: Int | None = Field(default=None, ge=1, le=1024, validate_default=True)

    @field_validator("depth")
    @classmethod
    def _depth(cls, value: int | None, info: ValidationInfo) -> int | None:
        arch, block = info.data.get("arch"), info.data.get("block")
        if arch is None or block is None:
            return value  # arch or block is itself invalid; that error is reported instead
        if value is None:
            value = DEFAULT_DEPTH[arch] if block == "basic" else depth_step(arch, block) * 2 + 2
        units_per_stage(arch, block, value)
        return value

    @field_validator("width")
    @classmethod
    def _width(cls, value: int | None, info: ValidationInfo) -> int | None:
        return DEFAULT_WIDTH.get(info.data.get("arch", "cifar"), 16) if value is None else value

    @property
    def family(self) -> str:
        """`plain`, `res` (option A) or `res-proj` (option B), as used in labels."""
        return {"none": "plain", "identity": "res", "projection": "res-proj"}[self.shortcut]


class TrainSpec(Spec):
    epochs: Int = Field(default=12, ge=1, le=10_000)
    batch_size: Int = Field(default=128, ge=1, le=65_536)
    lr: float = Field(default=0.1, gt=0.0, le=100.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(default=1.0e-4, ge=0.0, lt=1.0)
    schedule: Schedule = "step"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)
    warmup_lr: float | None = Field(default=None, gt=0.0)
    warmup_iters: Int = Field(default=0, ge=0)
    #: Points per epoch of the running training error and loss (step = iteration), as the
    #: paper's Fig. 6 draws them; 0 logs per epoch only. Recording only: not in the cell key.
    log_points: Int = Field(default=20, ge=0, le=10_000)

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 < m < 1.0 for m in value):
            raise ValueError("milestones are fractions of the run, each strictly between 0 and 1")
        if list(value) != sorted(set(value)):
            raise ValueError("milestones must be strictly increasing")
        return value

    @model_validator(mode="after")
    def _warmup(self) -> TrainSpec:
        if self.warmup_iters and self.warmup_lr is None:
            raise ValueError("warmup_iters needs warmup_lr (the learning rate during warm-up)")
        return self


class CellConfig(Spec):
    """One fully resolved training configuration: what a cell trains."""

    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    seed: Int = Field(default=0, ge=0)


class BaseSection(Spec):
    data: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)


class FloatRange(Spec):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range must stay above zero (low is {self.low})")
        return self


class Choices(Spec):
    choices: list[Any] = Field(min_length=1)


class TuneSpec(Spec):
    """Per-cell hyper-parameter search: the same budget for every variant."""

    params: dict[str, FloatRange | Choices] = Field(min_length=1)
    trials: Int = Field(default=8, ge=1, le=10_000)
    epochs: Int | None = Field(default=None, ge=1)
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "none"] = "median"


class VerdictSpec(Spec):
    """How the report decides: the significance level, and the margin of a 'not worse' claim
    in error points (a difference of mean error below it counts as not worse)."""

    margin: float = Field(default=1.0, gt=0.0, le=100.0)
    alpha: float = Field(default=0.05, gt=0.0, lt=0.5)


class GridFile(Spec):
    name: str = Field(pattern=r"^[a-z0-9-]+$", max_length=100)
    description: str = ""
    tags: dict[str, str] = Field(default_factory=dict)
    base: BaseSection = BaseSection()
    grid: dict[str, list[Any]]
    seeds: list[Int] | SeedRange = Field(default_factory=lambda: [0])
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    tune: TuneSpec | None = None
    verdicts: VerdictSpec = VerdictSpec()

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value: Any) -> list[int] | SeedRange:
        return check_seeds(value)

    @property
    def seed_list(self) -> list[int]:
        """Every seed a cell may run with: the list, or 0 .. max − 1 of a range."""
        return self.seeds.seeds if isinstance(self.seeds, SeedRange) else list(self.seeds)

    @property
    def seeds_text(self) -> str:
        """`0,1,2` for a list, `3:10` for a range (as `--seeds` takes them)."""
        r = self.seed_range
        return f"{r.min}:{r.max}" if r is not None else ",".join(map(str, self.seed_list))

    @property
    def seed_range(self) -> SeedRange | None:
        """The range of seeds until decided, or None for a fixed list."""
        return self.seeds if isinstance(self.seeds, SeedRange) else None


# --------------------------------------------------------------------------------------------
# Fields: the dotted names a grid axis, an exclude entry or --set may use.

SECTIONS: dict[str, type[Spec]] = {"data": DataSpec, "model": ModelSpec, "train": TrainSpec}
#: Fields that say where or how a cell runs or is recorded, not what it computes: left out of
#: the cell key.
EXECUTION_FIELDS = frozenset({"data.root", "data.download", "train.log_points"})
#: Fields added after cells were first keyed, with the value every earlier cell had. At that
#: value a field is left out of the key, so a cell hashes as it did before the field existed and
#: existing stores and committed results keep their keys (a rerun skips what is done); any other
#: value is part of the key like every field. MLflow params hold every field regardless.
KEY_OMITTED_AT_DEFAULT: dict[str, Any] = {"data.normalize": "mean_std"}


def field_names() -> list[str]:
    """Every dotted field a grid may vary, in schema order (data.name ... train.log_points)."""
    return [f"{s}.{f}" for s, spec in SECTIONS.items() for f in spec.model_fields]


def _check_field(name: str, where: str) -> tuple[str, str]:
    section, _, fname = name.partition(".")
    if section not in SECTIONS or fname not in SECTIONS[section].model_fields:
        near = [f for f in field_names() if f.endswith("." + name.split(".")[-1])]
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise GridError(
            f"{where}: '{name}' is not a field{hint}; fields are section.name with sections "
            f"data, model, train, e.g. model.depth, train.lr"
        )
    return section, fname


# --------------------------------------------------------------------------------------------
# Cells.


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _canonical(value: Any) -> Any:
    """Numbers that YAML 1.1 leaves as strings ('1e-4') become floats; everything else as is."""
    if isinstance(value, str):
        return float(value) if _YAML11_FLOAT.fullmatch(value.strip()) else value
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return value


#: The model fields a name shows in its own words (`plain-56 basic post`), not as `field=value`.
_NAMED_FIELDS = frozenset(
    {"model.shortcut", "model.depth", "model.block", "model.order", "model.arch", "seed"}
)


@dataclass(frozen=True)
class CellName:
    """A cell's identity as people read it, kept as fields: code reads these, never the label.

    The label is ``[arch] net block order [extras] [settings=tuned] s<seed>``, e.g.
    ``plain-56 basic post s0`` or ``tutorial res-18 basic pre lr=0.05 settings=tuned s2``; the
    architecture shows only when it is not ``cifar``, ``extras`` are the other fields the grid
    varies (``lr=0.05``) and ``settings=tuned`` marks a cell run with tuned values.
    """

    family: str  # plain, res (option A) or res-proj (option B)
    depth: int
    block: str
    order: str
    arch: str = "cifar"
    extras: tuple[tuple[str, str], ...] = ()  # (dotted field, value as shown), in grid order
    seed: int = 0
    tuned: bool = False

    @property
    def net(self) -> str:
        """`plain-56`, `res-110`, `res-proj-56`: the shortcut kind and the depth."""
        return f"{self.family}-{self.depth}"

    @property
    def extras_text(self) -> str:
        """The extra varying tokens, `lr=0.05 settings=tuned`; empty when there are none."""
        tokens = [f"{name.split('.')[-1]}={text}" for name, text in self.extras]
        return " ".join(tokens + (["settings=tuned"] if self.tuned else []))

    @property
    def context(self) -> str:
        """What is neither the shortcut kind, the depth nor the seed: `basic post lr=0.05`.
        Cells of one context differ only in those three."""
        return self._join(net=False)

    @property
    def config(self) -> str:
        """The configuration without its seed: `plain-56 basic post lr=0.05`."""
        return self._join(net=True)

    @property
    def label(self) -> str:
        """`plain-56 basic post s0`: the configuration and the seed."""
        return f"{self.config} s{self.seed}"

    def untuned(self) -> CellName:
        """The same name without the tuned marker (default and tuned runs of a cell match)."""
        return replace(self, tuned=False)

    def _join(self, *, net: bool) -> str:
        parts = [self.arch] if self.arch != "cifar" else []
        parts += [self.net] if net else []
        parts += [self.block, self.order]
        return " ".join(parts + ([self.extras_text] if self.extras_text else []))


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a resolved configuration, its stable key and its name.

    `varying` holds the grid's values for this cell (axes, then the seed); `tuned` marks a
    cell whose train fields were replaced by its study's best values (`ablate run --tuned`).
    """

    config: CellConfig
    varying: tuple[tuple[str, Any], ...] = field(default=())
    tuned: bool = False

    @property
    def key(self) -> str:
        """Short stable hash of what the cell computes (execution-only fields excluded)."""
        flat = key_fields(self.config)
        blob = json.dumps(flat, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def name(self) -> CellName:
        """The structured name: family, depth, block, order, arch, extras, seed, tuned."""
        m = self.config.model
        return CellName(
            family=m.family,
            depth=m.depth or 0,  # always resolved by the schema
            block=m.block,
            order=m.order,
            arch=m.arch,
            extras=tuple((k, _short(v)) for k, v in self.varying if k not in _NAMED_FIELDS),
            seed=self.config.seed,
            tuned=self.tuned,
        )

    @property
    def label(self) -> str:
        """`plain-56 basic post s0`; other varying fields appear as `lr=0.05`."""
        return self.name.label

    @property
    def params(self) -> dict[str, Any]:
        """Every config field as a flat `section.field` mapping (MLflow params)."""
        return flatten(self.config)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(_short(v) for v in value)
    return str(value)


def key_fields(config: CellConfig) -> dict[str, Any]:
    """The flat fields a cell's key hashes: what it computes, as cells were first keyed.

    Execution-only fields are left out, and so is a field of :data:`KEY_OMITTED_AT_DEFAULT` at
    the value it had before it existed.
    """
    return {
        k: v
        for k, v in flatten(config).items()
        if k not in EXECUTION_FIELDS
        and not (k in KEY_OMITTED_AT_DEFAULT and KEY_OMITTED_AT_DEFAULT[k] == v)
    }


def flatten(config: CellConfig) -> dict[str, Any]:
    """`{"data.name": "cifar10", ..., "seed": 0}`; tuples become lists."""
    dumped = config.model_dump(mode="json")
    flat: dict[str, Any] = {}
    for section in SECTIONS:
        for key, value in dumped[section].items():
            flat[f"{section}.{key}"] = value
    flat["seed"] = dumped["seed"]
    return flat


@dataclass(frozen=True)
class Grid:
    """A validated grid file and its cells."""

    spec: GridFile
    cells: tuple[Cell, ...]
    path: Path
    #: The `--set` overrides that made this grid from its file, canonical: `key=value`, one per
    #: key (the last given wins), sorted by key. Empty for the file as written.
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def overrides_text(self) -> str:
        """The overrides as a user types them again: `--set train.epochs=8 --set seeds=[0]`."""
        return " ".join(f"--set {shlex.quote(o)}" for o in self.overrides)

    @property
    def folder(self) -> str:
        """The grid's folder under results/: its name, plus its overrides when it has some
        (`quick+train.epochs=8`), so runs with other settings never overwrite its report."""
        return "+".join([self.name, *(_folder_safe(o) for o in self.overrides)])

    @property
    def axes(self) -> list[str]:
        """The dotted fields that vary between cells (grid axes, then `seed` if several)."""
        axes = list(self.spec.grid)
        return axes + (["seed"] if len(self.spec.seed_list) > 1 else [])


# --------------------------------------------------------------------------------------------
# Loading.


def load_grid(path: str | Path, overrides: Sequence[str] = ()) -> Grid:
    """Read, validate and expand a grid file; raise :class:`GridError` with one clear message."""
    path = Path(path)
    raw = read_yaml(path)
    for text in overrides:
        _apply_override(raw, text, path)
    grid = expand(raw, path, sliced=bool(overrides))
    return replace(grid, overrides=canonical_overrides(overrides))


def canonical_overrides(overrides: Sequence[str]) -> tuple[str, ...]:
    """`--set` texts as `key=value` with spaces trimmed, the last per key, sorted by key."""
    latest: dict[str, str] = {}
    for text in overrides:
        key, _, value = text.partition("=")
        latest[key.strip()] = value.strip()
    return tuple(f"{key}={latest[key]}" for key in sorted(latest))


def _folder_safe(text: str) -> str:
    """An override as part of a folder name: letters, digits and `._,=-` only."""
    return re.sub(r"[^A-Za-z0-9._,=-]", "", text)


def _apply_override(raw: dict[str, Any], text: str, path: Path) -> None:
    """`--set train.epochs=2`: sets a base field (replacing the axis if it is one) or `seeds`."""
    key, eq, value_text = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise GridError(f"--set {text!r}: expected key=value, e.g. --set train.epochs=2")
    try:
        value = _canonical(yaml.safe_load(value_text)) if value_text.strip() else ""
    except yaml.YAMLError:
        raise GridError(f"--set {text!r}: the value is not valid YAML") from None
    if key in ("seeds", "name", "description"):
        raw[key] = value
        return
    section, fname = _check_field(key, f"--set {text!r}")
    grid = raw.get("grid")
    if isinstance(grid, dict) and key in grid:
        grid[key] = [value]
        return
    base = raw.setdefault("base", {})
    if not isinstance(base, dict):
        raise GridError(f"{path}: base: must be a mapping of data, model, train")
    target = base.setdefault(section, {})
    if not isinstance(target, dict):
        raise GridError(f"{path}: base.{section}: must be a mapping of field: value")
    target[fname] = value


def expand(raw: Mapping[str, Any], path: Path, sliced: bool = False) -> Grid:
    """Validate the file's shape, then every cell of the product; the first error is raised.

    An exclude rule that matches no cell is an error (a mistyped value would otherwise go
    unnoticed), unless `--set` overrides have narrowed the grid (`sliced`).
    """
    raw = dict(raw)
    if not raw.get("grid"):
        raise GridError(
            f"{path}: grid: is empty; give at least one axis, e.g. model.depth: [20, 56]"
        )
    for section in ("base", "grid", "exclude", "tune"):
        if section in raw:
            raw[section] = _canonical(raw[section])
    spec = _validate(GridFile, raw, f"{path}")
    base_config = {s: dict(getattr(spec.base, s)) for s in SECTIONS}
    _validate(CellConfig, base_config, f"{path}: base", loc_prefix="base")

    axes = list(spec.grid.items())
    for name, values in axes:
        _check_field(name, f"{path}: grid")
        if not values:
            raise GridError(f"{path}: grid.{name}: the axis is empty; list at least one value")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise GridError(f"{path}: grid.{name}: a value is listed twice")
    for i, rule in enumerate(spec.exclude):
        if not rule:
            raise GridError(f"{path}: exclude[{i}]: is empty; it would exclude every cell")
        for name in rule:
            if name != "seed":
                _check_field(name, f"{path}: exclude[{i}]")

    cells = []
    matched = [False] * len(spec.exclude)
    for combo in itertools.product(*(values for _, values in axes)):
        assignment = dict(zip((name for name, _ in axes), combo, strict=True))
        for seed in spec.seed_list:
            hit = _excluded(spec.exclude, base_config, {**assignment, "seed": seed})
            if hit is not None:
                matched[hit] = True
                continue
            cells.append(_cell(base_config, assignment, seed, path))
    for i, hit in enumerate(matched):
        if not hit and not sliced:
            raise GridError(f"{path}: exclude[{i}]: matches no cell; check its values")
    if not cells:
        raise GridError(f"{path}: exclude removes every cell; nothing is left to train")
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise GridError(f"{path}: two cells resolve to the same configuration; remove the repeat")
    if spec.tune is not None:
        _check_tune(spec, cells, path)
    return Grid(spec=spec, cells=tuple(cells), path=path)


def _check_tune(spec: GridFile, cells: list[Cell], path: Path) -> None:
    """A search space names train fields that no axis varies, with values a cell accepts."""
    assert spec.tune is not None
    for name, space in spec.tune.params.items():
        where = f"{path}: tune.params.{name}"
        section, fname = _check_field(name, f"{path}: tune.params")
        if section != "train":
            raise GridError(
                f"{where}: only train.* fields are tuned (the architecture is what is compared)"
            )
        if name in spec.grid:
            raise GridError(f"{where}: is also a grid axis; tune it or vary it, not both")
        values = space.choices if isinstance(space, Choices) else [space.low, space.high]
        for value in values:
            trial = {
                **cells[0].config.model_dump(),
                "train": {**cells[0].config.train.model_dump(), fname: value},
            }
            _validate(CellConfig, trial, f"{where}: value {_short(value)}")
    if any(cell.config.data.val_split is None for cell in cells):
        raise GridError(
            f"{path}: tune: needs data.val_split (e.g. 0.1): trials are scored on held-out "
            f"training images, never on the test set"
        )


def _excluded(
    rules: Iterable[Mapping[str, Any]],
    base: Mapping[str, Mapping[str, Any]],
    assignment: Mapping[str, Any],
) -> int | None:
    """Index of the first rule whose every field equals the cell's (axis, else base) value."""

    def value(name: str) -> Any:
        if name in assignment:
            return assignment[name]
        section, _, fname = name.partition(".")
        return base.get(section, {}).get(fname, _UNSET)

    for i, rule in enumerate(rules):
        if all(_same(value(k), v) for k, v in rule.items()):
            return i
    return None


_UNSET = object()


def _same(a: Any, b: Any) -> bool:
    return a == b or str(a) == str(b)


def _cell(
    base: dict[str, dict[str, Any]], assignment: dict[str, Any], seed: int, path: Path
) -> Cell:
    config = {s: dict(v) for s, v in base.items()}
    for name, value in assignment.items():
        section, fname = name.split(".", 1)
        config[section][fname] = value
    config["seed"] = seed
    where = ", ".join(f"{k}={_short(v)}" for k, v in assignment.items())
    resolved = _validate(CellConfig, config, f"{path}: cell {{{where}}}")
    return Cell(config=resolved, varying=tuple(assignment.items()) + (("seed", seed),))


def _validate(model: type[BaseModel], data: Any, where: str, loc_prefix: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise GridError(f"{where}: {_describe(model, err.errors()[0], loc_prefix)}") from None


def _describe(model: type[BaseModel], error: Mapping[str, Any], prefix: str) -> str:
    """One pydantic error as `key.path: what is wrong (allowed: ...)`."""
    loc = [str(p) for p in error["loc"] if not str(p).startswith("function-after")]
    loc = [p for p in loc if p not in ("FloatRange", "Choices")]
    path = ".".join(([prefix] if prefix else []) + loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = loc[:-1]
        allowed = _allowed_keys(model, parent)
        return f"{path}: unknown key{'; allowed keys are ' + allowed if allowed else ''}"
    if kind == "missing":
        return f"{path}: is required"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{path}: {error['input']!r} is not allowed; choose one of {expected}"
    message = error["msg"]
    message = re.sub(r"^(Value error|Assertion failed), ", "", message)
    given = error.get("input")
    shown = "" if isinstance(given, dict | list) or given is None else f" (got {given!r})"
    return f"{path}: {message}{shown}"


def _allowed_keys(model: type[BaseModel], parent: list[str]) -> str:
    """The keys allowed at a location of the grid file, for 'unknown key' messages."""
    node: Any = model
    for part in parent:
        if node is GridFile:
            node = {"base": BaseSection, "tune": TuneSpec}.get(part)
        elif node in (BaseSection, CellConfig):
            node = SECTIONS.get(part)
        else:
            node = None
        if node is None:
            return ""
    return ", ".join(node.model_fields)

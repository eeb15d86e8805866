"""A grid's `seeds:`: a fixed list (`[0, 1, 2]`), or a range to add seeds until the verdicts are
decided (`{min: 3, max: 10}`: seeds 0, 1, ... up to max − 1, round by round; see ``rounds.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The most seeds `seeds: {min, max}` may ask for per configuration.
MAX_SEEDS = 1000
_EXAMPLE = "e.g. {min: 3, max: 10}"


@dataclass(frozen=True)
class SeedRange:
    """`seeds: {min: 3, max: 10}`: every configuration starts with `min` seeds; one more is added
    round by round while a verdict that involves it is still open, up to `max`."""

    min: int
    max: int

    @property
    def seeds(self) -> list[int]:
        """Every seed a configuration may get, in the order they are added: 0 .. max − 1."""
        return list(range(self.max))


def check_seeds(value: Any) -> list[int] | SeedRange:
    """The grid's `seeds:` checked: a list of distinct non-negative whole numbers, or a range
    with 2 <= min <= max <= MAX_SEEDS. ValueError with one clear sentence otherwise."""
    if isinstance(value, SeedRange):
        return value
    if isinstance(value, Mapping):
        return _seed_range(value)
    if not isinstance(value, list) or not value:
        raise ValueError(
            "give a list of seeds, e.g. [0, 1, 2], or a range to add seeds until the verdicts "
            f"are decided, {_EXAMPLE}"
        )
    if any(not _whole(s) for s in value):
        raise ValueError("seeds are whole numbers, e.g. [0, 1, 2]")
    if len(set(value)) != len(value):
        raise ValueError("seeds must not repeat")
    if any(s < 0 for s in value):
        raise ValueError("seeds must be non-negative")
    return value


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _seed_range(value: Mapping[Any, Any]) -> SeedRange:
    unknown = sorted(str(k) for k in value if k not in ("min", "max"))
    if unknown:
        raise ValueError(
            f"unknown key {unknown[0]!r} in a seed range; give min and max, {_EXAMPLE}"
        )
    for key in ("min", "max"):
        if not _whole(value.get(key)):
            raise ValueError(f"a seed range needs {key} as a whole number, {_EXAMPLE}")
    low, high = value["min"], value["max"]
    if low < 2:
        raise ValueError(
            f"min is {low}; a seed range starts at 2 seeds or more (the first test needs a "
            f"seed-to-seed spread), {_EXAMPLE}"
        )
    if high < low:
        raise ValueError(f"max ({high}) is below min ({low}); give max >= min, {_EXAMPLE}")
    if high > MAX_SEEDS:
        raise ValueError(f"max ({high}) is above {MAX_SEEDS} seeds per configuration")
    return SeedRange(min=low, max=high)

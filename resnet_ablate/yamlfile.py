"""Reading a grid file's YAML: plain data only, every failure one clear message.

PyYAML's safe loader builds no Python objects, but it still follows aliases, which can make a
small file refer to itself or expand beyond any grid's size; both are refused here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import GridError


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise GridError(f"{path}: no such grid file; give the path to a .yaml grid file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise GridError(f"{where}: YAML syntax error: {problem}; fix the file") from None
    except UnicodeDecodeError:
        raise GridError(f"{path}: not a text file; a grid file is UTF-8 YAML") from None
    except (ValueError, TypeError, AttributeError, RecursionError) as err:
        # PyYAML's constructors fail this way on values their tag cannot hold
        # (`!!timestamp tomorrow`), and on keys that cannot be keys (`? [a]: 1`).
        raise GridError(
            f"{path}: a YAML value cannot be read ({type(err).__name__}); fix the file"
        ) from None
    if not isinstance(raw, dict):
        raise GridError(f"{path}: a grid file is a mapping with keys name, base, grid, seeds")
    check_plain(raw, path)
    return raw


#: More nodes than any grid needs: YAML aliases can make a small file expand beyond this.
MAX_NODES = 100_000


def check_plain(raw: Any, path: Path) -> None:
    """A grid file is a tree of plain data: no alias that refers to a node containing it, and
    no expansion of aliases into more than `MAX_NODES` nodes."""
    seen = 0
    stack: list[tuple[Any, frozenset[int]]] = [(raw, frozenset())]
    while stack:
        node, above = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise GridError(
                f"{path}: expands to more than {MAX_NODES} values (YAML aliases?); "
                "write the grid out plainly"
            )
        if isinstance(node, dict | list):
            if id(node) in above:
                raise GridError(
                    f"{path}: a YAML alias refers to a node that contains it; "
                    "a grid file is plain data without cycles"
                )
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, above | {id(node)}) for child in children)

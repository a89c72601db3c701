"""Grids of ``transmix-experiment``: a grid YAML read into its cells, checked, errors naming the grid.

A grid is a built-in name (``table1``, ``table2``, ``table3``, ``distill``, the YAML files in
``transmix_train/configs/grids``) or a YAML file of the form the package docstring shows.
Relative config paths resolve against the grid's folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

__all__ = ["BUILTIN_GRIDS", "PLACEHOLDER", "Cell", "Grid", "grid_dir", "load_grid", "needed_prerequisites"]

BUILTIN_GRIDS = ("table1", "table2", "table3", "distill", "trained_digits", "family")
# "{extractor}" in a flag: the prerequisite run of that name (its id when hashed, its last.pth when run).
PLACEHOLDER = re.compile(r"\{(\w+)\}")


def grid_dir() -> Path:
    """``transmix_train/configs/grids``, the built-in grids (package data in any install)."""
    from importlib import resources

    return Path(str(resources.files("transmix_train.configs").joinpath("grids")))


@dataclass
class Cell:
    """One row of a table: a name, the trainer flags that make it, the paper's number if any."""

    name: str
    args: list[str]
    config: Optional[str] = None
    paper: Optional[float] = None
    extra_params: Optional[str] = None  # a prerequisite whose parameters the method adds


@dataclass
class Grid:
    """A named set of cells with shared flags (see the package docstring for the YAML form)."""

    name: str
    title: str
    config: str
    args: list[str]
    cells: list[Cell]
    reference: Optional[str] = None
    prerequisites: dict[str, Cell] = field(default_factory=dict)
    notes: str = ""


def needed_prerequisites(cell: Cell, grid_args: Sequence[str]) -> set[str]:
    """The prerequisites a cell's runs need (placeholders in its flags, the grid's, its extra_params)."""
    names = {m for a in [*grid_args, *cell.args] for m in PLACEHOLDER.findall(a)}
    return names | ({cell.extra_params} if cell.extra_params else set())


def _resolve_config(name: Optional[str], base: Path) -> Optional[str]:
    if name is None:
        return None
    path = Path(name)
    return str(path if path.is_absolute() or path.exists() else base / path)


def _cell(entry: Any, where: str, base: Path, default_config: Optional[str]) -> Cell:
    if not isinstance(entry, dict) or "name" not in entry:
        raise ValueError(f"{where}: expected a mapping with 'name' and 'args', got {entry!r}")
    unknown = set(entry) - {"name", "args", "config", "paper", "extra_params"}
    if unknown:
        raise ValueError(f"{where} {entry['name']!r}: unknown keys {sorted(unknown)}")
    args = [str(a) for a in entry.get("args") or []]
    return Cell(str(entry["name"]), args, _resolve_config(entry.get("config"), base) or default_config,
                entry.get("paper"), entry.get("extra_params"))


def load_grid(name_or_path: str) -> Grid:
    """A built-in grid by name or a YAML grid file; a ``ValueError`` naming what is wrong."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = grid_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(f"grid {name_or_path!r}: not a file and not one of {', '.join(BUILTIN_GRIDS)}")
    if not path.is_file():
        raise ValueError(f"grid {name_or_path!r}: no such file")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not data.get("cells"):
        raise ValueError(f"grid {path}: expected a mapping with a non-empty 'cells' list")
    base = path.parent
    config = _resolve_config(data.get("config"), base)
    cells = [_cell(entry, f"grid {path}: cell", base, config) for entry in data["cells"]]
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ValueError(f"grid {path}: cell names must be unique, got {names}")
    prerequisites = {key: _cell({"name": key, **value}, f"grid {path}: prerequisite", base, config)
                     for key, value in (data.get("prerequisites") or {}).items()}
    reference = data.get("reference")
    if reference is not None and reference not in names:
        raise ValueError(f"grid {path}: reference {reference!r} is not a cell ({', '.join(names)})")
    grid_args = [str(a) for a in data.get("args") or []]
    for cell in cells:
        missing = needed_prerequisites(cell, grid_args) - set(prerequisites)
        if missing:
            raise ValueError(f"grid {path}: cell {cell.name!r} names unknown prerequisites {sorted(missing)}")
    return Grid(path.stem, str(data.get("title") or path.stem), config or "", grid_args, cells, reference,
                prerequisites, str(data.get("notes") or ""))

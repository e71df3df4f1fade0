"""The house's floors: which subpackage of dreambooth_gs may import which (each ``__init__`` says the same in words,
and docs/architecture.md draws it). Every import of every module counts, the lazy ones inside functions too, so a
new arrow that runs back up fails here instead of growing a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dreambooth_gs"
# Each room and the rooms below it that it may import (its own modules always). A room is a subpackage, or a
# top-level module; "" is the package's own __init__ (the public API), which may import anything.
MAY_IMPORT = {
    "_import_noise": set(),
    "fileio": set(),
    "resources": set(),
    "gs": set(),
    "cli": {"fileio"},
    "methods": {"gs"},
    "families": {"fileio", "resources", "gs"},
    "lipschitz": {"gs"},
    "adapters": {"fileio", "gs", "methods", "families"},
    "tiny": {"fileio", "families", "resources"},
    "train": {"fileio", "resources", "gs", "methods", "families", "adapters", "tiny"},
    "export": {"fileio", "gs", "methods", "families", "adapters"},
    "evaluate": {"fileio", "resources", "families", "adapters", "train"},
    "commands": {"fileio", "cli", "train", "evaluate", "export"},
    "demo": {"fileio", "cli", "resources", "families", "adapters", "train", "commands"},
}


def room_of(module: str) -> str:
    """``dreambooth_gs.train.loop`` -> ``train``; ``dreambooth_gs.fileio`` -> ``fileio``; the package -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    parts = ["dreambooth_gs", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, package: str) -> set[str]:
    """Every dreambooth_gs module ``source`` (a module of ``package``) imports, relative imports resolved
    (``from . import x`` counts x)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("dreambooth_gs")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("dreambooth_gs"):
                target = node.module
            else:
                continue
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names if target == "dreambooth_gs"}
    return found


def wrong_arrows(source: str, module: str, is_package: bool) -> list[str]:
    """The imports of ``source`` (the text of ``module``) that its room may not make."""
    room = room_of(module)
    if room == "":
        return []  # the public API re-exports from every room
    package = module if is_package else module.rpartition(".")[0]
    allowed = {room} | MAY_IMPORT[room]
    return sorted(t for t in imported_modules(source, package) if t != "dreambooth_gs" and room_of(t) not in allowed)


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_room_is_in_the_table():
    rooms = {room_of(module_name(path)) for path in MODULES} - {""}
    assert rooms == set(MAY_IMPORT), "a new subpackage: say in MAY_IMPORT (and its __init__) what it may import"


def test_the_table_has_no_cycle():
    order, seen = [], set()

    def visit(room, path=()):
        assert room not in path, f"cycle: {' -> '.join((*path, room))}"
        if room not in seen:
            for below in MAY_IMPORT[room]:
                visit(below, (*path, room))
            seen.add(room)
            order.append(room)

    for room in MAY_IMPORT:
        visit(room)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    module = module_name(path)
    wrong = wrong_arrows(path.read_text(), module, path.name == "__init__.py")
    assert not wrong, (
        f"{room_of(module)}/ may import {sorted(MAY_IMPORT[room_of(module)])} only; {path} imports {wrong}"
    )


def test_a_wrong_arrow_is_found():
    """The check can fail: a lazy import of the training loop inside gs/functional.py, or of the evaluator in
    train/, is caught; the same imports one floor down are not."""
    late = "def _late():\n    from ..train import loop\n"
    assert wrong_arrows(late, "dreambooth_gs.gs.functional", False) == ["dreambooth_gs.train"]
    assert wrong_arrows("from ..evaluate import plan\n", "dreambooth_gs.train.loop", False) == [
        "dreambooth_gs.evaluate"
    ]
    assert wrong_arrows("from .. import evaluate\n", "dreambooth_gs.train.loop", False) == ["dreambooth_gs.evaluate"]
    assert wrong_arrows("from ..train import data\n", "dreambooth_gs.evaluate.plan", False) == []

"""The layers only depend downwards: _core → device/disklabel/fsmap/format/crypto → repository → engine → cli."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "imgbackup"
RANK = {"errors": 0, "interrupts": 0, "units": 0, "_core": 0, "device": 1, "disklabel": 1, "fsmap": 2, "format": 1, "crypto": 2,
        "repository": 3, "engine": 4, "cli": 5}
# Same-rank packages that must still not see each other.
FORBIDDEN = {("crypto", "repository"), ("format", "repository"), ("format", "crypto"), ("disklabel", "fsmap"),
             ("device", "fsmap")}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n.split(".")[1] for n in names if n.startswith("imgbackup.") and n.count(".") >= 1}


@pytest.mark.parametrize("path", sorted(p for p in SRC.rglob("*.py") if p.parent != SRC), ids=str)
def test_imports_point_down(path: Path) -> None:
    layer = path.relative_to(SRC).parts[0]
    for target in _imports(path):
        if target == layer or target not in RANK:
            continue
        assert RANK[target] <= RANK[layer], f"{layer} imports higher layer {target}"
        assert (layer, target) not in FORBIDDEN, f"{layer} must not import {target}"


def test_core_imports_nothing_of_imgbackup() -> None:
    for path in (SRC / "_core").glob("*.p*"):
        if path.suffix in (".py", ".pyx"):
            text = path.read_text()
            assert "from imgbackup." not in text.replace("from imgbackup._core", ""), path

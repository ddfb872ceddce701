"""The layers only depend downwards: _core → device/disklabel/fsmap/format/crypto → repository → engine → cli.

Inside engine/ each command has its own package: backup and restore never import each other, verify
may use mount, and what several commands share (delete, diff, imageview, slots) imports none of them.
format/ only encodes and decodes bytes (no I/O), and device/tools.py is the one place that runs
outside programs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "imgbackup"
SOURCES = sorted(p for p in SRC.rglob("*.py") if p.parent != SRC)
RANK = {"errors": 0, "interrupts": 0, "units": 0, "audit": 0, "_core": 0, "device": 1, "disklabel": 1, "fsmap": 2,
        "format": 1, "crypto": 2,
        "repository": 3, "engine": 4, "cli": 5}
# Same-rank packages that must still not see each other.
FORBIDDEN = {("crypto", "repository"), ("format", "repository"), ("format", "crypto"), ("disklabel", "fsmap"),
             ("device", "fsmap")}
# engine/ rooms: which other command packages each may import ("" = the shared modules beside them).
ENGINE_ROOMS = {"backup": set(), "restore": set(), "mount": set(), "verify": {"mount"}, "rescue": {"restore"},
                "repair": set(), "copy": set(), "drill": {"verify", "restore", "mount"},
                "job": {"backup", "verify", "drill", "restore", "copy"}, "": set()}
# Running a program, or replacing or forking this process, outside device/tools.py.
PROCESS_CALLS = {"system", "popen", "fork", "forkpty", "execv", "execve", "execvp", "execvpe", "execl",
                 "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl",
                 "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp"}
# The exceptions, each with its reason: a fork that runs no program, only more of imgbackup.
PROCESS_EXCEPTIONS = {
    ("engine/mount/session.py", "fork"): "the FUSE server and the mount daemon are forks of imgbackup itself",
}
# What format/ may not touch: it encodes and decodes bytes handed to it.
IO_MODULES = {"subprocess", "socket", "io", "shutil", "tempfile", "pathlib", "mmap", "select"}
IO_CALLS = {"open"}
OS_IO = {"open", "read", "write", "pread", "pwrite", "readv", "writev", "preadv", "pwritev", "sendfile",
         "fsync", "fdatasync", "ftruncate", "truncate", "replace", "rename", "unlink", "remove", "mkdir",
         "makedirs", "listdir", "scandir", "stat", "lstat", "fstat", "lseek"}


def _imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _imports(path: Path) -> set[str]:
    names = _imported_modules(ast.parse(path.read_text()))
    return {n.split(".")[1] for n in names if n.startswith("imgbackup.") and n.count(".") >= 1}


def _attribute_calls(tree: ast.AST, owner: str) -> set[str]:
    """Names called as ``owner.NAME(...)`` (e.g. ``os.fork()``)."""
    return {node.func.attr for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == owner}


def _rel(path: Path) -> str:
    return str(path.relative_to(SRC))


@pytest.mark.parametrize("path", SOURCES, ids=str)
def test_imports_point_down(path: Path) -> None:
    layer = path.relative_to(SRC).parts[0]
    for target in _imports(path):
        if target == layer or target not in RANK:
            continue
        assert RANK[target] <= RANK[layer], f"{layer} imports higher layer {target}"
        assert (layer, target) not in FORBIDDEN, f"{layer} must not import {target}"


def _engine_room(path: Path) -> str:
    parts = path.relative_to(SRC / "engine").parts
    return parts[0] if len(parts) > 1 else ""


ENGINE_SOURCES = [p for p in SOURCES if p.is_relative_to(SRC / "engine")]


@pytest.mark.parametrize("path", ENGINE_SOURCES, ids=_rel)
def test_engine_rooms_keep_to_themselves(path: Path) -> None:
    """backup and restore never import each other; verify may use mount; shared modules use no room."""
    room = _engine_room(path)
    assert room in ENGINE_ROOMS, f"unknown engine package {room}: add it to ENGINE_ROOMS"
    for name in _imported_modules(ast.parse(path.read_text())):
        parts = name.split(".")
        if parts[:2] != ["imgbackup", "engine"] or len(parts) < 3 or parts[2] not in ENGINE_ROOMS:
            continue
        other = parts[2]
        assert other == room or other in ENGINE_ROOMS[room], f"engine/{room or '.'} imports engine/{other}"


def test_engine_rooms_are_known() -> None:
    rooms = {p.name for p in (SRC / "engine").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert rooms == set(ENGINE_ROOMS) - {""}


@pytest.mark.parametrize("path", sorted((SRC / "format").glob("*.py")), ids=_rel)
def test_format_does_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text())
    modules = {m.split(".")[0] for m in _imported_modules(tree)}
    assert not modules & IO_MODULES, f"format/ imports {modules & IO_MODULES}"
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert not called & IO_CALLS, f"format/ calls {called & IO_CALLS}"
    assert not _attribute_calls(tree, "os") & OS_IO, f"format/ calls os.{_attribute_calls(tree, 'os') & OS_IO}"


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_only_device_tools_runs_programs(path: Path) -> None:
    rel = _rel(path)
    if rel == "device/tools.py":
        return
    tree = ast.parse(path.read_text())
    modules = {m.split(".")[0] for m in _imported_modules(tree)}
    assert "subprocess" not in modules, f"{rel} imports subprocess: run programs through device/tools.py"
    for call in _attribute_calls(tree, "os") & PROCESS_CALLS:
        assert (rel, call) in PROCESS_EXCEPTIONS, f"{rel} calls os.{call}: run programs through device/tools.py"


def test_process_exceptions_are_still_needed() -> None:
    for rel, call in PROCESS_EXCEPTIONS:
        assert call in _attribute_calls(ast.parse((SRC / rel).read_text()), "os"), f"{rel} no longer needs os.{call}"


def test_core_imports_nothing_of_imgbackup() -> None:
    for path in (SRC / "_core").glob("*.p*"):
        if path.suffix in (".py", ".pyx"):
            text = path.read_text()
            assert "from imgbackup." not in text.replace("from imgbackup._core", ""), path

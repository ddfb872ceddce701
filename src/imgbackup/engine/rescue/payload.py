"""The Python half of the rescue root: this imgbackup (with its compiled core) and its dependencies.

The running installation is copied as it is: the rescue root's python3 is Debian's, of the same
minor version as the one running the builder (checked), so the compiled core and the binary wheels
(numpy, cryptography, zstandard) load there unchanged. Nothing is fetched from PyPI and nothing is
compiled inside the root, so the media hold exactly the imgbackup that built them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import imgbackup
from imgbackup.device import tools
from imgbackup.errors import ImgBackupError

# Source-tree leftovers that are not needed at run time (the .c files alone are ~8 MB).
_SKIP_SUFFIXES = (".c", ".pyc", ".o")
_SKIP_DIRS = ("__pycache__",)
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
EXTRAS = ("mount",)   # the FUSE mount is part of a rescue system: browse an image before restoring


@dataclass(frozen=True)
class PayloadFile:
    source: Path
    dest: str         # relative to the root's site-packages directory


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _required(dist: metadata.Distribution) -> list[str]:
    """Names ``dist`` requires, including our EXTRAS; markers other than extras are left to the
    installation: a requirement counts when its distribution is installed."""
    names = []
    for req in dist.requires or []:
        spec, _, marker = req.partition(";")
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if extra and (dist.metadata["Name"].lower() != "imgbackup" or extra.group(1) not in EXTRAS):
            continue
        m = _NAME.match(spec)
        if m:
            names.append(m.group(1))
    return names


def distributions() -> list[metadata.Distribution]:
    """imgbackup's installed dependency closure (imgbackup itself excluded), in a stable order."""
    seen: dict[str, metadata.Distribution] = {}
    todo = _required(metadata.distribution("imgbackup"))
    while todo:
        name = _canonical(todo.pop())
        if name in seen or name == "imgbackup":
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue   # a platform-specific requirement that this installation does not have
        seen[name] = dist
        todo.extend(_required(dist))
    return [seen[k] for k in sorted(seen)]


def _keep(rel: Path) -> bool:
    return not (rel.suffix in _SKIP_SUFFIXES or any(p in _SKIP_DIRS for p in rel.parts))


def payload_files() -> list[PayloadFile]:
    """Every file to copy into site-packages: the imgbackup package directory as it runs (an
    editable checkout works too) and each dependency's files as its RECORD lists them."""
    files: list[PayloadFile] = []
    pkg_dir = Path(imgbackup.__file__).resolve().parent
    for path in sorted(pkg_dir.rglob("*")):
        rel = path.relative_to(pkg_dir.parent)
        if path.is_file() and _keep(rel):
            files.append(PayloadFile(path, str(rel)))
    for dist in distributions():
        base = Path(dist.locate_file("")).resolve()
        for entry in dist.files or []:
            rel = Path(str(entry))
            if rel.parts and rel.parts[0] == "..":
                continue   # console scripts in bin/: the root gets its own launcher
            path = base / rel
            if path.is_file() and _keep(rel):
                files.append(PayloadFile(path, str(rel)))
    return files


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def fingerprint(files: list[PayloadFile]) -> str:
    """A hash of every payload file's name and content: the media cache key's Python part."""
    h = hashlib.sha256(python_version().encode())
    for f in files:
        h.update(f.dest.encode() + b"\0")
        with open(f.source, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


LAUNCHER = """#!/usr/bin/python3
# imgbackup on the rescue media (copied from the installation that built them)
import sys

from imgbackup.cli.lean import run   # the media's own commands without Typer, the rest through it

sys.exit(run())
"""


def install(files: list[PayloadFile], root: Path) -> Path:
    """Copy the payload into ``root``'s /usr/local site-packages, byte-compiled for the path it will
    have there (no .pyc is written at run time, where the root is in RAM), and add the launcher."""
    site_rel = f"usr/local/lib/python{python_version()}/dist-packages"
    site = root / site_rel
    for f in files:
        dest = site / f.dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f.source, dest)
    res = tools.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-s", str(root), "-p", "/", str(site)],
                    timeout=None)
    if res.returncode != 0:
        raise ImgBackupError(f"byte-compiling the payload failed: {tools.output_tail(res)}")
    launcher = root / "usr/local/bin/imgbackup"
    launcher.parent.mkdir(parents=True, exist_ok=True)
    launcher.write_text(LAUNCHER)
    launcher.chmod(0o755)
    return site

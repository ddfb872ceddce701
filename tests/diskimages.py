"""Builders of real disk images for tests: a GPT disk with an ext4 and a FAT32 partition.

Each partition is built as its own file (``mkfs.ext4 -d`` from a staging tree, ``mkfs.vfat`` and
mtools) and then copied into the disk at its offset, so building needs no root, no loop device and
cannot spill over into the backup GPT. The real tools judge the result, not this module.
Also: ``random_image`` (sparse random test sources) and ``cli``/``cli_json`` (the CLI as a user runs it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support import need_tool, run

MIB = 1 << 20
SECTOR = 512
# Real files with many sizes and names: a few MiB of the standard library and package docs.
PY_DIRS = ("json", "email", "http", "logging", "concurrent")
DOC_BUDGET = 1 * MIB


def _stage_files(root: Path, seed: int) -> list[str]:
    """Fill ``root`` with real files plus one random file; returns their relative paths."""
    pylib = next(Path("/usr/lib").glob("python3.*[0-9]"))
    for name in PY_DIRS:
        if (pylib / name).is_dir():
            shutil.copytree(pylib / name, root / "py" / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
    used = 0
    for doc in sorted(Path("/usr/share/doc").glob("*/copyright")):
        if used > DOC_BUDGET:
            break
        dest = root / "doc" / doc.parent.name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(doc, dest / "copyright")
        used += doc.stat().st_size
    (root / "random.bin").write_bytes(random.Random(seed).randbytes(2 * MIB + 12345))
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _build_ext4(part: Path, size: int, staging: Path) -> None:
    with open(part, "wb") as f:
        f.truncate(size)
    run("mkfs.ext4", "-q", "-F", "-L", "imgroot", "-E", "lazy_itable_init=0,lazy_journal_init=0",
        "-d", staging, part)


def _build_fat32(part: Path, size: int, seed: int) -> list[str]:
    with open(part, "wb") as f:
        f.truncate(size)
    run("mkfs.vfat", "-F", "32", "-s", "1", "-n", "IMGFAT", part)
    src = part.parent / "fatfiles"
    src.mkdir()
    names = []
    for path in sorted(Path("/usr/share/doc").glob("*/copyright"))[:20]:
        name = f"{path.parent.name[:8].upper()}.TXT"
        if name not in names:
            shutil.copyfile(path, src / name)
            names.append(name)
    (src / "RANDOM.BIN").write_bytes(random.Random(seed + 1).randbytes(MIB + 777))
    names.append("RANDOM.BIN")
    run("mmd", "-i", part, "::/DATA")
    run("mcopy", "-i", part, *[src / n for n in names], "::/DATA/")
    return [f"DATA/{n}" for n in names]


def _copy_into(disk: Path, part: Path, offset: int) -> None:
    with open(part, "rb") as src, open(disk, "r+b") as dst:
        pos = offset
        while block := src.read(4 * MIB):
            if block.count(0) != len(block):
                os.pwrite(dst.fileno(), block, pos)
            pos += len(block)


def make_gpt_disk(path: str | os.PathLike, size_mib: int = 64, seed: int = 1) -> dict:
    """Create a GPT disk image at ``path``: partition 1 ext4, partition 2 FAT32, with real files.

    Returns {"path", "size", "partitions": [{"number", "fstype", "offset", "size"}], "files":
    {"ext4": [...], "vfat": [...]}}; offsets and sizes in bytes.
    """
    need_tool("sgdisk", "mkfs.ext4", "mkfs.vfat", "mmd", "mcopy")
    fat_mib = max(34, (size_mib - 2) // 2)     # FAT32 needs >= 65525 clusters of 512 bytes
    ext_mib = size_mib - 2 - fat_mib
    if ext_mib < 8:
        raise ValueError(f"a {size_mib} MiB disk is too small for both partitions (need >= 44 MiB)")
    disk = Path(path)
    with open(disk, "wb") as f:
        f.truncate(size_mib * MIB)
    p1_start = MIB // SECTOR
    p2_start = p1_start + ext_mib * MIB // SECTOR
    p2_end = p2_start + fat_mib * MIB // SECTOR - 1
    run("sgdisk", "-n", f"1:{p1_start}:{p2_start - 1}", "-t", "1:8300", "-c", "1:root",
        "-n", f"2:{p2_start}:{p2_end}", "-t", "2:0700", "-c", "2:data", disk)
    parts = [
        {"number": 1, "fstype": "ext4", "offset": p1_start * SECTOR, "size": ext_mib * MIB},
        {"number": 2, "fstype": "vfat", "offset": p2_start * SECTOR, "size": fat_mib * MIB},
    ]
    with tempfile.TemporaryDirectory(prefix="imgb-disk-", dir=disk.parent) as tmp:
        work = Path(tmp)
        (work / "ext").mkdir()
        ext_files = _stage_files(work / "ext", seed)
        _build_ext4(work / "p1.img", parts[0]["size"], work / "ext")
        fat_files = _build_fat32(work / "p2.img", parts[1]["size"], seed)
        _copy_into(disk, work / "p1.img", parts[0]["offset"])
        _copy_into(disk, work / "p2.img", parts[1]["offset"])
    return {"path": str(disk), "size": size_mib * MIB, "partitions": parts,
            "files": {"ext4": ext_files, "vfat": fat_files}}


def random_image(path: str | os.PathLike, size: int, seed: int = 7, data_fraction: float = 1.0) -> Path:
    """A file of ``size`` bytes: random MiB runs (``data_fraction`` of them), the rest sparse zeros."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for pos in range(0, size, MIB):
            if rng.random() < data_fraction:
                os.pwrite(f.fileno(), rng.randbytes(min(MIB, size - pos)), pos)
    return Path(path)


def cli_env(repo: str | os.PathLike | None = None, passphrase: str | None = "test-pass", **extra: str) -> dict:
    """The environment for one CLI run: repository, passphrase and the cheap test KDF."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGBACKUP_") or k == "IMGBACKUP_CORE"}
    env["IMGBACKUP_TEST_CHEAP_KDF"] = "1"
    if repo is not None:
        env["IMGBACKUP_REPO"] = str(repo)
    if passphrase is not None:
        env["IMGBACKUP_PASSPHRASE"] = passphrase
    env.update(extra)
    return env


def cli(*args: str | os.PathLike, repo: str | os.PathLike | None = None, passphrase: str | None = "test-pass",
        timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    """Run ``python -m imgbackup ARGS`` as a user would, without a terminal; never raises on failure."""
    return subprocess.run([sys.executable, "-m", "imgbackup", *map(str, args)], env=cli_env(repo, passphrase, **extra),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def cli_json(*args: str | os.PathLike, repo: str | os.PathLike | None = None, **kw) -> dict:
    """Run a command with --json that must succeed; its parsed document."""
    proc = cli(*args, "--json", repo=repo, **kw)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}: {proc.stderr}"
    return json.loads(proc.stdout)

"""Disks, loop devices and mounts for tests: built with the real tools, always cleaned up by name.

Builders make each partition as its own file and copy it in at its offset where they can, so most
need no root and cannot spill over into the backup GPT; the real tools judge the result, not this
module. ``blank`` (a sparse file), ``random_image`` (sparse random runs), ``make_gpt_disk`` (ext4 +
FAT32 with real files), ``build_root_disk`` (the bare-metal tests' disk: a 4 MiB partition, then an
ext4 root to the end), ``build_mount_disk`` (the mount tests' disk: ext4 with owners, xattrs and
links, then FAT32). ``loop_device``, ``mounted`` and ``small_tmpfs`` undo what they did even when
the body fails; ``system_state`` lists this session's loop devices and mounts (see ``no_leaks``).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support import MIB, need, need_root, need_tool, run

from imgbackup.device.tools import wait_until

SECTOR = 512
# Real files with many sizes and names: a few MiB of the standard library and package docs.
PY_DIRS = ("json", "email", "http", "logging", "concurrent")
DOC_BUDGET = 1 * MIB
ROOT_START = 6 * MIB            # build_root_disk: where its ext4 root begins
MOUNT_PART1_START = 1 * MIB     # build_mount_disk: sector 2048
MOUNT_PART1_SIZE = 48 * MIB
MOUNT_PART2_SIZE = 40 * MIB
MOUNT_SOURCES = ["/usr/lib/python3.11/email", "/usr/lib/python3.11/json", "/usr/lib/python3.11/asyncio"]
RELEASE_WAIT = 5.0              # a just-closed loop device or mount is released within about a second


def blank(path: Path, size: int) -> Path:
    """A sparse file of ``size`` bytes (a blank disk)."""
    path.write_bytes(b"")
    os.truncate(path, size)
    return path


@contextlib.contextmanager
def loop_device(image: Path, partitions: bool = False, read_only: bool = False,
                offset: int | None = None, sizelimit: int | None = None,
                sector_size: int | None = None) -> Iterator[str]:
    """Attach ``image`` to a new loop device; with ``partitions`` add pN nodes via partx.

    Always detaches the device it created (partx -d first), even when the body fails.
    """
    need_root()
    need(Path("/dev/loop-control").exists(), "needs loop devices")
    cmd = ["losetup", "--find", "--show"]
    if read_only:
        cmd.append("--read-only")
    if offset is not None:
        cmd += ["--offset", str(offset)]
    if sizelimit is not None:
        cmd += ["--sizelimit", str(sizelimit)]
    if sector_size is not None:
        cmd += ["--sector-size", str(sector_size)]
    dev = run(*cmd, str(image)).stdout.strip()
    try:
        if partitions:
            run("partx", "-a", dev, check=False)
        yield dev
    finally:
        if partitions:
            run("partx", "-d", dev, check=False)
        wait_until(lambda: run("losetup", "-d", dev, check=False).returncode == 0, RELEASE_WAIT, 0.1)


@contextlib.contextmanager
def mounted(device: str, mountpoint: Path, options: str = "ro") -> Iterator[Path]:
    """Mount ``device`` at ``mountpoint`` for the body; always unmounts it."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    run("mount", "-o", options, device, mountpoint)
    try:
        yield mountpoint
    finally:
        wait_until(lambda: run("umount", mountpoint, check=False).returncode == 0, RELEASE_WAIT, 0.1)


@contextlib.contextmanager
def small_tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``1m``…) at ``mountpoint``: a disk that fills up; always unmounted."""
    need_root()
    mountpoint.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mountpoint)
    try:
        yield mountpoint
    finally:
        run("umount", mountpoint, check=False)


def system_state() -> tuple[list[str], list[str]]:
    """Loop devices and mounts of this test process right now: compared before/after each test.

    Only what points into this process's own directories counts (``own_roots``: FUSE mounts
    included, tests mount under them), so another process's loop devices or mounts (the other
    xdist worker, a benchmark, a second test run beside this one) cannot fail a test.
    """
    roots = own_roots()
    loops = sorted(line for line in run("losetup", "-a", check=False).stdout.splitlines()
                   if any(root in line for root in roots))
    mounts = sorted(line for line in Path("/proc/mounts").read_text().splitlines()
                    if any(root in line for root in roots))
    return loops, mounts


def own_roots() -> tuple[str, ...]:
    """The directories this test process's disks, loop files and mounts live in (with a trailing /).

    tests/conftest.py sets them: under pytest-xdist a worker's basetemp and its own TMPDIR, else the
    temporary directory of the run.
    """
    roots = os.environ.get("IMGBACKUP_TEST_ROOTS", tempfile.gettempdir()).split(os.pathsep)
    return tuple(os.path.join(root, "") for root in roots if root)


def random_image(path: str | os.PathLike, size: int, seed: int = 7, data_fraction: float = 1.0) -> Path:
    """A file of ``size`` bytes: random MiB runs (``data_fraction`` of them), the rest sparse zeros."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for pos in range(0, size, MIB):
            if rng.random() < data_fraction:
                os.pwrite(f.fileno(), rng.randbytes(min(MIB, size - pos)), pos)
    return Path(path)


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


def build_root_disk(path: Path, size_mib: int, payload: int, seed: int = 3) -> Path:
    """GPT: partition 1 (4 MiB, random bytes), partition 2 ext4 to the end with ``payload`` random bytes."""
    need_tool("sgdisk", "mkfs.ext4", "e2fsck", "debugfs", "resize2fs")
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
    run("sgdisk", "-o", "-n1:2048:+4M", "-n2:12288:0", "-c2:root", path)
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        f.seek(MIB)
        f.write(rng.randbytes(4 * MIB))
    stage = path.parent / f"stage-{path.stem}"
    shutil.copytree(Path("/usr/share/doc/python3"), stage / "doc", dirs_exist_ok=True)
    (stage / "payload.bin").write_bytes(rng.randbytes(payload))
    root_bytes = size_mib * MIB - ROOT_START - MIB  # sgdisk leaves the last MiB-ish free for the backup GPT
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "bmroot", "-d", stage, "-E", f"offset={ROOT_START}",
        path, f"{root_bytes // 1024}k")
    return path


def _fill_ext4(mnt: Path) -> None:
    for src in MOUNT_SOURCES:
        if os.path.isdir(src):
            shutil.copytree(src, mnt / os.path.basename(src), symlinks=True)
    (mnt / "big.bin").write_bytes(os.urandom(5 * MIB))
    (mnt / "tree" / "sub").mkdir(parents=True)
    (mnt / "tree" / "sub" / "data.txt").write_text("data\n" * 1000)
    os.chmod(mnt / "tree" / "sub" / "data.txt", 0o640)
    os.chown(mnt / "tree" / "sub" / "data.txt", 1234, 5678)
    os.setxattr(mnt / "tree" / "sub" / "data.txt", "user.origin", b"imgbackup-test")
    os.symlink("sub/data.txt", mnt / "tree" / "link")
    os.symlink("/nonexistent/target", mnt / "tree" / "dangling")
    os.utime(mnt / "tree" / "sub" / "data.txt", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    (mnt / "docs").mkdir()                      # also in the FAT partition: a path in two partitions
    (mnt / "docs" / "readme.txt").write_text("ext4 docs\n")


def build_mount_disk(root: Path) -> tuple[Path, Path, int]:
    """GPT: partition 1 ext4 (48 MiB, real files with owners, xattrs, links), partition 2 FAT32.

    Returns the disk, the ext4 filesystem as built (a judge for file hashes) and partition 2's offset.
    """
    need_tool("sgdisk", "mkfs.ext4", "mkfs.vfat", "mcopy", "debugfs", "e2fsck", "fsck.vfat", "fusermount3")
    disk, part1, fat = root / "disk.img", root / "part1.ext4", root / "part2.fat"
    with open(disk, "wb") as f:
        f.truncate(MOUNT_PART1_START + MOUNT_PART1_SIZE + MOUNT_PART2_SIZE + MIB)
    run("sgdisk", "-n1:2048:+48M", "-t1:8300", "-n2:0:+40M", "-t2:0700", disk)
    with open(part1, "wb") as f:
        f.truncate(MOUNT_PART1_SIZE)
    run("mkfs.ext4", "-q", "-b", "4096", "-F", part1)
    with loop_device(part1) as dev, mounted(dev, root / "build", "rw"):
        _fill_ext4(root / "build")
    (root / "build").rmdir()
    with open(fat, "wb") as f:
        f.truncate(MOUNT_PART2_SIZE)
    run("mkfs.vfat", "-F", "32", "-s", "1", fat)
    (root / "hello.txt").write_text("hello from FAT\n")
    run("mmd", "-i", fat, "::/docs")
    run("mcopy", "-i", fat, root / "hello.txt", "::/docs/hello.txt")
    part2_sector = int(re.search(r"First sector: (\d+)", run("sgdisk", "-i2", disk).stdout).group(1))
    with open(disk, "r+b") as f:
        f.seek(MOUNT_PART1_START)
        f.write(part1.read_bytes())
        f.seek(part2_sector * 512)
        f.write(fat.read_bytes())
    return disk, part1, part2_sector * 512

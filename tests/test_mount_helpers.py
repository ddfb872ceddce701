"""A real GPT disk (ext4 + FAT32) backed up with the CLI: the fixture of the mount tests."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support import loop_device, mounted, need_tool, run

MIB = 1 << 20
PART1_START = 1 * MIB           # sector 2048
PART1_SIZE = 48 * MIB
PART2_SIZE = 40 * MIB
SOURCES = ["/usr/lib/python3.11/email", "/usr/lib/python3.11/json", "/usr/lib/python3.11/asyncio"]
ENV = {"IMGBACKUP_PASSPHRASE": "mount-test", "IMGBACKUP_TEST_CHEAP_KDF": "1"}


@dataclass
class Disk:
    root: Path
    disk: Path
    part1: Path           # the ext4 filesystem as built (the judge for file hashes)
    repo: Path
    image_id: str
    part2_start: int


def cli(*args: str | os.PathLike, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the imgbackup CLI in a child process, as a sysadmin would."""
    env = dict(os.environ, **ENV)
    res = subprocess.run([sys.executable, "-m", "imgbackup", *map(str, args)], capture_output=True, text=True,
                         env=env, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"imgbackup {' '.join(map(str, args))} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def _fill_ext4(mnt: Path) -> None:
    for src in SOURCES:
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


def build_disk(root: Path) -> Disk:
    need_tool("sgdisk", "mkfs.ext4", "mkfs.vfat", "mcopy", "debugfs", "e2fsck", "fsck.vfat", "fusermount3")
    disk, part1, fat = root / "disk.img", root / "part1.ext4", root / "part2.fat"
    with open(disk, "wb") as f:
        f.truncate(PART1_START + PART1_SIZE + PART2_SIZE + MIB)
    run("sgdisk", "-n1:2048:+48M", "-t1:8300", "-n2:0:+40M", "-t2:0700", disk)
    with open(part1, "wb") as f:
        f.truncate(PART1_SIZE)
    run("mkfs.ext4", "-q", "-b", "4096", "-F", part1)
    with loop_device(part1) as dev, mounted(dev, root / "build", "rw"):
        _fill_ext4(root / "build")
    (root / "build").rmdir()
    with open(fat, "wb") as f:
        f.truncate(PART2_SIZE)
    run("mkfs.vfat", "-F", "32", "-s", "1", fat)
    (root / "hello.txt").write_text("hello from FAT\n")
    run("mmd", "-i", fat, "::/docs")
    run("mcopy", "-i", fat, root / "hello.txt", "::/docs/hello.txt")
    part2_sector = int(re.search(r"First sector: (\d+)", run("sgdisk", "-i2", disk).stdout).group(1))
    with open(disk, "r+b") as f:
        f.seek(PART1_START)
        f.write(part1.read_bytes())
        f.seek(part2_sector * 512)
        f.write(fat.read_bytes())
    repo = root / "repo"
    cli("init", "-r", repo)
    out = cli("backup", "-r", repo, disk, "--json").stdout
    image_id = re.search(r'"id": "([0-9a-f]{32})"', out).group(1)
    return Disk(root, disk, part1, repo, image_id, part2_sector * 512)


def tree_hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under ``root``."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def system_state() -> tuple[list[str], list[str]]:
    """Loop devices and mounts of this test session right now: compared before/after each test.

    Only what points into the session's temporary directories counts, so another process's loop
    devices (a benchmark running beside the tests) cannot fail a test.
    """
    mine = tempfile.gettempdir()
    loops = sorted(line for line in run("losetup", "-a", check=False).stdout.splitlines() if mine in line)
    mounts = sorted(line for line in Path("/proc/mounts").read_text().splitlines()
                    if mine in line or "fuse" in line)
    return loops, mounts


def file_block(part1: Path, path: str, logical: int) -> int:
    """Physical block of a file's logical block, from debugfs (the outside judge)."""
    out = run("debugfs", "-R", f"bmap {path} {logical}", part1).stdout.strip()
    return int(out.split()[-1])

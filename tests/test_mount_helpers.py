"""A real GPT disk (ext4 + FAT32) backed up with the CLI: the fixture of the mount tests."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.disks import build_mount_disk
from tests.support import run

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


def build_disk(root: Path) -> Disk:
    """The mount tests' GPT disk (tests.disks.build_mount_disk), backed up with the CLI."""
    disk, part1, part2_start = build_mount_disk(root)
    repo = root / "repo"
    cli("init", "-r", repo)
    out = cli("backup", "-r", repo, disk, "--json").stdout
    image_id = re.search(r'"id": "([0-9a-f]{32})"', out).group(1)
    return Disk(root, disk, part1, repo, image_id, part2_start)


def tree_hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under ``root``."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def file_block(part1: Path, path: str, logical: int) -> int:
    """Physical block of a file's logical block, from debugfs (the outside judge)."""
    out = run("debugfs", "-R", f"bmap {path} {logical}", part1).stdout.strip()
    return int(out.split()[-1])

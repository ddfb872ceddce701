"""Mount and verify --filesystems on an MBR disk holding XFS and btrfs (the GPT ext4/FAT disk is test_mount's).

Judges from outside: the trees as written through the kernel (file hashes), xfs_repair and btrfs check
(through verify). Neither filesystem may be written while mounted from the image: XFS is mounted with
norecovery, btrfs with its log replay off, both on read-only loop devices.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from tests.disks import loop_device, mounted
from tests.support import MIB, need_root, need_tool, run
from tests.test_mount_helpers import cli, tree_hashes

XFS_START, XFS_SIZE = 1 * MIB, 320 * MIB      # mkfs.xfs refuses filesystems under 300 MiB
BTRFS_START, BTRFS_SIZE = XFS_START + XFS_SIZE, 160 * MIB


def _fill(mnt: Path, seed: int) -> None:
    shutil.copytree("/usr/lib/python3.11/json", mnt / "json", ignore=shutil.ignore_patterns("__pycache__"))
    rng = random.Random(seed)
    (mnt / "data").mkdir()
    for i in range(20):
        (mnt / "data" / f"f{i}.bin").write_bytes(rng.randbytes(rng.randint(1, 400_000)))
    os.symlink("data/f1.bin", mnt / "link")


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> dict:
    need_root()
    need_tool("sfdisk", "mkfs.xfs", "mkfs.btrfs", "xfs_repair", "btrfs", "fusermount3")
    root = tmp_path_factory.mktemp("xfsbtrfs")
    disk = root / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(BTRFS_START + BTRFS_SIZE)
    run("sfdisk", "--quiet", disk, input=f"start={XFS_START // 512}, size={XFS_SIZE // 512}, type=83\n"
                                         f"start={BTRFS_START // 512}, size={BTRFS_SIZE // 512}, type=83\n")
    trees = {}
    for number, (start, size, mkfs) in enumerate(((XFS_START, XFS_SIZE, ["mkfs.xfs", "-q", "-f"]),
                                                  (BTRFS_START, BTRFS_SIZE, ["mkfs.btrfs", "-q", "-f"])), 1):
        with loop_device(disk, offset=start, sizelimit=size) as dev:
            run(*mkfs, dev)
            with mounted(dev, root / f"build{number}", "rw") as mnt:
                _fill(mnt, number)
                trees[number] = tree_hashes(mnt)
    repo = root / "repo"
    cli("init", "-r", repo)
    image = json.loads(cli("backup", "-r", repo, disk, "--json").stdout)
    return {"disk": disk, "repo": repo, "image": image, "trees": trees, "root": root}


def test_xfs_and_btrfs_on_mbr_mount_read_only_with_every_file(disk, tmp_path, no_leaks):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli("mount", "-r", disk["repo"], "latest", mnt, "--filesystems")
    try:
        assert sorted(os.listdir(mnt)) == ["disk.img", "fs", "part1.img", "part2.img"]
        for number in (1, 2):
            assert tree_hashes(mnt / "fs" / f"part{number}") == disk["trees"][number], number
        assert os.readlink(mnt / "fs" / "part1" / "link") == "data/f1.bin"
        options = {line.split()[1]: line.split()[3] for line in Path("/proc/mounts").read_text().splitlines()}
        assert "norecovery" in options[str((mnt / "fs" / "part1").resolve())]
        assert "nologreplay" in options[str((mnt / "fs" / "part2").resolve())]
    finally:
        cli("umount", mnt)
    assert os.listdir(mnt) == []


def test_verify_filesystems_runs_xfs_repair_and_btrfs_check(disk, no_leaks):
    doc = json.loads(cli("verify", "-r", disk["repo"], "latest", "--filesystems", "--json").stdout)
    parts = {p["number"]: p for p in doc["filesystems"]["partitions"]}
    assert parts[1]["fstype"] == "xfs" and parts[1]["checker"].startswith("xfs_repair")
    assert parts[2]["fstype"] == "btrfs" and parts[2]["checker"].startswith("btrfs")
    for number in (1, 2):
        assert parts[number]["ok"] and parts[number]["checker_exit"] == 0, parts[number]
        assert parts[number]["mounted"] and parts[number]["files"] == len(disk["trees"][number]) + 1  # + link

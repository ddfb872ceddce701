"""XFS used-block maps on real mkfs.xfs images, judged by xfs_db's counters and partclone.xfs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from tests.disks import blank, loop_device, mounted
from tests.support import need_tool, run
from tests.test_fsmap_common import (
    MIB,
    assert_covers,
    image_reader,
    judged_blocks,
    map_of,
    partclone_used,
)

from imgbackup.fsmap import xfs

SIZE = 300 * MIB  # mkfs.xfs's minimum


def ag_sum(img: Path, field: str, agcount: int) -> int:
    return sum(int(re.search(rf"{field} = (\d+)", xfs_db(img, f"agf {a}", f"p {field}")).group(1))
               for a in range(agcount))


def xfs_db(img: Path, *cmds: str, write: bool = False) -> str:
    args = ["xfs_db", "-x" if write else "-r"]
    for c in cmds:
        args += ["-c", c]
    return run(*args, img).stdout


def make_xfs(tmp_path: Path, args: list[str], size: int = SIZE) -> Path:
    need_tool("mkfs.xfs", "xfs_db")
    img = blank(tmp_path / "xfs.img", size)
    run("mkfs.xfs", "-q", "-f", *args, img)
    return img


def fill(img: Path, mnt: Path, shutdown: bool = False) -> None:
    """Write files, delete some (free holes between used extents); optionally crash the log."""
    rng = np.random.default_rng(5)
    with loop_device(img) as dev, mounted(dev, mnt, "rw") as m:
        for i in range(6):
            (m / f"f{i}").write_bytes(rng.integers(0, 256, 3 * MIB + i * 5000, dtype=np.uint8).tobytes())
        run("sync")
        for i in (1, 4):
            (m / f"f{i}").unlink()
        run("sync")
        if shutdown:
            (m / "late").write_bytes(b"x" * 100_000)
            run("xfs_io", "-x", "-c", "shutdown", m)


VARIANTS = {  # name: (mkfs args, size, mountable: this kernel refuses v4)
    "v5": ([], SIZE, True),
    "v4": (["-m", "crc=0"], SIZE, False),
    "1k-blocks": (["-b", "size=1024", "-l", "size=64m"], SIZE, True),
    "16-ags": (["-d", "agcount=16"], 1200 * MIB, True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_xfs_map_matches_counters_and_partclone(tmp_path: Path, variant: str) -> None:
    args, size, mountable = VARIANTS[variant]
    img = make_xfs(tmp_path, args, size)
    if mountable:
        fill(img, tmp_path / "mnt")
    geo = xfs_db(img, "sb 0", "p dblocks fdblocks agcount blocksize")
    dblocks, fdblocks, agcount, bs = (int(re.search(rf"^{k} = (\d+)", geo, re.M).group(1))
                                      for k in ("dblocks", "fdblocks", "agcount", "blocksize"))
    agfl = ag_sum(img, "flcount", agcount)
    btree = ag_sum(img, "btreeblks", agcount)
    with image_reader(img) as read:
        usage = xfs.used_blocks(read, 0, size)
    assert (usage.block_size, usage.nblocks) == (bs, dblocks)
    # free = blocks in the free-space trees; xfs also counts the AG free lists and the
    # non-root blocks of those trees as available space, but they hold metadata
    assert usage.nblocks - usage.used_count == fdblocks - agfl - btree
    m = map_of(img)
    assert (m.regions[0].fstype, m.regions[0].mode) == ("xfs", "bitmap")
    judge = partclone_used("xfs", img)
    assert_covers(m, judge)
    assert m.used_count <= judged_blocks(m, judge) + agfl * bs // m.block_size + agcount


def test_dirty_xfs_log_is_imaged_in_full_until_replayed(tmp_path: Path) -> None:
    img = make_xfs(tmp_path, [])
    fill(img, tmp_path / "mnt", shutdown=True)
    judge = run("xfs_repair", "-n", img, check=False)
    assert "log" in judge.stdout + judge.stderr  # the outside judge agrees: the log needs replay
    m = map_of(img)
    assert m.regions[0].mode == "full" and "dirty" in m.regions[0].warning
    assert m.used_count == m.nbits
    with loop_device(img) as dev, mounted(dev, tmp_path / "mnt", "rw"):
        pass  # mounting replays the log, unmounting writes the unmount record
    again = map_of(img)
    assert again.regions[0].mode == "bitmap"
    assert_covers(again, partclone_used("xfs", img))


@pytest.mark.parametrize(("cmds", "reason"), [
    (["agf 1", "write -d freeblks 5"], "AGF says 5 free"),
    (["agf 2", "write -d magicnum 0"], "bad AGF"),
    (["agf 0", "write -d bnoroot 0"], "btree pointer 0"),
    (["agf 3", "write -d cntlevel 2"], "bad magic or level"),
])
def test_inconsistent_xfs_is_imaged_in_full(tmp_path: Path, cmds: list[str], reason: str) -> None:
    img = make_xfs(tmp_path, [])
    xfs_db(img, *cmds, write=True)
    m = map_of(img)
    assert m.regions[0].mode == "full" and reason in m.regions[0].warning


def test_xfs_multi_level_free_space_trees(tmp_path: Path) -> None:
    """1 KiB blocks and every other small file deleted: more free extents than one leaf holds."""
    img = make_xfs(tmp_path, ["-b", "size=1024", "-l", "size=64m", "-d", "agcount=4"])
    with loop_device(img) as dev, mounted(dev, tmp_path / "mnt", "rw") as m:
        for i in range(1200):
            (m / f"s{i:04d}").write_bytes(b"%d" % i * 300)
        run("sync")
        for i in range(0, 1200, 2):
            (m / f"s{i:04d}").unlink()
    levels = [int(re.search(r"bnolevel = (\d+)", xfs_db(img, f"agf {a}", "p bnolevel")).group(1))
              for a in range(4)]
    assert max(levels) >= 2, f"test did not build a multi-level tree: {levels}"
    fdblocks = int(re.search(r"fdblocks = (\d+)", xfs_db(img, "sb 0", "p fdblocks")).group(1))
    agfl, btree = ag_sum(img, "flcount", 4), ag_sum(img, "btreeblks", 4)
    with image_reader(img) as read:
        usage = xfs.used_blocks(read, 0, SIZE)
    assert usage.nblocks - usage.used_count == fdblocks - agfl - btree
    m = map_of(img, block_size=1024)
    assert m.regions[0].mode == "bitmap"
    assert_covers(m, partclone_used("xfs", img))

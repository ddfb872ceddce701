"""ext2/3/4 used-block maps on real mkfs images, judged by dumpe2fs and partclone.ext4."""

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
    make_tree,
    map_of,
    partclone_used,
    unpack,
)

from imgbackup.fsmap import ext

FILES = {"a.bin": 3 * MIB, "dir/b.bin": 700_000, "dir/deeper/c.txt": 12, "d.bin": 1_500_000}


def dumpe2fs_free(image: Path) -> tuple[int, int, set[int]]:
    """(block size, block count, free blocks) from dumpe2fs's per-group lists."""
    out = run("dumpe2fs", image).stdout
    bs = int(re.search(r"^Block size:\s+(\d+)", out, re.M).group(1))
    count = int(re.search(r"^Block count:\s+(\d+)", out, re.M).group(1))
    free: set[int] = set()
    for line in re.findall(r"^\s+Free blocks: (.*)$", out, re.M):
        for part in filter(None, (p.strip() for p in line.split(","))):
            lo, _, hi = part.partition("-")
            free.update(range(int(lo), int(hi or lo) + 1))
    return bs, count, free


def make_ext(tmp_path: Path, mkfs_args: list[str], size: int = 32 * MIB, files=FILES) -> Path:
    need_tool("mkfs.ext4", "dumpe2fs")
    img = blank(tmp_path / "ext.img", size)
    tree = make_tree(tmp_path / "tree", files)
    run("mkfs.ext4", "-q", "-F", *mkfs_args, "-d", tree, img)
    return img


VARIANTS = {
    "4k-default": ["-b", "4096"],
    "4k-many-groups": ["-b", "4096", "-g", "2048"],
    "1k-many-groups": ["-b", "1024", "-g", "1024"],
    "2k-no-flex_bg": ["-b", "2048", "-O", "^flex_bg"],
    "no-64bit-gdt_csum": ["-b", "1024", "-g", "2048", "-O", "^64bit,^metadata_csum,uninit_bg"],
    "ext2": ["-t", "ext2", "-b", "1024", "-g", "4096"],
    "ext3": ["-t", "ext3", "-b", "2048"],
    "meta_bg": ["-b", "1024", "-g", "1024", "-O", "meta_bg,^resize_inode"],
    "sparse_super2": ["-b", "4096", "-g", "1024", "-O", "sparse_super2"],
    "no-sparse_super": ["-b", "1024", "-g", "2048", "-O", "^sparse_super,^resize_inode"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ext_bitmap_equals_dumpe2fs(tmp_path: Path, variant: str) -> None:
    img = make_ext(tmp_path, VARIANTS[variant])
    bs, count, free = dumpe2fs_free(img)
    if variant in ("1k-many-groups", "no-64bit-gdt_csum", "meta_bg"):  # computed, not read, bitmaps
        assert "BLOCK_UNINIT" in run("dumpe2fs", img).stdout
    with image_reader(img) as read:
        assert ext.probe(read, 0, img.stat().st_size)
        usage = ext.used_blocks(read, 0, img.stat().st_size)
    assert (usage.block_size, usage.nblocks) == (bs, count)
    ours = np.unpackbits(usage.bits, bitorder="little")[:count]
    theirs = np.ones(count, dtype=np.uint8)
    theirs[sorted(free)] = 0
    assert (ours == theirs).all(), f"differ at blocks {np.flatnonzero(ours != theirs)[:10]}"
    m = map_of(img)
    (region,) = m.regions
    assert (region.fstype, region.mode, region.warning) == ("ext", "bitmap", None)
    assert region.used_bytes == (count - len(free)) * bs
    judge = partclone_used("ext4", img)
    assert_covers(m, judge)
    assert m.used_count <= judged_blocks(m, judge) + 2  # tight: not just "everything used"


def test_ext_with_deleted_files_and_near_full(tmp_path: Path) -> None:
    need_tool("mkfs.ext4")
    img = blank(tmp_path / "ext.img", 48 * MIB)
    run("mkfs.ext4", "-q", "-b", "4096", "-g", "4096", img)
    empty = map_of(img).used_count
    with loop_device(img) as dev, mounted(dev, tmp_path / "mnt", "rw") as mnt:
        rng = np.random.default_rng(7)
        for i in range(4):
            (mnt / f"f{i}").write_bytes(rng.integers(0, 256, 6 * MIB, dtype=np.uint8).tobytes())
        run("sync")
        for i in (1, 3):
            (mnt / f"f{i}").unlink()
        run("sync")
    with_two = map_of(img)
    assert_covers(with_two, partclone_used("ext4", img))
    assert 2 * 6 * MIB // 4096 <= with_two.used_count - empty < 2 * 6 * MIB // 4096 + 64
    with loop_device(img) as dev, mounted(dev, tmp_path / "mnt", "rw") as mnt:
        filler = mnt / "fill"
        run("dd", "if=/dev/urandom", f"of={filler}", "bs=1M", check=False)  # until ENOSPC
        run("sync")
    full = map_of(img)
    assert full.regions[0].mode == "bitmap"
    assert_covers(full, partclone_used("ext4", img))
    assert full.used_count > 0.9 * full.nbits


def _debugfs(img: Path, cmd: str) -> None:
    need_tool("debugfs")
    run("debugfs", "-w", "-R", cmd, img)


@pytest.mark.parametrize(("cmd", "reason"), [
    ("feature needs_recovery", "needs recovery"),
    ("ssv state 0", "not cleanly unmounted"),
    ("ssv state 3", "errors"),
    ("set_bg 1 free_blocks_count 7", "group 1: descriptor says 7"),
    ("ssv free_blocks_count 12", "superblock says 12"),
])
def test_untrustworthy_ext_is_imaged_in_full(tmp_path: Path, cmd: str, reason: str) -> None:
    img = make_ext(tmp_path, ["-b", "1024", "-g", "2048"])
    assert map_of(img).regions[0].mode == "bitmap"
    _debugfs(img, cmd)
    m = map_of(img)
    (region,) = m.regions
    assert (region.fstype, region.mode) == ("ext", "full")
    assert reason in region.warning
    assert unpack(m).all()


def test_corrupt_block_bitmap_is_caught(tmp_path: Path) -> None:
    """Zeroing a group's bitmap block makes its count disagree: full, not a wrong map."""
    img = make_ext(tmp_path, ["-b", "4096", "-g", "4096"])
    with image_reader(img) as read:
        sb = ext._parse_super(read(1024, 1024))
        descs = ext._read_descriptors(read, 0, sb)
    with open(img, "r+b") as f:
        f.seek(descs[0].block_bitmap * sb.block_size)
        f.write(bytes(sb.block_size))
    m = map_of(img)
    assert m.regions[0].mode == "full" and "group 0" in m.regions[0].warning


def test_ext_larger_than_region_is_refused(tmp_path: Path) -> None:
    img = make_ext(tmp_path, ["-b", "4096"])
    with image_reader(img) as read:
        m_region = ext.probe(read, 0, img.stat().st_size)
        assert m_region
        with pytest.raises(ext.FsMapUnsure, match="larger than its region"):
            ext.used_blocks(read, 0, img.stat().st_size - 4096)

"""FAT12/16/32 used-sector maps on mkfs.vfat images filled with mtools; judged by partclone.fat
and by mshowfat's cluster lists for every file still on the volume."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
from tests.disks import blank
from tests.support import need_tool, run
from tests.test_fsmap_common import MIB, assert_covers, image_reader, make_tree, map_of, partclone_used

from imgbackup.fsmap import fat

FILES = {"big.bin": 900_000, "keep.txt": 5, "gone1.bin": 300_000, "sub/mid.bin": 250_000,
         "sub/gone2.bin": 120_000, "sub/tiny": 1}
KEPT = ["big.bin", "keep.txt", "sub/mid.bin", "sub/tiny"]

VARIANTS = {  # name: (mkfs.vfat args, image size)
    "fat12": (["-F", "12"], 4 * MIB),
    "fat16": (["-F", "16"], 20 * MIB),
    "fat16-4k-clusters": (["-F", "16", "-s", "8"], 24 * MIB),
    "fat32": (["-F", "32"], 40 * MIB),
    "fat32-1k-clusters": (["-F", "32", "-s", "2"], 72 * MIB),
}


def minfo(img: Path) -> dict[str, int]:
    """The geometry mtools reports: an independent reading of the boot sector."""
    out = run("minfo", "-i", img).stdout
    def field(pat: str) -> int:
        return int(re.search(pat, out).group(1))
    fat_len = field(r"sectors per fat: (\d+)") or field(r"Big fatlen=(\d+)")
    return {"sector": field(r"sector size: (\d+)"), "spc": field(r"cluster size: (\d+)"),
            "data_start": field(r"reserved \(boot\) sectors: (\d+)") + field(r"fats: (\d+)") * fat_len
            + -(-field(r"max available root directory slots: (\d+)") * 32 // field(r"sector size: (\d+)"))}


def make_fat(tmp_path: Path, args: list[str], size: int) -> Path:
    need_tool("mkfs.vfat", "mcopy", "mdel", "mshowfat", "minfo")
    img = blank(tmp_path / "fat.img", size)
    run("mkfs.vfat", *args, img)
    tree = make_tree(tmp_path / "tree", FILES)
    run("mmd", "-i", img, "::/sub")
    for name in FILES:
        run("mcopy", "-i", img, tree / name, f"::/{name}")
    run("mdel", "-i", img, "::/gone1.bin", "::/sub/gone2.bin")
    return img


def file_sectors(img: Path, name: str, geo: dict[str, int]) -> list[int]:
    out = run("mshowfat", "-i", img, f"::/{name}").stdout
    sectors = []
    for lo, _, hi in re.findall(r"<(\d+)(-(\d+))?>", out):
        for c in range(int(lo), int(hi or lo) + 1):
            first = geo["data_start"] + (c - 2) * geo["spc"]
            sectors += range(first, first + geo["spc"])
    assert sectors, f"mshowfat found no clusters for {name}"
    return sectors


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fat_map_matches_partclone_and_mshowfat(tmp_path: Path, variant: str) -> None:
    args, size = VARIANTS[variant]
    img = make_fat(tmp_path, args, size)
    geo = minfo(img)
    with image_reader(img) as read:
        assert fat.probe(read, 0, size)
        usage = fat.used_blocks(read, 0, size)
    assert usage.block_size == geo["sector"]
    used = np.unpackbits(usage.bits, bitorder="little")[:usage.nblocks].astype(bool)
    # Exact judge from mtools: boot+FATs+root, every kept file's and directory's clusters, and the
    # tail after the last whole cluster; nothing else (the deleted files' clusters are free).
    expect = np.zeros(usage.nblocks, dtype=bool)
    expect[:geo["data_start"]] = True
    for name in [*KEPT, "sub"] + (["."] if "fat32" in variant else []):
        expect[file_sectors(img, name, geo)] = True
    clusters = (usage.nblocks - geo["data_start"]) // geo["spc"]
    expect[geo["data_start"] + clusters * geo["spc"]:] = True
    assert (used == expect).all(), f"differ at sectors {np.flatnonzero(used != expect)[:10]}"
    m = map_of(img)
    assert m.regions[0].fstype == "vfat" and m.regions[0].mode == "bitmap"
    assert m.regions[0].used_bytes == int(used.sum()) * usage.block_size
    sectors_per_block = m.block_size // usage.block_size
    for s in np.flatnonzero(used).tolist():
        assert m.is_used(s // sectors_per_block), f"used sector {s} in an unused map block"
    if variant != "fat12":  # partclone 0.3.23 misreads FAT12 chains (marks clusters of big.bin free)
        judge = partclone_used("fat", img)
        theirs = np.zeros(usage.nblocks, dtype=bool)
        for off, length in judge:
            theirs[off // usage.block_size: (off + length) // usage.block_size] = True
        assert (used == theirs).all(), f"differ at sectors {np.flatnonzero(used != theirs)[:10]}"
        assert_covers(m, judge)
    assert m.used_count < m.nbits // 2  # the deleted files and the empty space are not imaged


def _fat_entry_offset(img: Path) -> tuple[int, int, int]:
    with image_reader(img) as read:
        bpb = fat._parse_bpb(read(0, 512))
    return bpb.reserved * bpb.bytes_per_sector, bpb.fat_bits, bpb.clusters


@pytest.mark.parametrize("variant", ["fat16", "fat32"])
def test_chain_pointing_outside_volume_is_unsure(tmp_path: Path, variant: str) -> None:
    img = make_fat(tmp_path, *VARIANTS[variant])
    fat_off, bits, clusters = _fat_entry_offset(img)
    fmt, width = ("<H", 2) if bits == 16 else ("<I", 4)
    with open(img, "r+b") as f:
        f.seek(fat_off + 5 * width)
        f.write(struct.pack(fmt, clusters + 50))
    m = map_of(img)
    assert m.regions[0].mode == "full" and "outside the volume" in m.regions[0].warning
    assert m.used_count == m.nbits


def test_dirty_fat16_is_unsure(tmp_path: Path) -> None:
    img = make_fat(tmp_path, *VARIANTS["fat16"])
    fat_off, _, _ = _fat_entry_offset(img)
    with open(img, "r+b") as f:  # clear the "cleanly unmounted" bit of entry 1 in FAT copy 0
        f.seek(fat_off + 2)
        f.write(struct.pack("<H", 0x7FFF))
    m = map_of(img)
    assert m.regions[0].mode == "full" and "cleanly" in m.regions[0].warning


def test_stale_fsinfo_is_not_an_error(tmp_path: Path) -> None:
    img = make_fat(tmp_path, *VARIANTS["fat32"])
    before = map_of(img)
    with open(img, "r+b") as f:  # FSInfo in sector 1: free count at 488
        f.seek(512 + 488)
        f.write(struct.pack("<I", 12345))
    after = map_of(img)
    assert after.regions[0].mode == "bitmap" and after.regions[0].warning is None
    assert bytes(after.bits) == bytes(before.bits)


def test_fat_not_probed_without_boot_sector(tmp_path: Path) -> None:
    img = make_fat(tmp_path, *VARIANTS["fat16"])
    with open(img, "r+b") as f:
        f.seek(510)
        f.write(b"\0\0")
    m = map_of(img)
    assert m.regions[0].fstype is None and m.used_count == m.nbits


@pytest.mark.parametrize(("variant", "state_at"), [("fat12", 37), ("fat32", 65)])
def test_fat_marked_dirty_in_boot_sector_is_unsure(tmp_path: Path, variant: str, state_at: int) -> None:
    img = make_fat(tmp_path, *VARIANTS[variant])
    with open(img, "r+b") as f:  # what Linux's vfat sets while the volume is mounted
        f.seek(state_at)
        f.write(b"\x01")
    m = map_of(img)
    assert m.regions[0].mode == "full" and "dirty" in m.regions[0].warning

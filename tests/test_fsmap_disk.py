"""Whole disks: partition tables, gaps, several filesystems, unknown content, odd tables."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
from tests.disks import blank, loop_device
from tests.support import need_tool, run
from tests.test_fsmap_common import (
    MIB,
    assert_covers,
    image_reader,
    make_tree,
    map_of,
    partclone_used,
    unpack,
)

from imgbackup.fsmap import read_used_map

SECTOR = 512


def put(disk: Path, offset: int, src: Path) -> None:
    """Copy a filesystem image into the disk image at ``offset`` (what mkfs on pN would do)."""
    with open(disk, "r+b") as out, open(src, "rb") as f:
        out.seek(offset)
        out.write(f.read())


def make_parts(tmp_path: Path) -> dict[str, Path]:
    need_tool("mkfs.ext4", "mkfs.vfat", "mcopy", "mkswap")
    tree = make_tree(tmp_path / "tree", {"x.bin": 2 * MIB, "y/z.bin": 600_000})
    ext_img = blank(tmp_path / "p-ext.img", 20 * MIB)
    run("mkfs.ext4", "-q", "-b", "1024", "-d", tree, ext_img)
    fat_img = blank(tmp_path / "p-fat.img", 16 * MIB)
    run("mkfs.vfat", "-F", "16", fat_img)
    run("mcopy", "-i", fat_img, tree / "x.bin", "::/x.bin")
    swap_img = blank(tmp_path / "p-swap.img", 8 * MIB)
    run("mkswap", swap_img)
    junk = tmp_path / "p-junk.img"  # stands for LUKS, LVM, anything we cannot read
    junk.write_bytes(np.random.default_rng(3).integers(0, 256, 4 * MIB, dtype=np.uint8).tobytes())
    return {"ext": ext_img, "fat": fat_img, "swap": swap_img, "junk": junk}


def test_gpt_disk_with_ext_fat_swap_and_unknown(tmp_path: Path) -> None:
    need_tool("sgdisk")
    parts = make_parts(tmp_path)
    disk = blank(tmp_path / "disk.img", 64 * MIB)
    run("sgdisk", "-n1:2048:+20M", "-t1:8300", "-n2:43008:+16M", "-t2:0700",
        "-n3:77824:+8M", "-t3:8200", "-n4:98304:+4M", "-t4:8309", disk)  # 1 MiB gap before p3
    starts = {"ext": 2048, "fat": 43008, "swap": 77824, "junk": 98304}
    for name, lba in starts.items():
        put(disk, lba * SECTOR, parts[name])
    m = map_of(disk)
    assert m.table is not None and m.table.kind == "gpt"
    by_part = {r.partition: r for r in m.regions if r.partition}
    assert {n: (r.fstype, r.mode) for n, r in by_part.items()} == {
        1: ("ext", "bitmap"), 2: ("vfat", "bitmap"), 3: ("swap", "bitmap"), 4: (None, "full")}
    assert by_part[3].used_bytes == 4096
    used = unpack(m)
    bs = m.block_size
    for r in m.regions:
        if r.partition is None:  # gaps, including the GPT arrays and headers
            assert r.mode == "full" and used[r.start // bs: -(-(r.start + r.size) // bs)].all()
    assert {(r.start, r.size) for r in m.regions if r.partition is None} >= {
        (0, 2048 * SECTOR), (75776 * SECTOR, 2048 * SECTOR)}
    for off, length in m.table.metadata_extents:
        assert used[off // bs: -(-(off + length) // bs)].all()
    assert used[98304 * SECTOR // bs: 106496 * SECTOR // bs].all()  # unknown content in full
    swap_blocks = used[77824 * SECTOR // bs: 94208 * SECTOR // bs]
    assert swap_blocks[0] and not swap_blocks[1:].any()
    for name in ("ext", "fat"):
        judge = partclone_used("ext4" if name == "ext" else "fat", parts[name])
        assert_covers(m, judge, base=starts[name] * SECTOR)
        alone = unpack(map_of(parts[name]))  # same map whether found via the table or alone
        first = starts[name] * SECTOR // bs
        assert (used[first:first + len(alone)] == alone).all()
    assert m.used_count < m.nbits // 2


def test_mbr_disk_unaligned_partitions_and_logicals(tmp_path: Path) -> None:
    need_tool("sfdisk")
    parts = make_parts(tmp_path)
    disk = blank(tmp_path / "disk.img", 38 * MIB)
    # p1 at sector 63 (not 4 KiB aligned); extended with a logical FAT at an odd sector
    run("sfdisk", disk, input="label: dos\n63,40960,83\n41023,,5\n41087,32768,6\n")
    table_starts = {"ext": 63, "fat": 41087}
    for name, lba in table_starts.items():
        put(disk, lba * SECTOR, parts[name])
    m = map_of(disk)
    got = {r.partition: (r.fstype, r.mode) for r in m.regions if r.partition}
    assert got == {1: ("ext", "bitmap"), 5: ("vfat", "bitmap")}  # extended container not probed
    used = unpack(m)
    assert used[0] and used[41023 * SECTOR // m.block_size]  # MBR and EBR blocks
    for name, fstype in (("ext", "ext4"), ("fat", "fat")):
        assert_covers(m, partclone_used(fstype, parts[name]), base=table_starts[name] * SECTOR)
    assert m.used_count < m.nbits // 2


def _raw_mbr(entries: list[tuple[int, int, int]]) -> bytes:
    sector = bytearray(512)
    for i, (ptype, start, count) in enumerate(entries):
        struct.pack_into("<B3xB3xII", sector, 446 + 16 * i, 0, ptype, start, count)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def test_overlapping_partitions_are_imaged_in_full(tmp_path: Path) -> None:
    parts = make_parts(tmp_path)
    disk = blank(tmp_path / "disk.img", 48 * MIB)
    put(disk, 2048 * SECTOR, parts["ext"])
    with open(disk, "r+b") as f:
        f.write(_raw_mbr([(0x83, 2048, 40960), (0x83, 30000, 20000)]))
    m = map_of(disk)
    assert all(r.mode == "full" for r in m.regions)
    assert any("overlaps" in (r.warning or "") for r in m.regions)
    assert m.used_count == m.nbits


def test_partition_past_end_of_truncated_disk(tmp_path: Path) -> None:
    parts = make_parts(tmp_path)
    disk = blank(tmp_path / "disk.img", 24 * MIB)
    put(disk, 2048 * SECTOR, parts["ext"])
    with open(disk, "r+b") as f:
        f.write(_raw_mbr([(0x83, 2048, 40960), (0x82, 45056, 1000)]))
    os.truncate(disk, 16 * MIB)  # cuts the ext filesystem short
    m = map_of(disk)
    (p1,) = [r for r in m.regions if r.partition == 1]
    assert p1.mode == "full" and "past the end" in p1.warning and "larger than its region" in p1.warning
    assert m.used_count == m.nbits


@pytest.mark.parametrize("block_size", [512, 4096, 65536])
def test_bare_partition_images_any_map_block_size(tmp_path: Path, block_size: int) -> None:
    parts = make_parts(tmp_path)
    for name, fstype in (("ext", "ext"), ("fat", "vfat"), ("swap", "swap"), ("junk", None)):
        img = parts[name]
        with image_reader(img) as read:
            m = read_used_map(read, img.stat().st_size, block_size=block_size)
        (r,) = m.regions
        assert r.fstype == fstype and r.partition is None
        assert m.table is None
        if fstype is None:
            assert r.mode == "full" and m.used_count == m.nbits
        else:
            assert r.mode == "bitmap" and m.used_count < m.nbits
        if name in ("ext", "fat"):
            assert_covers(m, partclone_used("ext4" if name == "ext" else "fat", img))


def test_damaged_gpt_disk_is_imaged_in_full(tmp_path: Path) -> None:
    need_tool("sgdisk")
    parts = make_parts(tmp_path)
    disk = blank(tmp_path / "disk.img", 32 * MIB)
    run("sgdisk", "-n1:2048:+20M", "-t1:8300", disk)
    put(disk, 2048 * SECTOR, parts["ext"])
    assert map_of(disk).regions[0].mode == "full"  # the gap before p1
    with open(disk, "r+b") as f:  # break both header CRCs: flip a byte of the disk GUID
        for off in (SECTOR + 60, 32 * MIB - SECTOR + 60):
            f.seek(off)
            byte = f.read(1)[0]
            f.seek(off)
            f.write(bytes([byte ^ 0xFF]))
    m = map_of(disk)
    (r,) = m.regions
    assert r.mode == "full" and "no intact GPT" in r.warning and m.used_count == m.nbits


def _swap(tmp_path: Path, size: int, pages: int | None = None) -> Path:
    need_tool("mkswap")
    img = blank(tmp_path / "swap.img", size)
    run("mkswap", img, *([str(pages * 4)] if pages else []))  # size in KiB
    return img


def test_swap_only_header_and_only_its_pages(tmp_path: Path) -> None:
    img = _swap(tmp_path, 8 * MIB, pages=1024)  # swap covers the first 4 MiB only
    m = map_of(img)
    (r,) = m.regions
    assert (r.fstype, r.mode, r.used_bytes) == ("swap", "bitmap", 4096 + 4 * MIB)
    used = unpack(m)
    assert used[0] and not used[1:1024].any() and used[1024:].all()


@pytest.mark.parametrize(("patch_at", "data", "fstype"), [
    (4096 - 10, b"S1SUSPEND\0", None),  # hibernation image: not junk
    (1024, struct.pack("<I", 2), "swap"),  # unknown header version
])
def test_swap_variants_we_cannot_vouch_for(tmp_path: Path, patch_at: int, data: bytes, fstype) -> None:
    img = _swap(tmp_path, 8 * MIB)
    with open(img, "r+b") as f:
        f.seek(patch_at)
        f.write(data)
    m = map_of(img)
    assert m.regions[0].fstype == fstype and m.regions[0].mode == "full" and m.used_count == m.nbits


def test_gpt_disk_with_4096_byte_sectors(tmp_path: Path) -> None:
    need_tool("sgdisk")
    parts = make_parts(tmp_path)
    disk = blank(tmp_path / "disk4k.img", 32 * MIB)
    with loop_device(disk, sector_size=4096) as dev:
        run("sgdisk", "-n1:256:+20M", "-t1:8300", dev)
    put(disk, 256 * 4096, parts["ext"])
    with image_reader(disk) as read:
        m = read_used_map(read, disk.stat().st_size, sector_size=4096)
    (p1,) = [r for r in m.regions if r.partition == 1]
    assert (p1.start, p1.fstype, p1.mode) == (256 * 4096, "ext", "bitmap")
    assert_covers(m, partclone_used("ext4", parts["ext"]), base=256 * 4096)
    used = unpack(m)
    assert used[0] and used[1] and used[-1]  # protective MBR, primary header, backup header

"""ext2/3/4: the used-block bitmap from the per-group block bitmaps.

Layout (kernel Documentation/filesystems/ext4): superblock at byte 1024, group descriptors
after it (or per meta group with meta_bg), one block bitmap per group, anywhere with
flex_bg. Groups flagged BLOCK_UNINIT have no bitmap on disk: their used blocks are the
superblock backup, descriptor blocks and the bitmaps / inode tables placed there.
Every group's free count must equal its bitmap's, and their sum the superblock's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from imgbackup.fsmap.base import (
    FsMapUnsure,
    FsUsage,
    Reader,
    all_used,
    popcount,
    read_exact,
    set_range,
    shift_up,
)

SB_OFFSET = 1024
MAGIC = 0xEF53
STATE_VALID, STATE_ERROR = 0x1, 0x2
COMPAT_SPARSE_SUPER2 = 0x200
INCOMPAT_RECOVER, INCOMPAT_JOURNAL_DEV, INCOMPAT_META_BG = 0x4, 0x8, 0x10
INCOMPAT_64BIT, INCOMPAT_FLEX_BG = 0x80, 0x200
# Features that do not change what the block bitmaps mean.
INCOMPAT_KNOWN = (0x2 | INCOMPAT_RECOVER | INCOMPAT_META_BG | 0x40 | INCOMPAT_64BIT | 0x100
                  | INCOMPAT_FLEX_BG | 0x400 | 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x20000)
RO_SPARSE_SUPER, RO_GDT_CSUM, RO_BIGALLOC, RO_SNAPSHOT, RO_METADATA_CSUM = 0x1, 0x10, 0x200, 0x80, 0x400
BG_BLOCK_UNINIT = 0x2


@dataclass
class Super:
    block_size: int
    blocks: int
    free_blocks: int
    first_data_block: int
    blocks_per_group: int
    inodes_per_group: int
    inode_size: int
    state: int
    compat: int
    incompat: int
    ro_compat: int
    reserved_gdt: int
    desc_size: int
    first_meta_bg: int
    backup_bgs: tuple[int, int]

    @property
    def groups(self) -> int:
        return -(-(self.blocks - self.first_data_block) // self.blocks_per_group)

    @property
    def desc_per_block(self) -> int:
        return self.block_size // self.desc_size

    @property
    def gdt_blocks(self) -> int:
        return -(-self.groups // self.desc_per_block)

    @property
    def itable_blocks(self) -> int:
        return -(-self.inodes_per_group * self.inode_size // self.block_size)

    def group_start(self, g: int) -> int:
        return self.first_data_block + g * self.blocks_per_group

    def group_len(self, g: int) -> int:
        return min(self.blocks_per_group, self.blocks - self.group_start(g))


def _parse_super(raw: bytes) -> Super:
    u32 = lambda off: struct.unpack_from("<I", raw, off)[0]  # noqa: E731
    u16 = lambda off: struct.unpack_from("<H", raw, off)[0]  # noqa: E731
    incompat = u32(96)
    is64 = bool(incompat & INCOMPAT_64BIT)
    log_bs = u32(24)
    if u16(56) != MAGIC or log_bs > 6:
        raise FsMapUnsure("no ext superblock")
    desc_size = u16(254) if is64 else 32
    return Super(
        block_size=1024 << log_bs,
        blocks=u32(4) | ((u32(0x150) << 32) if is64 else 0),
        free_blocks=u32(12) | ((u32(0x158) << 32) if is64 else 0),
        first_data_block=u32(20), blocks_per_group=u32(32), inodes_per_group=u32(40),
        inode_size=u16(88) if u32(76) >= 1 else 128, state=u16(58), compat=u32(92),
        incompat=incompat, ro_compat=u32(100), reserved_gdt=u16(0xCE), desc_size=desc_size,
        first_meta_bg=u32(0x104), backup_bgs=(u32(0x24C), u32(0x250)))


def probe(read: Reader, offset: int, length: int) -> bool:
    """True when an ext2/3/4 superblock sits at byte 1024 of the region."""
    if length < 2048:
        return False
    raw = read(offset + SB_OFFSET, 1024)
    if len(raw) < 1024:
        return False
    try:
        sb = _parse_super(bytes(raw))
    except FsMapUnsure:
        return False
    return sb.blocks_per_group > 0 and sb.blocks > sb.first_data_block and sb.inodes_per_group > 0


def _check_trust(sb: Super, length: int) -> None:
    """Refuse states in which the bitmaps may not describe the data (fail closed)."""
    if sb.incompat & INCOMPAT_RECOVER:
        raise FsMapUnsure("ext journal needs recovery (needs_recovery set): mount and unmount it, or run e2fsck")
    if sb.state & STATE_ERROR:
        raise FsMapUnsure("ext filesystem has errors recorded: run e2fsck first")
    if not sb.state & STATE_VALID:
        raise FsMapUnsure("ext filesystem was not cleanly unmounted")
    if sb.incompat & INCOMPAT_JOURNAL_DEV:
        raise FsMapUnsure("external ext journal device, not a filesystem")
    unknown = sb.incompat & ~INCOMPAT_KNOWN
    if unknown:
        raise FsMapUnsure(f"unknown ext incompat features 0x{unknown:x}")
    if sb.ro_compat & (RO_BIGALLOC | RO_SNAPSHOT):
        raise FsMapUnsure("ext bigalloc/snapshot bitmaps are not supported")
    if sb.incompat & INCOMPAT_64BIT and sb.desc_size < 64:
        raise FsMapUnsure(f"ext 64bit descriptors of {sb.desc_size} bytes")
    if sb.desc_size < 32 or sb.desc_size & (sb.desc_size - 1) or sb.desc_size > sb.block_size:
        raise FsMapUnsure(f"bad ext descriptor size {sb.desc_size}")
    if not 0 < sb.blocks_per_group <= 8 * sb.block_size or sb.blocks_per_group % 8:
        raise FsMapUnsure(f"bad ext blocks per group {sb.blocks_per_group}")
    if sb.blocks * sb.block_size > length:
        raise FsMapUnsure(f"ext filesystem ({sb.blocks * sb.block_size} bytes) is larger than its region ({length})")
    if sb.first_data_block != (1 if sb.block_size == 1024 else 0):
        raise FsMapUnsure(f"unexpected ext first data block {sb.first_data_block}")


def _is_power(n: int, base: int) -> bool:
    while n > 1 and n % base == 0:
        n //= base
    return n == 1


def has_super(sb: Super, g: int) -> bool:
    """Whether group ``g`` holds a superblock copy (sparse_super / sparse_super2 rules)."""
    if g == 0:
        return True
    if sb.compat & COMPAT_SPARSE_SUPER2:
        return g in sb.backup_bgs
    if g <= 1 or not sb.ro_compat & RO_SPARSE_SUPER:
        return True
    return g % 2 == 1 and (_is_power(g, 3) or _is_power(g, 5) or _is_power(g, 7))


def base_meta_blocks(sb: Super, g: int) -> int:
    """Blocks at the start of group ``g`` used by superblock + descriptors (ext4_num_base_meta_blocks)."""
    num = int(has_super(sb, g))
    dpb = sb.desc_per_block
    if not sb.incompat & INCOMPAT_META_BG or g < sb.first_meta_bg * dpb:
        if num:
            gdb = sb.first_meta_bg if sb.incompat & INCOMPAT_META_BG else sb.gdt_blocks
            num += gdb + sb.reserved_gdt
    else:
        first = (g // dpb) * dpb
        num += int(g in (first, first + 1, first + dpb - 1))
    return num


def _descriptor_block(sb: Super, nr: int) -> int:
    """Block holding descriptor block ``nr`` (the kernel's descriptor_loc)."""
    if not sb.incompat & INCOMPAT_META_BG or nr < sb.first_meta_bg:
        return sb.first_data_block + nr + 1
    bg = sb.desc_per_block * nr
    extra = int(has_super(sb, bg))
    if sb.block_size == 1024 and nr == 0 and sb.first_data_block == 0:
        extra += 1
    return sb.group_start(bg) + extra


@dataclass
class Desc:
    block_bitmap: int
    inode_bitmap: int
    inode_table: int
    free: int
    flags: int


def _read_descriptors(read: Reader, offset: int, sb: Super) -> list[Desc]:
    out: list[Desc] = []
    bs, ds = sb.block_size, sb.desc_size
    for nr in range(sb.gdt_blocks):
        blk = read_exact(read, offset + _descriptor_block(sb, nr) * bs, bs)
        for i in range(min(sb.desc_per_block, sb.groups - len(out))):
            d = blk[i * ds:(i + 1) * ds]
            bb, ib, it, free, _fi, _dirs, flags = struct.unpack_from("<IIIHHHH", d)
            if ds >= 64:
                bbh, ibh, ith, freeh = struct.unpack_from("<IIIH", d, 32)
                bb, ib, it, free = bb | bbh << 32, ib | ibh << 32, it | ith << 32, free | freeh << 16
            out.append(Desc(bb, ib, it, free, flags))
    return out


def _group_meta(sb: Super, descs: list[Desc]) -> list[tuple[int, int]]:
    """(first block, count) of every metadata extent the bitmaps must show as used."""
    extents = []
    for g, d in enumerate(descs):
        extents.append((sb.group_start(g), base_meta_blocks(sb, g)))
        extents += [(d.block_bitmap, 1), (d.inode_bitmap, 1), (d.inode_table, sb.itable_blocks)]
    for start, count in extents:
        if start < sb.first_data_block or start + count > sb.blocks:
            raise FsMapUnsure(f"ext metadata at block {start} (+{count}) lies outside the filesystem")
    return extents


def _by_group(sb: Super, extents: list[tuple[int, int]]) -> dict[int, list[tuple[int, int]]]:
    """Metadata extents bucketed by the groups they touch (flex_bg puts them anywhere)."""
    out: dict[int, list[tuple[int, int]]] = {}
    for first, count in extents:
        if count <= 0:
            continue
        g0 = (first - sb.first_data_block) // sb.blocks_per_group
        g1 = (first + count - 1 - sb.first_data_block) // sb.blocks_per_group
        for g in range(g0, g1 + 1):
            out.setdefault(g, []).append((first, count))
    return out


def _meta_in_group(sb: Super, g: int, extents: list[tuple[int, int]]) -> np.ndarray:
    """The computed bitmap of a BLOCK_UNINIT group: only metadata placed inside it is used."""
    start, n = sb.group_start(g), sb.group_len(g)
    bits = np.zeros((sb.blocks_per_group + 7) // 8, dtype=np.uint8)
    for first, count in extents:
        lo, hi = max(first, start), min(first + count, start + n)
        if lo < hi:
            set_range(bits, lo - start, hi - lo)
    return bits


def _group_bits(read: Reader, offset: int, sb: Super, g: int, d: Desc,
                extents: dict[int, list[tuple[int, int]]]) -> np.ndarray:
    """One group's bitmap (bpg bits), checked against the descriptor's free count."""
    n = sb.group_len(g)
    uninit = d.flags & BG_BLOCK_UNINIT and sb.ro_compat & (RO_GDT_CSUM | RO_METADATA_CSUM)
    if uninit:
        bits = _meta_in_group(sb, g, extents.get(g, []))
    else:
        raw = read_exact(read, offset + d.block_bitmap * sb.block_size, sb.blocks_per_group // 8)
        bits = np.frombuffer(raw, dtype=np.uint8).copy()
    valid = np.unpackbits(bits, bitorder="little")[:n]
    free = n - int(valid.sum(dtype=np.int64))
    if free != d.free:
        kind = "computed (BLOCK_UNINIT)" if uninit else "bitmap"
        raise FsMapUnsure(f"ext group {g}: descriptor says {d.free} free blocks, {kind} has {free}")
    if n < sb.blocks_per_group:  # last group: blocks past the end are not free space
        valid = np.concatenate((valid, np.ones(sb.blocks_per_group - n, dtype=np.uint8)))
        bits = np.packbits(valid, bitorder="little")
    return bits


def used_blocks(read: Reader, offset: int, length: int) -> FsUsage:
    """The used-block bitmap of the ext filesystem at ``offset``; FsMapUnsure when not trustworthy."""
    sb = _parse_super(read_exact(read, offset + SB_OFFSET, 1024))
    _check_trust(sb, length)
    descs = _read_descriptors(read, offset, sb)
    extents = _group_meta(sb, descs)
    buckets = _by_group(sb, extents)
    parts = [_group_bits(read, offset, sb, g, d, buckets) for g, d in enumerate(descs)]
    bits = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    span = sb.blocks - sb.first_data_block
    total_free = span - popcount(bits, span)
    if total_free != sb.free_blocks:
        raise FsMapUnsure(f"ext superblock says {sb.free_blocks} free blocks, bitmaps have {total_free}")
    if sb.first_data_block:
        bits = shift_up(bits, len(bits) * 8, sb.first_data_block)
    out = all_used(sb.blocks)
    out[:] = bits[:len(out)]
    tail = sb.blocks % 8
    if tail:
        out[-1] &= (1 << tail) - 1
    for first, count in extents:  # fail closed: metadata is used whatever a bitmap says
        set_range(out, first, count)
    return FsUsage(block_size=sb.block_size, nblocks=sb.blocks, bits=out)

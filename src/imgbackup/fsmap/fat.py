"""FAT12/16/32: reserved sectors, FATs and the FAT12/16 root directory are used; a data cluster
is used when its FAT entry is not zero in any FAT copy.

The map is per sector (the BPB's bytes per sector). FAT type follows Microsoft's rule: by the
count of data clusters, never by the label. A FAT entry that is neither free, a cluster
number inside the volume, a bad-cluster mark nor an end-of-chain mark makes the map unsure,
as does the volume's "not cleanly unmounted" bit.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from imgbackup.fsmap.base import FsMapUnsure, FsUsage, Reader, all_used, clear_range, read_exact

MAX_FAT_BYTES = 512 << 20   # each FAT is read whole: 2^27 FAT32 entries (2 TiB at 16 KiB clusters); past that, image in full


@dataclass
class Bpb:
    bytes_per_sector: int
    sectors_per_cluster: int
    reserved: int
    num_fats: int
    root_entries: int
    total_sectors: int
    fat_sectors: int

    @property
    def root_sectors(self) -> int:
        return -(-self.root_entries * 32 // self.bytes_per_sector)

    @property
    def data_start(self) -> int:
        return self.reserved + self.num_fats * self.fat_sectors + self.root_sectors

    @property
    def clusters(self) -> int:
        return (self.total_sectors - self.data_start) // self.sectors_per_cluster

    @property
    def fat_bits(self) -> int:
        n = self.clusters
        return 12 if n < 4085 else 16 if n < 65525 else 32


def _parse_bpb(raw: bytes) -> Bpb | None:
    if len(raw) < 512 or raw[510:512] != b"\x55\xaa" or raw[0] not in (0xEB, 0xE9):
        return None
    bps, spc, res, nfats, roots, tot16, media, fat16 = struct.unpack_from("<HBHBHHBH", raw, 11)
    tot32, fat32 = struct.unpack_from("<II", raw, 32)
    if bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1) or res == 0:
        return None
    if nfats not in (1, 2, 3, 4) or not (media == 0xF0 or media >= 0xF8):
        return None
    bpb = Bpb(bps, spc, res, nfats, roots, tot16 or tot32, fat16 or fat32)
    if bpb.fat_sectors == 0 or bpb.total_sectors <= bpb.data_start or bpb.clusters < 1:
        return None
    if (bpb.fat_bits == 32) != (fat16 == 0 and roots == 0):
        return None  # FAT32 by size but with a FAT12/16 BPB (or the reverse): not trusted
    return bpb


def probe(read: Reader, offset: int, length: int) -> bool:
    """True when the region starts with a plausible FAT boot sector whose volume fits the region."""
    bpb = _parse_bpb(bytes(read(offset, 512)))
    return bpb is not None and bpb.total_sectors * bpb.bytes_per_sector <= length


def _entries(fat: bytes, bits: int, count: int) -> np.ndarray:
    """The first ``count`` entries of one FAT as uint32."""
    if bits == 32:
        return np.frombuffer(fat, dtype="<u4", count=count) & 0x0FFFFFFF
    if bits == 16:
        return np.frombuffer(fat, dtype="<u2", count=count).astype(np.uint32)
    raw = np.frombuffer(fat, dtype=np.uint8)
    idx = np.arange(count) * 3 // 2
    word = raw[idx].astype(np.uint32) | (raw[idx + 1].astype(np.uint32) << 8)
    odd = (np.arange(count) & 1).astype(bool)
    return np.where(odd, word >> 4, word & 0xFFF).astype(np.uint32)


def _check_entries(ent: np.ndarray, bpb: Bpb, copy: int) -> None:
    """Entries 2.. must be free, a cluster inside the volume, bad, or end of chain."""
    top = {12: 0xFFF, 16: 0xFFFF, 32: 0x0FFFFFFF}[bpb.fat_bits]
    bad, eoc = top - 8, top - 7
    data = ent[2:]
    ok = (data == 0) | ((data >= 2) & (data <= bpb.clusters + 1)) | (data == bad) | (data >= eoc)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0]) + 2
        raise FsMapUnsure(f"FAT{bpb.fat_bits} copy {copy}: cluster {i} points to {int(ent[i])}, outside the volume")
    clean_bit = {16: 0x8000, 32: 0x08000000}.get(bpb.fat_bits)
    if clean_bit and copy == 0 and not int(ent[1]) & clean_bit:
        raise FsMapUnsure(f"FAT{bpb.fat_bits} volume was not cleanly unmounted (dirty bit): run fsck.fat")


def _check_boot_state(raw: bytes, bpb: Bpb) -> None:
    """Linux sets bit 0 of the extended BPB's state byte while the volume is mounted."""
    sig, state = (66, 65) if bpb.fat_bits == 32 else (38, 37)
    if raw[sig] == 0x29 and raw[state] & 1:
        raise FsMapUnsure(f"FAT{bpb.fat_bits} volume is marked dirty (mounted or not cleanly unmounted)")


def used_blocks(read: Reader, offset: int, length: int) -> FsUsage:
    """Per-sector used map of the FAT volume at ``offset``."""
    bpb = _parse_bpb(read_exact(read, offset, 512))
    if bpb is None:
        raise FsMapUnsure("no FAT boot sector")
    bps = bpb.bytes_per_sector
    if bpb.total_sectors * bps > length:
        raise FsMapUnsure("FAT volume is larger than its region")
    _check_boot_state(read_exact(read, offset, 512), bpb)
    count = bpb.clusters + 2
    fat_bytes = bpb.fat_sectors * bps
    need = -(-count * bpb.fat_bits // 8) + 1
    if need > fat_bytes + 1 or fat_bytes > MAX_FAT_BYTES:
        raise FsMapUnsure(f"FAT of {fat_bytes} bytes cannot hold {count} entries")
    used = np.zeros(bpb.clusters, dtype=bool)
    for copy in range(bpb.num_fats):
        fat = read_exact(read, offset + (bpb.reserved + copy * bpb.fat_sectors) * bps, fat_bytes) + b"\0"
        ent = _entries(fat, bpb.fat_bits, count)
        _check_entries(ent, bpb, copy)
        used |= ent[2:] != 0
    bits = all_used(bpb.total_sectors)
    spc = bpb.sectors_per_cluster
    free = np.flatnonzero(~used)
    if len(free):  # runs of free clusters -> sector ranges
        breaks = np.flatnonzero(np.diff(free) != 1)
        starts = np.concatenate(([free[0]], free[breaks + 1]))
        ends = np.concatenate((free[breaks], [free[-1]])) + 1
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            clear_range(bits, bpb.data_start + s * spc, (e - s) * spc)
    return FsUsage(block_size=bps, nblocks=bpb.total_sectors, bits=bits)

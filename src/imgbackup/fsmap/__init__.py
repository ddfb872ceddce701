"""Which blocks of a disk must be imaged: everything except what a filesystem vouches is free.

The map fails closed. It starts with every block used; only a recognised filesystem that
passes its own consistency checks may clear blocks, and only blocks that lie wholly inside
its free space. Partition tables, gaps between partitions, unknown content (LUKS, LVM, ...)
and filesystems we cannot vouch for stay used; each region says why in its RegionReport.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal

import numpy as np

from imgbackup.disklabel import Partition, PartitionTable, is_extended, read_partition_table
from imgbackup.disklabel.mbr import PROTECTIVE_TYPE, parse_sector
from imgbackup.fsmap import ext, fat, ntfs, swap, xfs
from imgbackup.fsmap.base import (
    FsMapUnsure,
    FsUsage,
    Reader,
    ShortRead,
    all_used,
    clear_range,
    popcount,
    set_range,
    zero_runs,
)

__all__ = ["FILESYSTEMS", "FsMapUnsure", "FsUsage", "RegionReport", "UsedMap", "map_region", "read_used_map"]

FILESYSTEMS: dict[str, ModuleType] = {"ext": ext, "vfat": fat, "ntfs": ntfs, "swap": swap, "xfs": xfs}
"""fstype -> module with ``probe(read, offset, length)`` and ``used_blocks(read, offset, length)``."""

PARSE_ERRORS = (ValueError, IndexError, KeyError, OverflowError, ZeroDivisionError, struct.error)
"""What a parser may raise on garbage it did not foresee: the region is then imaged in full."""


@dataclass
class RegionReport:
    """One span of the disk: a partition, a gap, or the whole source when it has no table.

    ``used_bytes`` is what the filesystem reports as used (the whole region when full).
    """

    start: int
    size: int
    partition: int | None
    fstype: str | None
    mode: Literal["bitmap", "full"]
    used_bytes: int
    warning: str | None = None


@dataclass
class UsedMap:
    """Packed LSB-first bitmap over ``block_size`` blocks of the disk; 1 = must be imaged."""

    bits: np.ndarray
    nbits: int
    block_size: int
    regions: list[RegionReport] = field(default_factory=list)
    table: PartitionTable | None = None

    @property
    def used_count(self) -> int:
        return popcount(self.bits, self.nbits)

    def is_used(self, block: int) -> bool:
        return bool(self.bits[block >> 3] >> (block & 7) & 1)


def read_used_map(read: Reader, disk_size: int, sector_size: int = 512,
                  block_size: int = 4096) -> UsedMap:
    """Map the disk (or partition image) read through ``read(offset, length)``."""
    nbits = -(-disk_size // block_size)
    bits = all_used(nbits)
    table = read_partition_table(read, disk_size, sector_size)
    if table is None and _protective_mbr(read, sector_size):
        regions = [RegionReport(0, disk_size, None, None, "full", disk_size,
                                "protective MBR but no intact GPT copy: disk imaged in full")]
    elif table is None:
        regions = [map_region(read, bits, block_size, 0, disk_size, None)]
    else:
        regions = _map_table(read, bits, block_size, table)
        for offset, length in table.metadata_extents:
            _set_bytes(bits, block_size, offset, length, nbits)
    return UsedMap(bits=bits, nbits=nbits, block_size=block_size,
                   regions=sorted(regions, key=lambda r: r.start), table=table)


def _protective_mbr(read: Reader, sector_size: int) -> bool:
    slots = parse_sector(bytes(read(0, sector_size)))
    return slots is not None and any(s.type == PROTECTIVE_TYPE for s in slots)


def _set_bytes(bits: np.ndarray, bs: int, offset: int, length: int, nbits: int) -> None:
    first = max(0, offset // bs)
    last = min(nbits, -(-(offset + length) // bs))
    set_range(bits, first, last - first)


def _map_table(read: Reader, bits: np.ndarray, bs: int, table: PartitionTable) -> list[RegionReport]:
    disk = table.disk_size
    parts = [p for p in table.partitions if not (table.kind == "mbr" and is_extended(p.type_id))]
    parts = sorted((p for p in parts if p.start < disk and p.size > 0), key=lambda p: p.start)
    overlapping = _overlapping(parts)
    regions = []
    for p in parts:
        size = min(p.size, disk - p.start)
        if p.number in overlapping:
            regions.append(RegionReport(p.start, size, p.number, None, "full", size,
                                        "partition overlaps another partition"))
            continue
        report = map_region(read, bits, bs, p.start, size, p.number)
        if size < p.size:
            report.warning = "; ".join(filter(None, ["partition extends past the end of the disk",
                                                     report.warning]))
        regions.append(report)
    regions += _gaps(parts, disk)
    return regions


def _overlapping(parts: list[Partition]) -> set[int]:
    bad: set[int] = set()
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            if b.start < a.end and a.start < b.end:
                bad |= {a.number, b.number}
    return bad


def _gaps(parts: list[Partition], disk: int) -> list[RegionReport]:
    out, pos = [], 0
    for p in parts:
        if p.start > pos:
            out.append(RegionReport(pos, p.start - pos, None, None, "full", p.start - pos))
        pos = max(pos, min(p.end, disk))
    if pos < disk:
        out.append(RegionReport(pos, disk - pos, None, None, "full", disk - pos))
    return out


def _probe_all(read: Reader, start: int, size: int) -> list[str]:
    found = []
    for name, mod in FILESYSTEMS.items():
        try:
            if mod.probe(read, start, size):
                found.append(name)
        except PARSE_ERRORS:
            continue
    return found


# Content we recognise but cannot map: (offset in the region, magic, what it is). Named in the warning.
FOREIGN_SIGNATURES = (
    (0, b"LUKS\xba\xbe", "LUKS-encrypted"),
    (3, b"-FVE-FS-", "BitLocker-encrypted"),
    *((512 * i, b"LABELONE", "an LVM physical volume") for i in range(4)),
    (0x10040, b"_BHRfS_M", "btrfs (no used-block map for it yet)"),
    (4096, struct.pack("<I", 0xA92B4EFC), "a Linux software-RAID member"),
    (0, struct.pack("<I", 0xA92B4EFC), "a Linux software-RAID member"),
)


def _foreign(read: Reader, start: int, size: int) -> str | None:
    for offset, magic, what in FOREIGN_SIGNATURES:
        if offset + len(magic) <= size and bytes(read(start + offset, len(magic))) == magic:
            return what
    return None


def map_region(read: Reader, bits: np.ndarray, bs: int, start: int, size: int,
               partition: int | None) -> RegionReport:
    """Probe one region and clear, in ``bits``, the map blocks wholly inside its free space."""
    found = _probe_all(read, start, size)
    if not found:
        what = _foreign(read, start, size) or "no filesystem imgbackup can map"
        return RegionReport(start, size, partition, None, "full", size,
                            f"{what}: imaged in full, every block")
    fstype = "+".join(found)
    if len(found) > 1:
        return RegionReport(start, size, partition, fstype, "full", size,
                            f"ambiguous: signatures of {', '.join(found)}")
    try:
        usage = FILESYSTEMS[fstype].used_blocks(read, start, size)
        if usage.nblocks * usage.block_size > size:
            raise FsMapUnsure("filesystem is larger than its region")
    except (FsMapUnsure, ShortRead) as exc:   # before PARSE_ERRORS: ShortRead is a ValueError
        return RegionReport(start, size, partition, fstype, "full", size, str(exc))
    except PARSE_ERRORS as exc:
        return RegionReport(start, size, partition, fstype, "full", size, f"cannot parse {fstype}: {exc}")
    _clear_free(bits, bs, start, usage)
    used = usage.used_count * usage.block_size + (size - usage.nblocks * usage.block_size)
    return RegionReport(start, size, partition, fstype, "bitmap", used)


def _clear_free(bits: np.ndarray, bs: int, start: int, usage: FsUsage) -> None:
    """Clear map blocks that lie wholly inside a run of the filesystem's free blocks."""
    fbs = usage.block_size
    for run_starts, run_lengths in zero_runs(usage.bits, usage.nblocks):
        lo = start + run_starts.astype(np.int64) * fbs
        hi = lo + run_lengths.astype(np.int64) * fbs
        first = -(-lo // bs)
        last = hi // bs
        keep = last > first
        for f, n in zip(first[keep].tolist(), (last - first)[keep].tolist(), strict=True):
            clear_range(bits, f, n)

"""MS-DOS partition table: four primary slots in sector 0 and a chain of EBRs for logicals.

Each EBR holds the logical partition (relative to the EBR itself) in slot 0 and the link
to the next EBR (relative to the extended partition's start) in slot 1. The chain is
followed loop-safe: a repeated or out-of-range EBR ends it with a warning.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from imgbackup.disklabel.types import Partition, PartitionTable, Reader, ShortRead, read_exact

BOOT_SIGNATURE = b"\x55\xaa"
ENTRIES_OFFSET = 446
DISK_ID_OFFSET = 440
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
PROTECTIVE_TYPE = 0xEE
MAX_LOGICAL = 256   # far beyond any real EBR chain: a longer one is a loop in damaged data


@dataclass
class MbrEntry:
    status: int
    type: int
    start_lba: int
    num_sectors: int

    @property
    def used(self) -> bool:
        return self.type != 0 and self.num_sectors != 0


def parse_sector(raw: bytes) -> list[MbrEntry] | None:
    """The four slots of an MBR/EBR sector, or None without the 55AA signature."""
    if len(raw) < 512 or raw[510:512] != BOOT_SIGNATURE:
        return None
    out = []
    for i in range(4):
        off = ENTRIES_OFFSET + 16 * i
        status, ptype = raw[off], raw[off + 4]
        start, count = struct.unpack_from("<II", raw, off + 8)
        out.append(MbrEntry(status, ptype, start, count))
    return out


def is_extended(type_id: str) -> bool:
    """True for an extended-partition container (its content is EBRs and logicals)."""
    try:
        return int(type_id, 16) in EXTENDED_TYPES
    except ValueError:
        return False


def _plausible(entries: list[MbrEntry]) -> bool:
    """Reject boot sectors that merely end in 55AA (e.g. a FAT volume without a table)."""
    return all(e.status in (0, 0x80) for e in entries) and any(e.used for e in entries)


def read_mbr(read: Reader, disk_size: int, sector_size: int = 512) -> PartitionTable | None:
    """Read an MBR table with its logical partitions; None when sector 0 holds no table."""
    try:
        raw = read_exact(read, 0, sector_size)
    except ShortRead:
        return None
    entries = parse_sector(raw)
    if entries is None or not _plausible(entries):
        return None
    disk_id = struct.unpack_from("<I", raw, DISK_ID_OFFSET)[0]
    prefix = f"{disk_id:08x}"
    table = PartitionTable(kind="mbr", sector_size=sector_size, disk_size=disk_size, disk_uuid=prefix,
                           partitions=[], metadata_extents=[(0, sector_size)], source="mbr")
    for i, e in enumerate(entries):
        if not e.used:
            continue
        table.partitions.append(_partition(i + 1, e, e.start_lba, sector_size, prefix))
        if e.type in EXTENDED_TYPES:
            _read_logicals(read, table, e.start_lba, e.num_sectors, prefix)
    return table


def _partition(number: int, e: MbrEntry, abs_lba: int, ss: int, prefix: str) -> Partition:
    return Partition(number=number, start=abs_lba * ss, size=e.num_sectors * ss, type_id=f"{e.type:02x}",
                     uuid=f"{prefix}-{number:02x}", bootable=e.status == 0x80)


def _read_logicals(read: Reader, table: PartitionTable, ext_lba: int, ext_sectors: int,
                   prefix: str) -> None:
    """Follow the EBR chain inside the extended partition at ``ext_lba``."""
    ss = table.sector_size
    seen: set[int] = set()
    ebr_lba = ext_lba
    number = 5
    while True:
        if ebr_lba in seen or len(seen) >= MAX_LOGICAL:
            table.warnings.append(f"EBR chain loops or is too long at LBA {ebr_lba}; stopped")
            return
        if not ext_lba <= ebr_lba < ext_lba + ext_sectors:
            table.warnings.append(f"EBR at LBA {ebr_lba} lies outside the extended partition; stopped")
            return
        seen.add(ebr_lba)
        try:
            slots = parse_sector(read_exact(read, ebr_lba * ss, ss))
        except ShortRead:
            slots = None
        if slots is None:
            table.warnings.append(f"EBR at LBA {ebr_lba} has no signature; chain ends there")
            return
        table.metadata_extents.append((ebr_lba * ss, ss))
        logical, link = slots[0], slots[1]
        if logical.used:
            table.partitions.append(_partition(number, logical, ebr_lba + logical.start_lba, ss, prefix))
            number += 1
        if not link.used or link.type not in EXTENDED_TYPES:
            return
        ebr_lba = ext_lba + link.start_lba

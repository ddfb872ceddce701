"""Partition tables (GPT, MBR): where the partitions are and which bytes the tables occupy.

``read_partition_table`` looks at sector 0: a protective MBR (type 0xEE) means GPT, read
from the primary copy or, when that is damaged, from the backup at the last LBA.
"""

from __future__ import annotations

from imgbackup.disklabel.gpt import GptEntry, GptHeader, read_gpt
from imgbackup.disklabel.mbr import PROTECTIVE_TYPE, is_extended, parse_sector, read_mbr
from imgbackup.disklabel.types import Partition, PartitionTable, Reader, ShortRead, read_exact

__all__ = ["GptEntry", "GptHeader", "Partition", "PartitionTable", "Reader", "is_extended",
           "read_partition_table"]


def read_partition_table(read: Reader, disk_size: int, sector_size: int = 512) -> PartitionTable | None:
    """The disk's partition table, or None when it has none we can trust.

    A protective MBR whose GPT copies are both damaged gives None (not the MBR), so callers
    treat the disk as unknown and image it in full rather than trust a stub table.
    """
    try:
        slots = parse_sector(read_exact(read, 0, sector_size))
    except ShortRead:
        slots = None
    if slots is not None and any(s.type == PROTECTIVE_TYPE for s in slots):
        return read_gpt(read, disk_size, sector_size)
    if slots is None:
        # No MBR signature: a GPT without protective MBR is still worth a look.
        return read_gpt(read, disk_size, sector_size)
    return read_mbr(read, disk_size, sector_size)

"""The partition table model shared by the GPT and MBR readers.

Offsets and sizes are in bytes so callers never have to remember which sector size a
table was written with; ``sector_size`` is kept for writers that need LBAs back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Reader = Callable[[int, int], bytes]
"""``read(offset, length) -> bytes``: may return fewer bytes at the end of the source."""


@dataclass
class Partition:
    """One partition. ``type_id`` is a GPT type GUID (upper case) or a two-digit MBR type in hex."""

    number: int
    start: int
    size: int
    type_id: str
    name: str = ""
    uuid: str = ""
    attributes: int = 0
    bootable: bool = False

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass
class PartitionTable:
    """A parsed table. ``metadata_extents`` are (offset, length) byte ranges of the table itself.

    ``source`` says which copy was used ("primary", "backup" for a GPT read from its backup
    header, "mbr"); ``warnings`` lists damage found on the way (e.g. a bad primary GPT).
    """

    kind: Literal["gpt", "mbr"]
    sector_size: int
    disk_size: int
    disk_uuid: str
    partitions: list[Partition]
    first_usable_lba: int | None = None
    last_usable_lba: int | None = None
    metadata_extents: list[tuple[int, int]] = field(default_factory=list)
    source: str = "primary"
    warnings: list[str] = field(default_factory=list)


class ShortRead(ValueError):
    """A read returned fewer bytes than asked for (a truncated source), or its range is outside it."""


def read_exact(read: Reader, offset: int, length: int) -> bytes:
    """Exactly ``length`` bytes at ``offset``, or ShortRead: the one reader contract of disklabel and fsmap."""
    if offset < 0 or length < 0:
        raise ShortRead(f"no bytes at {offset} (length {length})")
    data = read(offset, length)
    if len(data) != length:
        raise ShortRead(f"short read at byte {offset} ({len(data)} of {length})")
    return bytes(data)

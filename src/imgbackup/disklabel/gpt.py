"""GUID Partition Table (UEFI spec ch. 5): header, entry array, primary and backup copies.

The primary header lives at LBA 1, the backup at the last LBA. Each header carries a
CRC32 over itself and one over the entry array; a copy is trusted only when both match.
``GptHeader`` and ``GptEntry`` round-trip through ``parse``/``pack`` so a restore can
relocate the backup copy onto a larger disk.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass

from imgbackup.disklabel.types import Partition, PartitionTable, Reader, ShortRead, read_exact

SIGNATURE = b"EFI PART"
REVISION_1_0 = 0x00010000
HEADER_FMT = "<8sIIIIQQQQ16sQIII"
HEADER_MIN = struct.calcsize(HEADER_FMT)  # 92
ENTRY_FMT = "<16s16sQQQ72s"
ENTRY_MIN = struct.calcsize(ENTRY_FMT)  # 128
MAX_ENTRY_ARRAY = 16 << 20  # refuse absurd arrays from damaged headers
ZERO_GUID = "00000000-0000-0000-0000-000000000000"


def guid_str(raw: bytes) -> str:
    """GUID bytes in the on-disk mixed-endian order -> canonical upper-case text."""
    return str(uuid.UUID(bytes_le=raw)).upper()


def guid_bytes(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


@dataclass
class GptHeader:
    """A GPT header. ``pack`` recomputes ``header_crc32`` (and ``entries_crc32`` given the array)."""

    my_lba: int
    alternate_lba: int
    first_usable_lba: int
    last_usable_lba: int
    disk_guid: str
    partition_entry_lba: int
    num_entries: int
    entry_size: int
    entries_crc32: int = 0
    header_crc32: int = 0
    revision: int = REVISION_1_0
    header_size: int = HEADER_MIN
    extra: bytes = b""  # bytes between offset 92 and header_size (covered by the CRC)

    @classmethod
    def parse(cls, raw: bytes) -> GptHeader:
        """Parse a header; raises ValueError on a bad signature, size or header CRC."""
        if len(raw) < HEADER_MIN:
            raise ValueError("GPT header too short")
        (sig, rev, hsize, hcrc, _res, my_lba, alt, first, last, dguid, elba, n, esize,
         ecrc) = struct.unpack_from(HEADER_FMT, raw)
        if sig != SIGNATURE:
            raise ValueError("no GPT signature")
        if not HEADER_MIN <= hsize <= len(raw):
            raise ValueError(f"GPT header size {hsize} out of range")
        check = bytearray(raw[:hsize])
        check[16:20] = b"\0\0\0\0"
        if zlib.crc32(check) != hcrc:
            raise ValueError("GPT header CRC mismatch")
        return cls(my_lba=my_lba, alternate_lba=alt, first_usable_lba=first, last_usable_lba=last,
                   disk_guid=guid_str(dguid), partition_entry_lba=elba, num_entries=n,
                   entry_size=esize, entries_crc32=ecrc, header_crc32=hcrc, revision=rev,
                   header_size=hsize, extra=bytes(raw[HEADER_MIN:hsize]))

    def pack(self, entries: bytes | None = None, sector_size: int = 0) -> bytes:
        """Header bytes with fresh CRCs; padded with zeros to ``sector_size`` when given."""
        if entries is not None:
            self.entries_crc32 = zlib.crc32(entries[: self.num_entries * self.entry_size])
        self.header_size = HEADER_MIN + len(self.extra)
        body = bytearray(struct.pack(
            HEADER_FMT, SIGNATURE, self.revision, self.header_size, 0, 0, self.my_lba,
            self.alternate_lba, self.first_usable_lba, self.last_usable_lba,
            guid_bytes(self.disk_guid), self.partition_entry_lba, self.num_entries,
            self.entry_size, self.entries_crc32) + self.extra)
        self.header_crc32 = zlib.crc32(body)
        body[16:20] = struct.pack("<I", self.header_crc32)
        return bytes(body).ljust(sector_size, b"\0")

    @property
    def entries_bytes(self) -> int:
        return self.num_entries * self.entry_size


@dataclass
class GptEntry:
    """One slot of the entry array; an all-zero type GUID means unused."""

    type_guid: str
    unique_guid: str
    first_lba: int
    last_lba: int
    attributes: int
    name: str
    extra: bytes = b""  # bytes past offset 128 when entry_size > 128

    @classmethod
    def parse(cls, raw: bytes) -> GptEntry:
        tguid, uguid, first, last, attrs, name = struct.unpack_from(ENTRY_FMT, raw)
        text = name.decode("utf-16-le", errors="replace").split("\0", 1)[0]
        return cls(guid_str(tguid), guid_str(uguid), first, last, attrs, text, bytes(raw[ENTRY_MIN:]))

    def pack(self) -> bytes:
        name = self.name.encode("utf-16-le")[:72].ljust(72, b"\0")
        return struct.pack(ENTRY_FMT, guid_bytes(self.type_guid), guid_bytes(self.unique_guid),
                           self.first_lba, self.last_lba, self.attributes, name) + self.extra

    @property
    def used(self) -> bool:
        return self.type_guid != ZERO_GUID


def parse_entries(raw: bytes, header: GptHeader) -> list[GptEntry]:
    size = header.entry_size
    return [GptEntry.parse(raw[i * size:(i + 1) * size]) for i in range(header.num_entries)]


def _read_copy(read: Reader, lba: int, sector_size: int,
               disk_size: int) -> tuple[GptHeader, bytes]:
    """Read and verify one header + its entry array; raises ValueError naming the damage."""
    try:
        raw = read_exact(read, lba * sector_size, sector_size)
    except ShortRead:
        raise ValueError(f"cannot read LBA {lba}") from None
    hdr = GptHeader.parse(raw)
    if hdr.my_lba != lba:
        raise ValueError(f"header at LBA {lba} says it is at LBA {hdr.my_lba}")
    if hdr.entry_size < ENTRY_MIN or hdr.entry_size % 8 or not 0 < hdr.entries_bytes <= MAX_ENTRY_ARRAY:
        raise ValueError("implausible entry array geometry")
    try:
        entries = read_exact(read, hdr.partition_entry_lba * sector_size, hdr.entries_bytes)
    except ShortRead:
        raise ValueError("entry array outside the disk") from None
    if zlib.crc32(entries) != hdr.entries_crc32:
        raise ValueError("entry array CRC mismatch")
    if hdr.first_usable_lba > hdr.last_usable_lba or (hdr.last_usable_lba + 1) * sector_size > disk_size:
        raise ValueError("usable LBA range outside the disk")
    return hdr, entries


def _extents(hdr: GptHeader, sector_size: int) -> list[tuple[int, int]]:
    array_len = -(-hdr.entries_bytes // sector_size) * sector_size
    return [(hdr.my_lba * sector_size, sector_size),
            (hdr.partition_entry_lba * sector_size, array_len)]


def read_gpt(read: Reader, disk_size: int, sector_size: int = 512) -> PartitionTable | None:
    """Read the GPT, preferring the primary copy and falling back to the backup at the last LBA.

    Returns None when neither copy is intact. Damage is listed in ``warnings``.
    """
    last_lba = disk_size // sector_size - 1
    warnings: list[str] = []
    copies: list[tuple[str, GptHeader, bytes]] = []
    for source, lba in (("primary", 1), ("backup", last_lba)):
        if lba < 1 or (source == "backup" and lba == 1):
            continue
        try:
            hdr, entries = _read_copy(read, lba, sector_size, disk_size)
        except ValueError as exc:
            warnings.append(f"{source} GPT header at LBA {lba} unusable: {exc}")
            continue
        copies.append((source, hdr, entries))
    if not copies:
        return None
    source, hdr, entries = copies[0]
    extents = [(0, sector_size)]  # protective MBR
    for _, other, _ in copies:
        extents += _extents(other, sector_size)
    if len(copies) == 1 and source == "primary" and hdr.alternate_lba != last_lba:
        warnings.append(f"backup GPT header expected at LBA {last_lba}, header says {hdr.alternate_lba}")
    parts = _partitions(parse_entries(entries, hdr), sector_size)
    return PartitionTable(kind="gpt", sector_size=sector_size, disk_size=disk_size,
                          disk_uuid=hdr.disk_guid, partitions=parts,
                          first_usable_lba=hdr.first_usable_lba, last_usable_lba=hdr.last_usable_lba,
                          metadata_extents=sorted(set(extents)), source=source, warnings=warnings)


def _partitions(entries: list[GptEntry], sector_size: int) -> list[Partition]:
    parts = []
    for i, e in enumerate(entries):
        if not e.used or e.last_lba < e.first_lba:
            continue
        parts.append(Partition(number=i + 1, start=e.first_lba * sector_size,
                               size=(e.last_lba - e.first_lba + 1) * sector_size, type_id=e.type_guid,
                               name=e.name, uuid=e.unique_guid, attributes=e.attributes,
                               bootable=bool(e.attributes & 0b100)))
    return parts

"""Adapt a partition table when an image of N sectors is written onto a disk of M sectors.

A GPT names the disk's size three times: the protective MBR's 0xEE entry, the primary
header's ``alternate_lba``/``last_usable_lba``, and the backup copy that must sit in the
last sectors. After a restore onto a different-sized disk all three are wrong, firmware and
``sgdisk -v`` complain, and the space past the old end is unusable. ``relocate_gpt`` returns
the corrected primary region and the backup copy to write at its new place; optionally it
grows the last partition to the end (aligned down to 1 MiB) or shrinks it to a given LBA.
``resize_mbr`` does the same for an MS-DOS table (only the last primary partition moves).

``relocate_gpt`` and ``resize_mbr`` take and return bytes; ``apply_gpt_relocation`` and
``apply_mbr_resize`` do the reads and writes on an open disk or image file, and also clear
the stale backup GPT header a restore onto a larger disk leaves at ``old_sectors - 1``.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

from imgbackup.disklabel.gpt import GptHeader, parse_entries
from imgbackup.disklabel.mbr import ENTRIES_OFFSET, EXTENDED_TYPES, PROTECTIVE_TYPE, parse_sector

ALIGN_BYTES = 1 << 20  # partitions end on a MiB, as parted and sgdisk align them (4K sectors, SSD pages)
MBR_MAX = 0xFFFFFFFF
MAX_PRIMARY_REGION = 64 << 20  # refuse absurd first_usable_lba values from a damaged header


@dataclass
class GptRewrite:
    """Bytes to write on the new disk.

    ``primary`` goes at offset 0 (same length as the region passed in), ``backup`` (entry
    array then backup header) at ``backup_entries_offset``. ``last_partition_new_end_lba``
    is the last partition's new inclusive end LBA, or None when it was left as it was.
    """

    primary: bytes
    backup_entries_offset: int
    backup: bytes
    last_partition_new_end_lba: int | None


@dataclass
class MbrRewrite:
    """The new sector 0 and the last primary partition's new inclusive end LBA (None: unchanged)."""

    mbr: bytes
    last_partition_new_end_lba: int | None


def _align_end(limit_lba: int, sector_size: int) -> int:
    """The largest inclusive end LBA <= ``limit_lba`` whose next sector starts a MiB."""
    per_mib = max(1, ALIGN_BYTES // sector_size)
    return (limit_lba + 1) // per_mib * per_mib - 1


def _chs(lba: int) -> bytes:
    """CHS triple for ``lba`` with the usual 255 heads / 63 sectors, saturated at 1023/254/63."""
    cyl, rem = divmod(lba, 255 * 63)
    if cyl > 1023:
        return b"\xfe\xff\xff"
    head, sec = divmod(rem, 63)
    return bytes((head, ((cyl >> 2) & 0xC0) | (sec + 1), cyl & 0xFF))


def _fix_protective_mbr(sector0: bytearray, new_sectors: int) -> None:
    """Make the 0xEE entry cover LBA 1 .. end (capped at 2^32-1 sectors), as UEFI asks."""
    slots = parse_sector(bytes(sector0[:512]))
    if slots is None or not any(s.type == PROTECTIVE_TYPE for s in slots):
        raise ValueError("sector 0 holds no protective MBR (no 0xEE entry)")
    for i, slot in enumerate(slots):
        if slot.type != PROTECTIVE_TYPE:
            continue
        off = ENTRIES_OFFSET + 16 * i
        count = min(new_sectors - slot.start_lba, MBR_MAX)
        sector0[off + 5:off + 8] = _chs(slot.start_lba + count - 1)
        struct.pack_into("<I", sector0, off + 12, count)


def _new_last_end(first: int, last: int, new_last_usable: int, sector_size: int,
                  grow: bool, shrink_to_lba: int | None) -> int | None:
    """The last partition's new end LBA, or None to keep it; ValueError when it cannot fit."""
    if shrink_to_lba is not None:
        if not first <= shrink_to_lba <= last:
            raise ValueError(f"shrink_to_lba {shrink_to_lba} is outside the last partition "
                             f"({first}..{last})")
        if shrink_to_lba > new_last_usable:
            raise ValueError(f"shrink_to_lba {shrink_to_lba} is past the new last usable LBA "
                             f"{new_last_usable}")
        return shrink_to_lba if shrink_to_lba != last else None
    if grow:
        end = _align_end(new_last_usable, sector_size)
        if end > last:
            return end
    return None


def _check_fits(ends: list[tuple[int, int]], limit: int, what: str) -> None:
    for number, end in ends:
        if end > limit:
            raise ValueError(f"partition {number} ends at LBA {end}, past the new {what} {limit}")


def relocate_gpt(primary: bytes, old_sectors: int, new_sectors: int, sector_size: int = 512,
                 grow_last_partition: bool = False, shrink_to_lba: int | None = None) -> GptRewrite:
    """Rewrite a GPT (``primary`` = LBA 0 .. first_usable-1) for a disk of ``new_sectors``.

    Raises ValueError for a damaged table or when a partition would end past the new last
    usable LBA (shrink the last one first with ``shrink_to_lba``, an inclusive end LBA).
    """
    ss = sector_size
    if len(primary) < 2 * ss:
        raise ValueError("primary GPT region shorter than two sectors")
    hdr = GptHeader.parse(primary[ss:2 * ss])
    if hdr.my_lba != 1:
        raise ValueError(f"primary GPT header says it is at LBA {hdr.my_lba}")
    e_off, e_len = hdr.partition_entry_lba * ss, hdr.entries_bytes
    if hdr.partition_entry_lba < 2 or e_off + e_len > len(primary) or e_len <= 0:
        raise ValueError("GPT entry array lies outside the primary region passed in")
    entries_raw = bytearray(primary[e_off:e_off + e_len])
    if zlib.crc32(entries_raw) != hdr.entries_crc32:
        raise ValueError("GPT entry array CRC mismatch")
    if hdr.last_usable_lba >= old_sectors:
        raise ValueError(f"GPT last usable LBA {hdr.last_usable_lba} is beyond the old disk "
                         f"({old_sectors} sectors)")
    entry_sectors = -(-e_len // ss)
    new_last = new_sectors - 1
    backup_lba = new_last - entry_sectors
    new_last_usable = backup_lba - 1
    if new_last_usable < hdr.first_usable_lba:
        raise ValueError(f"a disk of {new_sectors} sectors cannot hold this GPT")

    entries = parse_entries(bytes(entries_raw), hdr)
    used = [(i, e) for i, e in enumerate(entries) if e.used]
    new_end = None
    if used:
        idx, last = max(used, key=lambda ie: ie[1].last_lba)
        new_end = _new_last_end(last.first_lba, last.last_lba, new_last_usable, ss,
                                grow_last_partition, shrink_to_lba)
        if new_end is not None:
            last.last_lba = new_end
            entries_raw[idx * hdr.entry_size:(idx + 1) * hdr.entry_size] = last.pack()
    elif shrink_to_lba is not None:
        raise ValueError("shrink_to_lba given but the GPT has no partitions")
    _check_fits([(i + 1, e.last_lba) for i, e in used], new_last_usable, "last usable LBA")

    out = bytearray(primary)
    _fix_protective_mbr(out, new_sectors)
    hdr.alternate_lba, hdr.last_usable_lba = new_last, new_last_usable
    out[ss:2 * ss] = hdr.pack(bytes(entries_raw), ss)
    out[e_off:e_off + e_len] = entries_raw
    hdr.my_lba, hdr.alternate_lba, hdr.partition_entry_lba = new_last, 1, backup_lba
    backup = bytes(entries_raw).ljust(entry_sectors * ss, b"\0") + hdr.pack(bytes(entries_raw), ss)
    return GptRewrite(bytes(out), backup_lba * ss, backup, new_end)


def resize_mbr(mbr: bytes, old_sectors: int, new_sectors: int, sector_size: int = 512,
               grow_last_partition: bool = True, shrink_to_lba: int | None = None) -> MbrRewrite:
    """Fit an MS-DOS table (sector 0) to a disk of ``new_sectors``; grow/shrink the last primary.

    The last primary partition is the one that ends last; an extended container there is
    refused for grow/shrink (its logical partitions would need their EBRs rewritten).
    """
    slots = parse_sector(mbr[:512])
    if slots is None:
        raise ValueError("sector 0 has no MBR signature")
    if any(s.type == PROTECTIVE_TYPE for s in slots):
        raise ValueError("this is a protective MBR: use relocate_gpt")
    used = [(i, s) for i, s in enumerate(slots) if s.used]
    limit = min(new_sectors, MBR_MAX + 1) - 1
    out = bytearray(mbr)
    new_end = None
    if used:
        idx, last = max(used, key=lambda ie: ie[1].start_lba + ie[1].num_sectors)
        first, end = last.start_lba, last.start_lba + last.num_sectors - 1
        resizing = shrink_to_lba is not None or (grow_last_partition and _align_end(limit, sector_size) > end)
        if resizing and last.type in EXTENDED_TYPES:
            raise ValueError("the last partition is an extended container; resizing it is not supported")
        new_end = _new_last_end(first, end, limit, sector_size, grow_last_partition, shrink_to_lba)
        if new_end is not None:
            off = ENTRIES_OFFSET + 16 * idx
            struct.pack_into("<I", out, off + 12, new_end - first + 1)
            out[off + 5:off + 8] = _chs(new_end)
            last.num_sectors = new_end - first + 1
    elif shrink_to_lba is not None:
        raise ValueError("shrink_to_lba given but the MBR has no partitions")
    _check_fits([(i + 1, s.start_lba + s.num_sectors - 1) for i, s in used], new_sectors - 1, "last LBA")
    return MbrRewrite(bytes(out), new_end)


def apply_gpt_relocation(fd: int, old_sectors: int, new_sectors: int, sector_size: int = 512,
                         grow_last_partition: bool = False,
                         shrink_to_lba: int | None = None) -> GptRewrite:
    """Relocate the GPT on an open disk/image ``fd`` (already holding the old image) in place.

    Writes the new primary region and backup copy, zeroes the old backup header when it is
    not part of the new backup copy (so no second, stale GPT is found there), and fsyncs.
    """
    ss = sector_size
    hdr = GptHeader.parse(os.pread(fd, ss, ss))
    region = hdr.first_usable_lba * ss
    if not 2 * ss <= region <= MAX_PRIMARY_REGION:
        raise ValueError(f"implausible first usable LBA {hdr.first_usable_lba}")
    rw = relocate_gpt(os.pread(fd, region, 0), old_sectors, new_sectors, ss,
                      grow_last_partition, shrink_to_lba)
    _pwrite_all(fd, rw.primary, 0)
    _pwrite_all(fd, rw.backup, rw.backup_entries_offset)
    stale = (old_sectors - 1) * ss
    if 2 * ss <= stale < rw.backup_entries_offset:
        old = os.pread(fd, ss, stale)
        if old[:8] == b"EFI PART":
            _pwrite_all(fd, bytes(ss), stale)
    os.fsync(fd)
    return rw


def apply_mbr_resize(fd: int, old_sectors: int, new_sectors: int, sector_size: int = 512,
                     grow_last_partition: bool = True, shrink_to_lba: int | None = None) -> MbrRewrite:
    """``resize_mbr`` on sector 0 of an open disk/image ``fd``, written back and fsynced."""
    rw = resize_mbr(os.pread(fd, 512, 0), old_sectors, new_sectors, sector_size,
                    grow_last_partition, shrink_to_lba)
    _pwrite_all(fd, rw.mbr, 0)
    os.fsync(fd)
    return rw


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n

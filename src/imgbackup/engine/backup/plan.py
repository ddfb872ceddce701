"""What a backup reads: the slots to read, and what the others are without reading them.

Three things let a backup skip reading: the filesystems' used-block maps (unused slots), holes of
sparse files (zero slots), and an external change list (unchanged slots are taken from the parent).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from imgbackup._core import bitmap
from imgbackup.device.source import Source, SourceReadError, data_extents
from imgbackup.engine.slots import byte_extents
from imgbackup.format.imageindex import ImageIndex, bad_ranges
from imgbackup.format.layout import ID_SIZE, SLOT_UNUSED, SLOT_ZERO

FS_BLOCK = 4096   # the used map's block: the page size, and the smallest block ext, xfs and NTFS use by default


@dataclass
class ReadPlan:
    read: np.ndarray                  # bool per slot: read this slot
    kinds: np.ndarray                 # uint8 per slot: the kind of slots not read
    ids: np.ndarray                   # (slots, 32): ids of slots not read (from the parent)
    from_parent: np.ndarray           # bool per slot: taken from the parent on the change list's word
    used_bits: np.ndarray | None = None   # packed per 4 KiB block, 1 = used (None: all used)
    warnings: list[str] = field(default_factory=list)
    regions: list[dict] = field(default_factory=list)
    chunk: int = 0                    # slot size in bytes: the repository's chunk size (set by plan_reads)

    def ranges(self, chunk: int, size: int) -> list[tuple[int, int]]:
        """Byte ranges of the slots to read, merged."""
        return byte_extents(self.read, chunk, size)

    def _used_flags(self, offset: int, length: int) -> np.ndarray:
        first = offset // FS_BLOCK
        n = (length + FS_BLOCK - 1) // FS_BLOCK
        used = np.unpackbits(self.used_bits[first >> 3 : ((first + n + 7) >> 3) + 1], bitorder="little")
        return used[first & 7 : (first & 7) + n].astype(bool)

    def has_unused(self, offset: int, length: int) -> bool:
        """Whether any 4 KiB block of the range is unused by every filesystem."""
        return self.used_bits is not None and not self._used_flags(offset, length).all()

    def mask_unused(self, offset: int, data: memoryview) -> None:
        """Zero the 4 KiB blocks of ``data`` (at source ``offset``) that no filesystem uses."""
        if self.used_bits is None:
            return
        n = (len(data) + FS_BLOCK - 1) // FS_BLOCK
        used = self._used_flags(offset, len(data))
        if used.all():
            return
        buf = np.frombuffer(data, np.uint8)
        full = len(data) // FS_BLOCK
        blocks = buf[: full * FS_BLOCK].reshape(full, FS_BLOCK)
        blocks[~used[:full]] = 0
        if full < n and not used[full]:
            buf[full * FS_BLOCK :] = 0


class UnreadableMetadata(ValueError):
    """A rescue run could not read filesystem metadata: a ValueError, so the map's parsers give the
    region up and image it in full (fsmap fails closed on what it cannot read)."""


def _used_map(source: Source, size: int, rescue: bool = False) -> tuple[np.ndarray, list[dict], list[str]]:
    from imgbackup.fsmap import read_used_map
    from imgbackup.fsmap.base import all_used

    def read(offset: int, length: int) -> bytes:
        buf = bytearray(length)
        try:
            got = source.read_into(offset, memoryview(buf))
        except SourceReadError as exc:
            if rescue and exc.media_error:
                raise UnreadableMetadata(f"unreadable sectors at byte {exc.offset}") from None
            raise
        return bytes(buf[:got])

    try:
        used = read_used_map(read, size, source.logical_sector_size, FS_BLOCK)
    except UnreadableMetadata as exc:  # the partition table itself: the whole disk is imaged
        region = {"start": 0, "size": size, "partition": None, "fstype": None, "mode": "full", "used_bytes": size,
                  "warning": f"partition table unreadable ({exc}): disk imaged in full"}
        return all_used((size + FS_BLOCK - 1) // FS_BLOCK), [region], [f"(whole source): {region['warning']}"]
    regions = [{"start": r.start, "size": r.size, "partition": r.partition, "fstype": r.fstype,
                "mode": r.mode, "used_bytes": r.used_bytes, "warning": r.warning} for r in used.regions]
    warnings = [f"{'partition ' + str(r.partition) if r.partition is not None else 'the whole source'}: {r.warning}"
                for r in used.regions if r.warning]
    return used.bits, regions, warnings


def _hole_slots(path: str, size: int, chunk: int, slots: int) -> np.ndarray | None:
    """Slots lying wholly in holes of a sparse file (None when not a regular file)."""
    extents = data_extents(path)
    if extents is None:
        return None
    has_data = np.zeros(slots, bool)
    for off, length in extents:
        if length:
            has_data[off // chunk : (min(off + length, size) - 1) // chunk + 1] = True
    return ~has_data


def _bad_slots(parent: ImageIndex, slots: int) -> np.ndarray:
    """Slots holding sectors the parent could not read (its ``bad_ranges``)."""
    mask = np.zeros(slots, bool)
    chunk = parent.chunk_size
    for off, length in bad_ranges(parent.meta):
        mask[off // chunk:(off + length - 1) // chunk + 1] = True
    return mask


def plan_reads(source: Source, path: str, chunk: int, parent: ImageIndex | None,
               all_blocks: bool, change_mask: np.ndarray | None, rescue: bool = False) -> ReadPlan:
    """What to read. A parent's unreadable ranges are read again even where a change list says
    nothing changed: the sectors may read now, and the parent holds only zeros for them."""
    size = source.size
    slots = (size + chunk - 1) // chunk
    plan = ReadPlan(np.ones(slots, bool), np.zeros(slots, np.uint8), np.zeros((slots, ID_SIZE), np.uint8),
                    np.zeros(slots, bool), chunk=chunk)
    holes = _hole_slots(path, size, chunk, slots)
    if holes is not None:
        plan.read &= ~holes
        plan.kinds[holes] = SLOT_ZERO
    if not all_blocks:
        plan.used_bits, plan.regions, plan.warnings = _used_map(source, size, rescue)
        per_slot = bitmap.coarsen(plan.used_bits, (size + FS_BLOCK - 1) // FS_BLOCK, chunk // FS_BLOCK)
        slot_used = np.unpackbits(per_slot, bitorder="little")[:slots].astype(bool)
        unused = ~slot_used & plan.read
        plan.read &= slot_used
        plan.kinds[unused] = SLOT_UNUSED
    if change_mask is not None and parent is not None:
        skip = plan.read & ~change_mask & (parent.kinds != SLOT_UNUSED)
        plan.read &= change_mask
        plan.from_parent = skip
        plan.kinds[skip] = parent.kinds[skip]
        plan.ids[skip] = parent.ids_by_slot()[skip]
        again = skip & _bad_slots(parent, slots)
        plan.read |= again
        plan.from_parent &= ~again
        plan.kinds[again] = SLOT_ZERO
        plan.ids[again] = 0
    return plan

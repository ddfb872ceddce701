"""Restore's write pass: fetch, open and write an image's chunks, clear what should be zero, check.

Each chunk is decrypted, decompressed and checked against its keyed id before it is written; the
written ids together must give the index digest. The disk-level order (pre-flight, table) is
run.py's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from imgbackup._core import scan
from imgbackup.engine.restore.target import zero_out
from imgbackup.engine.slots import byte_extents, slot_runs
from imgbackup.errors import IntegrityError, VerificationFailed
from imgbackup.format.imageindex import ImageIndex
from imgbackup.format.layout import SLOT_DATA
from imgbackup.repository.chunkreader import ChunkReader

WRITEBACK_BYTES = 64 << 20       # start writeback this often, so the final fsync has little left (measured)
ZERO_SCAN_BYTES = 16 << 20       # target bytes read per pass when clearing what must be zero
DELTA_BATCH_CHUNKS = 16          # --delta reads and hashes the target this many chunks at a time


def clear_unwritten(fd: int, image: ImageIndex, discard: bool, window: tuple[int, int] | None = None,
                    shift: int = 0) -> int:
    """Make zero/unused slots (clipped to ``window``, written at offset - ``shift``) read as zeros.

    Writes only where the target is not already zero, so a blank or trimmed disk costs reads only.
    """
    lo, hi = window or (0, image.size)
    zeroed = 0
    for start, length in byte_extents(image.kinds != SLOT_DATA, image.chunk_size, image.size):
        start, end = max(start, lo) - shift, min(start + length, hi) - shift
        if end <= start:
            continue
        if discard and zero_out(fd, start, end - start):
            zeroed += end - start
            continue
        zeroed += zero_nonzero(fd, start, end)
    return zeroed


def zero_nonzero(fd: int, start: int, end: int) -> int:
    """Overwrite the non-zero 4 KiB blocks of ``fd`` in [start, end) with zeros; bytes written."""
    zeroed = 0
    pos = start
    while pos < end:
        n = min(ZERO_SCAN_BYTES, end - pos)
        current = os.pread(fd, n, pos)
        flags = scan.zero_blocks(current, 4096)
        for b_first, b_count in slot_runs(flags == 0):
            off, span = b_first * 4096, min(b_count * 4096, len(current) - b_first * 4096)
            os.pwrite(fd, bytes(span), pos + off)
            zeroed += span
        pos += n
    return zeroed


def check_digest(image: ImageIndex, verified: np.ndarray, where: str) -> None:
    """Every data slot must have been verified, and together they must give the image's digest."""
    check = ImageIndex(image.meta, image.kinds, verified)
    if check.content_digest() != image.meta["content_digest"]:
        raise VerificationFailed(f"restored content of {where} does not match the image digest")


def start_writeback(fd: int) -> None:
    """Start writing dirty pages now, without waiting (POSIX_FADV_DONTNEED does that on Linux).

    Otherwise the kernel keeps up to dirty_background_ratio of RAM (GBs here) dirty and the final
    fsync writes it all at once, after the CPU work is done; this overlaps disk and CPU instead.
    """
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def check_lengths(reader: ChunkReader, image: ImageIndex) -> None:
    """Before the first write: each data slot's chunk is in the index with exactly the slot's length
    (every slot holds chunk_size bytes but the last), so no entry can make a restore write past its slot
    or leave part of it stale. Index lookups only (~0.3 s per million slots)."""
    last = image.slots - 1
    for row, slot in enumerate(image.data_slot_numbers().tolist()):
        cid = bytes(image.ids[row])
        length = reader.locate(cid).raw_length
        if length != (image.chunk_size if slot != last else image.slot_length(slot)):
            raise IntegrityError(f"chunk {cid.hex()[:16]} is {length} bytes in the chunk index, but slot {slot} "
                                 f"of image {image.id} holds {image.slot_length(slot)}")


def write_slots(fd: int, image: ImageIndex, reader: ChunkReader, pool: ThreadPoolExecutor,
                rows: np.ndarray | None = None, window: tuple[int, int] | None = None, shift: int = 0,
                progress: Callable[[int], None] | None = None) -> tuple[int, np.ndarray]:
    """Fetch, open and write data slots in order, read ahead on the pool (``ChunkReader.stream``:
    neighbouring chunks in one ranged read, several reads in flight, the bytes ahead bounded).

    ``rows`` picks data slots by their position in ``image.ids`` (default: all); only the part
    of each slot inside the image byte range ``window`` is written, at image offset - ``shift``.
    Returns bytes written and the ids array with the rows that were fetched (keyed hash checked).
    """
    slots = image.data_slot_numbers()
    rows = np.arange(len(slots)) if rows is None else rows
    lo, hi = window or (0, image.size)
    cs = image.chunk_size
    verified = np.zeros_like(image.ids)
    starts = slots[rows].astype(np.int64) * cs
    rows = rows[(starts < hi) & (starts + cs > lo)]
    written = 0
    unflushed = 0
    for row, plain in zip(rows.tolist(), reader.stream((bytes(image.ids[r]) for r in rows), pool), strict=True):
        base = int(slots[row]) * cs
        if len(plain) != image.slot_length(int(slots[row])):   # an index entry's length lies: never write it
            raise IntegrityError(f"chunk {bytes(image.ids[row]).hex()[:16]} holds {len(plain)} bytes, but its "
                                 f"slot {int(slots[row])} of image {image.id} has {image.slot_length(int(slots[row]))}")
        a, b = max(lo - base, 0), min(hi - base, len(plain))
        if b > a:
            os.pwrite(fd, memoryview(plain)[a:b], base + a - shift)
            written += b - a
            unflushed += b - a
            if unflushed >= WRITEBACK_BYTES:
                start_writeback(fd)
                unflushed = 0
        verified[row] = image.ids[row]
        if progress:
            progress(len(plain))
    return written, verified


def write_delta(fd: int, image: ImageIndex, key: bytes, reader: ChunkReader, pool: ThreadPoolExecutor,
                progress) -> tuple[int, int, int, np.ndarray]:
    """Read the target chunk by chunk; write only data chunks whose id differs, zero what should be."""
    cs = image.chunk_size
    full = image.ids_by_slot()
    rank = np.cumsum(image.kinds == SLOT_DATA) - 1
    verified = np.zeros_like(image.ids)
    stale: list[np.ndarray] = []
    read = zeroed = 0
    step = DELTA_BATCH_CHUNKS * cs
    for pos in range(0, image.size, step):
        buf = os.pread(fd, min(step, image.size - pos), pos)
        read += len(buf)
        kinds, ids = scan.scan_chunks(buf, cs, key)
        s0 = pos // cs
        want = image.kinds[s0:s0 + len(kinds)]
        same = np.all(ids == full[s0:s0 + len(kinds)], axis=1) & (kinds == scan.DATA)
        is_data = want == SLOT_DATA
        verified[rank[s0:s0 + len(kinds)][is_data & same]] = full[s0:s0 + len(kinds)][is_data & same]
        stale.append(rank[s0:s0 + len(kinds)][is_data & ~same])
        for j in np.flatnonzero(~is_data & (kinds != scan.ZERO)):
            a = (s0 + int(j)) * cs
            zeroed += zero_nonzero(fd, a, min(a + cs, image.size))
    rows = np.concatenate(stale) if stale else np.zeros(0, np.int64)
    written, fetched = write_slots(fd, image, reader, pool, rows=rows, progress=progress)
    verified[rows] = fetched[rows]
    return read, written, zeroed, verified

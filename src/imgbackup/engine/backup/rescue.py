"""``backup --rescue``: image a failing disk the ddrescue way, and keep a map of what could not be read.

First pass: the normal large sequential reads; a segment that fails is skipped at once (a dying
disk is best read where it still works, while it still works) and postponed. After the pass,
each postponed segment is read again in ever smaller pieces — a failed read is split in
``SPLIT`` parts, down to one logical sector — through ``Source.read_sectors`` (O_DIRECT, so a bad
sector fails alone). Sectors that still fail are tried ``retries`` more times, then stored as
zeros and listed in the image's ``bad_ranges``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from imgbackup.device.source import Source, SourceReadError
from imgbackup.errors import SourceError

SPLIT = 16        # pieces per failed read: 8 MiB -> 512 KiB -> 32 KiB -> 2 KiB -> sectors, 5 levels
DEFAULT_RETRIES = 2


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) ranges sorted, with touching or overlapping ones joined."""
    out: list[tuple[int, int]] = []
    for off, length in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_len = out[-1]
            out[-1] = (last_off, max(last_len, off + length - last_off))
        elif length > 0:
            out.append((off, length))
    return out


@dataclass
class Rescue:
    """How hard to try, and what stayed unreadable (merged byte ranges, whole sectors)."""

    retries: int = DEFAULT_RETRIES
    bad: list[tuple[int, int]] = field(default_factory=list)
    attempts: int = 0

    def _attempt(self, source: Source, view: memoryview, base: int, offset: int, length: int) -> bool:
        """Read [offset, offset+length) into ``view`` (which holds the bytes from ``base``)."""
        self.attempts += 1
        got = 0
        try:
            while got < length:
                n = source.read_sectors(offset + got, view[offset - base + got:offset - base + length])
                if n == 0:
                    raise SourceError(f"{source.path} ended early: nothing at byte {offset + got}")
                got += n
        except SourceReadError as exc:
            if not exc.media_error:
                raise
            return False
        return True

    def recover(self, source: Source, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the source's bytes from ``offset``: all that can be read, zeros elsewhere."""
        sector = source.logical_sector_size
        todo = [(offset, len(view))]
        bad: list[tuple[int, int]] = []
        while todo:
            off, length = todo.pop()
            if self._attempt(source, view, offset, off, length):
                continue
            if length <= sector:
                bad.append((off, length))
                continue
            piece = max(sector, -(-length // SPLIT // sector) * sector)
            todo.extend(reversed([(o, min(piece, off + length - o)) for o in range(off, off + length, piece)]))
        for _ in range(self.retries):
            bad = [(o, n) for o, n in bad if not self._attempt(source, view, offset, o, n)]
        bad = merge_ranges(bad)
        for off, length in bad:
            view[off - offset:off - offset + length] = bytes(length)
        self.bad = merge_ranges(self.bad + bad)

    def needed(self, used_bits: np.ndarray | None, block: int) -> tuple[list[tuple[int, int]], int]:
        """The bad ranges the image needs, and the bytes left out because no filesystem uses them.

        A bad sector in a block no filesystem uses is stored as zeros anyway (used-block mode
        zeroes such blocks), so nothing of the source is lost there.
        """
        if used_bits is None:
            return list(self.bad), 0
        keep: list[tuple[int, int]] = []
        for off, length in self.bad:
            first, last = off // block, (off + length - 1) // block
            bits = np.unpackbits(used_bits[first >> 3:(last >> 3) + 1], bitorder="little")
            flags = bits[first & 7:(first & 7) + last - first + 1].astype(bool)
            for i in np.flatnonzero(flags).tolist():
                lo, hi = max(off, (first + i) * block), min(off + length, (first + i + 1) * block)
                keep.append((lo, hi - lo))
        keep = merge_ranges(keep)
        return keep, sum(n for _, n in self.bad) - sum(n for _, n in keep)

"""The one interface every filesystem module implements, and packed-bitmap helpers.

A filesystem module exposes ``probe(read, offset, length) -> bool`` and
``used_blocks(read, offset, length) -> FsUsage``. ``used_blocks`` raises ``FsMapUnsure``
whenever it cannot vouch for a block being free, or ``ShortRead`` (from ``read_exact``) on a
truncated source: the caller then images the whole region.
Bitmaps are packed LSB-first (bit i in byte i >> 3 at position i & 7), 1 = used, the
same layout as ``imgbackup._core.bitmap``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from imgbackup._core import bitmap
from imgbackup._core.bitmap import clear_range, set_range
from imgbackup.disklabel.types import Reader, ShortRead, read_exact

__all__ = ["FsMapUnsure", "FsUsage", "Reader", "ShortRead", "all_used", "clear_range", "popcount", "read_exact",
           "set_range", "shift_up", "zero_runs"]

RUN_CHUNK_BITS = 1 << 26  # 64 Mi bits per pass: 64 MiB of unpacked bytes at most


class FsMapUnsure(Exception):
    """The filesystem cannot be trusted to say which blocks are free; ``str()`` is the reason."""


@dataclass
class FsUsage:
    """Used blocks of one filesystem, relative to its first byte. Blocks past ``nblocks`` are used."""

    block_size: int
    nblocks: int
    bits: np.ndarray

    @property
    def used_count(self) -> int:
        return popcount(self.bits, self.nblocks)


def all_used(nbits: int) -> np.ndarray:
    """A packed bitmap of ``nbits`` set bits (padding bits past ``nbits`` are zero)."""
    bits = np.full((nbits + 7) // 8, 0xFF, dtype=np.uint8)
    if nbits % 8:
        bits[-1] = (1 << (nbits % 8)) - 1
    return bits


def popcount(bits: np.ndarray, nbits: int) -> int:
    """Set bits among the first ``nbits``."""
    return int(bitmap.count(bits, nbits)) if nbits else 0


def zero_runs(bits: np.ndarray, nbits: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(starts, lengths) of the runs of clear bits among the first ``nbits``, in chunks.

    A run crossing a chunk edge comes out as two runs; callers that round inwards lose at
    most one block per edge, which errs on the side of "used".
    """
    for base in range(0, nbits, RUN_CHUNK_BITS):
        n = min(RUN_CHUNK_BITS, nbits - base)
        piece = np.invert(bits[base >> 3:(base + n + 7) >> 3])
        found = bitmap.runs(piece, n)
        if len(found):
            yield found[:, 0] + base, found[:, 1]


def shift_up(bits: np.ndarray, nbits: int, shift: int, fill: int = 1) -> np.ndarray:
    """A bitmap of ``nbits + shift`` bits: ``shift`` bits of ``fill`` then ``bits``."""
    un = np.unpackbits(bits, bitorder="little")[:nbits]
    head = np.full(shift, fill, dtype=np.uint8)
    return np.packbits(np.concatenate((head, un)), bitorder="little")

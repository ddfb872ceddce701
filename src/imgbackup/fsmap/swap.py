"""Linux swap: only the header page matters; the rest is scratch space nobody needs back.

A swap area holding a hibernation image carries a different signature ("S1SUSPEND" and
friends) and so is not recognised here: it is then imaged in full, as it should be.
"""

from __future__ import annotations

from imgbackup.fsmap.base import FsMapUnsure, FsUsage, Reader, all_used, clear_range

SIGNATURES = (b"SWAPSPACE2", b"SWAP-SPACE")
PAGE_SIZES = (4096, 8192, 16384, 65536)


def _page_size(read: Reader, offset: int, length: int) -> int | None:
    for page in PAGE_SIZES:
        if page * 2 <= length and bytes(read(offset + page - 10, 10)) in SIGNATURES:
            return page
    return None


def probe(read: Reader, offset: int, length: int) -> bool:
    """True when a swap signature ends the first page (any common page size)."""
    return _page_size(read, offset, length) is not None


def used_blocks(read: Reader, offset: int, length: int) -> FsUsage:
    """Only the first page (the header, with label and UUID) is used."""
    page = _page_size(read, offset, length)
    if page is None:
        raise FsMapUnsure("no swap signature")
    n = length // page
    bits = all_used(n)
    clear_range(bits, 1, n - 1)
    return FsUsage(block_size=page, nblocks=n, bits=bits)

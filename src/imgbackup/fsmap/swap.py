"""Linux swap: only the header page matters; the swap pages are scratch space nobody needs back.

Only a version-1 "SWAPSPACE2" header in little-endian order is trusted; pages past its
``last_page`` are not swap and stay used. A swap area holding a hibernation image carries
a different signature ("S1SUSPEND" and friends), is not recognised here, and so is imaged
in full, as it must be.
"""

from __future__ import annotations

import struct

from imgbackup.fsmap.base import FsMapUnsure, FsUsage, Reader, all_used, clear_range, read_exact

SIGNATURE = b"SWAPSPACE2"
PAGE_SIZES = (4096, 8192, 16384, 65536)
HEADER_OFFSET = 1024  # after the boot-block bytes: version u32, last_page u32, nr_badpages u32


def _page_size(read: Reader, offset: int, length: int) -> int | None:
    for page in PAGE_SIZES:
        if page * 2 <= length and bytes(read(offset + page - 10, 10)) == SIGNATURE:
            return page
    return None


def probe(read: Reader, offset: int, length: int) -> bool:
    """True when a swap signature ends the first page (any common page size)."""
    return _page_size(read, offset, length) is not None


def used_blocks(read: Reader, offset: int, length: int) -> FsUsage:
    """Only the first page (header with label and UUID) is used; pages 1..last_page are free."""
    page = _page_size(read, offset, length)
    if page is None:
        raise FsMapUnsure("no swap signature")
    version, last_page, nr_bad = struct.unpack("<III", read_exact(read, offset + HEADER_OFFSET, 12))
    if version != 1:
        raise FsMapUnsure(f"swap header version {version} (or foreign byte order)")
    if nr_bad:
        raise FsMapUnsure(f"swap header lists {nr_bad} bad pages")
    n = length // page
    if not 0 < last_page < n:
        raise FsMapUnsure(f"swap last page {last_page} outside the region of {n} pages")
    bits = all_used(n)
    clear_range(bits, 1, last_page)
    return FsUsage(block_size=page, nblocks=n, bits=bits)

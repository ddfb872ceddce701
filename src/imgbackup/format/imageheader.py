"""An image's header (JSON metadata), parsed without numpy: ``list`` reads only headers.

Kept apart from ``imageindex`` so that commands that never touch a body do not import numpy
(~0.25 s of every such run when cold).
"""

from __future__ import annotations

import json

from imgbackup.errors import IntegrityError, UnsupportedFormat
from imgbackup.format.layout import FORMAT_VERSION


def bad_ranges(meta: dict) -> list[tuple[int, int]]:
    """The image's map of unreadable source sectors (``backup --rescue``), checked: IntegrityError if
    it is not a sorted list of disjoint ``[offset, length]`` whole-sector ranges inside the source."""
    raw = meta.get("bad_ranges", [])
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    size, sector = source.get("size"), source.get("logical_sector_size") or 512

    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"image {meta.get('id')}: header field bad_ranges is malformed: {why}")

    if not isinstance(raw, list):
        raise bad("not a list")
    out: list[tuple[int, int]] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and all(type(v) is int for v in item)):
            raise bad(f"{item!r} is not [offset, length]")
        off, length = item
        if off < 0 or length <= 0 or (out and off <= out[-1][0] + out[-1][1]):
            raise bad(f"[{off}, {length}] is empty, negative, unsorted or touches the range before")
        if type(size) is int and off + length > size:
            raise bad(f"[{off}, {length}] ends past the source's {size} bytes")
        if type(sector) is int and sector > 0 and (off % sector or (length % sector and off + length != size)):
            raise bad(f"[{off}, {length}] is not whole {sector}-byte sectors")
        out.append((off, length))
    return out


def parse_header(raw: bytes, image_id: str) -> dict:
    try:
        meta = json.loads(raw)
    except ValueError:
        raise IntegrityError(f"image {image_id}: header is not valid JSON") from None
    if meta.get("version") != FORMAT_VERSION:
        raise UnsupportedFormat(f"image {image_id} has unsupported version {meta.get('version')}")
    if meta.get("id") != image_id:
        raise IntegrityError(f"image {image_id}: header names another image ({meta.get('id')})")
    bad_ranges(meta)
    return meta

"""External change lists: which byte ranges of a source changed since the parent image.

Accepted formats (detected from the first bytes):

- **Extents** (text): one ``OFFSET LENGTH`` pair per line, in bytes, decimal or ``0x`` hex;
  ``#`` starts a comment; an optional first line ``# imgbackup-extents v1``.
- **Bitmap** (binary): magic ``IMGBCBT1``, granularity in bytes (u32), bit count (u64), then the packed
  bits (LSB first; bit i covers bytes [i*g, (i+1)*g)).
- **dm-era XML** as printed by ``era_invalidate``: ``<range begin=.. end=..>`` and ``<block block=..>`` in era
  blocks; the era block size must be given (``--change-granularity``), since the XML does not carry it.
  ``end`` is treated as inclusive, which can only read one block more than needed, never less.

Everything is converted to a boolean per chunk slot: True = read this slot.
"""

from __future__ import annotations

import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from imgbackup.errors import UsageError

BITMAP_MAGIC = b"IMGBCBT1"
BITMAP_HEAD = struct.Struct("<8sIQ")


def _mark(mask: np.ndarray, chunk: int, offset: int, length: int, source_size: int) -> None:
    if offset < 0 or length < 0:
        raise UsageError(f"change list has a negative extent ({offset}, {length})")
    if length == 0:
        return
    end = min(offset + length, source_size)
    if offset >= source_size:
        return
    mask[offset // chunk : (end - 1) // chunk + 1] = True


def _parse_extents(text: str, mask: np.ndarray, chunk: int, size: int) -> None:
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = re.split(r"[\s,]+", line)
        try:
            offset, length = (int(p, 0) for p in parts[:2])
            if len(parts) != 2:
                raise ValueError
        except ValueError:
            raise UsageError(f"change list line {lineno}: expected 'OFFSET LENGTH' in bytes, got {line!r}") from None
        _mark(mask, chunk, offset, length, size)


def _parse_bitmap(raw: bytes, mask: np.ndarray, chunk: int, size: int) -> None:
    if len(raw) < BITMAP_HEAD.size:
        raise UsageError("change bitmap is truncated")
    _magic, gran, nbits = BITMAP_HEAD.unpack_from(raw)
    if gran == 0 or len(raw) < BITMAP_HEAD.size + (nbits + 7) // 8:
        raise UsageError("change bitmap has a bad header or is truncated")
    bits = np.unpackbits(np.frombuffer(raw, np.uint8, (nbits + 7) // 8, BITMAP_HEAD.size), bitorder="little")
    for i in np.flatnonzero(bits[:nbits]):
        _mark(mask, chunk, int(i) * gran, gran, size)


def _parse_era_xml(raw: bytes, granularity: int | None, mask: np.ndarray, chunk: int, size: int) -> None:
    if not granularity:
        raise UsageError("a dm-era change list needs --change-granularity (the era block size in bytes)")
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        raise UsageError(f"change list is not valid XML: {exc}") from None
    for el in root.iter():
        try:
            if el.tag == "range":
                begin, end = int(el.get("begin")), int(el.get("end"))
                _mark(mask, chunk, begin * granularity, (end - begin + 1) * granularity, size)
            elif el.tag == "block":
                _mark(mask, chunk, int(el.get("block")) * granularity, granularity, size)
        except (TypeError, ValueError):
            raise UsageError(f"change list XML element <{el.tag}> has bad attributes") from None


def read_change_list(path: str, source_size: int, chunk_size: int, granularity: int | None = None) -> np.ndarray:
    """Slots (bool array) that the change list says may have changed."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read change list {path}: {exc.strerror}") from None
    mask = np.zeros((source_size + chunk_size - 1) // chunk_size, bool)
    if raw.startswith(BITMAP_MAGIC):
        _parse_bitmap(raw, mask, chunk_size, source_size)
    elif raw.lstrip()[:1] == b"<":
        _parse_era_xml(raw, granularity, mask, chunk_size, source_size)
    else:
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise UsageError(f"change list {path} is neither text extents, an IMGBCBT1 bitmap nor XML") from None
        _parse_extents(text, mask, chunk_size, source_size)
    return mask

"""Schema checks for every decoded structure, before any field of it is used (issue 9 §8).

An object can authenticate and still be wrong: in an ``--encryption none`` repository anyone can
recompute the checksums, and a writer's bug is sealed like good data. So each decoder checks types,
ranges, counts against the bytes present and decompressed sizes (before decompressing) with these
helpers, and every violation is an IntegrityError (exit 6) that names the object. No I/O here.
"""

from __future__ import annotations

import json
import math
import re

import zstandard

from imgbackup.errors import IntegrityError

_HEX = re.compile(r"[0-9a-f]*")
# A zstd frame whose header declares more than this is decompressed in pieces, so a lying header
# cannot make us allocate what the real data never fills (one such allocation was a MemoryError).
EAGER_DECOMPRESS_LIMIT = 64 << 20
STREAM_PIECE = 4 << 20     # output read per step when decompressing in pieces


def damaged(what: str, why: str) -> IntegrityError:
    return IntegrityError(f"{what} is damaged: {why}")


def parse_json(raw: bytes, what: str):
    """Strict JSON: UTF-8, no NaN/Infinity, bounded nesting (a deep one raises RecursionError)."""
    def no_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=no_constant)
    except UnicodeDecodeError:
        raise damaged(what, "not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise damaged(what, f"not valid JSON ({str(exc)[:80]})") from None


def obj(doc, what: str) -> dict:
    if not isinstance(doc, dict):
        raise damaged(what, f"a JSON {type(doc).__name__.replace('dict', 'object')}, not an object")
    return doc


def _missing(doc: dict, name: str, what: str, optional: bool) -> bool:
    if name in doc:
        return False
    if optional:
        return True
    raise damaged(what, f"field {name!r} is missing")


def integer(doc: dict, name: str, what: str, lo: int = 0, hi: int = (1 << 63) - 1,
            optional: bool = False, default: int | None = None) -> int | None:
    """An integer field (never a bool or a float) within [lo, hi]."""
    if _missing(doc, name, what, optional):
        return default
    value = doc[name]
    if type(value) is not int:
        raise damaged(what, f"field {name!r} is {type(value).__name__}, not an integer")
    if not lo <= value <= hi:
        raise damaged(what, f"field {name!r} = {value} is outside {lo}..{hi}")
    return value


def number(doc: dict, name: str, what: str, optional: bool = False, default: float | None = None) -> float | None:
    """A finite JSON number (integer or float, never a bool)."""
    if _missing(doc, name, what, optional):
        return default
    value = doc[name]
    if type(value) not in (int, float) or not math.isfinite(value):
        raise damaged(what, f"field {name!r} is not a finite number")
    return value


def text(doc: dict, name: str, what: str, optional: bool = False, nullable: bool = False,
         choices: tuple[str, ...] | None = None) -> str | None:
    if _missing(doc, name, what, optional):
        return None
    value = doc[name]
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise damaged(what, f"field {name!r} is {type(value).__name__}, not a string")
    if choices is not None and value not in choices:
        raise damaged(what, f"field {name!r} = {value[:40]!r} is not one of {', '.join(choices)}")
    return value


def hex_id(doc: dict, name: str, what: str, size: int, optional: bool = False, nullable: bool = False) -> str | None:
    """A field of exactly ``size`` bytes written as lowercase hex."""
    value = text(doc, name, what, optional=optional, nullable=nullable)
    if value is not None and not is_hex(value, size):
        raise damaged(what, f"field {name!r} is not {2 * size} lowercase hex digits")
    return value


def is_hex(value, size: int) -> bool:
    return isinstance(value, str) and len(value) == 2 * size and _HEX.fullmatch(value) is not None


def boolean(doc: dict, name: str, what: str, optional: bool = False) -> bool | None:
    if _missing(doc, name, what, optional):
        return None
    if not isinstance(doc[name], bool):
        raise damaged(what, f"field {name!r} is not true or false")
    return doc[name]


def child(doc: dict, name: str, what: str, kind: type, optional: bool = False, nullable: bool = False):
    """A nested object (``dict``) or list (``list``) field."""
    if _missing(doc, name, what, optional):
        return None
    value = doc[name]
    if value is None and nullable:
        return None
    if not isinstance(value, kind):
        label = "an object" if kind is dict else "a list"
        raise damaged(what, f"field {name!r} is {type(value).__name__}, not {label}")
    return value


def power_of_two(value: int, lo: int, hi: int) -> bool:
    return lo <= value <= hi and value & (value - 1) == 0


def need_bytes(data, pos: int, count: int, item_size: int, what: str, label: str) -> int:
    """``count`` items of ``item_size`` bytes must be present from ``pos``: the end, checked before
    any array of that length is made (a count of 2**64-1 must not allocate)."""
    end = pos + count * item_size
    if count < 0 or end > len(data):
        raise damaged(what, f"{label}: {count} × {item_size} bytes declared, {max(len(data) - pos, 0)} present")
    return end


def declared_size(frame: bytes, limit: int, what: str) -> int:
    """The content size a zstd frame's header declares (-1 when it does not), refused above ``limit``
    before anything is allocated."""
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise damaged(what, f"its zstd frame header is invalid ({exc})") from None
    if size > limit:
        raise damaged(what, f"its zstd frame declares {size} bytes, more than the {limit} it may hold")
    return size


def decompress(dec: zstandard.ZstdDecompressor, frame: bytes, limit: int, what: str) -> bytes:
    """One zstd frame, at most ``limit`` bytes of output, its declared size checked first."""
    size = declared_size(frame, limit, what)
    try:
        if 0 <= size <= EAGER_DECOMPRESS_LIMIT:
            return dec.decompress(frame, max_output_size=limit)
        out = bytearray()
        with dec.stream_reader(frame, read_across_frames=False) as reader:
            while piece := reader.read(STREAM_PIECE):
                out += piece
                if len(out) > limit:
                    raise damaged(what, f"it decompresses to more than the {limit} bytes it may hold")
        if size >= 0 and len(out) != size:
            raise damaged(what, f"its zstd frame declares {size} bytes but holds {len(out)}")
        return bytes(out)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what} does not decompress: {exc}") from None

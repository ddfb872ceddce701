"""An image's header (JSON metadata), parsed without numpy: ``list`` reads only headers.

Kept apart from ``imageindex`` so that commands that never touch a body do not import numpy
(~0.25 s of every such run when cold).
"""

from __future__ import annotations

from imgbackup.errors import IntegrityError, UnsupportedFormat
from imgbackup.format import validate as v
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


IMAGE_TYPES = ("full", "incremental", "differential")
MIN_CHUNK, MAX_CHUNK = 64 << 10, 16 << 20    # as the repository config allows (FORMAT.md 2.2)
MAX_SOURCE_SIZE = 1 << 62                    # 4 EiB: no real disk; keeps every offset in an i64
MAX_HEADER_SIZE = 64 << 20   # a header is kilobytes; a dying disk's bad-range list stays far below this
FINGERPRINT_TEXT = ("kind", "model", "serial", "wwn", "backing_file", "table", "table_id", "fs_uuid", "partuuid")
OPTIONAL_SOURCE_TEXT = ("model", "serial", "vendor", "device_kind", "fstype", "identity_error")


def parse_header(raw: bytes, image_id: str) -> dict:
    """The header JSON, every field a reader uses checked (types, ranges, consistency)."""
    what = f"image {image_id} header"
    meta = v.obj(v.parse_json(raw, what), what)
    version = v.integer(meta, "version", what, 0)
    if version != FORMAT_VERSION:
        raise UnsupportedFormat(f"image {image_id} has unsupported version {version}")
    if v.hex_id(meta, "id", what, 16) != image_id:
        raise IntegrityError(f"image {image_id}: header names another image ({meta['id']})")
    v.text(meta, "name", what)
    v.text(meta, "type", what, choices=IMAGE_TYPES)
    v.hex_id(meta, "parent", what, 16, nullable=True)
    v.number(meta, "created", what)
    v.text(meta, "hostname", what)
    v.text(meta, "tool_version", what)
    chunk_size = v.integer(meta, "chunk_size", what, MIN_CHUNK, MAX_CHUNK)
    if not v.power_of_two(chunk_size, MIN_CHUNK, MAX_CHUNK):
        raise v.damaged(what, f"chunk size {chunk_size} is not a power of two")
    size = _check_source(v.child(meta, "source", what, dict), what)
    slots = v.integer(meta, "slots", what)
    if slots != -(-size // chunk_size):
        raise v.damaged(what, f"{slots} slots do not cover {size} bytes in {chunk_size}-byte chunks")
    _check_used_map(v.child(meta, "used_map", what, dict), what)
    v.text(meta, "changed_blocks", what, optional=True, nullable=True)
    v.hex_id(meta, "body_sha256", what, 32)
    v.hex_id(meta, "content_digest", what, 32)
    warnings = v.child(meta, "warnings", what, list, optional=True) or []
    if not all(isinstance(w, str) for w in warnings):
        raise v.damaged(what, "field 'warnings' is not a list of strings")
    v.text(meta, "job", what, optional=True, nullable=True)
    v.text(meta, "source_spec", what, optional=True, nullable=True)
    fingerprint = v.child(meta, "source_fingerprint", what, dict, optional=True, nullable=True)
    for name in FINGERPRINT_TEXT if fingerprint is not None else ():
        v.text(fingerprint, name, f"{what} (source_fingerprint)", optional=True, nullable=True)
    if fingerprint is not None and fingerprint.get("size") is not None:
        v.number(fingerprint, "size", f"{what} (source_fingerprint)")
    bad_ranges(meta)
    return meta


def _check_source(source: dict, what: str) -> int:
    where = f"{what} (source)"
    v.text(source, "path", where)
    size = v.integer(source, "size", where, 0, MAX_SOURCE_SIZE)
    v.integer(source, "logical_sector_size", where, 1, 1 << 20)
    v.integer(source, "physical_sector_size", where, 1, 1 << 20)
    v.text(source, "kind", where, choices=("block", "file"))
    for name in OPTIONAL_SOURCE_TEXT:
        v.text(source, name, where, optional=True, nullable=True)
    v.child(source, "snapshot", where, dict, optional=True, nullable=True)
    return size


def _check_used_map(used_map: dict, what: str) -> None:
    where = f"{what} (used_map)"
    v.boolean(used_map, "enabled", where)
    for region in v.child(used_map, "regions", where, list):
        region = v.obj(region, f"{where} region")
        for name in ("start", "size", "used_bytes"):
            v.integer(region, name, f"{where} region", 0, MAX_SOURCE_SIZE)
        if region.get("partition") is not None:
            v.integer(region, "partition", f"{where} region", 0, 1 << 16)
        v.text(region, "fstype", f"{where} region", optional=True, nullable=True)
        v.text(region, "mode", f"{where} region", choices=("bitmap", "full"))
        v.text(region, "warning", f"{where} region", optional=True, nullable=True)

"""Pack files: many sealed chunks in one object, with a sealed trailer listing them.

The trailer makes every pack self-describing, so the chunk index can be rebuilt from packs alone.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from dataclasses import dataclass

from imgbackup.crypto.envelope import Envelope
from imgbackup.errors import IntegrityError
from imgbackup.format.layout import (
    BASE_ENTRY,
    FORMAT_VERSION,
    INFO_DELTA,
    INFO_LENGTH_MASK,
    INFO_RESERVED,
    MAX_PACK_SIZE,
    OBJ_PACK_TRAILER,
    PACK_FOOTER,
    PACK_FOOTER_MAGIC,
    PACK_HEADER,
    PACK_MAGIC,
    PACK_TRAILER_ENTRY,
    PACK_TRAILER_HEAD,
    PACK_TRAILER_MAGIC,
)
from imgbackup.repository.storage import ObjectWriter, Storage, confirm_stored

PACK_TARGET_SIZE = 16 << 20   # few enough files per TiB for any filesystem or bucket, small enough to stream


def pack_name(pack_id: bytes) -> str:
    hexid = pack_id.hex()
    return f"packs/{hexid[:2]}/{hexid}"


@dataclass(frozen=True)
class BlobLocation:
    pack_id: bytes
    offset: int
    length: int
    raw_length: int
    base: bytes | None = None     # a delta's base chunk id (always a plain chunk); None: stored whole


def encode_entries(entries: list[tuple[bytes, int, int, int, int, bytes | None]], entry: struct.Struct
                   ) -> tuple[bytes, bytes, int]:
    """Fixed entries (id, *fields, info) and the side table of bases: (entries, bases, delta count).

    ``entries`` rows are (chunk id, field…, raw length, base id or None); the last two become the
    info word (length | delta flag), and each delta adds a (row number, base id) side-table row.
    """
    rows, bases = [], []
    for n, (cid, *fields, raw, base) in enumerate(entries):
        if raw > INFO_LENGTH_MASK:
            raise ValueError("chunk longer than the format allows")
        rows.append(entry.pack(cid, *fields, raw | (INFO_DELTA if base is not None else 0)))
        if base is not None:
            bases.append(BASE_ENTRY.pack(n, base))
    return b"".join(rows), b"".join(bases), len(bases)


def decode_bases(plain: bytes, pos: int, count: int, infos: list[int], what: str) -> dict[int, bytes]:
    """The side table of bases (row number -> base id), checked against the entries' delta flags."""
    bases: dict[int, bytes] = {}
    last = -1
    for i in range(count):
        row, base = BASE_ENTRY.unpack_from(plain, pos + i * BASE_ENTRY.size)
        if row <= last or row >= len(infos) or not infos[row] & INFO_DELTA:
            raise IntegrityError(f"{what} has a damaged table of delta bases")
        bases[row] = base
        last = row
    if any(info & INFO_RESERVED for info in infos) or sum(1 for i in infos if i & INFO_DELTA) != count:
        raise IntegrityError(f"{what} has damaged entry flags")
    return bases


class PackWriter:
    """Streams sealed chunks into packs of about ``target_size`` bytes.

    A full pack is committed (fsync, rename, fsync directory) on a background thread while the
    next one fills, so a backup never waits for the disk between packs; at most one commit is
    outstanding. Chunks count as ``written`` only once their pack is committed.
    """

    def __init__(self, storage: Storage, envelope: Envelope, target_size: int = PACK_TARGET_SIZE) -> None:
        self.storage = storage
        self.envelope = envelope
        self.target_size = target_size
        self.written: dict[bytes, BlobLocation] = {}
        self.bytes_written = 0
        self._out: ObjectWriter | None = None
        self._commit: _Commit | None = None

    def _start(self) -> None:
        self._pack_id = os.urandom(32)
        self._out = self.storage.open_writer(pack_name(self._pack_id))
        self._entries: list[tuple[bytes, int, int, int, bytes | None]] = []
        header = PACK_HEADER.pack(PACK_MAGIC, FORMAT_VERSION)
        self._out.write(header)
        self._used = len(header)

    def add(self, chunk_id: bytes, blob: bytes, raw_length: int, base: bytes | None = None) -> None:
        """Append one sealed chunk; ``base`` is the base chunk id of a delta."""
        if self._out is None:
            self._start()
        if self._used + len(blob) >= MAX_PACK_SIZE:
            raise ValueError("pack would exceed the format's 4 GiB")
        self._out.write(blob)
        self._entries.append((chunk_id, self._used, len(blob), raw_length, base))
        self._used += len(blob)
        if self._used >= self.target_size:
            self._seal()

    def _seal(self) -> None:
        rows, bases, deltas = encode_entries(self._entries, PACK_TRAILER_ENTRY)
        trailer = PACK_TRAILER_HEAD.pack(PACK_TRAILER_MAGIC, FORMAT_VERSION, len(self._entries), deltas) + rows + bases
        sealed = self.envelope.seal(OBJ_PACK_TRAILER, self._pack_id, trailer)
        out, self._out = self._out, None
        out.write(sealed + PACK_FOOTER.pack(self._used, len(sealed), PACK_FOOTER_MAGIC))
        self._wait()
        locations = {cid: BlobLocation(self._pack_id, off, length, raw, base)
                     for cid, off, length, raw, base in self._entries}
        size = self._used + len(sealed) + PACK_FOOTER.size
        self._commit = _Commit(self.storage, pack_name(self._pack_id), out, locations, size)

    def _wait(self) -> None:
        commit, self._commit = self._commit, None
        if commit is not None:
            commit.join()
            self.written.update(commit.locations)
            self.bytes_written += commit.size

    def flush(self) -> None:
        """Commit the current pack (if it holds anything) and wait until every pack is stored."""
        if self._out is not None:
            self._seal()
        self._wait()

    def abort(self) -> None:
        """Drop the pack being filled (its temp object) after a failure; committed packs stay."""
        if self._out is not None:
            self._out.abort()
            self._out = None
        with contextlib.suppress(Exception):
            self._wait()


class _Commit:
    """One pack's commit running on its own thread; ``join`` re-raises its error. The pack counts as
    written only once the storage holds all of it (a dropped commit fails the backup here)."""

    def __init__(self, storage: Storage, name: str, out: ObjectWriter, locations: dict[bytes, BlobLocation],
                 size: int) -> None:
        self.storage = storage
        self.name = name
        self.locations = locations
        self.size = size
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(out,), name="imgbackup-pack-commit", daemon=True)
        self._thread.start()

    def _run(self, out: ObjectWriter) -> None:
        try:
            out.commit()
            confirm_stored(self.storage, self.name, self.size)
        except BaseException as exc:
            self._error = exc

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def read_pack_trailer(storage: Storage, envelope: Envelope, pack_id: bytes) -> list[tuple[bytes, BlobLocation]]:
    """The chunks a pack holds, from its own trailer (authenticated)."""
    name = pack_name(pack_id)
    size = storage.size(name)
    if size < PACK_HEADER.size + PACK_FOOTER.size:
        raise IntegrityError(f"pack {pack_id.hex()} is truncated")
    t_off, t_len, magic = PACK_FOOTER.unpack(storage.get_range(name, size - PACK_FOOTER.size, PACK_FOOTER.size))
    if magic != PACK_FOOTER_MAGIC or t_off + t_len + PACK_FOOTER.size != size:
        raise IntegrityError(f"pack {pack_id.hex()} has a damaged footer")
    plain = envelope.open(OBJ_PACK_TRAILER, pack_id, storage.get_range(name, t_off, t_len),
                          f"trailer of pack {pack_id.hex()}")
    what = f"trailer of pack {pack_id.hex()}"
    if len(plain) < PACK_TRAILER_HEAD.size:
        raise IntegrityError(f"{what} is truncated")
    magic, version, count, deltas = PACK_TRAILER_HEAD.unpack_from(plain)
    pos = PACK_TRAILER_HEAD.size
    if (magic != PACK_TRAILER_MAGIC or version != FORMAT_VERSION
            or len(plain) != pos + count * PACK_TRAILER_ENTRY.size + deltas * BASE_ENTRY.size):
        raise IntegrityError(f"pack {pack_id.hex()} has a damaged trailer")
    rows = [PACK_TRAILER_ENTRY.unpack_from(plain, pos + i * PACK_TRAILER_ENTRY.size) for i in range(count)]
    bases = decode_bases(plain, pos + count * PACK_TRAILER_ENTRY.size, deltas, [r[3] for r in rows], what)
    out = []
    for i, (cid, off, length, info) in enumerate(rows):
        if off < PACK_HEADER.size or off + length > t_off:
            raise IntegrityError(f"{what} points outside the pack")
        out.append((cid, BlobLocation(pack_id, off, length, info & INFO_LENGTH_MASK, bases.get(i))))
    return out

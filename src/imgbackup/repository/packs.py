"""Pack files: many sealed chunks in one object, with a sealed trailer listing them.

The trailer makes every pack self-describing, so the chunk index can be rebuilt from packs alone.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections import deque
from dataclasses import dataclass

from imgbackup.crypto.envelope import Envelope
from imgbackup.errors import IntegrityError
from imgbackup.format.layout import (
    BASE_ENTRY,
    ENVELOPE_HEADER,
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
    TAG_SIZE,
)
from imgbackup.format.validate import damaged
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


MIN_SEALED = ENVELOPE_HEADER.size + min(TAG_SIZE.values())   # the smallest envelope there is
MAX_RAW_LENGTH = 1 << 24     # a chunk is at most 16 MiB (the config's largest chunk size)


def check_entry(what: str, row: int, offset: int, length: int, raw_length: int, end: int = MAX_PACK_SIZE) -> None:
    """One pack-trailer or chunk-index entry: the blob lies after the pack header and before ``end``
    (the trailer, or the format's 4 GiB), holds at least an envelope, and a 1 B .. 16 MiB chunk."""
    if offset < PACK_HEADER.size or length < MIN_SEALED or offset + length > end:
        raise damaged(what, f"entry {row} points outside the pack ({length} bytes at {offset})")
    if not 1 <= raw_length <= MAX_RAW_LENGTH:
        raise damaged(what, f"entry {row} gives a chunk of {raw_length} bytes")


class PackWriter:
    """Streams sealed chunks into packs of about ``target_size`` bytes.

    A full pack is committed on a background thread while the next one fills, so a backup never
    waits for the storage between packs. Up to ``in_flight`` commits are outstanding (default: the
    storage's ``write_parallelism`` — 1 for a directory, several for a bucket, where a PUT is a
    round trip); each holds its pack's bytes until it lands, so memory stays at ``in_flight + 1``
    packs. Chunks count as ``written`` only once their pack is committed.
    """

    def __init__(self, storage: Storage, envelope: Envelope, target_size: int = PACK_TARGET_SIZE,
                 in_flight: int | None = None) -> None:
        self.storage = storage
        self.envelope = envelope
        self.target_size = target_size
        self.in_flight = max(1, in_flight or getattr(storage, "write_parallelism", 1))
        self.written: dict[bytes, BlobLocation] = {}
        self.bytes_written = 0
        self.packs_written = 0
        self._out: ObjectWriter | None = None
        self._commits: deque[_Commit] = deque()

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

    @property
    def pending_bytes(self) -> int:
        """Bytes in the pack being filled (not yet on its way)."""
        return self._used if self._out is not None else 0

    def _seal(self) -> None:
        rows, bases, deltas = encode_entries(self._entries, PACK_TRAILER_ENTRY)
        trailer = PACK_TRAILER_HEAD.pack(PACK_TRAILER_MAGIC, FORMAT_VERSION, len(self._entries), deltas) + rows + bases
        sealed = self.envelope.seal(OBJ_PACK_TRAILER, self._pack_id, trailer)
        out = self._out
        out.write(sealed + PACK_FOOTER.pack(self._used, len(sealed), PACK_FOOTER_MAGIC))
        # The pack stays in self._out until a commit holds it: a Ctrl-C while collect() waits for an
        # earlier commit then reaches abort() with this pack still there to drop (CI saw its temp left).
        self.collect(self.in_flight - 1)
        locations = {cid: BlobLocation(self._pack_id, off, length, raw, base)
                     for cid, off, length, raw, base in self._entries}
        size = self._used + len(sealed) + PACK_FOOTER.size
        commit = _Commit(self.storage, pack_name(self._pack_id), out, locations, size)
        self._commits.append(commit)   # listed before it starts: an interrupt can never lose track of it
        self._out = None
        commit.start()

    def collect(self, outstanding: int = 0) -> None:
        """Take in every finished commit, then wait until at most ``outstanding`` are left; a failed
        commit raises here."""
        for commit in [c for c in self._commits if c.done()]:
            self._finish(commit)
        while len(self._commits) > outstanding:
            self._finish(self._commits[0])

    def _finish(self, commit: _Commit) -> None:
        # Taken off the list only once joined: a Ctrl-C that interrupts the join leaves it listed,
        # so abort() still waits for it and the caller's clean-up learns of its pack.
        commit.join()
        self._commits.remove(commit)
        self.written.update(commit.locations)
        self.bytes_written += commit.size
        self.packs_written += 1

    def take_written(self) -> dict[bytes, BlobLocation]:
        """The chunks committed since the last call (taken out of ``written``)."""
        done, self.written = self.written, {}
        return done

    def flush(self) -> None:
        """Commit the current pack (if it holds anything) and wait until every pack is stored."""
        if self._out is not None:
            self._seal()
        self.collect(0)

    def abort(self) -> None:
        """Drop the pack being filled (its temp object) after a failure; committed packs stay."""
        if self._out is not None:
            self._out.abort()
            self._out = None
        while self._commits:
            commit = self._commits.popleft()
            with contextlib.suppress(Exception):
                commit.join()
            # even a failed commit may have stored its pack (e.g. its size check failed): the
            # caller's clean-up removes it, and an absent one is skipped there
            self.written.update(commit.locations)


class _Commit:
    """One pack's commit running on its own thread; ``join`` re-raises its error. The pack counts as
    written only once the storage holds all of it (a dropped commit fails the backup here)."""

    def __init__(self, storage: Storage, name: str, out: ObjectWriter, locations: dict[bytes, BlobLocation],
                 size: int) -> None:
        self.storage = storage
        self.name = name
        self.locations = locations
        self.size = size
        self._out = out
        self._error: BaseException | None = None
        # Its own flag, not Thread.join: Python 3.11 marks a thread stopped when a signal interrupts
        # a join of it (threading's bpo-45274 clean-up), though it still runs.
        self._finished = threading.Event()
        # Whoever takes the claim first owns the pack: the thread (commit) or a join that finds
        # start() cut short by a signal (abort) -- then it cannot matter whether the thread began.
        self._claim = threading.Lock()
        self._launched = False
        self._thread = threading.Thread(target=self._run, args=(out,), name="imgbackup-pack-commit", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._launched = True

    def _run(self, out: ObjectWriter) -> None:
        if not self._claim.acquire(blocking=False):   # the join aborted it first
            return
        try:
            out.commit()
            confirm_stored(self.storage, self.name, self.size)
        except BaseException as exc:
            self._error = exc
        finally:
            self._finished.set()

    def done(self) -> bool:
        return self._finished.is_set()

    def join(self) -> None:
        if not self._launched and self._claim.acquire(blocking=False):   # start() was cut short
            self._out.abort()
            self._finished.set()
            raise RuntimeError(f"the commit of {self.name} never started")
        self._finished.wait()
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
    if t_off < PACK_HEADER.size:
        raise IntegrityError(f"pack {pack_id.hex()} has a damaged footer")
    what = f"trailer of pack {pack_id.hex()}"
    # each entry names a blob of at least MIN_SEALED bytes before the trailer: that bounds the plaintext
    limit = PACK_TRAILER_HEAD.size + (t_off // MIN_SEALED + 1) * (PACK_TRAILER_ENTRY.size + BASE_ENTRY.size)
    plain = envelope.open(OBJ_PACK_TRAILER, pack_id, storage.get_range(name, t_off, t_len), what, max_size=limit)
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
        check_entry(what, i, off, length, info & INFO_LENGTH_MASK, t_off)
        out.append((cid, BlobLocation(pack_id, off, length, info & INFO_LENGTH_MASK, bases.get(i))))
    return out

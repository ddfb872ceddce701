"""Pack files: many sealed chunks in one object, with a sealed trailer listing them.

The trailer makes every pack self-describing, so the chunk index can be rebuilt from packs alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from imgbackup.crypto.envelope import Envelope
from imgbackup.errors import IntegrityError
from imgbackup.format.layout import (
    FORMAT_VERSION,
    OBJ_PACK_TRAILER,
    PACK_FOOTER,
    PACK_FOOTER_MAGIC,
    PACK_HEADER,
    PACK_MAGIC,
    PACK_TRAILER_ENTRY,
    PACK_TRAILER_HEAD,
    PACK_TRAILER_MAGIC,
)
from imgbackup.repository.storage import Storage

PACK_TARGET_SIZE = 16 << 20


def pack_name(pack_id: bytes) -> str:
    hexid = pack_id.hex()
    return f"packs/{hexid[:2]}/{hexid}"


@dataclass(frozen=True)
class BlobLocation:
    pack_id: bytes
    offset: int
    length: int
    raw_length: int


class PackWriter:
    """Collects sealed chunks and stores them as packs of about ``target_size`` bytes."""

    def __init__(self, storage: Storage, envelope: Envelope, target_size: int = PACK_TARGET_SIZE) -> None:
        self.storage = storage
        self.envelope = envelope
        self.target_size = target_size
        self.written: dict[bytes, BlobLocation] = {}
        self.bytes_written = 0
        self._buffer: bytearray | None = None
        self._reset()

    def _reset(self) -> None:
        self._pack_id = os.urandom(32)
        self._used = 0
        self._entries: list[tuple[bytes, int, int, int]] = []

    def _append(self, data: bytes) -> None:
        if self._buffer is None:  # one allocation on first use, reused for every pack
            self._buffer = bytearray(max(self.target_size + (2 << 20), len(data)))
        end = self._used + len(data)
        if end > len(self._buffer):
            self._buffer.extend(bytes(end - len(self._buffer)))
        self._buffer[self._used : end] = data
        self._used = end

    def add(self, chunk_id: bytes, blob: bytes, raw_length: int) -> None:
        if not self._entries:
            self._append(PACK_HEADER.pack(PACK_MAGIC, FORMAT_VERSION))
        self._entries.append((chunk_id, self._used, len(blob), raw_length))
        self._append(blob)
        if self._used >= self.target_size:
            self.flush()

    def flush(self) -> None:
        """Store the current pack (if it holds anything); its chunks become known only after this."""
        if not self._entries:
            return
        trailer = PACK_TRAILER_HEAD.pack(PACK_TRAILER_MAGIC, FORMAT_VERSION, len(self._entries))
        trailer += b"".join(PACK_TRAILER_ENTRY.pack(*e) for e in self._entries)
        sealed = self.envelope.seal(OBJ_PACK_TRAILER, self._pack_id, trailer)
        self._append(sealed + PACK_FOOTER.pack(self._used, len(sealed), PACK_FOOTER_MAGIC))
        self.storage.put(pack_name(self._pack_id), memoryview(self._buffer)[: self._used])
        self.bytes_written += self._used
        for cid, off, length, raw in self._entries:
            self.written[cid] = BlobLocation(self._pack_id, off, length, raw)
        self._reset()


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
    magic, _version, count = PACK_TRAILER_HEAD.unpack_from(plain)
    if magic != PACK_TRAILER_MAGIC or len(plain) != PACK_TRAILER_HEAD.size + count * PACK_TRAILER_ENTRY.size:
        raise IntegrityError(f"pack {pack_id.hex()} has a damaged trailer")
    out = []
    for i in range(count):
        cid, off, length, raw = PACK_TRAILER_ENTRY.unpack_from(plain, PACK_TRAILER_HEAD.size + i * PACK_TRAILER_ENTRY.size)
        out.append((cid, BlobLocation(pack_id, off, length, raw)))
    return out

"""ChunkIndex: where each stored chunk lives (pack, offset, length), from the chunk-index files.

Each backup writes one chunk-index file for the packs it stored, after those packs and before its
image index. Chunks in packs that no index file names (a backup killed in between) are unknown,
so they are simply stored again by the next backup.
"""

from __future__ import annotations

import os

import numpy as np

from imgbackup.crypto.envelope import Envelope
from imgbackup.errors import IntegrityError
from imgbackup.format.layout import (
    CHUNK_INDEX_ENTRY,
    CHUNK_INDEX_HEAD,
    CHUNK_INDEX_MAGIC,
    FORMAT_VERSION,
    OBJ_CHUNK_INDEX,
)
from imgbackup.repository.packs import BlobLocation
from imgbackup.repository.storage import Storage, confirm_stored

ENTRY_DTYPE = np.dtype([("id", "V32"), ("pack", "<u4"), ("offset", "<u8"), ("length", "<u4"), ("raw", "<u4")])
assert ENTRY_DTYPE.itemsize == CHUNK_INDEX_ENTRY.size


def encode_chunk_index(locations: dict[bytes, BlobLocation]) -> bytes:
    packs = sorted({loc.pack_id for loc in locations.values()})
    number = {p: i for i, p in enumerate(packs)}
    entries = np.zeros(len(locations), ENTRY_DTYPE)
    for i, (cid, loc) in enumerate(sorted(locations.items())):
        entries[i] = (cid, number[loc.pack_id], loc.offset, loc.length, loc.raw_length)
    head = CHUNK_INDEX_HEAD.pack(CHUNK_INDEX_MAGIC, FORMAT_VERSION, len(packs), len(entries))
    return head + b"".join(packs) + entries.tobytes()


def decode_chunk_index(plain: bytes, name: str) -> dict[bytes, BlobLocation]:
    if len(plain) < CHUNK_INDEX_HEAD.size:
        raise IntegrityError(f"chunk index {name} is truncated")
    magic, version, n_packs, n_entries = CHUNK_INDEX_HEAD.unpack_from(plain)
    pos = CHUNK_INDEX_HEAD.size
    if magic != CHUNK_INDEX_MAGIC or version != FORMAT_VERSION:
        raise IntegrityError(f"chunk index {name} has a bad header")
    if len(plain) != pos + 32 * n_packs + ENTRY_DTYPE.itemsize * n_entries:
        raise IntegrityError(f"chunk index {name} has the wrong length")
    packs = [plain[pos + 32 * i : pos + 32 * (i + 1)] for i in range(n_packs)]
    entries = np.frombuffer(plain, ENTRY_DTYPE, n_entries, pos + 32 * n_packs)
    if n_entries and int(entries["pack"].max()) >= n_packs:
        raise IntegrityError(f"chunk index {name} names a pack it does not list")
    return {
        bytes(e["id"]): BlobLocation(packs[int(e["pack"])], int(e["offset"]), int(e["length"]), int(e["raw"]))
        for e in entries
    }


class ChunkIndex:
    """All known chunks of a repository. Loaded once per command; grows as a backup stores packs."""

    def __init__(self) -> None:
        self.locations: dict[bytes, BlobLocation] = {}
        self.files: list[str] = []

    @classmethod
    def load(cls, storage: Storage, envelope: Envelope) -> ChunkIndex:
        index = cls()
        for name in storage.list("index"):
            file_id = bytes.fromhex(name.rsplit("/", 1)[1])
            plain = envelope.open(OBJ_CHUNK_INDEX, file_id, storage.get(name), f"chunk index {name}")
            index.locations.update(decode_chunk_index(plain, name))
            index.files.append(name)
        return index

    def __contains__(self, chunk_id: bytes) -> bool:
        return chunk_id in self.locations

    def __len__(self) -> int:
        return len(self.locations)

    def get(self, chunk_id: bytes) -> BlobLocation | None:
        return self.locations.get(chunk_id)

    def store(self, storage: Storage, envelope: Envelope, new: dict[bytes, BlobLocation]) -> int:
        """Write a chunk-index file for ``new`` and add it; returns the bytes written."""
        if not new:
            return 0
        file_id = os.urandom(32)
        name = f"index/{file_id.hex()}"
        sealed = envelope.seal(OBJ_CHUNK_INDEX, file_id, encode_chunk_index(new))
        storage.put(name, sealed)
        confirm_stored(storage, name, len(sealed))
        self.locations.update(new)
        self.files.append(name)
        return len(sealed)

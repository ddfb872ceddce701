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
    BASE_ENTRY,
    CHUNK_INDEX_ENTRY,
    CHUNK_INDEX_HEAD,
    CHUNK_INDEX_MAGIC,
    FORMAT_VERSION,
    INFO_LENGTH_MASK,
    MAX_PACK_SIZE,
    OBJ_CHUNK_INDEX,
    PACK_HEADER,
)
from imgbackup.format.validate import damaged, is_hex
from imgbackup.repository.packs import (
    MAX_RAW_LENGTH,
    MIN_SEALED,
    BlobLocation,
    check_entry,
    decode_bases,
    encode_entries,
)
from imgbackup.repository.storage import ObjectMissing, Storage, confirm_stored

LOAD_ATTEMPTS = 3   # a delete replaces the index files once per run; three lists outlast any real race
ENTRY_DTYPE = np.dtype([("id", "V32"), ("pack", "<u4"), ("offset", "<u4"), ("length", "<u4"), ("info", "<u4")])
assert ENTRY_DTYPE.itemsize == CHUNK_INDEX_ENTRY.size == 48


def encode_chunk_index(locations: dict[bytes, BlobLocation]) -> bytes:
    packs = sorted({loc.pack_id for loc in locations.values()})
    number = {p: i for i, p in enumerate(packs)}
    rows = [(cid, number[loc.pack_id], loc.offset, loc.length, loc.raw_length, loc.base)
            for cid, loc in sorted(locations.items())]
    entries, bases, deltas = encode_entries(rows, CHUNK_INDEX_ENTRY)
    head = CHUNK_INDEX_HEAD.pack(CHUNK_INDEX_MAGIC, FORMAT_VERSION, len(packs), len(rows), deltas)
    return head + b"".join(packs) + entries + bases


def decode_chunk_index(plain: bytes, name: str) -> dict[bytes, BlobLocation]:
    what = f"chunk index {name}"
    if len(plain) < CHUNK_INDEX_HEAD.size:
        raise IntegrityError(f"{what} is truncated")
    magic, version, n_packs, n_entries, n_deltas = CHUNK_INDEX_HEAD.unpack_from(plain)
    pos = CHUNK_INDEX_HEAD.size
    if magic != CHUNK_INDEX_MAGIC or version != FORMAT_VERSION:
        raise IntegrityError(f"{what} has a bad header")
    if len(plain) != pos + 32 * n_packs + ENTRY_DTYPE.itemsize * n_entries + BASE_ENTRY.size * n_deltas:
        raise IntegrityError(f"{what} has the wrong length")
    packs = [plain[pos + 32 * i : pos + 32 * (i + 1)] for i in range(n_packs)]
    pos += 32 * n_packs
    entries = np.frombuffer(plain, ENTRY_DTYPE, n_entries, pos)
    if n_entries and int(entries["pack"].max()) >= n_packs:
        raise IntegrityError(f"{what} names a pack it does not list")
    infos = entries["info"].tolist()
    bases = decode_bases(plain, pos + ENTRY_DTYPE.itemsize * n_entries, n_deltas, infos, what)
    ids = [bytes(e) for e in entries["id"]]
    if any(a >= b for a, b in zip(ids, ids[1:], strict=False)):
        raise damaged(what, "its entries are not sorted by chunk id, or repeat one")
    _check_entries(entries, what)
    return {
        cid: BlobLocation(packs[int(e["pack"])], int(e["offset"]), int(e["length"]),
                          infos[i] & INFO_LENGTH_MASK, bases.get(i))
        for i, (cid, e) in enumerate(zip(ids, entries, strict=True))
    }


def _check_entries(entries: np.ndarray, what: str) -> None:
    """Every entry's blob inside a pack and its chunk 1 B .. 16 MiB (vectorised ``check_entry``)."""
    offset, length = entries["offset"].astype(np.int64), entries["length"].astype(np.int64)
    raw = entries["info"] & INFO_LENGTH_MASK
    bad = ((offset < PACK_HEADER.size) | (length < MIN_SEALED) | (offset + length > MAX_PACK_SIZE)
           | (raw < 1) | (raw > MAX_RAW_LENGTH))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        check_entry(what, row, int(offset[row]), int(length[row]), int(raw[row]))


def index_file_id(name: str) -> bytes:
    """The 32-byte file id an ``index/<64 hex>`` name carries (anything else there is damage)."""
    hexid = name.rsplit("/", 1)[1]
    if not is_hex(hexid, 32):
        raise IntegrityError(f"{name[:80]} is not a chunk-index file (its name is not 64 hex digits)")
    return bytes.fromhex(hexid)


def merge_locations(into: dict[bytes, BlobLocation], new: dict[bytes, BlobLocation]) -> None:
    """Add ``new`` to ``into``; a chunk known twice keeps a whole copy over a delta (a base must be whole)."""
    for cid, loc in new.items():
        old = into.get(cid)
        if old is None or old.base is not None or loc.base is None:
            into[cid] = loc


class ChunkIndex:
    """All known chunks of a repository. Loaded once per command; grows as a backup stores packs."""

    def __init__(self) -> None:
        self.locations: dict[bytes, BlobLocation] = {}
        self.files: list[str] = []

    @classmethod
    def load(cls, storage: Storage, envelope: Envelope) -> ChunkIndex:
        """Every chunk-index file; one that vanishes between list and read (a concurrent ``delete``
        replaced it, FORMAT.md section 9) means a new one exists: list and load again."""
        for _attempt in range(LOAD_ATTEMPTS - 1):
            try:
                return cls._load_once(storage, envelope)
            except ObjectMissing:
                continue
        return cls._load_once(storage, envelope)

    @classmethod
    def _load_once(cls, storage: Storage, envelope: Envelope) -> ChunkIndex:
        index = cls()
        for name in storage.list("index"):
            file_id = index_file_id(name)
            plain = envelope.open(OBJ_CHUNK_INDEX, file_id, storage.get(name), f"chunk index {name}")
            merge_locations(index.locations, decode_chunk_index(plain, name))
            index.files.append(name)
        return index

    def __contains__(self, chunk_id: bytes) -> bool:
        return chunk_id in self.locations

    def __len__(self) -> int:
        return len(self.locations)

    def get(self, chunk_id: bytes) -> BlobLocation | None:
        return self.locations.get(chunk_id)

    def bases_of(self, chunk_ids) -> set[bytes]:
        """The base chunks the deltas among ``chunk_ids`` need (GC keeps them, restore reads them)."""
        out = set()
        for cid in chunk_ids:
            loc = self.locations.get(cid)
            if loc is not None and loc.base is not None:
                out.add(loc.base)
        return out

    def store(self, storage: Storage, envelope: Envelope, new: dict[bytes, BlobLocation]) -> int:
        """Write a chunk-index file for ``new`` and add it; returns the bytes written."""
        if not new:
            return 0
        file_id = os.urandom(32)
        name = f"index/{file_id.hex()}"
        sealed = envelope.seal(OBJ_CHUNK_INDEX, file_id, encode_chunk_index(new))
        storage.put(name, sealed)
        confirm_stored(storage, name, len(sealed))
        merge_locations(self.locations, new)
        self.files.append(name)
        return len(sealed)

"""ChunkIndex: where each stored chunk lives (pack, offset, length), from the chunk-index files.

Each backup writes one chunk-index file for the packs it stored, after those packs and before its
image index. Chunks in packs that no index file names (a backup killed in between) are unknown,
so they are simply stored again by the next backup.

A chunk may have several copies (stored twice, or listed again by a repair): all are valid, one
is handed out, the others are ``spare``. Copies named by a damage record, and (when the caller
lists the packs) copies in packs that no longer exist, are never handed out: a chunk all of whose
copies are bad is ``excluded`` — absent, with the reason kept for messages.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

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
from imgbackup.repository.damage import DamagedCopy, DamageLog
from imgbackup.repository.packs import BlobLocation
from imgbackup.repository.storage import Storage, confirm_stored

ENTRY_DTYPE = np.dtype([("id", "V32"), ("pack", "<u4"), ("offset", "<u8"), ("length", "<u4"), ("raw", "<u4")])
assert ENTRY_DTYPE.itemsize == CHUNK_INDEX_ENTRY.size
INDEX_FOLDER = "index"
MAX_ENTRIES_PER_FILE = 1 << 20   # ~52 MiB per file: a rewritten index of a huge repository stays in pieces


def encode_chunk_index(locations: dict[bytes, BlobLocation] | Iterable[tuple[bytes, BlobLocation]]) -> bytes:
    """One file's plaintext; ``locations`` may name a chunk more than once (copies, each valid)."""
    rows = sorted(locations.items() if isinstance(locations, dict) else locations,
                  key=lambda row: (row[0], row[1].pack_id, row[1].offset))
    packs = sorted({loc.pack_id for _, loc in rows})
    number = {p: i for i, p in enumerate(packs)}
    entries = np.zeros(len(rows), ENTRY_DTYPE)
    for i, (cid, loc) in enumerate(rows):
        entries[i] = (cid, number[loc.pack_id], loc.offset, loc.length, loc.raw_length)
    head = CHUNK_INDEX_HEAD.pack(CHUNK_INDEX_MAGIC, FORMAT_VERSION, len(packs), len(entries))
    return head + b"".join(packs) + entries.tobytes()


def decode_chunk_index(plain: bytes, name: str) -> list[tuple[bytes, BlobLocation]]:
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
    return [(bytes(e["id"]), BlobLocation(packs[int(e["pack"])], int(e["offset"]), int(e["length"]), int(e["raw"])))
            for e in entries]


def read_index_file(storage: Storage, envelope: Envelope, name: str) -> list[tuple[bytes, BlobLocation]]:
    file_id = bytes.fromhex(name.rsplit("/", 1)[1])
    plain = envelope.open(OBJ_CHUNK_INDEX, file_id, storage.get(name), f"chunk index {name}")
    return decode_chunk_index(plain, name)


def write_index_files(storage: Storage, envelope: Envelope, rows: list[tuple[bytes, BlobLocation]],
                      names: list[str] | None = None) -> tuple[list[str], int]:
    """Store ``rows`` as new chunk-index file(s) of at most MAX_ENTRIES_PER_FILE; (names, bytes).
    Each name is appended to ``names`` before its file is written (for a clean-up after a failure)."""
    names = [] if names is None else names
    first, written = len(names), 0
    rows = sorted(rows, key=lambda row: row[0])
    for start in range(0, len(rows), MAX_ENTRIES_PER_FILE):
        file_id = os.urandom(32)
        name = f"{INDEX_FOLDER}/{file_id.hex()}"
        sealed = envelope.seal(OBJ_CHUNK_INDEX, file_id, encode_chunk_index(rows[start : start + MAX_ENTRIES_PER_FILE]))
        names.append(name)
        storage.put(name, sealed)
        confirm_stored(storage, name, len(sealed))
        written += len(sealed)
    return names[first:], written


class ChunkIndex:
    """All known chunks of a repository. Loaded once per command; grows as a backup stores packs."""

    def __init__(self) -> None:
        self.locations: dict[bytes, BlobLocation] = {}
        self.files: list[str] = []
        self.spare: list[tuple[bytes, BlobLocation]] = []       # further valid copies, not handed out
        self.excluded: dict[bytes, DamagedCopy] = {}             # chunks with no usable copy: why
        self.bad_copies: list[DamagedCopy] = []                  # every listed copy not handed out as bad
        self.packs_checked = False                               # copies in absent packs were excluded

    @classmethod
    def load(cls, storage: Storage, envelope: Envelope, damage: DamageLog | None = None,
             packs: set[str] | None = None) -> ChunkIndex:
        """The union of all index files, without the copies ``damage`` names and (when ``packs``, the
        listing of packs/, is given) without copies in packs that listing lacks."""
        index = cls()
        present = None if packs is None else {name.rsplit("/", 1)[1] for name in packs}
        for name in storage.list(INDEX_FOLDER):
            try:
                rows = read_index_file(storage, envelope, name)
            except IntegrityError as exc:
                raise IntegrityError(exc.args[0], "run 'imgbackup repair --yes': it rebuilds the chunk index "
                                     "from the packs") from None
            for cid, loc in rows:
                bad = damage.lookup(cid, loc.pack_id, loc.offset) if damage else None
                if bad is None and present is not None and loc.pack_id.hex() not in present:
                    bad = DamagedCopy(cid, loc.pack_id, loc.offset, loc.length, "missing",
                                      f"pack {loc.pack_id.hex()[:16]} is not in the repository")
                if bad is not None:
                    index.bad_copies.append(bad)
                else:
                    index._add(cid, loc)
            index.files.append(name)
        index.excluded = {bad.chunk_id: bad for bad in reversed(index.bad_copies)
                          if bad.chunk_id not in index.locations}
        for bad in (damage.copies.values() if damage else ()):   # recorded, and no longer listed
            if bad.chunk_id not in index.locations:
                index.excluded.setdefault(bad.chunk_id, bad)
        index.packs_checked = packs is not None
        return index

    def _add(self, cid: bytes, loc: BlobLocation) -> None:
        old = self.locations.get(cid)
        if old is None:
            self.locations[cid] = loc
        elif old != loc:
            self.spare.append((cid, loc))

    def __contains__(self, chunk_id: bytes) -> bool:
        return chunk_id in self.locations

    def __len__(self) -> int:
        return len(self.locations)

    def get(self, chunk_id: bytes) -> BlobLocation | None:
        return self.locations.get(chunk_id)

    def unrecorded(self) -> list[DamagedCopy]:
        """Bad copies found by this process (pack gone, or ``exclude``d) that no damage record names."""
        seen: dict[tuple, DamagedCopy] = {}
        for bad in self.bad_copies:
            if not bad.found:
                seen.setdefault(bad.key, bad)
        return list(seen.values())

    def exclude(self, bad: DamagedCopy) -> None:
        """Stop handing out the copy ``bad`` (found damaged during this run); a spare copy takes over."""
        loc = self.locations.get(bad.chunk_id)
        if loc is None or (loc.pack_id, loc.offset) != (bad.pack_id, bad.offset):
            return
        self.bad_copies.append(bad)
        spare = next((row for row in self.spare if row[0] == bad.chunk_id), None)
        if spare is not None:
            self.spare.remove(spare)
            self.locations[bad.chunk_id] = spare[1]
        else:
            del self.locations[bad.chunk_id]
            self.excluded[bad.chunk_id] = bad

    def store(self, storage: Storage, envelope: Envelope, new: dict[bytes, BlobLocation],
              names: list[str] | None = None) -> int:
        """Write a chunk-index file for ``new`` and add it; returns the bytes written."""
        if not new:
            return 0
        names, written = write_index_files(storage, envelope, list(new.items()), names)
        for cid, loc in new.items():
            self._add(cid, loc)
            self.excluded.pop(cid, None)
        self.files.extend(names)
        return written

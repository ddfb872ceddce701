"""ChunkIndex: where each stored chunk lives (pack, offset, length), from the chunk-index files.

Each backup writes one chunk-index file for the packs it stored, after those packs and before its
image index. Chunks in packs that no index file names (a backup killed in between) are unknown,
so they are simply stored again by the next backup.

A chunk may have several copies (stored twice, or listed again by a repair): all are valid, one
is handed out (a whole copy before a delta: a base must be whole), the others are ``spare``.
Copies named by a damage record, and (when the caller lists the packs) copies in packs that no
longer exist, are never handed out: a chunk all of whose copies are bad is ``excluded`` — absent,
with the reason kept for messages. A delta whose base has no usable copy is unusable too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

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
from imgbackup.repository.damage import DamagedCopy, DamageLog
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
INDEX_FOLDER = "index"
MAX_ENTRIES_PER_FILE = 1 << 20   # ~52 MiB per file: a rewritten index of a huge repository stays in pieces


def encode_chunk_index(locations: dict[bytes, BlobLocation] | Iterable[tuple[bytes, BlobLocation]]) -> bytes:
    """One file's plaintext; ``locations`` may name a chunk more than once (copies, each valid)."""
    items = sorted(locations.items() if isinstance(locations, dict) else locations,
                   key=lambda row: (row[0], row[1].pack_id, row[1].offset))
    packs = sorted({loc.pack_id for _, loc in items})
    number = {p: i for i, p in enumerate(packs)}
    rows = [(cid, number[loc.pack_id], loc.offset, loc.length, loc.raw_length, loc.base) for cid, loc in items]
    entries, bases, deltas = encode_entries(rows, CHUNK_INDEX_ENTRY)
    head = CHUNK_INDEX_HEAD.pack(CHUNK_INDEX_MAGIC, FORMAT_VERSION, len(packs), len(rows), deltas)
    return head + b"".join(packs) + entries + bases


def decode_chunk_index(plain: bytes, name: str) -> list[tuple[bytes, BlobLocation]]:
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
    if any(a > b for a, b in zip(ids, ids[1:], strict=False)):
        raise damaged(what, "its entries are not sorted by chunk id")
    _check_entries(entries, what)
    return [(cid, BlobLocation(packs[int(e["pack"])], int(e["offset"]), int(e["length"]),
                               infos[i] & INFO_LENGTH_MASK, bases.get(i)))
            for i, (cid, e) in enumerate(zip(ids, entries, strict=True))]


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


def read_index_file(storage: Storage, envelope: Envelope, name: str) -> list[tuple[bytes, BlobLocation]]:
    file_id = index_file_id(name)
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
        self._dependents: dict[bytes, list[bytes]] | None = None  # base -> deltas naming it (built on need)

    @classmethod
    def load(cls, storage: Storage, envelope: Envelope, damage: DamageLog | None = None,
             packs: set[str] | None = None) -> ChunkIndex:
        """The union of all index files, without the copies ``damage`` names and (when ``packs``, the
        listing of packs/, is given) without copies in packs that listing lacks. A file that vanishes
        between list and read (a concurrent delete or repair replaced it, FORMAT.md section 9) means a
        new one exists: list and load again."""
        for _attempt in range(LOAD_ATTEMPTS - 1):
            try:
                return cls._load_once(storage, envelope, damage, packs)
            except ObjectMissing:
                continue
        return cls._load_once(storage, envelope, damage, packs)

    @classmethod
    def _load_once(cls, storage: Storage, envelope: Envelope, damage: DamageLog | None,
                   packs: set[str] | None) -> ChunkIndex:
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
        index._drop_deltas_without_base()
        index.packs_checked = packs is not None
        return index

    def _add(self, cid: bytes, loc: BlobLocation) -> None:
        old = self.locations.get(cid)
        if old is None:
            self.locations[cid] = loc
        elif old != loc:
            if old.base is not None and loc.base is None:   # a whole copy is handed out before a delta
                self.locations[cid], loc = loc, old
            self.spare.append((cid, loc))

    def _drop_deltas_without_base(self, bases: set[bytes] | None = None) -> None:
        """A delta whose base has no usable copy cannot be read: stop handing it out (a spare copy
        may take over). Not recorded: the delta's own bytes are fine, and come back with its base.
        ``bases``: only deltas of these (after one exclusion), found through a map built once."""
        if bases is None:
            todo = [(cid, loc) for cid, loc in self.locations.items() if loc.base is not None]
        else:
            if self._dependents is None:
                self._dependents = {}
                for cid, loc in [*self.locations.items(), *self.spare]:
                    if loc.base is not None:
                        self._dependents.setdefault(loc.base, []).append(cid)
            todo = [(cid, self.locations[cid]) for base in bases for cid in self._dependents.get(base, ())
                    if cid in self.locations]
        for cid, loc in todo:
            if loc.base is not None and loc.base not in self.locations and self.locations.get(cid) == loc:
                self.exclude(DamagedCopy(cid, loc.pack_id, loc.offset, loc.length, "damaged",
                                         f"its base chunk {loc.base.hex()[:16]} has no usable copy"), record=False)

    def packs(self) -> set[bytes]:
        """Ids of the packs some chunk-index file names."""
        return {loc.pack_id for loc in self.locations.values()}

    def bases_of(self, chunk_ids) -> set[bytes]:
        """The base chunks the deltas among ``chunk_ids`` need (GC keeps them, restore reads them)."""
        out = set()
        for cid in chunk_ids:
            loc = self.locations.get(cid)
            if loc is not None and loc.base is not None:
                out.add(loc.base)
        return out

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

    def exclude(self, bad: DamagedCopy, record: bool = True) -> None:
        """Stop handing out the copy ``bad`` (found damaged during this run; ``record``: to be put on
        record); a spare copy takes over, a whole one first. Deltas based on a chunk left without a
        usable copy go too."""
        loc = self.locations.get(bad.chunk_id)
        if loc is None or (loc.pack_id, loc.offset) != (bad.pack_id, bad.offset):
            return
        if record:
            self.bad_copies.append(bad)
        spares = [row for row in self.spare if row[0] == bad.chunk_id]
        if spares:
            spare = min(spares, key=lambda row: row[1].base is not None)
            self.spare.remove(spare)
            self.locations[bad.chunk_id] = spare[1]
        else:
            del self.locations[bad.chunk_id]
            self.excluded[bad.chunk_id] = bad
            self._drop_deltas_without_base({bad.chunk_id})

    def store(self, storage: Storage, envelope: Envelope, new: dict[bytes, BlobLocation],
              names: list[str] | None = None) -> int:
        """Write a chunk-index file for ``new`` and add it; returns the bytes written."""
        if not new:
            return 0
        names, written = write_index_files(storage, envelope, list(new.items()), names)
        self._dependents = None
        for cid, loc in new.items():
            self._add(cid, loc)
            self.excluded.pop(cid, None)
        self.files.extend(names)
        return written

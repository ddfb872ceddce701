"""ChunkIndex: where each stored chunk lives, from the chunk-index files, as a sorted native table.

Each backup writes one chunk-index file for the packs it stored, after those packs and before its
image index. Chunks in packs that no index file names (a backup killed in between) are unknown, so
the next backup simply stores them again.

The union of the files is held as a ``ChunkTable`` (chunktable.py: 48 bytes per chunk, lookups of a
whole segment of ids in one native call) and kept in a local cache (indexcache.py) that is used
only while the listing of ``index/`` matches it, plus the files added since. A chunk may have
several copies (stored twice by two hosts at once, or again after an interrupted backup): all are
valid; one is handed out (a whole copy before a delta: a base must be whole), the others are spare.
Copies named by a damage record, copies in packs that no longer exist (when the caller lists the
packs) and copies a collection has marked as candidates (marks.py) are never handed out: a chunk all
of whose copies are bad is ``excluded`` (absent, with the reason kept for messages), and a backup
stores it again. A delta whose base has no usable copy is unusable too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from imgbackup._core import table as kernels
from imgbackup.crypto.envelope import Envelope
from imgbackup.errors import IntegrityError
from imgbackup.format.layout import (
    BASE_ENTRY,
    CHUNK_INDEX_ENTRY,
    CHUNK_INDEX_HEAD,
    CHUNK_INDEX_MAGIC,
    FORMAT_VERSION,
    INFO_DELTA,
    INFO_LENGTH_MASK,
    INFO_RESERVED,
    MAX_PACK_SIZE,
    OBJ_CHUNK_INDEX,
    PACK_HEADER,
)
from imgbackup.format.validate import damaged, is_hex
from imgbackup.repository.chunktable import (
    BASE_ROW_SIZE,
    ROW_DTYPE,
    ChunkTable,
    RowBuffer,
    empty_rows,
    field,
)
from imgbackup.repository.damage import DamagedCopy, DamageLog
from imgbackup.repository.indexcache import IndexCache
from imgbackup.repository.packs import MAX_RAW_LENGTH, MIN_SEALED, BlobLocation, check_entry, encode_entries
from imgbackup.repository.storage import ObjectMissing, Storage, confirm_stored

LOAD_ATTEMPTS = 5   # a compaction replaces index files while backups load them; five lists outlast any real race
ENTRY_DTYPE = np.dtype([("id", "V32"), ("pack", "<u4"), ("offset", "<u4"), ("length", "<u4"), ("info", "<u4")])
assert ENTRY_DTYPE.itemsize == CHUNK_INDEX_ENTRY.size == 48 and ENTRY_DTYPE == ROW_DTYPE
BASE_DTYPE = np.dtype([("row", "<u4"), ("base", "V32")])
assert BASE_DTYPE.itemsize == BASE_ENTRY.size
INDEX_FOLDER = "index"
READ_THREADS = 8             # index files fetched at once: a bucket answers each GET in ~10 ms
MAX_ENTRIES_PER_FILE = 1 << 20   # ~50 MiB per file: a merged index of a huge repository stays in pieces


def index_file_id(name: str) -> bytes:
    """The 32-byte file id an ``index/<64 hex>`` name carries (anything else there is damage)."""
    hexid = name.rsplit("/", 1)[1]
    if not is_hex(hexid, 32):
        raise IntegrityError(f"{name[:80]} is not a chunk-index file (its name is not 64 hex digits)")
    return bytes.fromhex(hexid)


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


def decode_entries(plain: bytes, name: str) -> list[tuple[bytes, BlobLocation]]:
    """One file's entries as objects, copies included (tests, repair); loading goes through decode_rows."""
    rows, packs, bases = decode_rows(plain, name)
    base_of = {b[:32].tobytes(): b[32:].tobytes() for b in bases}
    out = []
    for r in rows.view(ROW_DTYPE)[:, 0]:
        cid, info = r["id"].tobytes(), int(r["info"])
        out.append((cid, BlobLocation(packs[int(r["pack"])].tobytes(), int(r["offset"]), int(r["length"]),
                                      info & INFO_LENGTH_MASK, base_of.get(cid) if info & INFO_DELTA else None)))
    return out


def decode_chunk_index(plain: bytes, name: str) -> dict[bytes, BlobLocation]:
    """One file's entries by chunk id (one copy each)."""
    return dict(decode_entries(plain, name))


def merge_locations(into: dict[bytes, BlobLocation], new: dict[bytes, BlobLocation]) -> None:
    """Add ``new`` to ``into``; a chunk known twice keeps a whole copy over a delta (a base must be whole)."""
    for cid, loc in new.items():
        old = into.get(cid)
        if old is None or old.base is not None or loc.base is None:
            into[cid] = loc


def encode_rows(rows: np.ndarray, packs: np.ndarray, bases: np.ndarray | None = None) -> bytes:
    """One file's plaintext from table rows (sorted by id) whose pack numbers index ``packs``, with
    the bases of its deltas from the (sorted) base table ``bases``: vectorized, for indexes of
    millions of entries (compaction, benchmarks)."""
    view = rows.view(ROW_DTYPE)[:, 0] if len(rows) else np.zeros(0, ROW_DTYPE)
    used, local = np.unique(view["pack"], return_inverse=True)
    entries = view.copy()
    entries["pack"] = local
    delta_rows = np.flatnonzero(view["info"] & INFO_DELTA)
    side = np.zeros(len(delta_rows), BASE_DTYPE)
    if len(delta_rows):
        if bases is None or not len(bases):
            raise ValueError("delta rows without their bases")
        at = kernels.table_lookup(bases, kernels.table_directory(bases, kernels.directory_bits(len(bases))),
                                  np.ascontiguousarray(rows[delta_rows, :32]))
        if (at < 0).any():
            raise ValueError("a delta row has no base")
        side["row"] = delta_rows
        side["base"] = bases[at, 32:].copy().view("V32")[:, 0]
    head = CHUNK_INDEX_HEAD.pack(CHUNK_INDEX_MAGIC, FORMAT_VERSION, len(used), len(entries), len(side))
    return head + packs[used.astype(np.int64)].tobytes() + entries.tobytes() + side.tobytes()


def decode_rows(plain: bytes, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One file's plaintext as (rows with the file's own pack numbers, pack ids (P, 32), base rows
    (chunk id, base id) of its deltas), every field checked."""
    what = f"chunk index {name}"
    if len(plain) < CHUNK_INDEX_HEAD.size:
        raise IntegrityError(f"{what} is truncated")
    magic, version, n_packs, n_entries, n_deltas = CHUNK_INDEX_HEAD.unpack_from(plain)
    pos = CHUNK_INDEX_HEAD.size
    if magic != CHUNK_INDEX_MAGIC or version != FORMAT_VERSION:
        raise IntegrityError(f"{what} has a bad header")
    if len(plain) != pos + 32 * n_packs + ENTRY_DTYPE.itemsize * n_entries + BASE_ENTRY.size * n_deltas:
        raise IntegrityError(f"{what} has the wrong length")
    packs = np.frombuffer(plain, np.uint8, 32 * n_packs, pos).reshape(n_packs, 32).copy()
    pos += 32 * n_packs
    entries = np.frombuffer(plain, ENTRY_DTYPE, n_entries, pos)
    if n_entries and int(entries["pack"].max()) >= n_packs:
        raise IntegrityError(f"{what} names a pack it does not list")
    infos = entries["info"]
    is_delta = (infos & INFO_DELTA) != 0
    if (infos & INFO_RESERVED).any() or int(is_delta.sum()) != n_deltas:
        raise IntegrityError(f"{what} has damaged entry flags")
    side = np.frombuffer(plain, BASE_DTYPE, n_deltas, pos + ENTRY_DTYPE.itemsize * n_entries)
    order = side["row"].astype(np.int64)
    if n_deltas and ((np.diff(order) <= 0).any() or order[-1] >= n_entries or not is_delta[order].all()):
        raise IntegrityError(f"{what} has a damaged table of delta bases")
    rows = empty_rows(n_entries)
    rows.view(ROW_DTYPE)[:, 0] = entries
    if not ids_sorted(rows):
        raise damaged(what, "its entries are not sorted by chunk id")
    _check_entries(entries, what)
    bases = np.zeros((n_deltas, BASE_ROW_SIZE), np.uint8)
    if n_deltas:
        bases[:, :32] = rows[order, :32]
        bases[:, 32:] = np.frombuffer(side["base"].tobytes(), np.uint8).reshape(n_deltas, 32)
    return rows, packs, bases


def ids_sorted(rows: np.ndarray) -> bool:
    """Whether the rows' 32-byte ids never decrease (compared as four big-endian words, vectorised)."""
    if len(rows) < 2:
        return True
    words = np.ascontiguousarray(rows[:, :32]).view(">u8")
    before, after = words[:-1], words[1:]
    descends = np.zeros(len(before), bool)
    equal = np.ones(len(before), bool)
    for col in range(4):
        descends |= equal & (before[:, col] > after[:, col])
        equal &= before[:, col] == after[:, col]
    return not descends.any()


def _check_entries(entries: np.ndarray, what: str) -> None:
    """Every entry's blob inside a pack and its chunk 1 B .. 16 MiB (vectorised ``check_entry``)."""
    offset, length = entries["offset"].astype(np.int64), entries["length"].astype(np.int64)
    raw = entries["info"] & INFO_LENGTH_MASK
    bad = ((offset < PACK_HEADER.size) | (length < MIN_SEALED) | (offset + length > MAX_PACK_SIZE)
           | (raw < 1) | (raw > MAX_RAW_LENGTH))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        check_entry(what, row, int(offset[row]), int(length[row]), int(raw[row]))


def read_index_file(storage: Storage, envelope: Envelope, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    plain = envelope.open(OBJ_CHUNK_INDEX, index_file_id(name), storage.get(name), f"chunk index {name}")
    return decode_rows(plain, name)


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


def read_index_entries(storage: Storage, envelope: Envelope, name: str) -> list[tuple[bytes, BlobLocation]]:
    """One file's entries as (chunk id, location), every copy (repair)."""
    plain = envelope.open(OBJ_CHUNK_INDEX, index_file_id(name), storage.get(name), f"chunk index {name}")
    return decode_entries(plain, name)


def load_table(storage: Storage, envelope: Envelope, names: list[str], into: ChunkTable | None = None) -> ChunkTable:
    """The union of the index files ``names`` (added to ``into``), fetched and opened on threads."""
    buffer, packs, bases = RowBuffer(), [into.packs] if into is not None else [], []
    pack_count = len(into.packs) if into is not None else 0

    def fetch(name: str):
        try:
            return read_index_file(storage, envelope, name)
        except IntegrityError as exc:
            raise IntegrityError(exc.args[0], "run 'imgbackup repair --yes': it rebuilds the chunk index "
                                 "from the packs") from None

    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="imgbackup-index") as pool:
        for rows, file_packs, file_bases in pool.map(fetch, names):
            rows.view(ROW_DTYPE)[:, 0]["pack"] += pack_count
            buffer.append(rows)
            packs.append(file_packs)
            bases.append(file_bases)
            pack_count += len(file_packs)
    all_packs = np.concatenate(packs) if packs else np.zeros((0, 32), np.uint8)
    all_bases = np.concatenate(bases) if bases else np.zeros((0, BASE_ROW_SIZE), np.uint8)
    if into is None:
        return ChunkTable(buffer.take(), packs=all_packs, bases=all_bases)
    into.packs = all_packs
    into._pack_numbers = None
    into.add(buffer.take(), all_bases)
    return into


class Locations(Mapping):
    """``index.locations``: the handed-out copy of each chunk as a read-only mapping (id -> location)."""

    def __init__(self, index: ChunkIndex) -> None:
        self._index = index

    def __getitem__(self, chunk_id: bytes) -> BlobLocation:
        loc = self._index.get(chunk_id)
        if loc is None:
            raise KeyError(chunk_id)
        return loc

    def __contains__(self, chunk_id) -> bool:
        return self._index.get(chunk_id) is not None

    def __iter__(self) -> Iterator[bytes]:
        for cid, _ in self.items():
            yield cid

    def __len__(self) -> int:
        return len(self._index)

    def items(self):
        index = self._index
        for cid, loc in index.table.iter_rows():
            if cid not in index.recent and cid not in index._override:
                yield cid, loc
        for cid, loc in index._override.items():
            if loc is not None and cid not in index.recent:
                yield cid, loc
        yield from index.recent.items()


class ChunkIndex:
    """All known chunks of a repository: loaded once per command, grows as a backup stores packs."""

    def __init__(self, table: ChunkTable | None = None, files: list[str] | None = None) -> None:
        self.table = table if table is not None else ChunkTable()
        self.files: list[str] = list(files or [])
        self.recent: dict[bytes, BlobLocation] = {}     # stored by this process since the load
        self.excluded: dict[bytes, DamagedCopy] = {}     # chunks with no usable copy: why
        self.bad_copies: list[DamagedCopy] = []          # every listed copy not handed out as bad
        self.marked = 0                                  # copies not handed out: a collection's candidates
        self.packs_checked = False                       # copies in absent packs were excluded
        self._override: dict[bytes, BlobLocation | None] = {}   # chunk -> the copy exclude() left (None: none)
        self._dropped: dict[bytes, set[tuple[bytes, int]]] = {}  # chunk -> copies exclude() took out
        self._lock = threading.RLock()

    @classmethod
    def load(cls, storage: Storage, envelope: Envelope, damage: DamageLog | None = None,
             packs: set[str] | Callable[[], set[str]] | None = None, cache: IndexCache | None = None,
             marked: list[tuple[bytes, bytes, int]] | None = None) -> ChunkIndex:
        """The union of all index files: from ``cache`` when it matches the listing (plus the files
        added since), else read whole (and the cache rewritten). Then, without the copies ``damage``
        names, (when ``packs``, the listing of packs/, is given) the copies in packs it lacks, and the
        copies ``marked`` (marks.marked_copies: (chunk id, pack id, offset) rows) flags. ``packs`` may
        be a function listing them: it is called after the listing of index/, so every pack an index
        file names was stored before the pack listing (a backup writes its packs, then its file).
        A file that vanishes between list and read (a compaction or repair replaced it, FORMAT.md
        section 9) means a new one exists: list and load again."""
        for attempt in range(LOAD_ATTEMPTS):
            names = sorted(storage.list(INDEX_FOLDER))
            try:
                table = _read_tables(storage, envelope, names, cache)
                break
            except ObjectMissing:
                if attempt == LOAD_ATTEMPTS - 1:
                    raise
        if callable(packs):
            packs = packs()
        index = cls(table, names)
        index._filter(damage, packs, marked)
        return index

    # --- what is not handed out ------------------------------------------------------------------

    def _filter(self, damage: DamageLog | None, packs: set[str] | None, marked) -> None:
        table = self.table
        keep = [np.ones(len(table.rows), bool), np.ones(len(table.spare), bool)]
        pack_of = [field(table.rows, "pack"), field(table.spare, "pack")]
        if packs is not None:
            present = {name.rsplit("/", 1)[1] for name in packs}
            ok = np.array([p.tobytes().hex() in present for p in table.packs], bool)
            for which in (0, 1):
                gone = ~ok[pack_of[which]] if len(ok) else np.zeros(len(keep[which]), bool)
                for row in np.flatnonzero(gone).tolist():
                    cid, loc = self._row(which, row)
                    self.bad_copies.append(DamagedCopy(cid, loc.pack_id, loc.offset, loc.length, "missing",
                                                       f"pack {loc.pack_id.hex()[:16]} is not in the repository"))
                keep[which] &= ~gone
            self.packs_checked = True
        if damage is not None and damage.copies:
            for bad in damage.copies.values():
                for which, row in self._rows_of(bad.chunk_id, bad.pack_id, bad.offset):
                    if keep[which][row]:
                        keep[which][row] = False
                        self.bad_copies.append(bad)
        if marked is not None and len(marked):
            for cid, pid, offset in marked:
                for which, row in self._rows_of(cid, pid, offset):
                    if keep[which][row]:
                        keep[which][row] = False
                        self.marked += 1
        if not (keep[0].all() and keep[1].all()):
            table.remove(keep[0], keep[1])
        self.excluded = {bad.chunk_id: bad for bad in reversed(self.bad_copies)
                         if table.get(bad.chunk_id) is None}
        for bad in (damage.copies.values() if damage else ()):   # recorded, and no longer listed
            if table.get(bad.chunk_id) is None:
                self.excluded.setdefault(bad.chunk_id, bad)
        self._drop_deltas_without_base()

    def _row(self, which: int, row: int) -> tuple[bytes, BlobLocation]:
        rows = self.table.rows if which == 0 else self.table.spare
        r = rows[row].view(ROW_DTYPE)[0]
        cid = r["id"].tobytes()
        return cid, self.table._location(cid, r)

    def _rows_of(self, chunk_id: bytes, pack_id: bytes, offset: int) -> list[tuple[int, int]]:
        """(0 = handed out / 1 = spare, row) of the copy of ``chunk_id`` at (pack, offset)."""
        out = []
        for which, rows in ((0, self.table.rows), (1, self.table.spare)):
            if not len(rows):
                continue
            row = int(kernels.table_lookup(rows, kernels.table_directory(rows, kernels.directory_bits(len(rows)))
                                           if which else self.table._dir, np.frombuffer(chunk_id, np.uint8)
                                           .reshape(1, 32))[0])
            while 0 <= row < len(rows) and rows[row, :32].tobytes() == chunk_id:
                cid, loc = self._row(which, row)
                if (loc.pack_id, loc.offset) == (pack_id, offset):
                    out.append((which, row))
                row += 1
        return out

    def _drop_deltas_without_base(self) -> None:
        """A delta whose base has no usable copy cannot be read: stop handing it out (a spare copy
        may take over). Not recorded: the delta's own bytes are fine, and come back with its base."""
        for _ in range(4):      # deltas are depth one: a second pass only sees promoted spares
            table = self.table
            if not len(table.rows) or not len(table.bases):
                return
            deltas = np.flatnonzero(field(table.rows, "info") & INFO_DELTA)
            if not len(deltas):
                return
            ids = np.ascontiguousarray(table.rows[deltas, :32])
            at = kernels.table_lookup(table.bases, table._bases_dir, ids)
            base_ids = np.where((at >= 0)[:, None], table.bases[np.maximum(at, 0), 32:], 0).astype(np.uint8)
            orphan = (at < 0) | ~(table.contains(base_ids) | self._recent_mask(base_ids))
            if not orphan.any():
                return
            keep = np.ones(len(table.rows), bool)
            keep[deltas[orphan]] = False
            for row in deltas[orphan].tolist():
                cid, loc = self._row(0, row)
                self.excluded[cid] = DamagedCopy(cid, loc.pack_id, loc.offset, loc.length, "damaged",
                                                 f"its base chunk {(loc.base or bytes(32)).hex()[:16]} has no "
                                                 "usable copy")
            table.remove(keep)
            for cid in list(self.excluded):
                if table.get(cid) is not None:
                    del self.excluded[cid]

    def _recent_mask(self, ids: np.ndarray) -> np.ndarray:
        if not self.recent:
            return np.zeros(len(ids), bool)
        return np.array([i.tobytes() in self.recent for i in ids], bool)

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
        usable copy go too. The table itself is not changed (other threads search it without a
        lock): the chunk's copy is overridden."""
        with self._lock:
            loc = self.get(bad.chunk_id)
            if loc is None or (loc.pack_id, loc.offset) != (bad.pack_id, bad.offset):
                return
            if record:
                self.bad_copies.append(bad)
            cid = bad.chunk_id
            self._dropped.setdefault(cid, set()).add((bad.pack_id, bad.offset))
            if self.recent.get(cid) == loc:
                del self.recent[cid]
            copies = [c for c in [self.table.get(cid), *self.table.spares_of(cid)]
                      if c is not None and (c.pack_id, c.offset) not in self._dropped[cid]]
            copies.sort(key=lambda c: c.base is not None)
            self._override[cid] = copies[0] if copies else None
            if copies:
                return
            self.excluded[cid] = bad
            dependents = self._dependents_of(cid)
        for dep in dependents:
            dep_loc = self.get(dep)
            if dep_loc is not None and dep_loc.base == cid:
                self.exclude(DamagedCopy(dep, dep_loc.pack_id, dep_loc.offset, dep_loc.length, "damaged",
                                         f"its base chunk {cid.hex()[:16]} has no usable copy"), record=False)

    def _dependents_of(self, base: bytes) -> list[bytes]:
        """The chunks with a delta copy against ``base`` (a scan of the base table: rare)."""
        bases = self.table.bases
        hits = np.flatnonzero((bases[:, 32:] == np.frombuffer(base, np.uint8)).all(axis=1)) if len(bases) else []
        out = [bases[i, :32].tobytes() for i in hits]
        return out + [cid for cid, loc in self.recent.items() if loc.base == base]

    # --- lookups ---------------------------------------------------------------------------------

    def __contains__(self, chunk_id: bytes) -> bool:
        return self.get(chunk_id) is not None

    def __len__(self) -> int:
        gone = sum(1 for cid, loc in self._override.items() if loc is None and cid not in self.recent)
        return len(self.table) - gone + sum(1 for cid in self.recent if self.table.get(cid) is None)

    @property
    def locations(self) -> Locations:
        return Locations(self)

    @property
    def spare(self) -> list[tuple[bytes, BlobLocation]]:
        """Every further valid copy, not handed out (objects: for collection and tests)."""
        return list(self.table.iter_rows("spare"))

    def get(self, chunk_id: bytes) -> BlobLocation | None:
        loc = self.recent.get(chunk_id)
        if loc is not None:
            return loc
        if chunk_id in self._override:
            return self._override[chunk_id]
        return self.table.get(chunk_id)

    def known(self, ids: np.ndarray) -> np.ndarray:
        """For an (m, 32) array of ids: which are known (one native lookup, plus this run's own)."""
        found = self.table.contains(ids)
        if self._override:
            for i in range(len(ids)):
                cid = ids[i].tobytes()
                if cid in self._override:
                    found[i] = self._override[cid] is not None
        if self.recent:
            for i in np.flatnonzero(~found).tolist():
                found[i] = ids[i].tobytes() in self.recent
        return found

    def packs(self) -> set[bytes]:
        """Ids of the packs some usable copy lies in (handed out or spare, or stored by this process)."""
        with self._lock:
            table = self.table
            used = np.unique(np.concatenate([field(table.rows, "pack"), field(table.spare, "pack")]))
            out = {table.packs[i].tobytes() for i in used.tolist()}
            out.update(loc.pack_id for loc in self.recent.values())
            out.update(loc.pack_id for loc in self._override.values() if loc is not None)
        return out

    def bases_of(self, chunk_ids) -> set[bytes]:
        """The base chunks the deltas among ``chunk_ids`` need (GC keeps them, restore reads them)."""
        out = set()
        for cid in chunk_ids:
            loc = self.get(cid)
            if loc is not None and loc.base is not None:
                out.add(loc.base)
        return out

    def store(self, storage: Storage, envelope: Envelope, new: dict[bytes, BlobLocation],
              names: list[str] | None = None) -> int:
        """Write a chunk-index file for ``new`` and add it; returns the bytes written."""
        if not new:
            return 0
        names, written = write_index_files(storage, envelope, list(new.items()), names)
        for cid, loc in new.items():
            old = self.recent.get(cid)
            if old is None or old.base is not None or loc.base is None:
                self.recent[cid] = loc
            self.excluded.pop(cid, None)
        self.files.extend(names)
        return written


def _read_tables(storage: Storage, envelope: Envelope, names: list[str], cache: IndexCache | None) -> ChunkTable:
    """The union of the files ``names``: the cache plus the files added since when it matches the
    listing, else every file (and the cache rewritten). The cached table changes only once every
    added file was read, so an ObjectMissing leaves it as it was."""
    table = cache.load(names) if cache is not None else None
    if table is None:
        table = load_table(storage, envelope, names)
        if cache is not None:
            cache.save(table, names)
        return table
    added = [n for n in names if n not in cache.names]
    if added:
        load_table(storage, envelope, added, table)
        if cache.worth_saving(len(added)):
            cache.save(table, names)
    return table

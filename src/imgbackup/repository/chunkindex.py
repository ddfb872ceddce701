"""ChunkIndex: where each stored chunk lives, from the chunk-index files, as a sorted native table.

Each backup writes one chunk-index file (indexfile.py: their codec, reading and writing) for the packs it stored, after those packs and before its
image index. Chunks in packs that no index file names (a backup killed in between) are unknown, so
the next backup simply stores them again.

The union of the files is held as a ``ChunkTable`` (chunktable.py: 48 bytes per chunk, lookups of a
whole segment of ids in one native call) and kept in a local cache (indexcache.py) that is used
only while the listing of ``index/`` matches it, plus the files added since. A chunk may have
several copies (stored twice by two hosts at once, or again after an interrupted backup): all are
valid; one is handed out (a whole copy before a delta: a base must be whole), the others are spare.
Copies named by a damage record, copies in packs that no longer exist (when the caller lists the
packs; a backup instead checks just the packs it uses, packcheck.py) and copies a collection has
marked as candidates (marks.py) are never handed out: a chunk all
of whose copies are bad is ``excluded`` (absent, with the reason kept for messages), and a backup
stores it again. A delta whose base has no usable copy is unusable too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from imgbackup._core import table as kernels
from imgbackup.crypto.envelope import Envelope
from imgbackup.format.layout import INFO_DELTA
from imgbackup.repository.chunktable import ROW_DTYPE, ChunkTable, field
from imgbackup.repository.damage import DamagedCopy, DamageLog
from imgbackup.repository.indexcache import IndexCache
from imgbackup.repository.indexfile import INDEX_FOLDER, load_table, write_index_files
from imgbackup.repository.packs import BlobLocation
from imgbackup.repository.storage import ObjectMissing, Storage

LOAD_ATTEMPTS = 5   # a compaction replaces index files while backups load them; five lists outlast any real race


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
        self._override: dict[bytes, BlobLocation | None] = {}   # chunk -> the copy exclude() left (None: none)
        self._dropped: dict[bytes, set[tuple[bytes, int]]] = {}  # chunk -> copies exclude() took out
        self._lock = threading.RLock()
        self.listed_packs: set[str] | None = None        # the listing of packs/ load() filtered by, if any

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
        index.listed_packs = packs
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
        for i in self._rows_in(ids, self._override.keys()):
            found[i] = self._override[ids[i].tobytes()] is not None
        if self.recent:
            for i in np.flatnonzero(~found).tolist():
                found[i] = ids[i].tobytes() in self.recent
        return found

    def copy_packs(self, ids: np.ndarray) -> np.ndarray:
        """For an (m, 32) array of ids: the (m, 32) pack ids of the copies handed out (zeros where a
        chunk has none). One native lookup; this run's own and overridden copies looked up apart."""
        table = self.table
        rows = table.find(ids)
        out = np.zeros((len(ids), 32), np.uint8)
        found = rows >= 0
        if len(table.packs):
            out[found] = table.packs[field(table.rows, "pack")[rows[found]]]
        for i in self._rows_in(ids, self._override.keys() | self.recent.keys()):
            loc = self.get(ids[i].tobytes())
            out[i] = np.frombuffer(loc.pack_id, np.uint8) if loc is not None else 0
        return out

    def delta_bases(self, ids: np.ndarray) -> np.ndarray:
        """The (k, 32) base ids of the deltas among the copies handed out for ``ids``."""
        table = self.table
        rows = table.find(ids)
        found = rows >= 0
        delta = np.zeros(len(ids), bool)
        delta[found] = (field(table.rows, "info")[rows[found]] & INFO_DELTA) != 0
        bases = []
        for i in self._rows_in(ids, self._override.keys() | self.recent.keys()):
            delta[i] = False
            loc = self.get(ids[i].tobytes())
            if loc is not None and loc.base is not None:
                bases.append(loc.base)
        picked = np.ascontiguousarray(ids[delta])
        if len(picked) and len(table.bases):
            at = kernels.table_lookup(table.bases, table._bases_dir, picked)
            picked = np.ascontiguousarray(table.bases[at[at >= 0], 32:])
        extra = np.frombuffer(b"".join(bases), np.uint8).reshape(-1, 32)
        return np.concatenate([picked.reshape(-1, 32), extra]) if len(extra) else picked.reshape(-1, 32)

    @staticmethod
    def _rows_in(ids: np.ndarray, chunk_ids) -> list[int]:
        """Where in the (m, 32) ``ids`` the few ``chunk_ids`` (this run's own or overridden copies)
        are: one vectorised membership test, not a Python step per id."""
        if not chunk_ids or not len(ids):
            return []
        wanted = np.frombuffer(b"".join(chunk_ids), np.uint8).reshape(-1, 32)
        rows = np.ascontiguousarray(ids, np.uint8).reshape(-1, 32)
        return np.flatnonzero(np.isin(rows.view(np.void(32)).ravel(), wanted.view(np.void(32)).ravel())).tolist()

    def relocate(self, chunk_id: bytes, loc: BlobLocation) -> None:
        """Hand out ``loc`` for ``chunk_id`` from now on: its copy moved (a compaction rewrote its pack
        after this index was loaded); the old copy is never handed out again."""
        with self._lock:
            old = self.get(chunk_id)
            if old is not None:
                self._dropped.setdefault(chunk_id, set()).add((old.pack_id, old.offset))
            self._override[chunk_id] = loc
            self.excluded.pop(chunk_id, None)

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

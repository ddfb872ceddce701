"""The collection plan's view of the chunk table: copies named by number, not as objects.

A *ref* is an int64 naming one copy of the loaded table: ``r < len(rows)`` is handed-out row ``r``,
otherwise spare row ``r - len(rows)``. A copy's *key* is the row number of its chunk id in ``rows``
(every spare id is also in ``rows``), so comparing keys compares ids, and keys sort as ids do. Packs
are numbered by their place in the pack listing (``canon``). The plan keeps refs in numpy arrays
(8 bytes a copy) and makes objects only for what it hands to code that reads packs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from imgbackup._core import table as kernels
from imgbackup.crypto.envelope import Envelope
from imgbackup.format.layout import OBJ_CHUNK_INDEX
from imgbackup.repository.chunktable import BASE_ROW_SIZE, ROW_DTYPE, ChunkTable, sort_rows
from imgbackup.repository.chunktable import field as row_field
from imgbackup.repository.indexfile import INDEX_FOLDER, MAX_ENTRIES_PER_FILE, encode_rows
from imgbackup.repository.packs import BlobLocation
from imgbackup.repository.storage import Storage, confirm_stored

SLICE = 1 << 20     # refs converted at once: temporaries of ~8 MiB each, not of the whole plan


def last_of_each(keys: np.ndarray) -> np.ndarray:
    """Positions of the last occurrence of each distinct key, in key order (dict assignment semantics)."""
    if len(keys) > 1 and (keys[1:] > keys[:-1]).all():
        return np.arange(len(keys))                     # sorted and distinct already (one pass, no sort)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    last = np.ones(len(order), bool)
    last[:-1] = ordered[:-1] != ordered[1:]
    return order[last]


def _distinct(ordered: np.ndarray) -> np.ndarray:
    """A sorted array without repeats (a copy only when there are some)."""
    if len(ordered) < 2:
        return ordered
    repeats = ordered[1:] == ordered[:-1]
    return ordered[np.concatenate([~repeats, [True]])] if repeats.any() else ordered


class PlanTable:
    """The loaded table, its packs numbered by the listing (``names``: ``packs/<hex>`` in listing order)."""

    def __init__(self, table: ChunkTable, names: list[str]) -> None:
        self.table, self.n_rows, self.names = table, len(table.rows), names
        self.packs = np.zeros((len(names), 32), np.uint8)     # pack ids by listing number (no object each)
        valid = np.zeros(len(names), bool)
        for i, name in enumerate(names):
            hexid = name.rsplit("/", 1)[1]
            if len(hexid) == 64:
                self.packs[i] = np.frombuffer(bytes.fromhex(hexid), np.uint8)
                valid[i] = True
        lookup = np.zeros((int(valid.sum()), 36), np.uint8)   # (pack id, listing number u32): sorted, searched natively
        lookup[:, :32] = self.packs[valid]
        lookup[:, 32:] = np.flatnonzero(valid).astype("<u4").view(np.uint8).reshape(-1, 4)
        if len(lookup) > 1:
            kernels.table_sort(lookup)
        self._lookup = lookup
        self._lookup_dir = kernels.table_directory(lookup, kernels.directory_bits(len(lookup)))
        self.canon = self.number_of(table.packs)
        self._spare_keys: np.ndarray | None = None

    def number_of(self, pack_ids: np.ndarray) -> np.ndarray:
        """The listing number of each pack id of an (m, 32) array, -1 for a pack not listed."""
        pack_ids = np.ascontiguousarray(pack_ids, np.uint8).reshape(-1, 32)
        at = kernels.table_lookup(self._lookup, self._lookup_dir, pack_ids)
        numbers = self._lookup[np.maximum(at, 0), 32:].copy().view("<u4")[:, 0].astype(np.int64) \
            if len(self._lookup) else np.zeros(len(at), np.int64)
        return np.where(at >= 0, numbers, -1)

    def number_one(self, pack_id: bytes) -> int:
        if len(pack_id) != 32:
            return -1
        return int(self.number_of(np.frombuffer(pack_id, np.uint8))[0])

    def pack_id(self, number: int) -> bytes:
        """The pack id as its listed name spells it."""
        return bytes.fromhex(self.names[number].rsplit("/", 1)[1])

    def all_places(self) -> tuple[np.ndarray, np.ndarray]:
        """(place, sealed length) of every copy, handed-out rows then spare ones (ref order)."""
        parts, lengths = [], []
        for rows in (self.table.rows, self.table.spare):
            place = self.canon[row_field(rows, "pack")]
            place <<= 32
            place |= row_field(rows, "offset")
            parts.append(place)
            lengths.append(row_field(rows, "length"))
        return np.concatenate(parts), np.concatenate(lengths)

    def rows_of(self, refs: np.ndarray) -> np.ndarray:
        """The table rows of ``refs`` (a copy), pack numbers made canonical."""
        refs = np.asarray(refs, np.int64)
        out = np.empty((len(refs), 48), np.uint8)
        spare = refs >= self.n_rows
        out[~spare] = self.table.rows[refs[~spare]]
        out[spare] = self.table.spare[refs[spare] - self.n_rows]
        view = out.view(ROW_DTYPE)[:, 0]
        view["pack"] = self.canon[view["pack"].astype(np.int64)]
        return out

    def column(self, refs: np.ndarray, name: str) -> np.ndarray:
        refs = np.asarray(refs, np.int64)
        spare = refs >= self.n_rows
        out = np.empty(len(refs), np.int64)
        out[~spare] = row_field(self.table.rows, name)[refs[~spare]]
        out[spare] = row_field(self.table.spare, name)[refs[spare] - self.n_rows]
        return self.canon[out] if name == "pack" else out

    def keys(self, refs: np.ndarray) -> np.ndarray:
        keys = np.array(refs, np.int64)
        if self._spare_keys is None:
            spare = self.table.spare
            self._spare_keys = self.table.find(spare[:, :32]) if len(spare) else np.zeros(0, np.int64)
        spare_at = np.flatnonzero(keys >= self.n_rows)
        keys[spare_at] = self._spare_keys[keys[spare_at] - self.n_rows]
        return keys

    def latest(self, seq: np.ndarray) -> np.ndarray:
        """The refs of ``seq`` with one per chunk — the last — sorted by key (dict assignment order).
        Handed-out rows are their own key and distinct, so only the chunks with a spare copy in
        ``seq`` are sorted out one by one; the rest is one in-place sort."""
        spare = seq >= self.n_rows
        if not spare.any():
            return _distinct(np.sort(seq))
        spare_at = np.flatnonzero(spare)
        chunk_has_spare = np.zeros(self.n_rows + len(self.table.spare), bool)   # indexable by any ref
        chunk_has_spare[self.keys(seq[spare_at])] = True
        clash = chunk_has_spare[seq]
        del chunk_has_spare
        clash &= ~spare                               # rows refs whose chunk has a spare copy in seq
        involved = np.sort(np.concatenate([np.flatnonzero(clash), spare_at]))
        winners = seq[involved[last_of_each(self.keys(seq[involved]))]]
        clash |= spare
        del spare
        base = seq[~clash]
        del clash
        base.sort()
        base = _distinct(base)
        winner_keys = self.keys(winners)
        order = np.argsort(winner_keys)
        return np.insert(base, np.searchsorted(base, winner_keys[order]), winners[order])

    def places(self, refs: np.ndarray) -> np.ndarray:
        """(pack number << 32 | offset) of each copy: where its blob is."""
        out = np.empty(len(refs), np.int64)
        for at in range(0, len(refs), SLICE):       # in slices: the temporaries stay small
            part = refs[at : at + SLICE]
            out[at : at + SLICE] = (self.column(part, "pack") << 32) | self.column(part, "offset")
        return out

    def pack_numbers(self, refs: np.ndarray) -> np.ndarray:
        """The pack number of each copy, as int32 (sorting by it moves half the bytes)."""
        out = np.empty(len(refs), np.int32)
        for at in range(0, len(refs), SLICE):
            out[at : at + SLICE] = self.column(refs[at : at + SLICE], "pack")
        return out

    def entries(self, refs: np.ndarray) -> list[tuple[bytes, BlobLocation]]:
        """The copies as (chunk id, location) objects: for one pack at a time, or tests."""
        table, out = self.table, []
        for ref in np.asarray(refs, np.int64).tolist():
            r = (table.rows[ref] if ref < self.n_rows else table.spare[ref - self.n_rows]).view(ROW_DTYPE)[0]
            cid = r["id"].tobytes()
            out.append((cid, table._location(cid, r)))
        return out

    def key_of(self, chunk_ids: Iterable[bytes]) -> np.ndarray:
        ids = list(chunk_ids)
        if not ids:
            return np.zeros(0, np.int64)
        return self.table.find(np.frombuffer(b"".join(ids), np.uint8).reshape(-1, 32))


class IndexRows(Mapping):
    """The next chunk index: table copies (refs, one per chunk, in key order) and ``extra`` copies
    not in the table (adopted from trailers, or just copied). A read-only mapping id -> location."""

    def __init__(self, source: PlanTable, refs: np.ndarray, extra: dict[bytes, BlobLocation] | None = None) -> None:
        self.source, self.refs = source, np.asarray(refs, np.int64)
        self.extra = dict(extra or {})
        self._cached_keys: np.ndarray | None = None

    @property
    def _keys(self) -> np.ndarray:
        """The chunk key of each ref (sorted); only computed when asked (rows refs are their own key)."""
        if self._cached_keys is None:
            self._cached_keys = self.source.keys(self.refs)
        return self._cached_keys

    def overridden(self, refs: list[np.ndarray], extra: dict[bytes, BlobLocation]) -> IndexRows:
        """This index with ``refs`` (in order) and ``extra`` put over it: a later copy of a chunk wins."""
        parts = [p for p in [self.refs, *refs] if len(p)]
        seq = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else self.refs
        out = IndexRows(self.source, self.source.latest(seq), {**self.extra, **extra})
        return out.without(extra.keys(), refs_only=True)

    def without(self, chunk_ids: Iterable[bytes], refs_only: bool = False) -> IndexRows:
        ids = list(chunk_ids)
        if not ids:
            return self
        gone = self.source.key_of(ids)
        keep = ~np.isin(self._keys, gone[gone >= 0])
        extra = self.extra if refs_only else {c: loc for c, loc in self.extra.items() if c not in set(ids)}
        return IndexRows(self.source, self.refs[keep], extra)

    def __len__(self) -> int:
        return len(self.refs) + len(self.extra)

    def __contains__(self, chunk_id: object) -> bool:
        if chunk_id in self.extra:
            return True
        if not isinstance(chunk_id, bytes) or len(chunk_id) != 32:
            return False
        key = int(self.source.key_of([chunk_id])[0])
        at = int(np.searchsorted(self._keys, key))
        return key >= 0 and at < len(self._keys) and int(self._keys[at]) == key

    def __getitem__(self, chunk_id: bytes) -> BlobLocation:
        if chunk_id in self.extra:
            return self.extra[chunk_id]
        if chunk_id not in self:
            raise KeyError(chunk_id)
        key = int(self.source.key_of([chunk_id])[0])
        return self.source.entries(self.refs[np.searchsorted(self._keys, key) : np.searchsorted(self._keys, key) + 1])[0][1]

    def __iter__(self) -> Iterator[bytes]:
        for cid, _ in self.items():
            yield cid

    def items(self):  # type: ignore[override]
        """Every entry as objects (small indexes, tests)."""
        yield from self.source.entries(self.refs)
        yield from self.extra.items()

    def table_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows sorted by id, pack ids, base table) of the whole index, for writing it."""
        source = self.source
        packs = [source.packs]
        number = {}
        extra = np.zeros((len(self.extra), 48), np.uint8)
        bases = [source.table.bases]
        view = extra.view(ROW_DTYPE)[:, 0] if len(extra) else None
        for i, (cid, loc) in enumerate(self.extra.items()):
            n = source.number_one(loc.pack_id)
            n = number.get(loc.pack_id) if n < 0 else n
            if n is None:
                n = number[loc.pack_id] = len(source.packs) + len(number)
                packs.append(np.frombuffer(loc.pack_id, np.uint8).reshape(1, 32))
            view[i] = (cid, n, loc.offset, loc.length, loc.raw_length | ((1 << 31) if loc.base else 0))
            if loc.base is not None:
                bases.append(np.frombuffer(cid + loc.base, np.uint8).reshape(1, BASE_ROW_SIZE))
        rows = np.concatenate([source.rows_of(self.refs), extra])
        sort_rows(rows)
        base_table = np.concatenate(bases)
        if len(base_table) > 1:
            kernels.table_sort(base_table)
        return rows, np.concatenate(packs), base_table

    def write(self, storage: Storage, envelope: Envelope, names: list[str]) -> int:
        """Store the index as new chunk-index file(s) of at most MAX_ENTRIES_PER_FILE; the bytes written.
        Each name is appended to ``names`` before its file is written (for a clean-up after a failure)."""
        rows, packs, bases = self.table_rows()
        written = 0
        for start in range(0, len(rows), MAX_ENTRIES_PER_FILE):
            file_id = os.urandom(32)
            name = f"{INDEX_FOLDER}/{file_id.hex()}"
            part = np.ascontiguousarray(rows[start : start + MAX_ENTRIES_PER_FILE])
            sealed = envelope.seal(OBJ_CHUNK_INDEX, file_id, encode_rows(part, packs, bases))
            names.append(name)
            storage.put(name, sealed)
            confirm_stored(storage, name, len(sealed))
            written += len(sealed)
        return written

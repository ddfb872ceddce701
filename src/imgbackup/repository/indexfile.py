"""Chunk-index files: the on-disk codec (FORMAT.md, chunk index objects) and their reading and
writing, as arrays (``decode_rows``/``encode_rows``: millions of entries, vectorised, every field
checked) or as objects (``decode_entries``: tests, repair). chunkindex.py builds the in-memory
index from them."""

from __future__ import annotations

import os
from collections.abc import Iterable
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
from imgbackup.repository.bounded import bounded_map
from imgbackup.repository.chunktable import (
    BASE_ROW_SIZE,
    ROW_DTYPE,
    BucketRows,
    ChunkTable,
    RowBuffer,
    empty_rows,
)
from imgbackup.repository.packs import MAX_RAW_LENGTH, MIN_SEALED, BlobLocation, check_entry, encode_entries
from imgbackup.repository.storage import Storage, confirm_stored, object_sizes

ENTRY_DTYPE = np.dtype([("id", "V32"), ("pack", "<u4"), ("offset", "<u4"), ("length", "<u4"), ("info", "<u4")])
assert ENTRY_DTYPE.itemsize == CHUNK_INDEX_ENTRY.size == 48 and ENTRY_DTYPE == ROW_DTYPE
BASE_DTYPE = np.dtype([("row", "<u4"), ("base", "V32")])
assert BASE_DTYPE.itemsize == BASE_ENTRY.size
INDEX_FOLDER = "index"
READ_THREADS = 8             # index files fetched at once: a bucket answers each GET in ~10 ms
READ_AHEAD = 2 * READ_THREADS   # opened files waiting to be taken in, at most: each holds its plaintext
                                # (10^7 chunks: 760 MiB peak when all of them could queue)
MAX_ENTRIES_PER_FILE = 1 << 20   # ~50 MiB per file: a merged index of a huge repository stays in pieces
BUCKET_MIN_FILES = 16        # from this many files a new table gathers rows by first id byte as they arrive


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


def decode_rows(plain: bytes, name: str, copy: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One file's plaintext as (rows with the file's own pack numbers, pack ids (P, 32), base rows
    (chunk id, base id) of its deltas), every field checked. ``copy=False``: the rows are a
    read-only view of ``plain`` (one copy of every row fewer when they are copied on anyway)."""
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
    if copy:
        rows = empty_rows(n_entries)
        rows.view(ROW_DTYPE)[:, 0] = entries
    else:
        rows = np.frombuffer(plain, np.uint8, ENTRY_DTYPE.itemsize * n_entries, pos).reshape(n_entries, ENTRY_DTYPE.itemsize)
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


def read_index_file(storage: Storage, envelope: Envelope, name: str,
                    copy: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    plain = envelope.open(OBJ_CHUNK_INDEX, index_file_id(name), storage.get(name), f"chunk index {name}")
    return decode_rows(plain, name, copy)


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


def _expected_rows(storage: Storage, names: list[str]) -> int:
    """At most this many entries in the files ``names``: their sizes over the 32 bytes of a chunk
    id, which no compression shrinks (ids are keyed hashes). One listing with sizes (on a bucket it
    holds them already)."""
    sizes = object_sizes(storage, INDEX_FOLDER)
    return sum(sizes.get(name, 0) for name in names) // 32


def load_table(storage: Storage, envelope: Envelope, names: list[str], into: ChunkTable | None = None) -> ChunkTable:
    """The union of the index files ``names`` (added to ``into``), fetched and opened on threads.
    Many files into a new table: gathered by first id byte as they arrive (BucketRows)."""
    buckets = BucketRows(_expected_rows(storage, names)) if into is None and len(names) >= BUCKET_MIN_FILES else None
    buffer, packs, bases = RowBuffer(), [into.packs] if into is not None else [], []
    pack_count = len(into.packs) if into is not None else 0

    def fetch(name: str):
        try:
            return read_index_file(storage, envelope, name, copy=buckets is None)   # buckets copy the rows
        except IntegrityError as exc:
            raise IntegrityError(exc.args[0], "run 'imgbackup repair --yes': it rebuilds the chunk index "
                                 "from the packs") from None

    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="imgbackup-index") as pool:
        for rows, file_packs, file_bases in bounded_map(pool, fetch, names, lambda _name: 1, READ_AHEAD):
            if buckets is not None:
                buckets.add(rows, pack_count)
            else:
                rows.view(ROW_DTYPE)[:, 0]["pack"] += pack_count
                buffer.append(rows)
            packs.append(file_packs)
            bases.append(file_bases)
            pack_count += len(file_packs)
    all_packs = np.concatenate(packs) if packs else np.zeros((0, 32), np.uint8)
    all_bases = np.concatenate(bases) if bases else np.zeros((0, BASE_ROW_SIZE), np.uint8)
    if buckets is not None:
        return ChunkTable(buckets.take(), packs=all_packs, bases=all_bases, grouped_sorted=True)
    if into is None:
        return ChunkTable(buffer.take(), packs=all_packs, bases=all_bases)
    into.packs = all_packs
    into._pack_numbers = None
    into.add(buffer.take(), all_bases)
    return into

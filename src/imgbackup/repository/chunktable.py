"""The chunk index in memory: sorted 48-byte rows, one per stored copy of a chunk, searched natively.

A row is (chunk id 32, pack number u32, offset u32, sealed length u32, info u32) — the format-2
index entry (docs/FORMAT.md §6); ``info`` is the plaintext length with bit 31 set for a delta. Pack
numbers index ``packs`` (32-byte ids); the bases of delta chunks sit in a side table of (chunk id,
base id). ``rows`` holds the copy handed out for each chunk (a whole copy before a delta, then by
pack and offset), ``spare`` every further copy: all are valid, and garbage collection sees them all.

Lookups take a whole array of ids at once (``find``): the native kernel bisects a prefix directory,
~0.3 µs per id for 10^7 rows, without a Python object per chunk. Memory: 48 bytes per chunk, plus
32 per pack and 0.5 for the directory.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from imgbackup._core import table as kernels
from imgbackup.repository.packs import BlobLocation

ROW_SIZE = 48
BASE_ROW_SIZE = 64
INFO_DELTA = 1 << 31
INFO_LENGTH_MASK = (1 << 25) - 1
ROW_DTYPE = np.dtype([("id", "V32"), ("pack", "<u4"), ("offset", "<u4"), ("length", "<u4"), ("info", "<u4")])
assert ROW_DTYPE.itemsize == ROW_SIZE
BUCKET_SIGMAS = 8           # a bucket's room above its expected share of uniform ids: overflow (a spill,
                            # then one slower sort) is then astronomically rare; unused room is never touched
GROWTH_DIVISOR = 8          # a RowBuffer grows by 1/8: resize zero-fills (touches) what it adds, so doubling
                            # would make 10^7 rows (480 MB) resident as 805 MB; mremap makes each growth cheap
SORT_THREADS = 2            # the first-byte groups are sorted on this many threads (this machine class: 2 cores)


def _keep_big_arrays_in_one_mapping() -> None:
    """numpy madvises the aligned interior of a big array to transparent huge pages, which splits
    its mapping in three; mremap then fails (EFAULT) and realloc copies, so a 480 MB table briefly
    needs 960 MB at every growth. Without it a growth stays in place (10^7 rows grown by 5,000:
    peak RSS 939 -> 482 MiB)."""
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        with contextlib.suppress(ImportError, AttributeError):
            importlib.import_module(module)._set_madvise_hugepage(False)
            return


_keep_big_arrays_in_one_mapping()


def empty_rows(n: int = 0) -> np.ndarray:
    return np.zeros((n, ROW_SIZE), np.uint8)


def sort_rows(rows: np.ndarray) -> None:
    """Sort rows in place: one partition pass by the first id byte, then the 256 groups on threads."""
    if len(rows) < 1 << 16:
        kernels.table_sort(rows)
        return
    sort_groups(rows, kernels.table_partition(rows).tolist())


def sort_groups(rows: np.ndarray, starts: list[int]) -> None:
    """Sort rows already grouped by first id byte (group b is rows ``starts[b]:starts[b + 1]``)."""
    groups = [rows[starts[b] : starts[b + 1]] for b in range(256) if starts[b + 1] - starts[b] > 1]
    with ThreadPoolExecutor(SORT_THREADS, thread_name_prefix="imgbackup-sort") as pool:
        list(pool.map(kernels.table_sort, groups))


def field(rows: np.ndarray, name: str) -> np.ndarray:
    """A row field as an array (a view for ``id``; the u32 fields as little-endian numbers)."""
    return rows.view(ROW_DTYPE)[:, 0][name] if len(rows) else np.zeros(0, ROW_DTYPE[name])


def _owned(rows: np.ndarray) -> np.ndarray:
    """``rows`` as an array that owns its memory (so it can grow and shrink in place)."""
    return rows if rows.flags.owndata and rows.flags.c_contiguous else rows.copy()


def _resize(rows: np.ndarray, n: int) -> np.ndarray:
    """Grow or shrink an owning array in place (realloc: a large block is remapped, never copied
    beside itself, so a 480 MB table does not briefly need 960 MB). No other view may exist."""
    if n == len(rows):
        return rows
    try:
        rows.resize((n, rows.shape[1]), refcheck=False)
        return rows
    except ValueError:                      # not resizable in place: copy once
        out = np.zeros((n, rows.shape[1]), np.uint8)
        out[: min(n, len(rows))] = rows[: min(n, len(rows))]
        return out


class ChunkTable:
    """Sorted rows of chunk copies with their pack ids and delta bases; see the module docstring.

    ``rows`` always owns its memory and no view of it outlives a method: ``add`` and ``remove``
    resize it in place."""

    def __init__(self, rows: np.ndarray | None = None, spare: np.ndarray | None = None,
                 packs: np.ndarray | None = None, bases: np.ndarray | None = None, sorted_: bool = False,
                 directory: np.ndarray | None = None, grouped_sorted: bool = False) -> None:
        """``sorted_``: rows sorted with one row per id (spare copies apart), as a table leaves them;
        ``grouped_sorted``: sorted, copies not yet set apart (BucketRows.take). ``directory``: the
        rows' prefix directory as ``directory`` gave it (the local cache keeps it, so an open skips a
        pass over every row)."""
        self.rows = empty_rows() if rows is None else _owned(rows)
        self.spare = empty_rows() if spare is None else spare
        self.packs = np.zeros((0, 32), np.uint8) if packs is None else packs
        self.bases = np.zeros((0, BASE_ROW_SIZE), np.uint8) if bases is None else bases
        self._pack_numbers: dict[bytes, int] | None = None
        if not sorted_:
            self._settle(sort=not grouped_sorted)
        self._directory(directory if sorted_ else None)

    def _settle(self, sort: bool = True) -> None:
        """Sort the rows; the first copy of each chunk stays, the others join ``spare``."""
        if sort:
            sort_rows(self.rows)
        kept, spare = kernels.table_dedup(self.rows)
        self.rows = _resize(self.rows, kept)
        if len(spare):
            self.spare = np.concatenate([self.spare, spare]) if len(self.spare) else spare
            kernels.table_sort(self.spare)
        if len(self.bases) > 1:
            kernels.table_sort(self.bases)

    def _directory(self, known: np.ndarray | None = None) -> None:
        self._bits = kernels.directory_bits(len(self.rows))
        self._dir = known if known is not None else kernels.table_directory(self.rows, self._bits)
        self._spare_dir = kernels.table_directory(self.spare, kernels.directory_bits(len(self.spare)))
        self._bases_dir = kernels.table_directory(self.bases, kernels.directory_bits(len(self.bases)))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def directory(self) -> np.ndarray:
        """The rows' prefix directory (2^bits + 1 uint32: the first row of each id prefix)."""
        return self._dir

    @staticmethod
    def directory_fits(directory: np.ndarray, n_rows: int) -> bool:
        """Whether ``directory`` can be the directory of ``n_rows`` sorted rows (size, ends, order)."""
        return (directory.shape == ((1 << kernels.directory_bits(n_rows)) + 1,) and directory.dtype == np.uint32
                and int(directory[0]) == 0 and int(directory[-1]) == n_rows
                and bool((directory[1:] >= directory[:-1]).all()))

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.spare.nbytes + self.packs.nbytes + self.bases.nbytes + self._dir.nbytes

    # --- lookups -------------------------------------------------------------------------------

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Row number of each id of an (m, 32) uint8 array, -1 for unknown ones (one native call)."""
        ids = np.ascontiguousarray(ids, np.uint8).reshape(-1, 32)
        return kernels.table_lookup(self.rows, self._dir, ids)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        return self.find(ids) >= 0

    def location(self, row: int) -> BlobLocation:
        r = self.rows[row].view(ROW_DTYPE)[0]
        return self._location(r["id"].tobytes(), r)

    def _location(self, chunk_id: bytes, r) -> BlobLocation:
        info = int(r["info"])
        base = self.base_of(chunk_id) if info & INFO_DELTA else None
        return BlobLocation(self.packs[int(r["pack"])].tobytes(), int(r["offset"]), int(r["length"]),
                        info & INFO_LENGTH_MASK, base)

    def get(self, chunk_id: bytes) -> BlobLocation | None:
        row = int(self.find(np.frombuffer(chunk_id, np.uint8))[0])
        return None if row < 0 else self.location(row)

    def base_of(self, chunk_id: bytes) -> bytes | None:
        if not len(self.bases):
            return None
        row = int(kernels.table_lookup(self.bases, self._bases_dir, np.frombuffer(chunk_id, np.uint8).reshape(1, 32))[0])
        return None if row < 0 else self.bases[row, 32:].tobytes()

    def spares_of(self, chunk_id: bytes) -> list[BlobLocation]:
        if not len(self.spare):
            return []
        row = int(kernels.table_lookup(self.spare, self._spare_dir, np.frombuffer(chunk_id, np.uint8).reshape(1, 32))[0])
        out = []
        while 0 <= row < len(self.spare) and self.spare[row, :32].tobytes() == chunk_id:
            out.append(self._location(chunk_id, self.spare[row].view(ROW_DTYPE)[0]))
            row += 1
        return out

    def iter_rows(self, which: str = "rows"):
        """(chunk id, Location) of every handed-out copy (or ``spare`` one); slow: for small tables
        and the few places that need objects."""
        rows = self.rows if which == "rows" else self.spare
        for r in rows.view(ROW_DTYPE)[:, 0]:
            cid = r["id"].tobytes()
            yield cid, self._location(cid, r)

    def pack_number(self, pack_id: bytes) -> int:
        """The number of ``pack_id`` in ``packs``, added when new."""
        if self._pack_numbers is None:
            self._pack_numbers = {}
            for i, p in enumerate(self.packs):
                self._pack_numbers.setdefault(p.tobytes(), i)
        number = self._pack_numbers.get(pack_id)
        if number is None:
            number = len(self.packs)
            self.packs = np.concatenate([self.packs, np.frombuffer(pack_id, np.uint8).reshape(1, 32)])
            self._pack_numbers[pack_id] = number
        return number

    # --- changes -------------------------------------------------------------------------------

    def add(self, rows: np.ndarray, bases: np.ndarray | None = None) -> None:
        """Merge new rows (pack numbers of this table) in, in place: the copies of chunks already
        known become spare ones (a whole copy still wins over a delta)."""
        if len(rows):
            rows = rows.copy()
            sort_rows(rows)
            old = len(self.rows)
            self.rows = _resize(self.rows, old + len(rows))
            kernels.table_merge(self.rows, old, rows)
            kept, spare = kernels.table_dedup(self.rows)
            self.rows = _resize(self.rows, kept)
            if len(spare):
                self.spare = np.concatenate([self.spare, spare])
                kernels.table_sort(self.spare)
        if bases is not None and len(bases):
            self.bases = np.concatenate([self.bases, bases])
            kernels.table_sort(self.bases)
        self._directory()

    def remove(self, keep_rows: np.ndarray, keep_spare: np.ndarray | None = None) -> None:
        """Drop the copies whose flag is False, in place; a chunk whose handed-out copy goes is handed
        out from a remaining spare copy instead, if it has one."""
        if not keep_rows.all():
            self.rows = _resize(self.rows, kernels.table_compact(self.rows, keep_rows.astype(np.uint8)))
        spare = self.spare
        if keep_spare is not None and len(spare) and not keep_spare.all():
            spare = spare[keep_spare.astype(bool)]
        self._directory()
        promote = self.find(spare[:, :32]) < 0 if len(spare) else np.zeros(0, bool)
        self.spare = spare[~promote]
        if promote.any():
            self.add(spare[promote])      # the first of each chunk's spares is handed out
        self._directory()


class RowBuffer:
    """Rows appended piece by piece into one growing array; untouched capacity costs no memory."""

    def __init__(self, width: int = ROW_SIZE, capacity: int = 1 << 16) -> None:
        self.width = width
        self.data = np.empty((capacity, width), np.uint8)
        self.used = 0

    def append(self, rows: np.ndarray) -> None:
        need = self.used + len(rows)
        if need > len(self.data):
            grown = max(need, len(self.data) + len(self.data) // GROWTH_DIVISOR)
            try:
                self.data.resize((grown, self.width), refcheck=False)   # realloc: mremap, no copy
            except ValueError:
                bigger = np.empty((grown, self.width), np.uint8)
                bigger[: self.used] = self.data[: self.used]
                self.data = bigger
        self.data[self.used : need] = rows
        self.used = need

    def take(self) -> np.ndarray:
        """The rows appended, as an array owning its memory (shrunk in place)."""
        rows = _resize(self.data, self.used)
        self.data = np.empty((0, self.width), np.uint8)
        return rows


class BucketRows:
    """Rows gathered into 256 buckets by first id byte as they arrive (``table_scatter``: sequential
    writes), so the table is sorted bucket by bucket with no partition pass of random swaps over
    all of it. Each bucket has room for its share of ``expected`` uniform ids and then some; rows of
    a full bucket (more rows than expected, or ids that are not uniform) spill into a RowBuffer, and
    the whole is then sorted the ordinary way. Room never written costs no memory."""

    def __init__(self, expected: int, width: int = ROW_SIZE) -> None:
        share = max(expected, 0) / 256
        self.capacity = int(share + BUCKET_SIGMAS * share ** 0.5 + 64)
        self.rows = np.empty((256 * self.capacity, width), np.uint8)
        self.fill = np.zeros(256, np.int64)
        self.spill = RowBuffer(width)

    def add(self, rows: np.ndarray, pack_offset: int = 0) -> None:
        """Take in rows (a 48-byte row's pack number gets ``pack_offset`` added)."""
        room = np.empty_like(rows)              # touched only by rows that spill
        spilled = kernels.table_scatter(np.ascontiguousarray(rows), self.rows, self.fill, self.capacity,
                                        pack_offset, room)
        if spilled:
            self.spill.append(room[:spilled])

    def take(self) -> np.ndarray:
        """Every row taken in, sorted (copies of one id side by side), as an array owning its memory."""
        rows = self.rows
        self.rows = np.empty((0, rows.shape[1]), np.uint8)
        used = kernels.table_close_buckets(rows, self.fill, self.capacity)
        starts = [0, *np.cumsum(self.fill).tolist()]
        spilled = self.spill.take()
        rows = _resize(rows, used + len(spilled))
        if len(spilled):
            rows[used:] = spilled
            sort_rows(rows)
        else:
            sort_groups(rows, starts)
        return rows


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default

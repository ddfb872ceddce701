# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Sorted tables of fixed-size rows keyed by a 32-byte id, with the GIL released.

Native twin of the ``table_*`` functions in ``imgbackup._core.reference``: same names, same results.
A table is a C-contiguous ``uint8`` array of shape (n, stride); the first 32 bytes of a row are its
key. Chunk-index rows (stride 48: id, pack u32, offset u32, length u32, info u32, little-endian)
sort equal ids by a preference: a whole chunk before a delta (info bit 31), then by pack number and
offset, so the first row of an id is the copy handed out and the others are spare copies.

Chunk ids are keyed hashes, uniform over their range. Sorting is an in-place MSD radix sort on the
id bytes (American flag sort: no second buffer, so the RSS of a 10^7-row table is its 480 MB, not
twice that). Lookup goes through a directory of row numbers by id prefix (~8 rows per entry,
uint32: 0.5 bytes per row) and bisects the few rows between two entries.
"""

import numpy as np

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memmove
from posix.mman cimport MADV_DONTNEED, madvise
from posix.unistd cimport _SC_PAGESIZE, sysconf

DEF KEY = 32
DEF SMALL = 16            # below this many rows insertion sort beats quicksort
DEF MAX_STRIDE = 256


cdef inline uint32_t _prefix(const uint8_t* row) noexcept nogil:
    """The id's first 4 bytes as a big-endian number: ids sort by it first."""
    return (<uint32_t>row[0] << 24) | (<uint32_t>row[1] << 16) | (<uint32_t>row[2] << 8) | row[3]


cdef inline uint64_t _rank(const uint8_t* row) noexcept nogil:
    """The preference among rows of one chunk id: whole before delta, then pack, then offset."""
    cdef uint32_t pack, offset, info
    memcpy(&pack, row + 32, 4)
    memcpy(&offset, row + 36, 4)
    memcpy(&info, row + 44, 4)
    return (<uint64_t>(info >> 31) << 63) | (<uint64_t>pack << 31) | (offset >> 1)


cdef inline int _cmp(const uint8_t* a, const uint8_t* b, Py_ssize_t stride) noexcept nogil:
    cdef int c = memcmp(a, b, KEY)
    cdef uint64_t ra, rb
    if c != 0:
        return c
    if stride == 48:
        ra = _rank(a)
        rb = _rank(b)
        if ra != rb:
            return -1 if ra < rb else 1
    return memcmp(a + KEY, b + KEY, stride - KEY)


cdef inline void _swap(uint8_t* a, uint8_t* b, uint8_t* tmp, Py_ssize_t stride) noexcept nogil:
    memcpy(tmp, a, stride)
    memcpy(a, b, stride)
    memcpy(b, tmp, stride)


cdef void _insertion(uint8_t* base, Py_ssize_t n, Py_ssize_t stride, uint8_t* tmp) noexcept nogil:
    cdef Py_ssize_t i, j
    for i in range(1, n):
        memcpy(tmp, base + i * stride, stride)
        j = i
        while j > 0 and _cmp(base + (j - 1) * stride, tmp, stride) > 0:
            memcpy(base + j * stride, base + (j - 1) * stride, stride)
            j -= 1
        memcpy(base + j * stride, tmp, stride)


cdef void _quicksort(uint8_t* base, Py_ssize_t n, Py_ssize_t stride, uint8_t* tmp, uint8_t* pivot) noexcept nogil:
    """For rows whose id bytes are all equal so far (rare: copies of one chunk): by full comparison."""
    cdef Py_ssize_t i, j, mid
    while n > SMALL:
        mid = n // 2
        if _cmp(base + mid * stride, base, stride) < 0:
            _swap(base + mid * stride, base, tmp, stride)
        if _cmp(base + (n - 1) * stride, base, stride) < 0:
            _swap(base + (n - 1) * stride, base, tmp, stride)
        if _cmp(base + (n - 1) * stride, base + mid * stride, stride) < 0:
            _swap(base + (n - 1) * stride, base + mid * stride, tmp, stride)
        memcpy(pivot, base + mid * stride, stride)
        i = 0
        j = n - 1
        while True:
            while _cmp(base + i * stride, pivot, stride) < 0:
                i += 1
            while _cmp(base + j * stride, pivot, stride) > 0:
                j -= 1
            if i >= j:
                break
            _swap(base + i * stride, base + j * stride, tmp, stride)
            i += 1
            j -= 1
        # recurse into the smaller side, loop on the larger: stack depth stays O(log n)
        if j + 1 < n - j - 1:
            _quicksort(base, j + 1, stride, tmp, pivot + MAX_STRIDE)
            base = base + (j + 1) * stride
            n = n - j - 1
        else:
            _quicksort(base + (j + 1) * stride, n - j - 1, stride, tmp, pivot + MAX_STRIDE)
            n = j + 1
    _insertion(base, n, stride, tmp)


cdef void _flag(uint8_t* base, Py_ssize_t n, Py_ssize_t stride, int depth, uint8_t* tmp,
                Py_ssize_t* start) noexcept nogil:
    """One American-flag pass: group the rows by id byte ``depth`` in place; ``start`` gets the 257
    group boundaries. Rows move among 256 write positions that each advance sequentially, which
    caches and TLBs follow (65,536 positions at once did not: measured 3x slower)."""
    cdef Py_ssize_t nxt[256]
    cdef Py_ssize_t i, b, t
    for b in range(257):
        start[b] = 0
    for i in range(n):
        start[base[i * stride + depth] + 1] += 1
    for b in range(256):
        start[b + 1] += start[b]
        nxt[b] = start[b]
    for b in range(256):
        while nxt[b] < start[b + 1]:
            t = base[nxt[b] * stride + depth]
            while t != b:
                _swap(base + nxt[b] * stride, base + nxt[t] * stride, tmp, stride)
                nxt[t] += 1
                t = base[nxt[b] * stride + depth]
            nxt[b] += 1


cdef void _radix(uint8_t* base, Py_ssize_t n, Py_ssize_t stride, int depth, uint8_t* tmp, uint8_t* pivots) noexcept nogil:
    """MSD radix sort on id byte ``depth`` and the ones after it, in place. Ids are uniform, so after
    two passes a range holds ~n/65536 rows and after three almost always one: the per-row work is
    about three 48-byte swaps, not a comparison sort's ~23 compares."""
    cdef Py_ssize_t start[257]
    cdef Py_ssize_t b
    if n <= SMALL:
        _insertion(base, n, stride, tmp)
        return
    if depth >= KEY:
        _quicksort(base, n, stride, tmp, pivots)
        return
    _flag(base, n, stride, depth, tmp, start)
    for b in range(256):
        if start[b + 1] - start[b] > 1:
            _radix(base + start[b] * stride, start[b + 1] - start[b], stride, depth + 1, tmp, pivots)


cdef int _sort(uint8_t* base, Py_ssize_t n, Py_ssize_t stride) noexcept nogil:
    cdef uint8_t* tmp = <uint8_t*>malloc(MAX_STRIDE)
    cdef uint8_t* pivots = <uint8_t*>malloc(MAX_STRIDE * 130)   # one pivot per quicksort level (<= 128)
    if tmp == NULL or pivots == NULL:
        free(tmp); free(pivots)
        return -1
    _radix(base, n, stride, 0, tmp, pivots)
    free(tmp); free(pivots)
    return 0


def _check(rows):
    if rows.ndim != 2 or rows.shape[1] < KEY or rows.shape[1] > MAX_STRIDE or rows.dtype != np.uint8:
        raise ValueError("a table is a (n, stride) uint8 array with 32 <= stride <= 256")


def table_sort(uint8_t[:, ::1] rows) -> None:
    """Sort ``rows`` in place by id (and, for 48-byte chunk rows, by preference among equal ids)."""
    _check(np.asarray(rows))
    cdef Py_ssize_t n = rows.shape[0], stride = rows.shape[1]
    cdef int failed = 0
    if n < 2:
        return
    with nogil:
        failed = _sort(&rows[0, 0], n, stride)
    if failed:
        raise MemoryError("no memory to sort the table")


def table_partition(uint8_t[:, ::1] rows):
    """Group the rows by the id's first byte in place (any order within a group); the 257 group
    boundaries. The groups can then be sorted on separate threads."""
    _check(np.asarray(rows))
    cdef Py_ssize_t n = rows.shape[0], stride = rows.shape[1]
    cdef Py_ssize_t start[257]
    cdef uint8_t tmp[MAX_STRIDE]
    out = np.zeros(257, np.int64)
    if n == 0:
        return out
    with nogil:
        _flag(&rows[0, 0], n, stride, 0, tmp, start)
    for b in range(257):
        out[b] = start[b]
    return out


def directory_bits(Py_ssize_t n) -> int:
    """Prefix bits of a directory for ``n`` rows: about 8 rows per slot, 2^12 .. 2^24 slots."""
    cdef int bits = 12
    while bits < 24 and (n >> bits) > 8:
        bits += 1
    return bits


def table_directory(const uint8_t[:, ::1] rows, int bits):
    """For each ``bits``-bit id prefix p, the first row whose id starts at or after p (2^bits + 1
    entries, uint32): a lookup bisects only the few rows between two entries."""
    if not 1 <= bits <= 24 or rows.shape[0] >= (1 << 32):
        raise ValueError("1 to 24 directory bits, fewer than 2^32 rows")
    cdef Py_ssize_t n = rows.shape[0], i, b, slots = 1 << bits
    cdef int shift = 32 - bits
    out = np.zeros(slots + 1, np.uint32)
    cdef uint32_t[::1] d = out
    with nogil:
        for i in range(n):
            d[(_prefix(&rows[i, 0]) >> shift) + 1] += 1
        for b in range(slots):
            d[b + 1] += d[b]
    return out


def table_lookup(const uint8_t[:, ::1] rows, const uint32_t[::1] directory, const uint8_t[:, ::1] ids):
    """For each id, the number of its first row in the sorted ``rows``, or -1."""
    cdef Py_ssize_t slots = directory.shape[0] - 1
    cdef int bits = 0
    while bits < 25 and (1 << bits) < slots:
        bits += 1
    if ids.shape[1] != KEY or slots != (1 << bits) or not 1 <= bits <= 24 or directory[slots] != rows.shape[0]:
        raise ValueError("ids are (m, 32); the directory (2^bits + 1 entries) must be this table's")
    cdef Py_ssize_t m = ids.shape[0], stride = rows.shape[1], i, lo, hi, mid, end
    cdef int shift = 32 - bits
    cdef uint32_t p
    cdef const uint8_t* base
    cdef const uint8_t* key
    out = np.full(m, -1, np.int64)
    cdef int64_t[::1] o = out
    if rows.shape[0] == 0:
        return out
    base = &rows[0, 0]
    with nogil:
        for i in range(m):
            key = &ids[i, 0]
            p = _prefix(key) >> shift
            lo = directory[p]
            hi = end = directory[p + 1]
            while lo < hi:                       # first row not below key
                mid = (lo + hi) >> 1
                if memcmp(base + mid * stride, key, KEY) < 0:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < end and memcmp(base + lo * stride, key, KEY) == 0:
                o[i] = lo
    return out


def table_dedup(uint8_t[:, ::1] rows):
    """Keep the first row of each id at the front of sorted ``rows`` (in place); returns the number
    kept and the other rows (the spare copies, in order) as a new array."""
    cdef Py_ssize_t n = rows.shape[0], stride = rows.shape[1], i, w = 0, d = 0, dups = 0
    for i in range(1, n):
        if memcmp(&rows[i, 0], &rows[i - 1, 0], KEY) == 0:
            dups += 1
    spare = np.empty((dups, stride), np.uint8)
    cdef uint8_t[:, ::1] s = spare
    if n == 0:
        return 0, spare
    with nogil:
        w = 1
        for i in range(1, n):
            if memcmp(&rows[i, 0], &rows[w - 1, 0], KEY) == 0:
                memcpy(&s[d, 0], &rows[i, 0], stride)
                d += 1
            else:
                if w != i:
                    memcpy(&rows[w, 0], &rows[i, 0], stride)
                w += 1
    return w, spare


def table_compact(uint8_t[:, ::1] rows, const uint8_t[::1] keep) -> int:
    """Move the rows whose ``keep`` byte is non-zero to the front, in order (in place); their count."""
    if keep.shape[0] != rows.shape[0]:
        raise ValueError("one keep flag per row")
    cdef Py_ssize_t n = rows.shape[0], stride = rows.shape[1], i, w = 0
    with nogil:
        for i in range(n):
            if keep[i]:
                if w != i:
                    memcpy(&rows[w, 0], &rows[i, 0], stride)
                w += 1
    return w


def table_merge(uint8_t[:, ::1] rows, Py_ssize_t used, const uint8_t[:, ::1] more) -> int:
    """Merge the sorted ``more`` into the sorted first ``used`` rows of ``rows`` (which has room for
    both), in place from the end: one pass, no second copy of the table. Returns the rows now used."""
    cdef Py_ssize_t m = more.shape[0], stride = rows.shape[1], i = used - 1, j = m - 1, w = used + m - 1
    if more.shape[1] != stride or rows.shape[0] < used + m:
        raise ValueError("the table has no room for the rows to merge, or their width differs")
    with nogil:
        while j >= 0:
            if i >= 0 and _cmp(&rows[i, 0], &more[j, 0], stride) > 0:
                memcpy(&rows[w, 0], &rows[i, 0], stride)
                i -= 1
            else:
                memcpy(&rows[w, 0], &more[j, 0], stride)
                j -= 1
            w -= 1
    return used + m


def table_scatter(const uint8_t[:, ::1] rows, uint8_t[:, ::1] out, int64_t[::1] fill, Py_ssize_t capacity,
                  uint32_t pack_offset, uint8_t[:, ::1] spill) -> int:
    """Copy each row into the bucket of its id's first byte: bucket b is ``out`` rows b * capacity
    onwards, ``fill[b]`` of them used (advanced here). A 48-byte chunk row's pack number gets
    ``pack_offset`` added. Rows whose bucket is full go, in order, to the front of ``spill``;
    returns how many did. Loading many index files this way groups the rows by first byte with
    sequential writes, instead of a pass of random swaps over the whole table afterwards."""
    cdef Py_ssize_t n = rows.shape[0], stride = rows.shape[1], i, b, spilled = 0
    cdef uint8_t* dst
    cdef uint32_t pack
    if (out.shape[1] != stride or spill.shape[1] != stride or spill.shape[0] < n or fill.shape[0] != 256
            or capacity < 0 or out.shape[0] < 256 * capacity):
        raise ValueError("out holds 256 buckets of capacity rows of the rows' width; spill room for every row")
    with nogil:
        for i in range(n):
            b = rows[i, 0]
            if fill[b] < capacity:
                dst = &out[b * capacity + fill[b], 0]
                fill[b] += 1
            else:
                dst = &spill[spilled, 0]
                spilled += 1
            memcpy(dst, &rows[i, 0], stride)
            if stride == 48:
                memcpy(&pack, dst + 32, 4)
                pack += pack_offset
                memcpy(dst + 32, &pack, 4)
    return spilled


def table_close_buckets(uint8_t[:, ::1] rows, const int64_t[::1] fill, Py_ssize_t capacity) -> int:
    """Move the buckets ``table_scatter`` filled together, in order (bucket b's ``fill[b]`` rows
    follow bucket b - 1's); returns the rows now at the front. Memory left behind is given back to
    the system page by page as the move goes on (madvise DONTNEED), so the rows are never resident
    twice over the room the buckets had spare."""
    if fill.shape[0] != 256 or capacity < 0 or rows.shape[0] < 256 * capacity:
        raise ValueError("256 buckets of capacity rows")
    cdef Py_ssize_t stride = rows.shape[1], used = 0, b, n, src
    cdef size_t page = <size_t>sysconf(_SC_PAGESIZE)
    cdef uint8_t* base = &rows[0, 0] if rows.shape[0] else NULL
    cdef size_t lo, hi
    for b in range(256):
        if fill[b] < 0 or fill[b] > capacity:
            raise ValueError("a bucket holds 0 to capacity rows")
    if base == NULL:
        return 0
    with nogil:
        for b in range(256):
            n = fill[b]
            src = b * capacity
            if n and src != used:
                memmove(base + used * stride, base + src * stride, n * stride)
            used += n
            # rows from ``used`` up to the next bucket are no longer needed: release the whole pages
            lo = ((<size_t>(base + used * stride)) + page - 1) // page * page
            hi = (<size_t>(base + (b + 1) * capacity * stride)) // page * page
            if hi > lo:
                madvise(<void*>lo, hi - lo, MADV_DONTNEED)
    return used

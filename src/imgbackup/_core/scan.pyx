# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Chunk classification (GIL released, OpenMP) and keyed BLAKE3 chunk ids.

Native twin of ``imgbackup._core.reference`` (scan_chunks, zero_blocks, chunk_id): same names,
same results. Only byte loops live here; what to do with a ZERO or DATA chunk is decided above.

Chunk ids are keyed BLAKE3 from the ``blake3`` package (Rust, SIMD), which releases the GIL for
the hash; one call per data chunk costs ~0.5 us, nothing at 64 KiB..16 MiB chunks.
Measured (2026-12-01, 2 vCPU with AVX-512, 1 MiB chunks, one thread): keyed BLAKE3 5.1 GB/s,
the HMAC-SHA-256 (OpenSSL one-shot HMAC(), SHA-NI) it replaced 1.4 GB/s; two threads hashing
at once 1.7 -> 3.2 GB/s (the GIL is released). Zero detection: all-zero chunks 10.7-13.8 GB/s
(memory bound), zero_blocks on 4 KiB blocks 10-12 GB/s.
"""

import os

import numpy as np
from blake3 import blake3 as _blake3

from cython.parallel cimport prange
from posix.unistd cimport getpid
from libc.stdint cimport uint64_t
from libc.string cimport memcmp, memcpy

ZERO = 0
DATA = 1
ID_SIZE = 32
KEY_SIZE = 32

cdef enum:
    _HEAD = 64  # bytes checked word-wise before the memcmp pass


cdef inline bint _is_zero(const unsigned char *p, size_t n) noexcept nogil:
    """True if ``p[0:n]`` is all zero; exits at the first non-zero word.

    Data chunks almost always fail in the first word. Once the head is known to be zero,
    ``memcmp(p, p + _HEAD, n - _HEAD) == 0`` proves the rest zero by induction, and glibc's
    SIMD memcmp does that at memory speed. Measured in C on 64 MiB of zeros: this 10.7 GB/s
    cold / 49 GB/s in cache, an OR-reduce loop of 256-byte blocks 10.2 / 49, memcmp against
    a static zero page 11.4 / 33 (and it needs a zero buffer as large as a chunk).
    """
    cdef size_t i, head = _HEAD if n > _HEAD else n
    cdef uint64_t w = 0
    i = 0
    while i + 8 <= head:
        memcpy(&w, p + i, 8)
        if w:
            return False
        i += 8
    while i < head:
        if p[i]:
            return False
        i += 1
    if n <= _HEAD:
        return True
    return memcmp(p, p + _HEAD, n - _HEAD) == 0


cdef const unsigned char[::1] _bytes_of(obj) except *:
    """A contiguous byte view of any buffer (bytes, bytearray, mmap, numpy of any dtype)."""
    try:
        return obj
    except (TypeError, ValueError):
        return memoryview(obj).cast("B")


def _blake3_key(key) -> bytes:
    k = bytes(key)
    if len(k) != KEY_SIZE:
        raise ValueError(f"a chunk id key is {KEY_SIZE} bytes, not {len(k)}")
    return k


def chunk_id(key, data) -> bytes:
    """The keyed chunk id: BLAKE3 in keyed mode (32-byte key), 32 bytes."""
    return _blake3(data, key=_blake3_key(key)).digest()


cdef struct _Job:
    const unsigned char *data
    Py_ssize_t total
    Py_ssize_t chunk_size
    unsigned char *kinds


cdef inline void _classify_one(const _Job *job, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t start = i * job.chunk_size
    cdef Py_ssize_t length = job.total - start
    if length > job.chunk_size:
        length = job.chunk_size
    if not _is_zero(job.data + start, <size_t>length):
        job.kinds[i] = 1


# libgomp's thread pool does not survive fork(): a child that enters a parallel region after
# the parent used one hangs for ever. The pid that owns the pool; other pids scan serially.
cdef long _pool_pid = 0


cdef int _usable_threads(int nthreads, Py_ssize_t n) except -1:
    global _pool_pid
    if nthreads <= 0:
        nthreads = len(os.sched_getaffinity(0))
    if nthreads > n:
        nthreads = <int>n
    if nthreads > 1:
        if _pool_pid == 0:
            _pool_pid = getpid()
        elif _pool_pid != getpid():
            nthreads = 1
    return nthreads if nthreads > 0 else 1


def classify_chunks(buf, Py_ssize_t chunk_size, *, int nthreads=1):
    """ZERO (0) or DATA (1) per chunk of ``chunk_size`` (last may be short), without the GIL."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    cdef const unsigned char[::1] d = _bytes_of(buf)
    cdef Py_ssize_t n = (d.shape[0] + chunk_size - 1) // chunk_size
    kinds = np.zeros(n, dtype=np.uint8)
    if n == 0:
        return kinds
    cdef unsigned char[::1] kv = kinds
    cdef _Job job
    job.data, job.total, job.chunk_size, job.kinds = &d[0], d.shape[0], chunk_size, &kv[0]
    cdef Py_ssize_t i
    cdef int threads = _usable_threads(nthreads, n)
    with nogil:
        if threads == 1:
            for i in range(n):  # no OpenMP call at all: safe in a forked child
                _classify_one(&job, i)
        else:
            for i in prange(n, num_threads=threads, schedule="dynamic"):
                _classify_one(&job, i)
    return kinds


def scan_chunks(buf, Py_ssize_t chunk_size, key, *, int nthreads=0):
    """Split ``buf`` into chunks of ``chunk_size`` (last may be short): kind and id per chunk.

    Returns ``(kinds uint8[n], ids uint8[n, 32])``; an all-zero chunk is ZERO with a zero id,
    any other DATA with its keyed BLAKE3. ``nthreads=0`` uses every CPU this process may run on
    (zero detection on an OpenMP team, each hash on BLAKE3's own threads); 1 stays serial, for
    callers that already run one task per core.
    """
    k = _blake3_key(key)
    kinds = classify_chunks(buf, chunk_size, nthreads=nthreads)
    cdef Py_ssize_t n = kinds.shape[0]
    ids = np.zeros((n, ID_SIZE), dtype=np.uint8)
    if n == 0:
        return kinds, ids
    view = memoryview(buf).cast("B")
    threads = _usable_threads(nthreads, 2)
    max_threads = 1 if threads == 1 else _blake3.AUTO
    for i in np.flatnonzero(kinds).tolist():
        digest = _blake3(view[i * chunk_size : (i + 1) * chunk_size], key=k, max_threads=max_threads).digest()
        ids[i] = np.frombuffer(digest, dtype=np.uint8)
    return kinds, ids


def zero_blocks(buf, Py_ssize_t block_size=4096):
    """1 for each block of ``block_size`` bytes (last may be short) that is all zero, else 0."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    cdef const unsigned char[::1] d = _bytes_of(buf)
    cdef Py_ssize_t total = d.shape[0]
    cdef Py_ssize_t n = (total + block_size - 1) // block_size
    out = np.zeros(n, dtype=np.uint8)
    if n == 0:
        return out
    cdef unsigned char[::1] ov = out
    cdef const unsigned char *dp = &d[0]
    cdef Py_ssize_t i, start, length
    with nogil:
        for i in range(n):
            start = i * block_size
            length = total - start
            if length > block_size:
                length = block_size
            ov[i] = _is_zero(dp + start, <size_t>length)
    return out

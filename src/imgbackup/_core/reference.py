"""Pure-Python references for every native kernel: slow, obvious, and the definition.

Tests (hypothesis) check that ``imgbackup._core.scan`` / ``imgbackup._core.bitmap`` return
exactly what these return; with ``IMGBACKUP_CORE=reference`` this module stands in for both. Bitmaps are packed little-endian by bit: bit ``i`` lives in byte
``i >> 3`` at position ``i & 7``.
"""

from __future__ import annotations

import numpy as np

from imgbackup._core import blake3ref

ZERO = 0
DATA = 1
ID_SIZE = 32
KEY_SIZE = 32


def chunk_id(key: bytes, data: bytes | memoryview) -> bytes:
    """The keyed chunk id: BLAKE3 in keyed mode, 32-byte key, 32-byte output."""
    return blake3ref.keyed_hash_fast(key, data)


def classify_chunks(buf, chunk_size: int, *, nthreads: int = 1) -> np.ndarray:
    """ZERO or DATA per chunk of ``chunk_size`` (last may be short); ``nthreads`` is ignored."""
    mv = memoryview(buf).cast("B")
    n = (len(mv) + chunk_size - 1) // chunk_size
    return np.array([DATA if any(mv[i * chunk_size : (i + 1) * chunk_size]) else ZERO for i in range(n)],
                    dtype=np.uint8)


def scan_chunks(buf, chunk_size: int, key: bytes, *, nthreads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split ``buf`` into chunks of ``chunk_size`` (last may be short): kind and id per chunk.

    kind is ZERO for an all-zero chunk (its id stays 32 zero bytes), DATA otherwise. ``nthreads``
    is accepted for the native signature and ignored: the reference is one plain loop.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    mv = memoryview(buf).cast("B")
    n = (len(mv) + chunk_size - 1) // chunk_size
    kinds = np.zeros(n, dtype=np.uint8)
    ids = np.zeros((n, ID_SIZE), dtype=np.uint8)
    for i in range(n):
        piece = mv[i * chunk_size : (i + 1) * chunk_size]
        if any(piece):
            kinds[i] = DATA
            ids[i] = np.frombuffer(chunk_id(key, piece), dtype=np.uint8)
    return kinds, ids


def zero_blocks(buf, block_size: int = 4096) -> np.ndarray:
    """1 for each block of ``block_size`` bytes (last may be short) that is all zero, else 0."""
    mv = memoryview(buf).cast("B")
    n = (len(mv) + block_size - 1) // block_size
    return np.array([0 if any(mv[i * block_size : (i + 1) * block_size]) else 1 for i in range(n)],
                    dtype=np.uint8)


def _bits(bits: np.ndarray, nbits: int) -> list[int]:
    raw = bytes(bits)
    return [(raw[i >> 3] >> (i & 7)) & 1 for i in range(nbits)]


def _pack(values: list[int]) -> np.ndarray:
    out = bytearray((len(values) + 7) // 8)
    for i, v in enumerate(values):
        if v:
            out[i >> 3] |= 1 << (i & 7)
    return np.frombuffer(bytes(out), dtype=np.uint8).copy()


def count(bits: np.ndarray, nbits: int) -> int:
    """Number of set bits among the first ``nbits``."""
    return sum(_bits(bits, nbits))


def coarsen(bits: np.ndarray, nbits: int, factor: int) -> np.ndarray:
    """OR-reduce groups of ``factor`` bits (a partial last group counts): fine blocks -> coarse blocks."""
    vals = _bits(bits, nbits)
    return _pack([int(any(vals[i : i + factor])) for i in range(0, nbits, factor)])


def runs(bits: np.ndarray, nbits: int) -> np.ndarray:
    """Runs of set bits as an int64 array of shape (k, 2): (first bit, length)."""
    vals = _bits(bits, nbits)
    out: list[tuple[int, int]] = []
    i = 0
    while i < nbits:
        if vals[i]:
            j = i
            while j < nbits and vals[j]:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def set_range(bits: np.ndarray, start: int, length: int) -> None:
    """Set bits [start, start+length) in place."""
    for i in range(start, start + length):
        bits[i >> 3] |= 1 << (i & 7)


def clear_range(bits: np.ndarray, start: int, length: int) -> None:
    """Clear bits [start, start+length) in place."""
    for i in range(start, start + length):
        bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF

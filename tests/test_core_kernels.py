"""The native kernels return exactly what the pure-Python references in ``_core.reference`` return.

Hypothesis builds buffers with zero and non-zero chunks placed on purpose (a single non-zero
byte at the first, last or a random position), short last chunks, odd chunk sizes, bit counts
that are not multiples of 8 and bitmaps with long 0x00 / 0xFF stretches.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from imgbackup._core import bitmap, blake3ref, reference, scan

KEY = bytes(range(32))


# ---------------------------------------------------------------- scan

@st.composite
def chunked_buffers(draw: st.DrawFn) -> tuple[bytes, int]:
    """A buffer of whole chunks of chosen kinds plus an optional short tail, and its chunk size."""
    chunk_size = draw(st.sampled_from([1, 7, 64, 100, 512, 4096, 8192]))
    kinds = draw(st.lists(st.sampled_from(["zero", "random", "first", "last", "one"]), max_size=8))
    tail = draw(st.integers(0, chunk_size - 1))
    parts = []
    for kind in kinds + (["tail"] if tail else []):
        size = tail if kind == "tail" else chunk_size
        piece = bytearray(size)
        if kind == "random":
            piece[:] = draw(st.binary(min_size=size, max_size=size))
        elif kind == "first":
            piece[0] = draw(st.integers(1, 255))
        elif kind == "last":
            piece[-1] = draw(st.integers(1, 255))
        elif kind in ("one", "tail") and draw(st.booleans()):
            piece[draw(st.integers(0, size - 1))] = draw(st.integers(1, 255))
        parts.append(bytes(piece))
    return b"".join(parts), chunk_size


def assert_scan_equal(buf, chunk_size: int, key: bytes, **kw) -> None:
    kinds, ids = scan.scan_chunks(buf, chunk_size, key, **kw)
    ref_kinds, ref_ids = reference.scan_chunks(buf, chunk_size, key)
    assert kinds.dtype == np.uint8 and ids.dtype == np.uint8
    assert ids.shape == ref_ids.shape
    assert kinds.tobytes() == ref_kinds.tobytes()
    assert ids.tobytes() == ref_ids.tobytes()


@given(chunked_buffers(), st.binary(min_size=32, max_size=32))
def test_scan_chunks_matches_reference(case: tuple[bytes, int], key: bytes) -> None:
    buf, chunk_size = case
    assert_scan_equal(buf, chunk_size, key)


@given(chunked_buffers(), st.sampled_from([1, 2, 3]))
def test_scan_chunks_thread_count_does_not_matter(case: tuple[bytes, int], nthreads: int) -> None:
    buf, chunk_size = case
    one = scan.scan_chunks(buf, chunk_size, KEY, nthreads=1)
    many = scan.scan_chunks(buf, chunk_size, KEY, nthreads=nthreads)
    assert one[0].tobytes() == many[0].tobytes()
    assert one[1].tobytes() == many[1].tobytes()


def test_scan_chunks_parallel_large_buffer() -> None:
    """Many 8 KiB chunks, every 3rd zero, one byte set near the end of every 5th: 1 == 2 threads."""
    chunk = 8192
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, size=96 * chunk, dtype=np.uint8)
    for i in range(0, 96, 3):
        arr[i * chunk:(i + 1) * chunk] = 0
    for i in range(0, 96, 15):
        arr[(i + 1) * chunk - 3] = 1
    arr = np.concatenate([arr, np.zeros(1000, np.uint8)])  # a short all-zero last chunk
    one = scan.scan_chunks(arr, chunk, KEY, nthreads=1)
    two = scan.scan_chunks(arr, chunk, KEY, nthreads=2)
    assert one[0].tobytes() == two[0].tobytes() and one[1].tobytes() == two[1].tobytes()
    assert_scan_equal(arr, chunk, KEY, nthreads=2)
    # 32 zeroed chunks, 7 of them (multiples of 15) re-dirtied by one byte, plus the zero tail.
    assert len(one[0]) == 97
    assert int(one[0].sum()) == 96 - 32 + 7
    assert not one[1][one[0] == scan.ZERO].any()


FORK_SCRIPT = """
import os, sys
from imgbackup._core import scan
buf = os.urandom(8 << 20)
parent = scan.scan_chunks(buf, 1 << 20, b"k" * 32, nthreads=2)
pid = os.fork()
if pid == 0:
    child = scan.scan_chunks(buf, 1 << 20, b"k" * 32)  # would hang in libgomp without the guard
    os._exit(0 if child[1].tobytes() == parent[1].tobytes() else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_scan_chunks_in_forked_child_after_parallel_scan() -> None:
    """libgomp's pool dies with fork(); a child must still scan (serially) and get the same ids."""
    done = subprocess.run([sys.executable, "-c", FORK_SCRIPT], timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_scan_chunks_accepts_every_buffer_kind() -> None:
    data = os.urandom(3 * 4096 + 5)
    want = reference.scan_chunks(data, 4096, KEY)
    with mmap.mmap(-1, len(data)) as mm:
        mm[:] = data
        got = [scan.scan_chunks(b, 4096, KEY) for b in
               (data, bytearray(data), memoryview(data), mm, np.frombuffer(data, np.uint8))]
    for kinds, ids in got:
        assert kinds.tobytes() == want[0].tobytes() and ids.tobytes() == want[1].tobytes()
    words = np.frombuffer(data[:4096 * 2], dtype=np.uint64)  # any dtype: scanned as raw bytes
    assert scan.scan_chunks(words, 4096, KEY)[1].tobytes() == reference.scan_chunks(words, 4096, KEY)[1].tobytes()


def test_scan_chunks_empty_and_bad_arguments() -> None:
    kinds, ids = scan.scan_chunks(b"", 4096, KEY)
    assert kinds.shape == (0,) and ids.shape == (0, scan.ID_SIZE)
    with pytest.raises(ValueError):
        scan.scan_chunks(b"abc", 0, KEY)
    with pytest.raises(ValueError):
        scan.zero_blocks(b"abc", 0)


def test_constants_match_reference() -> None:
    assert (scan.ZERO, scan.DATA, scan.ID_SIZE) == (reference.ZERO, reference.DATA, reference.ID_SIZE)


def test_chunk_id_known_answers() -> None:
    """BLAKE3's published vectors for the reference; the reference and the native hash agree on
    inputs that cross the 1 KiB chunk and 64-byte block edges (tree levels up to 4)."""
    assert blake3ref.hash(b"").hex() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert blake3ref.hash(b"abc").hex() == "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    data = os.urandom(9 * 1024 + 1)
    for n in (0, 1, 63, 64, 65, 1023, 1024, 1025, 2048, 2049, 3073, 4096, 8192, len(data)):
        assert scan.chunk_id(KEY, data[:n]) == blake3ref.keyed_hash(KEY, data[:n]), n
        assert blake3ref.keyed_hash_fast(KEY, data[:n]) == blake3ref.keyed_hash(KEY, data[:n]), n
    assert scan.chunk_id(KEY, b"x") != blake3ref.hash(b"x")          # keyed mode differs
    assert scan.chunk_id(KEY, b"x") != scan.chunk_id(bytes(32), b"x")
    with pytest.raises(ValueError):
        scan.chunk_id(b"short key", b"x")   # a chunk id key is exactly 32 bytes


@given(st.binary(min_size=32, max_size=32), st.binary(max_size=5000))
def test_chunk_id_matches_reference(key: bytes, data: bytes) -> None:
    assert scan.chunk_id(key, data) == reference.chunk_id(key, data) == blake3ref.keyed_hash(key, data)


@given(chunked_buffers(), st.sampled_from([1, 2]))
def test_classify_chunks_matches_reference(case: tuple[bytes, int], nthreads: int) -> None:
    buf, chunk_size = case
    assert scan.classify_chunks(buf, chunk_size, nthreads=nthreads).tobytes() == \
        reference.classify_chunks(buf, chunk_size).tobytes()


@given(chunked_buffers(), st.sampled_from([1, 8, 100, 4096]))
def test_zero_blocks_matches_reference(case: tuple[bytes, int], block_size: int) -> None:
    buf, _ = case
    got = scan.zero_blocks(buf, block_size)
    assert got.dtype == np.uint8
    assert got.tobytes() == reference.zero_blocks(buf, block_size).tobytes()


def test_zero_detection_finds_a_single_byte_anywhere() -> None:
    """One set byte at every position of a 4 KiB block (head words and the memcmp tail alike)."""
    block = bytearray(4096)
    for pos in range(4096):
        block[pos] = 0x80
        assert scan.zero_blocks(block, 4096).tolist() == [0], pos
        assert scan.scan_chunks(block, 4096, KEY)[0].tolist() == [scan.DATA], pos
        block[pos] = 0
    assert scan.zero_blocks(block, 4096).tolist() == [1]


# ---------------------------------------------------------------- bitmap

@st.composite
def bitmaps(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """A packed bitmap built from stretches of 0x00, 0xFF and random bytes, and an nbits inside it."""
    parts = []
    for kind, size in draw(st.lists(st.tuples(st.sampled_from(["00", "ff", "rnd"]), st.integers(1, 40)),
                                    max_size=8)):
        if kind == "rnd":
            parts.append(draw(st.binary(min_size=size, max_size=size)))
        else:
            parts.append(bytes.fromhex(kind) * size)
    raw = b"".join(parts)
    nbits = draw(st.integers(0, len(raw) * 8))
    return np.frombuffer(raw, dtype=np.uint8).copy(), nbits


FACTORS = st.one_of(st.integers(1, 20), st.sampled_from([32, 63, 64, 65, 256, 1000]))


@given(bitmaps())
def test_count_matches_reference(case: tuple[np.ndarray, int]) -> None:
    bits, nbits = case
    assert bitmap.count(bits, nbits) == reference.count(bits, nbits)
    assert bitmap.count(bits.tobytes(), nbits) == reference.count(bits, nbits)


@given(bitmaps(), FACTORS)
def test_coarsen_matches_reference(case: tuple[np.ndarray, int], factor: int) -> None:
    bits, nbits = case
    got = bitmap.coarsen(bits, nbits, factor)
    assert got.dtype == np.uint8
    assert got.tobytes() == reference.coarsen(bits, nbits, factor).tobytes()


@given(bitmaps())
def test_runs_matches_reference(case: tuple[np.ndarray, int]) -> None:
    bits, nbits = case
    got = bitmap.runs(bits, nbits)
    want = reference.runs(bits, nbits)
    assert got.dtype == np.int64 and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


@given(bitmaps(), st.integers(0, 400), st.integers(-3, 400), st.booleans())
def test_set_and_clear_range_match_reference(case: tuple[np.ndarray, int], start: int, length: int,
                                             setting: bool) -> None:
    bits, _ = case
    native, ref = bits.copy(), bits.copy()
    fn, ref_fn = ((bitmap.set_range, reference.set_range) if setting
                  else (bitmap.clear_range, reference.clear_range))
    if length > 0 and start + length > len(bits) * 8:
        with pytest.raises(IndexError):
            fn(native, start, length)
        assert native.tobytes() == bits.tobytes()  # refused before touching anything
        return
    fn(native, start, length)
    ref_fn(ref, start, length)
    assert native.tobytes() == ref.tobytes()


def test_bitmap_bad_arguments() -> None:
    bits = np.zeros(4, np.uint8)
    with pytest.raises(IndexError):
        bitmap.count(bits, 33)
    with pytest.raises(IndexError):
        bitmap.runs(bits, 40)
    with pytest.raises(ValueError):
        bitmap.coarsen(bits, 32, 0)
    with pytest.raises(ValueError):
        bitmap.count(bits, -1)
    with pytest.raises(ValueError):
        bitmap.set_range(bits, -1, 4)


def test_bitmap_beyond_2_pow_32_bits() -> None:
    """Positions past 2^32 survive (64-bit indices): runs at both ends of a 2^32 + 64 bit bitmap.

    np.zeros maps untouched zero pages, so the 512 MiB array costs little real memory.
    """
    nbits = 1 << 32
    bits = np.zeros((nbits >> 3) + 8, dtype=np.uint8)
    bitmap.set_range(bits, 5, 3)
    bitmap.set_range(bits, nbits - 2, 66)
    got = bitmap.runs(bits, nbits + 64)
    assert got.tolist() == [[5, 3], [nbits - 2, 66]]
    assert bitmap.count(bits, nbits + 64) == 69
    coarse = bitmap.coarsen(bits, nbits + 64, 1 << 20)
    assert bitmap.runs(coarse, (nbits >> 20) + 1).tolist() == [[0, 1], [(nbits >> 20) - 1, 2]]

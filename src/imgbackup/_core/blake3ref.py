"""Keyed BLAKE3, in pure Python, written from the BLAKE3 specification (O'Connor et al., 2020).

The reference for chunk ids: slow (about 1 MB/s) and obvious. Tests check the native hash
(the ``blake3`` package, Rust with SIMD) against it. Only what chunk ids need is here: the
keyed mode (``keyed_hash``) and the plain hash (``hash``, for the published test vectors), both
with the default 32-byte output.
"""

from __future__ import annotations

import struct

OUT_LEN = 32
KEY_LEN = 32
BLOCK_LEN = 64
CHUNK_LEN = 1024

# Domain flags of the compression function (spec section 2.1).
CHUNK_START = 1 << 0
CHUNK_END = 1 << 1
PARENT = 1 << 2
ROOT = 1 << 3
KEYED_HASH = 1 << 4

IV = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)
MSG_PERMUTATION = (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8)
_M32 = 0xFFFFFFFF


def _rotr(x: int, n: int) -> int:
    return ((x >> n) | (x << (32 - n))) & _M32


def _g(v: list[int], a: int, b: int, c: int, d: int, mx: int, my: int) -> None:
    v[a] = (v[a] + v[b] + mx) & _M32
    v[d] = _rotr(v[d] ^ v[a], 16)
    v[c] = (v[c] + v[d]) & _M32
    v[b] = _rotr(v[b] ^ v[c], 12)
    v[a] = (v[a] + v[b] + my) & _M32
    v[d] = _rotr(v[d] ^ v[a], 8)
    v[c] = (v[c] + v[d]) & _M32
    v[b] = _rotr(v[b] ^ v[c], 7)


def _round(v: list[int], m: list[int]) -> None:
    _g(v, 0, 4, 8, 12, m[0], m[1])      # columns
    _g(v, 1, 5, 9, 13, m[2], m[3])
    _g(v, 2, 6, 10, 14, m[4], m[5])
    _g(v, 3, 7, 11, 15, m[6], m[7])
    _g(v, 0, 5, 10, 15, m[8], m[9])     # diagonals
    _g(v, 1, 6, 11, 12, m[10], m[11])
    _g(v, 2, 7, 8, 13, m[12], m[13])
    _g(v, 3, 4, 9, 14, m[14], m[15])


def compress(cv: tuple[int, ...], block: bytes, counter: int, block_len: int, flags: int) -> list[int]:
    """The compression function: 16 output words (the first 8 are the new chaining value)."""
    m = list(struct.unpack("<16I", block.ljust(BLOCK_LEN, b"\0")))
    v = [*cv, *IV[:4], counter & _M32, (counter >> 32) & _M32, block_len, flags]
    for r in range(7):
        _round(v, m)
        if r < 6:
            m = [m[i] for i in MSG_PERMUTATION]
    for i in range(8):
        v[i] ^= v[i + 8]
        v[i + 8] ^= cv[i]
    return v


class _Node:
    """A compression not yet run: the last step of a chunk or a parent, which may be the root."""

    def __init__(self, cv: tuple[int, ...], block: bytes, counter: int, block_len: int, flags: int) -> None:
        self.args = (cv, block, counter, block_len, flags)

    def chaining_value(self) -> tuple[int, ...]:
        return tuple(compress(*self.args)[:8])

    def root_digest(self) -> bytes:
        cv, block, _counter, block_len, flags = self.args
        return struct.pack("<8I", *compress(cv, block, 0, block_len, flags | ROOT)[:8])


def _chunk(key: tuple[int, ...], data: bytes, index: int, flags: int) -> _Node:
    """A chunk of at most 1024 bytes: every block but the last is compressed here."""
    cv = key
    blocks = [data[i : i + BLOCK_LEN] for i in range(0, len(data), BLOCK_LEN)] or [b""]
    for n, block in enumerate(blocks):
        bflags = flags | (CHUNK_START if n == 0 else 0)
        if n == len(blocks) - 1:
            return _Node(cv, block, index, len(block), bflags | CHUNK_END)
        cv = tuple(compress(cv, block, index, BLOCK_LEN, bflags)[:8])
    raise AssertionError("unreachable")


def _subtree(key: tuple[int, ...], data: bytes, first_chunk: int, flags: int) -> _Node:
    """The node over ``data`` (whole chunks from ``first_chunk``): the left subtree holds the
    largest power of two of chunks that is smaller than the total (spec section 2.5)."""
    chunks = max(1, -(-len(data) // CHUNK_LEN))
    if chunks == 1:
        return _chunk(key, data, first_chunk, flags)
    left = 1 << ((chunks - 1).bit_length() - 1)
    lnode = _subtree(key, data[: left * CHUNK_LEN], first_chunk, flags)
    rnode = _subtree(key, data[left * CHUNK_LEN :], first_chunk + left, flags)
    block = struct.pack("<16I", *lnode.chaining_value(), *rnode.chaining_value())
    return _Node(key, block, 0, BLOCK_LEN, flags | PARENT)


def keyed_hash(key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """BLAKE3 in keyed mode with a 32-byte key: 32-byte output."""
    if len(key) != KEY_LEN:
        raise ValueError("a BLAKE3 key is 32 bytes")
    return _subtree(struct.unpack("<8I", key), bytes(data), 0, KEYED_HASH).root_digest()


def hash(data: bytes | bytearray | memoryview) -> bytes:  # noqa: A001 - the spec's name
    """BLAKE3 (unkeyed): 32-byte output."""
    return _subtree(IV, bytes(data), 0, 0).root_digest()


# ---- the same hash with numpy, one lane per chunk / per parent: for running whole backups on the
# reference core (IMGBACKUP_CORE=reference) at ~tens of MB/s instead of ~1 MB/s. Same spec, same
# tree: pairing the nodes of each level left to right (an odd last one moves up a level) builds
# exactly the tree of section 2.5, whose left subtrees are complete.

def _g_v(v: list, a: int, b: int, c: int, d: int, mx, my) -> None:
    import numpy as np

    r16, r12, r8, r7 = np.uint32(16), np.uint32(12), np.uint32(8), np.uint32(7)
    l16, l20, l24, l25 = np.uint32(16), np.uint32(20), np.uint32(24), np.uint32(25)
    v[a] = v[a] + v[b] + mx
    x = v[d] ^ v[a]
    v[d] = (x >> r16) | (x << l16)
    v[c] = v[c] + v[d]
    x = v[b] ^ v[c]
    v[b] = (x >> r12) | (x << l20)
    v[a] = v[a] + v[b] + my
    x = v[d] ^ v[a]
    v[d] = (x >> r8) | (x << l24)
    v[c] = v[c] + v[d]
    x = v[b] ^ v[c]
    v[b] = (x >> r7) | (x << l25)


def _compress_v(cv: list, m: list, counter, block_len: int, flags: int) -> list:
    """``compress`` on arrays: cv and m are lists of uint32 arrays (8 and 16 of them), one lane each."""
    import numpy as np

    lanes = cv[0].shape
    counter = np.broadcast_to(np.asarray(counter, np.uint64), lanes)
    v = [*cv, *(np.full(lanes, w, np.uint32) for w in IV[:4]), (counter & _M32).astype(np.uint32),
         (counter >> np.uint64(32)).astype(np.uint32), np.full(lanes, block_len, np.uint32),
         np.full(lanes, flags, np.uint32)]
    with np.errstate(over="ignore"):
        for r in range(7):
            _g_v(v, 0, 4, 8, 12, m[0], m[1])
            _g_v(v, 1, 5, 9, 13, m[2], m[3])
            _g_v(v, 2, 6, 10, 14, m[4], m[5])
            _g_v(v, 3, 7, 11, 15, m[6], m[7])
            _g_v(v, 0, 5, 10, 15, m[8], m[9])
            _g_v(v, 1, 6, 11, 12, m[10], m[11])
            _g_v(v, 2, 7, 8, 13, m[12], m[13])
            _g_v(v, 3, 4, 9, 14, m[14], m[15])
            if r < 6:
                m = [m[i] for i in MSG_PERMUTATION]
    return [v[i] ^ v[i + 8] for i in range(8)]


def keyed_hash_fast(key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """``keyed_hash`` with the whole chunks and each tree level computed as numpy lanes."""
    import numpy as np

    if len(key) != KEY_LEN:
        raise ValueError("a BLAKE3 key is 32 bytes")
    data = bytes(data)
    kw = struct.unpack("<8I", key)
    chunks = max(1, -(-len(data) // CHUNK_LEN))
    if chunks == 1:
        return _chunk(kw, data, 0, KEYED_HASH).root_digest()
    full = chunks - 1                                  # every chunk but the last is whole
    words = np.frombuffer(data, "<u4", full * CHUNK_LEN // 4).reshape(full, 16, 16)
    words = np.ascontiguousarray(words.transpose(1, 2, 0)).astype(np.uint32)   # (block, word, chunk)
    cv = [np.full(full, w, np.uint32) for w in kw]
    counters = np.arange(full, dtype=np.uint64)
    for b in range(16):
        flags = KEYED_HASH | (CHUNK_START if b == 0 else 0) | (CHUNK_END if b == 15 else 0)
        cv = _compress_v(cv, list(words[b]), counters, BLOCK_LEN, flags)
    last = _chunk(kw, data[full * CHUNK_LEN :], full, KEYED_HASH).chaining_value()
    nodes = [np.concatenate([cv[i], np.array([last[i]], np.uint32)]) for i in range(8)]
    key_v = lambda n: [np.full(n, w, np.uint32) for w in kw]  # noqa: E731
    while len(nodes[0]) > 2:
        n = len(nodes[0])
        pairs = n // 2
        m = [nodes[i][0 : 2 * pairs : 2] for i in range(8)] + [nodes[i][1 : 2 * pairs : 2] for i in range(8)]
        up = _compress_v(key_v(pairs), m, 0, BLOCK_LEN, KEYED_HASH | PARENT)
        nodes = [np.concatenate([up[i], nodes[i][2 * pairs :]]) for i in range(8)]
    block = struct.pack("<16I", *(int(nodes[i][0]) for i in range(8)), *(int(nodes[i][1]) for i in range(8)))
    return _Node(kw, block, 0, BLOCK_LEN, KEYED_HASH | PARENT).root_digest()

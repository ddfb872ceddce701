"""Pure-Python references of the table kernels (``imgbackup._core.table``): slow, obvious, the definition.

A table is a (n, stride) uint8 array whose rows start with a 32-byte id. 48-byte chunk-index rows
(id, pack u32, offset u32, length u32, info u32, little-endian) order equal ids by preference: a
whole chunk (info bit 31 clear) before a delta, then by pack number, then by offset. With
``IMGBACKUP_CORE=reference`` this module stands in for the native one.
"""

from __future__ import annotations

import numpy as np

KEY = 32


def _key(row: np.ndarray) -> tuple:
    raw = row.tobytes()
    if len(raw) != 48:
        return (raw[:KEY], 0, raw[KEY:])
    pack, offset, info = (int.from_bytes(raw[p : p + 4], "little") for p in (32, 36, 44))
    return (raw[:KEY], ((info >> 31) << 63) | (pack << 31) | (offset >> 1), raw[KEY:])


def _check(rows: np.ndarray) -> None:
    if rows.ndim != 2 or not KEY <= rows.shape[1] <= 256 or rows.dtype != np.uint8:
        raise ValueError("a table is a (n, stride) uint8 array with 32 <= stride <= 256")


def table_sort(rows: np.ndarray) -> None:
    _check(rows)
    rows[:] = np.array(sorted(rows, key=_key), np.uint8).reshape(rows.shape)


def table_partition(rows: np.ndarray) -> np.ndarray:
    _check(rows)
    order = np.argsort(rows[:, 0], kind="stable") if len(rows) else np.zeros(0, np.int64)
    rows[:] = rows[order]
    counts = np.bincount(rows[:, 0], minlength=256) if len(rows) else np.zeros(256, np.int64)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def directory_bits(n: int) -> int:
    bits = 12
    while bits < 24 and (n >> bits) > 8:
        bits += 1
    return bits


def table_directory(rows: np.ndarray, bits: int) -> np.ndarray:
    if not 1 <= bits <= 24:
        raise ValueError("1 to 24 directory bits, fewer than 2^32 rows")
    out = np.zeros((1 << bits) + 1, np.int64)
    for row in rows:
        out[(int.from_bytes(row[:4].tobytes(), "big") >> (32 - bits)) + 1] += 1
    return np.cumsum(out).astype(np.uint32)


def table_lookup(rows: np.ndarray, directory: np.ndarray, ids: np.ndarray) -> np.ndarray:
    slots = directory.shape[0] - 1
    if ids.shape[1] != KEY or slots < 2 or slots & (slots - 1) or slots > 1 << 24 or directory[-1] != len(rows):
        raise ValueError("ids are (m, 32); the directory (2^bits + 1 entries) must be this table's")
    first: dict[bytes, int] = {}
    for i, row in enumerate(rows):
        first.setdefault(row[:KEY].tobytes(), i)
    return np.array([first.get(q.tobytes(), -1) for q in ids], np.int64)


def table_dedup(rows: np.ndarray) -> tuple[int, np.ndarray]:
    kept, spare, seen = [], [], set()
    for row in rows:
        key = row[:KEY].tobytes()
        (spare if key in seen else kept).append(row.copy())
        seen.add(key)
    rows[: len(kept)] = np.array(kept, np.uint8).reshape(len(kept), rows.shape[1])
    return len(kept), np.array(spare, np.uint8).reshape(len(spare), rows.shape[1])


def table_compact(rows: np.ndarray, keep: np.ndarray) -> int:
    if keep.shape[0] != rows.shape[0]:
        raise ValueError("one keep flag per row")
    kept = rows[keep.astype(bool)].copy()
    rows[: len(kept)] = kept
    return len(kept)


def table_merge(rows: np.ndarray, used: int, more: np.ndarray) -> int:
    if more.shape[1] != rows.shape[1] or rows.shape[0] < used + len(more):
        raise ValueError("the table has no room for the rows to merge, or their width differs")
    merged = sorted([*rows[:used].copy(), *more.copy()], key=_key)
    rows[: used + len(more)] = np.array(merged, np.uint8).reshape(used + len(more), rows.shape[1])
    return used + len(more)


def table_scatter(rows: np.ndarray, out: np.ndarray, fill: np.ndarray, capacity: int, pack_offset: int,
                  spill: np.ndarray) -> int:
    if (out.shape[1] != rows.shape[1] or spill.shape[1] != rows.shape[1] or len(spill) < len(rows)
            or len(fill) != 256 or capacity < 0 or len(out) < 256 * capacity):
        raise ValueError("out holds 256 buckets of capacity rows of the rows' width; spill room for every row")
    spilled = 0
    for row in rows:
        row = row.copy()
        if len(row) == 48:
            pack = (int.from_bytes(row[32:36].tobytes(), "little") + pack_offset) & 0xFFFFFFFF
            row[32:36] = np.frombuffer(pack.to_bytes(4, "little"), np.uint8)
        b = int(row[0])
        if fill[b] < capacity:
            out[b * capacity + fill[b]] = row
            fill[b] += 1
        else:
            spill[spilled] = row
            spilled += 1
    return spilled


def table_close_buckets(rows: np.ndarray, fill: np.ndarray, capacity: int) -> int:
    if len(fill) != 256 or capacity < 0 or len(rows) < 256 * capacity:
        raise ValueError("256 buckets of capacity rows")
    if ((fill < 0) | (fill > capacity)).any():
        raise ValueError("a bucket holds 0 to capacity rows")
    kept = np.concatenate([rows[b * capacity : b * capacity + int(fill[b])] for b in range(256)]) if len(rows) else rows
    rows[: len(kept)] = kept
    return len(kept)

"""A set of chunk ids as one sorted (n, 32) uint8 array: what images need, at 10^7 chunks.

A Python set of bytes costs ~100 bytes per id; this costs 32 (plus 0.5 for the lookup directory),
and a whole array of ids is tested in one native call. Built from the images' id arrays in batches
(sorted in place by the native radix sort, duplicates dropped), so the peak stays near the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from imgbackup._core import table as kernels
from imgbackup.repository.chunktable import _resize, sort_rows

MERGE_BELOW = 1 << 20    # ids gathered before a merge at least: fewer merges than images, bounded buffer


def _sorted_unique(ids: np.ndarray) -> np.ndarray:
    ids = np.array(ids, np.uint8, copy=True, order="C").reshape(-1, 32)
    if len(ids) > 1:
        sort_rows(ids)
        kept, _ = kernels.table_dedup(ids)
        ids = _resize(ids, kept)
    return ids


class ChunkIds:
    """Sorted, distinct chunk ids; ``in``, ``len``, iteration (bytes) and ``|`` like a set."""

    def __init__(self, ids: np.ndarray | None = None, sorted_unique: bool = False) -> None:
        if ids is None:
            ids = np.zeros((0, 32), np.uint8)
        self.ids = ids if sorted_unique else _sorted_unique(ids)
        self._dir = kernels.table_directory(self.ids, kernels.directory_bits(len(self.ids)))

    @classmethod
    def of(cls, ids: ChunkIds | Iterable[bytes] | np.ndarray) -> ChunkIds:
        if isinstance(ids, ChunkIds):
            return ids
        if isinstance(ids, np.ndarray):
            return cls(ids)
        items = list(ids)
        return cls(np.frombuffer(b"".join(items), np.uint8).reshape(len(items), 32) if items else None)

    @classmethod
    def union_of(cls, arrays: Iterable[np.ndarray]) -> ChunkIds:
        """The distinct ids of many (m, 32) arrays (the images' ids), merged in batches."""
        acc = np.zeros((0, 32), np.uint8)
        batch: list[np.ndarray] = []
        pending = 0
        for ids in arrays:
            batch.append(ids)
            pending += len(ids)
            if pending >= max(len(acc), MERGE_BELOW):
                acc, batch, pending = _sorted_unique(np.concatenate([acc, *batch])), [], 0
        if batch:
            acc = _sorted_unique(np.concatenate([acc, *batch]))
        return cls(acc, sorted_unique=True)

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Position of each id of an (m, 32) array, -1 for the ones not in the set."""
        ids = np.ascontiguousarray(ids, np.uint8).reshape(-1, 32)
        return kernels.table_lookup(self.ids, self._dir, ids)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        return self.find(ids) >= 0

    def __contains__(self, chunk_id: object) -> bool:
        if not isinstance(chunk_id, bytes | bytearray) or len(chunk_id) != 32:
            return False
        return bool(self.find(np.frombuffer(chunk_id, np.uint8))[0] >= 0)

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[bytes]:
        for row in self.ids:
            yield row.tobytes()

    def __or__(self, other: ChunkIds | Iterable[bytes]) -> ChunkIds:
        more = ChunkIds.of(other).ids
        return self if not len(more) else ChunkIds(np.concatenate([self.ids, more]))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ChunkIds):
            return np.array_equal(self.ids, other.ids)
        if isinstance(other, set | frozenset):
            return len(other) == len(self) and all(cid in other for cid in self)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

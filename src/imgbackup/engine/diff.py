"""Which byte ranges differ between two images, from their indexes alone (no chunk is read)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imgbackup.engine.slots import byte_extents
from imgbackup.errors import UsageError
from imgbackup.format.imageindex import ImageIndex
from imgbackup.format.layout import SLOT_UNUSED, SLOT_ZERO
from imgbackup.repository.repo import Repository


@dataclass
class ImageDiff:
    a: str
    b: str
    chunk_size: int
    extents: list[tuple[int, int]]     # (offset, length) in bytes

    @property
    def changed_bytes(self) -> int:
        return sum(length for _, length in self.extents)

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "chunk_size": self.chunk_size, "changed_bytes": self.changed_bytes,
                "extents": [{"offset": o, "length": n} for o, n in self.extents]}


def _slots_as_content(index: ImageIndex, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Kinds (unused counted as zero: both restore as zeros) and ids, padded to ``slots``."""
    kinds = np.full(slots, 255, np.uint8)
    kinds[: index.slots] = np.where(index.kinds == SLOT_UNUSED, SLOT_ZERO, index.kinds)
    ids = np.zeros((slots, 32), np.uint8)
    ids[: index.slots] = index.ids_by_slot()
    return kinds, ids


def diff_images(repo: Repository, a_id: str, b_id: str) -> ImageDiff:
    a, b = repo.images.load(a_id), repo.images.load(b_id)
    if a.chunk_size != b.chunk_size:
        raise UsageError("images with different chunk sizes cannot be compared slot by slot")
    slots = max(a.slots, b.slots)
    ka, ia = _slots_as_content(a, slots)
    kb, ib = _slots_as_content(b, slots)
    differs = (ka != kb) | np.any(ia != ib, axis=1)
    return ImageDiff(a.id, b.id, a.chunk_size, byte_extents(differs, a.chunk_size, max(a.size, b.size)))

"""Runs of slots: the one place that turns a per-slot mask into (first, count) runs."""

from __future__ import annotations

import numpy as np

from imgbackup._core import bitmap


def slot_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, count) runs of True in a boolean per-slot array (native run scan)."""
    if not len(mask):
        return []
    packed = np.packbits(np.asarray(mask, bool), bitorder="little")
    return [(int(a), int(n)) for a, n in bitmap.runs(packed, len(mask))]


def byte_extents(mask: np.ndarray, chunk: int, size: int) -> list[tuple[int, int]]:
    """The runs of ``mask`` as (offset, length) byte ranges of a source of ``size`` bytes."""
    return [(a * chunk, min((a + n) * chunk, size) - a * chunk) for a, n in slot_runs(mask)]

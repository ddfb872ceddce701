"""What each image costs in the repository: the stored bytes it references, and what only it holds.

Computed from the chunk index (each chunk's stored length) and every image's index (which chunks
it names), with sorted id arrays rather than Python sets, so a repository of many large images
fits in memory: 32 bytes per chunk reference.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from imgbackup.errors import ImageNotFound, IntegrityError, UnsupportedFormat
from imgbackup.format.imageindex import ImageIndex
from imgbackup.format.layout import SLOT_DATA, SLOT_UNUSED, SLOT_ZERO
from imgbackup.repository.chunkindex import ChunkIndex
from imgbackup.repository.repo import Repository


@dataclass
class ImageStats:
    """``stored_bytes``: the image's index object plus every distinct chunk it references, as stored
    (compressed, sealed). ``unique_bytes``: the part no other image references — about what deleting
    the image frees. ``missing_chunks``: referenced but in no pack the chunk index knows (damage)."""

    chunks: int
    stored_bytes: int
    unique_chunks: int
    unique_bytes: int
    index_bytes: int
    missing_chunks: int = 0
    data_slots: int = 0        # slots by kind: data (stored chunks), zero, unused by any filesystem
    zero_slots: int = 0
    unused_slots: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ImagesStats:
    images: dict[str, ImageStats]       # per readable image asked for
    errors: dict[str, str]              # image id -> why its index could not be read
    referenced: set[bytes]              # every chunk id a readable image names
    referenced_bytes: int               # their stored bytes, each chunk once (after dedup)


def _distinct_ids(index: ImageIndex) -> np.ndarray:
    return np.unique(np.ascontiguousarray(index.ids).view("V32").ravel())


def _slot_kinds(index: ImageIndex) -> dict[str, int]:
    counts = np.bincount(index.kinds, minlength=3)
    return {"data_slots": int(counts[SLOT_DATA]), "zero_slots": int(counts[SLOT_ZERO]),
            "unused_slots": int(counts[SLOT_UNUSED])}


def _chunk_table(chunks: ChunkIndex) -> tuple[np.ndarray, np.ndarray]:
    """Sorted chunk ids (V32) and their stored lengths."""
    ids = np.frombuffer(b"".join(chunks.locations), dtype="V32")
    lengths = np.fromiter((loc.length for loc in chunks.locations.values()), np.int64, len(ids))
    order = np.argsort(ids)
    return ids[order], lengths[order]


Loaded = tuple[np.ndarray, dict[str, int], int]   # distinct chunk ids, slot kinds, the object's size


def _load_all(repo: Repository) -> list[tuple[str, Loaded | str]]:
    """What each image's stats need (its index from the local caches where they hold it), or why it
    cannot be read; several fetched at a time (the storage's read parallelism), each index dropped
    once reduced."""
    def one(image_id: str) -> tuple[str, Loaded | str]:
        try:
            index, size = repo.images.load_cached(image_id)
        except (IntegrityError, UnsupportedFormat, ImageNotFound) as exc:
            return image_id, exc.args[0]
        return image_id, (_distinct_ids(index), _slot_kinds(index), size)

    ids = repo.images.ids()
    workers = min(getattr(repo.storage, "read_parallelism", 1), len(ids))
    if workers <= 1:
        out = [one(i) for i in ids]
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="imgbackup-stats") as pool:
            out = list(pool.map(one, ids))
    repo.images.save_cache()
    return out


def image_stats(repo: Repository, image_ids: list[str] | None = None) -> ImagesStats:
    """Stats of ``image_ids`` (default: all); sharing is counted against every image in the repository."""
    distinct: dict[str, np.ndarray] = {}
    kinds: dict[str, dict[str, int]] = {}
    errors: dict[str, str] = {}
    object_bytes: dict[str, int] = {}
    for image_id, loaded in _load_all(repo):
        if isinstance(loaded, str):
            errors[image_id] = loaded
        else:
            distinct[image_id], kinds[image_id], object_bytes[image_id] = loaded
    known, lengths = _chunk_table(repo.chunk_index())
    every = np.concatenate([*distinct.values(), np.zeros(0, "V32")])
    shared_ids, refs = np.unique(every, return_counts=True)
    out: dict[str, ImageStats] = {}
    for image_id in image_ids if image_ids is not None else list(distinct):
        ids = distinct.get(image_id)
        if ids is None:
            continue
        pos = np.searchsorted(known, ids).clip(0, max(len(known) - 1, 0))
        found = known[pos] == ids if len(known) else np.zeros(len(ids), bool)
        sizes = np.where(found, lengths[pos] if len(known) else 0, 0)
        only_here = refs[np.searchsorted(shared_ids, ids)] == 1
        index_bytes = object_bytes[image_id]
        out[image_id] = ImageStats(
            chunks=len(ids), stored_bytes=int(sizes.sum()) + index_bytes,
            unique_chunks=int(only_here.sum()), unique_bytes=int(sizes[only_here].sum()) + index_bytes,
            index_bytes=index_bytes, missing_chunks=int((~found).sum()), **kinds[image_id])
    listed = np.searchsorted(known, shared_ids).clip(0, max(len(known) - 1, 0))
    present = known[listed] == shared_ids if len(known) else np.zeros(len(shared_ids), bool)
    referenced_bytes = int(lengths[listed][present].sum()) if len(known) else 0
    return ImagesStats(out, errors, {cid.tobytes() for cid in shared_ids}, referenced_bytes)

"""Deleting images and collecting what no image references any more.

Order (a crash at any point leaves a valid repository): delete the image index; copy the live
blobs of partly dead packs into new packs; write one chunk-index file naming every live chunk;
delete the old chunk-index files; delete dead and copied packs. Sealed blobs are copied as they
are: their authentication binds the chunk id (and a delta's base id), not the pack. A chunk is
live when an image names it or when it is the base of a live delta.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from imgbackup.errors import IntegrityError, UnsupportedFormat
from imgbackup.repository.chunkindex import ChunkIndex
from imgbackup.repository.packs import BlobLocation, PackWriter, pack_name
from imgbackup.repository.repo import Repository


@dataclass
class DeleteResult:
    deleted: list[str]
    packs_deleted: int = 0
    packs_rewritten: int = 0
    chunks_removed: int = 0
    bytes_freed: int = 0
    duration_s: float = 0.0
    warnings: list[str] = field(default_factory=list)


def _referenced(repo: Repository) -> set[bytes] | None:
    """Every chunk id some image names; None when an image cannot be read (then nothing is collected)."""
    ids: set[bytes] = set()
    for image_id in repo.images.ids():
        try:
            ids |= repo.images.load(image_id).unique_ids()
        except (IntegrityError, UnsupportedFormat):
            return None
    return ids


def delete_images(repo: Repository, image_ids: list[str], lock_wait: float = 0.0) -> DeleteResult:
    started = time.monotonic()
    result = DeleteResult(deleted=list(image_ids))
    with repo.lock("delete", lock_wait):
        for image_id in image_ids:
            repo.images.delete(image_id)
        live = _referenced(repo)
        if live is None:
            result.warnings.append("an image index is damaged, so no chunks were collected; run 'imgbackup verify'")
        else:
            _collect(repo, live, result)
    result.duration_s = round(time.monotonic() - started, 3)
    return result


def _collect(repo: Repository, live: set[bytes], result: DeleteResult) -> None:
    storage = repo.storage
    index = ChunkIndex.load(storage, repo.envelope)
    live = live | index.bases_of(live)    # a live delta keeps its base, whichever image named it
    by_pack: dict[bytes, list[tuple[bytes, BlobLocation]]] = {}
    for cid, loc in index.locations.items():
        by_pack.setdefault(loc.pack_id, []).append((cid, loc))
    known_packs = {pack_name(p) for p in by_pack}
    orphans = [n for n in storage.list("packs") if n not in known_packs]
    keep: dict[bytes, BlobLocation] = {}
    doomed: list[str] = []
    writer = PackWriter(storage, repo.envelope)
    for pack_id, items in by_pack.items():
        alive = [(cid, loc) for cid, loc in items if cid in live]
        result.chunks_removed += len(items) - len(alive)
        if len(alive) == len(items):
            keep.update(alive)
            continue
        doomed.append(pack_name(pack_id))
        for cid, loc in alive:
            writer.add(cid, storage.get_range(pack_name(pack_id), loc.offset, loc.length), loc.raw_length, loc.base)
    if not doomed and not orphans and len(index.files) <= 1:
        return
    writer.flush()
    keep.update(writer.written)
    old_files = list(index.files)
    fresh = ChunkIndex()
    fresh.store(storage, repo.envelope, keep)
    for name in old_files:
        storage.delete(name)
    for name in doomed + orphans:
        result.bytes_freed += storage.size(name)
        storage.delete(name)
    result.bytes_freed -= writer.bytes_written
    result.packs_deleted = len(doomed) + len(orphans)
    result.packs_rewritten = len({loc.pack_id for loc in writer.written.values()})

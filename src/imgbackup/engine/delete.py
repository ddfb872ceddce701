"""Deleting images, then collecting what no image references any more (engine/collect.py).

Order (a crash at any point leaves a valid repository): delete the image indexes; then the
collection frees packs nothing needs, copies the needed blobs out of partly dead packs, writes
the new chunk index, deletes the old index files and the copied packs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from imgbackup.engine.collect import collect
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


def delete_images(repo: Repository, image_ids: list[str], lock_wait: float = 0.0) -> DeleteResult:
    started = time.monotonic()
    result = DeleteResult(deleted=list(image_ids))
    with repo.lock("delete", lock_wait, may_use_reserve=True):
        for image_id in image_ids:
            repo.images.delete(image_id)
        _plan, done = collect(repo)
    result.packs_deleted, result.packs_rewritten = done.packs_deleted, done.packs_rewritten
    result.chunks_removed, result.bytes_freed, result.warnings = done.chunks_removed, done.bytes_freed, done.warnings
    result.duration_s = round(time.monotonic() - started, 3)
    return result

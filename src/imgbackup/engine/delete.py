"""Deleting images, then collecting what no image references any more (engine/collect.py).

Order (a crash at any point leaves a valid repository): under the lock, the removals the catalog
log already records are finished; one log entry records the images being deleted (the commit
point: from then on they count as removed); their indexes are deleted; then the collection frees
packs nothing needs, copies the needed blobs out of partly dead packs, writes the new chunk index,
deletes the old index files and the copied packs. Held images are refused (nothing is removed), and
so is everything in an append-only repository.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from imgbackup import audit, interrupts
from imgbackup.engine.removal import begin, collect
from imgbackup.repository.repo import Repository


@dataclass
class DeleteResult:
    deleted: list[str]
    retained: list[str] = field(default_factory=list)   # indexes Object Lock keeps until their date
    packs_deleted: int = 0
    packs_rewritten: int = 0
    chunks_removed: int = 0
    bytes_freed: int = 0
    duration_s: float = 0.0
    warnings: list[str] = field(default_factory=list)


def delete_images(repo: Repository, image_ids: list[str], lock_wait: float = 0.0) -> DeleteResult:
    """Delete the images and collect their chunks; a ``delete`` audit event records it."""
    with audit.audited("delete", repository=repo.config.id, location=repo.location,
                       image=",".join(image_ids)) as event:
        result = _delete(repo, image_ids, lock_wait)
        event.update(bytes=result.bytes_freed, chunks_removed=result.chunks_removed, images=len(image_ids))
    return result


def _delete(repo: Repository, image_ids: list[str], lock_wait: float) -> DeleteResult:
    started = time.monotonic()
    result = DeleteResult(deleted=list(image_ids))
    repo.refuse_if_append_only("delete")
    with repo.lock("delete", lock_wait, may_use_reserve=True):
        interrupts.set_status("nothing was deleted")
        view, retained = begin(repo, "delete")
        with interrupts.deferred():   # the catalog entry is the commit point: the status must match it
            result.retained = repo.remove_images(image_ids, "deleted", view) + retained
            interrupts.set_status(_interrupted_state(image_ids, image_ids))
        collected = collect(repo, result.retained, _interrupted_state(image_ids, image_ids, freeing_left=False))
        interrupts.set_status(f"{_interrupted_state(image_ids, image_ids, freeing_left=False)} and the space "
                              "only they used freed")
    done = collected.done
    result.packs_deleted, result.packs_rewritten = done.packs_deleted, done.packs_rewritten
    result.chunks_removed, result.bytes_freed = done.chunks_removed, done.bytes_freed
    result.warnings = collected.warnings
    result.duration_s = round(time.monotonic() - started, 3)
    return result


def _interrupted_state(deleted: list[str], wanted: list[str], freeing_left: bool = True) -> str:
    if not deleted:
        return "nothing was deleted"
    done = f"{len(deleted)} of {len(wanted)} image(s) deleted ({', '.join(i[:12] for i in deleted)})"
    return f"{done}; the space they used is not freed yet ('imgbackup compact' frees it)" if freeing_left else done

"""What delete, prune and compact share around the one collection (engine/collect.py): the refusals
(an append-only repository; a held image whose index is missing), finishing removals the catalog
log already records, the chunks the remaining images need, and — on an S3 Object-Lock bucket —
S3 legal holds and lock extension once the collection is done.

An image the log records as removed no longer counts, even while its index is still there (a
remover was killed after the log entry, or Object Lock retains the index): its chunks are not
needed, and the next remover deletes the index.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from imgbackup.engine.collect import CollectionResult
from imgbackup.engine.collect import collect as two_phase_collection
from imgbackup.engine.collectplan import needed_chunks
from imgbackup.engine.objectlock import extend_locks, sync_legal_holds
from imgbackup.errors import ImageHeld
from imgbackup.repository.catalog import CatalogView
from imgbackup.repository.chunkids import ChunkIds
from imgbackup.repository.images import image_name
from imgbackup.repository.repo import Repository


@dataclass
class Collected:
    done: CollectionResult
    needed: ChunkIds | None          # what the images still standing name; None: an index unreadable
    index_files_before: int = 0
    locks_extended: int = 0
    warnings: list[str] = field(default_factory=list)


def removed_in_log(view: CatalogView) -> set[str]:
    return {i for i, r in view.state.images.items() if r["status"] == "removed"}


def refuse_missing_held(repo: Repository, view: CatalogView, command: str) -> None:
    """A held image whose index is gone: its chunks cannot be told from dead ones, so nothing is collected."""
    gone = sorted(set(repo.held_images(view)) - set(repo.images.ids()))
    if gone:
        raise ImageHeld(f"image {gone[0][:12]} is under legal hold but its index is missing; {command} removes "
                        "nothing while the chunks it needs cannot be told apart",
                        "restore the index (e.g. from a copy of the repository); 'imgbackup verify' reports it")


def begin(repo: Repository, command: str) -> tuple[CatalogView, list[str]]:
    """Under the lock: the refusals, then the removals the log records are finished; (the log, the
    ids whose index Object Lock still retains)."""
    view = repo.catalog.view()
    refuse_missing_held(repo, view, command)
    pending = repo.pending_removals(view)
    return view, repo.delete_image_objects(pending)


def needed_now(repo: Repository, exclude: Collection[str] = ()) -> tuple[ChunkIds | None, list[str]]:
    """The chunks the images still standing need (not those the log calls removed, nor ``exclude``)."""
    return needed_chunks(repo, removed_in_log(repo.catalog.view()) | set(exclude))


def collect(repo: Repository, retained_images: Collection[str] = (), done_before: str = "") -> Collected:
    """The two-phase collection (engine/collect.py) over the images still standing, then (Object Lock)
    the S3 legal holds of held images and the lock extension of what the images need (delta bases
    included) — never of what is being removed."""
    repo.require_full_key("remove or rewrite stored data")
    plan, done = two_phase_collection(repo, done_before, exclude=removed_in_log(repo.catalog.view()))
    needed = plan.needed
    out = Collected(done, needed, len(plan.index_files), warnings=list(done.warnings))
    if done.retained:
        out.warnings.append(f"{len(done.retained)} object(s) no image needs are retained by S3 Object Lock until "
                            "their lock date; a later prune, delete or compact removes them")
    _count, notes = sync_legal_holds(repo)
    out.warnings += notes
    if needed is not None:
        skip = {image_name(i) for i in retained_images} | set(done.retained)
        out.locks_extended = extend_locks(repo, needed, skip)
    return out

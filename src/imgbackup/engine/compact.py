"""Compact: reclaim space that nothing references — leftovers of killed or failed runs, packs no
image needs, and the dead part of partly used packs (engine/collect.py does the work). It also
finishes removals the catalog log records, refuses in an append-only repository, and on an
Object-Lock bucket extends the locks of what the images need (engine/removal.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from imgbackup import audit
from imgbackup.engine.collectplan import plan_collection
from imgbackup.engine.removal import begin, collect, needed_now
from imgbackup.repository.repo import Repository


@dataclass
class CompactResult:
    dry_run: bool
    bytes_freed: int                 # net: bytes deleted minus the copies written
    bytes_deleted: int
    bytes_written: int
    packs_deleted: int
    packs_rewritten: int
    temp_files_removed: int
    chunks_removed: int
    index_files_before: int
    index_files_after: int
    duration_s: float
    candidates_held: int = 0         # unneeded, marked, kept until a later compact (two-phase rule)
    warnings: list[str] = field(default_factory=list)


def run_compact(repo: Repository, dry_run: bool = False, lock_wait: float = 0.0) -> CompactResult:
    """Collect under the exclusive lease; a dry run only plans (no lease: a backup running meanwhile may
    add to it), judging the candidates it finds as if it marked them now."""
    started = time.monotonic()
    if dry_run:
        needed, warnings = needed_now(repo)
        plan = plan_collection(repo, needed, warnings, provisional=True)
        temp = sum(size for _, size in plan.temp)
        deleted = temp if plan.blocked else plan.bytes_reclaimable + plan.bytes_to_copy
        copied = 0 if plan.blocked else plan.bytes_to_copy
        return CompactResult(
            True, deleted - copied, deleted, copied, 0 if plan.blocked else len(plan.free) + len(plan.rewrite),
            0 if plan.blocked else len(plan.rewrite), len(plan.temp), 0 if plan.blocked else plan.chunks_removed,
            len(plan.index_files), plan.index_files_after,
            round(time.monotonic() - started, 3), 0 if plan.blocked else len(plan.held) + len(plan.held_packs),
            plan.warnings)
    repo.refuse_if_append_only("compact")
    with audit.audited("compact", repository=repo.config.id, location=repo.location) as event, \
            repo.lock("compact", lock_wait, may_use_reserve=True):
        _view, retained = begin(repo, "compact")
        collected = collect(repo, retained)
        done = collected.done
        event.update(bytes=done.bytes_freed, packs_deleted=done.packs_deleted, packs_rewritten=done.packs_rewritten,
                     chunks_removed=done.chunks_removed)
    return CompactResult(False, done.bytes_freed, done.bytes_deleted, done.bytes_written, done.packs_deleted,
                         done.packs_rewritten, done.temp_files_removed, done.chunks_removed,
                         collected.index_files_before, done.index_files, round(time.monotonic() - started, 3),
                         done.candidates_held, collected.warnings)

"""Verify the catalog log against the repository: what is missing, what was injected, a rollback.

Problems (verify exits 11): a rollback or forked history (the log ends before, or differs from, the
newest entry this client saw); entries missing or out of their chain; an image the log records that
is gone; an image the log never announced; a hold the log records whose record was deleted; a config
that says append-only is off while the log says on. Notes (no failure): what an interrupted command
leaves — an image written but not confirmed, a removal not yet finished (or an index Object Lock
still retains), a hold record whose log entry is missing.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

from imgbackup.repository.catalog import CATALOG
from imgbackup.repository.holds import active_holds, released_ids
from imgbackup.repository.repo import Repository

_ENTRY = re.compile(r"^catalog/[0-9a-f]{16}$")


@dataclass
class CatalogCheck:
    head: int
    entries: int
    entries_read: int
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    interrupted_backups: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "?"


def check_catalog(repo: Repository, accept_rollback: bool = False) -> CatalogCheck:
    """Read the log (from the entry this client remembers on) and compare it with the images."""
    view = repo.catalog.accept_head() if accept_rollback else repo.catalog.view()
    state = view.state
    names = list(repo.storage.list(CATALOG))
    seqs = sorted(int(n.rsplit("/", 1)[1], 16) for n in names if _ENTRY.match(n))
    check = CatalogCheck(state.seq, len(seqs), view.entries_read, list(view.problems))
    if view.rollback:
        check.problems.append(f"{view.rollback}; if the repository was restored from an older copy on purpose, "
                              "'imgbackup verify --accept-rollback' accepts its log as it is now")
    check.problems += [f"unexpected object {n} in the catalog" for n in names if not _ENTRY.match(n)]
    if not seqs:
        check.problems.append("the catalog log is missing (no entries): deleted, or not an imgbackup repository")
    elif seqs != list(range(len(seqs))):
        missing = sorted(set(range(seqs[-1] + 1)) - set(seqs))
        check.problems.append(f"{len(missing)} catalog entr{'y is' if len(missing) == 1 else 'ies are'} missing "
                              f"(first: {missing[0]}): the log was cut")
    _compare_images(repo, state, check)
    _compare_holds(repo, state, check)
    if state.append_only and not repo.config.append_only:
        check.problems.append("the catalog says the repository is append-only, but its config says not: the config "
                              "was rewritten outside 'imgbackup append-only'")
    return check


def _compare_images(repo: Repository, state, check: CatalogCheck) -> None:
    present = set(repo.images.ids())
    for image_id, record in sorted(state.images.items()):
        status, name = record["status"], record.get("name") or "?"
        there = image_id in present
        if status == "added" and not there:
            check.problems.append(f"image {image_id[:12]} ({name}, {_when(record.get('created'))}) is missing: the "
                                  "catalog records it and no removal (its index was deleted)")
        elif status == "adding" and there:
            check.notes.append(f"image {image_id[:12]} ({name}) was stored but its backup never confirmed it "
                               "(interrupted at the very end); it is complete and is kept")
        elif status == "adding":
            check.interrupted_backups += 1
        elif status == "removed" and there:
            check.notes.append(f"image {image_id[:12]} ({name}) was {record.get('removed')} (catalog entry "
                               f"{record.get('removed_seq')}) but its index is still there: interrupted, or retained by "
                               "Object Lock; the next delete, prune or compact removes it")
    for image_id in sorted(present - state.images.keys()):
        check.problems.append(f"image {image_id[:12]} is not in the catalog: imgbackup never announced it in this "
                              "repository (put there from elsewhere?)")


def _compare_holds(repo: Repository, state, check: CatalogCheck) -> None:
    records, unreadable = repo.holds.records()
    released = released_ids(records)
    active = {r.id: r for recs in active_holds(records).values() for r in recs}
    known = {r.id for r in records}
    logged = {rid for holds in state.holds.values() for rid in holds}
    for image_id, holds in sorted(state.holds.items()):
        for rid in sorted(holds):
            if rid not in known and rid not in released:
                check.problems.append(f"the hold {rid[:12]} on image {image_id[:12]} is in the catalog but its record "
                                      "is gone (deleted outside imgbackup); the image stays held")
    for image_id, rid, error in unreadable:
        check.problems.append(f"hold record {rid[:12]} of image {image_id[:12]} cannot be read ({error}); the image "
                              "is treated as held")
    for rid, record in sorted(active.items()):
        if rid not in logged:
            check.notes.append(f"the hold {rid[:12]} on image {record.image[:12]} is not in the catalog (its hold "
                               "command was interrupted); it is in force")

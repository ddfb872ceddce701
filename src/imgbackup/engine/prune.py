"""Prune: apply a retention policy (engine/retention.py) to each source's images, remove the images it
does not keep, then collect what only they needed (engine/collect.py, the one collection mechanism,
through engine/removal.py as delete and compact).

Order, under the repository lock (a crash anywhere leaves every image whole or gone, and verify
passes): removals an earlier run left unfinished are completed; one catalog entry records the images
being pruned (the commit point: from then on they count as removed); their indexes are deleted; the
collection frees what no remaining image needs. Held images are kept (reason "held"), and so are
images whose index cannot be read (reason "unreadable": their age is unknown).
"""

from __future__ import annotations

import datetime
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

from imgbackup import audit
from imgbackup.engine.collectplan import plan_collection
from imgbackup.engine.objectlock import check_lock_period
from imgbackup.engine.removal import collect, needed_now, refuse_missing_held
from imgbackup.engine.retention import HELD, Candidate, RetentionPolicy, apply_policy
from imgbackup.errors import ObjectMissing
from imgbackup.repository.images import ImageEntry, image_name
from imgbackup.repository.repo import Repository

UNREADABLE = "unreadable"


@dataclass
class PrunedImage:
    id: str
    name: str | None
    created: float | None
    time: str | None               # the creation time in the policy's zone (ISO 8601)
    type: str | None
    keep: bool
    reasons: list[str]

    @property
    def action(self) -> str:
        return "keep" if self.keep else "remove"


@dataclass
class PruneResult:
    dry_run: bool
    policy: dict
    timezone: str
    name: str | None
    images: list[PrunedImage]
    removed: list[str] = field(default_factory=list)
    retained: list[str] = field(default_factory=list)     # indexes Object Lock keeps until their date
    pending_completed: list[str] = field(default_factory=list)
    bytes_freed: int = 0            # dry run: what the run would free
    packs_deleted: int = 0
    packs_rewritten: int = 0
    chunks_removed: int = 0
    locks_extended: int = 0
    duration_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return sum(i.keep for i in self.images)

    def to_dict(self) -> dict:
        doc = asdict(self)
        for row, image in zip(doc["images"], self.images, strict=True):
            row["action"] = image.action
        return doc | {"kept": self.kept, "would_remove" if self.dry_run else "removed_count":
                      sum(not i.keep for i in self.images)}


def judge(policy: RetentionPolicy, entries: list[ImageEntry], held: set[str], name: str | None) -> list[PrunedImage]:
    """Every image of the chosen sources with its verdict: grouped by name, newest first in each group."""
    tz, _ = policy.zone()
    groups: dict[str | None, list[ImageEntry]] = {}
    out: list[PrunedImage] = []
    for entry in entries:
        if entry.meta is None:
            if name is None:
                out.append(PrunedImage(entry.id, None, None, None, None, True, [UNREADABLE] +
                                       ([HELD] if entry.id in held else [])))
            continue
        group = entry.meta.get("name")
        if name is None or group == name:
            groups.setdefault(group, []).append(entry)
    for group in sorted(groups, key=str):
        metas = {e.id: e.meta for e in groups[group]}
        verdicts = apply_policy(policy, [Candidate(i, float(m.get("created", 0.0))) for i, m in metas.items()])
        for v in verdicts:
            reasons = v.reasons + ([HELD] if v.id in held else [])
            stamp = datetime.datetime.fromtimestamp(v.created, tz).isoformat(timespec="seconds")
            out.append(PrunedImage(v.id, group, v.created, stamp, metas[v.id].get("type"), bool(reasons), reasons))
    return out


def run_prune(repo: Repository, policy: RetentionPolicy, name: str | None = None, dry_run: bool = False,
              lock_wait: float = 0.0) -> PruneResult:
    """Prune the images of every source (or of ``name``); a dry run decides and measures, changing nothing.
    A real run emits a ``prune`` audit event (ok, refused or failed)."""
    if dry_run:
        return _prune(repo, policy, name, True, 0.0)
    with audit.audited("prune", repository=repo.config.id, location=repo.location,
                       **({"name": name} if name else {})) as event:
        result = _prune(repo, policy, name, False, lock_wait)
        event.update(bytes=result.bytes_freed, images=len(result.removed), image=",".join(result.removed),
                     kept=result.kept, retained=len(result.retained))
    return result


def _prune(repo: Repository, policy: RetentionPolicy, name: str | None, dry_run: bool,
           lock_wait: float) -> PruneResult:
    started = time.monotonic()
    check_lock_period(repo, policy)
    if not dry_run:
        repo.refuse_if_append_only("prune")
    _, zone_name = policy.zone()
    with nullcontext() if dry_run else repo.lock("prune", lock_wait, may_use_reserve=True):
        view = repo.catalog.view()
        refuse_missing_held(repo, view, "prune")
        pending = repo.pending_removals(view)
        held = repo.held_images(view)
        entries = [e for e in repo.images.entries() if e.id not in pending]
        images = judge(policy, entries, set(held), name)
        result = PruneResult(dry_run, policy.to_dict(), zone_name, name, images)
        doomed = [i.id for i in images if not i.keep]
        if dry_run:
            _measure(repo, result, doomed + pending)
        else:
            _remove(repo, result, doomed, pending, view)
    result.duration_s = round(time.monotonic() - started, 3)
    return result


def _index_sizes(repo: Repository, image_ids: list[str]) -> dict[str, int]:
    sizes = {}
    for image_id in image_ids:
        try:
            sizes[image_id] = repo.storage.size(image_name(image_id))
        except ObjectMissing:
            continue
    return sizes


def _measure(repo: Repository, result: PruneResult, going: list[str]) -> None:
    """What removing ``going`` would free: their indexes, and what the collection could then reclaim."""
    needed, warnings = needed_now(repo, exclude=going)
    plan = plan_collection(repo, needed, warnings, strict=False, provisional=True)
    result.warnings += plan.warnings
    indexes = sum(_index_sizes(repo, going).values())
    result.bytes_freed = indexes + (sum(s for _, s in plan.temp) if plan.blocked else plan.bytes_reclaimable)
    result.chunks_removed = 0 if plan.blocked else plan.chunks_removed
    result.packs_deleted = 0 if plan.blocked else len(plan.free) + len(plan.rewrite)
    result.packs_rewritten = 0 if plan.blocked else len(plan.rewrite)


def _remove(repo: Repository, result: PruneResult, doomed: list[str], pending: list[str], view) -> None:
    """The log entry first (the commit point), the indexes, then the collection (engine/removal.py)."""
    sizes = _index_sizes(repo, doomed + pending)
    retained = repo.delete_image_objects(pending)
    result.pending_completed = [i for i in pending if i not in retained]
    if doomed:
        retained += repo.remove_images(doomed, "pruned", view)
    result.removed, result.retained = doomed, retained
    collected = collect(repo, retained)
    done = collected.done
    result.bytes_freed = done.bytes_freed + sum(s for i, s in sizes.items() if i not in retained)
    result.packs_deleted, result.packs_rewritten = done.packs_deleted, done.packs_rewritten
    result.chunks_removed = done.chunks_removed
    result.locks_extended = collected.locks_extended
    result.warnings += collected.warnings
    if retained:
        result.warnings.append(f"{len(retained)} image index(es) are retained by S3 Object Lock until their lock "
                               "date; a later prune, delete or compact removes them")

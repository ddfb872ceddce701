"""Legal holds: placing and releasing them (records in repository/holds.py, events in the catalog log).

A hold is placed in this order: its record, then its catalog entry, then (on an Object-Lock bucket)
the S3 legal hold on every object the image needs — so at every point of a crash the image is at
least as protected as before. A release: the release record, its catalog entry, then the S3 legal
holds come off what no other held image needs. Both run under the repository lock, so no delete,
prune or compact decides about an image while its hold changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from imgbackup import audit
from imgbackup.engine.objectlock import sync_legal_holds
from imgbackup.errors import ImageNotFound, IntegrityError, UnsupportedFormat, UsageError
from imgbackup.repository.holds import MAX_REASON, Hold
from imgbackup.repository.repo import Repository


@dataclass
class HoldResult:
    images: list[str]
    holds: dict[str, list[str]] = field(default_factory=dict)       # image -> hold record ids placed/released
    not_held: list[str] = field(default_factory=list)               # release only: images without a hold
    s3_legal_holds: int = 0                                         # objects whose S3 legal hold was set/cleared
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"images": self.images, "holds": self.holds, "not_held": self.not_held,
                "s3_legal_holds": self.s3_legal_holds, "warnings": self.warnings}


def _check_reason(reason: str, required: bool) -> str:
    reason = (reason or "").strip()
    if required and not reason:
        raise UsageError("a hold needs a reason", "give --reason TEXT (a case number, a ticket, who asked)")
    if len(reason) > MAX_REASON:
        raise UsageError(f"the reason is too long ({len(reason)} characters; at most {MAX_REASON})")
    return reason


def place_holds(repo: Repository, image_ids: list[str], reason: str) -> HoldResult:
    """Hold each image (a ``hold`` audit event records it)."""
    reason = _check_reason(reason, required=True)
    with audit.audited("hold", repository=repo.config.id, location=repo.location, image=",".join(image_ids),
                       reason=reason) as event:
        result = _place(repo, image_ids, reason)
        event.update(holds=sum(len(h) for h in result.holds.values()))
    return result


def _place(repo: Repository, image_ids: list[str], reason: str) -> HoldResult:
    result = HoldResult(list(image_ids))
    with repo.lock("hold"):
        view = repo.catalog.view()
        for image_id in image_ids:
            record = view.state.images.get(image_id)
            if record is not None and record["status"] == "removed":
                raise ImageNotFound(f"image {image_id[:12]} was {record.get('removed')} (catalog entry "
                                    f"{record.get('removed_seq')}); its removal is unfinished, it cannot be held")
            try:
                repo.images.read_meta(image_id)
            except (IntegrityError, UnsupportedFormat):
                result.warnings.append(f"image {image_id[:12]}: its index is damaged; held anyway")
        for image_id in image_ids:
            hold = repo.holds.place(image_id, reason)
            repo.catalog.append([{"event": "held", "image": image_id, "hold": hold.id, "reason": reason}])
            result.holds[image_id] = [hold.id]
        result.s3_legal_holds, notes = sync_legal_holds(repo)
        result.warnings += notes
    return result


def release_holds(repo: Repository, image_ids: list[str], reason: str = "") -> HoldResult:
    """End the holds of each image (a ``release`` audit event records it)."""
    reason = _check_reason(reason, required=False)
    with audit.audited("release", repository=repo.config.id, location=repo.location, image=",".join(image_ids),
                       reason=reason) as event:
        result = _release(repo, image_ids, reason)
        event.update(holds=sum(len(h) for h in result.holds.values()), not_held=len(result.not_held))
    return result


def _release(repo: Repository, image_ids: list[str], reason: str) -> HoldResult:
    result = HoldResult(list(image_ids))
    with repo.lock("release"):
        view = repo.catalog.view()
        held = repo.held_images(view)
        records, _ = repo.holds.records()
        released_before = {rid for r in records if r.action == "release" for rid in r.releases}
        for image_id in image_ids:
            holds: list[Hold] = held.get(image_id, [])
            unlogged = sorted(rid for rid in view.state.holds.get(image_id, {}) if rid in released_before)
            if not holds and not unlogged:
                result.not_held.append(image_id)
                continue
            ids = [h.id for h in holds]
            if ids:
                repo.holds.release(image_id, ids, reason)
            repo.catalog.append([{"event": "released", "image": image_id, "holds": sorted(ids + unlogged),
                                  "reason": reason}])
            result.holds[image_id] = sorted(ids + unlogged)
        result.s3_legal_holds, notes = sync_legal_holds(repo, tuple(result.holds))
        result.warnings += notes
    return result

"""Space accounting: what the repository holds, what its images need, what compact would free.

``repository_stats(repo)`` is for ``info`` and ``list`` (it reads every image index and the pack
listing, but no pack data).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from imgbackup.engine.collectplan import incomplete_writes, plan_collection
from imgbackup.repository.repo import Repository
from imgbackup.repository.stats import ImageStats, image_stats
from imgbackup.repository.storage import object_sizes


@dataclass
class RepositoryStats:
    repository_bytes: int        # every object in the repository, leftovers of killed runs included
    unique_bytes: int            # stored bytes of the distinct chunks the images name (after dedup)
    reclaimable_bytes: int       # what 'imgbackup compact' would free now (net of what it copies)
    packs: int
    index_files: int
    damaged_copies: int          # chunk copies damage records name
    images: dict[str, ImageStats] = field(default_factory=dict)
    unreadable_images: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def repository_stats(repo: Repository) -> RepositoryStats:
    storage = repo.storage
    listed = object_sizes(storage, "")
    total = sum(listed.values())
    total += sum(size for _, size in incomplete_writes(repo))
    per_image = image_stats(repo)
    unreadable = list(per_image.errors)
    needed = per_image.referenced
    plan = plan_collection(repo, None if unreadable else needed, strict=False, provisional=True)
    reclaimable = sum(size for _, size in plan.temp) if plan.blocked else plan.bytes_reclaimable
    return RepositoryStats(total, per_image.referenced_bytes, reclaimable, sum(1 for name in listed if name.startswith("packs/")),
                           len(plan.index_files), len(plan.damage), per_image.images, unreadable)

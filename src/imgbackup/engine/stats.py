"""Space accounting: what the repository holds, what its images need, what compact would free.

``repository_stats(repo)`` is for ``info`` and ``list`` (it reads every image index and the pack
listing, but no pack data).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from imgbackup.engine.collect import incomplete_writes, plan_collection
from imgbackup.errors import ImageNotFound, IntegrityError, UnsupportedFormat
from imgbackup.repository.repo import Repository
from imgbackup.repository.storage import ObjectMissing


@dataclass
class ImageStats:
    stored_bytes: int    # stored (compressed, sealed) bytes of the distinct chunks it names
    unique_bytes: int    # of those, chunks no other image names: about what deleting it alone frees


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
    total = 0
    for name in storage.list(""):
        try:
            total += storage.size(name)
        except ObjectMissing:
            continue
    total += sum(size for _, size in incomplete_writes(repo))
    per_image: dict[str, set[bytes]] = {}
    unreadable = []
    for image_id in repo.images.ids():
        try:
            per_image[image_id] = repo.images.load(image_id).unique_ids()
        except ImageNotFound:
            continue
        except (IntegrityError, UnsupportedFormat):
            unreadable.append(image_id)
    refs = Counter(cid for ids in per_image.values() for cid in ids)
    index = repo.chunk_index()

    def stored(cid: bytes) -> int:
        loc = index.get(cid)
        return loc.length if loc else 0

    images = {image_id: ImageStats(sum(stored(c) for c in ids), sum(stored(c) for c in ids if refs[c] == 1))
              for image_id, ids in per_image.items()}
    plan = plan_collection(repo, None if unreadable else set(refs), strict=False, provisional=True)
    reclaimable = sum(size for _, size in plan.temp) if plan.blocked else plan.bytes_reclaimable
    return RepositoryStats(total, sum(stored(c) for c in refs), reclaimable, len(list(storage.list("packs"))),
                           len(plan.index_files), len(plan.damage), images, unreadable)

"""Which images the chunks without a good copy affect: which byte ranges of each disk, and whether
the next backup of its source can heal it.

A chunk is found by its content: when a later backup stores the same bytes again, every image that
names that chunk reads whole again. So the newest image of a source heals with the next backup if
the source still holds those bytes; an older image heals only where the content returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imgbackup.engine.slots import byte_extents
from imgbackup.errors import ImageNotFound, IntegrityError, UnsupportedFormat
from imgbackup.repository.damage import DamagedCopy
from imgbackup.repository.repo import Repository

MAX_RANGES = 1000   # per image in --json; the count and byte total are always complete


@dataclass
class AffectedImage:
    id: str
    name: str | None
    source: str | None
    created: float | None
    latest_of_source: bool
    chunks: int                          # distinct chunks it names that have no good copy
    ranges: list[tuple[int, int]]        # (offset, length) of the disk they cover
    reasons: dict[str, int]              # damaged / truncated / missing / absent (in no pack)
    chunk_ids: list[str]                 # hex, sorted

    @property
    def bytes(self) -> int:
        return sum(length for _, length in self.ranges)

    @property
    def heal(self) -> str:
        until = "until then restore refuses this image, and 'imgbackup mount' serves the rest of it"
        if self.latest_of_source:
            return (f"the next backup of '{self.name}' stores these chunks again where {self.source} still holds "
                    f"the same bytes, and this image then reads whole again; {until}")
        return (f"a newer image of '{self.name}' exists, so the source has probably changed in these ranges: only "
                f"a backup that stores the same bytes again heals this image; {until}")

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "source": self.source, "created": self.created,
                "latest_of_source": self.latest_of_source, "chunks": self.chunks, "bytes": self.bytes,
                "chunk_ids": self.chunk_ids[:MAX_RANGES],
                "ranges": [list(r) for r in self.ranges[:MAX_RANGES]], "ranges_total": len(self.ranges),
                "reasons": self.reasons, "heal": self.heal}


def affected_images(repo: Repository, good: set[bytes], bad: list[DamagedCopy]
                    ) -> tuple[list[AffectedImage], list[tuple[str, str]], int, set[bytes]]:
    """(affected images, unreadable images, images intact, every chunk id the images name)."""
    why: dict[bytes, str] = {}
    for copy in bad:
        why.setdefault(copy.chunk_id, copy.reason)
    entries = repo.images.entries()
    latest = {e.meta.get("name"): e.id for e in entries if e.meta}     # oldest first: the last one wins
    affected, unreadable, intact, needed = [], [], 0, set()
    for entry in entries:
        if entry.meta is None:
            unreadable.append((entry.id, entry.error or "unreadable"))
            continue
        try:
            index = repo.images.load(entry.id)
        except ImageNotFound:
            continue
        except (IntegrityError, UnsupportedFormat) as exc:
            unreadable.append((entry.id, exc.args[0]))
            continue
        ids = index.unique_ids()
        needed |= ids
        lacking = ids - good
        if not lacking:
            intact += 1
            continue
        per_data_slot = np.fromiter((bytes(row) in lacking for row in index.ids), bool, len(index.ids))
        slots = np.zeros(index.slots, bool)
        slots[index.data_slot_numbers()[per_data_slot]] = True
        reasons: dict[str, int] = {}
        for cid in lacking:
            reasons[why.get(cid, "absent")] = reasons.get(why.get(cid, "absent"), 0) + 1
        meta = entry.meta
        affected.append(AffectedImage(entry.id, meta.get("name"), (meta.get("source") or {}).get("path"),
                                      meta.get("created"), latest.get(meta.get("name")) == entry.id, len(lacking),
                                      byte_extents(slots, index.chunk_size, index.size), reasons,
                                      sorted(cid.hex() for cid in lacking)))
    return affected, unreadable, intact, needed

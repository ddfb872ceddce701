"""Verify: read and authenticate every chunk the chosen images reference, and report what is damaged.

What it finds damaged or missing it records (a damage record): from then on no command uses those
copies, and the next backup of a source that still holds the content stores it again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from imgbackup.errors import ImageNotFound, IntegrityError, StorageError, UnsupportedFormat
from imgbackup.format.imageindex import bad_ranges
from imgbackup.repository.chunkreader import ChunkReader
from imgbackup.repository.damage import ChunkDamaged, DamagedCopy, write_record
from imgbackup.repository.repo import Repository


@dataclass
class ImageCheck:
    id: str
    name: str | None
    chunks: int = 0
    bad_chunks: int = 0
    errors: list[str] = field(default_factory=list)
    bad_ranges: list[list[int]] = field(default_factory=list)   # source sectors unreadable at backup (--rescue)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class VerifyReport:
    images: list[ImageCheck]
    chunks_checked: int
    bytes_checked: int
    duration_s: float
    damage_record: str | None = None          # the record this run wrote, naming what it found
    copies_recorded: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(i.ok for i in self.images)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok, "chunks_checked": self.chunks_checked, "bytes_checked": self.bytes_checked,
            "duration_s": self.duration_s, "damage_record": self.damage_record,
            "copies_recorded": self.copies_recorded, "warnings": self.warnings,
            "images": [{"id": i.id, "name": i.name, "ok": i.ok, "chunks": i.chunks, "bad_chunks": i.bad_chunks,
                        "errors": i.errors, "bad_ranges": i.bad_ranges,
                        "unreadable_bytes": sum(n for _, n in i.bad_ranges)} for i in self.images],
        }


MAX_ERRORS_PER_IMAGE = 50   # enough to see what is damaged; a wholly damaged image still gives a short report


def run_verify(repo: Repository, image_ids: list[str] | None = None,
               progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check the given images (all when None); each chunk shared by several images is read once."""
    started = time.monotonic()
    ids = image_ids if image_ids is not None else repo.images.ids()
    if image_ids is None and not ids:
        return VerifyReport([], 0, 0, 0.0)
    reader = ChunkReader(repo)
    results: dict[bytes, str | None] = {}
    checks = []
    total_bytes = 0
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="imgbackup-verify") as pool:
        for image_id in ids:
            check = ImageCheck(image_id, None)
            checks.append(check)
            try:
                index = repo.images.load(image_id)
            except (IntegrityError, UnsupportedFormat, ImageNotFound) as exc:
                check.errors.append(exc.args[0])
                continue
            check.name = index.meta.get("name")
            check.bad_ranges = [list(r) for r in bad_ranges(index.meta)]
            todo = [cid for cid in index.unique_ids() if cid not in results]

            def one(cid: bytes) -> tuple[bytes, ChunkDamaged | None, int]:
                try:
                    return cid, None, len(reader.read(cid))
                except ChunkDamaged as exc:
                    return cid, exc, 0

            for cid, err, size in pool.map(one, todo):
                results[cid] = err.args[0] if err else None
                total_bytes += size
                if progress:
                    progress(size)
            check.chunks = len(index.unique_ids())
            for cid in index.unique_ids():
                if results[cid] is not None:
                    check.bad_chunks += 1
                    if len(check.errors) < MAX_ERRORS_PER_IMAGE:
                        check.errors.append(results[cid])
    report = VerifyReport(checks, len(results), total_bytes, round(time.monotonic() - started, 3))
    _record(repo, reader.found, report)
    return report


def _record(repo: Repository, found: list[DamagedCopy], report: VerifyReport) -> None:
    """Store what this run found damaged; a repository that cannot be written to only loses the note."""
    if not found:
        return
    try:
        report.damage_record = write_record(repo.storage, repo.envelope, found, "verify")
        report.copies_recorded = len(found)
    except StorageError as exc:
        report.warnings.append(f"could not record the damage found ({exc}); the next backup may still "
                               "reference those chunks: run verify again where the repository is writable")

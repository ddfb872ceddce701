"""Verify: read and authenticate every chunk the chosen images reference, and report what is damaged.

What it finds damaged or missing it records (a damage record): from then on no command uses those
copies, and the next backup of a source that still holds the content stores it again.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from imgbackup import interrupts
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
    checked: int = 0
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
    sample_percent: float = 100.0
    damage_record: str | None = None          # the record this run wrote, naming what it found
    copies_recorded: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(i.ok for i in self.images)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok, "chunks_checked": self.chunks_checked, "bytes_checked": self.bytes_checked,
            "duration_s": self.duration_s, "sample_percent": self.sample_percent,
            "damage_record": self.damage_record, "copies_recorded": self.copies_recorded, "warnings": self.warnings,
            "images": [{"id": i.id, "name": i.name, "ok": i.ok, "chunks": i.chunks, "checked": i.checked,
                        "bad_chunks": i.bad_chunks, "errors": i.errors, "bad_ranges": i.bad_ranges,
                        "unreadable_bytes": sum(n for _, n in i.bad_ranges)} for i in self.images],
        }


MAX_ERRORS_PER_IMAGE = 50   # enough to see what is damaged; a wholly damaged image still gives a short report


class _Tally:
    """How far a verify got: the line an interrupted run ends with."""

    def __init__(self, total: int, unreadable: int) -> None:
        self.total, self.unreadable = total, unreadable
        self.checked = self.bad = 0

    def describe(self) -> str:
        found = []
        if self.bad:
            found.append(f"{self.bad} damaged chunk(s)")
        if self.unreadable:
            found.append(f"{self.unreadable} unreadable image index(es)")
        so_far = " and ".join(found) + " so far" if found else "no problems so far"
        return f"{self.checked} of {self.total} chunks checked, {so_far}"


def _load(repo: Repository, ids: list[str], percent: float,
          rng: random.Random) -> list[tuple[ImageCheck, list[bytes] | None]]:
    """Each image's check and the chunks to read for it (None: its index is unreadable)."""
    out = []
    for image_id in ids:
        check = ImageCheck(image_id, None)
        try:
            index = repo.images.load(image_id)
        except (IntegrityError, UnsupportedFormat, ImageNotFound) as exc:
            check.errors.append(exc.args[0])
            out.append((check, None))
            continue
        check.name = index.meta.get("name")
        check.bad_ranges = [list(r) for r in bad_ranges(index.meta)]
        every = index.unique_ids()
        check.chunks = len(every)
        out.append((check, _sample(every, percent, rng)))
    return out


def _sample(ids: set[bytes], percent: float, rng: random.Random) -> list[bytes]:
    """``percent`` % of ``ids`` (at least one when there are any and percent > 0), chosen at random."""
    ordered = sorted(ids)
    if percent >= 100 or percent <= 0:
        return ordered if percent > 0 else []
    return rng.sample(ordered, min(len(ordered), max(1, math.ceil(len(ordered) * percent / 100))))


def run_verify(repo: Repository, image_ids: list[str] | None = None,
               progress: Callable[[int], None] | None = None,
               progress_total: Callable[[int], None] | None = None, sample_percent: float = 100.0,
               rng: random.Random | None = None) -> VerifyReport:
    """Check the given images (all when None); each chunk shared by several images is read once.

    ``progress_total`` is told the bytes to check (plaintext) before the first chunk is read.
    ``sample_percent`` below 100 reads only that share of each image's chunks, picked at random
    anew on every run (restic's ``--read-data-subset``): repeated runs cover everything over time,
    each at a fraction of the cost. Image indexes are always read and authenticated whole.
    """
    started = time.monotonic()
    rng = rng or random.SystemRandom()
    ids = image_ids if image_ids is not None else repo.images.ids()
    if image_ids is None and not ids:
        return VerifyReport([], 0, 0, 0.0, sample_percent)
    repo.chunk_index(from_repository=True)   # verify checks the index files themselves, not a local cache
    reader = ChunkReader(repo)
    loaded = _load(repo, ids, sample_percent, rng)
    everything = set().union(*(wanted for _, wanted in loaded if wanted is not None))
    tally = _Tally(len(everything), sum(wanted is None for _, wanted in loaded))
    interrupts.set_status(tally.describe)
    if progress_total:
        progress_total(sum(loc.raw_length for cid in everything if (loc := reader.index.get(cid))))
    results: dict[bytes, str | None] = {}

    def one(cid: bytes) -> tuple[bytes, str | None, int]:
        try:
            return cid, None, len(reader.read(cid))
        except ChunkDamaged as exc:
            return cid, exc.args[0], 0

    try:
        total_bytes = _check_all(loaded, one, results, tally, progress)
    except KeyboardInterrupt:
        _record_interrupted(repo, reader, tally)
        raise
    report = VerifyReport([check for check, _ in loaded], len(results), total_bytes,
                          round(time.monotonic() - started, 3), sample_percent)
    _record(repo, reader.found, report)
    if reader.transient:
        first = reader.transient[0]
        report.warnings.append(f"{len(reader.transient)} read(s) came back wrong and were right when read again "
                               f"(first: chunk {first.chunk_id.hex()[:16]}: {first.detail}): the stored data is "
                               "intact, but the path to it (network, controller, RAM) corrupted data in flight")
    interrupts.set_status("nothing was changed" if not report.damage_record
                          else f"what it found damaged was recorded ({report.damage_record})")
    return report


def _check_all(loaded: list[tuple[ImageCheck, list[bytes] | None]], one, results: dict[bytes, str | None],
               tally: _Tally, progress: Callable[[int], None] | None) -> int:
    """Read each chosen chunk once (``one``), filling ``results`` and each check; returns bytes read."""
    total_bytes = 0
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="imgbackup-verify") as pool:
        for check, wanted in loaded:
            if wanted is None:
                continue
            for cid, err, size in pool.map(one, [cid for cid in wanted if cid not in results]):
                results[cid] = err
                total_bytes += size
                tally.checked += 1
                tally.bad += err is not None
                if progress:
                    progress(size)
            check.checked = len(wanted)
            for cid in wanted:
                if results[cid] is not None:
                    check.bad_chunks += 1
                    if len(check.errors) < MAX_ERRORS_PER_IMAGE:
                        check.errors.append(results[cid])
    return total_bytes


def _record_interrupted(repo: Repository, reader: ChunkReader, tally: _Tally) -> None:
    """An interrupted verify still records the damage it found (later signals are ignored meanwhile)."""
    if not reader.found:
        return
    report = VerifyReport([], 0, 0, 0.0)
    _record(repo, reader.found, report)
    line = tally.describe()
    interrupts.set_status(f"{line}; recorded ({report.damage_record})" if report.damage_record
                          else f"{line}; not recorded ({report.warnings[0]})")


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

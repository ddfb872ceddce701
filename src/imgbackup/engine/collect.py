"""Collection: the one mechanism delete, compact (and prune) use to drop what no image needs.

``collect(repo)`` is the contract: what is live is decided by the image indexes (``needed_chunks``);
what may be removed by the two-phase rule (repository/marks.py, docs/FORMAT.md "Garbage collection
in two phases"). Backups run meanwhile, so nothing is deleted when first found unneeded: a copy of
an unneeded chunk, or a pack no index names, is a *candidate*, written to a mark object; a later
collection deletes it only if it is still unneeded, its mark is older than the grace period, and no
backup session that began before the mark is alive (``Safety``). Until then it is *held*: kept in
place and in the index. Spare copies of needed chunks and copies on damage records are not
candidates (no backup can depend on them while a live copy stays) and go at once.

Two halves, kept apart so a dry run shows exactly what a real run would do:

- ``plan_collection`` (collectplan.py) decides, reading only: packs that hold nothing an image needs (freed
  first), packs that hold needed and dead blobs (the needed ones are copied, then the pack goes),
  the next chunk index, and whether the index files need rewriting.
- ``carry_out`` acts in the one order that is safe at every crash point and frees space before it
  needs any: temp leftovers and unneeded packs first (no image needs them, and no backup alive
  can come to need them: the two-phase rule; an index entry left pointing into a deleted pack
  names only an unneeded chunk, marked or spare, which a backup never uses), then rounds of at most
  REWRITE_BATCH copied bytes — copy, write the new index file(s), delete the old ones, delete the
  copied packs — then the damage records are consolidated (the new record first, then the old
  ones go), and last the marks (the new mark object first, then the old ones go).
"""

from __future__ import annotations

from collections.abc import Collection, Container
from dataclasses import dataclass, field

from imgbackup import interrupts
from imgbackup.engine.collectplan import CollectionPlan, PackUse, needed_chunks, plan_collection
from imgbackup.engine.collectrows import IndexRows
from imgbackup.errors import (
    IntegrityError,
    ObjectRetained,
    RepositoryFull,
    StorageError,
)
from imgbackup.format.layout import OBJ_CHUNK
from imgbackup.repository.damage import DamagedCopy, write_record
from imgbackup.repository.marks import judge_safety, write_marks
from imgbackup.repository.packs import BlobLocation, PackWriter, pack_name
from imgbackup.repository.repo import Repository
from imgbackup.repository.storage import ObjectMissing
from imgbackup.units import iec

REWRITE_BATCH = 256 << 20   # live bytes copied per round: the extra space a round needs, beside one index
COPY_RANGE = 64 << 20       # one read of a pack being rewritten covers at most this much


@dataclass
class CollectionResult:
    packs_deleted: int = 0
    packs_rewritten: int = 0
    temp_files_removed: int = 0
    chunks_removed: int = 0
    bytes_deleted: int = 0
    bytes_written: int = 0
    index_files: int = 0
    candidates_held: int = 0          # candidates kept for a later collection (two-phase rule)
    retained: list[str] = field(default_factory=list)   # objects S3 Object Lock keeps until their date
    warnings: list[str] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return self.bytes_deleted - self.bytes_written


def carry_out(repo: Repository, plan: CollectionPlan, done_before: str = "") -> CollectionResult:
    """Remove what ``plan`` says, freeing before writing; call under the repository lock.

    ``done_before`` (what the caller already did) starts the line an interrupted run ends with."""
    result = CollectionResult(index_files=len(plan.index_files))
    interrupts.set_status(lambda: _collecting(done_before, result))
    result.temp_files_removed = repo.remove_temp_files(plan.temp_age)
    result.bytes_deleted += sum(size for _, size in plan.temp)
    result.warnings += plan.warnings
    if plan.blocked:
        return result
    gone: set[str] = set()
    _delete_packs(repo, plan.free, gone, result)
    indexed = plan.rows.overridden(     # what the index files on storage say
        [use.refs for use in plan.rewrite if use.refs is not None],
        {cid: loc for use in plan.rewrite for cid, loc in use.extra})
    lost: list[DamagedCopy] = []
    files = list(plan.index_files)
    for batch in _rounds(plan.rewrite) or ([[]] if plan.rewrite_index else []):
        try:
            indexed, new_files = _rewrite_round(repo, batch, indexed, lost, result)
        except RepositoryFull:
            left = [u for u in plan.rewrite if u.name not in gone]
            result.warnings.append(
                f"the repository disk is full: {len(left)} partly used pack(s) were not rewritten "
                f"({iec(sum(u.size - u.live_bytes for u in left))} still reclaimable); delete old images or free "
                "space on the disk, then run 'imgbackup compact' again")
            break
        for name in files:
            result.bytes_deleted += _delete(repo, name)
        files = new_files
        _delete_packs(repo, batch, gone, result)
        result.packs_rewritten += len(batch)
    if files != plan.index_files:
        result.chunks_removed = max(plan.entries_before - len(indexed), 0)
    result.index_files = len(files)
    if lost:
        result.warnings.append(f"{len(lost)} chunk(s) that images need failed authentication while being copied "
                               f"(first: {lost[0].chunk_id.hex()[:16]}) and are gone; the next backup of a source "
                               "that still holds them stores them again; 'imgbackup repair' lists the images")
    _consolidate_damage(repo, plan, gone, indexed, lost, result)
    _rewrite_marks(repo, plan, gone, result)
    return result


def _rewrite_marks(repo: Repository, plan: CollectionPlan, gone: set[str], result: CollectionResult) -> None:
    """The held candidates still where they were, as one new mark object (those found now get its
    storage time), then the old mark objects go: a reader that misses one lists again (marks.py).
    A pack S3 Object Lock kept from deletion stays marked with its first time: a later collection
    deletes it after its lock date without waiting a grace period again."""
    held = plan.held
    gone_numbers = [held.source.number_one(bytes.fromhex(name.rsplit("/", 1)[1])) for name in gone]
    copies = held.mark_arrays(~held.in_packs(gone_numbers))
    packs = {pid: at for pid, at in plan.held_packs.items() if pack_name(pid) not in gone}
    retained = {use.pack_id for use in plan.free if use.name in result.retained}
    for pid in retained - packs.keys():
        packs[pid] = plan.marks.packs.get(pid, 0.0)
    try:
        if len(copies[0]) or packs:
            write_marks(repo.storage, repo.envelope, copies, packs)
        for name in plan.marks.names:
            repo.storage.delete(name)
    except StorageError as exc:
        result.warnings.append(f"the collection marks were not rewritten ({exc}); the next compact tries again")
        return
    result.candidates_held = len(copies[0]) + len(packs)


def collect(repo: Repository, done_before: str = "",
            exclude: Collection[str] = ()) -> tuple[CollectionPlan, CollectionResult]:
    """One collection under the exclusive lease, in the order the two-phase proof needs: the live
    sessions are judged, then the images are read (but the ``exclude``d ones: removed), then the
    index and the packs. When a mark written now would already let candidates go (no grace period,
    no session alive), it is written and the collection judged again, so a repository with no
    backup running is cleaned in one run."""
    storage, envelope = repo.storage, repo.envelope
    safety = judge_safety(storage)
    needed, warnings = needed_chunks(repo, exclude)
    plan = plan_collection(repo, needed, warnings, safety=safety)
    if plan.ripe_new and not plan.blocked:
        try:
            write_marks(storage, envelope, plan.held.mark_arrays(plan.held.times == 0),
                        {pid: 0.0 for pid, at in plan.held_packs.items() if not at})
        except StorageError as exc:      # a full disk: free what is ripe already, mark the rest next time
            plan.warnings.append(f"could not write the collection marks ({exc}); a later compact frees the rest")
            return plan, carry_out(repo, plan, done_before)
        safety = judge_safety(storage)
        needed, warnings = needed_chunks(repo, exclude)
        plan = plan_collection(repo, needed, warnings, safety=safety)
    return plan, carry_out(repo, plan, done_before)


def _collecting(done_before: str, result: CollectionResult) -> str:
    """The state of an interrupted collection: consistent at every step, part of the space freed."""
    freed = f"{iec(result.bytes_deleted)} freed so far" if result.bytes_deleted else "no space freed yet"
    return (f"{done_before + '; ' if done_before else ''}{freed}; the repository is consistent, "
            "'imgbackup compact' frees the rest")


def _delete_packs(repo: Repository, uses: list[PackUse], gone: set[str], result: CollectionResult) -> None:
    for use in uses:
        try:
            repo.storage.delete(use.name)
        except ObjectRetained:       # locked until its date: no longer indexed, a later collection deletes it
            result.retained.append(use.name)
            continue
        gone.add(use.name)
        result.bytes_deleted += use.size
        result.packs_deleted += 1


def _rewrite_round(repo: Repository, batch: list[PackUse], indexed: IndexRows,
                   lost: list[DamagedCopy], result: CollectionResult) -> tuple[IndexRows, list[str]]:
    """Copy the needed blobs of ``batch`` and write the complete new index; (new index, its files).
    On a full disk, what this round wrote is deleted again and RepositoryFull raised."""
    new_packs: set[bytes] = set()
    new_files: list[str] = []
    try:
        moved, copied = copy_live_blobs(repo, batch, lost)
        new_packs = {loc.pack_id for loc in moved.values()}
        rows = indexed.overridden([], moved).without({bad.chunk_id for bad in lost})
        written = rows.write(repo.storage, repo.envelope, new_files)
    except RepositoryFull:
        for name in [*new_files, *map(pack_name, new_packs)]:
            repo.storage.delete(name)
        raise
    result.bytes_written += copied + written
    return rows, new_files


def _rounds(rewrite: list[PackUse]) -> list[list[PackUse]]:
    """Packs to rewrite in groups whose needed blobs total about REWRITE_BATCH."""
    out: list[list[PackUse]] = []
    size = 0
    for use in rewrite:
        if not out or (out[-1] and size + use.live_bytes > REWRITE_BATCH):
            out.append([])
            size = 0
        out[-1].append(use)
        size += use.live_bytes
    return out


def copy_live_blobs(repo: Repository, batch: list[PackUse],
                    lost: list[DamagedCopy]) -> tuple[dict[bytes, BlobLocation], int]:
    """Copy the needed blobs of ``batch`` into new packs, authenticating each (a blob that fails is
    not copied: it goes to ``lost``). Sealed blobs move as they are: their seal binds the chunk id
    (and a delta's base id), not the pack. On failure the new packs are removed again."""
    writer = PackWriter(repo.storage, repo.envelope)
    try:
        for use in batch:
            for start, group in _ranges(use.live):
                end = group[-1][1].offset + group[-1][1].length
                data = memoryview(repo.storage.get_range(use.name, start, end - start))
                for cid, loc in group:
                    blob = bytes(data[loc.offset - start : loc.offset - start + loc.length])
                    try:
                        if len(blob) != loc.length:
                            raise IntegrityError(f"pack {use.name} is truncated")
                        repo.envelope.authenticate(OBJ_CHUNK, cid, blob, f"chunk {cid.hex()[:16]}", loc.base)
                    except IntegrityError as exc:
                        lost.append(DamagedCopy(cid, loc.pack_id, loc.offset, loc.length, "damaged", exc.args[0]))
                        continue
                    writer.add(cid, blob, loc.raw_length, loc.base)
        writer.flush()
    except BaseException:
        writer.abort()
        for pack_id in {loc.pack_id for loc in writer.written.values()}:
            repo.storage.delete(pack_name(pack_id))
        raise
    return writer.written, writer.bytes_written


def _ranges(live: list[tuple[bytes, BlobLocation]]):
    group: list[tuple[bytes, BlobLocation]] = []
    for item in sorted(live, key=lambda row: row[1].offset):
        if group and item[1].offset + item[1].length - group[0][1].offset > COPY_RANGE:
            yield group[0][1].offset, group
            group = []
        group.append(item)
    if group:
        yield group[0][1].offset, group


def _delete(repo: Repository, name: str) -> int:
    try:
        size = repo.storage.size(name)
    except ObjectMissing:
        return 0
    try:
        repo.storage.delete(name)
    except ObjectRetained:
        return 0
    return size


def _consolidate_damage(repo: Repository, plan: CollectionPlan, gone: set[str], indexed: Container[bytes],
                        lost: list[DamagedCopy], result: CollectionResult) -> None:
    """Keep a damaged copy on record while its pack exists, or while an image needs its chunk and
    no usable copy exists; write the kept ones as one new record, then delete the old records."""
    needed = plan.needed or set()
    lost_keys = {c.key for c in lost}
    copies = {c.key: c for c in [*lost, *plan.found, *plan.damage.copies.values()]}   # older records win
    keep = [c for c in copies.values()
            if (pack_name(c.pack_id) in plan.packs - gone and c.key not in lost_keys)
            or (c.chunk_id in needed and c.chunk_id not in indexed)]
    if {c.key for c in keep} == set(plan.damage.copies):
        return
    try:
        name = write_record(repo.storage, repo.envelope, keep, "compact")
        for old in plan.damage.records:
            if old != name:
                result.bytes_deleted += _delete(repo, old)
    except StorageError as exc:
        result.warnings.append(f"the damage records were not consolidated ({exc}); the next compact tries again")

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

- ``plan_collection`` decides, reading only: packs that hold nothing an image needs (freed
  first), packs that hold needed and dead blobs (the needed ones are copied, then the pack goes),
  the next chunk index, and whether the index files need rewriting.
- ``carry_out`` acts in the one order that is safe at every crash point and frees space before it
  needs any: temp leftovers and unneeded packs first (no image needs them, and no backup alive
  can come to need them: the two-phase rule; an index entry left pointing into a deleted pack
  names only an unneeded chunk, which a backup's pack listing excludes), then rounds of at most
  REWRITE_BATCH copied bytes — copy, write the new index file(s), delete the old ones, delete the
  copied packs — then the damage records are consolidated (the new record first, then the old
  ones go), and last the marks (the new mark object first, then the old ones go).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field

from imgbackup import interrupts
from imgbackup.errors import (
    ImageNotFound,
    IntegrityError,
    ObjectRetained,
    RepositoryFull,
    StorageError,
    UnsupportedFormat,
)
from imgbackup.format.layout import OBJ_CHUNK
from imgbackup.repository.chunkindex import ChunkIndex
from imgbackup.repository.damage import DamagedCopy, DamageLog, write_record
from imgbackup.repository.indexfile import MAX_ENTRIES_PER_FILE, write_index_files
from imgbackup.repository.lease import lease_seconds
from imgbackup.repository.marks import Marks, Safety, judge_safety, load_marks, write_marks
from imgbackup.repository.packs import BlobLocation, PackWriter, pack_name, read_pack_trailer
from imgbackup.repository.repo import Repository
from imgbackup.repository.storage import ObjectMissing
from imgbackup.units import iec

REWRITE_BATCH = 256 << 20   # live bytes copied per round: the extra space a round needs, beside one index
COPY_RANGE = 64 << 20       # one read of a pack being rewritten covers at most this much


@dataclass
class PackUse:
    """One pack: the copies in it that images need, and the bytes of everything else known in it."""

    name: str
    pack_id: bytes
    size: int
    live: list[tuple[bytes, BlobLocation]] = field(default_factory=list)
    dead_bytes: int = 0
    kept: bool = False       # left alone whatever it holds (its trailer could not be read)

    @property
    def live_bytes(self) -> int:
        return sum(loc.length for _, loc in self.live)


@dataclass
class CollectionPlan:
    index_files: list[str]
    rows: dict[bytes, BlobLocation]          # needed chunks that stay where they are
    free: list[PackUse]                      # nothing needed in them: deleted first
    rewrite: list[PackUse]                   # needed and dead blobs: needed ones copied, then deleted
    temp: list[tuple[str, int]]              # leftovers of killed writers
    damage: DamageLog
    needed: set[bytes] | None
    entries_before: int = 0                  # entries in the index files now
    found: list[DamagedCopy] = field(default_factory=list)   # copies in packs that are gone, not yet recorded
    packs: set[str] = field(default_factory=set)             # the pack listing the plan was made from
    rewrite_index: bool = False
    temp_age: float = 0.0                    # temp leftovers untouched this long are removed (0: all)
    warnings: list[str] = field(default_factory=list)
    marks: Marks = field(default_factory=Marks)                # the marks the plan was judged with
    held: dict[tuple[bytes, bytes, int], float] = field(default_factory=dict)   # candidate copies kept: first marked
    held_packs: dict[bytes, float] = field(default_factory=dict)               # candidate packs kept: first marked
    new_candidates: int = 0                  # candidates found now (marked when the plan is carried out)
    ripe_new: int = 0                        # of those, the ones a mark written now would already free

    @property
    def blocked(self) -> bool:
        """Nothing but temp leftovers may go: some image cannot be read, so its chunks are unknown."""
        return self.needed is None

    @property
    def bytes_to_copy(self) -> int:
        return sum(p.live_bytes for p in self.rewrite)

    @property
    def bytes_reclaimable(self) -> int:
        """What carrying the plan out frees, net of the copies it writes (index sizes aside)."""
        return (sum(size for _, size in self.temp) + sum(p.size for p in self.free)
                + sum(p.size - p.live_bytes for p in self.rewrite))

    @property
    def chunks_removed(self) -> int:
        return max(self.entries_before - self.entries_after, 0)

    @property
    def entries_after(self) -> int:
        return len(self.rows) + sum(len(p.live) for p in self.rewrite)

    @property
    def index_files_after(self) -> int:
        if self.blocked or not self.rewrite_index:
            return len(self.index_files)
        return -(-self.entries_after // MAX_ENTRIES_PER_FILE)


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


def needed_chunks(repo: Repository, exclude: Collection[str] = ()) -> tuple[set[bytes] | None, list[str]]:
    """Every chunk id some image names (but the ``exclude``d ones: removed, or about to be); None (and
    why) when an image index cannot be read."""
    ids: set[bytes] = set()
    for image_id in repo.images.ids():
        if image_id in exclude:
            continue
        try:
            ids |= repo.images.load(image_id).unique_ids()
        except ImageNotFound:
            continue
        except (IntegrityError, UnsupportedFormat) as exc:
            return None, [f"image {image_id[:12]} cannot be read ({exc.args[0]}), so no chunk can be shown to be "
                          f"unneeded: only temp leftovers were collected; 'imgbackup delete {image_id[:12]}' "
                          "removes that image, then compact collects the rest"]
    return ids, []


def incomplete_writes(repo: Repository, older_than: float = 0.0) -> list[tuple[str, int]]:
    return repo.storage.incomplete_writes(older_than)


def pack_sizes(repo: Repository) -> dict[str, int]:
    sizes = {}
    for name in repo.storage.list("packs"):
        try:
            sizes[name] = repo.storage.size(name)
        except ObjectMissing:
            continue
    return sizes


def plan_collection(repo: Repository, needed: set[bytes] | None, warnings: list[str] | None = None,
                    strict: bool = True, safety: Safety | None = None, marks: Marks | None = None,
                    provisional: bool = False) -> CollectionPlan:
    """Decide what a collection removes; reads the index, the damage records, the marks and the
    pack listing. ``strict``: every damage record must be readable (a collection that acts must know
    every bad copy). ``safety`` must be judged before ``needed`` was read (collect does). Candidates
    found now are held, or with ``provisional`` (a dry run) judged as if marked now."""
    storage, envelope = repo.storage, repo.envelope
    safety = judge_safety(storage) if safety is None else safety
    marks = load_marks(storage, envelope) if marks is None else marks
    damage = DamageLog.load(storage, envelope, strict=strict)
    sizes: dict[str, int] = {}

    def listing() -> set[str]:      # after the index listing: a pack an index file names is in it
        sizes.update(pack_sizes(repo))
        return set(sizes)

    index = ChunkIndex.load(storage, envelope, damage, listing)   # copies in packs that are gone: excluded
    temp_age = 2 * lease_seconds() if safety.session_starts else 0.0   # a live writer touches its temp files
    plan = CollectionPlan(list(index.files), {}, [], [], incomplete_writes(repo, temp_age), damage, needed,
                          len(index.locations) + len(index.spare) + len(index.bad_copies), found=index.unrecorded(),
                          packs=set(sizes), warnings=list(warnings or []), temp_age=temp_age, marks=marks)
    if needed is None:
        return plan
    needed = plan.needed = needed | index.bases_of(needed)   # a needed delta keeps its base
    uses = {name: PackUse(name, bytes.fromhex(name.rsplit("/", 1)[1]), size) for name, size in sizes.items()}
    blobs: dict[bytes, dict[int, int]] = defaultdict(dict)    # pack id -> offset -> length of each known blob
    copies = [*index.locations.items(), *index.spare]
    for _cid, loc in copies:
        blobs[loc.pack_id][loc.offset] = loc.length
    for bad in [*index.bad_copies, *damage.copies.values()]:
        blobs[bad.pack_id][bad.offset] = bad.length
    unindexed = [use for use in uses.values() if not blobs[use.pack_id]]   # no index names a blob in it
    for cid in needed:
        loc = index.locations.get(cid)
        if loc is not None:
            uses[pack_name(loc.pack_id)].live.append((cid, loc))
    _measure(uses.values(), blobs)
    absent = needed - index.locations.keys()
    if absent:   # before a pack goes, make sure it holds no needed chunk that no index entry names
        _adopt(repo, [u for u in uses.values() if not u.live or u.dead_bytes], absent, damage, blobs, plan)
        _measure(uses.values(), blobs)
    lost = needed - index.locations.keys() - {cid for u in uses.values() for cid, _ in u.live}
    if lost:
        plan.warnings.append(f"{len(lost)} chunk(s) that images need have no usable copy in any pack; "
                             "'imgbackup repair' reports which images and byte ranges that affects")
    _hold_candidates(plan, uses, copies, unindexed, needed, safety, provisional)
    _measure(uses.values(), blobs)
    for use in uses.values():
        if use.kept:
            continue
        if not use.live:
            plan.free.append(use)
        elif use.dead_bytes:
            plan.rewrite.append(use)
        else:
            plan.rows.update(use.live)
    plan.rewrite_index = bool(plan.rewrite) or len(index.files) > 1 or plan.entries_before != len(plan.rows)
    return plan


def _hold_candidates(plan: CollectionPlan, uses: dict[str, PackUse], copies: list[tuple[bytes, BlobLocation]],
                     unindexed: list[PackUse], needed: set[bytes], safety: Safety, provisional: bool) -> None:
    """The two-phase rule: a copy of an unneeded chunk, or a pack no index names (and holding nothing
    needed), may go only once its mark is ripe; until then it is held — kept where it is (a held copy
    stays in the index too). A candidate found now is new: marked when the plan is carried out."""
    marked = plan.marks.copy_keys()

    def held(at: float | None) -> bool:
        if at is None:
            plan.new_candidates += 1
            ripe = safety.mature(safety.now)       # as if marked now: only with no grace and no session
            plan.ripe_new += ripe
            return not (provisional and ripe)
        return not safety.mature(at)

    for cid, loc in copies:
        if cid in needed:
            continue                  # a spare copy of a needed chunk: the handed-out one stays
        key = (cid, loc.pack_id, loc.offset)
        at = marked.get(key)
        if held(at):
            plan.held[key] = at or 0.0
            uses[pack_name(loc.pack_id)].live.append((cid, loc))
    for use in unindexed:
        if use.live or use.kept:
            continue                  # it holds needed chunks no index named (adopted), or is unreadable
        at = plan.marks.packs.get(use.pack_id)
        if held(at):
            plan.held_packs[use.pack_id] = at or 0.0
            use.kept = True


def _measure(uses, blobs: dict[bytes, dict[int, int]]) -> None:
    for use in uses:
        live = {loc.offset for _, loc in use.live}
        use.dead_bytes = sum(length for offset, length in blobs[use.pack_id].items() if offset not in live)


def _adopt(repo: Repository, candidates: list[PackUse], absent: set[bytes], damage: DamageLog,
           blobs: dict[bytes, dict[int, int]], plan: CollectionPlan) -> None:
    """Before freeing packs that no needed index entry points into, read their trailers: one may
    hold a chunk an image needs that no index file lists (an index file lost, a copy stored again
    by a killed backup). Such a copy is kept; a pack whose trailer cannot be read is not freed."""
    for use in candidates:
        try:
            entries = read_pack_trailer(repo.storage, repo.envelope, use.pack_id)
        except (IntegrityError, ObjectMissing) as exc:
            use.kept = True
            plan.warnings.append(f"{use.name}: {exc.args[0] if exc.args else 'unreadable'}; kept, since it may "
                                 "hold chunks images need: 'imgbackup repair' rebuilds the index from the packs")
            continue
        for cid, loc in entries:
            blobs[use.pack_id][loc.offset] = loc.length
            if cid in absent and damage.lookup(cid, loc.pack_id, loc.offset) is None:
                use.live.append((cid, loc))
                absent.discard(cid)


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
    indexed = dict(plan.rows)           # what the index files on storage say
    for use in plan.rewrite:
        indexed.update(use.live)
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
    _consolidate_damage(repo, plan, gone, set(indexed), lost, result)
    _rewrite_marks(repo, plan, gone, result)
    return result


def _rewrite_marks(repo: Repository, plan: CollectionPlan, gone: set[str], result: CollectionResult) -> None:
    """The held candidates still where they were, as one new mark object (those found now get its
    storage time), then the old mark objects go: a reader that misses one lists again (marks.py).
    A pack S3 Object Lock kept from deletion stays marked with its first time: a later collection
    deletes it after its lock date without waiting a grace period again."""
    copies = [(cid, pid, off, at) for (cid, pid, off), at in plan.held.items() if pack_name(pid) not in gone]
    packs = {pid: at for pid, at in plan.held_packs.items() if pack_name(pid) not in gone}
    retained = {use.pack_id for use in plan.free if use.name in result.retained}
    for pid in retained - packs.keys():
        packs[pid] = plan.marks.packs.get(pid, 0.0)
    try:
        if copies or packs:
            write_marks(repo.storage, repo.envelope, copies, packs)
        for name in plan.marks.names:
            repo.storage.delete(name)
    except StorageError as exc:
        result.warnings.append(f"the collection marks were not rewritten ({exc}); the next compact tries again")
        return
    result.candidates_held = len(copies) + len(packs)


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
            write_marks(storage, envelope, [(cid, pid, off, 0.0) for (cid, pid, off), at in plan.held.items()
                                            if not at], {pid: 0.0 for pid, at in plan.held_packs.items() if not at})
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


def _rewrite_round(repo: Repository, batch: list[PackUse], indexed: dict[bytes, BlobLocation],
                   lost: list[DamagedCopy], result: CollectionResult) -> tuple[dict[bytes, BlobLocation], list[str]]:
    """Copy the needed blobs of ``batch`` and write the complete new index; (new index, its files).
    On a full disk, what this round wrote is deleted again and RepositoryFull raised."""
    new_packs: set[bytes] = set()
    new_files: list[str] = []
    try:
        moved, copied = copy_live_blobs(repo, batch, lost)
        new_packs = {loc.pack_id for loc in moved.values()}
        dropped = {bad.chunk_id for bad in lost}
        rows = {cid: loc for cid, loc in {**indexed, **moved}.items() if cid not in dropped}
        _, written = write_index_files(repo.storage, repo.envelope, list(rows.items()), new_files)
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


def _consolidate_damage(repo: Repository, plan: CollectionPlan, gone: set[str], indexed: set[bytes],
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

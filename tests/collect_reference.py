"""The object-based collection planner that engine/collectplan.py replaced (a Python object per
chunk: ~1 KB each), kept as the reference the array planner is tested against (test_collect_plan.py).
Every decision is the one the array planner must make; only the representation differs."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from imgbackup.errors import IntegrityError
from imgbackup.repository.chunkindex import ChunkIndex
from imgbackup.repository.damage import DamagedCopy, DamageLog
from imgbackup.repository.indexfile import MAX_ENTRIES_PER_FILE
from imgbackup.repository.lease import lease_seconds
from imgbackup.repository.marks import Marks, Safety, judge_safety, load_marks
from imgbackup.repository.packs import BlobLocation, pack_name, read_pack_trailer
from imgbackup.repository.repo import Repository
from imgbackup.repository.storage import ObjectMissing, object_sizes


@dataclass
class RefPackUse:
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
class RefPlan:
    index_files: list[str]
    rows: dict[bytes, BlobLocation]          # needed chunks that stay where they are
    free: list[RefPackUse]                      # nothing needed in them: deleted first
    rewrite: list[RefPackUse]                   # needed and dead blobs: needed ones copied, then deleted
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


def reference_plan(repo: Repository, needed: set[bytes] | None, warnings: list[str] | None = None,
                    strict: bool = True, safety: Safety | None = None, marks: Marks | None = None,
                    provisional: bool = False) -> RefPlan:
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
        sizes.update(object_sizes(repo.storage, "packs"))
        return set(sizes)

    index = ChunkIndex.load(storage, envelope, damage, listing)   # copies in packs that are gone: excluded
    temp_age = 2 * lease_seconds() if safety.session_starts else 0.0   # a live writer touches its temp files
    plan = RefPlan(list(index.files), {}, [], [], repo.storage.incomplete_writes(temp_age), damage, needed,
                          len(index.locations) + len(index.spare) + len(index.bad_copies), found=index.unrecorded(),
                          packs=set(sizes), warnings=list(warnings or []), temp_age=temp_age, marks=marks)
    if needed is None:
        return plan
    needed = plan.needed = needed | index.bases_of(needed)   # a needed delta keeps its base
    uses = {name: RefPackUse(name, bytes.fromhex(name.rsplit("/", 1)[1]), size) for name, size in sizes.items()}
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
        if use.kept:              # left as it is: so are the index entries of what it holds that stays
            plan.rows.update(use.live)
            continue
        if not use.live:
            plan.free.append(use)
        elif use.dead_bytes:
            plan.rewrite.append(use)
        else:
            plan.rows.update(use.live)
    plan.rewrite_index = bool(plan.rewrite) or len(index.files) > 1 or plan.entries_before != len(plan.rows)
    return plan


def _hold_candidates(plan: RefPlan, uses: dict[str, RefPackUse], copies: list[tuple[bytes, BlobLocation]],
                     unindexed: list[RefPackUse], needed: set[bytes], safety: Safety, provisional: bool) -> None:
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


def _adopt(repo: Repository, candidates: list[RefPackUse], absent: set[bytes], damage: DamageLog,
           blobs: dict[bytes, dict[int, int]], plan: RefPlan) -> None:
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

"""The first half of a collection (engine/collect.py): the plan, made by reading only — which chunks
images need, which packs hold nothing needed (freed first), which hold needed and dead blobs
(rewritten), which candidates the two-phase rule still holds, and the next chunk index.

The plan works on the table's arrays (collectrows.py: a copy is a number, not an object), so a
repository of 10^7 chunks is planned in a few hundred MiB: the needed ids are one sorted array
(``ChunkIds``) looked up in the table in one native call, and each pack's live and dead bytes are
numpy group sums. Only the packs that are freed or rewritten become objects; a rewritten pack's
copies become objects only when it is copied (``PackUse.live``). tests/collect_reference.py keeps
the object-based planner this replaced, and a hypothesis test holds the two to the same plan.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import numpy as np

from imgbackup._core import table as kernels
from imgbackup.engine.collectrows import IndexRows, PlanTable
from imgbackup.engine.collectsums import HeldCopies, hold_candidates, measure, sorted_by_pack
from imgbackup.errors import (
    ImageNotFound,
    IntegrityError,
    UnsupportedFormat,
)
from imgbackup.repository.chunkids import ChunkIds
from imgbackup.repository.chunkindex import ChunkIndex
from imgbackup.repository.chunktable import INFO_DELTA
from imgbackup.repository.chunktable import field as row_field
from imgbackup.repository.damage import DamagedCopy, DamageLog
from imgbackup.repository.indexfile import MAX_ENTRIES_PER_FILE
from imgbackup.repository.lease import lease_seconds
from imgbackup.repository.marks import Marks, Safety, judge_safety, load_marks
from imgbackup.repository.packs import BlobLocation, read_pack_trailer
from imgbackup.repository.repo import Repository
from imgbackup.repository.storage import ObjectMissing, object_sizes


@dataclass(slots=True)
class PackUse:
    """One pack: the copies in it that stay (table ``refs`` into ``source``, plus ``extra`` copies no
    index names), and the bytes of everything else known in it."""

    name: str
    pack_id: bytes
    size: int
    extra: list[tuple[bytes, BlobLocation]] = field(default_factory=list)
    dead_bytes: int = 0
    kept: bool = False       # left alone whatever it holds (its trailer could not be read)
    source: PlanTable | None = None
    refs: np.ndarray | None = None
    table_bytes: int = 0     # sealed bytes of the ``refs`` copies

    @property
    def live(self) -> list[tuple[bytes, BlobLocation]]:
        table = self.source.entries(self.refs) if self.source is not None and self.refs is not None else []
        return table + self.extra

    @property
    def live_count(self) -> int:
        return (0 if self.refs is None else len(self.refs)) + len(self.extra)

    @property
    def live_bytes(self) -> int:
        return self.table_bytes + sum(loc.length for _, loc in self.extra)


@dataclass
class CollectionPlan:
    index_files: list[str]
    rows: IndexRows | dict[bytes, BlobLocation]   # needed chunks that stay where they are
    free: list[PackUse]                      # nothing needed in them: deleted first
    rewrite: list[PackUse]                   # needed and dead blobs: needed ones copied, then deleted
    temp: list[tuple[str, int]]              # leftovers of killed writers
    damage: DamageLog
    needed: ChunkIds | None
    entries_before: int = 0                  # entries in the index files now
    found: list[DamagedCopy] = field(default_factory=list)   # copies in packs that are gone, not yet recorded
    packs: set[str] = field(default_factory=set)             # the pack listing the plan was made from
    rewrite_index: bool = False
    temp_age: float = 0.0                    # temp leftovers untouched this long are removed (0: all)
    warnings: list[str] = field(default_factory=list)
    marks: Marks = field(default_factory=Marks)                # the marks the plan was judged with
    held: HeldCopies | dict = field(default_factory=dict)   # candidate copies kept: (id, pack, offset) -> first marked
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
        return len(self.rows) + sum(p.live_count for p in self.rewrite)

    @property
    def index_files_after(self) -> int:
        if self.blocked or not self.rewrite_index:
            return len(self.index_files)
        return -(-self.entries_after // MAX_ENTRIES_PER_FILE)


def needed_chunks(repo: Repository, exclude: Collection[str] = ()) -> tuple[ChunkIds | None, list[str]]:
    """Every chunk id some image names (but the ``exclude``d ones: removed, or about to be), as one
    sorted array; None (and why) when an image index cannot be read."""
    failure: list[str] = []

    def images() -> Iterable[np.ndarray]:
        for image_id in repo.images.ids():
            if image_id in exclude:
                continue
            try:
                yield repo.images.load(image_id).ids
            except ImageNotFound:
                continue
            except (IntegrityError, UnsupportedFormat) as exc:
                failure.append(f"image {image_id[:12]} cannot be read ({exc.args[0]}), so no chunk can be shown "
                               f"to be unneeded: only temp leftovers were collected; 'imgbackup delete "
                               f"{image_id[:12]}' removes that image, then compact collects the rest")
                return

    ids = ChunkIds.union_of(images())
    return (None, failure) if failure else (ids, [])


def incomplete_writes(repo: Repository, older_than: float = 0.0) -> list[tuple[str, int]]:
    return repo.storage.incomplete_writes(older_than)


def pack_sizes(repo: Repository) -> dict[str, int]:
    return object_sizes(repo.storage, "packs")


def plan_collection(repo: Repository, needed: ChunkIds | set[bytes] | None, warnings: list[str] | None = None,
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
    table = index.table
    temp_age = 2 * lease_seconds() if safety.session_starts else 0.0   # a live writer touches its temp files
    plan = CollectionPlan(list(index.files), {}, [], [], incomplete_writes(repo, temp_age), damage, None,
                          len(table.rows) + len(table.spare) + len(index.bad_copies), found=index.unrecorded(),
                          packs=set(sizes), warnings=list(warnings or []), temp_age=temp_age, marks=marks)
    if needed is None:
        return plan
    names = list(sizes)
    source = PlanTable(table, names)
    needed = plan.needed = _with_bases(table, ChunkIds.of(needed))   # a needed delta keeps its base
    at = table.find(needed.ids)
    located = at[at >= 0]                                    # refs of the handed-out copies images need
    absent = {row.tobytes() for row in needed.ids[at < 0]}
    del at
    bad = [*index.bad_copies, *damage.copies.values()]
    known = _known_blobs(source, bad)
    kept = np.zeros(len(names), bool)
    adopted: dict[int, list[tuple[bytes, BlobLocation]]] = {}
    trailers: list[tuple[int, int, int]] = []                # (pack, offset, length) read from trailers
    unindexed = np.bincount(known[0] >> 32, minlength=len(names))[: len(names)] == 0 if len(names) else kept
    if absent:   # before a pack goes, make sure it holds no needed chunk that no index entry names
        live_count, dead = measure(source, known, [located], {}, len(names))
        candidates = np.flatnonzero((live_count == 0) | (dead > 0)).tolist()
        _adopt(repo, source, candidates, absent, damage, adopted, trailers, kept, plan)
        known = _known_blobs(source, bad, trailers)
    if absent:
        plan.warnings.append(f"{len(absent)} chunk(s) that images need have no usable copy in any pack; "
                             "'imgbackup repair' reports which images and byte ranges that affects")
    held_refs = hold_candidates(plan, source, located, unindexed & ~kept, adopted, kept, safety, provisional)
    live = sorted_by_pack(source, [located, held_refs])
    live_bytes = np.zeros(len(names), np.int64)
    live_count, dead = measure(source, known, [live], adopted, len(names), live_bytes)
    del known
    _classify(plan, source, names, sizes, live, live_count, live_bytes, dead, adopted, kept)
    plan.rewrite_index = bool(plan.rewrite) or len(index.files) > 1 or plan.entries_before != len(plan.rows)
    return plan


def _with_bases(table, needed: ChunkIds) -> ChunkIds:
    """``needed`` and the bases of the deltas among them (table lookups, no objects)."""
    at = table.find(needed.ids)
    rows = at[at >= 0]
    deltas = rows[(row_field(table.rows, "info")[rows] & INFO_DELTA) != 0] if len(rows) else rows
    if not len(deltas) or not len(table.bases):
        return needed
    found = kernels.table_lookup(table.bases, table._bases_dir, np.ascontiguousarray(table.rows[deltas, :32]))
    bases = table.bases[found[found >= 0], 32:]
    return needed | bases if len(bases) else needed


def _known_blobs(source: PlanTable, bad: list[DamagedCopy],
                 trailers: list[tuple[int, int, int]] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Every blob known in a listed pack, once per place (pack << 32 | offset, sorted) with its length:
    the table's copies, the bad ones, then what trailers showed — a later one wins, as in a dict."""
    numbers = [source.number_one(b.pack_id) for b in bad]
    extra = [(n, b.offset, b.length) for n, b in zip(numbers, bad, strict=True) if n >= 0]
    more = np.array(extra + list(trailers), np.int64).reshape(-1, 3)
    places, lengths = source.all_places()
    places = np.concatenate([places, (more[:, 0] << 32) | more[:, 1]])
    lengths = np.concatenate([lengths, more[:, 2].astype(np.uint32)])
    order = np.argsort(places, kind="stable")
    places = places[order]
    lengths = lengths[order]
    del order
    last = np.ones(len(places), bool)
    last[:-1] = places[:-1] != places[1:]
    if last.all():
        return places, lengths
    return places[last], lengths[last]


def _adopt(repo: Repository, source: PlanTable, candidates: list[int], absent: set[bytes], damage: DamageLog,
           adopted: dict[int, list[tuple[bytes, BlobLocation]]], trailers: list[tuple[int, int, int]],
           kept: np.ndarray, plan: CollectionPlan) -> None:
    """Before freeing packs that no needed index entry points into, read their trailers: one may
    hold a chunk an image needs that no index file lists (an index file lost, a copy stored again
    by a killed backup). Such a copy is kept; a pack whose trailer cannot be read is not freed."""
    for pack in candidates:
        pack_id = source.pack_id(pack)
        try:
            entries = read_pack_trailer(repo.storage, repo.envelope, pack_id)
        except (IntegrityError, ObjectMissing) as exc:
            kept[pack] = True
            plan.warnings.append(f"{source.names[pack]}: {exc.args[0] if exc.args else 'unreadable'}; kept, since "
                                 "it may hold chunks images need: 'imgbackup repair' rebuilds the index from the packs")
            continue
        for cid, loc in entries:
            trailers.append((pack, loc.offset, loc.length))
            if cid in absent and damage.lookup(cid, loc.pack_id, loc.offset) is None:
                adopted.setdefault(pack, []).append((cid, loc))
                absent.discard(cid)


def _classify(plan: CollectionPlan, source: PlanTable, names: list[str], sizes: dict[str, int],
              live: np.ndarray, live_count: np.ndarray, live_bytes: np.ndarray, dead: np.ndarray,
              adopted: dict[int, list[tuple[bytes, BlobLocation]]], kept: np.ndarray) -> None:
    """Each pack, in listing order: freed (nothing live), rewritten (live and dead), or left as it is
    (its copies go to the next index as they are). ``live`` is grouped by pack."""
    in_table = live_count - np.array([len(adopted.get(p, ())) for p in range(len(names))], np.int64) \
        if adopted else live_count
    bounds = np.concatenate([[0], np.cumsum(in_table)])
    free = ~kept & (live_count == 0)
    rewrite = ~kept & (live_count > 0) & (dead > 0)
    stay = (live_count > 0) & (kept | (dead == 0))     # a kept pack is left as it is: its entries stay too
    for pack in np.flatnonzero(free | rewrite).tolist():
        name = names[pack]
        if free[pack]:
            plan.free.append(PackUse(name, source.pack_id(pack), sizes[name]))
        else:
            lo, hi = int(bounds[pack]), int(bounds[pack + 1])
            plan.rewrite.append(PackUse(name, source.pack_id(pack), sizes[name], list(adopted.get(pack, ())),
                                        int(dead[pack]), False, source, live[lo:hi], int(live_bytes[pack])))
    staying = live[np.repeat(stay, in_table)]          # the copies of the packs left as they are, in order
    plan.rows = IndexRows(source, np.zeros(0, np.int64)).overridden([staying], {})
    del staying
    plan.rows.extra.update({cid: loc for pack in adopted if stay[pack] for cid, loc in adopted[pack]})

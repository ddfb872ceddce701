"""Repair: rebuild the chunk index from the packs themselves, leave out every copy that is damaged or
missing, and report which images that leaves damaged, where, and whether the next backup heals them.

By default every chunk of every pack is read and checked (authenticated, decompressed, its id
recomputed), as verify does, but for every pack rather than only the chunks images name. Repair is
what a sysadmin runs when the repository is already in doubt, and the index it writes is what every
later backup dedups against: a damaged copy it failed to notice would be referenced again by every
image that follows. ``quick`` trusts each pack's authenticated trailer and checks only the copies
damage records name and those recovered without a trailer (from the old index) — for a large
repository right after a clean verify.

It never deletes an image, a pack or a chunk: it writes a new damage record and new index files and
then removes the old ones. The good chunks of a pack whose trailer cannot be read are copied into new
packs (which have one), so the repository describes itself again. What it leaves out of the index
(bad copies, packs so replaced), compact reclaims.
"""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from imgbackup import audit, interrupts
from imgbackup.engine.collect import copy_live_blobs
from imgbackup.engine.collectplan import PackUse
from imgbackup.engine.repair.images import AffectedImage, affected_images
from imgbackup.errors import IntegrityError, RepositoryFull
from imgbackup.format.layout import OBJ_CHUNK
from imgbackup.repository.chunkreader import open_chunk
from imgbackup.repository.damage import ChunkDamaged, DamagedCopy, DamageLog, write_record
from imgbackup.repository.indexfile import (
    INDEX_FOLDER,
    MAX_ENTRIES_PER_FILE,
    read_index_entries,
    write_index_files,
)
from imgbackup.repository.packs import BlobLocation, pack_name, read_pack_trailer
from imgbackup.repository.repo import Repository
from imgbackup.repository.storage import ObjectMissing

CHECK_RANGE = 64 << 20     # one read covers at most this much of a pack
CHECK_GAP = 1 << 20        # blobs closer than this are read in one range (quick mode skips most)
_PACK_NAME = re.compile(r"^packs/([0-9a-f]{2})/(\1[0-9a-f]{62})$")

Row = tuple[bytes, BlobLocation]


@dataclass
class PackScan:
    name: str
    good: list[Row] = field(default_factory=list)
    bad: list[DamagedCopy] = field(default_factory=list)
    checked: int = 0
    checked_bytes: int = 0
    problem: str | None = None     # the trailer could not be read: its entries came from the old index
    deltas: list[Row] = field(default_factory=list)   # checked deltas: their content against the base later


@dataclass
class RepairPlan:
    quick: bool
    rows: list[Row]                        # every good copy: the new index
    bad: list[DamagedCopy]                 # copies found damaged, truncated or missing
    cleared: list[DamagedCopy]             # copies a damage record named that read intact now
    records_kept: list[DamagedCopy]        # what the new damage record will hold
    index_files: list[str]
    unreadable_index_files: list[tuple[str, str]]
    damage: DamageLog
    packs: int
    packs_without_trailer: list[tuple[str, str]]
    chunks_checked: int
    bytes_checked: int
    recovered: int                         # chunks with a good copy that no readable index file listed
    dropped: int                           # index entries the new index leaves out
    images: list[AffectedImage]
    unreadable_images: list[tuple[str, str]]
    images_ok: int
    index_changes: bool
    record_changes: bool
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def changes(self) -> bool:
        return self.index_changes or self.record_changes

    def to_dict(self) -> dict:
        reasons: dict[str, int] = defaultdict(int)
        for bad in self.bad:
            reasons[bad.reason] += 1
        return {
            "mode": "quick" if self.quick else "full", "changes": self.changes,
            "packs": self.packs, "chunks_checked": self.chunks_checked, "bytes_checked": self.bytes_checked,
            "index_entries": len(self.rows), "index_files_old": len(self.index_files),
            "index_files_new": -(-len(self.rows) // MAX_ENTRIES_PER_FILE) if self.index_changes else len(self.index_files),
            "unreadable_index_files": [{"name": n, "error": e} for n, e in self.unreadable_index_files],
            "packs_without_trailer": [{"name": n, "error": e} for n, e in self.packs_without_trailer],
            "unreadable_damage_records": [{"name": n, "error": e} for n, e in self.damage.unreadable],
            "bad_copies": {"total": len(self.bad), **reasons},
            "bad_copies_list": [c.to_dict() for c in self.bad[:1000]],
            "cleared_copies": len(self.cleared), "recovered_chunks": self.recovered, "dropped_entries": self.dropped,
            "damage_record_copies": len(self.records_kept),
            "images_ok": self.images_ok, "images_affected": [i.to_dict() for i in self.images],
            "images_unreadable": [{"id": i, "error": e} for i, e in self.unreadable_images],
            "notes": self.notes, "duration_s": self.duration_s,
        }


def plan_repair(repo: Repository, quick: bool = False, progress: Callable[[int], None] | None = None) -> RepairPlan:
    """Read the packs and decide the new index and damage record; writes nothing."""
    started = time.monotonic()
    storage, envelope = repo.storage, repo.envelope
    notes: list[str] = []
    damage = DamageLog.load(storage, envelope, strict=False)
    if damage.unreadable and quick:
        quick = False
        notes.append("a damage record is unreadable, so every chunk is checked (quick mode needs them all)")
    files, unreadable_files, old_rows = _old_index(repo)
    old_by_pack: dict[bytes, list[Row]] = defaultdict(list)
    for cid, loc in old_rows:
        old_by_pack[loc.pack_id].append((cid, loc))
    packs = _list_packs(repo, notes)

    def scan(item: tuple[str, bytes]) -> PackScan | None:
        scanned = _scan_pack(repo, item[0], item[1], old_by_pack.get(item[1], []), damage, quick)
        if progress and scanned:
            progress(scanned.checked_bytes)
        return scanned

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="imgbackup-repair") as pool:
        scans = [s for s in pool.map(scan, packs.items()) if s is not None]
        rows = [row for s in scans for row in s.good]
        bad = [c for s in scans for c in s.bad]
        wrong = _check_deltas(repo, rows, [d for s in scans for d in s.deltas], pool)
    if wrong:
        keys = {c.key for c in wrong}
        rows = [(cid, loc) for cid, loc in rows if (cid, loc.pack_id, loc.offset) not in keys]
        bad += wrong
    present = {packs[s.name] for s in scans}
    seen = set()
    for pack_id, entries in old_by_pack.items():
        if pack_id in present:
            continue
        for cid, loc in entries:
            if (cid, loc.offset) not in seen:
                seen.add((cid, loc.offset))
                bad.append(DamagedCopy(cid, pack_id, loc.offset, loc.length, "missing",
                                       f"pack {pack_id.hex()[:16]} does not exist"))
    whole_ids = {cid for cid, loc in rows if loc.base is None}
    good_ids = whole_ids | {cid for cid, loc in rows if loc.base in whole_ids}   # a delta needs its base
    images, unreadable_images, images_ok, needed = affected_images(repo, good_ids, bad)
    needed |= {loc.base for cid, loc in rows if cid in needed and loc.base is not None}
    plan = RepairPlan(
        quick, rows, bad, [], [], files, unreadable_files, damage, len(scans),
        [(s.name, s.problem) for s in scans if s.problem], sum(s.checked for s in scans),
        sum(s.checked_bytes for s in scans), len(good_ids - {cid for cid, _ in old_rows}), 0, images,
        unreadable_images, images_ok, False, False, notes)
    _decide_writes(plan, old_rows, present, needed, good_ids)
    plan.duration_s = round(time.monotonic() - started, 3)
    return plan


def _list_packs(repo: Repository, notes: list[str]) -> dict[str, bytes]:
    """Pack name -> pack id, for every object under packs/ named like a pack."""
    packs = {}
    for name in repo.storage.list("packs"):
        match = _PACK_NAME.match(name)
        if match:
            packs[name] = bytes.fromhex(match.group(2))
        else:
            notes.append(f"{name} is not named like a pack; left alone")
    return packs


def _old_index(repo: Repository) -> tuple[list[str], list[tuple[str, str]], list[Row]]:
    files, unreadable, rows = [], [], []
    for name in repo.storage.list(INDEX_FOLDER):
        try:
            rows.extend(read_index_entries(repo.storage, repo.envelope, name))
            files.append(name)
        except (IntegrityError, ValueError) as exc:
            unreadable.append((name, exc.args[0] if exc.args else str(exc)))
        except ObjectMissing:
            continue
    return files, unreadable, rows


def _scan_pack(repo: Repository, name: str, pack_id: bytes, old: list[Row], damage: DamageLog,
               quick: bool) -> PackScan | None:
    """Every copy in one pack, sorted into good and bad. The trailer says what the pack holds; when it
    cannot be read, the old index's entries for the pack stand in and each of them is checked."""
    storage = repo.storage
    out = PackScan(name)
    try:
        entries = read_pack_trailer(storage, repo.envelope, pack_id)
        size = storage.size(name)
    except ObjectMissing:
        return None      # deleted since the listing (the lock keeps writers out: a reader's race only)
    except IntegrityError as exc:
        out.problem = exc.args[0]
        entries = list({(cid, loc.offset): (cid, loc) for cid, loc in old}.values())
        try:
            size = storage.size(name)
        except ObjectMissing:
            return None
    check = [e for e in entries if not quick or out.problem or damage.lookup(e[0], pack_id, e[1].offset)]
    unchecked = {(cid, loc.offset) for cid, loc in entries} - {(cid, loc.offset) for cid, loc in check}
    out.good = [e for e in entries if (e[0], e[1].offset) in unchecked]
    for start, group in _ranges(check):
        end = min(group[-1][1].offset + group[-1][1].length, size)
        data = memoryview(storage.get_range(name, start, end - start)) if end > start else memoryview(b"")
        for cid, loc in group:
            if loc.offset + loc.length > size:
                out.bad.append(DamagedCopy(cid, pack_id, loc.offset, loc.length, "truncated",
                                           f"pack {pack_id.hex()[:16]} ends at byte {size}, before this chunk"))
                continue
            blob = bytes(data[loc.offset - start : loc.offset - start + loc.length])
            out.checked += 1
            out.checked_bytes += loc.length
            try:
                if loc.base is None:
                    open_chunk(repo.envelope, repo.keys.id_key, cid, blob, loc)
                else:         # intact bytes now; its content is checked against its base afterwards
                    repo.envelope.authenticate(OBJ_CHUNK, cid, blob, f"chunk {cid.hex()[:16]}", loc.base)
                    out.deltas.append((cid, loc))
            except (ChunkDamaged, IntegrityError) as exc:
                out.bad.append(exc.copy if isinstance(exc, ChunkDamaged) else
                               DamagedCopy(cid, pack_id, loc.offset, loc.length, "damaged", exc.args[0]))
                continue
            out.good.append((cid, loc))
    return out


def _check_deltas(repo: Repository, rows: list[Row], deltas: list[Row], pool: ThreadPoolExecutor
                  ) -> list[DamagedCopy]:
    """Open each delta that was checked against its base (a good whole copy of it); the bad ones.
    A delta whose base has no good copy stays listed: its bytes are intact, and it reads again
    once a backup stores its base anew (readers leave it out meanwhile)."""
    whole = {cid: loc for cid, loc in rows if loc.base is None}
    by_base: dict[bytes, list[Row]] = defaultdict(list)
    for cid, loc in deltas:
        if loc.base in whole:
            by_base[loc.base].append((cid, loc))

    def blob(cid: bytes, loc: BlobLocation) -> bytes:
        return repo.storage.get_range(pack_name(loc.pack_id), loc.offset, loc.length)

    def check(item: tuple[bytes, list[Row]]) -> list[DamagedCopy]:
        base_id, group = item
        try:
            base = open_chunk(repo.envelope, repo.keys.id_key, base_id, blob(base_id, whole[base_id]), whole[base_id])
        except ChunkDamaged as exc:   # a base trusted unread (quick mode) that is bad after all
            return [exc.copy]
        bad = []
        for cid, loc in group:
            try:
                open_chunk(repo.envelope, repo.keys.id_key, cid, blob(cid, loc), loc, base)
            except ChunkDamaged as exc:
                bad.append(exc.copy)
        return bad

    return [copy for found in pool.map(check, by_base.items()) for copy in found]


def _ranges(entries: list[Row]):
    group: list[Row] = []
    for item in sorted(entries, key=lambda row: row[1].offset):
        if group:
            end = group[-1][1].offset + group[-1][1].length
            if item[1].offset - end > CHECK_GAP or item[1].offset + item[1].length - group[0][1].offset > CHECK_RANGE:
                yield group[0][1].offset, group
                group = []
        group.append(item)
    if group:
        yield group[0][1].offset, group


def _decide_writes(plan: RepairPlan, old_rows: list[Row], present: set[bytes], needed: set[bytes],
                   good_ids: set[bytes]) -> None:
    """What changes: the index (when its content differs from the good copies, or a file is
    unreadable) and the damage records (a copy stays recorded while its pack exists, or while an
    image needs its chunk and no good copy exists)."""
    def key(row: Row) -> tuple[bytes, bytes, int]:
        return (row[0], row[1].pack_id, row[1].offset)

    new_keys = {key(r) for r in plan.rows}
    old_keys = {key(r) for r in old_rows}
    plan.dropped = len(old_keys - new_keys)
    plan.index_changes = new_keys != old_keys or bool(plan.unreadable_index_files)
    recorded = plan.damage.copies
    plan.cleared = [c for k, c in recorded.items() if k in new_keys]
    candidates = {k: c for k, c in recorded.items() if k not in new_keys}
    for bad in plan.bad:
        candidates.setdefault(bad.key, bad)
    plan.records_kept = [c for c in candidates.values()
                         if c.pack_id in present or (c.chunk_id in needed and c.chunk_id not in good_ids)]
    plan.record_changes = ({c.key for c in plan.records_kept} != set(recorded)) or bool(plan.damage.unreadable)
    plan.index_changes |= bool(_trailerless(plan))


def _trailerless(plan: RepairPlan) -> list[PackUse]:
    """The packs whose trailer cannot be read, with their good copies: to be copied into new packs."""
    names = {name for name, _ in plan.packs_without_trailer}
    uses = {name: PackUse(name, bytes.fromhex(name.rsplit("/", 1)[1]), 0) for name in names}
    for cid, loc in plan.rows:
        use = uses.get(pack_name(loc.pack_id))
        if use is not None:
            use.extra.append((cid, loc))
    return [use for use in uses.values() if use.extra]


@dataclass
class RepairResult:
    damage_record: str | None
    index_files_written: list[str]
    index_files_removed: int
    damage_records_removed: int
    packs_written: int = 0          # new packs holding the chunks of packs without a readable trailer
    warnings: list[str] = field(default_factory=list)


def carry_out_repair(repo: Repository, plan: RepairPlan) -> RepairResult:
    """Write in the order that is safe at every crash point: new packs for the chunks of packs without
    a trailer (invisible until indexed), the new damage record (so no reader is handed a copy just
    found bad, whatever index files exist), the new index, then remove the old index files, then the
    old records. Call under the lock, with a plan made there."""
    storage = repo.storage
    result = RepairResult(None, [], 0, 0)
    interrupts.set_status("the repair is not finished, but the repository is usable as before (each step "
                          "is whole or not done); run 'imgbackup repair --yes' again to finish it")
    _copy_trailerless(repo, plan, result)
    if plan.record_changes and plan.records_kept:
        result.damage_record = write_record(storage, repo.envelope, plan.records_kept, "repair")
    if plan.index_changes:
        write_index_files(storage, repo.envelope, plan.rows, result.index_files_written)
        for name in [*plan.index_files, *(n for n, _ in plan.unreadable_index_files)]:
            storage.delete(name)
            result.index_files_removed += 1
    if plan.record_changes:
        for name in [*plan.damage.records, *(n for n, _ in plan.damage.unreadable)]:
            if name != result.damage_record:
                storage.delete(name)
                result.damage_records_removed += 1
    return result


def _copy_trailerless(repo: Repository, plan: RepairPlan, result: RepairResult) -> None:
    uses = _trailerless(plan)
    if not uses:
        return
    lost: list[DamagedCopy] = []
    try:
        moved, _written = copy_live_blobs(repo, uses, lost)
    except RepositoryFull:
        result.warnings.append("the repository disk is full: the chunks of packs without a readable trailer stay "
                               "where they are (the index still finds them); free space and run repair again")
        return
    old = {use.pack_id for use in uses}
    plan.rows = [(cid, loc) for cid, loc in plan.rows if loc.pack_id not in old] + list(moved.items())
    result.packs_written = len({loc.pack_id for loc in moved.values()})
    if lost:
        result.warnings.append(f"{len(lost)} chunk(s) failed authentication while being copied and were left out")


def run_repair(repo: Repository, act: bool, quick: bool = False,
               progress: Callable[[int], None] | None = None,
               lock_wait: float = 0.0) -> tuple[RepairPlan, RepairResult | None]:
    """A dry run plans without the lock; acting plans again under the lock (waiting up to ``lock_wait``
    seconds for another remover), then writes."""
    if not act:
        return plan_repair(repo, quick, progress), None
    with audit.audited("repair", repository=repo.config.id, location=repo.location) as event, \
            repo.lock("repair", lock_wait, may_use_reserve=True):
        plan = plan_repair(repo, quick, progress)
        done = carry_out_repair(repo, plan) if plan.changes else None
        event.update(changed=done is not None, damage_record=done.damage_record if done else None,
                     index_files_written=len(done.index_files_written) if done else 0)
        interrupts.set_status("the repair was finished" if done else "nothing was changed")
        return plan, done


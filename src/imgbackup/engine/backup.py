"""Backup: read the source, classify and hash chunks natively, store only new chunks, write the index.

Order of writes (what makes a killed backup harmless): packs, then the chunk-index file naming
them, then the image index. Until the image index exists, nothing refers to the new packs.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from imgbackup._core import scan
from imgbackup.device.identity import identify
from imgbackup.device.mounts import usage_of
from imgbackup.device.source import Source, open_source
from imgbackup.engine.changelist import read_change_list
from imgbackup.engine.chunks import ChunkReader
from imgbackup.engine.reader import Segment, SegmentReader
from imgbackup.engine.readplan import ReadPlan, plan_reads
from imgbackup.errors import SourceError, UsageError
from imgbackup.format.imageindex import ImageIndex
from imgbackup.format.layout import OBJ_CHUNK, SLOT_DATA, SLOT_UNUSED, SLOT_ZERO
from imgbackup.repository.packs import PackWriter
from imgbackup.repository.repo import Repository

BACKUP_TYPES = ("auto", "full", "incremental", "differential")
SEGMENT_BYTES = 8 << 20      # 8 MiB reads reach this machine's sequential read speed
MAX_PENDING_CHUNKS = 8       # sealed-but-unstored chunks: bounds memory, keeps the pool busy
SCANS_IN_FLIGHT = 2          # segments being hashed at once (one per core)


@dataclass
class BackupRequest:
    source: str
    name: str | None = None
    backup_type: str = "auto"
    allow_mounted: bool = False
    progress: Callable[[int], None] | None = None
    all_blocks: bool = False
    changed_blocks: str | None = None
    change_granularity: int | None = None
    verify_unchanged: float = 0.0


@dataclass
class BackupResult:
    id: str
    type: str
    parent: str | None
    name: str
    source: str
    source_size: int
    bytes_read: int
    bytes_stored: int
    duration_s: float
    chunks: int
    chunks_data: int
    chunks_zero: int
    chunks_unused: int
    chunks_new: int
    chunks_changed: int
    warnings: list[str] = field(default_factory=list)


def default_name(source: str) -> str:
    return os.path.basename(os.path.normpath(source)) or source


def check_source_not_live(path: str, allow_mounted: bool) -> list[str]:
    """Refuse a source mounted read-write unless explicitly allowed; return warnings."""
    state = usage_of(path)
    if not state.mounted_read_write:
        return []
    if not allow_mounted:
        raise SourceError(
            f"{state.describe()}: an image of a filesystem that is being written to can be inconsistent",
            "unmount it or remount read-only, snapshot it, or pass --allow-mounted to image it anyway",
        )
    return [f"{state.describe()}: imaging a live filesystem (--allow-mounted); the image may be inconsistent"]


def _choose_parent(repo: Repository, name: str, backup_type: str) -> tuple[str, dict | None]:
    if backup_type not in BACKUP_TYPES:
        raise UsageError(f"unknown backup type {backup_type!r}; choose one of {', '.join(BACKUP_TYPES)}")
    if backup_type == "full":
        return "full", None
    parent = repo.images.latest_of(name, full_only=backup_type == "differential")
    if parent is None:
        if backup_type == "auto":
            return "full", None
        raise UsageError(f"no earlier {'full ' if backup_type == 'differential' else ''}image of {name!r} "
                         f"to base a {backup_type} backup on", "run a full backup first")
    return ("incremental" if backup_type == "auto" else backup_type), parent


def _source_meta(path: str, source: Source) -> dict:
    meta = {"path": path, "size": source.size, "logical_sector_size": source.logical_sector_size,
            "physical_sector_size": source.physical_sector_size,
            "kind": "block" if source.is_block_device else "file"}
    try:
        ident = identify(path)
        meta.update(model=ident.model, serial=ident.serial, vendor=ident.vendor, device_kind=ident.kind,
                    fstype=ident.fstype)
    except Exception as exc:  # identity is informative only; never fail a backup over it
        meta["identity_error"] = str(exc)
    return meta


class _Storer:
    """Seals new chunks on a thread pool and hands them to the pack writer in order."""

    def __init__(self, repo: Repository, pool: ThreadPoolExecutor, parent: _ParentMatch) -> None:
        self.repo = repo
        self.pool = pool
        self.parent = parent
        self.known = repo.chunk_index()
        self.queued: set[bytes] = set()
        self.pending: deque[tuple[bytes, int, Future]] = deque()
        self.packs = PackWriter(repo.storage, repo.envelope)

    def offer(self, chunk_id: bytes, data: memoryview) -> bool:
        if chunk_id in self.known or chunk_id in self.queued:
            return False
        self.queued.add(chunk_id)
        plain = bytes(data)  # the segment buffer is reused as soon as the segment is settled
        self.pending.append((chunk_id, len(plain), self.pool.submit(self.repo.envelope.seal, OBJ_CHUNK, chunk_id, plain)))
        while len(self.pending) > MAX_PENDING_CHUNKS:
            self._drain_one()
        return True

    def _drain_one(self) -> None:
        cid, raw_len, fut = self.pending.popleft()
        self.packs.add(cid, fut.result(), raw_len)

    def finish(self) -> int:
        """Store everything pending, then the chunk-index file; returns bytes written."""
        while self.pending:
            self._drain_one()
        self.packs.flush()
        return self.packs.bytes_written + self.known.store(self.repo.storage, self.repo.envelope, self.packs.written)


class _ParentMatch:
    """Reuses the parent's chunk when a slot differs from it only in blocks no filesystem uses now.

    Deleting a file frees its blocks, which used-block mode zeroes: the chunk's bytes change
    though nothing in use did. Masking the parent's chunk with today's map tells the two apart,
    so an incremental after deletes stores only what really changed.
    """

    def __init__(self, repo: Repository, plan: ReadPlan, parent: ImageIndex | None) -> None:
        self.plan = plan
        self.key = repo.keys.id_key
        self.chunk = repo.chunk_size
        usable = parent is not None and plan.used_bits is not None and parent.slots == len(plan.kinds)
        self.parent_ids = parent.ids_by_slot() if usable else None
        self.parent_kinds = parent.kinds if usable else None
        self.reader = ChunkReader(repo) if usable else None
        self.reused = 0

    def match(self, slot: int, new_id: bytes) -> bytes | None:
        if self.parent_ids is None or self.parent_kinds[slot] != SLOT_DATA:
            return None
        old_id = bytes(self.parent_ids[slot])
        if old_id == new_id or not self.plan.has_unused(slot * self.chunk, self.chunk):
            return None
        masked = bytearray(self.reader.read(old_id))
        self.plan.mask_unused(slot * self.chunk, memoryview(masked))
        if scan.chunk_id(self.key, masked) != new_id:
            return None
        self.reused += 1
        return old_id


def run_backup(repo: Repository, req: BackupRequest) -> BackupResult:
    started = time.monotonic()
    name = req.name or default_name(req.source)
    warnings = check_source_not_live(req.source, req.allow_mounted)
    with open_source(req.source) as source, repo.lock(f"backup {req.source}"):
        repo.remove_temp_files()
        btype, parent_meta = _choose_parent(repo, name, req.backup_type)
        parent = repo.images.load(parent_meta["id"]) if parent_meta else None
        chunk = repo.chunk_size
        plan = plan_reads(source, req.source, chunk, parent, req.all_blocks, _change_mask(req, source, chunk, parent))
        warnings += plan.warnings
        kinds, ids = plan.kinds, plan.ids
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="imgbackup-seal") as pool:
            storer = _Storer(repo, pool, _ParentMatch(repo, plan, parent))
            bytes_read = _scan(source, plan, plan.read, kinds, ids, storer, repo, req.progress)
            if req.verify_unchanged > 0 and plan.from_parent.any():
                extra, note = _verify_unchanged(source, plan, kinds, ids, storer, repo, req.verify_unchanged)
                bytes_read += extra
                if note:
                    warnings.append(note)
            stored = storer.finish()
        changed = _changed_slots(kinds, ids, parent)
        meta = repo.new_image_meta(
            type=btype, parent=parent.id if parent else None, name=name,
            source=_source_meta(req.source, source), slots=len(kinds),
            used_map={"enabled": not req.all_blocks, "regions": plan.regions},
            changed_blocks=req.changed_blocks)
        index = ImageIndex(meta, kinds, ids[kinds == SLOT_DATA].copy(), np.packbits(changed, bitorder="little"))
        stored += repo.images.write(index)
    return BackupResult(
        id=meta["id"], type=btype, parent=meta["parent"], name=name, source=req.source,
        source_size=source.size, bytes_read=bytes_read, bytes_stored=stored,
        duration_s=round(time.monotonic() - started, 3), chunks=len(kinds),
        chunks_data=int(np.count_nonzero(kinds == SLOT_DATA)), chunks_zero=int(np.count_nonzero(kinds == SLOT_ZERO)),
        chunks_unused=int(np.count_nonzero(kinds == SLOT_UNUSED)),
        chunks_new=len(storer.queued), chunks_changed=int(changed.sum()), warnings=warnings,
    )


def _change_mask(req: BackupRequest, source: Source, chunk: int, parent: ImageIndex | None) -> np.ndarray | None:
    if not req.changed_blocks:
        return None
    if parent is None:
        raise UsageError("--changed-blocks needs a parent image", "run a full backup first")
    if parent.size != source.size or parent.chunk_size != chunk:
        raise UsageError(f"--changed-blocks: the source size changed since image {parent.id[:12]}",
                         "run a backup without a change list")
    return read_change_list(req.changed_blocks, source.size, chunk, req.change_granularity)


def _scan(source: Source, plan: ReadPlan, which: np.ndarray, kinds: np.ndarray, ids: np.ndarray,
          storer: _Storer, repo: Repository, progress) -> int:
    """Read the slots in ``which``, classify and hash them natively, offer new chunks; bytes read.

    Segments are hashed single-threaded but concurrently on the pool (the GIL is released):
    measured here, an OpenMP team per 8 MiB segment ran at half the speed of one thread as soon
    as the other core was busy, since every region ends in a barrier.
    """
    chunk = repo.chunk_size
    segment = max(SEGMENT_BYTES // chunk, 1) * chunk
    ranges = ReadPlan(which, kinds, ids, plan.from_parent).ranges(chunk, source.size)
    expected = sum(length for _, length in ranges)
    bytes_read = 0
    scans: deque[tuple[Segment, Future]] = deque()

    def settle() -> None:
        nonlocal bytes_read
        seg, fut = scans.popleft()
        k, h = fut.result()
        first = seg.offset // chunk
        kinds[first : first + len(k)] = k
        ids[first : first + len(k)] = h
        for i in np.flatnonzero(k == SLOT_DATA):
            cid = bytes(h[i])
            if cid not in storer.known and (same := storer.parent.match(first + int(i), cid)) is not None:
                ids[first + i] = np.frombuffer(same, np.uint8)
                continue
            storer.offer(cid, seg.data[i * chunk : (i + 1) * chunk])
        bytes_read += len(seg.data)
        reader.release(seg)
        if progress:
            progress(len(seg.data))

    reader = SegmentReader(source, ranges, segment, buffers=SCANS_IN_FLIGHT + 2)
    for seg in reader:
        plan.mask_unused(seg.offset, seg.data)
        scans.append((seg, storer.pool.submit(scan.scan_chunks, seg.data, chunk, repo.keys.id_key, nthreads=1)))
        if len(scans) >= SCANS_IN_FLIGHT:
            settle()
    while scans:
        settle()
    if bytes_read != expected:
        raise SourceError(f"{source.path} ended early: read {bytes_read} of {expected} bytes")
    return bytes_read


def _verify_unchanged(source: Source, plan: ReadPlan, kinds: np.ndarray, ids: np.ndarray, storer: _Storer,
                      repo: Repository, percent: float) -> tuple[int, str | None]:
    """Re-read a sample of the slots the change list skipped; on any difference, re-read them all."""
    skipped = np.flatnonzero(plan.from_parent)
    count = max(1, int(round(len(skipped) * min(percent, 100.0) / 100.0)))
    sample = np.zeros(len(kinds), bool)
    sample[np.random.default_rng().choice(skipped, size=count, replace=False)] = True
    want_kinds, want_ids = kinds.copy(), ids.copy()
    read = _scan(source, plan, sample, kinds, ids, storer, repo, None)
    differs = (kinds != want_kinds) | np.any(ids != want_ids, axis=1)
    if not differs[sample].any():
        return read, None
    rest = plan.from_parent & ~sample
    read += _scan(source, plan, rest, kinds, ids, storer, repo, None)
    return read, (f"--verify-unchanged: {int(differs[sample].sum())} of {count} sampled slots the change list "
                  f"called unchanged differ; the change list is wrong, so every skipped slot was re-read")


def _changed_slots(kinds: np.ndarray, ids: np.ndarray, parent: ImageIndex | None) -> np.ndarray:
    """Slots whose content differs from the parent's (all slots when there is no comparable parent).

    Zero and unused slots both restore as zeros, so a change between them is no change.
    """
    if parent is None or parent.slots != len(kinds):
        return np.ones(len(kinds), bool)
    mine = np.where(kinds == SLOT_UNUSED, SLOT_ZERO, kinds)
    theirs = np.where(parent.kinds == SLOT_UNUSED, SLOT_ZERO, parent.kinds)
    return (mine != theirs) | np.any(parent.ids_by_slot() != ids, axis=1)

"""Backup: read the source, classify and hash chunks natively, store only new chunks, write the index.

Order of writes (what makes a killed backup harmless): packs, then the chunk-index file naming
them, then the image index. Until the image index exists, nothing refers to the new packs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np

from imgbackup import audit, interrupts
from imgbackup.device.identity import identify
from imgbackup.device.mounts import usage_of
from imgbackup.device.source import Source, SourceReadError, open_source
from imgbackup.engine.backup.changelist import read_change_list
from imgbackup.engine.backup.ingest import ChunkStore, Ingest, ParentMatch
from imgbackup.engine.backup.plan import FS_BLOCK, ReadPlan, plan_reads
from imgbackup.engine.backup.rescue import DEFAULT_RETRIES, Rescue
from imgbackup.engine.backup.snapshot import Snapshot, check_still_valid, snapshot_of
from imgbackup.errors import (
    ImgBackupError,
    IntegrityError,
    Interrupted,
    RepositoryFull,
    SourceError,
    StorageError,
    UsageError,
)
from imgbackup.format.imageindex import ImageIndex
from imgbackup.format.layout import SLOT_DATA, SLOT_UNUSED, SLOT_ZERO
from imgbackup.repository.damage import write_record
from imgbackup.repository.images import image_name
from imgbackup.repository.lease import Lease, LeaseLost
from imgbackup.repository.packcheck import PackCheck
from imgbackup.repository.repo import Repository
from imgbackup.units import iec

BACKUP_TYPES = ("auto", "full", "incremental", "differential")


@dataclass
class BackupRequest:
    source: str
    name: str | None = None
    backup_type: str = "auto"
    allow_mounted: bool = False
    progress: Callable[[int], None] | None = None
    progress_total: Callable[[int], None] | None = None   # told the bytes to read, once planned
    all_blocks: bool = False
    changed_blocks: str | None = None
    change_granularity: int | None = None
    verify_unchanged: float = 0.0
    rescue: bool = False
    retries: int = DEFAULT_RETRIES
    snapshot: str | None = None      # lvm | reflink | auto: image a snapshot, removed afterwards
    extra_meta: dict = field(default_factory=dict)   # more image header fields (a job's name, fingerprint)


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
    chunks_delta: int = 0          # new chunks stored as a delta against the parent's chunk
    warnings: list[str] = field(default_factory=list)
    bad_ranges: list[list[int]] = field(default_factory=list)   # --rescue: [offset, length] not readable
    unreadable_bytes: int = 0


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
    parent = repo.images.latest_of(name, full_only=backup_type == "differential", hostname=socket.gethostname(),
                                   tag=repo.series_tag(name))   # this host's own disk, never another's
    if parent is None:
        if backup_type == "auto":
            return "full", None
        raise UsageError(f"no earlier {'full ' if backup_type == 'differential' else ''}image of {name!r} "
                         f"to base a {backup_type} backup on", "run a full backup first")
    return ("incremental" if backup_type == "auto" else backup_type), parent


def _source_meta(path: str, source: Source, snap: Snapshot | None = None) -> dict:
    meta = {"path": path, "size": source.size, "logical_sector_size": source.logical_sector_size,
            "physical_sector_size": source.physical_sector_size,
            "kind": "block" if source.is_block_device else "file"}
    if snap is not None:
        meta["snapshot"] = snap.to_meta()
    try:
        ident = identify(path)
        meta.update(model=ident.model, serial=ident.serial, vendor=ident.vendor, device_kind=ident.kind,
                    fstype=ident.fstype)
    except Exception as exc:  # identity is informative only; never fail a backup over it
        meta["identity_error"] = str(exc)
    return meta


def _open_nonempty(path: str) -> Source:
    """The source, opened; a 0-byte one (a loop node with nothing attached, an empty drive) is refused."""
    source = open_source(path)
    if source.size == 0:
        source.close()
        hint = ("a loop device with nothing attached, or a drive without a medium?" if source.is_block_device
                else "is this the file you meant?")
        raise SourceError(f"{path} is empty (0 bytes): there is nothing to back up", hint)
    return source


def run_backup(repo: Repository, req: BackupRequest) -> BackupResult:
    """Back up ``req.source`` (with ``req.snapshot``, a snapshot of it taken now); a ``backup`` audit
    event records the outcome either way."""
    name = req.name or default_name(req.source)
    with audit.audited("backup", repository=repo.config.id, location=repo.location, name=name,
                       source=req.source, job=req.extra_meta.get("job")) as event:
        result = _snapshot_and_backup(repo, req)
        event.update(image=result.id, type=result.type, parent=result.parent, bytes=result.bytes_stored,
                     bytes_read=result.bytes_read, source_size=result.source_size,
                     unreadable_bytes=result.unreadable_bytes)
    return result


def _snapshot_and_backup(repo: Repository, req: BackupRequest) -> BackupResult:
    if not req.snapshot:
        return _run_backup(repo, req, req.source, None)
    notes: list[str] = []
    with snapshot_of(req.source, req.snapshot, notes) as snap:
        result = _run_backup(repo, req, snap.path, snap)
    result.warnings = notes + result.warnings
    return result


def _run_backup(repo: Repository, req: BackupRequest, read_path: str, snap: Snapshot | None) -> BackupResult:
    started = time.monotonic()
    name = req.name or default_name(req.source)
    warnings = check_source_not_live(read_path, req.allow_mounted)
    rescue = Rescue(req.retries) if req.rescue else None
    with _open_nonempty(read_path) as source, _suggest_rescue(not req.rescue), \
            repo.session(f"backup {req.source}") as lease:
        warnings += lease.warnings
        btype, parent_meta = _choose_parent(repo, name, req.backup_type)
        parent = repo.images.load(parent_meta["id"]) if parent_meta else None
        known = repo.chunk_index(for_backup=True)
        chunk = repo.chunk_size
        plan = plan_reads(source, read_path, chunk, parent, req.all_blocks, _change_mask(req, source, chunk, parent),
                          rescue=req.rescue)
        warnings += plan.warnings
        kinds, ids = plan.kinds, plan.ids
        if req.progress_total:
            req.progress_total(sum(length for _, length in plan.ranges(chunk, source.size)))
        writing = None      # the image index's name once its write has begun
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="imgbackup-digest") as pool:
            store = ChunkStore(repo, lease)
            match = ParentMatch(repo, plan, parent)
            ingest = Ingest(repo, source, plan, store, match, pool, rescue)
            try:
                bytes_read = ingest.run(plan.read, kinds, ids, req.progress)
                if req.verify_unchanged > 0 and plan.from_parent.any():
                    extra, note = _verify_unchanged(ingest, plan, kinds, ids, req.verify_unchanged)
                    bytes_read += extra
                    if note:
                        warnings.append(note)
                packs = PackCheck(repo.storage, store.known, repo.fresh_chunk_index)
                bytes_read += _store_unavailable(ingest, store, kinds, ids, packs)
                stored = store.finish(repo)
                changed = _changed_slots(kinds, ids, parent)
                bad = _bad_map(rescue, plan, warnings)
                index = _image_index(repo, req, btype, parent, name, source, snap, plan, changed, bad, warnings)
                if snap is not None:
                    check_still_valid(snap)     # an overflowed snapshot read garbage: store no image of it
                writing = image_name(index.id)
                stored += _commit_image(repo, lease, index)
                interrupts.set_status(f"image {index.id} was stored complete")
            except BaseException as exc:
                _fail_cleanly(repo, store, exc, writing)
            finally:
                match.close()
        warnings += _record_damage(repo, known, match, parent)
        meta = index.meta
    return BackupResult(
        id=meta["id"], type=btype, parent=meta["parent"], name=name, source=req.source,
        source_size=source.size, bytes_read=bytes_read, bytes_stored=stored,
        duration_s=round(time.monotonic() - started, 3), chunks=len(kinds),
        chunks_data=int(np.count_nonzero(kinds == SLOT_DATA)), chunks_zero=int(np.count_nonzero(kinds == SLOT_ZERO)),
        chunks_unused=int(np.count_nonzero(kinds == SLOT_UNUSED)),
        chunks_new=len(store.claimed), chunks_changed=int(changed.sum()), chunks_delta=match.deltas, warnings=warnings,
        bad_ranges=bad, unreadable_bytes=sum(n for _, n in bad),
    )


def _commit_image(repo: Repository, lease: Lease, index: ImageIndex) -> int:
    """Write the image index only while the lease lives, and withdraw it unless the lease lived until
    after the write: a lease lost in between may have let a collection remove chunks it names."""
    lease.check()
    written = repo.images.write(index)
    try:
        lease.confirm()
    except LeaseLost:
        repo.images.withdraw(index.meta["id"], str(index.meta.get("name")))
        raise
    return written


def _image_index(repo: Repository, req: BackupRequest, btype: str, parent: ImageIndex | None, name: str,
                 source: Source, snap: Snapshot | None, plan: ReadPlan, changed: np.ndarray,
                 bad: list[list[int]], warnings: list[str]) -> ImageIndex:
    meta = repo.new_image_meta(
        type=btype, parent=parent.id if parent else None, name=name,
        source=_source_meta(req.source, source, snap), slots=len(plan.kinds),
        used_map={"enabled": not req.all_blocks, "regions": plan.regions},
        changed_blocks=req.changed_blocks, bad_ranges=bad, warnings=warnings, **req.extra_meta)
    kinds, ids = plan.kinds, plan.ids
    return ImageIndex(meta, kinds, ids[kinds == SLOT_DATA].copy(), np.packbits(changed, bitorder="little"))


MAX_REREADS = 3   # each pass re-reads only slots whose chunk turned out unusable in the pass before


def _store_unavailable(ingest: Ingest, store: ChunkStore, kinds: np.ndarray, ids: np.ndarray,
                       packs: PackCheck) -> int:
    """Re-read from the source every slot whose chunk has no usable copy after all, so the image
    never names a chunk known to be damaged or missing: a copy found bad after other slots had
    already matched it, a slot a change list took from the parent unread, or a copy in a pack that
    no longer exists (``packs`` confirms the packs the image uses, FORMAT.md section 9). Returns
    bytes read."""
    read = 0
    for _ in range(MAX_REREADS):
        packs.confirm(ids[kinds == SLOT_DATA])
        redo = store.unavailable(kinds, ids)
        if not redo.any():
            return read
        read += ingest.run(redo, kinds, ids)
    raise IntegrityError("chunks of this backup keep turning out damaged while it re-reads them",
                         "run 'imgbackup verify' and 'imgbackup repair'")


def _fail_cleanly(repo: Repository, store: ChunkStore, exc: BaseException, image: str | None) -> NoReturn:
    """Remove what this run stored, then raise ``exc`` saying so (Ctrl-C: exit 130, never 0)."""
    with _signals_held() as caught:
        store.abort()          # waits for every pack commit still running, so each is removed below
        freed, problems = store.remove_written(repo, image)
    note = f"the backup removed the {iec(freed)} it had written" if freed else "it had stored nothing yet"
    if problems:
        note += (f"; {len(problems)} object(s) could not be removed ({problems[0]}): "
                 "'imgbackup compact' removes them")
    if isinstance(exc, KeyboardInterrupt) or caught:   # a signal during the clean-up ends the run as one
        raise Interrupted(f"backup interrupted: nothing was added to the repository ({note})") from None
    if isinstance(exc, ImgBackupError) and exc.args and (freed or problems or isinstance(exc, RepositoryFull)):
        exc.args = (f"{exc.args[0]}; {note}", *exc.args[1:])
    raise exc


@contextlib.contextmanager
def _signals_held() -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM while the clean-up runs (a second Ctrl-C must not cut it short); yields
    the signals that came meanwhile."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    old = {sig: signal.signal(sig, lambda signum, _frame: caught.append(signum))
           for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _record_damage(repo: Repository, known, match: ParentMatch, parent: ImageIndex | None) -> list[str]:
    """Record the bad copies this run met (pack gone, parent chunk failing authentication)."""
    found = known.unrecorded()
    if not found:
        return []
    notes = []
    if match.damaged:
        notes.append(f"{len(match.damaged)} chunk(s) of the parent image {parent.id[:12]} are damaged "
                     f"(first: {match.damaged[0].chunk_id.hex()[:16]}); those slots were stored anew; "
                     "run 'imgbackup verify' to see which images they affect")
    missing = [c for c in found if c.reason == "missing"]
    if missing:
        notes.append(f"{len(missing)} chunk(s) the index lists are in packs that no longer exist (first: pack "
                     f"{missing[0].pack_id.hex()[:16]}); this image stored them anew where the source holds "
                     "them; 'imgbackup repair' shows which older images are affected")
    try:
        write_record(repo.storage, repo.envelope, found, "backup")
    except StorageError as exc:
        notes.append(f"could not record the damaged chunk copies found ({exc})")
    return notes


@contextlib.contextmanager
def _suggest_rescue(enabled: bool) -> Iterator[None]:
    """A read error of the medium ends a normal backup; the error says how to image the rest."""
    try:
        yield
    except SourceReadError as exc:
        if enabled and exc.media_error:
            exc.hint = ("the disk has unreadable sectors: 'imgbackup backup --rescue' images all it can read "
                        "and records the bad ranges in the image")
        raise


def _bad_map(rescue: Rescue | None, plan: ReadPlan, warnings: list[str]) -> list[list[int]]:
    """The image's ``bad_ranges``: unreadable sectors in blocks the image needs."""
    if rescue is None:
        return []
    bad, unneeded = rescue.needed(plan.used_bits, FS_BLOCK)
    if unneeded:
        warnings.append(f"{unneeded} unreadable bytes lie in blocks no filesystem uses: not needed, not in the map")
    return [[off, length] for off, length in bad]


def _change_mask(req: BackupRequest, source: Source, chunk: int, parent: ImageIndex | None) -> np.ndarray | None:
    if not req.changed_blocks:
        return None
    if parent is None:
        raise UsageError("--changed-blocks needs a parent image", "run a full backup first")
    if parent.size != source.size or parent.chunk_size != chunk:
        raise UsageError(f"--changed-blocks: the source size changed since image {parent.id[:12]}",
                         "run a backup without a change list")
    return read_change_list(req.changed_blocks, source.size, chunk, req.change_granularity)


def _verify_unchanged(ingest: Ingest, plan: ReadPlan, kinds: np.ndarray, ids: np.ndarray,
                      percent: float) -> tuple[int, str | None]:
    """Re-read a sample of the slots the change list skipped; on any difference, re-read them all."""
    skipped = np.flatnonzero(plan.from_parent)
    count = max(1, int(round(len(skipped) * min(percent, 100.0) / 100.0)))
    sample = np.zeros(len(kinds), bool)
    sample[np.random.default_rng().choice(skipped, size=count, replace=False)] = True
    want_kinds, want_ids = kinds.copy(), ids.copy()
    read = ingest.run(sample, kinds, ids)
    differs = (kinds != want_kinds) | np.any(ids != want_ids, axis=1)
    if not differs[sample].any():
        return read, None
    rest = plan.from_parent & ~sample
    read += ingest.run(rest, kinds, ids)
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

"""Ingest: turn segments of a source into chunk ids and stored new chunks, with both cores busy.

Each segment is one pool task that does all of its CPU work straight from the read buffer,
without copying it: mask blocks no filesystem uses, classify and hash (native, GIL released),
compare against the parent, compress and seal the chunks new to the repository. The main thread
only settles finished segments in order and streams their sealed chunks into packs, whose
commits (fsync) run in the background. Measured on a 4 GiB disk: the earlier design, which copied
every new chunk and sealed it as a separate task behind the main thread, kept the cores ~60% busy.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from imgbackup._core import scan
from imgbackup.device.source import Source
from imgbackup.engine.backup.plan import ReadPlan
from imgbackup.engine.backup.reader import Segment, SegmentReader
from imgbackup.engine.backup.rescue import Rescue
from imgbackup.errors import ImgBackupError, IntegrityError, SourceError
from imgbackup.format.imageindex import ImageIndex
from imgbackup.format.layout import ID_SIZE, SLOT_DATA
from imgbackup.repository.chunkreader import ChunkReader
from imgbackup.repository.damage import ChunkDamaged, DamagedCopy
from imgbackup.repository.lease import Lease
from imgbackup.repository.packs import pack_name
from imgbackup.repository.repo import Repository
from imgbackup.repository.storage import ObjectMissing

SEGMENT_BYTES = 8 << 20      # 8 MiB reads reach this machine's sequential read speed
TASKS_IN_FLIGHT = 3          # segments being digested: one per core plus one queued
READ_AHEAD = 2               # segments read and waiting for a worker
# Parent chunks a segment's changed slots need are fetched at once, not one by one inside the
# digest: each is a cold random read of a pack (~1-6 ms here) that otherwise stalls the pipeline.
PARENT_READERS = 4


class ChunkStore:
    """Stores each chunk new to the repository once, however many segments or tasks hold it.

    "New" means no usable copy: a chunk whose every copy is known damaged or missing is stored again.
    """

    def __init__(self, repo: Repository, lease: Lease | None = None) -> None:
        self.known = repo.chunk_index(for_backup=True)
        self.claimed: set[bytes] = set()
        self._lock = threading.Lock()
        self.packs = repo.pack_writer()
        self.index_files: list[str] = []   # named before each is written: a failure may leave one
        self.lease = lease

    def check(self) -> None:
        """Stop early when the backup's lease is lost: nothing it writes could be committed."""
        if self.lease is not None and self.lease.lost:
            self.lease.check()

    def is_new(self, chunk_id: bytes) -> bool:
        return chunk_id not in self.known and chunk_id not in self.claimed

    def claim(self, chunk_id: bytes) -> bool:
        """True for exactly one caller per new chunk: that caller seals and hands it over."""
        with self._lock:
            if chunk_id in self.claimed or chunk_id in self.known:
                return False
            self.claimed.add(chunk_id)
            return True

    def unavailable(self, kinds: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Per slot: a data slot whose chunk has no usable copy and is not being stored by this run
        (its copy was found damaged after the slot was settled, or a change list took it unread)."""
        slots = np.flatnonzero(kinds == SLOT_DATA)
        if not len(slots):
            return np.zeros(len(kinds), bool)
        unique, inverse = np.unique(ids[slots].view(np.void(ID_SIZE)).ravel(), return_inverse=True)
        lacking = ~self.known.known(unique.view(np.uint8).reshape(-1, ID_SIZE))      # one native lookup
        for i in np.flatnonzero(lacking).tolist():
            lacking[i] = unique[i].tobytes() not in self.claimed
        out = np.zeros(len(kinds), bool)
        out[slots[lacking[inverse]]] = True
        return out

    def finish(self, repo: Repository) -> int:
        """Commit the last pack, then the chunk-index file naming the new packs; bytes written."""
        self.packs.flush()
        if self.lease is not None:
            self.lease.check()
        return self.packs.bytes_written + repo.store_chunk_index(self.packs.written, self.index_files)

    def abort(self) -> None:
        self.packs.abort()

    def remove_written(self, repo: Repository, image: str | None = None) -> tuple[int, list[str]]:
        """After a failed run: delete what it stored, each before what it refers to — the image index
        if its write was begun (a failed write may still have stored it), then the packs, but only
        while no index file names them: backups run side by side, and one that loaded the index after
        this run's index file was written may already dedup against its chunks. Such packs (and the
        index file) are left to garbage collection, whose two phases prove nothing uses them. The
        first deletion that fails stops the rest, so what stays is consistent. (bytes freed, problems)."""
        freed = 0
        packs = sorted({loc.pack_id for loc in self.packs.written.values()})
        names = [*([image] if image else [])]
        if not any(_exists(repo, name) for name in self.index_files):
            names += [*self.index_files, *map(pack_name, packs)]
        for name in names:
            try:
                size = repo.storage.size(name)
                repo.storage.delete(name)
                freed += size
            except ObjectMissing:
                continue
            except ImgBackupError as exc:
                return freed, [f"{name}: {exc}"]
        return freed, []


def _exists(repo: Repository, name: str) -> bool:
    try:
        return repo.storage.exists(name)
    except ImgBackupError:
        return True      # unknown: assume another backup may know it


class ParentMatch:
    """What a changed slot can take from the parent's chunk at the same slot. Thread-safe.

    - Reuse: a slot that differs from the parent's chunk only in blocks no filesystem uses now
      (deleting a file frees its blocks, which used-block mode zeroes) keeps the parent's chunk,
      proven by masking the parent's chunk with today's map.
    - A base: any other changed slot is stored as a delta against the parent's chunk (or, when
      that is a delta itself, against its base: deltas stay depth one). Measured on the
      benchmark's change set: 0.99x the compressed changed blocks, against 1.62x for whole chunks.
    A parent chunk with no usable copy is no match and no base; one whose copy fails authentication
    now is neither, and its bad copy is dropped from the index for the rest of the run and listed in
    ``damaged`` (recorded at the end; the backup goes on): the slot is stored whole.
    Without a reader (a key that cannot read data) every changed slot is stored whole.
    """

    def __init__(self, repo: Repository, plan: ReadPlan, parent: ImageIndex | None,
                 reader: ChunkReader | None = None) -> None:
        self.plan = plan
        self.key = repo.keys.id_key
        self.chunk = plan.chunk
        usable = parent is not None and parent.slots == len(plan.kinds)
        self.parent_ids = parent.ids_by_slot() if usable else None
        self.parent_kinds = parent.kinds if usable else None
        self.index = repo.chunk_index(for_backup=True)
        readable = usable and repo.can_read_data     # a backup-only key seals chunks it cannot open
        self.reader = (reader or ChunkReader(repo)) if readable else None
        self.damaged: list[DamagedCopy] = []
        self.deltas = 0
        self._lock = threading.Lock()
        self._io = ThreadPoolExecutor(PARENT_READERS, thread_name_prefix="imgbackup-parent") if readable else None

    def _old_id(self, slot: int, new_id: bytes) -> bytes | None:
        if self.reader is None or self.parent_kinds[slot] != SLOT_DATA:
            return None
        old_id = self.parent_ids[slot].tobytes()
        if old_id == new_id:
            return None
        loc = self.index.get(old_id)
        if loc is None or (loc.base is not None and loc.base not in self.index):
            return None      # marked for collection (or damaged): neither reused nor a base; stored whole
        return old_id

    def prefetch(self, slots: list[tuple[int, bytes]]) -> dict[bytes, Callable[[], bytes]]:
        """Start reading the parent blobs that ``match`` will need for these (slot, new id) pairs."""
        if self._io is None:
            return {}
        wanted: set[bytes] = set()
        for slot, new_id in slots:
            old_id = self._old_id(slot, new_id)
            if old_id is not None:
                with contextlib.suppress(IntegrityError):   # not in the index: match() reports it
                    wanted.update(self.reader.blobs_needed(old_id))
        # Neighbouring parent blobs (a segment's slots, stored in order by the parent's backup) come
        # in one ranged read: on a bucket each read is a round trip the digest may wait for.
        out: dict[bytes, Callable[[], bytes]] = {}
        for group in self.reader.blob_ranges(c for c in wanted if self.index.get(c) is not None):
            fetched = self._io.submit(self.reader.fetch_group, group)
            for cid, loc in group[2]:
                out[cid] = functools.partial(self._blob_of, fetched, group, cid, loc)
        return out

    def _blob_of(self, fetched: Future, group, cid: bytes, loc) -> bytes:
        """One blob out of a prefetched group; when the group could not be read whole (a pack gone,
        moved or short), the blob is read on its own, so damage is found and named per copy."""
        try:
            return self.reader.blob_in(group, fetched.result(), cid, loc)
        except IntegrityError:
            return self.reader.read_blob(cid)

    def close(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True, cancel_futures=True)

    def match(self, slot: int, new_id: bytes, blobs: dict[bytes, Callable[[], bytes]] | None = None
              ) -> tuple[bytes | None, tuple[bytes, bytes] | None]:
        """(the parent's chunk id to reuse, or None; else the (id, plaintext) base for a delta, or None)."""
        old_id = self._old_id(slot, new_id)
        if old_id is None:
            return None, None
        blobs = blobs or {}
        try:
            base_id, base_plain = self.reader.whole_base(old_id, blobs)
            if self.plan.has_unused(slot * self.chunk, self.chunk):
                fetch = blobs.get(old_id, lambda: self.reader.read_blob(old_id))
                old = base_plain if base_id == old_id else self.reader.open_blob(old_id, fetch(), base=base_plain)
                masked = bytearray(old)
                self.plan.mask_unused(slot * self.chunk, memoryview(masked))
                if scan.chunk_id(self.key, masked) == new_id:
                    return old_id, None
        except IntegrityError as exc:
            if isinstance(exc, ChunkDamaged) and exc.copy is not None and self.reader.still_bad(exc.copy):
                with self._lock:
                    self.reader._next_copy(exc.copy, confirmed=True)   # no other slot of this run uses it
                    self.damaged.append(exc.copy)
            return None, None                            # either way this slot is stored from the source
        return None, (base_id, base_plain)


@dataclass
class _Digest:
    kinds: np.ndarray
    ids: np.ndarray
    sealed: list[tuple[bytes, bytes, int, bytes | None]]   # (chunk id, sealed blob, plaintext length, base)
    reused: list[tuple[int, bytes]]          # (chunk within the segment, the parent's chunk id)


class Ingest:
    """Reads slots of a source and fills ``kinds``/``ids``, storing what the repository lacks."""

    def __init__(self, repo: Repository, source: Source, plan: ReadPlan, store: ChunkStore,
                 parent: ParentMatch, pool: ThreadPoolExecutor, rescue: Rescue | None = None) -> None:
        self.repo = repo
        self.rescue = rescue
        self.source = source
        self.plan = plan
        self.store = store
        self.parent = parent
        self.pool = pool
        self.chunk = plan.chunk

    def _digest(self, seg: Segment) -> _Digest:
        chunk, data = self.chunk, seg.data
        self.plan.mask_unused(seg.offset, data)
        kinds, ids = scan.scan_chunks(data, chunk, self.repo.keys.id_key, nthreads=1)
        first = seg.offset // chunk
        sealed: list[tuple[bytes, bytes, int, bytes | None]] = []
        reused: list[tuple[int, bytes]] = []
        data_slots = np.flatnonzero(kinds == SLOT_DATA)
        known = self.store.known.known(ids[data_slots]) if len(data_slots) else ()   # one native lookup
        new = [(i, ids[i].tobytes()) for i, seen in zip(data_slots.tolist(), list(known), strict=True) if not seen]
        new = [(i, cid) for i, cid in new if cid not in self.store.claimed]
        blobs = self.parent.prefetch([(first + i, cid) for i, cid in new])
        for i, cid in new:
            same, base = self.parent.match(first + i, cid, blobs)
            if same is not None:
                reused.append((i, same))
            elif self.store.claim(cid):
                plain = data[i * chunk : (i + 1) * chunk]
                blob, used = self.repo.envelope.seal_chunk(cid, plain, base)
                sealed.append((cid, blob, len(plain), used))
        return _Digest(kinds, ids, sealed, reused)

    def run(self, which: np.ndarray, kinds: np.ndarray, ids: np.ndarray,
            progress: Callable[[int], None] | None = None) -> int:
        """Read the slots in ``which`` and fill their kinds and ids; returns bytes read."""
        chunk = self.chunk
        segment = max(SEGMENT_BYTES // chunk, 1) * chunk
        ranges = ReadPlan(which, kinds, ids, self.plan.from_parent).ranges(chunk, self.source.size)
        expected = sum(length for _, length in ranges)
        bytes_read = 0
        pending: deque[tuple[Segment, Future]] = deque()
        reader = SegmentReader(self.source, ranges, segment, buffers=TASKS_IN_FLIGHT + READ_AHEAD,
                               rescue=self.rescue)

        def settle() -> None:
            nonlocal bytes_read
            seg, fut = pending.popleft()
            got = fut.result()
            first = seg.offset // chunk
            kinds[first : first + len(got.kinds)] = got.kinds
            ids[first : first + len(got.kinds)] = got.ids
            for i, same in got.reused:
                ids[first + i] = np.frombuffer(same, np.uint8)
            for cid, blob, raw_length, base in got.sealed:
                self.store.packs.add(cid, blob, raw_length, base)
                self.parent.deltas += base is not None
            bytes_read += len(seg.data)
            reader.release(seg)
            self.store.check()
            if progress:
                progress(len(seg.data))

        try:
            for seg in reader:
                pending.append((seg, self.pool.submit(self._digest, seg)))
                if len(pending) >= TASKS_IN_FLIGHT:
                    settle()
            while pending:
                settle()
        finally:
            for _seg, fut in pending:  # a failure: let running tasks finish with their buffers
                fut.cancel()
        if bytes_read != expected:
            raise SourceError(f"{self.source.path} ended early: read {bytes_read} of {expected} bytes")
        return bytes_read

"""A random-access, read-only view of one image: the bytes of the disk it was taken of.

Nothing is restored first. Zero and unused slots read as zeros without any I/O; data slots are
read through ChunkReader, so every byte is authenticated and checked against its chunk id before
it is returned. A damaged chunk raises IntegrityError naming the chunk and its offset in the
image — callers (the FUSE server) turn that into EIO for that range, never into wrong bytes.

Speed comes from two things: a bounded LRU cache of decoded chunks (filesystems re-read their
metadata often) and read-ahead: when a read continues where an earlier one ended, the next few
chunks are fetched on a small thread pool while the caller consumes the current one.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from imgbackup.errors import IntegrityError
from imgbackup.format.imageindex import ImageIndex
from imgbackup.format.layout import SLOT_DATA
from imgbackup.repository.chunkreader import ChunkReader
from imgbackup.repository.repo import Repository

DEFAULT_CACHE_BYTES = 64 << 20   # decoded chunks kept: a filesystem's metadata hot set while it is walked
DEFAULT_READAHEAD_CHUNKS = 8     # fetched ahead of a sequential reader (dd, a checker's pass)
DEFAULT_WORKERS = 2              # read-ahead threads at least (more when the storage takes more reads in flight)
_RECENT_ENDS = 16                # read ends remembered to tell sequential streams from random reads


class ImageView:
    """``read(offset, length)`` over an image, thread-safe, with a chunk cache and read-ahead."""

    def __init__(self, repo: Repository, image: str | ImageIndex, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 readahead_chunks: int = DEFAULT_READAHEAD_CHUNKS, workers: int = DEFAULT_WORKERS) -> None:
        self.index = image if isinstance(image, ImageIndex) else repo.images.load(image)
        self.reader = ChunkReader(repo)
        self.chunk_size = self.index.chunk_size
        self.size = self.index.size
        is_data = self.index.kinds == SLOT_DATA
        # Position of each data slot's id in index.ids (-1 for zero/unused slots).
        self._rank = np.where(is_data, np.cumsum(is_data) - 1, -1)
        self._zeros = bytes(self.chunk_size)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_slots = max(cache_bytes // self.chunk_size, 4)
        self._inflight: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._recent_ends: deque[int] = deque(maxlen=_RECENT_ENDS)
        # a bucket answers after a round trip: keep twice as much ahead so its reads overlap
        self._readahead = readahead_chunks * (2 if getattr(repo.storage, "remote", False) else 1)
        self._workers = max(workers, self.reader.parallelism)
        self._pool: ThreadPoolExecutor | None = None   # created lazily, and again after a fork
        self._pid = os.getpid()
        self.chunk_reads = 0                            # chunks fetched from the repository (for tests)

    @property
    def image_id(self) -> str:
        return self.index.id

    def chunk_id_at(self, offset: int) -> bytes | None:
        """The id of the chunk holding image byte ``offset``, or None for a zero/unused slot."""
        rank = int(self._rank[offset // self.chunk_size])
        return None if rank < 0 else bytes(self.index.ids[rank])

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (short only at the end of the image)."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if self._pid != os.getpid():
            self._after_fork()
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        self._maybe_read_ahead(offset, end, last)
        parts = []
        for slot in range(first, last + 1):
            data = self._slot(slot)
            lo = max(offset - slot * cs, 0)
            hi = min(end - slot * cs, len(data))
            parts.append(memoryview(data)[lo:hi])
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    def _slot(self, slot: int) -> bytes:
        if self._rank[slot] < 0:
            return self._zeros[: self.index.slot_length(slot)]
        return self._fetch(slot, wait=True)

    def _fetch(self, slot: int, wait: bool) -> bytes | None:
        """A data slot's bytes from the cache, an in-flight fetch, or the repository."""
        with self._lock:
            data = self._cache.get(slot)
            if data is not None:
                self._cache.move_to_end(slot)
                return data
            fut = self._inflight.get(slot)
            owner = fut is None
            if owner:
                fut = self._inflight[slot] = Future()
        if not owner:
            return fut.result() if wait else None
        try:
            data = self._load(slot)
        except BaseException as exc:
            self._settle(slot, fut, error=exc)
            if wait:
                raise
            return None
        self._settle(slot, fut, data)
        return data

    def _settle(self, slot: int, fut: Future, data: bytes | None = None, error: BaseException | None = None) -> None:
        """Hand a fetched slot to the cache and to whoever waits on its future."""
        with self._lock:
            self._inflight.pop(slot, None)
            if error is None:
                self._cache[slot] = data
                while len(self._cache) > self._cache_slots:
                    self._cache.popitem(last=False)
        if error is None:
            fut.set_result(data)
        else:
            fut.set_exception(error)

    def _slot_id(self, slot: int) -> bytes:
        return bytes(self.index.ids[int(self._rank[slot])])

    def _load(self, slot: int, blob_plain: bytes | None = None) -> bytes:
        chunk_id = self._slot_id(slot)
        start = slot * self.chunk_size
        self.chunk_reads += 1
        try:
            data = self.reader.read(chunk_id) if blob_plain is None else blob_plain
        except IntegrityError as exc:
            raise IntegrityError(f"chunk {chunk_id.hex()[:16]} at image offset {start} "
                                 f"(bytes {start}-{start + self.index.slot_length(slot) - 1}) "
                                 f"is damaged: {exc.args[0]}") from None
        if len(data) != self.index.slot_length(slot):
            raise IntegrityError(f"chunk {chunk_id.hex()[:16]} at image offset {start} has length {len(data)}, "
                                 f"expected {self.index.slot_length(slot)}")
        return data

    def _maybe_read_ahead(self, offset: int, end: int, last: int) -> None:
        """When this read continues an earlier one, fetch the next chunks in the background:
        neighbours in a pack in one ranged read (ChunkReader groups), several reads at once."""
        with self._lock:
            sequential = offset in self._recent_ends
            self._recent_ends.append(end)
            if not sequential or self._readahead <= 0:
                return
            stop = min(last + 1 + self._readahead, self.index.slots)
            claimed: list[tuple[int, Future]] = []
            for s in range(last + 1, stop):
                if self._rank[s] >= 0 and s not in self._cache and s not in self._inflight:
                    claimed.append((s, self._inflight.setdefault(s, Future())))
        if not claimed:
            return
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="imgbackup-view")
        try:
            groups = list(self.reader.groups_in_order(self._slot_id(s) for s, _ in claimed))
        except IntegrityError as exc:   # an id no pack holds: those reads fail on their own
            for s, fut in claimed:
                self._settle(s, fut, error=exc)
            return
        pos = 0
        for group in groups:
            self._pool.submit(self._load_group, claimed[pos:pos + len(group[2])], group)
            pos += len(group[2])

    def _load_group(self, slots: list[tuple[int, Future]], group) -> None:
        """Read-ahead of several slots with one ranged read; when any of them fails, each is read on
        its own (a damaged chunk then fails only its own reads, a flipped answer is read again)."""
        try:
            plains = self.reader.open_group(group)
            loaded = [self._load(s, p) for (s, _), p in zip(slots, plains, strict=True)]
        except BaseException:
            loaded = None
        for i, (slot, fut) in enumerate(slots):
            if loaded is not None:
                self._settle(slot, fut, loaded[i])
                continue
            try:
                self._settle(slot, fut, self._load(slot))
            except BaseException as exc:
                self._settle(slot, fut, error=exc)

    def _after_fork(self) -> None:
        """In a forked child the pool's threads and any in-flight fetches do not exist: start afresh."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._inflight = {}
        self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ImageView:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""copy: images, and the chunks they need, from one repository into another (3-2-1).

Two modes, chosen by the destination:
- **raw**, into a repository made with ``init --related-to`` the source (the same key material and
  chunk size): sealed chunks and image objects are copied byte for byte, never decrypted; each
  blob's tag is still checked before it is sent, so damage is not carried over;
- **re-encrypting**, into any other repository of the same chunk size: each chunk is opened
  (authenticated, its id checked), its id computed again under the destination's id key, sealed
  with the destination's key; the image index is rewritten with the new ids (same image id).

The destination is written like a backup writes (FORMAT.md §9), under a session lease like a
backup's (backups, other copies and collections run beside it; it deletes nothing): packs, then a
chunk-index file naming them, then the image objects whose chunks are all indexed. Index files are
written as packs land (every ``INDEX_EVERY_BYTES`` or ``INDEX_EVERY_SECONDS``), so a killed copy
keeps what it sent; the next run first **adopts** packs at the destination that no index names
(their authenticated trailers list what they hold), so nothing already sent is sent again — only
packs written before every live backup session there began (a running backup's packs are unindexed
too, and deleted again if it fails).
Images already at the destination are skipped by id; nothing at the destination is ever deleted.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from imgbackup import audit
from imgbackup._core import scan
from imgbackup.errors import ImgBackupError, IntegrityError, TargetRefused, VerificationFailed
from imgbackup.format.imageindex import ImageIndex
from imgbackup.format.layout import DATA_KEY_ID_MIN, ENVELOPE_HEADER, OBJ_CHUNK
from imgbackup.repository.bounded import bounded_map
from imgbackup.repository.chunkreader import ChunkReader, Group, group_cost, group_end
from imgbackup.repository.lease import Lease, LeaseLost
from imgbackup.repository.marks import Safety, judge_safety, load_marks
from imgbackup.repository.packs import BlobLocation, pack_name, read_pack_trailer
from imgbackup.repository.repo import Repository
from imgbackup.repository.storage import ObjectMissing

INDEX_EVERY_BYTES = 1 << 30    # packs sent between two chunk-index files: few index files per TiB copied ...
INDEX_EVERY_SECONDS = 300.0    # ... yet on a slow uplink one at least this often, so images land as they can
COPY_WINDOW = 48 << 20         # bytes read ahead from the source: with the packs in flight, within 200 MiB RSS


def _env_bytes(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name) or default))
    except ValueError:
        return default


@dataclass
class CopyResult:
    mode: str                         # "raw" or "re-encrypt"
    source: str
    destination: str
    images_copied: list[str] = field(default_factory=list)
    images_skipped: list[str] = field(default_factory=list)
    chunks_sent: int = 0              # chunks stored at the destination by this run
    chunks_reused: int = 0            # chunks the copied images need that the destination already held
    chunks_adopted: int = 0           # of those, chunks in packs a killed copy (or backup) had left unindexed
    bytes_sent: int = 0               # packs, chunk-index files and image objects written
    packs_sent: int = 0
    duration_s: float = 0.0
    verified: bool | None = None      # --verify: every chunk of the copied images authenticated there
    chunks_verified: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Pending:
    """An image whose object waits until every chunk it needs is named by a chunk-index file."""

    image_id: str
    name: str
    write: Callable[[], int]
    waiting: set[bytes]


def copy_images(src: Repository, dst: Repository, metas: list[dict], verify: bool = False,
                progress: Callable[[int], None] | None = None) -> CopyResult:
    """Copy the images ``metas`` (oldest first) from ``src`` into ``dst``; a ``copy`` audit event
    records it (ok, failed or refused), naming both repositories."""
    with audit.audited("copy", repository=src.config.id, location=src.location,
                       destination=dst.config.id, destination_location=dst.location) as event:
        result = _copy_images(src, dst, metas, verify, progress)
        event.update(bytes=result.bytes_sent, mode=result.mode, images_copied=len(result.images_copied),
                     images_skipped=len(result.images_skipped), chunks_sent=result.chunks_sent,
                     chunks_reused=result.chunks_reused, verified=result.verified)
    return result


def _copy_images(src: Repository, dst: Repository, metas: list[dict], verify: bool,
                 progress: Callable[[int], None] | None) -> CopyResult:
    started = time.monotonic()
    if src.chunk_size != dst.chunk_size:
        raise TargetRefused(f"{dst.location} has chunk size {dst.chunk_size} and {src.location} {src.chunk_size}: "
                            "an image index names chunks of one size",
                            f"copy into a repository made with 'imgbackup init --chunk-size {src.chunk_size}' "
                            "(or --related-to the source)")
    if src.location == dst.location:
        raise TargetRefused(f"{dst.location} is the source repository itself")
    result = CopyResult("raw" if dst.is_related(src) else "re-encrypt", src.location, dst.location)
    with dst.session(f"copy from {src.location}") as lease:
        result.warnings += lease.warnings
        present = set(dst.images.ids())
        todo = [m for m in metas if m["id"] not in present]
        result.images_skipped = [m["id"] for m in metas if m["id"] in present]
        copier = _Copier(src, dst, result, progress, lease)
        try:
            copier.adopt_orphans()
            for meta in todo:
                copier.copy_image(meta["id"])
            copier.finish()
        except BaseException:
            copier.writer.abort()
            raise
        finally:
            copier.pool.shutdown(wait=True, cancel_futures=True)
    if verify:
        _verify_at_destination(dst, result)
    result.duration_s = round(time.monotonic() - started, 3)
    return result


class _Copier:
    def __init__(self, src: Repository, dst: Repository, result: CopyResult,
                 progress: Callable[[int], None] | None, lease: Lease) -> None:
        self.src, self.dst, self.result, self.progress, self.lease = src, dst, result, progress, lease
        self.raw = result.mode == "raw"
        self.reader = ChunkReader(src)
        self.index = dst.chunk_index(for_backup=True, list_packs=True)   # no damaged, marked or vanished copies
        self.writer = dst.pack_writer()
        self.pool = ThreadPoolExecutor(max(os.cpu_count() or 2, self.reader.parallelism),
                                       thread_name_prefix="imgbackup-copy")
        self.unindexed: dict[bytes, BlobLocation] = {}
        self.pending: list[_Pending] = []
        self.claimed: set[bytes] = set()        # destination ids this run stores
        self.counted: set[bytes] = set()        # destination ids already counted as sent or reused
        self.adopted: set[bytes] = set()
        self.sent_keys: set[int] = set()        # data keys present at the destination (raw copies)
        self.id_map: dict[bytes, bytes] = {}    # re-encrypting: source id -> destination id (last image's)
        self.last_copied: str | None = None
        self._claim_lock = threading.Lock()
        self._indexed_at = (0, time.monotonic())
        self.index_every = _env_bytes("IMGBACKUP_COPY_INDEX_BYTES", INDEX_EVERY_BYTES)

    # --- what a killed run left -----------------------------------------------------------------

    def adopt_orphans(self) -> None:
        """Packs no index file names (a killed copy's, or a killed backup's) still hold valid chunks:
        name them in an index file instead of sending them again. Their trailers are authenticated;
        a pack whose trailer does not open is left alone."""
        known = {pack_name(p) for p in self.index.packs()}
        found: dict[bytes, BlobLocation] = {}
        sessions = judge_safety(self.dst.storage, grace=0.0, but=self.lease.name)   # its own packs are indexed
        marked = {pack_name(p) for p in load_marks(self.dst.storage, self.dst.envelope).packs}
        for name in sorted(self.index.listed_packs):
            if name in known or name in marked or not self._left_by_a_dead_writer(name, sessions):
                continue
            try:
                found.update(read_pack_trailer(self.dst.storage, self.dst.envelope,
                                               bytes.fromhex(name.rsplit("/", 1)[1])))
            except (IntegrityError, ValueError) as exc:
                self.result.warnings.append(f"left an unreadable pack alone: {name} ({exc})")
        fresh = {cid: loc for cid, loc in found.items() if cid not in self.index}
        if fresh:
            self.result.bytes_sent += self.dst.store_chunk_index(fresh)
            self.adopted = set(fresh)

    def _left_by_a_dead_writer(self, name: str, sessions: Safety) -> bool:
        """Whether the unindexed pack ``name`` was written before every live backup session began: a
        live backup's pack is unindexed until it finishes, and one that fails deletes it again. (A
        pack a collection has marked is left alone too: a later one may delete it once ripe.)"""
        try:
            return sessions.mature(self.dst.storage.modified(name))
        except ObjectMissing:
            return False

    # --- one image ------------------------------------------------------------------------------

    def copy_image(self, image_id: str) -> None:
        if self.raw:
            raw, image = self.src.images.load_raw(image_id)
            needed = self.reader.with_bases(image.unique_ids())   # a delta goes with its base
            self._send_raw(needed)
            write = lambda: self.dst.images.put_raw(image_id, raw)  # noqa: E731
        else:
            image = self.src.images.load(image_id)
            self._seed_id_map(image)
            self._send_reencrypted(image.unique_ids())
            ids = np.frombuffer(b"".join(self.id_map[bytes(r)] for r in image.ids), np.uint8).reshape(-1, 32)
            copied = ImageIndex(dict(image.meta), image.kinds, ids.copy(), image.changed)
            needed = copied.unique_ids()
            write = lambda: self.dst.images.write(copied)  # noqa: E731
            self.id_map = {bytes(a): bytes(b) for a, b in zip(image.ids, copied.ids, strict=True)}
            self.last_copied = image_id
        for cid in needed - self.counted:
            if cid in self.claimed:
                self.result.chunks_sent += 1
            else:
                self.result.chunks_reused += 1
                self.result.chunks_adopted += cid in self.adopted
        self.counted |= needed
        bases = self.reader.index.bases_of(needed) if self.raw else set()
        waiting = {c for c in needed if not self._stored(c, c in bases)}
        self.pending.append(_Pending(image_id, str(image.meta.get("name")), write, waiting))
        self._write_ready_images()

    def _claim(self, cid: bytes, whole: bool = False) -> bool:
        """True for exactly one caller per chunk the destination lacks (with ``whole``: lacks stored
        whole, as a delta's base must be)."""
        with self._claim_lock:
            if self._stored(cid, whole) or cid in self.claimed:
                return False
            self.claimed.add(cid)
            return True

    def _stored(self, cid: bytes, whole: bool) -> bool:
        """Whether a chunk-index file at the destination names the chunk (stored whole, if asked)."""
        held = self.index.get(cid)
        return held is not None and not (whole and held.base is not None)

    def _send_raw(self, needed: set[bytes]) -> None:
        bases = self.reader.index.bases_of(needed)
        missing = [cid for cid in needed if self._claim(cid, whole=cid in bases)]

        def fetch(group: Group) -> list[tuple[bytes, bytes, int, bytes | None]]:
            data = self.reader.fetch_group(group)
            out = []
            for cid, loc in group[2]:
                blob = self.reader.blob_in(group, data, cid, loc)
                self.src.envelope.authenticate(OBJ_CHUNK, cid, blob, f"chunk {cid.hex()[:16]} of {self.src.location}",
                                               loc.base)
                self._send_data_key(blob)
                out.append((cid, blob, loc.raw_length, loc.base))
            return out

        def cost(group: Group) -> int:
            return group_end(group) - group[1]

        for sealed in bounded_map(self.pool, fetch, self.reader.blob_ranges(missing), cost, COPY_WINDOW):
            for cid, blob, raw_length, base in sealed:
                self._add(cid, blob, raw_length, base)

    def _send_data_key(self, blob: bytes) -> None:
        """A chunk copied sealed needs its data key at the destination before its pack lands (FORMAT.md
        2.3): the key's object is copied verbatim (related repositories share the key pair)."""
        key_id = ENVELOPE_HEADER.unpack_from(blob)[4]
        if key_id < DATA_KEY_ID_MIN or key_id in self.sent_keys:
            return
        with self._claim_lock:
            if key_id not in self.sent_keys:
                self.dst.adopt_data_key(key_id, self.src.data_key_object(key_id))
                self.sent_keys.add(key_id)

    def _seed_id_map(self, image: ImageIndex) -> None:
        """Destination ids of the parent's chunks, from the parent copied earlier (the two indexes
        name the same slots), so an incremental reads only its changed chunks from the source."""
        parent = image.meta.get("parent")
        if not parent or parent == self.last_copied:   # the map already holds the parent's ids
            return
        try:
            theirs, mine = self.src.images.load(parent), self.dst.images.load(parent)
        except ImgBackupError:   # not copied yet, or unreadable: every chunk is read instead
            return
        if np.array_equal(theirs.kinds, mine.kinds) and theirs.ids.shape == mine.ids.shape:
            self.id_map.update((bytes(a), bytes(b)) for a, b in zip(theirs.ids, mine.ids, strict=True)
                               if bytes(b) in self.index)

    def _send_reencrypted(self, needed: set[bytes]) -> None:
        todo = [cid for cid in needed if cid not in self.id_map]
        key = self.dst.keys.id_key

        def convert(group: Group) -> list[tuple[bytes, bytes, bytes | None, int]]:
            out = []
            for (cid, _), plain in zip(group[2], self.reader.open_group(group), strict=True):
                new = scan.chunk_id(key, plain)
                sealed = self.dst.envelope.seal(OBJ_CHUNK, new, plain) if self._claim(new) else None
                out.append((cid, new, sealed, len(plain)))
            return out

        for converted in bounded_map(self.pool, convert, self.reader.blob_ranges(todo), group_cost, COPY_WINDOW):
            for cid, new, sealed, raw_length in converted:
                self.id_map[cid] = new
                if sealed is not None:
                    self._add(new, sealed, raw_length)

    # --- packs, index files, images -------------------------------------------------------------

    def _add(self, cid: bytes, blob: bytes, raw_length: int, base: bytes | None = None) -> None:
        self.writer.add(cid, blob, raw_length, base)
        if self.progress:
            self.progress(len(blob))
        since_bytes, since_time = self._indexed_at
        if (self.writer.bytes_written - since_bytes >= self.index_every
                or (self.writer.written and time.monotonic() - since_time >= INDEX_EVERY_SECONDS)):
            self._commit_index()

    def _commit_index(self) -> None:
        """One chunk-index file for the packs landed since the last one; then the images it completes."""
        self.unindexed.update(self.writer.take_written())
        self._indexed_at = (self.writer.bytes_written, time.monotonic())
        if not self.unindexed:
            return
        new, self.unindexed = self.unindexed, {}
        self.lease.check()      # lost: a collection may have judged this copy dead; commit nothing more
        self.result.bytes_sent += self.dst.store_chunk_index(new)
        for pending in self.pending:
            pending.waiting.difference_update(new)
        self._write_ready_images()

    def _write_ready_images(self) -> None:
        ready = [p for p in self.pending if not p.waiting]
        self.pending = [p for p in self.pending if p.waiting]
        for pending in ready:
            self.lease.check()
            self.result.bytes_sent += pending.write()
            try:
                self.lease.confirm()
            except LeaseLost:   # as a backup does (FORMAT.md §8): a lease lost meanwhile withdraws the image
                self.dst.images.withdraw(pending.image_id, pending.name)
                raise
            self.result.images_copied.append(pending.image_id)

    def finish(self) -> None:
        self.writer.flush()
        self._commit_index()
        self.result.bytes_sent += self.writer.bytes_written
        self.result.packs_sent = self.writer.packs_written
        if self.pending:   # cannot happen: every chunk sent is indexed by now
            raise IntegrityError(f"copy left {len(self.pending)} image(s) with chunks not stored")


def _verify_at_destination(dst: Repository, result: CopyResult) -> None:
    """Read back every chunk of the copied images at the destination and check its tag."""
    reader = ChunkReader(dst)
    ids: set[bytes] = set()
    for image_id in result.images_copied:
        ids |= dst.images.load(image_id).unique_ids()
    bad = []
    with ThreadPoolExecutor(max(os.cpu_count() or 2, reader.parallelism),
                            thread_name_prefix="imgbackup-copy-verify") as pool:
        for _cid, error, _size in reader.check_all(ids, pool, decode=False):
            result.chunks_verified += 1
            if error is not None:
                bad.append(error)
    result.verified = not bad
    if bad:
        raise VerificationFailed(f"{len(bad)} copied chunk(s) do not authenticate at {dst.location}: {bad[0]}")

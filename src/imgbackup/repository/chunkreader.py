"""Reading chunks back: locate, authenticate, decompress and check each against its id.

No byte leaves this module unauthenticated: the AEAD binds the chunk id (and a delta's base id),
and the keyed hash of the plaintext must equal that id again. A delta is opened against its base,
which is read (and checked against its own id) first; a base must be a whole chunk (depth one).
A copy that turns out bad is dropped from the index and the next copy of the chunk is tried.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

from imgbackup._core import scan
from imgbackup.crypto.envelope import Envelope
from imgbackup.errors import IntegrityError, ObjectMissing, StorageError
from imgbackup.format.layout import OBJ_CHUNK
from imgbackup.repository.damage import ChunkDamaged, DamagedCopy
from imgbackup.repository.packs import BlobLocation, pack_name
from imgbackup.repository.repo import Repository

COALESCE_GAP = 64 << 10   # reading over a gap this small is cheaper than a second request
MAX_RANGE = 64 << 20      # one merged read stays this size at most: bounded memory per request


def open_chunk(envelope: Envelope, id_key: bytes, chunk_id: bytes, blob: bytes, loc: BlobLocation,
               base: bytes | None = None) -> bytes:
    """Authenticate and decompress the blob at ``loc`` and check its plaintext against its id; a delta
    needs its base's plaintext ``base``. ChunkDamaged (naming the copy) if anything is wrong."""
    what = f"chunk {chunk_id.hex()[:16]}"

    def bad(message: str) -> ChunkDamaged:
        return ChunkDamaged(message, DamagedCopy(chunk_id, loc.pack_id, loc.offset, loc.length, "damaged", message))

    if loc.base is not None and base is None:
        raise ValueError(f"{what} is a delta: its base's plaintext is needed")
    try:
        plain = envelope.open(OBJ_CHUNK, chunk_id, blob, what, max_size=max(loc.raw_length, 1),
                              base=(loc.base, base) if loc.base is not None else None)
    except IntegrityError as exc:
        raise bad(exc.args[0]) from None
    if len(plain) != loc.raw_length or not hmac.compare_digest(scan.chunk_id(id_key, plain), chunk_id):
        raise bad(f"{what} does not match its id (wrong content)")
    return plain


class ChunkReader:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.index = repo.chunk_index()
        self.envelope = repo.envelope
        self.id_key = repo.keys.id_key
        self._reload_lock = threading.Lock()
        self.found: list[DamagedCopy] = []     # bad copies this reader met (recorded by its caller)
        self.transient: list[DamagedCopy] = [] # copies that read bad once and intact on a second read

    def locate(self, chunk_id: bytes) -> BlobLocation:
        loc = self.index.get(chunk_id)
        if loc is None:
            known = self.index.excluded.get(chunk_id)
            if known is not None:
                raise ChunkDamaged(f"chunk {chunk_id.hex()[:16]} has no usable copy: {known.describe()}",
                                   known, known=bool(known.found))
            raise ChunkDamaged(f"chunk {chunk_id.hex()[:16]} is referenced but not in any pack", None)
        return loc

    def _bad(self, chunk_id: bytes, loc: BlobLocation, reason: str, message: str) -> ChunkDamaged:
        return ChunkDamaged(message, DamagedCopy(chunk_id, loc.pack_id, loc.offset, loc.length, reason, message))

    def _index_changed(self) -> bool:
        """Whether another process replaced the index files (a delete or compact moved chunks);
        if so, reload it. A reader that finds a pack gone asks this once before calling it missing."""
        with self._reload_lock:
            if set(self.repo.storage.list("index")) == set(self.index.files):
                return False
            self.index = self.repo.reload_chunk_index()
            return True

    def read_blob(self, chunk_id: bytes, retry: bool = True) -> bytes:
        loc = self.locate(chunk_id)
        try:
            blob = self.repo.storage.get_range(pack_name(loc.pack_id), loc.offset, loc.length)
        except ObjectMissing:
            if retry and self._index_changed():
                return self.read_blob(chunk_id, retry=False)
            raise self._bad(chunk_id, loc, "missing", f"pack {loc.pack_id.hex()[:16]} holding chunk "
                            f"{chunk_id.hex()[:16]} is missing") from None
        if len(blob) != loc.length:
            raise self._bad(chunk_id, loc, "truncated",
                            f"pack {loc.pack_id.hex()[:16]} is truncated (chunk {chunk_id.hex()[:16]})")
        return blob

    def open_blob(self, chunk_id: bytes, blob: bytes, base: bytes | None = None,
                  loc: BlobLocation | None = None) -> bytes:
        """Authenticate and decompress one blob and check the plaintext against its id.

        A delta needs its base's plaintext: ``base`` when the caller has it, else it is read here.
        """
        loc = loc or self.locate(chunk_id)
        if loc.base is not None and base is None:
            base = self.read_whole(loc.base, chunk_id)
        return open_chunk(self.envelope, self.id_key, chunk_id, blob, loc, base)

    def read(self, chunk_id: bytes) -> bytes:
        """The chunk's plaintext; a copy that turns out bad is dropped and the next copy tried (also
        when a delta's base turns out to have no usable copy)."""
        while True:
            loc = self.locate(chunk_id)
            try:
                blob = self.read_blob(chunk_id)
                loc = self.locate(chunk_id)          # the index may have been reloaded meanwhile
                return self.open_blob(chunk_id, blob, loc=loc)
            except ChunkDamaged as exc:
                if exc.copy is None or exc.known:
                    raise
                if exc.copy.chunk_id == chunk_id:
                    bad = exc.copy
                elif loc.base is not None and loc.base not in self.index:    # its base is gone
                    bad = DamagedCopy(chunk_id, loc.pack_id, loc.offset, loc.length, "damaged", exc.args[0])
                else:
                    raise
                if not self._next_copy(bad, record=bad is exc.copy):
                    raise

    def still_bad(self, bad: DamagedCopy) -> bool:
        """Whether a second, fresh read of the copy ``bad`` fails too. A short read, a dropped
        connection or a flipped bit on the wire is not damage: only a copy that fails twice is
        dropped and put on record (a record is permanent until repair)."""
        loc = self.index.get(bad.chunk_id)
        if loc is None or (loc.pack_id, loc.offset) != (bad.pack_id, bad.offset):
            return True                              # not the copy handed out: nothing to re-check
        try:
            blob = self.repo.storage.get_range(pack_name(loc.pack_id), loc.offset, loc.length)
            if len(blob) != loc.length:
                return True
            base = self.read_whole(loc.base, bad.chunk_id) if loc.base is not None else None
            open_chunk(self.envelope, self.id_key, bad.chunk_id, blob, loc, base)
        except (IntegrityError, StorageError, ObjectMissing):
            return True
        with self._reload_lock:
            self.transient.append(bad)
        return False

    def _next_copy(self, bad: DamagedCopy, record: bool = True, confirmed: bool = False) -> bool:
        """Stop handing out ``bad`` (``record``: its own bytes are bad, so it goes on record) unless
        a fresh read of it succeeds; True when a copy of its chunk (another, or this one read again)
        can be tried."""
        if record and not confirmed and not self.still_bad(bad):
            return True
        with self._reload_lock:
            if record and all(c.key != bad.key for c in self.found):
                self.found.append(bad)
            self.index.exclude(bad, record=record)
            return bad.chunk_id in self.index

    def read_whole(self, base_id: bytes, for_id: bytes | None = None, blob: bytes | None = None) -> bytes:
        """A chunk that must be stored whole: the base of a delta (a base that is a delta is damage).
        ``blob``: its blob when the caller fetched it already."""
        if self.locate(base_id).base is not None:
            raise IntegrityError(f"the base {base_id.hex()[:16]} of chunk {(for_id or base_id).hex()[:16]} "
                                 "is itself a delta (the format allows depth one)")
        if blob is not None:
            try:
                return self.open_blob(base_id, blob)
            except ChunkDamaged as exc:
                if exc.copy is None or exc.known or not self._next_copy(exc.copy):
                    raise
        return self.read(base_id)

    def blobs_needed(self, chunk_id: bytes) -> list[bytes]:
        """The blobs that opening ``chunk_id`` reads: its own, and its base's when it is a delta."""
        loc = self.locate(chunk_id)
        return [chunk_id] if loc.base is None else [chunk_id, loc.base]

    def whole_base(self, chunk_id: bytes, blobs: Mapping[bytes, Callable[[], bytes]] | None = None
                   ) -> tuple[bytes, bytes]:
        """(id, plaintext) of the whole chunk a new delta of ``chunk_id``'s slot can be based on:
        the chunk itself, or its base when it is a delta (deltas stay depth one). ``blobs`` may hold
        blobs fetched ahead (id -> a callable returning the blob)."""
        loc = self.locate(chunk_id)
        base_id = chunk_id if loc.base is None else loc.base
        fetch = (blobs or {}).get(base_id)
        return base_id, self.read_whole(base_id, chunk_id, fetch() if fetch else None)

    def with_bases(self, chunk_ids: Iterable[bytes]) -> set[bytes]:
        """The chunks plus the bases their deltas need."""
        ids = set(chunk_ids)
        return ids | self.index.bases_of(ids)

    def blob_ranges(self, chunk_ids: Iterable[bytes]) -> Iterator[tuple[str, int, list[tuple[bytes, BlobLocation]]]]:
        """Group blobs by pack into large sorted ranges: (pack name, start, [(id, location)])."""
        by_pack: dict[bytes, list[tuple[bytes, BlobLocation]]] = {}
        for cid in chunk_ids:
            loc = self.locate(cid)
            by_pack.setdefault(loc.pack_id, []).append((cid, loc))
        for pack_id, items in by_pack.items():
            items.sort(key=lambda item: item[1].offset)
            group: list[tuple[bytes, BlobLocation]] = []
            for item in items:
                if group:
                    start = group[0][1].offset
                    end = group[-1][1].offset + group[-1][1].length
                    if item[1].offset - end > COALESCE_GAP or item[1].offset + item[1].length - start > MAX_RANGE:
                        yield pack_name(pack_id), start, group
                        group = []
                group.append(item)
            if group:
                yield pack_name(pack_id), group[0][1].offset, group

    def authenticate_all(self, chunk_ids: Iterable[bytes], pool: ThreadPoolExecutor,
                         progress=None) -> None:
        """Check every blob's AEAD tag (no decompression): the cheap pre-flight before a restore."""
        storage = self.repo.storage

        def check(job: tuple[str, int, list[tuple[bytes, BlobLocation]]]) -> int:
            name, start, group = job
            end = group[-1][1].offset + group[-1][1].length
            try:
                if storage.size(name) < end:
                    raise IntegrityError(f"pack {name.rsplit('/', 1)[1][:16]} is truncated")
                data = storage.get_range(name, start, end - start)
            except ObjectMissing:
                raise IntegrityError(f"pack {name.rsplit('/', 1)[1][:16]} is missing") from None
            view = memoryview(data)
            for cid, loc in group:
                blob = view[loc.offset - start : loc.offset - start + loc.length]
                self.envelope.authenticate(OBJ_CHUNK, cid, bytes(blob), f"chunk {cid.hex()[:16]}", loc.base)
            return len(data)

        for done in pool.map(check, list(self.blob_ranges(self.with_bases(chunk_ids)))):
            if progress:
                progress(done)

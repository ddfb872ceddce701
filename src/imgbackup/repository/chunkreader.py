"""Reading chunks back: locate, authenticate, decompress and check each against its id.

No byte leaves this module unauthenticated: the AEAD binds the chunk id, and the keyed hash of
the plaintext must equal that id again.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from imgbackup._core import scan
from imgbackup.crypto.envelope import Envelope
from imgbackup.errors import IntegrityError
from imgbackup.format.layout import OBJ_CHUNK
from imgbackup.repository.damage import ChunkDamaged, DamagedCopy
from imgbackup.repository.packs import BlobLocation, pack_name
from imgbackup.repository.repo import Repository
from imgbackup.repository.storage import ObjectMissing

COALESCE_GAP = 64 << 10   # reading over a gap this small is cheaper than a second request
MAX_RANGE = 64 << 20      # one merged read stays this size at most: bounded memory per request


def open_chunk(envelope: Envelope, id_key: bytes, chunk_id: bytes, blob: bytes, loc: BlobLocation) -> bytes:
    """Authenticate and decompress the blob at ``loc`` and check its plaintext against its id;
    ChunkDamaged (naming the copy) if anything is wrong."""
    what = f"chunk {chunk_id.hex()[:16]}"

    def bad(message: str) -> ChunkDamaged:
        return ChunkDamaged(message, DamagedCopy(chunk_id, loc.pack_id, loc.offset, loc.length, "damaged", message))

    try:
        plain = envelope.open(OBJ_CHUNK, chunk_id, blob, what, max_size=max(loc.raw_length, 1))
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

    def open_blob(self, chunk_id: bytes, blob: bytes, loc: BlobLocation | None = None) -> bytes:
        """Authenticate and decompress one blob and check the plaintext against its id."""
        return open_chunk(self.envelope, self.id_key, chunk_id, blob, loc or self.locate(chunk_id))

    def read(self, chunk_id: bytes) -> bytes:
        """The chunk's plaintext; a copy that turns out bad is dropped and the next copy tried."""
        while True:
            try:
                blob = self.read_blob(chunk_id)
                return self.open_blob(chunk_id, blob, self.locate(chunk_id))
            except ChunkDamaged as exc:
                if exc.copy is None or exc.known or not self._next_copy(exc.copy):
                    raise

    def _next_copy(self, bad: DamagedCopy) -> bool:
        """Stop handing out ``bad``; True when another copy of its chunk takes over."""
        with self._reload_lock:
            if all(c.key != bad.key for c in self.found):
                self.found.append(bad)
            self.index.exclude(bad)
            return bad.chunk_id in self.index

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
                self.envelope.authenticate(OBJ_CHUNK, cid, bytes(blob), f"chunk {cid.hex()[:16]}")
            return len(data)

        for done in pool.map(check, list(self.blob_ranges(set(chunk_ids)))):
            if progress:
                progress(done)

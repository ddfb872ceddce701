"""Reading chunks back: locate, authenticate, decompress and check each against its id.

No byte leaves this module unauthenticated: the AEAD binds the chunk id, and the keyed hash of
the plaintext must equal that id again.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from imgbackup._core import scan
from imgbackup.errors import IntegrityError
from imgbackup.format.layout import OBJ_CHUNK
from imgbackup.repository.packs import BlobLocation, pack_name
from imgbackup.repository.repo import Repository
from imgbackup.repository.storage import ObjectMissing

COALESCE_GAP = 64 << 10   # reading over a gap this small is cheaper than a second request
MAX_RANGE = 64 << 20      # one merged read stays this size at most: bounded memory per request


class ChunkReader:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.index = repo.chunk_index()
        self.envelope = repo.envelope
        self.id_key = repo.keys.id_key

    def locate(self, chunk_id: bytes) -> BlobLocation:
        loc = self.index.get(chunk_id)
        if loc is None:
            raise IntegrityError(f"chunk {chunk_id.hex()[:16]} is referenced but not in any pack")
        return loc

    def read_blob(self, chunk_id: bytes) -> bytes:
        loc = self.locate(chunk_id)
        try:
            blob = self.repo.storage.get_range(pack_name(loc.pack_id), loc.offset, loc.length)
        except ObjectMissing:
            raise IntegrityError(f"pack {loc.pack_id.hex()[:16]} holding chunk {chunk_id.hex()[:16]} is missing") from None
        if len(blob) != loc.length:
            raise IntegrityError(f"pack {loc.pack_id.hex()[:16]} is truncated (chunk {chunk_id.hex()[:16]})")
        return blob

    def open_blob(self, chunk_id: bytes, blob: bytes) -> bytes:
        """Authenticate and decompress one blob and check the plaintext against its id."""
        what = f"chunk {chunk_id.hex()[:16]}"
        loc = self.locate(chunk_id)
        plain = self.envelope.open(OBJ_CHUNK, chunk_id, blob, what, max_size=max(loc.raw_length, 1))
        if len(plain) != loc.raw_length or not hmac.compare_digest(scan.chunk_id(self.id_key, plain), chunk_id):
            raise IntegrityError(f"{what} does not match its id (wrong content)")
        return plain

    def read(self, chunk_id: bytes) -> bytes:
        return self.open_blob(chunk_id, self.read_blob(chunk_id))

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

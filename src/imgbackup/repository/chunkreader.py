"""Reading chunks back: locate, authenticate, decompress and check each against its id.

No byte leaves this module unauthenticated: the AEAD binds the chunk id (and a delta's base id),
and the keyed hash of the plaintext must equal that id again. A delta is opened against its base,
which is read (and checked against its own id) first; a base must be a whole chunk (depth one).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Iterator, Mapping
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

    def open_blob(self, chunk_id: bytes, blob: bytes, base: bytes | None = None) -> bytes:
        """Authenticate and decompress one blob and check the plaintext against its id.

        A delta needs its base's plaintext: ``base`` when the caller has it, else it is read here.
        """
        what = f"chunk {chunk_id.hex()[:16]}"
        loc = self.locate(chunk_id)
        with_base = None
        if loc.base is not None:
            with_base = (loc.base, base if base is not None else self.read_whole(loc.base, chunk_id))
        plain = self.envelope.open(OBJ_CHUNK, chunk_id, blob, what, max_size=max(loc.raw_length, 1),
                                   base=with_base)
        if len(plain) != loc.raw_length or not hmac.compare_digest(scan.chunk_id(self.id_key, plain), chunk_id):
            raise IntegrityError(f"{what} does not match its id (wrong content)")
        return plain

    def read(self, chunk_id: bytes) -> bytes:
        return self.open_blob(chunk_id, self.read_blob(chunk_id))

    def read_whole(self, base_id: bytes, for_id: bytes | None = None, blob: bytes | None = None) -> bytes:
        """A chunk that must be stored whole: the base of a delta (a base that is a delta is damage)."""
        if self.locate(base_id).base is not None:
            raise IntegrityError(f"the base {base_id.hex()[:16]} of chunk {(for_id or base_id).hex()[:16]} "
                                 "is itself a delta (the format allows depth one)")
        return self.open_blob(base_id, blob if blob is not None else self.read_blob(base_id))

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

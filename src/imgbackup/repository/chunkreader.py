"""Reading chunks back: locate, authenticate, decompress and check each against its id.

No byte leaves this module unauthenticated: the AEAD binds the chunk id (and a delta's base id),
and the keyed hash of the plaintext must equal that id again. A delta is opened against its base,
which is read (and checked against its own id) first; a base must be a whole chunk (depth one).

Reading many chunks (restore, verify, mount's read-ahead) goes by **groups**: blobs of one pack
that lie close together are fetched with one ranged read (``COALESCE_GAP``, at most ``MAX_RANGE``),
and several groups are fetched and opened at once on a pool — as many as the storage's
``read_parallelism`` — with the bytes in flight bounded (``READ_WINDOW``), so memory does not grow
with the image. On a bucket each request is a round trip: a restore then keeps several large GETs
in flight instead of waiting for one small GET per chunk. The bases of a group's deltas are
fetched together too (an incremental's bases are its parent's neighbouring chunks).
"""

from __future__ import annotations

import hmac
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from imgbackup._core import scan
from imgbackup.errors import IntegrityError
from imgbackup.format.layout import OBJ_CHUNK
from imgbackup.repository.packs import BlobLocation, pack_name
from imgbackup.repository.repo import Repository
from imgbackup.repository.storage import ObjectMissing

COALESCE_GAP = 64 << 10   # reading over a gap this small is cheaper than a second request
MAX_RANGE = 8 << 20       # one ranged read spans at most this: several fit in flight within the window
READ_WINDOW = 32 << 20    # bytes fetched ahead of a consumer: a bucket's latency hidden, memory bounded

Group = tuple[str, int, list[tuple[bytes, BlobLocation]]]   # pack name, first byte, the blobs in it
T = TypeVar("T")
J = TypeVar("J")


def group_end(group: Group) -> int:
    return group[2][-1][1].offset + group[2][-1][1].length


def group_cost(group: Group) -> int:
    """What a group holds in memory while in flight: its sealed bytes, its plaintexts, and the
    plaintexts of its deltas' bases (a base is a chunk of the same slot: about as long)."""
    return group_end(group) - group[1] + sum(loc.raw_length * (2 if loc.base is not None else 1)
                                             for _, loc in group[2])


def bounded_map(pool: ThreadPoolExecutor, fn: Callable[[J], T], jobs: Iterable[J],
                cost: Callable[[J], int], budget: int = READ_WINDOW, max_tasks: int = 64) -> Iterator[T]:
    """``fn`` over ``jobs`` on ``pool``, results in order, with at most ``budget`` (by ``cost``) and
    ``max_tasks`` jobs submitted and not yet consumed. A job larger than the budget runs alone."""
    pending: deque[tuple[Future, int]] = deque()
    held = 0
    try:
        for job in jobs:
            weight = cost(job)
            while pending and (held + weight > budget or len(pending) >= max_tasks):
                fut, w = pending.popleft()
                held -= w
                yield fut.result()
            pending.append((pool.submit(fn, job), weight))
            held += weight
        while pending:
            fut, w = pending.popleft()
            held -= w
            yield fut.result()
    finally:
        for fut, _ in pending:   # the consumer stopped or failed: do not start what is queued
            fut.cancel()


class ChunkReader:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.storage = repo.storage
        self.index = repo.chunk_index()
        self.envelope = repo.envelope
        self.id_key = repo.keys.id_key

    @property
    def parallelism(self) -> int:
        """Ranged reads worth having in flight on this storage."""
        return max(1, getattr(self.storage, "read_parallelism", 1))

    def locate(self, chunk_id: bytes) -> BlobLocation:
        loc = self.index.get(chunk_id)
        if loc is None:
            raise IntegrityError(f"chunk {chunk_id.hex()[:16]} is referenced but not in any pack")
        return loc

    def read_blob(self, chunk_id: bytes) -> bytes:
        loc = self.locate(chunk_id)
        try:
            blob = self.storage.get_range(pack_name(loc.pack_id), loc.offset, loc.length)
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

    # --- groups: several blobs of one pack in one ranged read ----------------------------------

    def fetch_group(self, group: Group) -> bytes:
        """The group's bytes in one ranged read; short when the pack is truncated (callers check
        each blob's bounds); a missing pack is damage."""
        name, start, _ = group
        try:
            return self.storage.get_range(name, start, group_end(group) - start)
        except ObjectMissing:
            raise IntegrityError(f"pack {name.rsplit('/', 1)[1][:16]} is missing") from None

    @staticmethod
    def blob_in(group: Group, data: bytes, cid: bytes, loc: BlobLocation) -> bytes:
        """One blob out of a fetched group; a pack that ended early is damage."""
        lo = loc.offset - group[1]
        if lo + loc.length > len(data):
            raise IntegrityError(f"pack {group[0].rsplit('/', 1)[1][:16]} is truncated (chunk {cid.hex()[:16]})")
        return data[lo:lo + loc.length]

    def open_group(self, group: Group) -> list[bytes]:
        """Fetch a group and open every blob in it (order kept); the first damaged blob raises."""
        data = self.fetch_group(group)
        blobs = {cid: self.blob_in(group, data, cid, loc) for cid, loc in group[2]}
        bases = self.open_bases({loc.base for _, loc in group[2] if loc.base is not None}, blobs)
        return [self.open_blob(cid, blobs[cid], bases.get(loc.base) if loc.base is not None else None)
                for cid, loc in group[2]]

    def open_bases(self, base_ids: set[bytes], have: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
        """The plaintexts of delta bases: from blobs already fetched (``have``), the rest read in
        coalesced groups (the bases of neighbouring deltas usually neighbour in the parent's pack)."""
        out = {b: self.read_whole(b, blob=have[b]) for b in base_ids if b in have}
        for group in self.blob_ranges(b for b in base_ids if b not in have):
            data = self.fetch_group(group)
            for cid, loc in group[2]:
                out[cid] = self.read_whole(cid, blob=self.blob_in(group, data, cid, loc))
        return out

    def groups_in_order(self, chunk_ids: Iterable[bytes]) -> Iterator[Group]:
        """Consecutive ids coalesced into groups, keeping their order (duplicates stay duplicates):
        what an in-order consumer (restore, a sequential reader) asks for."""
        name: str | None = None
        items: list[tuple[bytes, BlobLocation]] = []
        for cid in chunk_ids:
            loc = self.locate(cid)
            if items:
                last = items[-1][1]
                end = last.offset + last.length
                if (pack_name(loc.pack_id) != name or loc.offset < end or loc.offset - end > COALESCE_GAP
                        or loc.offset + loc.length - items[0][1].offset > MAX_RANGE):
                    yield name, items[0][1].offset, items
                    items = []
            name = pack_name(loc.pack_id)
            items.append((cid, loc))
        if items:
            yield name, items[0][1].offset, items

    def stream(self, chunk_ids: Iterable[bytes], pool: ThreadPoolExecutor,
               budget: int = READ_WINDOW) -> Iterator[bytes]:
        """The plaintexts of ``chunk_ids`` in order, fetched and opened ahead on ``pool`` in groups,
        with at most ``budget`` bytes in flight. Raises at the first damaged chunk."""
        for plains in bounded_map(pool, self.open_group, self.groups_in_order(chunk_ids), group_cost, budget):
            yield from plains

    def blob_ranges(self, chunk_ids: Iterable[bytes]) -> Iterator[Group]:
        """Group blobs by pack into large sorted ranges, order not kept: for checks of many chunks."""
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

    def check_group(self, group: Group, decode: bool = True) -> list[tuple[bytes, str | None, int]]:
        """(id, error or None, plaintext bytes) of each blob in a group; damage is reported per
        chunk, never raised. Without ``decode`` only the AEAD tag is checked (no decompression)."""
        try:
            data = self.fetch_group(group)
        except IntegrityError as exc:
            return [(cid, exc.args[0], 0) for cid, _ in group[2]]
        bases: dict[bytes, bytes] = {}
        if decode:
            try:
                bases = self.open_bases({loc.base for _, loc in group[2] if loc.base is not None}, {})
            except IntegrityError:   # a damaged base: each of its deltas reads it alone and says so
                bases = {}
        out = []
        for cid, loc in group[2]:
            try:
                blob = self.blob_in(group, data, cid, loc)
                if decode:
                    base = bases.get(loc.base) if loc.base is not None else None
                    out.append((cid, None, len(self.open_blob(cid, blob, base))))
                else:
                    self.envelope.authenticate(OBJ_CHUNK, cid, blob, f"chunk {cid.hex()[:16]}", loc.base)
                    out.append((cid, None, loc.raw_length))
            except IntegrityError as exc:
                out.append((cid, exc.args[0], 0))
        return out

    def check_all(self, chunk_ids: Iterable[bytes], pool: ThreadPoolExecutor, decode: bool = True
                  ) -> Iterator[tuple[bytes, str | None, int]]:
        """``check_group`` over every chunk and the bases its deltas need (each once), groups fetched
        in parallel, memory bounded."""
        def cost(group: Group) -> int:
            return group_cost(group) if decode else group_end(group) - group[1]

        for results in bounded_map(pool, lambda g: self.check_group(g, decode),
                                   self.blob_ranges(self.with_bases(chunk_ids)), cost):
            yield from results

    def authenticate_all(self, chunk_ids: Iterable[bytes], pool: ThreadPoolExecutor,
                         progress=None) -> None:
        """Check every blob's AEAD tag (no decompression): the cheap pre-flight before a restore.
        The first damaged chunk raises."""
        for _cid, error, size in self.check_all(chunk_ids, pool, decode=False):
            if error is not None:
                raise IntegrityError(error)
            if progress:
                progress(size)

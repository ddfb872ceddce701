"""Before a backup names a chunk it found in the index, make sure the chunk's pack still exists.

A collection never deletes a copy a live backup may use (docs/FORMAT.md section 16), so what this
catches is loss outside the protocol: a pack deleted by hand, by a bucket lifecycle rule, or lost by
the storage. The check asks only about the packs this image will use (the copy handed out for each
chunk its data slots name, and for the base of each delta among them) — never about the packs of
other hosts' images, so a backup's work does not grow with the fleet: per pack a ``size`` request
(HEAD), or one listing of ``packs/`` when the repository holds few packs beside these (a single host:
one LIST page answers for 1,000 packs).

A pack that is gone may have been rewritten by a compaction after this backup loaded its index (new
index files are stored before old packs are deleted, FORMAT.md section 9): its chunks are looked up
in the index as it is now and handed out from their new packs, which are checked in turn. Only a
copy with nowhere else to go is *missing*: it is dropped (a spare copy takes over) and put on record.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from imgbackup.errors import IntegrityError
from imgbackup.format.layout import ID_SIZE
from imgbackup.repository.chunkindex import ChunkIndex
from imgbackup.repository.damage import DamagedCopy
from imgbackup.repository.indexfile import INDEX_FOLDER
from imgbackup.repository.packs import pack_name
from imgbackup.repository.storage import Storage

LIST_PAGE = 1000            # keys in one LIST response (the S3 maximum): one request answers for 1,000 packs
HEADS_PER_PAGE = 60         # pages come one after another, HEADs in parallel: on SeaweedFS here one page of
                            # 1,000 keys took 128-153 ms, as long as 52-72 HEADs (4 or 16 at a time alike)
MAX_ROUNDS = 8              # each round drops at least one copy; more rounds mean packs vanish as we look
NO_PACK = bytes(ID_SIZE)
_PACK_NAME = re.compile(r"[0-9a-f]{64}")


class PackCheck:
    """Confirms the packs a backup's image will use; remembers what it confirmed across calls."""

    def __init__(self, storage: Storage, index: ChunkIndex,
                 reload: Callable[[], ChunkIndex] | None = None) -> None:
        self.storage = storage
        self.index = index
        self.reload = reload                  # a fresh index, for copies a compaction moved
        self.present: set[bytes] = set()      # packs confirmed to exist
        self.gone: set[bytes] = set()         # packs confirmed absent
        self.moved = 0                        # copies found at a new place
        self.missing = 0                      # copies dropped as missing
        self.listed = False                   # the check used one listing of packs/
        self.heads = 0                        # size requests made
        self._listing: set[bytes] | None = None
        self._fresh: ChunkIndex | None = None

    def confirm(self, ids: np.ndarray) -> None:
        """Make every copy handed out for the (m, 32) ``ids`` (and their delta bases) lie in a pack
        confirmed to exist; drop the copies that do not. Chunks left with no copy are then absent
        from the index: the caller stores them again."""
        ids = _unique(ids)
        for _ in range(MAX_ROUNDS):
            wanted = _unique(np.concatenate([ids, self.index.delta_bases(ids)]))
            packs = self.index.copy_packs(wanted)
            unknown = {p for p in map(bytes, _unique(packs)) if p != NO_PACK and p not in self.present}
            if not unknown:
                return
            gone = self._absent(unknown)
            if not gone:
                return
            hit = np.array([bytes(p) in gone for p in packs], bool)
            self._move_or_drop(wanted[hit])
        raise IntegrityError("packs of this repository keep disappearing while a backup checks them",
                             "stop whatever deletes objects in the repository, then run 'imgbackup verify'")

    def _absent(self, packs: set[bytes]) -> set[bytes]:
        """Which of ``packs`` do not exist: one listing of packs/ if that is cheaper, else a HEAD each."""
        if self._listing is None and len(self.index.table.packs) <= len(packs) * LIST_PAGE // HEADS_PER_PAGE:
            self._listing = {bytes.fromhex(tail) for name in self.storage.list("packs")
                             if _PACK_NAME.fullmatch(tail := name.rsplit("/", 1)[-1])}   # not temp files
            self.listed = True
        if self._listing is not None:
            exists = {p: p in self._listing for p in packs}
        else:
            workers = max(1, int(getattr(self.storage, "read_parallelism", 1)))
            order = sorted(packs)
            with ThreadPoolExecutor(min(workers, len(order)), thread_name_prefix="imgbackup-packcheck") as pool:
                found = list(pool.map(lambda p: self.storage.exists(pack_name(p)), order))
            self.heads += len(order)
            exists = dict(zip(order, found, strict=True))
        gone = {p for p, ok in exists.items() if not ok}
        self.present.update(p for p, ok in exists.items() if ok)
        self.gone |= gone
        return gone

    def _move_or_drop(self, chunk_ids: np.ndarray) -> None:
        fresh = self._fresh_index()
        for row in chunk_ids:
            cid = row.tobytes()
            loc = self.index.get(cid)
            if loc is None or loc.pack_id not in self.gone:
                continue
            moved = fresh.get(cid) if fresh is not None else None
            if moved is not None and moved.pack_id not in self.gone:
                self.index.relocate(cid, moved)
                self.moved += 1
                continue
            self.index.exclude(DamagedCopy(cid, loc.pack_id, loc.offset, loc.length, "missing",
                                           f"pack {loc.pack_id.hex()[:16]} is not in the repository"))
            self.missing += 1

    def _fresh_index(self) -> ChunkIndex | None:
        """The index as it is now, if its files changed since ours was loaded (loaded once)."""
        if (self._fresh is None and self.reload is not None
                and set(self.storage.list(INDEX_FOLDER)) != set(self.index.files)):
            self._fresh = self.reload()
        return self._fresh


def _unique(ids: np.ndarray) -> np.ndarray:
    ids = np.ascontiguousarray(ids, np.uint8).reshape(-1, ID_SIZE)
    if not len(ids):
        return ids
    return np.unique(ids.view(np.void(ID_SIZE)).ravel()).view(np.uint8).reshape(-1, ID_SIZE)

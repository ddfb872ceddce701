"""S3 Object Lock from the engines' side: the lock probe (recorded in the catalog), lock periods that fit
a retention policy, lock extension for what the images still need, and S3 legal holds for held images.

Every object is written locked for the repository's lock period. Images often outlive that (a
yearly image is kept for years, and new images keep using old packs), so prune and compact extend
the locks of everything the images need to "now + one period" whenever the last extension's date is
less than three quarters of a period ahead: between two prunes no needed object's lock runs out, as
long as prune (or compact) runs at least every quarter period. Objects being removed are never
extended; their delete is refused until their date and a later prune removes them.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from imgbackup.engine.retention import RetentionPolicy
from imgbackup.errors import ImageNotFound, IntegrityError, ObjectMissing, UnsupportedFormat, UsageError
from imgbackup.repository.catalog import CATALOG, CatalogView, entry_name
from imgbackup.repository.chunkids import ChunkIds
from imgbackup.repository.holds import HOLDS
from imgbackup.repository.images import image_name
from imgbackup.repository.marks import gc_grace
from imgbackup.repository.packs import pack_name
from imgbackup.repository.repo import Repository

if TYPE_CHECKING:
    from imgbackup.repository.chunkindex import ChunkIndex

MIN_LOCK_DAYS = 1         # shorter protects nothing against an attack noticed the next morning
EXTEND_BELOW = 0.75       # extend once the last extension's date is less than this many periods ahead
THREADS = 16              # retention and legal-hold requests in flight (one object each, no batch API)
TEST_SECONDS = "IMGBACKUP_TEST_LOCK_SECONDS"   # tests only: a lock period in seconds instead of days


def locking(repo: Repository) -> bool:
    return bool(repo.config.object_lock) and hasattr(repo.storage, "lock_probe")


def lock_seconds(days: int) -> int:
    """The lock period for ``--lock-days`` (the test knob gives seconds instead)."""
    if os.environ.get(TEST_SECONDS):
        return int(os.environ[TEST_SECONDS])
    least = math.ceil(MIN_LOCK_DAYS + gc_grace() / 86400)
    if days < least:
        raise UsageError(f"--lock-days must be at least {least} ({MIN_LOCK_DAYS} plus the collection's grace "
                         f"period of {gc_grace():.0f} s)")
    return int(days) * 86400


def check_lock_period(repo: Repository, policy: RetentionPolicy) -> None:
    """Refuse a policy whose keep-within span plus the collection's grace is longer than the lock period:
    an image that rule promises to keep, and an old chunk a new backup reuses during the grace, would
    lose their locks while still kept if prune stopped running (an attacker's first move)."""
    if not repo.config.object_lock:
        return
    have = repo.config.object_lock["seconds"]
    need = policy.longest_within() + gc_grace()
    if have < need:
        raise UsageError(f"the repository's lock period ({_days(have)}) is shorter than this policy's keep-within "
                         f"span plus the collection grace ({_days(need)}): images the policy keeps could lose "
                         "their lock", "use a shorter keep-within, or a repository with a longer --lock-days")


def _days(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds:.0f} s"


def run_probe(repo: Repository) -> dict | None:
    """Probe the server (a canary that must resist deletion and retention shortening); the result goes
    into the catalog, where ``info`` shows it. None for a repository without Object Lock."""
    if not locking(repo):
        return None
    result = repo.storage.lock_probe(repo.config.object_lock["mode"])   # type: ignore[attr-defined]
    repo.catalog.append([{"event": "lock_probe", "result": result}])
    return result


def lock_status(repo: Repository, view: CatalogView) -> dict | None:
    """What ``info`` says about immutability — never more than the last probe showed."""
    lock = repo.config.object_lock
    if not lock:
        return None
    probe = view.state.lock_probe
    enforced = bool(probe and probe.get("passed"))
    return {"mode": lock["mode"], "seconds": lock["seconds"], "days": round(lock["seconds"] / 86400, 3),
            "enforced": enforced, "last_probe": probe, "locks_extended_until": view.state.locks_extended,
            "bypassable": lock["mode"] == "governance"}


def _in_parallel(call, names: list[str]) -> int:
    def one(name: str) -> bool:
        try:
            return call(name) is not False
        except ObjectMissing:
            return False

    if not names:
        return 0
    with ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="imgbackup-lock") as pool:
        return sum(pool.map(one, names))


def objects_of(repo: Repository, image_ids, view: CatalogView, notes: list[str]) -> set[str]:
    """Every object the images need to be read: config, keys, their indexes, packs, catalog entries
    and hold records."""
    names = {"config", *repo.storage.list("keys")}
    index = repo.chunk_index()
    for image_id in image_ids:
        names.add(image_name(image_id))
        names.update(entry_name(seq) for seq in view.state.images.get(image_id, {}).get("seqs", []))
        names.update(repo.storage.list(f"{HOLDS}/{image_id}"))
        try:
            chunks = repo.images.load(image_id).unique_ids()
        except (ImageNotFound, IntegrityError, UnsupportedFormat) as exc:
            notes.append(f"image {image_id[:12]}: its index cannot be read ({exc.args[0]}), so its packs are not "
                         "under S3 legal hold")
            continue
        names.update(packs_of(repo, np.frombuffer(b"".join(chunks), np.uint8).reshape(-1, 32), index))
    return names


def packs_of(repo: Repository, ids: np.ndarray, index: ChunkIndex | None = None) -> set[str]:
    """The names of the packs holding the copies handed out for the (m, 32) ``ids`` (one native lookup,
    not a Python object per chunk: a collection passes every needed chunk of the repository)."""
    index = repo.chunk_index() if index is None else index     # an empty index is falsy (len 0)
    packs = index.copy_packs(ids)
    if not len(packs):
        return set()
    unique = np.unique(packs.view(np.void(32)).ravel())
    return {pack_name(p.tobytes()) for p in unique if p.tobytes() != bytes(32)}


def sync_legal_holds(repo: Repository, released: tuple[str, ...] = ()) -> tuple[int, list[str]]:
    """Set the S3 legal hold on every object a held image needs, and clear it on what only the
    ``released`` images needed; (objects set, notes)."""
    if not locking(repo):
        return 0, []
    notes: list[str] = []
    view = repo.catalog.view()
    need = objects_of(repo, sorted(repo.held_images(view)), view, notes)
    storage = repo.storage
    count = _in_parallel(lambda n: storage.set_legal_hold(n, True), sorted(need))   # type: ignore[attr-defined]
    if released:
        free = objects_of(repo, released, view, notes) - need
        _in_parallel(lambda n: storage.set_legal_hold(n, False), sorted(free))   # type: ignore[attr-defined]
    return count, notes


def extend_locks(repo: Repository, needed_chunks: Iterable[bytes], skip: set[str], force: bool = False) -> int:
    """Move the lock of everything the images need out to now + one period, when due; the objects extended."""
    if not locking(repo):
        return 0
    view = repo.catalog.view()
    seconds = repo.config.object_lock["seconds"]
    now = time.time()
    last = view.state.locks_extended
    if not force and last is not None and last - now > EXTEND_BELOW * seconds:
        return 0
    storage = repo.storage
    removed = {i for i, r in view.state.images.items() if r["status"] == "removed"}
    live = [i for i in repo.images.ids() if i not in removed]
    names = {"config", *storage.list("keys"), *map(image_name, live), *storage.list(CATALOG),
             *storage.list("index")}
    standing = set(live)
    names.update(n for n in storage.list(HOLDS) if n.split("/", 2)[1] in standing)   # one listing, not one per image
    names.update(packs_of(repo, ChunkIds.of(needed_chunks).ids))
    until = datetime.datetime.fromtimestamp(now + seconds, datetime.UTC)
    count = _in_parallel(lambda n: storage.extend_retention(n, until), sorted(names - skip))  # type: ignore[attr-defined]
    repo.catalog.append([{"event": "locks_extended", "until": now + seconds, "objects": count}])
    return count

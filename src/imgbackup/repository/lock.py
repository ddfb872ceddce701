"""Who may write: many backups at once, one remover at a time — each under a lease (lease.py).

- A **session** (``locks/session-<32 hex>``) is a backup's lease (or a copy's into this repository). Any number run at once, from any
  hosts; none waits for another or for a remover. Its ``started`` (storage clock) is what garbage
  collection compares with its marks (docs/FORMAT.md, "Garbage collection in two phases").
- The **exclusive lease** (``locks/exclusive``, created only if absent) is held by the commands
  that remove data: delete, prune, compact, repair. They exclude each other, not backups.

Whoever starts clears the dead leases it finds. A dead exclusive lease is replaced through a claim:
the taker first creates (if absent) ``locks/takeover-H`` named after the dead lease's exact bytes;
only the claim's winner deletes the lease, and only if it still holds those bytes, so no one ever
deletes a lease that replaced the dead one. A claim that outlives a lease lifetime belongs to a taker
that died; it is cleared like a dead lease.
"""

from __future__ import annotations

import hashlib
import random
import time

from imgbackup import audit
from imgbackup.errors import RepositoryFull, RepositoryLocked, StorageError
from imgbackup.repository.lease import (
    CLOCK_TOLERANCE,
    Lease,
    LeaseInfo,
    LeaseState,
    judge,
    lease_seconds,
    skew_warning,
)
from imgbackup.repository.storage import ObjectMissing, Storage

LOCK_FOLDER = "locks"
SESSION_PREFIX = "locks/session-"
EXCLUSIVE_NAME = "locks/exclusive"
CLAIM_PREFIX = "locks/takeover-"
LOCK_NAME = EXCLUSIVE_NAME
MAX_POLL = 5.0           # seconds between looks at a held lease while --lock-wait waits
RESERVE_NAME = "locks/reserve"
RESERVE_BYTES = 256 << 10   # held back from the disk so delete/compact can start on a full one: the lease
                            # itself, a damage record and a small index fit in it


def _new(storage: Storage, kind: str, command: str, ttl: float | None) -> Lease:
    now = storage.now()                      # before the write: a start never looks later than it was
    info = LeaseInfo.mine(kind, command, now, ttl or lease_seconds())
    name = EXCLUSIVE_NAME if kind == "exclusive" else SESSION_PREFIX + info.id
    lease = Lease(storage, name, info)
    warning = skew_warning(storage, now)
    if warning:
        lease.warnings.append(warning)
    return lease


def leases(storage: Storage, prefix: str = SESSION_PREFIX) -> list[LeaseState]:
    """Every lease under ``prefix`` as judged now (one clock reading for all of them)."""
    names = [n for n in storage.list(LOCK_FOLDER) if n.startswith(prefix)]
    if not names:
        return []
    now = storage.now()
    return [state for state in (judge(storage, n, now) for n in names) if state is not None]


def clear_dead(storage: Storage, keep: str = "") -> list[LeaseState]:
    """Delete the dead sessions and abandoned takeover claims; returns what was deleted."""
    cleared = []
    for state in leases(storage, SESSION_PREFIX) + leases(storage, CLAIM_PREFIX):
        if state.name != keep and not state.alive:
            storage.delete(state.name)
            cleared.append(state)
    return cleared


def open_session(storage: Storage, command: str, ttl: float | None = None) -> Lease:
    """Start a backup's lease (shared: never waits) and clear the dead ones it finds."""
    lease = _new(storage, "backup", command, ttl)
    storage.put(lease.name, lease.body)
    lease.written()
    try:
        clear_dead(storage, keep=lease.name)
    except BaseException:
        lease.release()
        raise
    return lease


def take_exclusive(storage: Storage, command: str, wait: float = 0.0, ttl: float | None = None,
                   may_use_reserve: bool = False, audit_fields: dict | None = None) -> Lease:
    """Take the exclusive lease, waiting up to ``wait`` seconds while another process holds it.

    ``may_use_reserve`` (commands that free space): when the disk is too full to create the lease,
    delete the reserve object first — it holds no data, so anyone may — and create it again on
    release, once space was freed."""
    deadline = time.monotonic() + max(wait, 0.0)
    attempts = 0
    while True:
        lease = _new(storage, "exclusive", command, ttl)
        if _create(storage, lease.body, may_use_reserve):
            if may_use_reserve:
                lease.before_release = lambda: put_reserve(storage)
            lease.written()
            try:
                clear_dead(storage)
            except BaseException:
                lease.release()
                raise
            return lease
        state = judge(storage, EXCLUSIVE_NAME)
        if state is None:
            continue                      # released in between
        if not state.alive:
            _take_over(storage, state, lease.body, command, audit_fields or {})
            attempts += 1
            if attempts > 20:
                raise RepositoryLocked("could not take the repository lock (it changes hands too fast)")
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            expires = max(state.ttl - state.age, 0)
            raise RepositoryLocked(
                f"repository is locked by {state.describe()}",
                f"wait for it to finish, or pass --lock-wait SECONDS; if that process is gone, its lease clears "
                f"itself {expires:.0f} s from now (or run 'imgbackup break-lock')")
        time.sleep(min(left, MAX_POLL, max(state.ttl / 10, 0.2)) * random.uniform(0.5, 1.0))


def _create(storage: Storage, body: bytes, may_use_reserve: bool) -> bool:
    try:
        return storage.create(EXCLUSIVE_NAME, body)
    except RepositoryFull:
        if not may_use_reserve or not storage.exists(RESERVE_NAME):
            raise
        storage.delete(RESERVE_NAME)
        return storage.create(EXCLUSIVE_NAME, body)


def put_reserve(storage: Storage) -> None:
    """(Re)create the reserve object if it is missing and there is room; never fails. Only on a
    storage that can run full (a bucket has no such limit)."""
    if not storage.fills_up:
        return
    try:
        if not storage.exists(RESERVE_NAME):
            storage.put(RESERVE_NAME, bytes(RESERVE_BYTES))
    except StorageError:
        pass


def _take_over(storage: Storage, dead: LeaseState, mine: bytes, command: str = "",
               audit_fields: dict | None = None) -> None:
    """Delete the dead lease if this process wins the claim to do so."""
    claim = CLAIM_PREFIX + hashlib.sha256(dead.raw).hexdigest()[:32]
    if not storage.create(claim, mine):
        other = judge(storage, claim)
        if other is not None and other.age > other.ttl + CLOCK_TOLERANCE:
            storage.delete(claim)         # its taker died between its claim and its delete
        else:
            time.sleep(0.005 + random.random() * 0.02)   # another taker is at work
        return
    try:
        if storage.get(EXCLUSIVE_NAME) == dead.raw:
            storage.delete(EXCLUSIVE_NAME)
            audit.emit("lock_takeover", **(audit_fields or {}), holder=dead.describe(), taken_for=command)
    except ObjectMissing:
        pass
    finally:
        storage.delete(claim)


def break_lock(storage: Storage, sessions: bool = False) -> list[LeaseState]:
    """Remove the exclusive lease and every takeover claim, whoever holds them (and with ``sessions``
    every backup's lease too: a live backup then stops, committing nothing); returns what was removed."""
    removed = []
    prefixes = (EXCLUSIVE_NAME, CLAIM_PREFIX) + ((SESSION_PREFIX,) if sessions else ())
    for prefix in prefixes:
        for state in leases(storage, prefix):
            storage.delete(state.name)
            removed.append(state)
    return removed

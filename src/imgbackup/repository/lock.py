"""The exclusive repository lock: an object created only if absent, naming its holder.

A lock left by a process that is gone (same host, and the pid is dead, was reused, or the
machine rebooted since) is stale and taken over. A lock from another host is never broken
automatically: ``imgbackup break-lock`` does that when a person knows the holder is gone.

Taking over is a race when several processes find the same stale lock: deleting after a
check could remove the lock another taker has just created. So a taker first creates (if
absent) a claim object named after the stale lock's exact bytes; only the one that wins the
claim deletes the lock, and only if it still holds those bytes. Every other taker sees the
claim fail and starts over. Nothing but a claim winner ever deletes a stale lock, so the
re-check cannot be overtaken.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass

from imgbackup import audit
from imgbackup.errors import IntegrityError, RepositoryFull, RepositoryLocked, StorageError
from imgbackup.format import validate as v
from imgbackup.repository.storage import ObjectMissing, Storage

LOCK_NAME = "locks/exclusive"
CLAIM_PREFIX = "locks/takeover-"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process start time in clock ticks since boot: tells a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@dataclass
class LockInfo:
    host: str
    pid: int
    since: float
    start_time: str
    boot_id: str
    command: str = ""

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        what = f" ({self.command})" if self.command else ""
        return f"pid {self.pid} on host {self.host}{what} since {when}"

    def is_stale(self) -> bool:
        if self.host != socket.gethostname():
            return False
        if self.boot_id and self.boot_id != _boot_id():
            return True
        current = _start_time(self.pid)
        return current == "" or current != self.start_time


RESERVE_NAME = "locks/reserve"
RESERVE_BYTES = 256 << 10   # held back from the disk so delete/compact can start on a full one: the lock
                            # itself, a damage record and a small index fit in it


class RepositoryLock:
    """Context manager holding the exclusive lock of one repository.

    ``may_use_reserve`` (commands that free space): when the disk is too full to create the lock,
    delete the reserve object first — it holds no data, so anyone may — and create it again on
    release, once space was freed."""

    def __init__(self, storage: Storage, command: str = "", may_use_reserve: bool = False,
                 repository: str | None = None, location: str | None = None) -> None:
        self.storage = storage
        self.command = command
        self.audit_fields = {"repository": repository, "location": location}   # for the takeover event
        self.held = False
        self.may_use_reserve = may_use_reserve

    def _mine(self) -> LockInfo:
        pid = os.getpid()
        return LockInfo(socket.gethostname(), pid, time.time(), _start_time(pid), _boot_id(), self.command)

    def holder(self) -> LockInfo | None:
        try:
            return _parse(self.storage.get(LOCK_NAME))
        except ObjectMissing:
            return None

    def acquire(self) -> None:
        mine = json.dumps(self._mine().__dict__).encode()
        for attempt in range(20):
            if attempt:
                time.sleep(0.005 * attempt)  # a takeover by another process is under way
            if self._create(mine):
                self.held = True
                return
            try:
                raw = self.storage.get(LOCK_NAME)
            except ObjectMissing:
                continue
            info = _parse(raw)
            if info.is_stale():
                self._take_over(raw, mine)
                continue
            raise RepositoryLocked(
                f"repository is locked by {info.describe()}",
                "wait for it to finish; if that process is gone, run 'imgbackup break-lock'",
            )
        raise RepositoryLocked("could not take the repository lock (it changes hands too fast)")

    def _create(self, mine: bytes) -> bool:
        try:
            return self.storage.create(LOCK_NAME, mine)
        except RepositoryFull:
            if not self.may_use_reserve or not self.storage.exists(RESERVE_NAME):
                raise
            self.storage.delete(RESERVE_NAME)
            return self.storage.create(LOCK_NAME, mine)

    def _take_over(self, stale: bytes, mine: bytes) -> None:
        """Delete the stale lock ``stale`` if this process wins the claim to do so."""
        claim = CLAIM_PREFIX + hashlib.sha256(stale).hexdigest()[:32]
        if not self.storage.create(claim, mine):
            try:
                other = _parse(self.storage.get(claim))
            except ObjectMissing:
                return
            if other.is_stale():
                raise RepositoryLocked(
                    f"a takeover of a stale repository lock by {other.describe()} was interrupted",
                    "run 'imgbackup break-lock' to clear it")
            return
        try:
            if self.storage.get(LOCK_NAME) == stale:
                self.storage.delete(LOCK_NAME)
                audit.emit("lock_takeover", **self.audit_fields, holder=_parse(stale).describe(),
                           taken_for=self.command)
        except ObjectMissing:
            pass
        finally:
            self.storage.delete(claim)

    def release(self) -> None:
        if self.held:
            if self.may_use_reserve:
                put_reserve(self.storage)
            self.storage.delete(LOCK_NAME)
            self.held = False

    def __enter__(self) -> RepositoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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


def _parse(raw: bytes) -> LockInfo:
    """The lock's JSON with every field's type checked (it is not sealed: anything may be in it); an
    unreadable one is held by "unknown" (never stale, so only break-lock removes it)."""
    what = LOCK_NAME
    try:
        doc = v.obj(v.parse_json(raw, what), what)
        return LockInfo(v.text(doc, "host", what), v.integer(doc, "pid", what, 0, 1 << 31),
                        v.number(doc, "since", what), v.text(doc, "start_time", what),
                        v.text(doc, "boot_id", what), v.text(doc, "command", what, optional=True) or "")
    except IntegrityError:
        return LockInfo("unknown", 0, 0.0, "", "", "unreadable lock file")


def break_lock(storage: Storage) -> LockInfo | None:
    """Remove the lock (and any interrupted takeover claims) whoever holds it; returns who held it."""
    info = RepositoryLock(storage).holder()
    storage.delete(LOCK_NAME)
    for name in storage.list("locks"):
        if name.startswith(CLAIM_PREFIX):
            storage.delete(name)
    return info

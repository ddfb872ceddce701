"""The exclusive repository lock: an object created only if absent, naming its holder.

A lock left by a process that is gone (same host, and the pid is dead, was reused, or the
machine rebooted since) is stale and taken over. A lock from another host is never broken
automatically: ``imgbackup break-lock`` does that when a person knows the holder is gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass

from imgbackup.errors import RepositoryLocked
from imgbackup.repository.storage import ObjectMissing, Storage

LOCK_NAME = "locks/exclusive"


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


class RepositoryLock:
    """Context manager holding the exclusive lock of one repository."""

    def __init__(self, storage: Storage, command: str = "") -> None:
        self.storage = storage
        self.command = command
        self.held = False

    def _mine(self) -> LockInfo:
        pid = os.getpid()
        return LockInfo(socket.gethostname(), pid, time.time(), _start_time(pid), _boot_id(), self.command)

    def holder(self) -> LockInfo | None:
        try:
            doc = json.loads(self.storage.get(LOCK_NAME))
            return LockInfo(**doc)
        except ObjectMissing:
            return None
        except (ValueError, TypeError):
            return LockInfo("unknown", 0, 0.0, "", "", "unreadable lock file")

    def acquire(self) -> None:
        mine = json.dumps(self._mine().__dict__).encode()
        for _ in range(3):
            if self.storage.create(LOCK_NAME, mine):
                self.held = True
                return
            info = self.holder()
            if info is None:
                continue
            if info.is_stale():
                self.storage.delete(LOCK_NAME)
                continue
            raise RepositoryLocked(
                f"repository is locked by {info.describe()}",
                "wait for it to finish; if that process is gone, run 'imgbackup break-lock'",
            )
        raise RepositoryLocked("could not take the repository lock (it changes hands too fast)")

    def release(self) -> None:
        if self.held:
            self.storage.delete(LOCK_NAME)
            self.held = False

    def __enter__(self) -> RepositoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def break_lock(storage: Storage) -> LockInfo | None:
    """Remove the lock whoever holds it; returns who held it."""
    info = RepositoryLock(storage).holder()
    storage.delete(LOCK_NAME)
    return info

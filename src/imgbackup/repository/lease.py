"""Leases: a writer's claim on a repository that dies by itself when its holder stops refreshing it.

A lease is an object under ``locks/`` naming its holder (host, pid, command, when it began) and how
long it lives unrefreshed (``ttl``). A heartbeat thread re-writes it every ``ttl/10``; a lease whose
last write is more than ``ttl`` old is dead, whichever host held it, and the next writer clears it.
Age is judged only by the storage's clock (``Storage.now()`` minus ``Storage.modified(name)``), never
by this host's: a host with a clock hours ahead cannot expire a live lease of another host.

The holder checks its own lease, by the same clock: each refresh compares the storage time of the
write with the one before. A gap of ``ttl`` or more (the process was stopped, the storage was
unreachable) means another writer may have judged the lease dead in between and acted on that, so
the lease is *lost*: ``check()`` and ``confirm()`` raise ``LeaseLost`` and the holder stops before it
commits anything. ``confirm()`` after a commit proves the commit happened while the lease was alive.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from imgbackup.errors import IntegrityError, RepositoryLocked, StorageError
from imgbackup.format import validate as v
from imgbackup.repository.storage import ObjectMissing, Storage

LEASE_SECONDS = 300.0    # a crashed host's lease clears itself this long after its last refresh
REFRESH_DIVISOR = 10     # refresh every ttl/10: nine refreshes in a row may fail before the lease is lost
CLOCK_TOLERANCE = 2.0    # S3 Date/Last-Modified are whole seconds, taken at different points of a request
SKEW_WARNING = 30.0      # seconds between this host's clock and the storage's worth a warning
MAX_TTL = 7 * 86400.0    # a lease claiming to live longer is judged by this (a forged one cannot block forever)
LEASE_VERSION = 1
RELEASE_WAIT = 10.0      # seconds a release waits for a refresh in flight before it deletes the lease anyway

log = logging.getLogger("imgbackup.storage")


def lease_seconds() -> float:
    """The lease lifetime: ``IMGBACKUP_LEASE_SECONDS`` (tests shorten it), else LEASE_SECONDS."""
    try:
        value = float(os.environ.get("IMGBACKUP_LEASE_SECONDS", LEASE_SECONDS))
    except ValueError:
        return LEASE_SECONDS
    return min(max(value, 3 * CLOCK_TOLERANCE), MAX_TTL)


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


def _elapsed() -> float:
    """Seconds on a clock that keeps running while the process is stopped or the machine sleeps."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class LeaseLost(RepositoryLocked):
    """This process's own lease expired or was cleared: others may have acted as if it were gone."""


@dataclass
class LeaseInfo:
    """What a lease object says (JSON)."""

    kind: str              # "backup" (shared: many at once) or "exclusive" (one remover at a time)
    id: str
    host: str
    pid: int
    command: str
    started: float         # storage clock, taken just before the lease was written
    started_local: float   # this host's clock then (for people; never used to judge anything)
    ttl: float
    start_time: str = ""   # /proc/PID/stat start time
    boot_id: str = ""
    version: int = LEASE_VERSION

    @classmethod
    def mine(cls, kind: str, command: str, started: float, ttl: float) -> LeaseInfo:
        pid = os.getpid()
        return cls(kind, os.urandom(16).hex(), socket.gethostname(), pid, command, started, time.time(), ttl,
                   _start_time(pid), _boot_id())

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started))
        what = f" ({self.command})" if self.command else ""
        return f"pid {self.pid} on host {self.host}{what} since {when}"

    def gone_on_this_host(self) -> bool:
        """Held by a process of this machine that no longer runs (or from before a reboot)."""
        if self.host != socket.gethostname() or not self.pid:
            return False
        if self.boot_id and self.boot_id != _boot_id():
            return True
        current = _start_time(self.pid)
        return current == "" or current != self.start_time


def parse_lease(raw: bytes, what: str = "lease") -> LeaseInfo | None:
    """The lease a JSON object describes, every field's type checked (it is not sealed: anything may be
    in it), or None for an unreadable one: that is judged by its object's age alone, so it clears
    itself like any other dead lease."""
    try:
        doc = v.obj(v.parse_json(raw, what), what)
        return LeaseInfo(
            kind=v.text(doc, "kind", what, choices=("backup", "exclusive")), id=v.text(doc, "id", what),
            host=v.text(doc, "host", what), pid=v.integer(doc, "pid", what, 0, 1 << 31),
            command=v.text(doc, "command", what, optional=True) or "", started=v.number(doc, "started", what),
            started_local=v.number(doc, "started_local", what, optional=True, default=0.0),
            ttl=v.number(doc, "ttl", what), start_time=v.text(doc, "start_time", what, optional=True) or "",
            boot_id=v.text(doc, "boot_id", what, optional=True) or "",
            version=v.integer(doc, "version", what, 1, 1 << 31, optional=True, default=LEASE_VERSION))
    except IntegrityError:
        return None


@dataclass
class LeaseState:
    """One lease as judged now: its object's age by the storage's clock, and whether it lives."""

    name: str
    info: LeaseInfo | None
    age: float
    raw: bytes

    @property
    def ttl(self) -> float:
        return min(max(self.info.ttl, 0.0), MAX_TTL) if self.info else lease_seconds()

    @property
    def alive(self) -> bool:
        if self.info is not None and self.info.gone_on_this_host():
            return False
        return self.age <= self.ttl + CLOCK_TOLERANCE

    def describe(self) -> str:
        who = self.info.describe() if self.info else f"an unreadable lease {self.name}"
        return f"{who}, refreshed {max(self.age, 0):.0f} s ago"


def judge(storage: Storage, name: str, now: float | None = None) -> LeaseState | None:
    """The lease ``name`` as it stands (None when it is gone). The clock is read first and the object's
    time last, so a refresh or a replacement in between makes the lease look younger, never older
    (and a dead lease's bytes are never paired with a live successor's age, or the other way round)."""
    now = storage.now() if now is None else now
    try:
        raw = storage.get(name)
        modified = storage.modified(name)
    except ObjectMissing:
        return None
    return LeaseState(name, parse_lease(raw, name), now - modified, raw)


def skew_warning(storage: Storage, storage_now: float) -> str | None:
    skew = time.time() - storage_now
    if abs(skew) <= SKEW_WARNING:
        return None
    way = "ahead of" if skew > 0 else "behind"
    text = (f"this host's clock is {abs(skew):.0f} s {way} the clock of {storage.location}; leases and garbage "
            "collection go by the storage's clock, but fix this one (timedatectl set-ntp true)")
    log.warning("%s", text)
    return text


class Lease:
    """A lease this process holds: written, refreshed by a heartbeat thread, released at the end."""

    def __init__(self, storage: Storage, name: str, info: LeaseInfo) -> None:
        self.storage = storage
        self.name = name
        self.info = info
        self.body = info.to_bytes()
        self.warnings: list[str] = []
        self.lost: str | None = None             # why the lease was lost, once it is
        self._last_write = 0.0                   # storage time of the last write of the lease
        self._last_ok = _elapsed()
        self._io = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.before_release: Callable[[], None] | None = None   # run while still held (the reserve, lock.py)

    @property
    def ttl(self) -> float:
        return self.info.ttl

    def written(self) -> None:
        """The lease object was just written: note its storage time and start the heartbeat."""
        try:
            self._last_write = self.storage.modified(self.name)
        except ObjectMissing:
            raise StorageError(f"storage acknowledged writing {self.name} but does not hold it",
                               "the storage loses acknowledged writes; do not use it for backups") from None
        self._last_ok = _elapsed()
        self._thread = threading.Thread(target=self._beat, name=f"imgbackup-lease-{self.info.kind}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = self.ttl / REFRESH_DIVISOR
        while not self._stop.wait(interval):
            try:
                self.refresh()
            except StorageError as exc:   # a passing outage: the next beat tries again
                log.warning("could not refresh the lease %s (%s)", self.name, exc)
                if _elapsed() - self._last_ok > self.ttl - CLOCK_TOLERANCE:
                    self._lose(f"it could not be refreshed for {_elapsed() - self._last_ok:.0f} s ({exc})")
            if self.lost:
                return

    def _lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            log.warning("lost the lease %s: %s", self.name, why)

    def refresh(self) -> None:
        """Write the lease again, unless it was cleared or replaced; lost when the write comes a ttl or
        more (storage time) after the previous one."""
        with self._io:
            if self.lost:
                return
            try:
                if self.storage.get(self.name) != self.body:
                    return self._lose("another process replaced it")
            except ObjectMissing:
                return self._lose("another process cleared it (break-lock, or it had expired)")
            self.storage.put(self.name, self.body)
            try:
                written = self.storage.modified(self.name)
            except ObjectMissing:
                return self._lose("the storage did not keep its refresh")
            gap = written - self._last_write
            if gap >= self.ttl - CLOCK_TOLERANCE:
                return self._lose(f"it went {gap:.0f} s without a refresh (the lease lives {self.ttl:.0f} s), "
                                  "so other writers may have judged it dead")
            self._last_write = written
            self._last_ok = _elapsed()

    def check(self) -> None:
        """Raise LeaseLost if the lease is lost; refreshes first when the last refresh is old (after a
        pause of this process the heartbeat may not have run yet)."""
        if self.lost is None and _elapsed() - self._last_ok > self.ttl / 2:
            self.refresh()
        self._raise_if_lost()

    def confirm(self) -> None:
        """Refresh now and raise LeaseLost unless the lease lived throughout: after a commit, this
        proves the commit happened while no one could have judged the lease dead."""
        self.refresh()
        self._raise_if_lost()

    def _raise_if_lost(self) -> None:
        if self.lost:
            raise LeaseLost(f"this process's repository lease {self.name} was lost: {self.lost}",
                            "nothing more was committed; run the command again")

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease (only if it is still this process's own)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(RELEASE_WAIT)   # a refresh riding out an outage must not hold up an exit
        if self.before_release is not None and self.lost is None:
            self.before_release()
        try:
            if self.storage.get(self.name) == self.body:
                self.storage.delete(self.name)
        except ObjectMissing:
            pass

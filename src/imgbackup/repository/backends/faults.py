"""Stand-ins that misbehave on purpose, wrapped around any backend: for fault-injection tests.

``FaultyStorage`` fails the Nth call (counted among the calls the fault applies to) the way real
storage fails: ENOSPC or EIO (as the directory backend reports them), a timeout (as the S3 backend
reports one after its retries), a commit that is acknowledged but silently dropped, a short read.
``BitFlipStorage`` flips one bit in what the Nth read returns. Both record every call, so a test can
run once to count the calls and then sweep N over all of them.
"""

from __future__ import annotations

import errno
import random
import threading
from collections.abc import Iterator

from imgbackup.errors import StorageError
from imgbackup.repository.backends.directory import _storage_error
from imgbackup.repository.storage import ObjectWriter, Storage

READS = ("get", "get_range")
COMMITS = ("put", "create", "commit")
ALL_CALLS = ("open_writer", "write", *COMMITS, *READS, "size", "exists", "list", "delete", "modified", "now")
FAULTS = {  # fault -> the calls it can hit
    "enospc": ALL_CALLS,
    "eio": ALL_CALLS,
    "timeout": ALL_CALLS,
    "drop": COMMITS,
    "short": READS,
}


class _Counted:
    """Counts the calls a fault applies to and says when the Nth (to ``at + times - 1``) is due."""

    def __init__(self, inner: Storage, applies: tuple[str, ...], at: int | None, times: int) -> None:
        self.inner = inner
        self.location = inner.location
        self.write_parallelism = inner.write_parallelism
        self.read_parallelism = inner.read_parallelism
        self.remote = inner.remote
        self.fills_up = inner.fills_up
        self.applies = applies
        self.at = at
        self.times = times
        self.calls: list[str] = []  # every call this wrapper saw, in order, with its object name
        self.count = 0
        self.fired = 0
        self._lock = threading.Lock()

    def _due(self, op: str, name: str) -> bool:
        with self._lock:
            self.calls.append(f"{op} {name}")
            if op not in self.applies:
                return False
            self.count += 1
            hit = self.at is not None and self.at <= self.count < self.at + self.times
            self.fired += hit
            return hit

    def remove_incomplete_writes(self, older_than: float = 0.0) -> int:
        return self.inner.remove_incomplete_writes(older_than)

    def incomplete_writes(self, older_than: float = 0.0) -> list[tuple[str, int]]:
        return self.inner.incomplete_writes(older_than)

    def prepare(self, folders: tuple[str, ...]) -> None:
        self.inner.prepare(folders)


class FaultyStorage(_Counted):
    def __init__(self, inner: Storage, fault: str = "eio", at: int | None = None, times: int = 1) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
        super().__init__(inner, FAULTS[fault], at, times)
        self.fault = fault

    def _fail(self, op: str, name: str) -> None:
        if self.fault == "enospc":
            raise _storage_error(OSError(errno.ENOSPC, "No space left on device"), name)
        if self.fault == "eio":
            raise _storage_error(OSError(errno.EIO, "Input/output error"), name)
        raise StorageError(f"storage {op} of {name} timed out (injected)")

    def _check(self, op: str, name: str) -> bool:
        """True when this call is to be dropped or cut short; raises for the failing faults."""
        if not self._due(op, name):
            return False
        if self.fault in ("drop", "short"):
            return True
        self._fail(op, name)
        return False

    def open_writer(self, name: str) -> ObjectWriter:
        self._check("open_writer", name)
        return _FaultyWriter(self, self.inner.open_writer(name), name)

    def put(self, name: str, data) -> None:
        if not self._check("put", name):
            self.inner.put(name, data)

    def create(self, name: str, data: bytes) -> bool:
        if self._check("create", name):
            return not self.inner.exists(name)  # acknowledged as created, but not stored
        return self.inner.create(name, data)

    def get(self, name: str) -> bytes:
        short = self._check("get", name)
        data = self.inner.get(name)
        return data[: len(data) // 2] if short else data

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        short = self._check("get_range", name)
        data = self.inner.get_range(name, offset, length)
        return data[: len(data) // 2] if short else data

    def size(self, name: str) -> int:
        self._check("size", name)
        return self.inner.size(name)

    def exists(self, name: str) -> bool:
        self._check("exists", name)
        return self.inner.exists(name)

    def list(self, prefix: str) -> Iterator[str]:
        self._check("list", prefix)
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self._check("delete", name)
        self.inner.delete(name)

    def modified(self, name: str) -> float:
        self._check("modified", name)
        return self.inner.modified(name)

    def now(self) -> float:
        self._check("now", "")
        return self.inner.now()


class _FaultyWriter:
    def __init__(self, storage: FaultyStorage, inner: ObjectWriter, name: str) -> None:
        self.storage = storage
        self.inner = inner
        self.name = name

    def write(self, data) -> None:
        self.storage._check("write", self.name)
        self.inner.write(data)

    def commit(self) -> None:
        if self.storage._check("commit", self.name):
            self.inner.abort()  # acknowledged, never stored
            return
        self.inner.commit()

    def abort(self) -> None:
        self.inner.abort()


class BitFlipStorage(_Counted):
    """Flips one bit (chosen by ``seed``) in what the Nth read returns; with ``every`` in every read
    (``at=None`` alone only counts)."""

    def __init__(self, inner: Storage, at: int | None = None, seed: int = 0, every: bool = False) -> None:
        super().__init__(inner, READS, at, 1)
        self.every = every
        self.flipped: list[str] = []  # the calls whose answer had a bit flipped
        self.flipped_bytes: list[tuple[str, int]] = []  # (object, offset in it) of each flipped byte
        self.random = random.Random(seed)

    def _maybe_flip(self, op: str, name: str, data: bytes, offset: int = 0) -> bytes:
        if not (self._due(op, name) or self.every) or not data:
            return data
        self.flipped.append(self.calls[-1])
        flipped = bytearray(data)
        bit = self.random.randrange(len(flipped) * 8)
        flipped[bit // 8] ^= 1 << (bit % 8)
        self.flipped_bytes.append((name.split()[0], offset + bit // 8))
        return bytes(flipped)

    def get(self, name: str) -> bytes:
        return self._maybe_flip("get", name, self.inner.get(name))

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        return self._maybe_flip("get_range", f"{name} {offset}+{length}", self.inner.get_range(name, offset, length),
                                offset)

    def open_writer(self, name: str) -> ObjectWriter:
        return self.inner.open_writer(name)

    def put(self, name: str, data) -> None:
        self.inner.put(name, data)

    def create(self, name: str, data: bytes) -> bool:
        return self.inner.create(name, data)

    def size(self, name: str) -> int:
        return self.inner.size(name)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def list(self, prefix: str) -> Iterator[str]:
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def modified(self, name: str) -> float:
        return self.inner.modified(name)

    def now(self) -> float:
        return self.inner.now()

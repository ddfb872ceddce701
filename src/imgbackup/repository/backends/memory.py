"""An in-process repository: a dict behind a lock. For tests (``memory://NAME``), never for backups."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import ClassVar

from imgbackup.errors import ObjectMissing
from imgbackup.repository.storage import check_name


class MemoryStorage:
    """Objects in a dict; the same semantics as the real backends, checked by the conformance suite.

    ``memory://NAME`` opens the process-wide store of that name, so a test can init, back up and
    reopen one repository through the same URLs the CLI uses."""

    write_parallelism = 1  # in-process: nothing to overlap
    read_parallelism = 2
    remote = False
    _named: ClassVar[dict[str, MemoryStorage]] = {}
    _named_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, location: str = "memory://", clock: Callable[[], float] = time.time) -> None:
        self.location = location
        self.fills_up = False
        self.objects: dict[str, bytes] = {}
        self.times: dict[str, float] = {}   # name -> when it was written, by ``clock``
        self.clock = clock                  # the storage's clock: tests set one to move time
        self._lock = threading.Lock()

    @classmethod
    def named(cls, name: str) -> MemoryStorage:
        with cls._named_lock:
            if name not in cls._named:
                cls._named[name] = cls(f"memory://{name}")
            return cls._named[name]

    @classmethod
    def forget(cls, name: str) -> None:
        with cls._named_lock:
            cls._named.pop(name, None)

    def open_writer(self, name: str) -> _MemoryObjectWriter:
        return _MemoryObjectWriter(self, check_name(name))

    def put(self, name: str, data) -> None:
        blob = bytes(data)
        with self._lock:
            self.objects[check_name(name)] = blob
            self.times[name] = self.clock()

    def create(self, name: str, data: bytes) -> bool:
        blob = bytes(data)
        with self._lock:
            if check_name(name) in self.objects:
                return False
            self.objects[name] = blob
            self.times[name] = self.clock()
            return True

    def get(self, name: str) -> bytes:
        with self._lock:
            try:
                return self.objects[check_name(name)]
            except KeyError:
                raise ObjectMissing(f"object {name} is missing") from None

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative range")
        return self.get(name)[offset : offset + length]

    def size(self, name: str) -> int:
        return len(self.get(name))

    def modified(self, name: str) -> float:
        with self._lock:
            if check_name(name) not in self.objects:
                raise ObjectMissing(f"object {name} is missing")
            return self.times.get(name, 0.0)

    def now(self) -> float:
        return self.clock()

    def exists(self, name: str) -> bool:
        with self._lock:
            return check_name(name) in self.objects

    def list(self, prefix: str) -> Iterator[str]:
        folder = prefix.strip("/")
        start = f"{folder}/" if folder else ""
        with self._lock:
            return iter(sorted(n for n in self.objects if n.startswith(start)))

    def delete(self, name: str) -> None:
        with self._lock:
            self.objects.pop(check_name(name), None)
            self.times.pop(name, None)

    def prepare(self, folders: tuple[str, ...]) -> None:
        pass  # names are keys: there are no folders

    def remove_incomplete_writes(self, older_than: float = 0.0) -> int:
        return 0  # an uncommitted writer holds its bytes in itself: nothing is left behind

    def incomplete_writes(self, older_than: float = 0.0) -> list[tuple[str, int]]:
        return []


class _MemoryObjectWriter:
    def __init__(self, storage: MemoryStorage, name: str) -> None:
        self.storage = storage
        self.name = name
        self._parts: list[bytes] | None = []

    def write(self, data) -> None:
        if self._parts is None:
            raise ValueError(f"writer of {self.name} is closed")
        self._parts.append(bytes(data))

    def commit(self) -> None:
        if self._parts is None:
            raise ValueError(f"writer of {self.name} is closed")
        parts, self._parts = self._parts, None
        self.storage.put(self.name, b"".join(parts))

    def abort(self) -> None:
        self._parts = None

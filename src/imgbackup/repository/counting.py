"""Counting requests at the storage seam: what each command asked of its storage, for ``--json``.

Every storage ``open_storage`` makes is wrapped in a ``CountingStorage``; a command's ``--json``
reports ``requests``: the operations of all storages the process opened, per kind (``get``,
``get_range``, ``put``, ``create``, ``stream`` = a streamed object committed, ``size``, ``exists``,
``list``, ``delete``, ``abort``, and the lease clock's ``modified`` and ``now``), their ``total``, and for a bucket ``http``: the HTTP requests
really sent (retries, listing pages, multipart parts and the create-if-absent probe included).
Request economy is tested against these numbers (``list`` of 1,000 images in a bucket is O(1)).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

from imgbackup.repository.storage import ObjectWriter, Storage

OPERATIONS = ("get", "get_range", "put", "create", "stream", "size", "exists", "list", "delete", "abort",
              "modified", "now")

_opened: list[CountingStorage] = []
_opened_lock = threading.Lock()


class CountingStorage:
    """Forwards every operation to ``inner`` and counts it (thread-safe)."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.location = inner.location
        self.write_parallelism = getattr(inner, "write_parallelism", 1)
        self.read_parallelism = getattr(inner, "read_parallelism", 1)
        self.remote = getattr(inner, "remote", False)
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        with _opened_lock:
            _opened.append(self)

    def _count(self, op: str, n: int = 1) -> None:
        with self._lock:
            self.counts[op] += n

    def requests(self) -> dict:
        """This storage's counts: per operation, ``total``, and ``http`` when the backend sends HTTP."""
        with self._lock:
            doc = {op: n for op, n in sorted(self.counts.items()) if n}
        doc["total"] = sum(doc.values())
        http = getattr(getattr(self.inner, "calls", None), "requests", None)
        if http is not None:
            doc["http"] = http
        return doc

    def open_writer(self, name: str) -> ObjectWriter:
        return _CountingWriter(self, self.inner.open_writer(name))

    def put(self, name: str, data) -> None:
        self._count("put")
        self.inner.put(name, data)

    def create(self, name: str, data: bytes) -> bool:
        self._count("create")
        return self.inner.create(name, data)

    def get(self, name: str) -> bytes:
        self._count("get")
        return self.inner.get(name)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        self._count("get_range")
        return self.inner.get_range(name, offset, length)

    def size(self, name: str) -> int:
        self._count("size")
        return self.inner.size(name)

    def exists(self, name: str) -> bool:
        self._count("exists")
        return self.inner.exists(name)

    def list(self, prefix: str) -> Iterator[str]:
        self._count("list")
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self._count("delete")
        self.inner.delete(name)

    def remove_incomplete_writes(self, older_than: float = 0.0) -> int:
        self._count("list")
        removed = self.inner.remove_incomplete_writes(older_than)
        self._count("abort", removed)
        return removed

    def incomplete_writes(self, older_than: float = 0.0) -> list[tuple[str, int]]:
        self._count("list")
        return self.inner.incomplete_writes(older_than)

    def modified(self, name: str) -> float:
        self._count("modified")
        return self.inner.modified(name)

    def now(self) -> float:
        self._count("now")
        return self.inner.now()

    def prepare(self, folders: tuple[str, ...]) -> None:
        self.inner.prepare(folders)

    def __getattr__(self, name: str):
        """Anything else a backend offers (an S3 bucket check, its endpoint) passes through; a listing
        with sizes (S3's ``list_sizes``) is counted as a list."""
        found = getattr(self.inner, name)
        if name != "list_sizes":
            return found

        def list_sizes(prefix: str) -> list[tuple[str, int]]:
            self._count("list")
            return found(prefix)
        return list_sizes


class _CountingWriter:
    def __init__(self, storage: CountingStorage, inner: ObjectWriter) -> None:
        self.storage = storage
        self.inner = inner

    def write(self, data) -> None:
        self.inner.write(data)

    def commit(self) -> None:
        self.storage._count("stream")
        self.inner.commit()

    def abort(self) -> None:
        self.inner.abort()


def merge(*docs: dict) -> dict:
    """Several storages' ``requests`` added up."""
    total: Counter[str] = Counter()
    for doc in docs:
        total.update(doc)
    return dict(sorted(total.items()))


def requests_made() -> dict:
    """Every storage this process opened, added up (the ``requests`` of a command's ``--json``)."""
    with _opened_lock:
        opened = list(_opened)
    return merge(*(s.requests() for s in opened)) if opened else {"total": 0}

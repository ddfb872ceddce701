"""Storage: whole named objects only, so a directory, a bucket and a test stand-in are interchangeable.

Operations (the conformance suite, tests/test_storage_conformance.py, pins each one down):
- ``put`` atomic replace; ``create`` create-if-absent (False when the name exists, exactly one of
  racing creators wins);
- ``open_writer``: an object written piece by piece that appears whole on ``commit`` or not at all
  (``abort`` leaves nothing);
- ``get``; ``get_range`` (short at the end of the object, empty past it); ``size``; ``exists``;
- ``list(prefix)``: every name under the folder ``prefix`` (all names for ``""``), sorted;
- ``delete`` (a missing object is fine); ``remove_incomplete_writes(older_than)`` (leftovers of killed
  writers: temp files, multipart uploads, untouched for ``older_than`` seconds of the storage's clock;
  call only under the exclusive lease: other writers' uploads in flight are younger);
- ``modified(name)``: when the object was last written, by the STORAGE's clock (Unix seconds), and
  ``now()``: that clock's time now. Leases and garbage collection judge age by these two only, never
  by this host's clock, so a host with a wrong clock cannot expire another host's lease;
- ``prepare(folders)`` at init: a directory creates its folders; a bucket has none to create.

Two tuning numbers belong to the storage, not to the engines: ``write_parallelism`` (objects a
writer keeps committing at once: 1 for a directory, where commits queue on one disk's fsync, more
for a bucket, where each PUT waits on a round trip) and ``read_parallelism`` (ranged reads a reader
keeps in flight). ``remote`` says whether each request costs a round trip (a bucket), which is what
local caches of immutable objects are for.

Object names are relative paths with '/' separators (``packs/ab/ab12...``). Backends raise only
the project's errors: ``ObjectMissing`` for a missing name, ``StorageError`` (exit 10) for the rest.

``open_storage(url)`` is the one place a location becomes a backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from imgbackup.errors import ObjectMissing, StorageError, UsageError

__all__ = ["ObjectMissing", "ObjectWriter", "Storage", "StorageError", "confirm_stored", "open_storage",
           "requests_made"]


class ObjectWriter(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


@runtime_checkable
class Storage(Protocol):
    location: str  # for messages and --json: never holds a secret
    write_parallelism: int
    read_parallelism: int
    remote: bool
    fills_up: bool  # a disk that can run full (a directory): it holds a reserve for the lock (lock.py)

    def open_writer(self, name: str) -> ObjectWriter: ...
    def put(self, name: str, data: bytes | bytearray | memoryview) -> None: ...
    def create(self, name: str, data: bytes) -> bool: ...
    def get(self, name: str) -> bytes: ...
    def get_range(self, name: str, offset: int, length: int) -> bytes: ...
    def size(self, name: str) -> int: ...
    def list(self, prefix: str) -> Iterator[str]: ...
    def delete(self, name: str) -> None: ...
    def exists(self, name: str) -> bool: ...
    def remove_incomplete_writes(self, older_than: float = 0.0) -> int: ...
    def incomplete_writes(self, older_than: float = 0.0) -> list[tuple[str, int]]: ...
    def modified(self, name: str) -> float: ...
    def now(self) -> float: ...
    def prepare(self, folders: tuple[str, ...]) -> None: ...


def check_name(name: str) -> str:
    """Refuse names that could escape a directory or that a bucket would rewrite (``a//b``, ``a/``)."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad object name {name!r}")
    return name


def object_sizes(storage: Storage, prefix: str) -> dict[str, int]:
    """Every name under the folder ``prefix`` with its size: from the listing itself where the storage
    gives sizes there (``list_sizes``: S3's ListObjectsV2 does, so no HEAD per object), else one
    ``size`` per name (a stat in a directory). A name deleted in between is left out."""
    listed = getattr(storage, "list_sizes", None)
    if listed is not None:
        return dict(listed(prefix))
    sizes = {}
    for name in storage.list(prefix):
        try:
            sizes[name] = storage.size(name)
        except ObjectMissing:
            continue
    return sizes


def confirm_stored(storage: Storage, name: str, size: int) -> None:
    """After a commit: the storage must hold ``size`` bytes under ``name``. A store that acknowledges a
    write it then does not keep (a lying server or cache) fails here, before anything refers to it."""
    try:
        held = storage.size(name)
    except ObjectMissing:
        held = -1
    if held != size:
        what = "does not hold it" if held < 0 else f"holds {held} bytes instead of {size}"
        raise StorageError(f"storage acknowledged writing {name} but {what}",
                           "the storage loses acknowledged writes; do not use it for backups")


def open_storage(url: str, *, for_writing: bool = False) -> Storage:
    """The backend for a repository location: a path or ``file://PATH`` (directory),
    ``s3://BUCKET/PREFIX`` (S3-compatible bucket), ``memory://NAME`` (in-process, for tests),
    wrapped in a ``CountingStorage`` (the ``requests`` of every command's ``--json``).

    ``for_writing`` lets a backend check, once, that it can keep the repository's promises
    (S3: the server honours create-if-absent)."""
    from imgbackup.repository.counting import CountingStorage

    return CountingStorage(_backend(url, for_writing))


def requests_made() -> dict:
    """Storage requests of this process so far, per operation (``--json`` ``requests``)."""
    from imgbackup.repository.counting import requests_made as made

    return made()


def _backend(url: str, for_writing: bool) -> Storage:
    if not url:
        raise UsageError("no repository given", "use -r/--repo or set IMGBACKUP_REPO")
    scheme, sep, rest = url.partition("://")
    if not sep:
        from imgbackup.repository.backends.directory import DirectoryStorage

        return DirectoryStorage(url)
    scheme = scheme.lower()
    if scheme == "file":
        from imgbackup.repository.backends.directory import DirectoryStorage

        if not rest.startswith("/"):
            raise UsageError(f"file:// needs an absolute path: {url!r}", "write file:///srv/backup")
        return DirectoryStorage(rest)
    if scheme == "memory":
        from imgbackup.repository.backends.memory import MemoryStorage

        return MemoryStorage.named(rest)
    if scheme == "s3":
        from imgbackup.repository.backends.s3 import S3Storage

        return S3Storage.from_url(url, for_writing=for_writing)
    raise UsageError(f"unknown repository scheme {scheme!r} in {url!r}",
                     "use a directory path, file://PATH or s3://BUCKET/PREFIX")

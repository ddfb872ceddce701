"""Storage backends deal in whole named objects only, so a directory and a bucket are interchangeable.

Operations: put (atomic replace), create (create-if-absent), get, get_range, size, list, delete,
and open_writer: an object written piece by piece that appears whole on commit or not at all (a
bucket backend buffers or uploads in parts; nothing is visible before commit).
Object names are relative paths with '/' separators (``packs/ab/ab12...``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from imgbackup.errors import RepositoryFull, StorageError

TEMP_MARK = ".tmp-"
LEFTOVER_FOLDERS = ("packs", "index", "images", "damage")  # not locks/: a racing lock creator owns its temp


class ObjectMissing(KeyError):
    """The named object does not exist."""


class ObjectWriter(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class Storage(Protocol):
    def open_writer(self, name: str) -> ObjectWriter: ...
    def put(self, name: str, data: bytes | bytearray | memoryview) -> None: ...
    def create(self, name: str, data: bytes) -> bool: ...
    def get(self, name: str) -> bytes: ...
    def get_range(self, name: str, offset: int, length: int) -> bytes: ...
    def size(self, name: str) -> int: ...
    def list(self, prefix: str) -> Iterator[str]: ...
    def delete(self, name: str) -> None: ...
    def exists(self, name: str) -> bool: ...


def _storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return RepositoryFull(f"repository disk is full while writing {what}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"no permission to write {what}: {exc.strerror}")
    return StorageError(f"storage error on {what}: {exc.strerror or exc}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage:
    """A repository in a local directory: temp file, fsync, rename, fsync directory."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).absolute()  # a later chdir (FUSE daemons do one) must not move it

    def _path(self, name: str) -> Path:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"bad object name {name!r}")
        return self.root / name

    def _make_dirs(self, directory: Path) -> list[Path]:
        """Create ``directory`` and missing parents; the folders whose entries changed (to fsync)."""
        if directory.is_dir():
            return []
        changed = self._make_dirs(directory.parent)
        try:
            directory.mkdir()
        except FileExistsError:
            return changed
        return [*changed, directory.parent]

    def open_writer(self, name: str) -> _LocalObjectWriter:
        path = self._path(name)
        try:
            return _LocalObjectWriter(self, path, name)
        except OSError as exc:
            raise _storage_error(exc, name) from None

    def _written(self, name: str, data) -> _LocalObjectWriter:
        writer = self.open_writer(name)
        try:
            writer.write(data)
        except BaseException:
            writer.abort()
            raise
        return writer

    def put(self, name: str, data) -> None:
        self._written(name, data).commit()

    def create(self, name: str, data: bytes) -> bool:
        """Create-if-absent; False when the object already exists."""
        return self._written(name, data).commit(replace=False)

    def get(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(name) from None
        except OSError as exc:
            raise _storage_error(exc, name) from None

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        try:
            with open(self._path(name), "rb", buffering=0) as f:
                return os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            raise ObjectMissing(name) from None
        except OSError as exc:
            raise _storage_error(exc, name) from None

    def size(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            raise ObjectMissing(name) from None

    def exists(self, name: str) -> bool:
        return self._path(name).exists()

    def list(self, prefix: str) -> Iterator[str]:
        """Names under the folder ``prefix`` (recursively), temp files excluded, sorted."""
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return iter(())
        names = []
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                if TEMP_MARK not in f:
                    names.append(os.path.relpath(os.path.join(dirpath, f), self.root).replace(os.sep, "/"))
        return iter(sorted(names))

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
            _fsync_dir(path.parent)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _storage_error(exc, name) from None

    def incomplete_writes(self, folders: tuple[str, ...] = LEFTOVER_FOLDERS) -> list[tuple[str, int]]:
        """Leftovers of interrupted writes (temp files): (path relative to the root, bytes)."""
        found = []
        for dirpath, _dirs, files in (w for folder in folders for w in os.walk(self.root / folder)):
            for f in files:
                if TEMP_MARK in f:
                    path = os.path.join(dirpath, f)
                    try:
                        found.append((os.path.relpath(path, self.root), os.lstat(path).st_size))
                    except FileNotFoundError:
                        continue
        return found

    def remove_temp_files(self, folders: tuple[str, ...] = LEFTOVER_FOLDERS) -> int:
        """Delete leftovers of interrupted writes; call only while holding the repository lock."""
        removed = 0
        for name, _size in self.incomplete_writes(folders):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / name)
                removed += 1
        return removed


class _LocalObjectWriter:
    """A temp file beside the object: written in pieces, then fsync, rename, fsync directory."""

    def __init__(self, storage: LocalStorage, path: Path, name: str) -> None:
        self._new_dirs = storage._make_dirs(path.parent)  # fsynced at commit, off the writer's thread
        self.path = path
        self.name = name
        self.tmp = path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise _storage_error(exc, self.name) from None

    def commit(self, replace: bool = True) -> bool:
        """Make the object durable under its name; with ``replace=False`` only if the name is
        free (a hard link, atomic): False when it exists."""
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            if replace:
                os.replace(self.tmp, self.path)
            else:
                try:
                    os.link(self.tmp, self.path)
                except FileExistsError:
                    self.abort()
                    return False
                self.tmp.unlink()
            for directory in [self.path.parent, *reversed(self._new_dirs)]:
                _fsync_dir(directory)
            return True
        except OSError as exc:
            self.abort()
            raise _storage_error(exc, self.name) from None

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.tmp.unlink(missing_ok=True)

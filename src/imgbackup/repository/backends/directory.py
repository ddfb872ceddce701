"""A repository in a local directory: temp file, fsync, rename (or link), fsync directory."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from imgbackup.errors import ObjectMissing, RepositoryFull, StorageError
from imgbackup.repository.backends.directory_access import (
    DIR_MODE,
    check_init_location,
    make_private_dir,
    set_private_file,
)
from imgbackup.repository.storage import check_name

TEMP_MARK = ".tmp-"
LEFTOVER_FOLDERS = ("packs", "index", "images", "damage", "gc")  # not locks/: a racing lock creator owns its temp


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


class DirectoryStorage:
    """Objects are files under ``root``; each name's folders are created when first written."""

    write_parallelism = 1  # commits queue on one disk's fsync: a second one in flight gains nothing (measured)
    remote = False

    def access_warnings(self) -> list[str]:
        """Key slots (or keys/) that group or others may read: ``verify`` warns (FORMAT.md 2.7)."""
        from imgbackup.repository.backends.directory_access import key_file_exposure

        return key_file_exposure(self.root)

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).absolute()  # a later chdir (FUSE daemons do one) must not move it
        self.location = str(self.root)
        # a read is a pread from the page cache or a local disk: one per core keeps the decrypting busy
        self.read_parallelism = os.cpu_count() or 2
        self.fills_up = True

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def _make_dirs(self, directory: Path) -> list[Path]:
        """Create ``directory`` and missing parents; the folders whose entries changed (to fsync)."""
        if directory.is_dir():
            return []
        changed = self._make_dirs(directory.parent)
        if not make_private_dir(directory):
            return changed
        return [*changed, directory.parent]

    def prepare(self, folders: tuple[str, ...]) -> None:
        """At init: refuse an unsafe place, then create the repository's folders (0700), so the layout
        is there to see from the start."""
        check_init_location(self.root)
        try:
            for folder in folders:
                self._make_dirs(self.root / check_name(folder))
            check_init_location(self.root)  # again: nobody slipped in a folder of their own meanwhile
            os.chmod(self.root, DIR_MODE)  # an empty folder the user made (or a mount point) becomes 0700 too
        except OSError as exc:
            raise _storage_error(exc, f"the repository folders in {self.root}") from None

    def open_writer(self, name: str) -> _DirectoryObjectWriter:
        path = self._path(name)
        try:
            return _DirectoryObjectWriter(self, path, name)
        except OSError as exc:
            raise _storage_error(exc, name) from None

    def _written(self, name: str, data) -> _DirectoryObjectWriter:
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
            raise ObjectMissing(f"object {name} is missing") from None
        except OSError as exc:
            raise _storage_error(exc, name) from None

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative range")
        try:
            with open(self._path(name), "rb", buffering=0) as f:
                return os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            raise ObjectMissing(f"object {name} is missing") from None
        except OSError as exc:
            raise _storage_error(exc, name) from None

    def _stat(self, name: str) -> os.stat_result:
        try:
            return self._path(name).stat()
        except FileNotFoundError:
            raise ObjectMissing(f"object {name} is missing") from None
        except OSError as exc:
            raise _storage_error(exc, name) from None

    def size(self, name: str) -> int:
        return self._stat(name).st_size

    def modified(self, name: str) -> float:
        """The file's mtime: set by the kernel (or an NFS server) from the storage's own clock."""
        return self._stat(name).st_mtime

    def now(self) -> float:
        """The clock the directory's mtimes come from: the mtime of a file created for the purpose
        (on NFS the server's clock, not this host's; a faked process clock does not change it)."""
        probe = self.root / f".clock{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self._make_dirs(self.root)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                return os.fstat(fd).st_mtime
            finally:
                os.close(fd)
                probe.unlink()
        except OSError as exc:
            raise _storage_error(exc, "the storage clock probe") from None

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
        except ObjectMissing:
            return False
        return True

    def list(self, prefix: str) -> Iterator[str]:
        """Names under the folder ``prefix`` (recursively; everything for ""), temp files excluded, sorted."""
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return iter(())

        def fail(exc: OSError) -> None:
            raise _storage_error(exc, f"the listing of {prefix or 'the repository'}")

        names = []
        for dirpath, _dirs, files in os.walk(base, onerror=fail):
            folder = os.path.relpath(dirpath, self.root).replace(os.sep, "/") + "/"   # once per folder
            folder = "" if folder == "./" else folder
            names.extend(folder + f for f in files if TEMP_MARK not in f)
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

    def incomplete_writes(self, older_than: float = 0.0,
                          folders: tuple[str, ...] = LEFTOVER_FOLDERS) -> list[tuple[str, int]]:
        """Temp files of interrupted writes not written to for ``older_than`` seconds (a live writer's
        temp file is touched by every write): (path relative to the root, bytes)."""
        found = []
        cutoff = self.now() - older_than if older_than > 0 else None
        try:
            for dirpath, _dirs, files in (w for folder in folders for w in os.walk(self.root / folder)):
                for f in files:
                    if TEMP_MARK in f:
                        path = os.path.join(dirpath, f)
                        try:
                            st = os.lstat(path)
                        except FileNotFoundError:
                            continue
                        if cutoff is None or st.st_mtime <= cutoff:
                            found.append((os.path.relpath(path, self.root), st.st_size))
        except OSError as exc:
            raise _storage_error(exc, "the listing of interrupted writes") from None
        return found

    def remove_incomplete_writes(self, older_than: float = 0.0,
                                 folders: tuple[str, ...] = LEFTOVER_FOLDERS) -> int:
        """Delete temp files of interrupted writes older than ``older_than`` seconds (see
        incomplete_writes); only under the exclusive lease."""
        removed = 0
        try:
            for name, _size in self.incomplete_writes(older_than, folders):
                try:
                    os.unlink(self.root / name)
                    removed += 1
                except FileNotFoundError:
                    continue
        except OSError as exc:
            raise _storage_error(exc, "the removal of interrupted writes") from None
        return removed

    remove_temp_files = remove_incomplete_writes


class _DirectoryObjectWriter:
    """A temp file beside the object: written in pieces, then fsync, rename, fsync directory."""

    def __init__(self, storage: DirectoryStorage, path: Path, name: str) -> None:
        self._new_dirs = storage._make_dirs(path.parent)  # fsynced at commit, off the writer's thread
        self.path = path
        self.name = name
        self.tmp = path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        set_private_file(self._fd)

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

"""Local caches of immutable repository objects, so a command on a bucket does not fetch them again.

All caches of one repository live under ``$XDG_CACHE_HOME/imgbackup/<repo id>/`` (default
``~/.cache``). What is cached here: image headers (``image-headers``, one file) and image bodies
(``image-bodies/<image id>``, one file each, at most MAX_BODY_CACHE_BYTES in all, the least recently
used evicted first). Both never change once written (an image is written once and only ever deleted),
so ``list`` of 1,000 images costs one listing instead of 1,000 ranged GETs for the headers and 1,000
GETs for the bodies (the stored/unique columns). Entries are stored **sealed**, exactly as the
repository holds them, and opened (authenticated) again on every use: a damaged, truncated or planted
entry fails authentication and is fetched anew, and the file is rewritten. The cache never decides
what exists: only ids the repository lists are looked up, so a deleted image's entry is simply
dropped. A body file also names the repository id it was fetched from (a hash of it): a file copied
from another repository's cache is not used.

A cache that cannot be read or written (a read-only home on rescue media) is ignored; the command
then reads the repository. ``IMGBACKUP_CACHE=0`` turns local caches off.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
import time
from pathlib import Path

HEADER_CACHE_MAGIC = b"IMGBHDC1"
HEADER_ENTRY = struct.Struct("<16sI")   # image id, sealed header length; then the sealed header
MAX_SEALED_HEADER = 1 << 24             # a header beyond 16 MiB is damage, not metadata
BODY_CACHE_MAGIC = b"IMGBBDC1"
BODY_HEAD = struct.Struct("<8s16s16s")   # magic, first 16 bytes of SHA-256(repo id), image id; then the sealed body
MAX_BODY_CACHE_BYTES = 256 << 20         # ~1,000 bodies of 2 TiB disks at 4 MiB chunks (~256 KiB each): one fleet


def caches_enabled() -> bool:
    return os.environ.get("IMGBACKUP_CACHE", "1").strip().lower() not in ("0", "no", "false", "off")


def cache_root(repo_id: str) -> Path:
    """``$XDG_CACHE_HOME/imgbackup/<repo id>`` (the repository id is authenticated by its config)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgbackup" / repo_id


def write_atomically(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename: a reader sees the old file or the new one (0600, in a 0700 folder)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class HeaderCache:
    """Sealed image headers by image id, in one file; ``save`` rewrites it when something changed."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, bytes] = {}
        self.changed = False
        self._lock = threading.Lock()
        if path is not None:
            self._load()

    @classmethod
    def for_repository(cls, repo_id: str) -> HeaderCache:
        return cls(cache_root(repo_id) / "image-headers" if caches_enabled() else None)

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except OSError:
            return
        if not raw.startswith(HEADER_CACHE_MAGIC):
            self.changed = bool(raw)   # damaged: rewrite it
            return
        pos = len(HEADER_CACHE_MAGIC)
        while pos < len(raw):
            if pos + HEADER_ENTRY.size > len(raw):
                self.changed = True    # truncated: keep what parsed, rewrite the rest
                return
            oid, length = HEADER_ENTRY.unpack_from(raw, pos)
            pos += HEADER_ENTRY.size
            if length > MAX_SEALED_HEADER or pos + length > len(raw):
                self.changed = True
                return
            self.entries[oid.hex()] = raw[pos:pos + length]
            pos += length

    def get(self, image_id: str) -> bytes | None:
        with self._lock:
            return self.entries.get(image_id)

    def put(self, image_id: str, sealed: bytes) -> None:
        if not _image_id_ok(image_id):
            return   # not an image id this format writes: nothing to key an entry by
        with self._lock:
            if self.entries.get(image_id) != sealed:
                self.entries[image_id] = bytes(sealed)
                self.changed = True

    def drop(self, image_id: str) -> None:
        with self._lock:
            if self.entries.pop(image_id, None) is not None:
                self.changed = True

    def keep_only(self, image_ids: set[str]) -> None:
        """Forget images the repository no longer lists (deleted, pruned)."""
        with self._lock:
            for gone in [i for i in self.entries if i not in image_ids]:
                del self.entries[gone]
                self.changed = True

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        with self._lock:
            parts = [HEADER_CACHE_MAGIC]
            for image_id, sealed in sorted(self.entries.items()):
                parts.append(HEADER_ENTRY.pack(bytes.fromhex(image_id), len(sealed)))
                parts.append(sealed)
            self.changed = False
        with contextlib.suppress(OSError):   # no writable cache: the next run reads the repository
            write_atomically(self.path, b"".join(parts))


def _image_id_ok(image_id: str) -> bool:
    return len(image_id) == 32 and all(c in "0123456789abcdef" for c in image_id)


class BodyCache:
    """Sealed image bodies by image id, one file each under ``folder``, at most ``max_bytes`` in all.

    ``get`` marks an entry used (its mtime), ``put`` evicts the least recently used entries past the
    bound; an entry larger than the bound is not kept. Sizes are taken from one scan of the folder,
    on the first ``put``, then kept up to date here."""

    def __init__(self, folder: Path | None, repo_id: str = "", max_bytes: int = MAX_BODY_CACHE_BYTES) -> None:
        self.folder = folder
        self.repo_tag = hashlib.sha256(repo_id.encode()).digest()[:16]
        self.max_bytes = max_bytes
        self._sizes: dict[str, tuple[float, int]] | None = None   # file name -> (mtime, bytes), once scanned
        self._lock = threading.Lock()

    @classmethod
    def for_repository(cls, repo_id: str) -> BodyCache:
        return cls(cache_root(repo_id) / "image-bodies" if caches_enabled() else None, repo_id)

    def get(self, image_id: str) -> bytes | None:
        """The sealed body, unauthenticated (the caller opens it); None when absent or not ours."""
        if self.folder is None or not _image_id_ok(image_id):
            return None
        path = self.folder / image_id
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        with contextlib.suppress(OSError):   # marked used; a read-only cache is still read
            os.utime(path)
        if len(raw) <= BODY_HEAD.size:
            return None
        magic, tag, oid = BODY_HEAD.unpack_from(raw)
        if magic != BODY_CACHE_MAGIC or tag != self.repo_tag or oid != bytes.fromhex(image_id):
            return None
        with self._lock:
            if self._sizes is not None:
                self._sizes[image_id] = (time.time(), len(raw))   # just used: evicted last
        return raw[BODY_HEAD.size:]

    def put(self, image_id: str, sealed: bytes | memoryview) -> None:
        size = BODY_HEAD.size + len(sealed)
        if self.folder is None or not _image_id_ok(image_id) or size > self.max_bytes:
            return
        data = BODY_HEAD.pack(BODY_CACHE_MAGIC, self.repo_tag, bytes.fromhex(image_id)) + bytes(sealed)
        with self._lock:
            try:
                sizes = self._scan()
                write_atomically(self.folder / image_id, data)
            except OSError:
                return   # no writable cache: the next run reads the repository
            sizes[image_id] = (time.time(), size)   # the newest entry: evicted last
            self._evict(sizes)

    def _scan(self) -> dict[str, tuple[float, int]]:
        if self._sizes is None:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._sizes = {}
            with os.scandir(self.folder) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        st = entry.stat()
                        self._sizes[entry.name] = (st.st_mtime, st.st_size)
        return self._sizes

    def _evict(self, sizes: dict[str, tuple[float, int]]) -> None:
        total = sum(size for _, size in sizes.values())
        for name, (_, size) in sorted(sizes.items(), key=lambda item: item[1][0]):
            if total <= self.max_bytes:
                return
            with contextlib.suppress(OSError):
                (self.folder / name).unlink()
            del sizes[name]
            total -= size

    def drop(self, image_id: str) -> None:
        if self.folder is None or not _image_id_ok(image_id):
            return
        with self._lock, contextlib.suppress(OSError):
            (self.folder / image_id).unlink()
            if self._sizes is not None:
                self._sizes.pop(image_id, None)

    def keep_only(self, image_ids: set[str]) -> None:
        """Remove the entries of images the repository no longer lists (and files that are not entries)."""
        if self.folder is None:
            return
        with self._lock:
            try:
                names = os.listdir(self.folder)
            except OSError:
                return
            for name in names:
                if name not in image_ids and ".tmp-" not in name:   # a temp file: another process writing
                    with contextlib.suppress(OSError):
                        (self.folder / name).unlink()
                    if self._sizes is not None:
                        self._sizes.pop(name, None)

"""Local caches of immutable repository objects, so a command on a bucket does not fetch them again.

All caches of one repository live under ``$XDG_CACHE_HOME/imgbackup/<repo id>/`` (default
``~/.cache``). What is cached here: image headers (``image-headers``), which never change once
written (an image is written once and only ever deleted), so ``list`` of 1,000 images costs one
listing instead of 2,000 ranged GETs. Entries are stored **sealed**, exactly as the repository holds
them, and opened (authenticated) again on every use: a damaged, truncated or planted entry fails
authentication and is fetched anew, and the file is rewritten. The cache never decides what exists:
only ids the repository lists are looked up, so a deleted image's entry is simply dropped.

A cache that cannot be read or written (a read-only home on rescue media) is ignored; the command
then reads the repository. ``IMGBACKUP_CACHE=0`` turns local caches off.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from pathlib import Path

HEADER_CACHE_MAGIC = b"IMGBHDC1"
HEADER_ENTRY = struct.Struct("<16sI")   # image id, sealed header length; then the sealed header
MAX_SEALED_HEADER = 1 << 24             # a header beyond 16 MiB is damage, not metadata


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
        if len(image_id) != 32 or not all(c in "0123456789abcdef" for c in image_id):
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

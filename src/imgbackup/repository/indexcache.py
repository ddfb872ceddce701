"""The local cache of the chunk index: the merged table, so opening a big repository reads one file.

``$XDG_CACHE_HOME/imgbackup/<repository id>/chunkindex`` (default ``~/.cache``) holds the sorted rows,
spare rows, pack ids and delta bases of a ``ChunkTable`` and the ids of the index files they were
built from. It is used only while every one of those files is still listed under ``index/`` (files
added since are read from the repository and merged in; a file gone — a compaction merged it —
means a rebuild), and never trusted unauthenticated: the file ends with an HMAC-SHA-256 under a key
derived from the repository's mac key (which only the passphrase unlocks) and the repository id, so
a damaged, truncated, swapped or forged cache fails the check, is deleted and rebuilt from the
repository. Deleting the directory is always safe.

Layout (little-endian): magic ``IMGBICAC``, version u16, 2 reserved bytes, counts of rows, spare rows,
packs and base rows (u64 each), count of files (u32), 4 reserved bytes; the file ids (32 bytes each,
sorted); rows (48 bytes each), spare rows (48), pack ids (32), base rows (64); then the MAC over
the header and the SHA-256 of each 64 MiB piece of everything after it (hashed on two threads).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from imgbackup.repository import localcache
from imgbackup.repository.chunktable import BASE_ROW_SIZE, ROW_DTYPE, ROW_SIZE, ChunkTable

CACHE_MAGIC = b"IMGBICAC"
CACHE_VERSION = 1
CACHE_HEAD = struct.Struct("<8sHxxQQQQI4x")
MAC_SIZE = 32
PIECE = 64 << 20             # bytes per hashed piece: two threads hash a 480 MB cache in ~0.15 s
HASH_THREADS = 2
REWRITE_FILES = 16           # rewrite the cache once this many index files were added since it was written,
REWRITE_FRACTION = 0.02      # or this share of the files it covers (else each open reads the few new ones again)
MAX_CACHED_ROWS = 1 << 33    # a header claiming more is damaged (a 400 GiB cache is not ours)

log = logging.getLogger("imgbackup.storage")


def _flat(a: np.ndarray) -> memoryview:
    """A 1-D byte view of an array (also of an empty one, which memoryview.cast refuses)."""
    return memoryview(np.ascontiguousarray(a).reshape(-1))


def _digests(views: list[memoryview]) -> list[bytes]:
    pieces = [v[i : i + PIECE] for v in views for i in range(0, len(v), PIECE)]
    with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="imgbackup-cachehash") as pool:
        return list(pool.map(lambda p: hashlib.sha256(p).digest(), pieces))


class IndexCache:
    """The chunk-index cache of one repository (see the module docstring)."""

    def __init__(self, repo_id: str, mac_key: bytes, root: Path | None = None) -> None:
        self.dir = root / repo_id if root is not None else localcache.cache_root(repo_id)   # beside the headers
        self.path = self.dir / "chunkindex"
        self.key = hmac.digest(mac_key, b"imgbackup-index-cache\0" + bytes.fromhex(repo_id), "sha256")
        self.names: set[str] = set()     # the index files the loaded cache covers

    @classmethod
    def enabled(cls) -> bool:
        """Off with ``IMGBACKUP_CACHE=0`` (every local cache) or ``IMGBACKUP_INDEX_CACHE=0`` (this one)."""
        own = os.environ.get("IMGBACKUP_INDEX_CACHE", "1").strip().lower() not in ("0", "off", "no", "false")
        return own and localcache.caches_enabled()

    def _mac(self, head: bytes, views: list[memoryview]) -> bytes:
        return hmac.digest(self.key, head + b"".join(_digests(views)), "sha256")

    def load(self, listing: list[str]) -> ChunkTable | None:
        """The cached table if it is authentic and every file it covers is in ``listing``; else None."""
        try:
            with open(self.path, "rb") as f:
                return self._read(f, set(listing))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, MemoryError) as exc:
            self._discard(f"unreadable ({exc})")
            return None

    def _read(self, f, listing: set[str]) -> ChunkTable | None:
        head = f.read(CACHE_HEAD.size)
        if len(head) != CACHE_HEAD.size:
            return self._discard("truncated")
        magic, version, n_rows, n_spare, n_packs, n_bases, n_files = CACHE_HEAD.unpack(head)
        if magic != CACHE_MAGIC or version != CACHE_VERSION or max(n_rows, n_spare, n_packs, n_bases) > MAX_CACHED_ROWS:
            return self._discard("not a cache of this version")
        expected = CACHE_HEAD.size + 32 * n_files + ROW_SIZE * (n_rows + n_spare) + 32 * n_packs + BASE_ROW_SIZE * n_bases
        if os.fstat(f.fileno()).st_size != expected + MAC_SIZE:
            return self._discard("of the wrong length")
        files = np.empty((n_files, 32), np.uint8)
        f.readinto(_flat(files))
        names = {f"index/{bytes(row).hex()}" for row in files}
        if not names <= listing:
            return None                  # a file it covers is gone (merged by compact): rebuild
        arrays = [np.empty((n, w), np.uint8) for n, w in
                  ((n_rows, ROW_SIZE), (n_spare, ROW_SIZE), (n_packs, 32), (n_bases, BASE_ROW_SIZE))]
        for a in arrays:
            if a.nbytes and f.readinto(_flat(a)) != a.nbytes:
                return self._discard("truncated")
        mac = f.read(MAC_SIZE)
        views = [_flat(files)] + [_flat(a) for a in arrays]
        if not hmac.compare_digest(mac, self._mac(head, views)):
            return self._discard("damaged or not made with this repository's key")
        rows, spare, packs, bases = arrays
        for part in (rows, spare):
            if len(part) and int(part.view(ROW_DTYPE)[:, 0]["pack"].max()) >= n_packs:
                return self._discard("inconsistent")
        self.names = names
        return ChunkTable(rows, spare, packs, bases, sorted_=True)

    def _discard(self, why: str) -> None:
        log.warning("the local chunk-index cache %s is %s; rebuilding it from the repository", self.path, why)
        with contextlib.suppress(OSError):
            self.path.unlink()

    def worth_saving(self, added_files: int) -> bool:
        """Rewrite after many added files (or relatively many): each open reads the others again."""
        return added_files >= REWRITE_FILES or added_files > REWRITE_FRACTION * len(self.names)

    def save(self, table: ChunkTable, listing: list[str]) -> None:
        """Write the cache for ``table`` built from the files ``listing`` (atomically; a cache that
        cannot be written — a read-only home, a full disk — is simply not kept)."""
        files = np.array([np.frombuffer(bytes.fromhex(n.rsplit("/", 1)[1]), np.uint8) for n in sorted(listing)],
                         np.uint8).reshape(-1, 32)
        arrays = [files, table.rows, table.spare, table.packs, table.bases]
        head = CACHE_HEAD.pack(CACHE_MAGIC, CACHE_VERSION, len(table.rows), len(table.spare), len(table.packs),
                               len(table.bases), len(files))
        views = [_flat(a) for a in arrays]
        tmp = self.path.with_name(f"chunkindex.tmp-{os.getpid()}")
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(tmp, "wb", opener=lambda p, fl: os.open(p, fl, 0o600)) as f:
                f.write(head)
                for v in views:
                    f.write(v)
                f.write(self._mac(head, views))
            os.replace(tmp, self.path)
            self.names = set(listing)
        except OSError as exc:
            log.debug("chunk-index cache not written: %s", exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

"""The local cache of the chunk index: the merged table, so opening a big repository reads one file.

``$XDG_CACHE_HOME/imgbackup/<repository id>/chunkindex`` (default ``~/.cache``) holds the sorted rows,
spare rows, pack ids, delta bases and prefix directory of a ``ChunkTable`` and the ids of the index
files they were built from. It is used only while every one of those files is still listed under
``index/`` (files added since are read from the repository and merged in; a file gone — a compaction
merged it — means a rebuild), and never trusted unauthenticated: the file ends with a keyed BLAKE3
MAC under a key derived from the repository's mac key (which only the passphrase unlocks) and the
repository id, so a damaged, truncated, swapped or forged cache fails the check, is deleted and
rebuilt from the repository. Deleting the directory is always safe.

Layout (little-endian): magic ``IMGBICAC``, version u16, 2 reserved bytes, counts of rows, spare rows,
packs and base rows (u64 each), count of files (u32), 4 reserved bytes; the file ids (32 bytes each,
sorted); rows (48 bytes each), spare rows (48), pack ids (32), base rows (64), the rows' directory
(2^bits + 1 u32, bits as ``directory_bits`` gives for the row count); then the 32-byte keyed BLAKE3
of everything before it. Read in pieces, each hashed (and its rows checked) while in the CPU cache:
one pass over 480 MB at 10^7 chunks instead of a read, a hash and two checks.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import struct
from pathlib import Path

import numpy as np
from blake3 import blake3

from imgbackup._core.table import directory_bits
from imgbackup.repository import localcache
from imgbackup.repository.chunktable import BASE_ROW_SIZE, ROW_SIZE, ChunkTable

CACHE_MAGIC = b"IMGBICAC"
CACHE_VERSION = 2
CACHE_HEAD = struct.Struct("<8sHxxQQQQI4x")
MAC_SIZE = 32
PIECE_ROWS = 1 << 16         # rows read and hashed per piece: 3 MiB, still in the CPU cache when hashed
PACK_FIELD = 8               # the pack number is the ninth u32 of a row
REWRITE_FILES = 16           # rewrite the cache once this many index files were added since it was written,
REWRITE_FRACTION = 0.02      # or this share of the files it covers (else each open reads the few new ones again)
MAX_CACHED_ROWS = 1 << 33    # a header claiming more is damaged (a 400 GiB cache is not ours)

log = logging.getLogger("imgbackup.storage")


def _flat(a: np.ndarray) -> memoryview:
    """A 1-D byte view of an array (also of an empty one, which memoryview.cast refuses)."""
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _read_into(f, a: np.ndarray, mac: blake3) -> int:
    """Fill ``a`` from ``f`` piece by piece, hashing each piece; the largest pack number among its
    rows when ``a`` holds 48-byte rows (else 0). Raises ValueError when the file ends early."""
    largest = 0
    for start in range(0, len(a), PIECE_ROWS):
        piece = a[start : start + PIECE_ROWS]
        view = _flat(piece)
        if f.readinto(view) != len(view):
            raise ValueError("truncated")
        mac.update(view)
        if a.shape[1] == ROW_SIZE:
            largest = max(largest, int(piece.view("<u4")[:, PACK_FIELD].max()))
    return largest


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

    def _mac(self) -> blake3:
        return blake3(key=self.key)

    def load(self, listing: list[str]) -> ChunkTable | None:
        """The cached table if it is authentic and every file it covers is in ``listing``; else None."""
        try:
            with open(self.path, "rb") as f:
                with contextlib.suppress(OSError, AttributeError):   # the disk reads ahead at full speed
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
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
        n_dir = (1 << directory_bits(n_rows)) + 1
        expected = (CACHE_HEAD.size + 32 * n_files + ROW_SIZE * (n_rows + n_spare) + 32 * n_packs
                    + BASE_ROW_SIZE * n_bases + 4 * n_dir)
        if os.fstat(f.fileno()).st_size != expected + MAC_SIZE:
            return self._discard("of the wrong length")
        mac = self._mac()
        mac.update(head)
        files = np.empty((n_files, 32), np.uint8)
        _read_into(f, files, mac)
        names = {f"index/{bytes(row).hex()}" for row in files}
        if not names <= listing:
            return None                  # a file it covers is gone (merged by compact): rebuild
        rows, spare, packs, bases = (np.empty((n, w), np.uint8) for n, w in
                                     ((n_rows, ROW_SIZE), (n_spare, ROW_SIZE), (n_packs, 32), (n_bases, BASE_ROW_SIZE)))
        largest = max(_read_into(f, a, mac) for a in (rows, spare, packs, bases))
        directory = np.empty((n_dir, 4), np.uint8)
        _read_into(f, directory, mac)
        if not hmac.compare_digest(f.read(MAC_SIZE), mac.digest()):
            return self._discard("damaged or not made with this repository's key")
        directory = directory.view("<u4").reshape(-1)
        if (n_rows or n_spare) and largest >= n_packs or not ChunkTable.directory_fits(directory, n_rows):
            return self._discard("inconsistent")
        self.names = names
        return ChunkTable(rows, spare, packs, bases, sorted_=True, directory=directory.astype(np.uint32, copy=False))

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
        arrays = [files, table.rows, table.spare, table.packs, table.bases, table.directory.astype("<u4")]
        head = CACHE_HEAD.pack(CACHE_MAGIC, CACHE_VERSION, len(table.rows), len(table.spare), len(table.packs),
                               len(table.bases), len(files))
        tmp = self.path.with_name(f"chunkindex.tmp-{os.getpid()}")
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            mac = self._mac()
            with open(tmp, "wb", opener=lambda p, fl: os.open(p, fl, 0o600)) as f:
                for view in [memoryview(head)] + [_flat(a) for a in arrays]:
                    f.write(view)
                    mac.update(view)
                f.write(mac.digest())
            os.replace(tmp, self.path)
            self.names = set(listing)
        except OSError as exc:
            log.debug("chunk-index cache not written: %s", exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

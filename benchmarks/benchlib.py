"""Helpers shared by the benchmark scripts: loop devices, mounts, cold caches and content hashes.

Every loop device and mount is released by its own name in a ``finally``, so a failed run leaves
nothing attached.  Nothing here imports imgbackup: the benchmark judges the tool from outside.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
SEEK_DATA, SEEK_HOLE = 3, 4


def sh(*args: str | os.PathLike, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command, capture text output; raise with its stderr on failure."""
    cp = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} -> {cp.returncode}: {cp.stderr.strip()[-2000:]}")
    return cp


def drop_caches() -> None:
    """Cold cache: flush dirty pages, then drop page cache, dentries and inodes."""
    os.sync()
    with contextlib.suppress(OSError):  # not root: the run is then warm-cache
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


@contextlib.contextmanager
def loop(image: os.PathLike, offset: int = 0, size: int | None = None, read_only: bool = False) -> Iterator[str]:
    """Attach ``image`` (or one partition of it) to a loop device; detach that device afterwards."""
    cmd = ["losetup", "--find", "--show", "--offset", str(offset)]
    if size is not None:
        cmd += ["--sizelimit", str(size)]
    if read_only:
        cmd.append("--read-only")
    dev = sh(*cmd, image).stdout.strip()
    try:
        yield dev
    finally:
        sh("losetup", "-d", dev, check=False)


@contextlib.contextmanager
def mounted(dev: str, options: str = "", fstype: str = "ext4") -> Iterator[Path]:
    """Mount ``dev`` on a fresh temporary directory; unmount and remove it afterwards."""
    where = Path(tempfile.mkdtemp(prefix="imgb-bench-mnt-"))
    try:
        sh("mount", "-t", fstype, *(["-o", options] if options else []), dev, where)
        try:
            yield where
        finally:
            sh("umount", where, check=False)
    finally:
        with contextlib.suppress(OSError):
            where.rmdir()


def data_extents(path: os.PathLike) -> Iterator[tuple[int, int]]:
    """(offset, length) of the allocated ranges of a file (SEEK_DATA/SEEK_HOLE); devices: one range."""
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, SEEK_DATA)
            except OSError:
                return
            stop = os.lseek(fd, start, SEEK_HOLE)
            yield start, stop - start
            pos = stop
    finally:
        os.close(fd)


def content_hash(path: os.PathLike, block: int = 4 * MiB) -> str:
    """SHA-256 over (offset, bytes) of every non-zero block plus the size.

    Equal for two files with the same bytes whatever their holes, and it skips holes, so a 1 TiB
    sparse disk hashes in the time of its data.
    """
    h = hashlib.sha256()
    zero = bytes(block)
    size = os.stat(path).st_size
    h.update(size.to_bytes(8, "little"))
    done = 0  # blocks below this offset are hashed already (two extents can share a block)
    with open(path, "rb", buffering=0) as f:
        for start, length in data_extents(path):
            pos = max(start - start % block, done)
            f.seek(pos)
            while pos < start + length:
                buf = f.read(block)
                if not buf:
                    break
                if buf != zero[: len(buf)]:
                    h.update(pos.to_bytes(8, "little"))
                    h.update(buf)
                pos += len(buf)
            done = max(done, pos)
    return h.hexdigest()


def tree_hash(root: Path) -> tuple[str, int]:
    """SHA-256 over every path, type, mode, size and file content below ``root``; and the file count."""
    h = hashlib.sha256()
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + dirnames:
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(root))
            h.update(f"{rel}\0{st.st_mode:o}\0{st.st_size}\0".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                count += 1
                with open(p, "rb") as f:
                    while chunk := f.read(MiB):
                        h.update(chunk)
    return h.hexdigest(), count


def tree_size(root: os.PathLike) -> int:
    """Apparent bytes of every regular file below ``root`` (a repository, an output file's directory)."""
    root = Path(root)
    if root.is_file():
        return root.stat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total

"""Opening a disk or image file for reading: its size, sector sizes and exact positional reads.

Block devices are sized with the BLKGETSIZE64 ioctl (st_size is 0 for them). Reads go
through ``os.preadv`` so they can fill caller-owned buffers without copies. With O_DIRECT
the kernel needs the buffer, the offset and the length aligned; ``alloc_buffer`` gives
page-aligned buffers, and what cannot be aligned (an unaligned offset, the tail of a file
whose size is not a sector multiple) is read through a second, buffered descriptor.

O_DIRECT is off by default (``DIRECT_DEFAULT``) because it did not measurably help.
Measured on the project's test VM (2 vCPU, virtio disk): a loop device over a 1 GiB file of
random data on ext4, cold cache (``echo 3 > /proc/sys/vm/drop_caches``) before each run, one
thread reading sequentially into one buffer; medians of 5 runs, two sessions, noisy (other
jobs ran on the host):

    read size      buffered GB/s   O_DIRECT GB/s   CPU s/GiB buffered / direct
    1 MiB          0.82, 0.65      1.24, 0.62      0.19 / 0.12
    4 MiB          1.34            0.97            0.21 / 0.08
    8 MiB          1.62, 1.20      1.52, 1.04      0.22 / 0.09

Throughput is a wash (buffered reads get the kernel's read-ahead); O_DIRECT saves about
0.1 s of CPU per GiB (the page-cache copy) and keeps a long backup from evicting the page
cache, so it stays available with ``direct=True``.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
from types import TracebackType

from imgbackup.errors import SourceError

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
PAGE_SIZE = mmap.PAGESIZE
DIRECT_DEFAULT = False
_BOUNCE_SIZE = 1 << 20   # O_DIRECT bounce buffer for unaligned reads: one chunk at a time
MEDIA_ERRORS = frozenset({errno.EIO, errno.ENODATA, errno.EILSEQ, errno.EREMOTEIO})
"""What a failing medium answers (unreadable sectors); other errors (a device gone) end any backup."""


class SourceReadError(SourceError):
    """A read of the source failed at ``offset`` with ``errno``."""

    def __init__(self, message: str, offset: int, err: int) -> None:
        super().__init__(message)
        self.offset = offset
        self.errno = err

    @property
    def media_error(self) -> bool:
        return self.errno in MEDIA_ERRORS


def alloc_buffer(n: int) -> mmap.mmap:
    """A zero-filled, page-aligned buffer of ``n`` bytes (anonymous mmap), usable with O_DIRECT."""
    return mmap.mmap(-1, max(n, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _ioctl_int(fd: int, request: int, fmt: str) -> int:
    buf = bytearray(struct.calcsize(fmt))
    fcntl.ioctl(fd, request, buf)
    return struct.unpack(fmt, buf)[0]


def block_geometry(path: str) -> tuple[int, int]:
    """A block device's size in bytes (BLKGETSIZE64) and logical sector size (BLKSSZGET)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _ioctl_int(fd, BLKGETSIZE64, "Q"), _ioctl_int(fd, BLKSSZGET, "i")
    finally:
        os.close(fd)


def _address(buf: memoryview) -> int | None:
    """Memory address of a writable buffer, to check O_DIRECT alignment; None if unknowable."""
    import ctypes

    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except (TypeError, ValueError):
        return None


def _open_error(path: str, err: OSError) -> SourceError:
    if err.errno == errno.ENOENT:
        return SourceError(f"{path}: no such file or device")
    if err.errno in (errno.EACCES, errno.EPERM):
        return SourceError(f"{path}: permission denied", hint="reading a disk usually needs root")
    if err.errno == errno.ENOMEDIUM:
        return SourceError(f"{path}: no medium in the drive")
    return SourceError(f"{path}: cannot open: {err.strerror}")


class Source:
    """A readable disk or image file. Use ``open_source``; close it (or use ``with``)."""

    def __init__(self, path: str, fd: int, st: os.stat_result, direct: bool) -> None:
        self.path = path
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self.direct = direct
        self._fd = fd
        self._buffered_fd: int | None = None if direct else fd
        self._bounce: mmap.mmap | None = None
        self._sector_fd: int | None = None
        self._sector_bounce: mmap.mmap | None = None
        if self.is_block_device:
            self.logical_sector_size = _ioctl_int(fd, BLKSSZGET, "i")
            # whole sectors only: a loop device with 4 KiB sectors over a file of 512-byte
            # multiples reports a partial last sector that answers every read with EIO
            size = _ioctl_int(fd, BLKGETSIZE64, "Q")
            self.size = size - size % self.logical_sector_size
            self.physical_sector_size = _ioctl_int(fd, BLKPBSZGET, "I")
        else:
            self.size = st.st_size
            self.logical_sector_size = 512
            self.physical_sector_size = 512
        self._align = max(PAGE_SIZE, self.logical_sector_size)

    def __repr__(self) -> str:
        mode = "direct" if self.direct else "buffered"
        return f"<Source {self.path} {self.size} bytes {mode}>"

    def __enter__(self) -> Source:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for fd in {self._fd, self._buffered_fd, self._sector_fd} - {None, -1}:
            os.close(fd)
        self._fd = self._buffered_fd = -1
        self._sector_fd = None
        for bounce in (self._bounce, self._sector_bounce):
            if bounce is not None:
                bounce.close()
        self._bounce = self._sector_bounce = None

    def read_into(self, offset: int, buf: memoryview | bytearray | mmap.mmap) -> int:
        """Fill ``buf`` from ``offset``; returns len(buf), or fewer bytes only at end of data."""
        if self._fd < 0:
            raise ValueError("read from a closed Source")
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        view = buf if isinstance(buf, memoryview) else memoryview(buf)
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if self.is_block_device:  # the device's end is our size, not the first EIO
            view = view[:max(0, self.size - offset)]
        if not self.direct or offset % self._align:
            return self._read_buffered(offset, view)
        body = len(view) - len(view) % self._align
        got = self._read_direct(offset, view[:body]) if body else 0
        if got < len(view):
            # the unaligned tail, or whatever follows a short read at the end of a file
            got += self._read_buffered(offset + got, view[got:])
        return got

    def _pread(self, fd: int, offset: int, view: memoryview) -> int:
        try:
            return os.preadv(fd, [view], offset)
        except OSError as err:
            if err.errno == errno.EIO:
                raise SourceReadError(f"{self.path}: read error (EIO) at offset {offset}", offset, err.errno) from err
            raise SourceReadError(f"{self.path}: read failed at offset {offset}: {err.strerror}", offset,
                                  err.errno or 0) from err

    def read_sectors(self, offset: int, buf: memoryview) -> int:
        """One read attempt of whole logical sectors, past the page cache where the source allows.

        For imaging a failing disk: through the page cache a bad sector fails its whole page
        (and read-ahead hides where), while an O_DIRECT read of one sector fails alone. Reads
        go through a page-aligned bounce buffer, so ``buf`` may have any alignment. Raises
        SourceReadError; returns the bytes read (fewer only at the end of the source).
        """
        if self._fd < 0:
            raise ValueError("read from a closed Source")
        length = min(len(buf), max(0, self.size - offset))
        ss = self.logical_sector_size
        if offset % ss or (length % ss and offset + length != self.size):
            raise ValueError(f"unaligned sector read: {length} bytes at {offset}")
        want = -(-length // ss) * ss    # a file's partial last sector is read whole; its end stops the read
        if self._sector_fd is None:
            self._sector_fd = self._open_sector_fd()
        if self._sector_bounce is None or len(self._sector_bounce) < want:
            if self._sector_bounce is not None:
                self._sector_bounce.close()
            self._sector_bounce = alloc_buffer(max(want, _BOUNCE_SIZE))
        with memoryview(self._sector_bounce) as bounce:
            got = min(self._pread(self._sector_fd, offset, bounce[:want]), length) if want else 0
            buf[:got] = bounce[:got]
        return got

    def _open_sector_fd(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as err:
            if err.errno != errno.EINVAL:  # EINVAL: no O_DIRECT here (tmpfs); read through the cache
                raise _open_error(self.path, err) from err
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise _open_error(self.path, err) from err

    def _read_buffered(self, offset: int, view: memoryview) -> int:
        if self._buffered_fd is None:
            try:
                self._buffered_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as err:
                raise _open_error(self.path, err) from err
        return self._fill(self._buffered_fd, offset, view)

    def _fill(self, fd: int, offset: int, view: memoryview, direct: bool = False) -> int:
        """Read until ``view`` is full or the data ends; an O_DIRECT read stops where it
        would become unaligned (a short read at the end of a file)."""
        got = 0
        while got < len(view):
            n = self._pread(fd, offset + got, view[got:])
            if n == 0:
                break
            got += n
            if direct and got % self._align:
                break
        return got

    def _read_direct(self, offset: int, view: memoryview) -> int:
        """O_DIRECT read of an aligned range; through a bounce buffer if ``view`` is unaligned."""
        address = _address(view)
        if address is not None and address % self._align == 0:
            return self._fill(self._fd, offset, view, direct=True)
        if self._bounce is None:
            self._bounce = alloc_buffer(_BOUNCE_SIZE)
        got = 0
        with memoryview(self._bounce) as bounce:
            while got < len(view):
                want = min(_BOUNCE_SIZE, len(view) - got)
                n = self._fill(self._fd, offset + got, bounce[:want], direct=True)
                view[got:got + n] = bounce[:n]
                got += n
                if n < want:
                    break
        return got


def open_source(path: str | os.PathLike, direct: bool | None = None) -> Source:
    """Open a block device or regular file for reading; SourceError with one clear line if not.

    ``direct=None`` means O_DIRECT for block devices only if ``DIRECT_DEFAULT``; files are
    read buffered unless asked. Where the filesystem refuses O_DIRECT (tmpfs), reads fall
    back to buffered I/O and ``source.direct`` is False.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as err:
        raise _open_error(path, err) from err
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file or block device"
        raise SourceError(f"{path}: {kind}; give a disk (e.g. /dev/sdb) or an image file")
    if direct is None:
        direct = DIRECT_DEFAULT and stat.S_ISBLK(st.st_mode)
    flags = os.O_RDONLY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | (os.O_DIRECT if direct else 0))
    except OSError as err:
        if not (direct and err.errno == errno.EINVAL):
            raise _open_error(path, err) from err
        direct = False
        try:
            fd = os.open(path, flags)
        except OSError as err2:
            raise _open_error(path, err2) from err2
    try:
        return Source(path, fd, os.fstat(fd), direct)
    except OSError as err:
        os.close(fd)
        raise SourceError(f"{path}: cannot query size: {err.strerror}") from err


def data_extents(path: str | os.PathLike) -> list[tuple[int, int]] | None:
    """(offset, length) of each data region of a sparse regular file; None for devices.

    Holes between the extents read as zeros and need not be read at all. A filesystem
    without SEEK_DATA support reports the whole file as one extent, which is still correct.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise _open_error(path, err) from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        extents = []
        pos = 0
        while pos < st.st_size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:
                    break  # only a hole up to the end
                raise SourceError(f"{path}: SEEK_DATA failed: {err.strerror}") from err
            end = min(os.lseek(fd, start, os.SEEK_HOLE), st.st_size)
            extents.append((start, end - start))
            pos = end
        return extents
    finally:
        os.close(fd)

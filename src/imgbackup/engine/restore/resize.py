"""Filesystem tools for bare-metal restore: grow or shrink the last partition's filesystem.

Always the filesystem's own tool (resize2fs, xfs_growfs), run on a loop device attached with
``--offset``/``--sizelimit`` over exactly the partition's byte range, so the same code serves a
target file, a loop device and a real disk, and a tool can never write past the partition.
Every loop device and mount made here is released by its own name before the call returns.
"""

from __future__ import annotations

import os
import re
import tempfile

from imgbackup.device.tools import loop_over, output_tail, probe_fstype, retry, run
from imgbackup.errors import StorageError, TargetRefused

EXT_TYPES = ("ext2", "ext3", "ext4")
# Boot loader files whose block addresses are written into a boot sector: if resize2fs moves
# them the disk no longer boots, so a shrink that would move one is refused.
PINNED_FILES = ("/boot/syslinux/ldlinux.sys", "/boot/extlinux/ldlinux.sys", "/syslinux/ldlinux.sys",
                "/extlinux/ldlinux.sys", "/boot/ldlinux.sys", "/ldlinux.sys")


def _fsck_ext(dev: str) -> None:
    """``e2fsck -fp``: resize2fs insists on a freshly checked filesystem. Exit >= 4 is a refusal."""
    res = run(["e2fsck", "-fp", dev])
    if res.returncode >= 4:
        raise StorageError(f"e2fsck found problems it cannot fix on {dev} (exit {res.returncode}): "
                           f"{output_tail(res)}")


def grow_filesystem(path: str, offset: int, size: int) -> str:
    """Grow the filesystem in [offset, offset+size) of ``path`` to fill it; a note on what was done."""
    with loop_over(path, offset, size) as dev:
        fstype = probe_fstype(dev)
        if fstype in EXT_TYPES:
            _fsck_ext(dev)
            res = run(["resize2fs", dev])
            if res.returncode != 0:
                raise StorageError(f"resize2fs failed: {output_tail(res)}")
            return f"{fstype} grown by resize2fs to {size} bytes"
        if fstype == "xfs":
            return _grow_xfs(dev, size)
        return f"{fstype or 'no known filesystem'}: left at its size (no grow tool for it)"


def _grow_xfs(dev: str, size: int) -> str:
    """xfs_growfs works only on a mounted filesystem: mount on a temp dir, grow, unmount.

    The mount point is removed with rmdir, never rmtree: should the unmount fail, nothing of the
    restored filesystem can be deleted through it (it is then detached lazily and reported).
    """
    mnt = tempfile.mkdtemp(prefix="imgbackup-grow-")
    try:
        res = run(["mount", "-t", "xfs", dev, mnt])
        if res.returncode != 0:
            raise StorageError(f"cannot mount the xfs to grow it: {res.stderr.strip()}")
        try:
            grow = run(["xfs_growfs", mnt])
        finally:
            unmounted = retry(["umount", mnt])
            if unmounted.returncode != 0:
                run(["umount", "-l", mnt])
        if unmounted.returncode != 0:
            raise StorageError(f"cannot unmount {mnt} after growing the xfs: {unmounted.stderr.strip()} "
                               "(detached lazily)")
        if grow.returncode != 0:
            raise StorageError(f"xfs_growfs failed: {output_tail(grow)}")
    finally:
        os.rmdir(mnt)
    return f"xfs grown by xfs_growfs to {size} bytes"


def ext_block_size(dev: str) -> int:
    res = run(["dumpe2fs", "-h", dev])
    found = re.search(r"^Block size:\s+(\d+)", res.stdout, re.M)
    if not found:
        raise StorageError(f"dumpe2fs cannot read the ext superblock on {dev}")
    return int(found.group(1))


def shrink_ext_file(path: str, new_size: int, needed: int) -> None:
    """Shrink the ext filesystem in the file ``path`` to ``new_size`` bytes (then cut the file).

    ``needed`` is what the disk offers in front of the filesystem plus the table's tail: a
    refusal names ``needed`` + the minimum size resize2fs estimates.
    """
    _fsck_ext(path)
    bs = ext_block_size(path)
    est = run(["resize2fs", "-P", path])
    found = re.search(r"minimum size of the filesystem:\s*(\d+)", est.stdout)
    if not found:
        raise StorageError(f"resize2fs -P failed: {output_tail(est)}")
    minimum = int(found.group(1)) * bs
    _refuse_moving_pinned(path, bs, new_size, needed)
    if minimum > new_size:
        raise TargetRefused(f"target is too small: the filesystem needs at least {minimum} bytes, "
                            f"the disk needs {needed + minimum} bytes")
    res = run(["resize2fs", path, f"{new_size // 1024}K"])
    if res.returncode != 0:
        raise TargetRefused(f"resize2fs cannot shrink the filesystem to {new_size} bytes: {output_tail(res)}")
    check = run(["e2fsck", "-fn", path])
    if check.returncode != 0:
        raise StorageError(f"the shrunk filesystem is not clean: {check.stdout.strip()[-300:]}")
    os.truncate(path, new_size)


def _refuse_moving_pinned(path: str, bs: int, new_size: int, needed: int) -> None:
    """Refuse when a pinned boot loader file (extlinux's ldlinux.sys) lies past the new end."""
    for name in PINNED_FILES:
        res = run(["debugfs", "-R", f"blocks {name}", path])
        blocks = [int(b) for b in res.stdout.split() if b.isdigit()]
        if blocks and (max(blocks) + 1) * bs > new_size:
            end = (max(blocks) + 1) * bs
            raise TargetRefused(f"target is too small: {name} (extlinux, whose boot sector records its "
                                f"blocks) ends at byte {end} of the filesystem and would be moved by resize2fs; "
                                f"the disk needs {needed + end} bytes")

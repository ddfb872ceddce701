"""Restore targets: what a target is, whether it may be written, and opening it for writing.

Every refusal happens here, before the first byte is written.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from dataclasses import dataclass

from imgbackup.device.identity import identify
from imgbackup.device.mounts import is_system_disk, usage_of
from imgbackup.device.source import block_geometry
from imgbackup.errors import TargetRefused

BLKZEROOUT = 0x127F


@dataclass
class Target:
    path: str
    is_block_device: bool
    size: int            # current size (a file grows to the image size)
    exists: bool
    description: str

    def to_dict(self) -> dict:
        return {"path": self.path, "block_device": self.is_block_device, "size": self.size,
                "exists": self.exists, "description": self.description}


def inspect_target(path: str, needed: int) -> Target:
    """Describe ``path`` as a restore target of ``needed`` bytes, or refuse it (TargetRefused)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise TargetRefused(f"cannot create {path}: directory {parent} does not exist") from None
        return Target(path, False, 0, False, f"{path} (new file)")
    if stat.S_ISDIR(st.st_mode):
        raise TargetRefused(f"{path} is a directory", "give a block device or a file name")
    state = usage_of(path)
    if state.in_use:
        raise TargetRefused(f"refusing to overwrite {path}: {state.describe()}", "unmount it first")
    if stat.S_ISBLK(st.st_mode):
        if is_system_disk(path):
            raise TargetRefused(f"refusing to overwrite {path}: the running system lives on it")
        size = block_geometry(path)[0]
        if size < needed:
            raise TargetRefused(f"target {path} is too small: {size} bytes, the image needs {needed} bytes")
        return Target(path, True, size, True, identify(path).describe())
    if not stat.S_ISREG(st.st_mode):
        raise TargetRefused(f"{path} is neither a block device nor a regular file")
    return Target(path, False, st.st_size, True, f"{path} (existing file, {st.st_size} bytes)")


def open_for_writing(target: Target, size: int, keep: bool = False) -> int:
    """Open the target; a file is emptied and set to ``size`` (sparse), a device opened exclusively.

    ``keep`` leaves a file's content in place (a delta restore reads it before writing).
    """
    if target.is_block_device:
        try:
            return os.open(target.path, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            raise TargetRefused(f"cannot open {target.path} exclusively: {exc.strerror}",
                                "is it in use (mounted, a holder)?") from None
    create = os.O_RDWR | os.O_CLOEXEC | (0 if target.exists else os.O_CREAT | os.O_EXCL)
    try:
        fd = os.open(target.path, create, 0o600)
    except FileExistsError:
        raise TargetRefused(f"{target.path} appeared while the restore was being prepared",
                            "run the restore again to see what it would overwrite") from None
    if not keep:
        os.ftruncate(fd, 0)
    os.ftruncate(fd, size)
    return fd


def zero_out(fd: int, offset: int, length: int) -> bool:
    """Ask the device to zero a range (BLKZEROOUT); False if it cannot."""
    try:
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("<QQ", offset, length))
        return True
    except OSError:
        return False


def logical_sector_size(path: str) -> int | None:
    """The logical sector size of a block device; None for a file."""
    return block_geometry(path)[1] if stat.S_ISBLK(os.stat(path).st_mode) else None

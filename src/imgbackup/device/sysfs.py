"""Small readers over /sys/class/block: the kernel's own view of disks, partitions and loops.

Everything here works without udev (there is often no udev daemon in rescue systems and
containers), and every name is the kernel name ("sda", "loop3p1"), never a /dev path.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

SYS_BLOCK = Path("/sys/class/block")


def read_attr(path: Path) -> str | None:
    """The stripped text of a sysfs attribute, or None when it is absent or unreadable."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return None
    return text or None


def name_of_devnum(rdev: int) -> str | None:
    """Kernel name of the block device with this device number (via /sys/dev/block/M:m)."""
    link = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    try:
        return Path(os.path.realpath(link)).name if link.exists() else None
    except OSError:
        return None


def name_of_path(path: str | os.PathLike) -> str | None:
    """Kernel name of a block device node (symlinks such as /dev/disk/by-id are followed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return name_of_devnum(st.st_rdev) if stat.S_ISBLK(st.st_mode) else None


def devnum_of_name(name: str) -> int | None:
    text = read_attr(SYS_BLOCK / name / "dev")
    if not text:
        return None
    major, minor = text.split(":")
    return os.makedev(int(major), int(minor))


def is_partition(name: str) -> bool:
    return (SYS_BLOCK / name / "partition").exists()


def whole_disk(name: str) -> str:
    """The disk a partition belongs to (the sysfs parent directory); a disk is its own."""
    if not is_partition(name):
        return name
    return Path(os.path.realpath(SYS_BLOCK / name)).parent.name


def partitions(name: str) -> list[str]:
    """Partitions of a disk, in partition-number order (sysfs children with a 'partition' file)."""
    base = SYS_BLOCK / name
    found = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    for child in entries:
        number = read_attr(child / "partition")
        if number is not None and number.isdigit():
            found.append((int(number), child.name))
    return [n for _, n in sorted(found)]


def list_dir(path: Path) -> list[str]:
    try:
        return sorted(p.name for p in path.iterdir())
    except OSError:
        return []


def holders(name: str) -> list[str]:
    """Devices stacked on this one by the kernel (device-mapper, md, bcache)."""
    return list_dir(SYS_BLOCK / name / "holders")


def slaves(name: str) -> list[str]:
    return list_dir(SYS_BLOCK / name / "slaves")


def backing_file(name: str) -> str | None:
    """The file behind a loop device (None for other devices or an unattached loop)."""
    return read_attr(SYS_BLOCK / name / "loop" / "backing_file")


def size_bytes(name: str) -> int:
    """Size from sysfs, which always counts 512-byte units whatever the sector size."""
    text = read_attr(SYS_BLOCK / name / "size")
    return int(text) * 512 if text and text.isdigit() else 0


def all_names() -> list[str]:
    return list_dir(SYS_BLOCK)


def _loop_backings() -> list[tuple[str, os.stat_result]]:
    found = []
    for name in all_names():
        backing = backing_file(name) if name.startswith("loop") else None
        if backing is None:
            continue
        try:
            found.append((name, os.stat(backing)))
        except OSError:
            continue  # backing file deleted or renamed: it cannot be matched by inode any more
    return found


def loops_backed_by_file(target: os.stat_result) -> list[str]:
    """Loop devices whose backing file is ``target`` (same inode on the same filesystem)."""
    key = (target.st_dev, target.st_ino)
    return [n for n, st in _loop_backings() if not stat.S_ISBLK(st.st_mode) and (st.st_dev, st.st_ino) == key]


def loops_backed_by_device(rdev: int) -> list[str]:
    """Loop devices stacked on the block device with this device number."""
    return [n for n, st in _loop_backings() if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev]

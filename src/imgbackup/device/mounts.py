"""Is a disk in use? Mounts, partition mounts and stacked devices, matched by device number.

Names lie (by-id symlinks, /dev/root, renamed nodes); device numbers do not. So every match
here compares major:minor from /proc/self/mountinfo with the device's own ``st_rdev``, and a
regular file is matched to the loop devices backed by it through their inode.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from imgbackup.device import sysfs

MOUNTINFO = "/proc/self/mountinfo"


@dataclass
class MountInfo:
    """One mount of a filesystem; ``read_only`` is the superblock's state (can it write the disk)."""

    mountpoint: str
    fstype: str
    read_only: bool
    source: str


@dataclass
class _MountLine:
    devnum: int
    info: MountInfo


def _unescape(text: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as \040 style octal."""
    if "\\" not in text:
        return text
    return text.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def read_mount_table(path: str = MOUNTINFO) -> list[_MountLine]:
    lines = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            fields = raw.split()
            try:
                sep = fields.index("-", 6)
            except ValueError:
                continue
            major, minor = fields[2].split(":")
            mount_opts = fields[5].split(",")
            super_opts = fields[sep + 3].split(",") if len(fields) > sep + 3 else mount_opts
            info = MountInfo(
                mountpoint=_unescape(fields[4]),
                fstype=fields[sep + 1],
                read_only="ro" in super_opts,
                source=_unescape(fields[sep + 2]) if len(fields) > sep + 2 else "",
            )
            lines.append(_MountLine(os.makedev(int(major), int(minor)), info))
    return lines


def _source_devnum(source: str) -> int | None:
    """btrfs and some others show an anonymous 0:N number; their source node has the real one."""
    if not source.startswith("/"):
        return None
    try:
        st = os.stat(source)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def mounts_of_devnum(devnum: int, table: list[_MountLine]) -> list[MountInfo]:
    found = []
    for line in table:
        if line.devnum == devnum or (
            os.major(line.devnum) == 0 and _source_devnum(line.info.source) == devnum
        ):
            found.append(line.info)
    return found


def _stat(path: str | os.PathLike) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def mounts_of(path: str | os.PathLike) -> list[MountInfo]:
    """Mounts whose source is this block device, or a loop device backed by this regular file."""
    st = _stat(path)
    if st is None:
        return []
    table = read_mount_table()
    if stat.S_ISBLK(st.st_mode):
        return mounts_of_devnum(st.st_rdev, table)
    if stat.S_ISREG(st.st_mode):
        found = []
        for loop in sysfs.loops_backed_by_file(st):
            devnum = sysfs.devnum_of_name(loop)
            if devnum is not None:
                found += mounts_of_devnum(devnum, table)
        return found
    return []


@dataclass
class UsageState:
    """Everything that would be hurt by writing to a disk, or would change it while we read it."""

    mounts: list[MountInfo]
    partition_mounts: dict[str, list[MountInfo]] = field(default_factory=dict)
    holders: list[str] = field(default_factory=list)
    path: str = ""

    @property
    def in_use(self) -> bool:
        return bool(self.mounts or any(self.partition_mounts.values()) or self.holders)

    @property
    def mounted_read_write(self) -> bool:
        every = self.mounts + [m for ms in self.partition_mounts.values() for m in ms]
        return any(not m.read_only for m in every)

    def describe(self) -> str:
        """One line for an error message; the most dangerous use first."""
        uses = [(self.path, m) for m in self.mounts]
        uses += [(dev, m) for dev, ms in self.partition_mounts.items() for m in ms]
        uses.sort(key=lambda u: u[1].read_only)
        if uses:
            dev, m = uses[0]
            mode = "read-only" if m.read_only else "read-write"
            more = f" (and {len(uses) - 1} more mount(s))" if len(uses) > 1 else ""
            return f"{dev} is mounted {mode} at {m.mountpoint}{more}"
        if self.holders:
            return f"{self.path} is in use by {', '.join('/dev/' + h for h in self.holders)}"
        return f"{self.path} is not in use"


def _devices_of(st: os.stat_result) -> list[str]:
    """Kernel names whose use counts for a path of this stat: the disk itself, or the loops behind a file."""
    if stat.S_ISBLK(st.st_mode):
        name = sysfs.name_of_devnum(st.st_rdev)
        return [name] if name else []
    if stat.S_ISREG(st.st_mode):
        return sysfs.loops_backed_by_file(st)
    return []


def usage_of(path: str | os.PathLike) -> UsageState:
    """Mounts of the device and of each of its partitions, and devices stacked on any of them.

    Holders are kernel holders (dm, md) plus loop devices backed by the device. For a regular
    file the loop devices attached to it are looked at the same way, but are not holders
    themselves: only their mounts and what is stacked on them count.
    """
    state = UsageState(mounts=[], path=str(path))
    st = _stat(path)
    if st is None:
        return state
    table = read_mount_table()
    names = _devices_of(st)
    if stat.S_ISBLK(st.st_mode):
        state.mounts = mounts_of_devnum(st.st_rdev, table)
    for name in names:
        devnum = sysfs.devnum_of_name(name)
        if stat.S_ISREG(st.st_mode) and devnum is not None:
            mine = mounts_of_devnum(devnum, table)
            if mine:
                state.partition_mounts[f"/dev/{name}"] = mine
        state.holders += _stacked_on(name)
        for part in sysfs.partitions(name):
            part_num = sysfs.devnum_of_name(part)
            mine = mounts_of_devnum(part_num, table) if part_num is not None else []
            if mine:
                state.partition_mounts[f"/dev/{part}"] = mine
            state.holders += _stacked_on(part)
    return state


def _stacked_on(name: str) -> list[str]:
    devnum = sysfs.devnum_of_name(name)
    loops = sysfs.loops_backed_by_device(devnum) if devnum is not None else []
    return sysfs.holders(name) + loops


SYSTEM_MOUNTPOINTS = ("/", "/boot", "/boot/efi", "/efi", "/usr", "/var")


def _underlying_disks(name: str, seen: set[str] | None = None) -> set[str]:
    """Whole disks below a device: through dm/md slaves and loop backing devices."""
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    below = sysfs.slaves(name)
    backing = sysfs.backing_file(name)
    if backing:
        # a loop over a file lives where the file lives; a loop over a device, on that device
        st = _stat(backing)
        if st is not None:
            devnum = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
            under = sysfs.name_of_devnum(devnum)
            below = below + ([under] if under else [])
    disks = {sysfs.whole_disk(name)}
    for lower in below:
        disks |= _underlying_disks(sysfs.whole_disk(lower), seen) | _underlying_disks(lower, seen)
    return disks


def system_disks() -> set[str]:
    """Kernel names of the whole disks holding /, /boot and the other system mounts, and swap.

    The mount table is not enough: in a chroot or rescue shell the mount holding ``/`` can be
    missing from it (the kernel hides mounts outside the process's root), so the device of
    ``/`` itself (``st_dev``) counts too.
    """
    names = set()
    devnums = [os.stat("/").st_dev]
    for line in read_mount_table():
        if line.info.mountpoint in SYSTEM_MOUNTPOINTS:
            devnums.append(line.devnum if os.major(line.devnum) else _source_devnum(line.info.source))
    for devnum in devnums:
        name = sysfs.name_of_devnum(devnum) if devnum else None
        if name:
            names.add(name)
    names |= set(_swap_devices())
    disks = set()
    for name in names:
        disks |= _underlying_disks(name)
    return disks


def _swap_devices() -> list[str]:
    """Block devices in use as swap: swap partitions, and the devices holding swap files."""
    try:
        with open("/proc/swaps") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return []
    found = []
    for row in rows:
        fields = row.split()
        if len(fields) < 2:
            continue
        path = _unescape(fields[0])
        if fields[1] == "partition":
            name = sysfs.name_of_path(path)
        else:
            st = _stat(path)
            name = sysfs.name_of_devnum(st.st_dev) if st is not None else None
        if name:
            found.append(name)
    return found


def is_system_disk(path: str | os.PathLike) -> bool:
    """True if the disk of ``path`` (or any partition of it) holds the running system.

    A regular file is never a system disk. A partition counts as its whole disk: wiping
    the disk that holds / is as fatal as wiping / itself.
    """
    st = _stat(path)
    if st is None or not stat.S_ISBLK(st.st_mode):
        return False
    name = sysfs.name_of_devnum(st.st_rdev)
    if name is None:
        return False
    return sysfs.whole_disk(name) in system_disks()

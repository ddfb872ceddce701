"""Every disk and partition on the machine, for ``imgbackup devices`` (table or --json).

Enumerated through pyudev when it works, else by listing /sys/class/block; both see the
same kernel devices, udev merely adds names. RAM disks, zram and unattached loop devices
are left out: nobody backs those up.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from imgbackup.device import mounts, sysfs
from imgbackup.device.identity import DeviceIdentity, identify_name
from imgbackup.device.mounts import MountInfo

_SKIP = re.compile(r"^(ram|zram)\d+")


@dataclass
class ListedDevice(DeviceIdentity):
    """A device's identity plus where it (the device itself, not its partitions) is mounted."""

    mounts: list[MountInfo] = field(default_factory=list)

    @property
    def mountpoints(self) -> list[str]:
        return [m.mountpoint for m in self.mounts]

    def to_dict(self) -> dict:
        """Plain JSON-ready data; ``mountpoints`` duplicated flat for simple consumers."""
        data = asdict(self)
        data["mountpoints"] = self.mountpoints
        return data


def _names_from_udev() -> list[str] | None:
    try:
        import pyudev

        context = pyudev.Context()
        names = [d.sys_name for d in context.list_devices(subsystem="block")]
    except Exception:  # noqa: BLE001 - no pyudev or no libudev: use sysfs
        return None
    return names or None


def _wanted(name: str) -> bool:
    if _SKIP.match(name):
        return False
    disk = sysfs.whole_disk(name)
    return not (disk.startswith("loop") and sysfs.backing_file(disk) is None)


def _sort_key(name: str) -> tuple:
    """Disks in natural order (sda < sdb < sdaa, loop2 < loop10), each followed by its partitions."""
    disk = sysfs.whole_disk(name)
    part = sysfs.read_attr(sysfs.SYS_BLOCK / name / "partition")
    natural = [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", disk)]
    return (re.sub(r"\d.*", "", disk), len(disk), natural, int(part) if part and part.isdigit() else 0)


def list_devices(use_udev: bool = True) -> list[ListedDevice]:
    """All disks and partitions with size, model, serial, filesystem and mounts."""
    names = _names_from_udev() if use_udev else None
    if names is None:
        names = sysfs.all_names()
    table = mounts.read_mount_table()
    found = []
    for name in sorted({n for n in names if _wanted(n)}, key=_sort_key):
        ident = identify_name(name)
        devnum = sysfs.devnum_of_name(name)
        where = mounts.mounts_of_devnum(devnum, table) if devnum is not None else []
        found.append(ListedDevice(**asdict(ident), mounts=where))
    return found

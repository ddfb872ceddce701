"""Finding things inside the rescue system: devices by label or identity, and mounting them.

The rescue system boots on unknown hardware: disks appear in any order and late (USB, SAN), so
every lookup waits (``udevadm settle``, then polling) up to a deadline, and ambiguity is an error:
two filesystems labelled BACKUP, or two disks with one serial, stop the rescue with both named.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from imgbackup.device import sysfs, tools
from imgbackup.device.discovery import list_devices
from imgbackup.device.identity import identify
from imgbackup.engine.rescue.params import Location, TargetSpec
from imgbackup.errors import ImgBackupError, TargetRefused

RUN_DIR = Path(os.environ.get("IMGBACKUP_RESCUE_RUN", "/run/imgbackup"))
MEDIUM = RUN_DIR / "medium"
POLL_S = 0.5


class DeviceNotFound(ImgBackupError):
    exit_code = 9


SETTLE_S = 120   # udev's coldplug of the devices present at boot: a minute and more under emulation


def wait_for_coldplug() -> None:
    """Wait until systemd's udev coldplug has run (its start job finished): for a run that systemd
    started before udev (imgbackup-rescue.service, so that Python's start overlaps the boot). Starting
    an already started unit returns at once; without systemd there is nothing to wait for."""
    with contextlib.suppress(ImgBackupError):
        tools.run(["systemctl", "start", "systemd-udevd.service", "systemd-udev-trigger.service"],
                  timeout=SETTLE_S + 5)


def _settle() -> None:
    """Wait for udev to finish with the devices already present, so imgbackup.wait=N means N seconds
    for a late disk (USB, SAN) and not N seconds minus however long the boot's coldplug took."""
    with contextlib.suppress(ImgBackupError):      # no udev (a host, not the media): nothing to wait for
        tools.run(["udevadm", "settle", f"--timeout={SETTLE_S}"], timeout=SETTLE_S + 5)


def _by_tag(spec: str) -> list[str]:
    """Devices whose filesystem matches ``LABEL=…``/``UUID=…``/``PART…=…`` (blkid probes, no cache)."""
    proc = tools.run(["blkid", "-c", "/dev/null", "-o", "device", "-t", spec], timeout=tools.PROBE_TIMEOUT)
    return sorted(set(proc.stdout.split()))


def _wait(what: str, wait_s: float, find: Callable[[], list[str]]) -> list[str]:
    _settle()
    deadline = time.monotonic() + wait_s
    while True:
        found = find()
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(POLL_S)


def find_device(spec: str, wait_s: float) -> str:
    """The one device named by ``spec`` (LABEL=, UUID=, PARTUUID=, PARTLABEL= or a /dev path)."""
    if spec.startswith("/dev/"):
        found = _wait(spec, wait_s, lambda: [spec] if os.path.exists(spec) else [])
    else:
        found = _wait(spec, wait_s, lambda: _by_tag(spec))
    if not found:
        raise DeviceNotFound(f"no device with {spec} after {wait_s:.0f} s", "is the backup disk attached?")
    if len(found) > 1:
        raise DeviceNotFound(f"{spec} names {len(found)} devices ({', '.join(found)})",
                             "use UUID=… to say which")
    return os.path.realpath(found[0])


def _disk_nodes() -> list[str]:
    return [d.path for d in list_devices() if d.kind == "disk"]


def find_target(spec: TargetSpec, wait_s: float) -> str:
    """The whole disk ``spec`` names, as its /dev node; DeviceNotFound lists the disks present."""
    if spec.kind == "by-id":
        found = _wait(str(spec), wait_s, lambda: [spec.value] if os.path.exists(spec.value) else [])
    elif spec.kind == "wwn":
        link = f"/dev/disk/by-id/wwn-{spec.value}"
        found = _wait(str(spec), wait_s, lambda: [link] if os.path.exists(link) else
                      [d.path for d in list_devices() if d.kind == "disk" and (d.wwn or "").lower() == spec.value])
    else:
        found = _wait(str(spec), wait_s,
                      lambda: [d.path for d in list_devices() if d.kind == "disk" and d.serial == spec.value])
    if not found:
        present = "; ".join(identify(p).describe() for p in _disk_nodes()) or "none"
        raise DeviceNotFound(f"target {spec} not found after {wait_s:.0f} s; disks present: {present}",
                             "check the target's by-id name, WWN or serial; nothing was written")
    if len(found) > 1:
        raise TargetRefused(f"target {spec} matches {len(found)} disks ({', '.join(found)}); nothing was written")
    node = os.path.realpath(found[0])
    st = os.stat(node)
    if not stat.S_ISBLK(st.st_mode):
        raise TargetRefused(f"target {spec} is {node}, not a block device; nothing was written")
    name = sysfs.name_of_devnum(st.st_rdev)
    if name is None or sysfs.whole_disk(name) != name:
        raise TargetRefused(f"target {spec} is {node}, a partition, not a whole disk; nothing was written",
                            "name the disk itself")
    return node


def whole_disk_of(node: str) -> str | None:
    try:
        name = sysfs.name_of_devnum(os.stat(node).st_rdev)
    except OSError:
        return None
    return f"/dev/{sysfs.whole_disk(name)}" if name else None


def medium_device() -> str | None:
    """The device the rescue medium is mounted from (the initramfs mounted it at MEDIUM)."""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                dev, point = line.split()[:2]
                if point == str(MEDIUM):
                    return dev
    except OSError:
        pass
    return None


class Mounts:
    """Devices this run mounted, each once, under RUN_DIR; ``close`` unmounts them in reverse."""

    def __init__(self) -> None:
        self.points: dict[str, Path] = {}

    def mount(self, device: str, read_only: bool) -> Path:
        if device in self.points:
            return self.points[device]
        point = RUN_DIR / f"dev-{os.getpid()}-{len(self.points)}"   # one console's menu, another's
        point.mkdir(parents=True, exist_ok=True)
        opts = ["-o", "ro"] if read_only else []
        proc = tools.run(["mount", *opts, device, str(point)], timeout=tools.PROBE_TIMEOUT)
        if proc.returncode != 0:
            raise ImgBackupError(f"cannot mount {device}: {proc.stderr.strip()}")
        self.points[device] = point
        return point

    def path_of(self, location: Location, wait_s: float, read_only: bool) -> tuple[Path, str | None]:
        """The local path of ``location`` (its device mounted) and the device, None for the medium."""
        if location.device is None:
            return Path(location.path), None
        if location.device == "MEDIA":
            return MEDIUM / location.path.lstrip("/"), None
        device = find_device(location.device, wait_s)
        return self.mount(device, read_only) / location.path.lstrip("/"), device

    def close(self) -> list[str]:
        problems = []
        os.sync()
        for device, point in reversed(list(self.points.items())):
            proc = tools.retry(["umount", str(point)], timeout=tools.PROBE_TIMEOUT)
            if proc.returncode != 0:
                problems.append(f"cannot unmount {device}: {proc.stderr.strip()}")
        self.points.clear()
        return problems

"""What is this disk? Size, model, serial and filesystem, for confirmation prompts and image metadata.

Sources, best first: udev's database through pyudev (only filled when a udev daemon runs),
then sysfs attributes (model, vendor, serial, vpd_pg80, wwid), then ``blkid -p`` for the
filesystem (it probes the device itself and needs no udev). Loop devices have no model or
serial anywhere; their backing file identifies them instead.
"""

from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from imgbackup.device import sysfs
from imgbackup.device.tools import blkid
from imgbackup.errors import SourceError, ToolMissing, ToolTimeout


@dataclass
class DeviceIdentity:
    """One disk, partition, loop device or image file as the user would recognise it."""

    path: str
    name: str
    size: int
    model: str | None
    serial: str | None
    vendor: str | None
    logical_sector_size: int
    kind: str  # "disk" | "part" | "loop" | "file"
    backing_file: str | None
    fstype: str | None
    label: str | None
    uuid: str | None
    parent: str | None
    wwn: str | None = None      # World Wide Name (SAS/SATA/NVMe/FC), the most stable name a disk has

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line for a confirmation prompt: path, both size units, then what names it."""
        parts = [f"{self.path}: {human_size(self.size)}"]
        if self.vendor and self.model and not self.model.startswith(self.vendor):
            parts.append(f"model '{self.vendor} {self.model}'")
        elif self.model:
            parts.append(f"model '{self.model}'")
        if self.serial:
            parts.append(f"serial '{self.serial}'")
        if self.wwn:
            parts.append(f"WWN {self.wwn}")
        if self.backing_file:
            parts.append(f"loop device backed by '{self.backing_file}'")
        if self.kind == "part" and self.parent:
            parts.append(f"partition of {self.parent}")
        if self.fstype:
            parts.append(f"{self.fstype} filesystem" + (f" '{self.label}'" if self.label else ""))
        return ", ".join(parts)


def human_size(n: int) -> str:
    """'500.1 GB (465.8 GiB)': vendors label in decimal units, tools such as lsblk in binary."""
    return f"{_scaled(n, 1000, ['B', 'kB', 'MB', 'GB', 'TB', 'PB'])} " \
           f"({_scaled(n, 1024, ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'])})"


def _scaled(n: int, base: int, units: list[str]) -> str:
    value = float(n)
    for unit in units[:-1]:
        if value < base:
            return f"{n} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= base
    return f"{value:.1f} {units[-1]}"


def _udev_properties(name: str) -> dict[str, str]:
    """udev properties of a block device; empty when pyudev or the udev database is missing."""
    try:
        import pyudev

        device = pyudev.Devices.from_name(pyudev.Context(), "block", name)
        return {k: device.properties[k] for k in device.properties}
    except Exception:  # noqa: BLE001 - any failure here just means "no udev data"
        return {}


def _udev_text(props: dict[str, str], key: str) -> str | None:
    """Prefer the *_ENC form (spaces kept, as \\x20 escapes) over the underscored one."""
    enc = props.get(f"{key}_ENC")
    if enc:
        text = enc.encode("latin-1", "replace").decode("unicode_escape").strip()
        if text:
            return text
    return props.get(key) or None


def _vpd_serial(base: Path) -> str | None:
    """SCSI VPD page 0x80 (unit serial number): 4-byte header, then ASCII."""
    try:
        raw = (base / "vpd_pg80").read_bytes()
    except OSError:
        return None
    text = raw[4:].decode("ascii", "replace").strip(" \x00")
    return text or None


def _sysfs_hardware(disk: str) -> tuple[str | None, str | None, str | None]:
    """(model, serial, vendor) of a whole disk from sysfs."""
    base = sysfs.SYS_BLOCK / disk
    dev = base / "device"
    model = sysfs.read_attr(dev / "model") or sysfs.read_attr(base / "model")
    vendor = sysfs.read_attr(dev / "vendor")
    if vendor and vendor.startswith("0x"):
        vendor = None  # virtio and NVMe show a PCI vendor id here, not a name
    serial = (sysfs.read_attr(dev / "serial") or sysfs.read_attr(base / "serial")
              or _vpd_serial(dev) or sysfs.read_attr(dev / "wwid") or sysfs.read_attr(base / "wwid"))
    return model, serial, vendor


def _sysfs_wwn(disk: str) -> str | None:
    """A WWN from sysfs ``wwid`` ('naa.5000c500…' on SCSI/SATA, 'eui.…' on NVMe) as 0x…, else None."""
    for base in (sysfs.SYS_BLOCK / disk / "device", sysfs.SYS_BLOCK / disk):
        text = sysfs.read_attr(base / "wwid")
        if text and text.startswith("naa."):
            return "0x" + text[4:].lower()
    return None


def _hardware(disk: str) -> tuple[str | None, str | None, str | None, str | None]:
    props = _udev_properties(disk)
    model, serial, vendor = _sysfs_hardware(disk)
    # A SCSI/SAS disk with a WWN gets ID_SERIAL_SHORT = that WWN (VPD page 0x83); the serial on its
    # label is page 0x80, ID_SCSI_SERIAL. (USB bridges report junk there: only for ID_BUS=scsi.)
    scsi_serial = props.get("ID_SCSI_SERIAL") if props.get("ID_BUS") == "scsi" else None
    return (
        _udev_text(props, "ID_MODEL") or model,
        scsi_serial or props.get("ID_SERIAL_SHORT") or props.get("ID_SERIAL") or serial,
        _udev_text(props, "ID_VENDOR") or vendor,
        props.get("ID_WWN_WITH_EXTENSION") or props.get("ID_WWN") or _sysfs_wwn(disk),
    )


def _sector_size(name: str) -> int:
    text = sysfs.read_attr(sysfs.SYS_BLOCK / name / "queue" / "logical_block_size")
    if text is None and sysfs.is_partition(name):
        text = sysfs.read_attr(sysfs.SYS_BLOCK / sysfs.whole_disk(name) / "queue" / "logical_block_size")
    return int(text) if text and text.isdigit() else 512


def _fs_fields(path: str, name: str | None) -> tuple[str | None, str | None, str | None]:
    try:
        probed = blkid(path)
    except (ToolMissing, ToolTimeout):   # identity is best effort: udev may still know
        probed = {}
    if not probed and name:
        props = _udev_properties(name)
        probed = {"TYPE": props.get("ID_FS_TYPE", ""), "LABEL": _udev_text(props, "ID_FS_LABEL") or "",
                  "UUID": props.get("ID_FS_UUID", "")}
    return probed.get("TYPE") or None, probed.get("LABEL") or None, probed.get("UUID") or None


def identify_name(name: str) -> DeviceIdentity:
    """Identity of a block device by its kernel name (used by discovery, which has no paths)."""
    path = f"/dev/{name}"
    disk = sysfs.whole_disk(name)
    is_part = disk != name
    backing = sysfs.backing_file(disk)
    if disk.startswith("loop"):
        model = serial = vendor = wwn = None
    else:
        model, serial, vendor, wwn = _hardware(disk)
    fstype, label, uuid = _fs_fields(path, name)
    return DeviceIdentity(
        path=path, name=name, size=sysfs.size_bytes(name), model=model, serial=serial,
        vendor=vendor, logical_sector_size=_sector_size(name),
        kind="part" if is_part else ("loop" if disk.startswith("loop") else "disk"),
        backing_file=backing, fstype=fstype, label=label, uuid=uuid,
        parent=f"/dev/{disk}" if is_part else None, wwn=wwn,
    )


def identify(path: str | os.PathLike) -> DeviceIdentity:
    """Identity of a block device node (any symlink to it) or a regular image file."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as err:
        raise SourceError(f"{path}: {err.strerror}") from err
    if stat.S_ISREG(st.st_mode):
        fstype, label, uuid = _fs_fields(path, None)
        return DeviceIdentity(
            path=os.path.abspath(path), name=os.path.basename(path), size=st.st_size, model=None,
            serial=None, vendor=None, logical_sector_size=512, kind="file", backing_file=None,
            fstype=fstype, label=label, uuid=uuid, parent=None,
        )
    if not stat.S_ISBLK(st.st_mode):
        raise SourceError(f"{path}: not a regular file or block device")
    name = sysfs.name_of_devnum(st.st_rdev)
    if name is None:
        raise SourceError(f"{path}: block device not known to sysfs")
    ident = identify_name(name)
    node = os.path.realpath(path)
    if node != ident.path and not os.path.exists(ident.path):
        ident.path = node  # a node outside /dev (mknod'ed elsewhere): keep what works
    return ident

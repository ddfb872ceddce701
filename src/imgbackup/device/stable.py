"""Sources named by what they are, not by where the kernel put them this boot; and their fingerprints.

A scheduled job must image the same disk every night. ``/dev/sdb`` is whichever disk the kernel
found second, so a job names its source by a stable identity instead (``STABLE_FORMS``) and
``resolve_source`` finds the device node it has today. ``fingerprint`` records what makes the disk
that disk (serial, WWN, model, size, partition table id, filesystem and partition UUIDs), so a
job can refuse a different disk that turns up under the same name.

Serial and WWN are read from sysfs only (never from udev's database, which may or may not be
there): the same disk must give the same fingerprint with and without a udev daemon.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from imgbackup.device import sysfs
from imgbackup.device.tools import blkid
from imgbackup.errors import SourceError, UsageError

STABLE_FORMS = ("/dev/disk/by-id/…", "/dev/disk/by-uuid/…", "/dev/disk/by-partuuid/…", "/dev/mapper/…",
                "UUID=<filesystem uuid>", "PARTUUID=<partition uuid>", "SERIAL=<disk serial>",
                "WWN=<disk wwn>", "an image file's absolute path")
_KEYED = ("UUID", "PARTUUID", "SERIAL", "WWN")
_SKIP = re.compile(r"^(ram|zram)\d+")


@dataclass(frozen=True)
class ResolvedSource:
    spec: str          # as the job file names it
    path: str          # what to open today: a device node or the image file
    kind: str          # "block" or "file"


def check_stable(spec: str) -> str | None:
    """Why ``spec`` is not a stable source name (None when it is one). No device is touched."""
    key, sep, value = spec.partition("=")
    if sep and key in _KEYED:
        return None if value.strip() else f"{key}= needs a value"
    if sep and key.upper() in _KEYED:
        return f"write {key.upper()}= in capitals"
    if key == "LABEL" and sep:
        return "a filesystem label is not unique enough to name a job's source"
    if not spec.startswith("/"):
        return "not an absolute path and not KEY=VALUE"
    parts = os.path.normpath(spec).split("/")[1:]
    if parts[0] == "dev" and len(parts) == 2:
        return f"{spec} is a kernel name, which can change between boots"
    if parts[:3] == ["dev", "disk", "by-diskseq"]:
        return "by-diskseq names change whenever the disk is attached again"
    return None


def _devices() -> list[str]:
    names = []
    for name in sysfs.all_names():
        disk = sysfs.whole_disk(name)
        if _SKIP.match(name) or (disk.startswith("loop") and sysfs.backing_file(disk) is None):
            continue
        if sysfs.size_bytes(name) > 0:
            names.append(name)
    return names


def _normal_wwn(text: str) -> str:
    text = text.strip().lower()
    for prefix in ("naa.", "eui.", "0x", "t10."):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text


def disk_hardware(disk: str) -> dict:
    """model, serial and wwn of a whole disk from sysfs (None where the kernel has none)."""
    base = sysfs.SYS_BLOCK / disk
    dev = base / "device"
    serial = sysfs.read_attr(dev / "serial") or sysfs.read_attr(base / "serial")
    if serial is None:
        try:
            raw = (dev / "vpd_pg80").read_bytes()
            serial = raw[4:].decode("ascii", "replace").strip(" \x00") or None
        except OSError:
            pass
    wwid = sysfs.read_attr(dev / "wwid") or sysfs.read_attr(base / "wwid")
    return {"model": sysfs.read_attr(dev / "model") or sysfs.read_attr(base / "model"),
            "serial": serial, "wwn": _normal_wwn(wwid) if wwid else None}


def _matches(key: str, value: str, name: str) -> bool:
    want = value.strip()
    if key in ("SERIAL", "WWN"):
        if sysfs.is_partition(name):
            return False
        hw = disk_hardware(name)
        return (hw["serial"] == want) if key == "SERIAL" else (hw["wwn"] == _normal_wwn(want))
    probed = blkid(f"/dev/{name}")
    field = "UUID" if key == "UUID" else "PART_ENTRY_UUID"
    return probed.get(field, "").lower() == want.lower()


def resolve_source(spec: str) -> ResolvedSource:
    """The device node or file ``spec`` names today; SourceError when none or several match."""
    problem = check_stable(spec)
    if problem:
        raise UsageError(f"source {spec!r}: {problem}", "name it by " + ", ".join(STABLE_FORMS))
    key, sep, value = spec.partition("=")
    if sep and key in _KEYED:
        found = [n for n in _devices() if _matches(key, value, n)]
        if not found:
            raise SourceError(f"no device has {spec} (is the disk attached?)")
        if len(found) > 1:
            raise SourceError(f"{spec} matches {len(found)} devices ({', '.join(found)}): a cloned disk?",
                              "name the source by SERIAL= or /dev/disk/by-id/ instead")
        return ResolvedSource(spec, f"/dev/{found[0]}", "block")
    try:
        st = os.stat(spec)
    except FileNotFoundError:
        raise SourceError(f"source {spec} does not exist (is the disk attached?)") from None
    except OSError as exc:
        raise SourceError(f"source {spec}: {exc.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        return ResolvedSource(spec, spec, "file")
    if not stat.S_ISBLK(st.st_mode):
        raise SourceError(f"source {spec} is neither a block device nor an image file")
    name = sysfs.name_of_devnum(st.st_rdev)
    node = f"/dev/{name}" if name and os.path.exists(f"/dev/{name}") else os.path.realpath(spec)
    return ResolvedSource(spec, node, "block")


def fingerprint(path: str) -> dict:
    """What identifies the disk, partition or image file at ``path`` (fields None when unknown)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SourceError(f"{path}: {exc.strerror}") from None
    probed = blkid(path)
    doc: dict = {"kind": "file", "size": st.st_size, "model": None, "serial": None, "wwn": None,
                 "backing_file": None}
    if stat.S_ISBLK(st.st_mode):
        name = sysfs.name_of_devnum(st.st_rdev)
        if name is None:
            raise SourceError(f"{path}: block device not known to sysfs")
        disk = sysfs.whole_disk(name)
        doc.update(kind="partition" if disk != name else "disk", size=sysfs.size_bytes(name),
                   backing_file=sysfs.backing_file(disk))
        if not disk.startswith("loop"):
            doc.update(disk_hardware(disk))
    doc.update(table=probed.get("PTTYPE") or None, table_id=(probed.get("PTUUID") or "").lower() or None,
               fs_uuid=(probed.get("UUID") or "").lower() or None,
               partuuid=(probed.get("PART_ENTRY_UUID") or "").lower() or None)
    return doc


FINGERPRINT_LABELS = {"kind": "kind", "size": "size", "model": "model", "serial": "serial", "wwn": "WWN",
                      "backing_file": "loop backing file", "table": "partition table type",
                      "table_id": "partition table GUID/id", "fs_uuid": "filesystem UUID",
                      "partuuid": "partition UUID"}


def fingerprint_differences(recorded: dict, current: dict) -> list[str]:
    """What differs, as 'serial: was X, now Y' lines; every field recorded non-empty must match."""
    out = []
    for key, label in FINGERPRINT_LABELS.items():
        was = recorded.get(key)
        if was not in (None, "") and current.get(key) != was:
            out.append(f"{label}: was {was!r}, now {current.get(key)!r}")
    return out

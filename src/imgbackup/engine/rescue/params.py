"""The ``imgbackup.*`` kernel parameters of the rescue media: parsed, checked, nothing resolved yet.

These names are a contract (README, "Rescue media"): unattended media are built with them baked
into the boot entry, typed at the boot menu or handed over by PXE. Everything is checked before a
device is touched, so a typo stops the rescue with its reason instead of doing something else.

A target must name one disk by a stable identity: ``/dev/disk/by-id/…`` (which includes
``wwn-0x…``), ``WWN=0x…`` or ``SERIAL=…``. Kernel names such as ``/dev/sda`` change between boots
and with the order disks answer, so they are refused, as is any "first disk" shorthand.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import asdict, dataclass

from imgbackup.errors import UsageError

PREFIX = "imgbackup."
ACTIONS = ("restore", "menu", "shell")
AFTER = ("poweroff", "reboot", "shell")
ON_FAILURE = ("shell", "poweroff", "reboot")
KNOWN = {"action", "repo", "image", "name", "target", "passphrase-file", "grow", "after",
         "on-failure", "wait", "log", "media", "partition"}
DEFAULT_WAIT_S = 60       # USB and SAN disks can take tens of seconds to appear after udev starts
MAX_WAIT_S = 3600
_TRUE = ("yes", "true", "1", "on")
_FALSE = ("no", "false", "0", "off")
_DEVICE_SPEC = re.compile(r"^(LABEL|UUID|PARTUUID|PARTLABEL)=[^:\s]+$|^/dev/\S+$|^MEDIA$")
_UNSTABLE = re.compile(r"^/dev/(sd[a-z]+|vd[a-z]+|hd[a-z]+|xvd[a-z]+|nvme\d+n\d+|mmcblk\d+|sr\d+)$")
_FIRST = ("first", "auto", "any", "1", "0", "default")


@dataclass(frozen=True)
class Location:
    """A file on a device: ``device`` (LABEL=…, UUID=…, a /dev path, MEDIA for the rescue medium
    itself; None: the running system) and the path on it."""

    device: str | None
    path: str

    def __str__(self) -> str:
        return f"{self.device}:{self.path}" if self.device else self.path


@dataclass(frozen=True)
class TargetSpec:
    """How the target disk is named: ``kind`` is ``by-id`` (a /dev/disk/by-id path), ``wwn`` or ``serial``."""

    kind: str
    value: str

    def __str__(self) -> str:
        return self.value if self.kind == "by-id" else f"{self.kind.upper()}={self.value}"


@dataclass(frozen=True)
class RescueParams:
    action: str
    repo: Location | None = None
    image: str = "latest"
    name: str | None = None
    target: TargetSpec | None = None
    passphrase_file: Location | None = None
    grow: bool = False
    partition: int | None = None
    after: str = "shell"
    on_failure: str = "shell"
    wait_s: int = DEFAULT_WAIT_S
    log: Location | None = None
    media: str | None = None
    unknown: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("repo", "passphrase_file", "log", "target"):
            value = getattr(self, key)
            data[key] = None if value is None else str(value)
        data["unknown"] = list(self.unknown)
        return data


def kernel_words(cmdline: str) -> list[str]:
    """Split a kernel command line the way the kernel does (double quotes group, no escapes)."""
    try:
        return shlex.split(cmdline, posix=True)
    except ValueError as exc:
        raise UsageError(f"kernel command line cannot be split: {exc}") from None


def raw_params(cmdline: str) -> dict[str, str]:
    """``imgbackup.KEY=VALUE`` words as {KEY: VALUE}; a later word overrides an earlier one.

    The later-wins rule is what lets an operator override a baked-in parameter at the boot menu:
    words typed there come after the entry's own.
    """
    found: dict[str, str] = {}
    for word in kernel_words(cmdline):
        if word.startswith(PREFIX):
            key, _, value = word[len(PREFIX):].partition("=")
            found[key] = value
    return found


def parse_location(value: str, what: str) -> Location:
    """``LABEL=BACKUP:/repo``, ``UUID=…:/p``, ``/dev/disk/by-id/…:/p`` or a plain absolute path."""
    if not value:
        raise UsageError(f"imgbackup.{what} is empty")
    if value.startswith("/") and ":" not in value:
        return Location(None, value)
    device, sep, path = value.rpartition(":")
    if not sep or not _DEVICE_SPEC.match(device):
        raise UsageError(f"imgbackup.{what}={value}: expected DEVICE:/PATH with DEVICE as LABEL=…, UUID=…, "
                         f"PARTUUID=…, PARTLABEL=…, /dev/… or MEDIA, or an absolute path")
    if not path.startswith("/") or "/../" in f"{path}/":
        raise UsageError(f"imgbackup.{what}={value}: the path after ':' must be absolute, without '..'")
    return Location(device, path)


def parse_target(value: str) -> TargetSpec:
    """One disk by a stable identity; kernel names and "first disk" shorthands are refused."""
    if not value:
        raise UsageError("imgbackup.target is empty")
    if value.lower() in _FIRST or _UNSTABLE.match(value):
        raise UsageError(f"imgbackup.target={value} is not a stable identity: kernel names change between "
                         f"boots", "name the disk as /dev/disk/by-id/…, WWN=0x… or SERIAL=…")
    if value.startswith("/dev/disk/by-id/") and len(value) > len("/dev/disk/by-id/") and "/" not in value[16:]:
        return TargetSpec("by-id", value)
    kind, sep, rest = value.partition("=")
    if sep and rest and kind.upper() == "WWN":
        if not re.fullmatch(r"(0x)?[0-9a-fA-F]{8,32}", rest):
            raise UsageError(f"imgbackup.target={value}: a WWN is hex digits, e.g. WWN=0x5000c500a1b2c3d4")
        return TargetSpec("wwn", rest.lower() if rest.lower().startswith("0x") else "0x" + rest.lower())
    if sep and rest and kind.upper() == "SERIAL":
        return TargetSpec("serial", rest)
    raise UsageError(f"imgbackup.target={value} is not a stable identity",
                     "name the disk as /dev/disk/by-id/…, WWN=0x… or SERIAL=…")


def _choice(raw: dict[str, str], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = raw.get(key, default)
    if value not in allowed:
        raise UsageError(f"imgbackup.{key}={value}: expected one of {', '.join(allowed)}")
    return value


def _flag(raw: dict[str, str], key: str) -> bool:
    value = raw.get(key, "no").lower()
    if value in _TRUE or value == "":
        return True
    if value in _FALSE:
        return False
    raise UsageError(f"imgbackup.{key}={raw[key]}: expected yes or no")


def _number(raw: dict[str, str], key: str, default: int | None, low: int, high: int) -> int | None:
    if key not in raw:
        return default
    try:
        value = int(raw[key])
    except ValueError:
        raise UsageError(f"imgbackup.{key}={raw[key]}: expected a whole number") from None
    if not low <= value <= high:
        raise UsageError(f"imgbackup.{key}={value}: expected {low}..{high}")
    return value


def parse_params(cmdline: str) -> RescueParams:
    """The rescue parameters of ``cmdline``; UsageError names the first bad one."""
    raw = raw_params(cmdline)
    action = _choice(raw, "action", ACTIONS, "menu")
    common = dict(after=_choice(raw, "after", AFTER, "shell"),
                  on_failure=_choice(raw, "on-failure", ON_FAILURE, "shell"),
                  wait_s=_number(raw, "wait", DEFAULT_WAIT_S, 0, MAX_WAIT_S),
                  media=raw.get("media") or None,
                  unknown=tuple(sorted(k for k in raw if k not in KNOWN)))
    log = parse_location(raw["log"], "log") if raw.get("log") else None
    if action != "restore":
        return RescueParams(action=action, log=log, **common)
    for key in ("repo", "target"):
        if not raw.get(key):
            raise UsageError(f"imgbackup.action=restore needs imgbackup.{key}")
    image = raw.get("image") or "latest"
    name = raw.get("name") or None
    if image == "latest" and not name:
        raise UsageError("imgbackup.image=latest needs imgbackup.name (which source's latest image)")
    passphrase = raw.get("passphrase-file")
    return RescueParams(
        action=action, repo=parse_location(raw["repo"], "repo"), image=image, name=name,
        target=parse_target(raw["target"]),
        passphrase_file=parse_location(passphrase, "passphrase-file") if passphrase else None,
        grow=_flag(raw, "grow"), partition=_number(raw, "partition", None, 1, 128), log=log, **common)

"""The systemd units ``job install`` writes: ``imgbackup-job-NAME.service`` and ``.timer``.

The service is a oneshot at the lowest CPU and I/O priority, sandboxed so that the job can read
its source raw but write no disk at all: the file system is read-only except the job's own
folders (state, a local repository, metrics, audit file, a drill's scratch file), and the device
policy is closed with read-only access to the source (and the block majors it may show up on) plus
what verification needs (loop devices, /dev/fuse). Sleep is inhibited by the job itself
(``inhibit.py``), so ``ExecStart`` is exactly ``imgbackup job run NAME``: the passphrase stays in
its file, never on a command line. The timer is ``Persistent=`` (a run missed while the machine
was off happens at the next boot) with a ``RandomizedDelaySec=`` so that many hosts do not start
at the same second; ``FixedRandomDelay=`` keeps each host's delay the same every day, so the gap
between two runs stays the schedule's and does not drift towards the RPO.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from imgbackup.device import sysfs
from imgbackup.device.stable import resolve_source
from imgbackup.engine.job.config import JobConfig
from imgbackup.errors import ImgBackupError

DEFAULT_UNIT_DIR = "/etc/systemd/system"
UNIT_PREFIX = "imgbackup-job-"
MARKER = "# Written by 'imgbackup job install'; 'imgbackup job uninstall {name}' removes it. Do not edit."
# Block device majors (``/proc/devices`` names) a source may show up on when it is not attached at
# install time, or moves: SCSI/SATA/USB, virtio, NVMe and extended partitions, MMC, md, dm, loop.
SOURCE_MAJORS = ("sd", "virtblk", "blkext", "mmc", "md", "device-mapper", "loop")
CAPABILITIES = ("CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_CHOWN",
                "CAP_SYS_RAWIO", "CAP_KILL")
_PLAIN = re.compile(r"[A-Za-z0-9_/.:=@+,-]+")


def unit_names(name: str) -> tuple[str, str]:
    return f"{UNIT_PREFIX}{name}.service", f"{UNIT_PREFIX}{name}.timer"


def systemd_quote(arg: str) -> str:
    """One ExecStart word as systemd splits it: ``%`` and ``$`` doubled, quoted when not plain."""
    text = arg.replace("%", "%%").replace("$", "$$")
    if _PLAIN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def imgbackup_command() -> list[str]:
    """How systemd should start this imgbackup: its own entry script, else this Python with -m."""
    script = Path(sys.executable).parent / "imgbackup"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "imgbackup"]


def _is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def _local_dir(location: str) -> str | None:
    if location.startswith("file://"):
        return location[len("file://"):]
    return None if _is_remote(location) else location


def _devices(cfg: JobConfig) -> list[str]:
    """DeviceAllow= lines: the source read-only, loop devices and FUSE for verify and drills."""
    lines = []
    if cfg.source.startswith("/dev/"):
        lines.append(f"{cfg.source} r")
    try:
        resolved = resolve_source(cfg.source)
        if resolved.kind == "block":
            lines.append(f"{resolved.path} r")
            if major := block_major_name(resolved.path):
                lines.append(f"block-{major} r")
    except ImgBackupError:
        pass   # not attached now: the majors below still let the job find it
    lines += [f"block-{major} r" for major in SOURCE_MAJORS if major != "loop"]
    lines += ["block-loop rw", "/dev/loop-control rw", "/dev/fuse rw"]
    if cfg.drill.restore_to and cfg.drill.restore_to.startswith("/dev/"):
        lines.append(f"{cfg.drill.restore_to} rw")
    if cfg.snapshot in ("lvm", "auto"):   # lvcreate makes and removes a device-mapper snapshot
        lines += ["block-device-mapper rw", "/dev/mapper/control rw"]
    return list(dict.fromkeys(lines))


def _writable(cfg: JobConfig, state_dir: str) -> list[str]:
    paths = [state_dir]
    for location in [cfg.repository, *(c.repository for c in cfg.copy_to)]:
        if local := _local_dir(location):
            paths.append(local)
    if cfg.metrics_dir:
        paths.append(cfg.metrics_dir)
    paths += [os.path.dirname(a[len("file:"):]) for a in cfg.audit if a.startswith("file:")]
    if cfg.drill.restore_to and not cfg.drill.restore_to.startswith("/dev/"):
        paths.append(os.path.dirname(cfg.drill.restore_to))
    if cfg.snapshot in ("reflink", "auto") and not cfg.source.startswith("/dev/") and "=" not in cfg.source:
        paths.append(os.path.dirname(cfg.source))      # the reflink clone is made beside the image file
    if cfg.snapshot in ("lvm", "auto"):
        paths += ["/run/lvm", "/etc/lvm/archive", "/etc/lvm/backup"]
    return list(dict.fromkeys(paths))


def service_unit(cfg: JobConfig, command: list[str], config_dir: str, state_dir: str) -> str:
    remote = any(_is_remote(x) for x in [cfg.repository, *(c.repository for c in cfg.copy_to)])
    argv = [*command, "job", "run", cfg.name, "--config-dir", config_dir, "--state-dir", state_dir]
    mounts = [p for p in (_local_dir(cfg.repository), cfg.metrics_dir) if p]
    lines = [
        MARKER.format(name=cfg.name),
        "[Unit]",
        f"Description=imgbackup job {cfg.name}: image {cfg.source} into {cfg.repository}",
        "After=local-fs.target" + (" network-online.target" if remote else ""),
        *(["Wants=network-online.target"] if remote else []),
        *([f"RequiresMountsFor={' '.join(systemd_quote(p) for p in mounts)}"] if mounts else []),
        "",
        "[Service]",
        "Type=oneshot",
        "ExecStart=" + " ".join(systemd_quote(a) for a in argv),
        f"EnvironmentFile=-{systemd_quote(os.path.join(config_dir, cfg.name + '.env'))}",
        f"Environment=IMGBACKUP_RUN_DIR=/run/imgbackup/{UNIT_PREFIX}{cfg.name}",
        f"RuntimeDirectory=imgbackup/{UNIT_PREFIX}{cfg.name}",
        f"Nice={cfg.nice}",
        f"IOSchedulingClass={cfg.io_class}",
        "CPUSchedulingPolicy=batch",
        f"TimeoutStartSec={int(cfg.timeout) if cfg.timeout else 'infinity'}",
        "KillMode=mixed",
        "TimeoutStopSec=120",
        "UMask=0077",
        "# Sandbox: read-only system, raw read of the source, no disk writable.",
        "ProtectSystem=strict",
        *(f"ReadWritePaths=-{systemd_quote(p)}" for p in _writable(cfg, state_dir)),
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        *([] if remote else ["PrivateNetwork=yes"]),
        "DevicePolicy=closed",
        *(f"DeviceAllow={line}" for line in _devices(cfg)),
        f"CapabilityBoundingSet={' '.join(CAPABILITIES)}",
        "NoNewPrivileges=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "RestrictAddressFamilies=AF_UNIX AF_NETLINK" + (" AF_INET AF_INET6" if remote else ""),
    ]
    return "\n".join(lines) + "\n"


def timer_unit(cfg: JobConfig) -> str:
    service, _ = unit_names(cfg.name)
    lines = [
        MARKER.format(name=cfg.name),
        "[Unit]",
        f"Description=Schedule of imgbackup job {cfg.name} ({cfg.schedule})",
        "",
        "[Timer]",
        f"OnCalendar={cfg.schedule}",
        "Persistent=true",
        f"RandomizedDelaySec={int(cfg.randomized_delay)}",
        "FixedRandomDelay=true",
        f"Unit={service}",
        "",
        "[Install]",
        "WantedBy=timers.target",
    ]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def is_ours(path: Path) -> bool:
    try:
        with open(path) as f:
            return f.readline().startswith("# Written by 'imgbackup job install'")
    except OSError:
        return False


def write_units(cfg: JobConfig, unit_dir: str, command: list[str], config_dir: str, state_dir: str) -> list[str]:
    """Write (or replace our own) units; refuses to overwrite units someone else wrote."""
    from imgbackup.errors import TargetRefused

    directory = Path(unit_dir)
    directory.mkdir(parents=True, exist_ok=True)
    service, timer = (directory / n for n in unit_names(cfg.name))
    for path in (service, timer):
        if path.exists() and not is_ours(path):
            raise TargetRefused(f"{path} exists and was not written by imgbackup", "remove or rename it first")
    _write(service, service_unit(cfg, command, config_dir, state_dir))
    _write(timer, timer_unit(cfg))
    return [str(service), str(timer)]


def remove_units(name: str, unit_dir: str) -> list[str]:
    removed = []
    for unit in unit_names(name):
        path = Path(unit_dir) / unit
        if path.exists() and is_ours(path):
            path.unlink()
            removed.append(str(path))
    return removed


def installed_units(unit_dir: str) -> dict[str, list[str]]:
    """Job name -> our unit files in ``unit_dir``."""
    found: dict[str, list[str]] = {}
    for path in sorted(Path(unit_dir).glob(f"{UNIT_PREFIX}*")):
        if path.suffix in (".service", ".timer") and is_ours(path):
            found.setdefault(path.stem[len(UNIT_PREFIX):], []).append(str(path))
    return found


def systemd_running() -> bool:
    """Whether systemd is this machine's init (sd_booted's test)."""
    return os.path.isdir("/run/systemd/system")


def block_major_name(path: str) -> str | None:
    """/proc/devices name of a block device's major (for DeviceAllow=block-NAME)."""
    name = sysfs.name_of_path(path)
    dev = sysfs.devnum_of_name(name) if name else None
    if dev is None:
        return None
    try:
        text = Path("/proc/devices").read_text().split("Block devices:", 1)[1]
    except (OSError, IndexError):
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) == os.major(dev):
            return parts[1]
    return None

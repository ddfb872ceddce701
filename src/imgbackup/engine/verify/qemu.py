"""Prove that a disk boots: run it in QEMU (TCG) and watch the serial console for a marker.

A restored disk is only as good as its boot loader, its partition table and its root
filesystem together; the one honest check is to boot it. ``boot_check`` starts
``qemu-system-x86_64`` in its own process group, reads the console incrementally, and stops
the guest as soon as ``expect`` appears, when the guest exits, or at ``timeout``. The qemu
process group is always killed by its own PID, so no guest outlives the call; qemu also gets
PR_SET_PDEATHSIG, so it dies even when the calling process is killed outright.

With ``snapshot=True`` (the default) the disks are opened read-only for the guest's purposes:
writes go to a throwaway overlay, so a read-only (e.g. FUSE-served) image can be booted.
"""

from __future__ import annotations

import os
import select
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from imgbackup.device.tools import Process, kill_group, spawn

QEMU = "qemu-system-x86_64"
OVMF_DIRS = ("/usr/share/OVMF", "/usr/share/ovmf", "/usr/share/qemu", "/usr/share/edk2/ovmf")
OVMF_CODE_NAMES = ("OVMF_CODE_4M.fd", "OVMF_CODE.fd")
TAIL_CHARS = 8000     # console kept for the report: a kernel's last screens, enough to see why it stopped
# Console text after which a guest can no longer reach the marker on its own: a kernel panic,
# OVMF dropping to its shell, SeaBIOS finding nothing to boot, syslinux's prompt after a
# failed load. Seeing one ends the check early with reason "gave-up" instead of a timeout.
GIVE_UP = ("Kernel panic - not syncing", "Shell> ", "No bootable device", "\nboot: ")


@dataclass
class BootResult:
    """What one boot attempt showed.

    ``reason`` says why it ended: ``found`` (marker seen), ``timeout``, ``exited`` (the guest
    stopped without printing the marker), ``gave-up`` (a ``give_up`` text appeared),
    ``qemu-missing`` or ``firmware-missing``.
    """

    booted: bool
    seconds: float
    console_tail: str
    command: list[str] = field(default_factory=list)
    reason: str = ""


def find_ovmf() -> tuple[Path, Path] | None:
    """The OVMF code and matching vars template installed by apt ``ovmf``, or None."""
    for d in OVMF_DIRS:
        for code_name in OVMF_CODE_NAMES:
            code = Path(d) / code_name
            vars_ = Path(d) / code_name.replace("CODE", "VARS")
            if code.is_file() and vars_.is_file():
                return code, vars_
    return None


def _drive_arg(path: str) -> str:
    # qemu's option parser treats ',' as a separator; a literal comma is written ',,'.
    return f"file={path.replace(',', ',,')},format=raw,if=virtio,readonly=off"


def qemu_command(drives: list[str], firmware: str, snapshot: bool, memory_mib: int,
                 ovmf: tuple[Path, Path] | None = None) -> list[str]:
    """The qemu argument list used by ``boot_check`` (``ovmf`` = code, writable vars copy)."""
    cmd = [QEMU, "-accel", "tcg", "-m", str(memory_mib), "-smp", "1", "-nographic",
           "-no-reboot", "-net", "none", "-boot", "strict=on,reboot-timeout=0"]
    if snapshot:
        cmd.append("-snapshot")
    if firmware == "uefi":
        if ovmf is None:
            raise ValueError("uefi needs the OVMF code and vars paths")
        cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={ovmf[0]}",
                "-drive", f"if=pflash,format=raw,unit=1,file={ovmf[1]}"]
    for d in drives:
        cmd += ["-drive", _drive_arg(d)]
    return cmd


def _watch(proc: Process, expect: bytes, give_up: list[bytes],
           deadline: float) -> tuple[str, bytes]:
    """Read the console until ``expect`` shows, qemu exits, or ``deadline``; return why + tail."""
    buf = b""
    fd = proc.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout", buf
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return "exited", buf
        buf += chunk
        if expect in buf:
            return "found", buf
        if any(g in buf for g in give_up):
            return "gave-up", buf
        # keep enough for the tail and for a marker split across two reads
        keep = max(TAIL_CHARS, len(expect), *map(len, give_up)) * 2
        if len(buf) > keep:
            buf = buf[-keep:]


def boot_check(drives: list[str] | str, expect: str, timeout: float = 60,
               firmware: Literal["bios", "uefi"] = "bios", snapshot: bool = True,
               memory_mib: int = 256, give_up: Sequence[str] = GIVE_UP) -> BootResult:
    """Boot ``drives`` (raw images; the first is the boot disk) and wait for ``expect``.

    ``give_up`` texts end the wait early (pass ``()`` to wait for the marker or the timeout).
    Returns ``booted=False`` with the console tail when the marker does not appear in time, and
    also when qemu or OVMF is not installed (``reason`` tells which).
    """
    if firmware not in ("bios", "uefi"):
        raise ValueError(f"firmware must be 'bios' or 'uefi', not {firmware!r}")
    drive_list = [drives] if isinstance(drives, str | os.PathLike) else list(drives)
    drive_list = [os.fspath(d) for d in drive_list]
    if not drive_list or not expect:
        raise ValueError("boot_check needs at least one drive and a non-empty marker")
    start = time.monotonic()
    if shutil.which(QEMU) is None:
        return BootResult(False, 0.0, f"{QEMU} not found (apt install qemu-system-x86)",
                          [QEMU], "qemu-missing")
    with tempfile.TemporaryDirectory(prefix="imgbackup-boot-") as tmp:
        ovmf = None
        if firmware == "uefi":
            found = find_ovmf()
            if found is None:
                return BootResult(False, 0.0, "OVMF firmware not found (apt install ovmf)",
                                  [QEMU], "firmware-missing")
            vars_copy = Path(tmp) / "OVMF_VARS.fd"
            shutil.copyfile(found[1], vars_copy)
            ovmf = (found[0], vars_copy)
        cmd = qemu_command(drive_list, firmware, snapshot, memory_mib, ovmf)
        proc = spawn(cmd, cwd=tmp)
        try:
            reason, buf = _watch(proc, expect.encode(), [g.encode() for g in give_up if g],
                                 start + timeout)
        finally:
            kill_group(proc)
            proc.stdout.close()
    tail = buf.decode(errors="replace").replace("\r\n", "\n")[-TAIL_CHARS:]
    return BootResult(reason == "found", time.monotonic() - start, tail, cmd, reason)

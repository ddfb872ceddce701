"""``verify --boot``: boot an image straight from the repository, a restore drill without a disk.

The image is served read-only through the FUSE view (``disk.img`` of a MountSession on a temp
directory) and booted with QEMU's ``-snapshot``: the guest's writes go to a throwaway overlay,
nothing reaches the repository. The mount and its server are torn down before this returns,
and boot_check kills its qemu by PID, so nothing is left running.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Literal

from imgbackup.device.tools import missing
from imgbackup.engine.mount.session import MountSession
from imgbackup.engine.verify.qemu import QEMU, boot_check, find_ovmf
from imgbackup.errors import ToolMissing
from imgbackup.repository.repo import Repository


@dataclass
class BootVerifyResult:
    image: str
    booted: bool
    reason: str
    seconds: float
    expect: str
    firmware: str
    console_tail: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def boot_verify(repo: Repository, image_id: str, expect: str, timeout: float = 120,
                firmware: Literal["bios", "uefi"] = "bios") -> BootVerifyResult:
    """Boot image ``image_id`` read-only and wait for ``expect`` on the serial console.

    ToolMissing (exit 12) when QEMU, or OVMF for ``uefi``, is not installed: checked before mounting.
    """
    if shutil.which(QEMU) is None:
        raise missing(QEMU)
    if firmware == "uefi" and find_ovmf() is None:
        raise ToolMissing("the OVMF UEFI firmware is not installed", "apt install ovmf")
    with tempfile.TemporaryDirectory(prefix="imgbackup-bootverify-") as tmp, \
            MountSession(repo, image_id, tmp, filesystems=False, fs_dirs=False, keep_log=False) as session:
        disk = os.path.join(session.mountpoint, "disk.img")
        result = boot_check(disk, expect, timeout=timeout, firmware=firmware, snapshot=True)
    return BootVerifyResult(image_id, result.booted, result.reason, round(result.seconds, 1), expect, firmware,
                            result.console_tail)

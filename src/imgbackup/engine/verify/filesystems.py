"""``verify --filesystems``: each partition's own checker on the mounted view, then a read-only mount.

The image is served through FUSE (nothing restored first); the checkers read the partition files
directly (``e2fsck -fn``, ``xfs_repair -n``, ``fsck.vfat -n``, ``btrfs check --readonly``), so a
damaged chunk reaches them as EIO — never as plausible wrong bytes — and fails the check. Then
each mountable filesystem is mounted read-only and walked, which catches damage the checker does
not look at (directory blocks it trusts, unreadable inodes).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field

from imgbackup.device.tools import probe_fstype, run
from imgbackup.engine.mount.session import FS_MOUNT_OPTIONS, MountSession, Volume
from imgbackup.errors import ToolTimeout
from imgbackup.repository.repo import Repository

CHECKERS = {
    "ext2": ["e2fsck", "-fn"], "ext3": ["e2fsck", "-fn"], "ext4": ["e2fsck", "-fn"],
    "xfs": ["xfs_repair", "-n", "-f"], "vfat": ["fsck.vfat", "-n"], "btrfs": ["btrfs", "check", "--readonly"],
}
NOT_FILESYSTEMS = {"swap", "linux_raid_member", "LVM2_member", "crypto_LUKS"}
CHECK_TIMEOUT = 1800      # a checker reading a large filesystem through FUSE; longer means it hangs
OUTPUT_TAIL = 20          # lines of checker output kept in the report: enough to see what it found


@dataclass
class PartitionCheck:
    name: str
    number: int
    size: int
    fstype: str | None = None
    checker: str | None = None
    checker_exit: int | None = None
    checker_output: list[str] = field(default_factory=list)
    mounted: bool = False
    files: int | None = None
    directories: int | None = None
    errors: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


@dataclass
class FilesystemReport:
    image: str
    partitions: list[PartitionCheck]

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.partitions)

    def to_dict(self) -> dict:
        return {"image": self.image, "ok": self.ok, "partitions": [p.to_dict() for p in self.partitions]}


def check_filesystems(repo: Repository, image_id: str) -> FilesystemReport:
    """Check every partition of an image; mounts and loop devices are gone when this returns."""
    with tempfile.TemporaryDirectory(prefix="imgbackup-verify-") as tmp:
        session = MountSession(repo, image_id, tmp, filesystems=False, fs_dirs=True, keep_log=False)
        with session:
            checks = [_check_volume(session, vol) for vol in session.volumes]
    return FilesystemReport(image_id, checks)


def _check_volume(session: MountSession, vol: Volume) -> PartitionCheck:
    check = PartitionCheck(vol.name, vol.number, vol.size)
    path = session.volume_file(vol)
    check.fstype = probe_fstype(path)
    if check.fstype is None:
        try:
            with open(path, "rb") as f:
                f.read(1 << 20)
            check.note = "no filesystem recognized; not checked"
        except OSError as exc:
            check.errors.append(f"partition is unreadable: {exc.strerror}")
        return check
    if check.fstype in NOT_FILESYSTEMS:
        check.note = f"{check.fstype}: no filesystem to check"
        return check
    _run_checker(check, path)
    if check.fstype in FS_MOUNT_OPTIONS:
        session.mount_volume(vol)
        check.mounted = vol.mounted
        if vol.mounted:
            _count_files(check, os.path.join(session.mountpoint, "fs", vol.name))
        else:
            check.errors.append(vol.note)
    elif not check.note:
        check.note = "checked only: this kernel cannot mount it"
    return check


def _run_checker(check: PartitionCheck, path: str) -> None:
    cmd = CHECKERS.get(check.fstype or "")
    if cmd is None:
        check.note = f"no checker for {check.fstype}"
        return
    check.checker = " ".join(cmd)
    try:
        res = run([*cmd, path], timeout=CHECK_TIMEOUT)   # ToolMissing (exit 12) when not installed
    except ToolTimeout:
        check.errors.append(f"{check.checker} did not finish within {CHECK_TIMEOUT} s")
        return
    check.checker_exit = res.returncode
    check.checker_output = (res.stdout + res.stderr).strip().splitlines()[-OUTPUT_TAIL:]
    if res.returncode != 0:
        check.errors.append(f"{check.checker} exited with {res.returncode}")


def _count_files(check: PartitionCheck, root: str) -> None:
    files = dirs = 0
    problems: list[str] = []
    for _, dirnames, filenames in os.walk(root, onerror=lambda e: problems.append(f"{e.filename}: {e.strerror}")):
        dirs += len(dirnames)
        files += len(filenames)
    check.files, check.directories = files, dirs
    for p in problems[:20]:
        check.errors.append(f"unreadable directory {os.path.relpath(p.split(':')[0], root)}: {p.split(': ', 1)[-1]}")

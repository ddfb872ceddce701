"""``restore-files``: copy files and directories out of one partition of an image.

The partition is served through FUSE and mounted read-only (ext2/3/4, xfs, btrfs) and copied
with ``cp -a`` — owners, modes, times, symlinks, hard links and extended attributes kept —
or, for FAT, read with mtools (``mcopy``), which this kernel needs because it cannot mount vfat.
A damaged chunk under a file makes the copy fail with an error naming it, never a silent hole.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from imgbackup import interrupts
from imgbackup.device.tools import probe_fstype, run
from imgbackup.engine.mount.session import FS_MOUNT_OPTIONS, MountSession
from imgbackup.errors import IntegrityError, TargetRefused, UsageError
from imgbackup.repository.repo import Repository


@dataclass
class FileRestoreResult:
    image: str
    partition: int
    fstype: str | None
    to: str
    copied: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _clean(path: str) -> PurePosixPath:
    parts = [p for p in PurePosixPath(path).parts if p not in ("/", ".")]
    if not parts or ".." in parts:
        raise UsageError(f"bad path {path!r}: give a path inside the partition, without '..'")
    return PurePosixPath(*parts)


def _inside(root: Path, rel: PurePosixPath) -> Path:
    """``root/rel``, refusing a symlink on the way that could lead outside the image's filesystem."""
    cur = root
    for i, part in enumerate(rel.parts):
        cur = cur / part
        if i < len(rel.parts) - 1 and cur.is_symlink():
            raise UsageError(f"/{PurePosixPath(*rel.parts[: i + 1])} is a symlink in the image "
                             f"(to {os.readlink(cur)}); give the path it points to")
    if not os.path.lexists(cur):
        raise UsageError(f"/{rel} does not exist in the partition")
    return cur


def restore_files(repo: Repository, image_id: str, partition: int, paths: list[str], to: str) -> FileRestoreResult:
    """Copy ``paths`` (files or directories of partition ``partition``) into directory ``to``."""
    rels = [_clean(p) for p in paths]
    dest = Path(to)
    dest.mkdir(parents=True, exist_ok=True)
    for rel in rels:
        if os.path.lexists(dest / rel.name):
            raise TargetRefused(f"{dest / rel.name} already exists; nothing was copied")
    with tempfile.TemporaryDirectory(prefix="imgbackup-files-") as tmp:
        session = MountSession(repo, image_id, tmp, filesystems=False, fs_dirs=True, keep_log=False)
        with session:
            vol = session.volume(partition)
            fstype = probe_fstype(session.volume_file(vol))
            result = FileRestoreResult(image_id, partition, fstype, str(dest))
            if fstype in FS_MOUNT_OPTIONS:
                session.mount_volume(vol)
                if not vol.mounted:
                    raise IntegrityError(f"partition {partition} ({fstype}) cannot be mounted: {vol.note}")
                root = Path(tmp, "fs", vol.name)
                for rel in rels:
                    _copying(result, rel, len(rels))
                    _copy(["cp", "-a", "--", str(_inside(root, rel)), str(dest / rel.name)], rel)
                    result.copied.append(f"/{rel}")
            elif fstype == "vfat":
                for rel in rels:
                    _copying(result, rel, len(rels))
                    _copy(["mcopy", "-s", "-p", "-m", "-n", "-i", session.volume_file(vol), f"::/{rel}",
                           str(dest / rel.name)], rel)
                    result.copied.append(f"/{rel}")
            else:
                raise UsageError(f"partition {partition} holds {fstype or 'no known filesystem'}; "
                                 "files can be restored from ext2/3/4, xfs, btrfs and FAT")
    interrupts.set_status(f"all {len(rels)} copied to {dest}")
    return result


def _copying(result: FileRestoreResult, rel: PurePosixPath, wanted: int) -> None:
    """What an interrupt leaves: the items copied so far, and the one under way partial."""
    done = f"{len(result.copied)} of {wanted} copied to {result.to}"
    done += f" ({', '.join(result.copied)})" if result.copied else ""
    interrupts.set_status(f"{done}; /{rel}, being copied, is incomplete there")


def _copy(cmd: list[str], rel: PurePosixPath) -> None:
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    res = run(cmd, env=env, timeout=None)   # a copy takes as long as its data
    if res.returncode != 0:
        detail = res.stderr.strip().splitlines()
        raise IntegrityError(f"copying /{rel} failed (the copy may be partial): "
                             f"{'; '.join(detail[:5]) or f'{cmd[0]} exited with {res.returncode}'}")

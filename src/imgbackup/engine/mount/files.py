"""``restore-files``: copy files and directories out of one partition of an image.

The partition is served through FUSE and mounted read-only (ext2/3/4, xfs, btrfs) and copied
with ``cp -a`` — owners, modes, times, symlinks, hard links and extended attributes kept —
or, for FAT, read with mtools (``mcopy``), which this kernel needs because it cannot mount vfat.
A damaged chunk under a file makes the copy fail with an error naming it, never a silent hole.

Each path keeps its place below the partition root (``/etc/fstab`` lands in ``TO/etc/fstab``), so
two paths never meet in one name, and nothing that exists in ``TO`` is replaced without
``overwrite``. Without a partition number, the partition is the one whose filesystem holds
every path; none or several is an error naming what was found.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from imgbackup import interrupts
from imgbackup.device.tools import run
from imgbackup.engine.mount.session import FS_MOUNT_OPTIONS, MountSession, Volume
from imgbackup.errors import IntegrityError, PathNotFound, StorageError, TargetRefused, UsageError
from imgbackup.repository.repo import Repository

MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}   # images made by other tools often fail mtools' pedantic checks


@dataclass
class FileRestoreResult:
    image: str
    partition: int
    fstype: str | None
    to: str
    copied: list[str] = field(default_factory=list)     # paths in the partition, "/etc/fstab"
    written: list[str] = field(default_factory=list)    # where each went, "TO/etc/fstab"

    def to_dict(self) -> dict:
        return asdict(self)


def _clean(path: str) -> PurePosixPath:
    parts = [p for p in PurePosixPath(path).parts if p not in ("/", ".")]
    if not parts or ".." in parts:
        raise UsageError(f"bad path {path!r}: give a path inside the partition, without '..'")
    return PurePosixPath(*parts)


def _refuse_overlaps(rels: list[PurePosixPath]) -> None:
    """Two paths where one is the other or lies inside it would copy the same files twice."""
    for i, a in enumerate(rels):
        for b in rels[i + 1:]:
            if a == b or a in b.parents or b in a.parents:
                raise UsageError(f"/{a} and /{b} overlap: give only the outer one")


def _check_destination(dest: Path, rels: list[PurePosixPath], overwrite: bool) -> None:
    """Refuse, before anything is copied, a name in ``dest`` that exists (unless ``overwrite``)
    or a non-directory where a directory of a path must go."""
    for rel in rels:
        cur = dest
        for part in rel.parts[:-1]:
            cur = cur / part
            if os.path.lexists(cur) and not cur.is_dir():
                raise TargetRefused(f"{cur} exists and is not a directory; nothing was copied")
        if os.path.lexists(dest / rel) and not overwrite:
            raise TargetRefused(f"{dest / rel} already exists; nothing was copied",
                                "pass --overwrite to replace it, or choose another --to")


def _walk(root: Path, rel: PurePosixPath) -> Path | None:
    """``root/rel`` without following symlinks on the way; None if it does not exist.

    A symlink on the way is an error: it could lead outside the image's filesystem.
    """
    cur = root
    for i, part in enumerate(rel.parts):
        cur = cur / part
        if not os.path.lexists(cur):
            return None
        if i < len(rel.parts) - 1 and cur.is_symlink():
            raise UsageError(f"/{PurePosixPath(*rel.parts[: i + 1])} is a symlink in the image "
                             f"(to {os.readlink(cur)}); give the path it points to")
    return cur


def _fat_has(image_file: str, rel: PurePosixPath) -> bool:
    return run(["mdir", "-b", "-i", image_file, f"::/{rel}"], env=dict(os.environ, **MTOOLS_ENV)).returncode == 0


class _Partitions:
    """The volumes of a mounted session, opened (mounted, or probed for FAT) on first use."""

    def __init__(self, session: MountSession, root: Path) -> None:
        self.session = session
        self.root = root
        self.opened: dict[int, str | None] = {}
        self.found: dict[int, str | None] = {}     # what blkid found, readable or not

    def open(self, vol: Volume) -> str | None:
        """The volume's filesystem type once it can be read, None if it holds nothing we can read."""
        if vol.number not in self.opened:
            self.session.mount_volume(vol)    # probes it (blkid) and mounts what the kernel can
            fstype = self.found[vol.number] = vol.fstype
            readable = vol.mounted or fstype == "vfat"
            self.opened[vol.number] = fstype if readable else None
        return self.opened[vol.number]

    def why_unreadable(self, vol: Volume) -> str:
        fstype = self.found.get(vol.number)
        if fstype in FS_MOUNT_OPTIONS:
            return f"{_label(vol)} ({fstype}) cannot be mounted: {vol.note}"
        return (f"{_label(vol)} holds {fstype or 'no known filesystem'}; "
                "files can be restored from ext2/3/4, xfs, btrfs and FAT")

    def has(self, vol: Volume, rel: PurePosixPath) -> bool:
        fstype = self.open(vol)
        if fstype is None:
            return False
        if fstype == "vfat":
            return _fat_has(self.session.volume_file(vol), rel)
        return _walk(self.root / vol.name, rel) is not None


def _label(vol: Volume) -> str:
    return "the disk" if vol.name == "disk" else f"partition {vol.number}"


def _choose(parts: _Partitions, rels: list[PurePosixPath]) -> Volume:
    """The one volume whose filesystem holds every path."""
    vols = parts.session.volumes
    holding = {rel: [v for v in vols if parts.has(v, rel)] for rel in rels}
    searched = ", ".join(f"{_label(v)} ({parts.opened.get(v.number) or 'not readable'})" for v in vols)
    for rel, found in holding.items():
        if not found:
            raise PathNotFound(f"/{rel} is in no partition of image {parts.session.image_id[:12]} "
                               f"(searched {searched})")
    common = [v for v in vols if all(v in found for found in holding.values())]
    if len(common) == 1:
        return common[0]
    if common:
        raise UsageError(f"{', '.join(f'/{r}' for r in rels)}: found in {' and '.join(map(_label, common))}",
                         "choose one with --partition N")
    where = "; ".join(f"/{rel}: {', '.join(map(_label, found))}" for rel, found in holding.items())
    raise UsageError(f"the paths are in different partitions ({where})",
                     "restore them with one --partition per run")


def restore_files(repo: Repository, image_id: str, partition: int | None, paths: list[str], to: str,
                  overwrite: bool = False) -> FileRestoreResult:
    """Copy ``paths`` (files or directories of one partition) into directory ``to``, each under its
    path relative to the partition root. ``partition`` None: the one partition holding them all."""
    rels = [_clean(p) for p in paths]
    _refuse_overlaps(rels)
    dest = Path(to)
    if os.path.lexists(dest) and not dest.is_dir():
        raise TargetRefused(f"--to {dest} exists and is not a directory")
    _check_destination(dest, rels, overwrite)
    with tempfile.TemporaryDirectory(prefix="imgbackup-files-") as tmp:
        session = MountSession(repo, image_id, tmp, filesystems=False, fs_dirs=True, keep_log=False)
        with session:
            parts = _Partitions(session, Path(tmp, "fs"))
            vol = _choose(parts, rels) if partition is None else session.volume(partition)
            fstype = parts.open(vol)
            if fstype is None:
                why = parts.why_unreadable(vol)
                raise IntegrityError(why) if parts.found[vol.number] in FS_MOUNT_OPTIONS else UsageError(why)
            for rel in rels:
                if not parts.has(vol, rel):
                    raise PathNotFound(f"/{rel} does not exist in {_label(vol)} ({fstype}) of image {image_id[:12]}")
            dest.mkdir(parents=True, exist_ok=True)
            result = FileRestoreResult(image_id, vol.number, fstype, str(dest))
            for rel in rels:
                _copying(result, rel, len(rels))
                if fstype == "vfat":
                    _copy_fat(session.volume_file(vol), rel, dest)
                else:
                    _copy(["cp", "-a", "--parents", *(["--remove-destination"] if overwrite else []), "--",
                           str(rel), str(dest.resolve())], rel, cwd=Path(tmp, "fs", vol.name))
                result.copied.append(f"/{rel}")
                result.written.append(str(dest / rel))
    interrupts.set_status(f"all {len(rels)} copied to {dest}")
    return result


def _copying(result: FileRestoreResult, rel: PurePosixPath, wanted: int) -> None:
    """What an interrupt leaves: the items copied so far, and the one under way partial."""
    done = f"{len(result.copied)} of {wanted} copied to {result.to}"
    done += f" ({', '.join(result.copied)})" if result.copied else ""
    interrupts.set_status(f"{done}; /{rel}, being copied, is incomplete there")


def _copy_fat(image_file: str, rel: PurePosixPath, dest: Path) -> None:
    """mcopy one path to ``dest/rel``; into an existing directory, its contents (mcopy would nest)."""
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    source = f"::/{rel}/*" if target.is_dir() and not target.is_symlink() else f"::/{rel}"
    _copy(["mcopy", "-s", "-p", "-m", "-n", "-i", image_file, source, str(target)], rel)


def _copy(cmd: list[str], rel: PurePosixPath, cwd: Path | None = None) -> None:
    res = run(cmd, env=dict(os.environ, **MTOOLS_ENV), timeout=None, cwd=cwd)   # as long as its data takes
    if res.returncode == 0:
        return
    detail = "; ".join(res.stderr.strip().splitlines()[:5]) or f"{cmd[0]} exited with {res.returncode}"
    message = f"copying /{rel} failed (the copy may be partial): {detail}"
    if "No space left on device" in detail:
        raise StorageError(message)
    if "Permission denied" in detail or "Read-only file system" in detail:
        raise TargetRefused(message)
    raise IntegrityError(message)

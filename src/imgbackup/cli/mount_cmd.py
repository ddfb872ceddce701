"""``imgbackup mount``, ``umount`` and ``restore-files``: look inside an image without restoring it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imgbackup import interrupts
from imgbackup.cli.common import JsonOption, NameOption, RepoOption, emit_json, open_repo
from imgbackup.errors import StorageError


def mount(
    image: Annotated[str, typer.Argument(help="Image id prefix, or 'latest'.")],
    directory: Annotated[str, typer.Argument(help="Empty directory to serve disk.img and partN.img in.")],
    repo: RepoOption = None,
    name: NameOption = None,
    filesystems: Annotated[bool, typer.Option("--filesystems", help="Also mount each partition's filesystem "
                                              "read-only under DIR/fs/partN.")] = False,
    foreground: Annotated[bool, typer.Option("--foreground", help="Stay attached; Ctrl-C unmounts.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Serve an image read-only through FUSE; returns when the mount is ready unless --foreground."""
    from imgbackup.engine.mount.session import MountSession, run_daemon
    from imgbackup.engine.mount.state import setup_logging

    r = open_repo(repo, needs_full_key="mount images (that reads their data)")
    session = MountSession(r, r.images.resolve(image, name), directory, filesystems)
    log_file = setup_logging(directory, to_stderr=foreground)
    if not foreground:
        state = run_daemon(session)
        if json_out:
            emit_json({"image": state.image, "mountpoint": state.mountpoint, "log": log_file,
                       "files": sorted(p.name for p in Path(state.mountpoint).iterdir() if p.is_file()),
                       "filesystems": state.mounts})
            return
        typer.echo(f"mounted image {state.image[:12]} at {state.mountpoint} (log: {log_file}); "
                   f"'imgbackup umount {state.mountpoint}' to unmount")
        return
    problems: list[str] = []
    interrupts.set_status(lambda: _after_stop(session, problems))
    try:
        session.start()
        _describe(session)
        session.wait()
    finally:   # Ctrl-C or SIGTERM (the way to end --foreground) unwinds through here: exit 130
        problems += session.stop()
    if problems:
        raise StorageError("; ".join(problems))
    if json_out:
        emit_json({"image": session.image_id, "mountpoint": session.mountpoint, "unmounted": True})
    typer.echo("unmounted", err=True)


def _after_stop(session, problems: list[str]) -> str:
    if problems:
        return (f"unmounting {session.mountpoint} left problems: {'; '.join(problems)} "
                f"('imgbackup umount {session.mountpoint}' retries)")
    return f"nothing is left mounted at {session.mountpoint}"


def _describe(session) -> None:
    typer.echo(f"mounted image {session.image_id[:12]} at {session.mountpoint}; Ctrl-C to unmount", err=True)
    for vol in session.volumes:
        where = f"fs/{vol.name}" if vol.mounted else (vol.note or "")
        typer.echo(f"  {vol.name}: {vol.size} bytes {vol.fstype or ''} {where}".rstrip(), err=True)


def umount(directory: Annotated[str, typer.Argument(help="Directory an image is mounted at.")],
           json_out: JsonOption = False) -> None:
    """Unmount an image: filesystems, loop devices, the FUSE mount and its server process."""
    from imgbackup.engine.mount.state import unmount

    interrupts.set_status(f"the mount at {directory} may be partly taken down ('imgbackup umount {directory}' "
                          "again finishes it)")
    problems = unmount(directory)
    if problems:
        raise StorageError("; ".join(problems))
    if json_out:
        emit_json({"mountpoint": directory, "unmounted": True})


def restore_files(
    image: Annotated[str, typer.Argument(help="Image id prefix, or 'latest'.")],
    paths: Annotated[list[str], typer.Argument(help="Files or directories inside the partition.")],
    to: Annotated[str, typer.Option("--to", help="Directory to copy them into.")],
    partition: Annotated[int | None, typer.Option("--partition", "-p", help="Partition number (0: a disk "
                                                  "without a partition table). Default: the one partition "
                                                  "whose filesystem holds every path.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace files that exist in --to (directories "
                                            "are merged); without it an existing name is refused.")] = False,
    repo: RepoOption = None,
    name: NameOption = None,
    json_out: JsonOption = False,
) -> None:
    """Copy files and directories out of an image, keeping owners, modes, times, symlinks and xattrs.

    Each path keeps its place below the partition root: /etc/fstab is copied to TO/etc/fstab.
    """
    from imgbackup.engine.mount.files import restore_files as run

    r = open_repo(repo, needs_full_key="restore files (that reads image data)")
    result = run(r, r.images.resolve(image, name), partition, paths, to, overwrite=overwrite)
    if json_out:
        emit_json(result.to_dict())
    else:
        where = "the disk" if result.partition == 0 else f"partition {result.partition}"
        for item, written in zip(result.copied, result.written, strict=True):
            typer.echo(f"restored {item} from {where} ({result.fstype}) to {written}")


def register(app: typer.Typer) -> None:
    app.command("mount")(mount)
    app.command("umount")(umount)
    app.command("restore-files")(restore_files)

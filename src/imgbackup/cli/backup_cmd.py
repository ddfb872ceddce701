"""``imgbackup backup SOURCE``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from imgbackup.cli.common import JsonOption, ProgressBar, RepoOption, emit_json, human, open_repo
from imgbackup.engine.backup.rescue import DEFAULT_RETRIES
from imgbackup.engine.backup.run import BackupRequest, run_backup
from imgbackup.errors import PartlyUnreadable, UsageError


def backup(
    source: Annotated[str, typer.Argument(help="Disk, partition or image file to back up.")],
    repo: RepoOption = None,
    name: Annotated[str | None, typer.Option(help="Source name (default: the source's file name).")] = None,
    backup_type: Annotated[str, typer.Option("--type", help="auto, full, incremental or differential.")] = "auto",
    allow_mounted: Annotated[bool, typer.Option(help="Image a source mounted read-write anyway.")] = False,
    all_blocks: Annotated[bool, typer.Option(
        help="Image every sector, also blocks the filesystems call unused (forensics, unknown layouts).")] = False,
    changed_blocks: Annotated[str | None, typer.Option(
        help="Change list since the parent image: extents, an IMGBCBT1 bitmap, or dm-era XML. "
             "Only listed ranges are read.")] = None,
    change_granularity: Annotated[int | None, typer.Option(
        help="Block size in bytes of a dm-era change list.")] = None,
    verify_unchanged: Annotated[float, typer.Option(
        help="Re-read this percentage of the slots a change list skips; any difference re-reads them all.")]
    = 0.0,
    rescue: Annotated[bool, typer.Option(
        "--rescue", help="Image a failing disk: skip unreadable areas, come back to them last in ever smaller "
                         "reads down to one sector, store zeros and a map of what stayed unreadable (exit 13).")]
    = False,
    retries: Annotated[int | None, typer.Option(
        help=f"With --rescue: extra tries of each unreadable sector (default {DEFAULT_RETRIES}).", min=0, max=100)]
    = None,
    snapshot: Annotated[str | None, typer.Option(
        help="Image a snapshot of a live source, removed afterwards: lvm (an LVM logical volume), reflink "
             "(an image file on XFS or btrfs) or auto.")] = None,
    json_out: JsonOption = False,
) -> None:
    """Back up a disk, partition or image file into the repository."""
    if retries is not None and not rescue:
        raise UsageError("--retries needs --rescue")
    r = open_repo(repo, for_writing=True)
    bar = ProgressBar("backup", not json_out)   # its total is what the plan will read, not the source size
    try:
        result = run_backup(r, BackupRequest(
            source, name, backup_type, allow_mounted, bar.update, bar.start, all_blocks=all_blocks,
            changed_blocks=changed_blocks, change_granularity=change_granularity,
            verify_unchanged=verify_unchanged, rescue=rescue,
            retries=DEFAULT_RETRIES if retries is None else retries, snapshot=snapshot))
    finally:
        bar.close()
    for warning in result.warnings:
        typer.echo(f"imgbackup: warning: {warning}", err=True)
    if json_out:
        emit_json(asdict(result))
    else:
        typer.echo(f"image {result.id} ({result.type}{', parent ' + result.parent[:12] if result.parent else ''}): "
                   f"read {human(result.bytes_read)} of {human(result.source_size)}, "
                   f"stored {human(result.bytes_stored)}, {result.chunks_new} new chunks, {result.duration_s:.1f} s")
    if result.unreadable_bytes:
        typer.echo(f"imgbackup: warning: backup stored, but {result.unreadable_bytes} bytes of the source were "
                   f"unreadable ({len(result.bad_ranges)} ranges, stored as zeros; 'imgbackup info "
                   f"{result.id[:12]}' lists them)", err=True)
        raise typer.Exit(PartlyUnreadable.exit_code)


def register(app: typer.Typer) -> None:
    app.command("backup")(backup)

"""``imgbackup restore IMAGE TARGET``: a whole disk (any size, --grow, --delta) or one --partition."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from imgbackup.cli.common import (
    JsonOption,
    NameOption,
    ProgressBar,
    RepoOption,
    YesOption,
    confirm_overwrite,
    emit_json,
    human,
    open_repo,
)
from imgbackup.engine.restore.plan import DiskPlan, plan_disk_restore, plan_partition_restore
from imgbackup.engine.restore.run import run_disk_restore


def restore(
    image: Annotated[str, typer.Argument(help="Image id prefix, or 'latest'.")],
    target: Annotated[str, typer.Argument(help="Block device or file to write the image to.")],
    repo: RepoOption = None,
    name: NameOption = None,
    yes: YesOption = False,
    discard: Annotated[bool, typer.Option(help="Zero unwritten ranges with BLKZEROOUT instead of writing.")]
    = False,
    grow: Annotated[bool, typer.Option(help="On a larger target, extend the last partition to the end and "
                                       "grow its filesystem (resize2fs, xfs_growfs).")] = False,
    partition: Annotated[int | None, typer.Option(help="Restore only partition N of the image onto TARGET.")]
    = None,
    delta: Annotated[bool, typer.Option(help="TARGET holds an older state of this disk: read it and write only "
                                        "the chunks that differ.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Show the plan (target, resulting partition table, writes), "
                                          "write nothing.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Restore an image onto a disk or file; a smaller or larger disk gets its partition table fitted.

    A GPT's backup header moves to the disk's end; onto a smaller disk the last partition and its
    ext filesystem are shrunk (resize2fs) when its used blocks fit, otherwise the restore is refused.
    Every refusal happens before the first byte is written.
    """
    r = open_repo(repo, needs_full_key="restore images (that reads their data)")
    image_id = r.images.resolve(image, name)
    if partition is not None:
        plan = plan_partition_restore(r, image_id, partition, target, grow=grow)
    else:
        plan = plan_disk_restore(r, image_id, target, grow=grow, delta=delta)
    if plan.bad_ranges:
        typer.echo(f"imgbackup: warning: {unreadable_note(plan.bad_ranges)}", err=True)
    if dry_run:
        if json_out:
            emit_json(plan.to_dict())
        else:
            _print_plan(plan)
        return
    if plan.target.is_block_device or plan.target.exists:
        if not json_out:
            typer.echo(f"target: {plan.target.description}", err=True)
        confirm_overwrite(plan.target.description, plan.target.path, yes)
    bar = ProgressBar("restore", not json_out, plan.bytes_to_write)
    try:
        result = run_disk_restore(r, plan, discard=discard, progress=bar.update)
    finally:
        bar.close()
    if json_out:
        emit_json(asdict(result))
        return
    typer.echo(f"restored image {result.image[:12]} to {result.target}: wrote {human(result.bytes_written)}"
               + (f", read {human(result.bytes_read)}" if delta else "")
               + f", {result.duration_s:.1f} s")
    for note in result.notes:
        typer.echo(f"  {note}")


def unreadable_note(ranges: list[list[int]]) -> str:
    total = sum(n for _, n in ranges)
    return (f"the image was made from a failing disk (backup --rescue): {total} bytes of the source were "
            f"unreadable ({len(ranges)} ranges, first at byte {ranges[0][0]}; --json lists them) and restore as zeros")


def _print_plan(plan: DiskPlan) -> None:
    typer.echo(f"image {plan.image.id[:12]} ({human(plan.image.size)}) -> {plan.target.description}")
    typer.echo(f"target size {plan.disk_size} bytes ({human(plan.disk_size)}), "
               f"{plan.sector_size}-byte sectors, table {plan.table_kind or 'none'}")
    for p in plan.fit.partitions:
        typer.echo(f"  partition {p['number']}: sectors {p['start_lba']}-{p['end_lba']} "
                   f"({human(p['size'])}) type {p['type']} {p['name']}")
    for w in plan.writes:
        typer.echo(f"  write {w['what']}: at byte {w['offset']}, {human(w['length'])}")
    for warning in plan.fit.warnings:
        typer.echo(f"  warning: {warning}")
    typer.echo(f"would write {plan.bytes_to_write} bytes ({human(plan.bytes_to_write)}) of data; nothing written")


def register(app: typer.Typer) -> None:
    app.command("restore")(restore)

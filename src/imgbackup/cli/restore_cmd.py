"""``imgbackup restore IMAGE TARGET``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from imgbackup.cli.common import (
    JsonOption,
    RepoOption,
    YesOption,
    confirm_overwrite,
    emit_json,
    human,
    open_repo,
    progress_bar,
)
from imgbackup.engine.restore import plan_restore, run_restore


def restore(
    image: Annotated[str, typer.Argument(help="Image id prefix, or 'latest'.")],
    target: Annotated[str, typer.Argument(help="Block device or file to write the image to.")],
    repo: RepoOption = None,
    name: Annotated[str | None, typer.Option(help="Source name for 'latest'.")] = None,
    yes: YesOption = False,
    discard: Annotated[bool, typer.Option(help="Zero unwritten ranges with BLKZEROOUT instead of writing.")]
    = False,
    dry_run: Annotated[bool, typer.Option(help="Show what would be written, write nothing.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Restore an image onto a block device or into a file."""
    r = open_repo(repo)
    plan = plan_restore(r, r.images.resolve(image, name), target)
    if dry_run:
        if json_out:
            emit_json(plan.to_dict())
        else:
            typer.echo(f"would write image {plan.image.id[:12]} ({human(plan.image.size)}, "
                       f"{human(plan.bytes_to_write)} of data) to {plan.target.description}")
        return
    if plan.target.is_block_device or plan.target.exists:
        if not json_out:
            typer.echo(f"target: {plan.target.description}", err=True)
        confirm_overwrite(plan.target.description, plan.target.path, yes)
    update, close = progress_bar(plan.bytes_to_write, "restore", not json_out)
    try:
        result = run_restore(r, plan, discard=discard, progress=update)
    finally:
        close()
    if json_out:
        emit_json(asdict(result))
    else:
        typer.echo(f"restored image {result.image[:12]} to {result.target}: wrote {human(result.bytes_written)}, "
                   f"content verified, {result.duration_s:.1f} s")


def register(app: typer.Typer) -> None:
    app.command("restore")(restore)

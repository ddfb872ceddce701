"""``imgbackup copy IMAGE… --to REPO2``: images and the chunks they need into another repository."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from imgbackup.cli.common import (
    JsonOption,
    NameOption,
    ProgressBar,
    RepoOption,
    emit_json,
    human,
    open_repo,
    read_other_passphrase,
)
from imgbackup.engine.copy.run import copy_images
from imgbackup.engine.copy.select import select_images
from imgbackup.errors import UsageError
from imgbackup.repository.repo import Repository


def copy(
    images: Annotated[list[str] | None, typer.Argument(help="Image id prefixes, or 'latest' (with --name).")]
    = None,
    to: Annotated[str | None, typer.Option("--to", help="The destination repository: a directory or "
                                           "s3://BUCKET/PREFIX (its passphrase: IMGBACKUP_PASSPHRASE2, "
                                           "IMGBACKUP_PASSPHRASE2_FILE, or a prompt).")] = None,
    repo: RepoOption = None,
    every: Annotated[bool, typer.Option("--all", help="Every image of the source.")] = False,
    name: NameOption = None,
    last: Annotated[int | None, typer.Option("--last", help="Only the K newest images of each source name.")]
    = None,
    verify: Annotated[bool, typer.Option("--verify", help="Afterwards read back and authenticate every chunk "
                                         "of the copied images at the destination.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Copy images into another repository (3-2-1): sealed as they are into one made with
    'init --related-to' this one, else re-encrypted under the destination's keys. Images already
    there are skipped; a killed copy resumes without sending again what had landed; nothing at
    the destination is deleted."""
    if not to:
        raise UsageError("copy needs a destination", "give --to REPO2 (a directory or s3://BUCKET/PREFIX)")
    src = open_repo(repo)
    metas = select_images(src, list(images or []), every, name, last)
    dst = Repository.open(to, read_other_passphrase, for_writing=True)
    bar = ProgressBar("copy: sent", not json_out, total=None)
    bar.start(None)
    try:
        result = copy_images(src, dst, metas, verify=verify, progress=bar.update)
    finally:
        bar.close()
    for warning in result.warnings:
        typer.echo(f"imgbackup: warning: {warning}", err=True)
    if json_out:
        from imgbackup.repository.counting import merge

        sides = {"source_requests": src.storage.requests(), "destination_requests": dst.storage.requests()}
        emit_json(asdict(result) | sides | {"requests": merge(*sides.values())})
        return
    typer.echo(f"copied {len(result.images_copied)} image(s) to {result.destination} ({result.mode}), "
               f"skipped {len(result.images_skipped)} already there; sent {result.chunks_sent} chunks, "
               f"{human(result.bytes_sent)}; reused {result.chunks_reused}; {result.duration_s:.1f} s"
               + (f"; verified {result.chunks_verified} chunks" if result.verified else ""))


def register(app: typer.Typer) -> None:
    app.command("copy")(copy)

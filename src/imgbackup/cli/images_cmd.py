"""Image management commands: delete, diff."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Annotated

import typer

from imgbackup.cli.common import (
    JsonOption,
    LockWaitOption,
    NameOption,
    RepoOption,
    YesOption,
    ask,
    emit_json,
    human,
    open_repo,
)
from imgbackup.engine.delete import delete_images
from imgbackup.engine.diff import diff_images
from imgbackup.errors import UsageError


def delete(
    images: Annotated[list[str], typer.Argument(help="Image id prefixes (or 'latest' with --name).")],
    repo: RepoOption = None,
    name: NameOption = None,
    yes: YesOption = False,
    lock_wait: LockWaitOption = 0.0,
    json_out: JsonOption = False,
) -> None:
    """Delete images and every chunk that only they referenced."""
    r = open_repo(repo, for_writing=True, needs_full_key="delete images")
    ids = [r.images.resolve(spec, name) for spec in images]
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("refusing to delete images without --yes (no terminal to ask on)")
        answer = ask(f"Delete {len(ids)} image(s): {', '.join(i[:12] for i in ids)}? [y/N]: ")
        if answer.strip().lower() not in ("y", "yes"):
            raise UsageError("not confirmed; nothing was deleted")
    result = delete_images(r, ids, lock_wait)
    for warning in result.warnings:
        typer.echo(f"imgbackup: warning: {warning}", err=True)
    if json_out:
        emit_json(asdict(result))
    else:
        typer.echo(f"deleted {len(ids) - len(result.retained)} image(s); removed {result.chunks_removed} chunks, "
                   f"freed {human(result.bytes_freed)}")
        if result.retained:
            typer.echo(f"{len(result.retained)} image(s) are retained by S3 Object Lock until their lock date: "
                       "they count as deleted, and a later delete, prune or compact removes them")


def diff(
    a: Annotated[str, typer.Argument(help="First image (id prefix or 'latest').")],
    b: Annotated[str, typer.Argument(help="Second image.")],
    repo: RepoOption = None,
    name: NameOption = None,
    json_out: JsonOption = False,
) -> None:
    """List the byte extents that differ between two images (from their indexes; nothing is read)."""
    r = open_repo(repo)
    result = diff_images(r, r.images.resolve(a, name), r.images.resolve(b, name))
    if json_out:
        emit_json(result.to_dict())
        return
    for offset, length in result.extents:
        typer.echo(f"{offset} {length}")
    typer.echo(f"# {len(result.extents)} extents, {human(result.changed_bytes)} differ", err=True)


def register(app: typer.Typer) -> None:
    app.command("delete")(delete)
    app.command("diff")(diff)

"""Lifecycle commands: hold, release, append-only (and prune, in prune_cmd.py)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer

from imgbackup.cli.common import JsonOption, NameOption, RepoOption, emit_json, open_repo
from imgbackup.errors import UsageError

ImagesArg = Annotated[list[str], typer.Argument(help="Image id prefixes (or 'latest' with --name).")]


def when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(stamp)) if stamp else "?"


def _run_on_images(action: Callable, images: list[str], reason: str, repo: str | None, name: str | None,
                   json_out: bool) -> tuple[list[str], Any]:
    """Resolve the images, run ``action`` (place or release holds), print its warnings and, with
    --json, its document; returns the ids and the result (None once printed as JSON)."""
    r = open_repo(repo, for_writing=True)
    ids = [r.images.resolve(spec, name) for spec in images]
    result = action(r, ids, reason)
    for warning in result.warnings:
        typer.echo(f"imgbackup: warning: {warning}", err=True)
    if json_out:
        emit_json(result.to_dict())
        return ids, None
    return ids, result


def hold(
    images: ImagesArg,
    reason: Annotated[str, typer.Option(help="Why (a case number, a ticket, who asked): recorded and shown.")] = "",
    repo: RepoOption = None,
    name: NameOption = None,
    json_out: JsonOption = False,
) -> None:
    """Place a legal hold: delete, prune and compact then never remove the image or any chunk it needs
    (exit 14); on an Object-Lock bucket the S3 legal hold is set on its objects too."""
    from imgbackup.engine.hold import place_holds

    ids, result = _run_on_images(place_holds, images, reason, repo, name, json_out)
    if result is None:
        return
    for image_id in ids:
        typer.echo(f"held image {image_id[:12]}: {reason.strip()}")
    if result.s3_legal_holds:
        typer.echo(f"S3 legal hold set on {result.s3_legal_holds} object(s)")


def release(
    images: ImagesArg,
    reason: Annotated[str, typer.Option(help="Why the hold ends: recorded beside the release.")] = "",
    repo: RepoOption = None,
    name: NameOption = None,
    json_out: JsonOption = False,
) -> None:
    """End every legal hold on the images (they can be removed again; S3 legal holds come off what no
    other held image needs)."""
    from imgbackup.engine.hold import release_holds

    ids, result = _run_on_images(release_holds, images, reason, repo, name, json_out)
    if result is None:
        return
    for image_id in ids:
        if image_id in result.not_held:
            typer.echo(f"image {image_id[:12]} was not held")
        else:
            typer.echo(f"released image {image_id[:12]} ({len(result.holds[image_id])} hold(s))")


def append_only(
    state: Annotated[str, typer.Argument(help="on or off (or status).")] = "status",
    repo: RepoOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Turn it off without asking.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Append-only mode: delete, prune and compact refuse (exit 14). A guard against accidents and
    careless scripts, not against root or anyone with the passphrase (they can turn it off)."""
    if state not in ("on", "off", "status"):
        raise UsageError(f"append-only takes on, off or status, not {state!r}")
    r = open_repo(repo, for_writing=state != "status")
    if state != "status" and (state == "on") != r.config.append_only:
        if state == "off" and not yes:
            if not sys.stdin.isatty():
                raise UsageError("refusing to turn append-only off without --yes (no terminal to ask on)")
            typer.confirm("Turn append-only off (delete, prune and compact will work again)?", abort=True)
        r.set_append_only(state == "on")
    if json_out:
        emit_json({"append_only": r.config.append_only})
    else:
        typer.echo(f"append-only: {'on' if r.config.append_only else 'off'}")


def register(app: typer.Typer) -> None:
    app.command("hold")(hold)
    app.command("release")(release)
    app.command("append-only")(append_only)

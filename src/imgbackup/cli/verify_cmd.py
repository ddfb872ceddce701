"""``imgbackup verify [IMAGE]``."""

from __future__ import annotations

from typing import Annotated

import typer

from imgbackup.cli.common import JsonOption, RepoOption, emit_json, human, open_repo
from imgbackup.engine.verify import run_verify
from imgbackup.errors import VerificationFailed


def verify(
    image: Annotated[str | None, typer.Argument(help="Image id prefix or 'latest'; default: all images.")] = None,
    repo: RepoOption = None,
    name: Annotated[str | None, typer.Option(help="Source name for 'latest'.")] = None,
    json_out: JsonOption = False,
) -> None:
    """Read and authenticate every chunk an image references (or all images)."""
    r = open_repo(repo)
    ids = [r.images.resolve(image, name)] if image else None
    report = run_verify(r, ids)
    if json_out:
        emit_json(report.to_dict())
    else:
        for check in report.images:
            state = "ok" if check.ok else f"DAMAGED ({check.bad_chunks} bad chunks)"
            typer.echo(f"{check.id[:12]}  {check.name or '?':<20} {check.chunks} chunks  {state}")
            for err in check.errors:
                typer.echo(f"    {err}")
        typer.echo(f"checked {report.chunks_checked} chunks, {human(report.bytes_checked)}")
    if not report.ok:
        raise VerificationFailed(f"{sum(not c.ok for c in report.images)} image(s) damaged")


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)

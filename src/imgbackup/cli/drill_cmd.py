"""``imgbackup drill IMAGE``: a restore drill — filesystem checks, a timed full restore (RTO), a boot."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from imgbackup.cli.common import (
    JsonOption,
    NameOption,
    RepoOption,
    YesOption,
    confirm_overwrite,
    emit_json,
    open_repo,
)
from imgbackup.errors import VerificationFailed


def drill(
    image: Annotated[str, typer.Argument(help="Image id prefix, or 'latest'.")],
    repo: RepoOption = None,
    name: NameOption = None,
    restore_to: Annotated[str | None, typer.Option(
        help="Restore the whole image to this scratch file or device and time it (the RTO); a new file is "
             "removed afterwards.")] = None,
    boot: Annotated[bool, typer.Option("--boot", help="Boot the (restored) image in QEMU and wait for --expect.")]
    = False,
    expect: Annotated[str | None, typer.Option(help="Text the booted system prints on its serial console.")]
    = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for --expect.")] = 120,
    firmware: Annotated[str, typer.Option(help="bios or uefi (OVMF).")] = "bios",
    filesystems: Annotated[bool, typer.Option(help="Check each partition's filesystem on the mounted image.")]
    = True,
    keep: Annotated[bool, typer.Option(help="Keep a scratch file the drill created.")] = False,
    yes: YesOption = False,
    json_out: JsonOption = False,
) -> None:
    """Prove an image restores: mount and check its filesystems, optionally restore it in full to a
    scratch target (timed: the RTO) and boot it. The result is recorded in the repository (status and
    metrics show it); exit 11 when the drill fails."""
    from imgbackup.engine.drill.run import DrillRequest, run_drill

    r = open_repo(repo, needs_full_key="run restore drills (that reads image data)")
    image_id = r.images.resolve(image, name)
    if restore_to and os.path.exists(restore_to):
        confirm_overwrite(f"the scratch target {restore_to}", restore_to, yes)
    result = run_drill(r, image_id, DrillRequest(filesystems, restore_to, boot, expect, timeout, firmware, keep))
    for warning in result.warnings:
        typer.echo(f"imgbackup: warning: {warning}", err=True)
    if json_out:
        emit_json(result.to_dict())
    else:
        typer.echo(f"drill of image {image_id[:12]}: {'ok' if result.ok else 'FAILED'} in {result.duration_s:.1f} s"
                   + (f", RTO {result.rto_s:.1f} s" if result.rto_s is not None else ""))
        for step in result.steps:
            typer.echo(f"  {step.step:<12} {'ok' if step.ok else 'FAILED'} {step.duration_s:.1f} s"
                       + (f"  {step.error}" if step.error else ""))
    if not result.ok:
        raise VerificationFailed(f"drill of image {image_id[:12]} failed: "
                                 + "; ".join(s.error or s.step for s in result.steps if not s.ok))


def register(app: typer.Typer) -> None:
    app.command("drill")(drill)

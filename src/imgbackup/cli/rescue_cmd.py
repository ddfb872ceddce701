"""``imgbackup rescue …``: build rescue media; inside them, the unattended run and the guide."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imgbackup.cli.common import JsonOption, emit_json

rescue_app = typer.Typer(help="Rescue media: build a bootable ISO; what runs inside it.", no_args_is_help=True)


@rescue_app.command("build")
def build(
    out: Annotated[Path, typer.Argument(help="ISO file to write (also works written raw to a USB stick).")],
    cmdline: Annotated[str, typer.Option(help="Kernel parameters baked into the default boot entry, "
                                         "e.g. 'imgbackup.action=restore imgbackup.repo=LABEL=BACKUP:/repo …'.")]
    = "",
    timeout: Annotated[int, typer.Option(help="Seconds the boot menu waits before the default entry.")] = 5,
    cache_dir: Annotated[Path | None, typer.Option(envvar="IMGBACKUP_RESCUE_CACHE", show_envvar=True,
                                                   help="Cache for apt's packages and the built root "
                                                   "[default: /var/cache/imgbackup/rescue].")] = None,
    mirror: Annotated[str | None, typer.Option(help="Debian mirror URL (default: deb.debian.org with "
                                               "updates and security).")] = None,
    embed_repo: Annotated[Path | None, typer.Option(help="Copy this repository onto the media "
                                                    "(then imgbackup.repo=MEDIA:/imgbackup/repo).")] = None,
    embed_passphrase_file: Annotated[Path | None, typer.Option(
        help="Also copy this passphrase file (MEDIA:/imgbackup/passphrase): anyone holding the media can "
             "then read the backups.")] = None,
    json_out: JsonOption = False,
) -> None:
    """Build a hybrid BIOS/UEFI rescue ISO holding Debian's kernel and this imgbackup (needs root)."""
    from imgbackup.engine.rescue.media import build_media

    log = (lambda line: typer.echo(line, err=True)) if json_out else typer.echo
    result = build_media(out, cmdline=cmdline, cache_dir=cache_dir, mirror=mirror, timeout=timeout,
                         embed_repo=embed_repo, embed_passphrase_file=embed_passphrase_file, log=log)
    if json_out:
        emit_json(result.to_dict())


@rescue_app.command("params")
def params(
    cmdline: Annotated[str | None, typer.Argument(help="A kernel command line (default: /proc/cmdline).")] = None,
    json_out: JsonOption = False,
) -> None:
    """Check the imgbackup.* kernel parameters of a command line and show what they ask for."""
    from imgbackup.engine.rescue.params import parse_params

    text = cmdline if cmdline is not None else Path("/proc/cmdline").read_text()
    parsed = parse_params(text)
    if json_out:
        emit_json(parsed.to_dict())
        return
    for key, value in parsed.to_dict().items():
        if value not in (None, (), []):
            typer.echo(f"{key}: {value}")


@rescue_app.command("run")
def run_action(
    cmdline_file: Annotated[Path, typer.Option(help="Where the kernel parameters are read.")]
    = Path("/proc/cmdline"),
    after_coldplug: Annotated[bool, typer.Option(help="Started before udev (as imgbackup-rescue.service is, "
                                                 "so Python's start overlaps the boot): wait for udev's "
                                                 "coldplug before looking for devices.")] = False,
) -> None:
    """Inside the rescue system: carry out imgbackup.action (started by imgbackup-rescue.service)."""
    from imgbackup.engine.rescue.unattended import run_from_cmdline

    raise typer.Exit(run_from_cmdline(cmdline_file.read_text(), after_coldplug=after_coldplug))


@rescue_app.command("login")
def login() -> None:
    """Inside the rescue system: what a console shows on login (the outcome, then the guide)."""
    from imgbackup.engine.rescue.menu import on_login

    raise typer.Exit(on_login())


@rescue_app.command("menu")
def menu() -> None:
    """Inside the rescue system: the guided restore (list images, choose the disk, confirm)."""
    from imgbackup.engine.rescue.menu import guided

    raise typer.Exit(guided())


def register(app: typer.Typer) -> None:
    app.add_typer(rescue_app, name="rescue")

"""``imgbackup devices``: the disks and partitions of this machine."""

from __future__ import annotations

import typer

from imgbackup.cli.common import JsonOption, emit_json, human
from imgbackup.device.discovery import list_devices


def devices(json_out: JsonOption = False) -> None:
    """List disks and partitions: size, model, serial, filesystem, mounted or not, WWN."""
    found = list_devices()
    if json_out:
        emit_json({"devices": [d.to_dict() for d in found]})
        return
    typer.echo(f"{'DEVICE':<18} {'TYPE':<5} {'SIZE':>10} {'FS':<8} {'MODEL':<20} {'SERIAL':<16} MOUNTED  WWN")
    for d in found:
        model = d.model or (f"(loop: {d.backing_file})" if d.backing_file else "")
        typer.echo(f"{d.path:<18} {d.kind:<5} {human(d.size):>10} {d.fstype or '':<8} {model:<20} "
                   f"{d.serial or '':<16} {', '.join(d.mountpoints) or '-'}" + (f"  {d.wwn}" if d.wwn else ""))


def register(app: typer.Typer) -> None:
    app.command("devices")(devices)

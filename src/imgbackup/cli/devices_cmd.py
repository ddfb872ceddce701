"""``imgbackup devices``: the disks and partitions of this machine."""

from __future__ import annotations

import typer

from imgbackup.cli.common import JsonOption, emit_json, human, print_table
from imgbackup.device.discovery import list_devices


def devices(json_out: JsonOption = False) -> None:
    """List disks and partitions: size, filesystem and label, model, serial, WWN, where mounted (ro/rw)."""
    found = list_devices()
    if json_out:
        emit_json({"devices": [d.to_dict() for d in found]})
        return
    rows = []
    for d in found:
        model = d.model or (f"(loop: {d.backing_file})" if d.backing_file else "")
        mounted = ", ".join(f"{m.mountpoint} ({'ro' if m.read_only else 'rw'})" for m in d.mounts)
        rows.append([d.path, d.kind, human(d.size), d.fstype or "-", d.label or "-", model or "-",
                     d.serial or "-", d.wwn or "-", mounted or "-"])
    print_table(["DEVICE", "TYPE", "SIZE", "FS", "LABEL", "MODEL", "SERIAL", "WWN", "MOUNTED"], rows,
                frozenset({"SIZE"}))


def register(app: typer.Typer) -> None:
    app.command("devices")(devices)

"""``imgbackup key list | add | remove | passwd``: the repository's key slots (FORMAT.md 2.1, 2.5).

Parsing and printing only; the slot operations live in ``repository.keyslots``. A new passphrase
comes from IMGBACKUP_NEW_PASSPHRASE, IMGBACKUP_NEW_PASSPHRASE_FILE or a prompt asked twice; every
change leaves one ``key_change`` audit event (slot id, label, kind — never key material).
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from imgbackup import audit
from imgbackup.cli.common import (
    JsonOption,
    RepoOption,
    emit_json,
    open_repo,
    print_table,
    read_new_passphrase,
)
from imgbackup.crypto.slots import SlotInfo
from imgbackup.repository.repo import Repository

key_app = typer.Typer(help="Key slots: list, add (full or backup-only), remove, change a passphrase.",
                      no_args_is_help=True)

LabelOption = Annotated[str, typer.Option("--label", help="What the key is for (a host, a person): shown by "
                                                          "'key list'. At most 200 characters.")]
WeakOption = Annotated[bool, typer.Option("--weak-passphrase",
                                          help="Accept a new passphrase shorter than 8 characters.")]


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def _audit(r: Repository, action: str):
    return audit.audited("key_change", repository=r.config.id, location=r.location, action=action)


def _emit_slot(info: SlotInfo, verb: str, json_out: bool, more: dict | None = None) -> None:
    if json_out:
        emit_json({"action": verb, **info.to_dict(), **(more or {})})
        return
    typer.echo(f"{verb} key slot {info.slot} ({info.kind}, label {info.label!r})")


@key_app.command("list")
def list_keys(repo: RepoOption = None, json_out: JsonOption = False) -> None:
    """Show the key slots: id, kind (full or backup-only), label, when made and last changed, whether
    a full-key holder signed it, and which one opened the repository now. Nothing secret."""
    from imgbackup.repository.keyslots import list_slots

    r = open_repo(repo)
    slots, damaged = list_slots(r)
    if json_out:
        emit_json({"repository": r.config.id, "opened_with": r.slot, "kind": r.keys.kind,
                   "slots": [{**s.to_dict(), "current": s.slot == r.slot} for s in slots], "damaged": damaged})
        return
    rows = [[("*" if s.slot == r.slot else " ") + s.slot, s.kind, s.label, _when(s.created), _when(s.changed),
             "yes" if s.signed else "NO"] for s in slots]
    print_table(["SLOT", "KIND", "LABEL", "CREATED", "CHANGED", "SIGNED"], rows)
    for line in damaged:
        typer.echo(f"imgbackup: warning: {line}", err=True)
    if any(not s.signed for s in slots):
        typer.echo("imgbackup: warning: a slot without a valid signature was not made with a full key "
                   "(or was tampered with): remove it unless you know where it came from", err=True)


@key_app.command("add")
def add_key(
    label: LabelOption = "",
    backup_only: Annotated[bool, typer.Option(
        "--backup-only", help="The new key can add images but not read their data nor remove anything.")] = False,
    weak_passphrase: WeakOption = False,
    repo: RepoOption = None,
    json_out: JsonOption = False,
) -> None:
    """Add a key slot with its own passphrase: the same repository keys (or, with --backup-only, only
    what adding images needs). Needs a full key."""
    from imgbackup.repository.keyslots import add_slot
    from imgbackup.repository.repo import refuse_weak_passphrase

    r = open_repo(repo, for_writing=True)
    r.require_full_key("add keys")
    secret = read_new_passphrase()
    refuse_weak_passphrase(secret, weak_passphrase)
    with _audit(r, "add") as fields:
        info = add_slot(r, secret, label, backup_only=backup_only)
        fields.update(slot=info.slot, label=info.label, kind=info.kind)
    _emit_slot(info, "added", json_out)


@key_app.command("remove")
def remove_key(
    slot: Annotated[str, typer.Argument(help="The slot id (a unique prefix) or its label.")],
    repo: RepoOption = None,
    json_out: JsonOption = False,
) -> None:
    """Remove a key slot; never the last full one. This does not re-encrypt anything: whoever kept a
    copy of the slot and knows its passphrase still holds the keys (FORMAT.md 2.5)."""
    from imgbackup.repository.keyslots import remove_slot

    r = open_repo(repo, for_writing=True)
    with _audit(r, "remove") as fields:
        info = remove_slot(r, slot)
        fields.update(slot=info.slot, label=info.label, kind=info.kind)
    _emit_slot(info, "removed", json_out)
    if not json_out:
        typer.echo("note: existing data is not re-encrypted; a kept copy of that slot still opens it with "
                   "its passphrase", err=True)


@key_app.command("passwd")
def change_passphrase(weak_passphrase: WeakOption = False, repo: RepoOption = None, json_out: JsonOption = False
                      ) -> None:
    """Change the passphrase of the key slot that opens the repository (IMGBACKUP_KEY_SLOT picks one):
    the slot is replaced in one atomic write, so a crash leaves the old passphrase or the new one."""
    from imgbackup.repository.keyslots import change_passphrase as change
    from imgbackup.repository.repo import refuse_weak_passphrase

    r = open_repo(repo, for_writing=True)
    secret = read_new_passphrase()
    refuse_weak_passphrase(secret, weak_passphrase)
    with _audit(r, "passwd") as fields:
        info = change(r, secret)
        fields.update(slot=info.slot, label=info.label, kind=info.kind)
    _emit_slot(info, "changed the passphrase of", json_out)


def register(app: typer.Typer) -> None:
    app.add_typer(key_app, name="key")

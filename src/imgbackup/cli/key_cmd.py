"""``imgbackup key list | add | remove | passwd``: the repository's key slots (FORMAT.md 2.1, 2.5).

Parsing and printing only; the slot operations live in ``repository.keyslots``. A new passphrase
comes from IMGBACKUP_NEW_PASSPHRASE, IMGBACKUP_NEW_PASSPHRASE_FILE or a prompt asked twice; every
change leaves one ``key_change`` audit event (slot id, label, kind — never key material).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from imgbackup import audit
from imgbackup.cli.common import (
    JsonOption,
    RepoOption,
    YesOption,
    emit_json,
    open_repo,
    print_table,
    read_new_passphrase,
    repo_path,
)
from imgbackup.crypto.slots import SlotInfo
from imgbackup.errors import UsageError
from imgbackup.repository.repo import Repository, refuse_weak_passphrase

key_app = typer.Typer(help="Key slots, backup-only keys, the paper recovery sheet.",
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

    r = open_repo(repo, for_writing=True)
    secret = read_new_passphrase()
    refuse_weak_passphrase(secret, weak_passphrase)
    with _audit(r, "passwd") as fields:
        info = change(r, secret)
        fields.update(slot=info.slot, label=info.label, kind=info.kind)
    _emit_slot(info, "changed the passphrase of", json_out)


@key_app.command("rotate")
def rotate_keys(
    label: LabelOption = "rotated",
    weak_passphrase: WeakOption = False,
    yes: YesOption = False,
    repo: RepoOption = None,
    json_out: JsonOption = False,
) -> None:
    """Give new data new keys: a new key generation (metadata, data and signing keys; the chunk-id key
    stays, so dedup goes on), held by one new slot with a new passphrase; every other slot is removed
    (issue new ones with 'key add'). Protects what is written from now on from an older key or paper
    sheet; data stored before stays readable by whoever kept one (FORMAT.md 2.5). Print a new sheet."""
    from imgbackup.repository.keyslots import rotate

    r = open_repo(repo, for_writing=True, needs_full_key="rotate keys")
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("refusing to rotate keys without --yes (it removes every other key slot; no terminal "
                             "to ask on)")
        typer.confirm("Rotate keys? Every other key slot is removed and must be issued again", abort=True)
    secret = read_new_passphrase()
    refuse_weak_passphrase(secret, weak_passphrase)
    with _audit(r, "rotate") as fields:
        rotated, info, removed = rotate(r, secret, label)
        fields.update(slot=info.slot, label=info.label, kind=info.kind, generations=len(rotated.keys.generations))
    if json_out:
        emit_json({"action": "rotated", **info.to_dict(), "generation": len(rotated.keys.generations),
                   "removed": [s.to_dict() for s in removed]})
        return
    typer.echo(f"key generation {len(rotated.keys.generations)}: new key slot {info.slot} (label {info.label!r}); "
               f"removed {len(removed)} other slot(s)")
    typer.echo("print a new recovery sheet: 'imgbackup key export --paper' (the old one no longer opens it)")


@key_app.command("export")
def export_key(
    paper: Annotated[bool, typer.Option("--paper", help="Print the recovery sheet (needed: the only form).")] = False,
    png: Annotated[str | None, typer.Option("--png", metavar="FILE", help="Also write the QR code as a PNG "
                                                                          "(created 0600, never over a file).")] = None,
    repo: RepoOption = None,
) -> None:
    """Print the repository's full key as a paper recovery sheet: numbered base32 lines, each with a
    check, and a QR code. It opens the repository even when every key slot is lost. Needs a full key;
    the sheet IS the key: print it, keep it off-site in a sealed envelope (README, 'paper recovery sheet')."""
    from imgbackup.crypto.paper import paper_qr_text, paper_sheet, qr_png, qr_terminal

    if not paper:
        raise UsageError("key export needs --paper (the recovery sheet is the one export form)")
    r = open_repo(repo, needs_full_key="export the full key")
    bundle = r.keys.to_bytes()
    with _audit(r, "export") as fields:
        if png:
            qr_png(paper_qr_text(bundle), png)
        fields.update(generations=len(r.keys.generations), png=bool(png))
    typer.echo(paper_sheet(bundle, r.config.id, _when(time.time())))
    if sys.stdout.isatty():
        typer.echo(qr_terminal(paper_qr_text(bundle)))


@key_app.command("import")
def import_key(
    paper: Annotated[str | None, typer.Option("--paper", metavar="FILE", help="The typed sheet (or its QR text); "
                                                                              "'-' reads standard input.")] = None,
    label: LabelOption = "paper",
    weak_passphrase: WeakOption = False,
    repo: RepoOption = None,
    json_out: JsonOption = False,
) -> None:
    """Open the repository with a paper recovery sheet and add a full key slot with a new passphrase.
    Without --paper the lines are typed at a prompt (an empty line ends). A mistyped line is named."""
    from imgbackup.crypto.keys import KeyBundle
    from imgbackup.crypto.paper import read_paper
    from imgbackup.repository.keyslots import import_paper

    r = Repository.open_with_bundle(repo_path(repo), KeyBundle.from_bytes(read_paper(_sheet_text(paper))),
                                    for_writing=True)
    secret = read_new_passphrase()
    refuse_weak_passphrase(secret, weak_passphrase)
    with _audit(r, "import") as fields:
        info = import_paper(r, secret, label)
        fields.update(slot=info.slot, label=info.label, kind=info.kind)
    _emit_slot(info, "added", json_out)


def _sheet_text(path: str | None) -> str:
    if path == "-":
        return sys.stdin.read()
    if path:
        try:
            return Path(path).read_text(errors="replace")
        except OSError as exc:
            raise UsageError(f"cannot read the sheet {path}: {exc.strerror}") from None
    if not sys.stdin.isatty():
        raise UsageError("key import needs --paper FILE (or '-') without a terminal to type the lines on")
    typer.echo("Type the sheet's numbered lines; an empty line ends.", err=True)
    lines = []
    while (line := input()).strip():
        lines.append(line)
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    app.add_typer(key_app, name="key")

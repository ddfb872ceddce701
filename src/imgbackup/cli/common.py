"""What every command shares: the repository option, passphrases, JSON output, progress, confirmation."""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from imgbackup.errors import PassphraseMissing, UsageError
from imgbackup.repository.repo import Repository

RepoOption = Annotated[
    str | None,
    typer.Option("-r", "--repo", envvar="IMGBACKUP_REPO", show_envvar=True,
                 help="Repository: a directory, file://PATH, or s3://BUCKET/PREFIX (see docs/S3.md)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
NameOption = Annotated[str | None, typer.Option(help="Source name for 'latest'.")]
LockWaitOption = Annotated[
    float,
    typer.Option("--lock-wait", metavar="SECONDS", envvar="IMGBACKUP_LOCK_WAIT", show_envvar=True,
                 help="While another delete/compact/repair/prune holds the repository, wait up to this long "
                      "instead of failing (exit 5)."),
]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask; needed to overwrite without a terminal.")]


def repo_path(repo: str | None) -> str:
    if not repo:
        raise UsageError("no repository given", "use -r/--repo or set IMGBACKUP_REPO")
    return repo


def read_passphrase(confirm: bool = False) -> bytes:
    """From IMGBACKUP_PASSPHRASE, IMGBACKUP_PASSPHRASE_FILE, or a terminal prompt — never argv."""
    if "IMGBACKUP_PASSPHRASE" in os.environ:
        return os.environ["IMGBACKUP_PASSPHRASE"].encode()
    path = os.environ.get("IMGBACKUP_PASSPHRASE_FILE")
    if path:
        try:
            return Path(path).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise PassphraseMissing(f"cannot read IMGBACKUP_PASSPHRASE_FILE {path}: {exc.strerror}") from None
    if not sys.stdin.isatty():
        raise PassphraseMissing("the repository needs a passphrase and there is no terminal to ask on")
    first = getpass.getpass("Repository passphrase: ")
    if confirm and getpass.getpass("Repeat passphrase: ") != first:
        raise UsageError("the passphrases do not match")
    if confirm and not first:
        raise UsageError("an empty passphrase is not allowed", "use --encryption none for no encryption")
    return first.encode()


def open_repo(repo: str | None, for_writing: bool = False) -> Repository:
    """Open the repository; commands that write pass ``for_writing`` (S3: the create-if-absent probe)."""
    return Repository.open(repo_path(repo), read_passphrase, for_writing=for_writing)


def emit_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")


def progress_bar(total: int, desc: str, enabled: bool) -> tuple[Callable[[int], None] | None, Callable[[], None]]:
    """A tqdm bar on stderr when stderr is a terminal; returns (update, close)."""
    if not enabled or not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
               dynamic_ncols=True)
    return bar.update, bar.close


def confirm_overwrite(description: str, expected: str, yes: bool) -> None:
    """Ask for the target's name to be typed back; without a terminal, --yes is required."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"refusing to overwrite {description} without --yes (no terminal to ask on)")
    typer.echo(f"This will OVERWRITE {description}", err=True)
    answer = input(f"Type '{expected}' to continue: ")
    if answer.strip() != expected:
        raise UsageError("not confirmed; nothing was written")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)

"""What every command shares: the repository option, passphrases, JSON output, progress, confirmation."""

from __future__ import annotations

import os
import sys
import termios
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from imgbackup import interrupts
from imgbackup.cli.output import emit_json  # noqa: F401  (the commands' one way to print JSON)
from imgbackup.errors import PassphraseMissing, UsageError, WrongPassphrase
from imgbackup.units import iec

if TYPE_CHECKING:      # imported when a command opens one: devices, rescue and job start faster without it
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


PROMPT_TRIES = 3   # like sudo and ssh: a typo at the prompt is not the end of the run


def _from_environment() -> bool:
    return "IMGBACKUP_PASSPHRASE" in os.environ or bool(os.environ.get("IMGBACKUP_PASSPHRASE_FILE"))


def _to_terminal(text: str) -> None:
    """Prompts go to the terminal itself (as getpass does), never stdout: that is the JSON document's."""
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(text)
    except OSError:
        sys.stderr.write(text)
        sys.stderr.flush()


def ask(prompt: str, echo: bool = True) -> str:
    """One line typed at the terminal on stdin.

    Unlike input() and getpass, a Ctrl-C typed the moment the prompt appears is never lost.
    """
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    if not echo:
        quiet = termios.tcgetattr(fd)
        quiet[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)
    try:
        _to_terminal(prompt)
        line = b""
        while not line.endswith(b"\n"):
            interrupts.wait_readable(fd)
            chunk = os.read(fd, 4096)
            if not chunk:
                raise UsageError("no answer at the prompt (end of input)", "nothing was changed")
            line += chunk
    finally:
        if not echo:
            termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
            _to_terminal("\n")
    return line.decode(errors="replace").rstrip("\r\n")


def _prompt(text: str) -> str:
    before = interrupts.status()
    interrupts.set_status(f"{before} (stopped at the passphrase prompt)")
    answer = ask(text, echo=False)
    interrupts.set_status(before)
    return answer


def read_passphrase(confirm: bool = False) -> bytes:
    """From IMGBACKUP_PASSPHRASE, IMGBACKUP_PASSPHRASE_FILE, or a terminal prompt — never argv."""
    return _passphrase("IMGBACKUP_PASSPHRASE", "Repository passphrase: ", confirm)


def read_other_passphrase(confirm: bool = False) -> bytes:
    """The passphrase of the second repository a command names (``copy --to``, ``init --related-to``):
    from IMGBACKUP_PASSPHRASE2, IMGBACKUP_PASSPHRASE2_FILE, or a terminal prompt — never argv."""
    return _passphrase("IMGBACKUP_PASSPHRASE2", "Passphrase of the other repository (--to/--related-to): ",
                       confirm)


def _passphrase(env: str, prompt: str, confirm: bool) -> bytes:
    if env in os.environ:
        return os.environ[env].encode()
    path = os.environ.get(f"{env}_FILE")
    if path:
        try:
            return Path(path).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise PassphraseMissing(f"cannot read {env}_FILE {path}: {exc.strerror}",
                                    f"set {env} or {env}_FILE, or run on a terminal") from None
    if not sys.stdin.isatty():
        raise PassphraseMissing(f"the repository needs a passphrase and there is no terminal to ask on "
                                f"({env} is not set)", f"set {env} or {env}_FILE, or run on a terminal")
    first = _prompt(prompt)
    if confirm and _prompt("Repeat passphrase: ") != first:
        raise UsageError("the passphrases do not match")
    if confirm and not first:
        raise UsageError("an empty passphrase is not allowed", "use --encryption none for no encryption")
    return first.encode()


def open_repo(repo: str | None, for_writing: bool = False) -> Repository:
    """Open the repository; a passphrase typed at the prompt gets PROMPT_TRIES tries. Commands
    that write pass ``for_writing`` (S3: the create-if-absent probe)."""
    from imgbackup.repository.repo import Repository

    path = repo_path(repo)
    if _from_environment():
        return Repository.open(path, read_passphrase, for_writing=for_writing)
    for attempt in range(1, PROMPT_TRIES + 1):
        try:
            return Repository.open(path, read_passphrase, for_writing=for_writing)
        except WrongPassphrase:
            if attempt == PROMPT_TRIES:
                raise WrongPassphrase(f"wrong passphrase ({PROMPT_TRIES} tries)",
                                      "the passphrase given to 'imgbackup init' is needed") from None
            typer.echo("imgbackup: wrong passphrase, try again", err=True)
    raise AssertionError("unreachable")


class ProgressBar:
    """A tqdm bar on stderr when it is a terminal; ``start(total)`` once the total is known."""

    def __init__(self, desc: str, enabled: bool, total: int | None = None) -> None:
        self.desc = desc
        self.enabled = enabled and sys.stderr.isatty()
        self._bar = None
        if total is not None:
            self.start(total)

    def start(self, total: int | None) -> None:
        if not self.enabled or self._bar is not None:
            return
        from tqdm import tqdm

        try:   # a serial console reports a 0x0 size, and tqdm then draws nothing at all
            sized = min(os.get_terminal_size(sys.stderr.fileno())) > 0
        except OSError:
            sized = False
        self._bar = tqdm(total=total, desc=self.desc, unit="B", unit_scale=True, unit_divisor=1024,
                         file=sys.stderr, dynamic_ncols=sized, ncols=None if sized else 80,
                         nrows=None if sized else 24)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def confirm_overwrite(description: str, expected: str, yes: bool) -> None:
    """Ask for the target's name to be typed back; without a terminal, --yes is required."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"refusing to overwrite {description} without --yes (no terminal to ask on)")
    typer.echo(f"This will OVERWRITE {description}", err=True)
    answer = ask(f"Type '{expected}' to continue: ")
    if answer.strip() != expected:
        raise UsageError("not confirmed; nothing was written")


human = iec


def print_table(headers: list[str], rows: list[list[str]], right: frozenset[str] = frozenset()) -> None:
    """Columns as wide as their widest cell (a long device path never shifts the others)."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(cells, widths, headers, strict=True)]
        return "  ".join(out).rstrip()

    typer.echo(line(headers))
    for row in rows:
        typer.echo(line(row))

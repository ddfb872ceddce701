"""Every error imgbackup reports on purpose: a one-line message and a documented exit code.

The CLI prints ``imgbackup: error: <message> (<hint>)`` and exits with ``exit_code``; with
``--json`` it also prints ``error_document(err)`` on stdout. Nothing else reaches the user as a
traceback. ``EXIT_CODES`` is the table ``--help`` shows and the README's table is generated from
(``scripts/exit-codes.py``; a test keeps them equal).
"""

from __future__ import annotations

import re


class ImgBackupError(Exception):
    """Base class: ``str(err)`` is the line shown to the user.

    ``kind`` names the error for scripts (the ``--json`` error document): the class name in
    snake case unless a class sets it, so every subclass has a stable one.
    """

    exit_code = 1
    hint = ""
    kind = "internal"

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        if "kind" not in cls.__dict__:
            cls.kind = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint

    @property
    def message(self) -> str:
        """What is wrong, without the hint."""
        return super().__str__()

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(ImgBackupError):
    exit_code = 2


class RepositoryNotFound(ImgBackupError):
    exit_code = 3
    hint = "check -r/--repo or IMGBACKUP_REPO, or create one with 'imgbackup init'"


class RepositoryExists(ImgBackupError):
    exit_code = 3


class UnsupportedFormat(ImgBackupError):
    exit_code = 3


class WrongPassphrase(ImgBackupError):
    exit_code = 4
    hint = "check IMGBACKUP_PASSPHRASE / IMGBACKUP_PASSPHRASE_FILE"


class PassphraseMissing(ImgBackupError):
    exit_code = 4
    hint = "set IMGBACKUP_PASSPHRASE or IMGBACKUP_PASSPHRASE_FILE, or run on a terminal"


class KeyNotAllowed(ImgBackupError):
    """The key opened the repository but does not allow this (a backup-only key: no reading, no removing)."""

    exit_code = 4
    hint = "use a full key (its passphrase, or a slot made with 'imgbackup key add' or 'key import --paper')"


class ForeignKey(ImgBackupError):
    """A key (a recovery sheet) that belongs to another repository: a wrong key, not damage."""

    exit_code = 4
    hint = "use the recovery sheet of this repository (its id is printed on the sheet)"


class BadPaperKey(ImgBackupError):
    """A recovery sheet that does not parse: the message names the first bad line."""

    exit_code = 4


class RepositoryLocked(ImgBackupError):
    exit_code = 5


class IntegrityError(ImgBackupError):
    """Stored data failed authentication, a checksum, or a structural check."""

    exit_code = 6
    hint = "run 'imgbackup verify' to see what is damaged"


class SourceError(ImgBackupError):
    exit_code = 7


class TargetRefused(ImgBackupError):
    exit_code = 8
    audit_refusal = True


class ImageNotFound(ImgBackupError):
    exit_code = 9
    hint = "'imgbackup list' shows the images"


class PathNotFound(ImgBackupError):
    """A file or directory asked for is not in the image (restore-files)."""

    exit_code = 9


class StorageError(ImgBackupError):
    """The repository's storage failed (full disk, I/O error, permissions, a server unreachable after
    retries, credentials the server rejects). Backends raise only this and ObjectMissing."""

    exit_code = 10


class RepositoryFull(StorageError):
    """The repository's disk (or quota) is full."""

    hint = "run 'imgbackup compact' to reclaim space that interrupted runs left, or delete old images"


class ObjectMissing(ImgBackupError):
    """A named repository object does not exist (callers that expect it turn this into their own error)."""

    exit_code = 6
    hint = "run 'imgbackup verify' to see what is damaged"


class VerificationFailed(ImgBackupError):
    """A check ran to the end and found problems (verify, restore digest)."""

    exit_code = 11


class ObjectRetained(StorageError):
    """The storage refused to delete an object that S3 Object Lock (a retention date or a legal hold)
    still protects. Removers treat it as "retained, removed by a later prune or compact"."""

    def __init__(self, message: str, name: str, until: float | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.until = until


class Refused(ImgBackupError):
    """Refused on purpose: the image is under legal hold, or the repository is append-only."""

    exit_code = 14
    audit_refusal = True


class ImageHeld(Refused):
    hint = "'imgbackup release IMAGE' ends the hold, if that is decided"


class AppendOnly(Refused):
    hint = "the repository is append-only: 'imgbackup append-only off' allows removing again"


class ToolTimeout(StorageError):
    """An outside program (resize2fs, e2fsck, losetup…) did not finish within its time limit."""


class ToolMissing(ImgBackupError):
    """A required outside program is not installed; the hint names the Debian package."""

    exit_code = 12


class PartlyUnreadable(ImgBackupError):
    """``backup --rescue`` stored a complete image, but some sectors of the source could not be read."""

    exit_code = 13


class PartialSuccess(ImgBackupError):
    """A job stored its backup, but a later step (prune, copy, verify, drill) failed."""

    exit_code = 15


class RpoBreached(ImgBackupError):
    """``status``: some job's newest image is older than its RPO."""

    exit_code = 16


class SourceIdentityChanged(ImgBackupError):
    """The disk at a job's source name is not the disk the job recorded: never imaged into its history."""

    exit_code = 17
    audit_refusal = True


class JobConfigError(UsageError):
    """A job file is missing or invalid; the message names the file and line."""


class Interrupted(ImgBackupError):
    """Ctrl-C or SIGTERM; the message says what state the run left behind."""

    exit_code = 130


EXIT_CODES: list[tuple[int, str]] = [
    (0, "success"),
    (1, "unexpected internal error (a bug: please report it)"),
    (2, "usage error, or not confirmed (no --yes without a terminal, or a wrong answer)"),
    (3, "repository (or its S3 bucket) missing, already existing, or of an unknown format version"),
    (4, "wrong or missing passphrase or recovery key, or the key does not allow this (a backup-only key)"),
    (5, "repository locked by another process"),
    (6, "stored data is corrupted or was tampered with (also: 'list' showed DAMAGED images)"),
    (7, "source cannot be read, or is mounted read-write without --allow-mounted"),
    (8, "target refused: mounted, in use, the running system's disk, or too small"),
    (9, "image not found or name ambiguous, or a path not found in the image"),
    (10, "storage error: disk full, I/O error, permission denied, server unreachable after retries, "
         "credentials rejected by the server"),
    (11, "verification found problems"),
    (12, "a required outside program is missing (the message names it and its apt package)"),
    (13, "backup stored, but N bytes of the source were unreadable ('backup --rescue')"),
    (14, "refused: the image is under legal hold, or the repository is append-only"),
    (15, "partial success: a job stored its backup, but a later step (prune, copy, verify, drill) failed"),
    (16, "status: a job's RPO is breached (its newest image is older than its RPO)"),
    (17, "refused: the source's identity (serial, size, partition table) is not the one the job recorded"),
    (130, "interrupted (Ctrl-C / SIGTERM)"),
]


def error_document(err: ImgBackupError) -> dict:
    """The one JSON document every failing command prints on stdout with ``--json``."""
    return {"error": {"kind": err.kind, "message": err.message, "hint": err.hint, "exit_code": err.exit_code}}


def exit_codes_markdown() -> str:
    """The README's exit-code table, generated from ``EXIT_CODES`` (options and 'commands' as code)."""
    def cell(text: str) -> str:
        return re.sub(r"'([a-z][a-z -]*)'|(--[a-z][a-z-]*)", lambda m: f"`{m.group(1) or m.group(2)}`", text)

    rows = [f"| {code} | {cell(text)} |" for code, text in EXIT_CODES]
    return "\n".join(["| code | meaning |", "|---|---|", *rows]) + "\n"

"""Every error imgbackup reports on purpose: a one-line message and a documented exit code.

The CLI prints ``imgbackup: <message>`` and exits with ``exit_code``; nothing else
reaches the user as a traceback. ``EXIT_CODES`` is the table the README and ``--help`` show.
"""

from __future__ import annotations


class ImgBackupError(Exception):
    """Base class: ``str(err)`` is the line shown to the user."""

    exit_code = 1
    hint = ""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} ({self.hint})" if self.hint else text


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


class ImageNotFound(ImgBackupError):
    exit_code = 9
    hint = "'imgbackup list' shows the images"


class StorageError(ImgBackupError):
    """The repository's storage failed (full disk, I/O error, permissions, a server unreachable after
    retries, credentials the server rejects). Backends raise only this and ObjectMissing."""

    exit_code = 10


class ObjectMissing(ImgBackupError):
    """A named repository object does not exist (callers that expect it turn this into their own error)."""

    exit_code = 6
    hint = "run 'imgbackup verify' to see what is damaged"


class VerificationFailed(ImgBackupError):
    """A check ran to the end and found problems (verify, restore digest)."""

    exit_code = 11


class ToolTimeout(StorageError):
    """An outside program (resize2fs, e2fsck, losetup…) did not finish within its time limit."""


class ToolMissing(ImgBackupError):
    """A required outside program is not installed; the hint names the Debian package."""

    exit_code = 12


class Interrupted(ImgBackupError):
    exit_code = 130


EXIT_CODES: list[tuple[int, str]] = [
    (0, "success"),
    (1, "unexpected internal error (a bug: please report it)"),
    (2, "usage error: bad option, missing argument, refused without --yes"),
    (3, "repository (or its S3 bucket) missing, already existing, or of an unknown format version"),
    (4, "wrong or missing passphrase or recovery key, or the key does not allow this (a backup-only key)"),
    (5, "repository locked by another process"),
    (6, "stored data is corrupted or was tampered with"),
    (7, "source cannot be read, or is mounted read-write without --allow-mounted"),
    (8, "target refused: mounted, too small, or not confirmed"),
    (9, "image not found or name ambiguous"),
    (10, "storage error: disk full, I/O error, permission denied, server unreachable after retries, "
         "credentials rejected by the server"),
    (11, "verification found problems"),
    (12, "a required outside program is missing (the message names it and its apt package)"),
    (130, "interrupted (Ctrl-C / SIGTERM)"),
]

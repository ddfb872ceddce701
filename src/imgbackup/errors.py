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


class ToolTimeout(StorageError):
    """An outside program (resize2fs, e2fsck, losetup…) did not finish within its time limit."""


class ToolMissing(ImgBackupError):
    """A required outside program is not installed; the hint names the Debian package."""

    exit_code = 12


class PartlyUnreadable(ImgBackupError):
    """``backup --rescue`` stored a complete image, but some sectors of the source could not be read."""

    exit_code = 13


class Interrupted(ImgBackupError):
    exit_code = 130


EXIT_CODES: list[tuple[int, str]] = [
    (0, "success"),
    (1, "unexpected internal error (a bug: please report it)"),
    (2, "usage error: bad option, missing argument, refused without --yes"),
    (3, "repository (or its S3 bucket) missing, already existing, or of an unknown format version"),
    (4, "wrong or missing passphrase"),
    (5, "repository locked by another process"),
    (6, "stored data is corrupted or was tampered with"),
    (7, "source cannot be read, or is mounted read-write without --allow-mounted"),
    (8, "target refused: mounted, too small, or not confirmed"),
    (9, "image not found or name ambiguous, or a path not found in the image"),
    (10, "storage error: disk full, I/O error, permission denied, server unreachable after retries, "
         "credentials rejected by the server"),
    (11, "verification found problems"),
    (12, "a required outside program is missing (the message names it and its apt package)"),
    (13, "backup stored, but N bytes of the source were unreadable (backup --rescue)"),
    (130, "interrupted (Ctrl-C / SIGTERM)"),
]

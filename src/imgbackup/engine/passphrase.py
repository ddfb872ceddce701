"""A passphrase kept in a file (a job's ``passphrase_file``, the rescue media's
``imgbackup.passphrase-file``): read only when the repository asks, one line whose line ending is not
part of it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from imgbackup.errors import PassphraseMissing


def passphrase_file_source(path: str | os.PathLike | None, shown: str, missing: str,
                           hint: str = "") -> Callable[[], bytes]:
    """The repository's passphrase source for the file ``path``; ``shown`` names the file in the error
    when it cannot be read, ``missing`` (and ``hint``) say what to do when there is no file."""
    def source() -> bytes:
        if path is None:
            raise PassphraseMissing(missing, hint)
        try:
            return Path(path).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise PassphraseMissing(f"cannot read {shown}: {exc.strerror}") from None
    return source

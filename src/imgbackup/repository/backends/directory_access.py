"""Who may touch a local repository (FORMAT.md 2.7): owner-only modes, a safe place, exposed key files.

A key slot is only as strong as its passphrase once someone can copy it, and a repository in a
folder other users can write to can be renamed away and replaced under its owner. So files are
0600 and folders 0700 whatever the umask, ``init`` refuses a location below a folder every user
may write to (unless its sticky bit stops them renaming what is not theirs, as on /tmp), and
``verify`` warns about key slots others can read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from imgbackup.errors import StorageError, TargetRefused

FILE_MODE = 0o600  # every object: only the repository's owner reads or writes it
DIR_MODE = 0o700   # every folder, the repository's own included
KEY_FOLDER = "keys"


def make_private_dir(path: Path) -> bool:
    """Create one folder with mode 0700 exactly (the umask cannot widen or narrow it); False if it exists."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return False
    os.chmod(path, DIR_MODE)
    return True


def set_private_file(fd: int) -> None:
    """Give a freshly created object file mode 0600 exactly, whatever the umask took away."""
    os.fchmod(fd, FILE_MODE)


def _mode_text(mode: int) -> str:
    return f"{stat.S_IMODE(mode):04o}"


def check_init_location(root: Path) -> None:
    """Refuse to create a repository where another user could rename, replace or read it.

    Every existing folder above ``root`` must not be writable by all users unless sticky; an
    existing ``root`` must be a real folder of this user that nobody else can write to."""
    uid = os.geteuid()
    for folder in root.parents:
        try:
            info = os.stat(folder)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StorageError(f"cannot check {folder}: {exc.strerror}") from None
        if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
            raise TargetRefused(f"refused: {folder} (mode {_mode_text(info.st_mode)}) is writable by every user, "
                                f"who could replace the repository", f"chmod o-w {folder}, or choose another place")
    try:
        info = os.lstat(root)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise TargetRefused(f"refused: {root} is a symbolic link (its target could be swapped)",
                            f"give the real path: {os.path.realpath(root)}")
    if not stat.S_ISDIR(info.st_mode):
        raise TargetRefused(f"refused: {root} is not a directory", "choose a new or empty directory")
    if info.st_uid != uid:
        raise TargetRefused(f"refused: {root} belongs to user id {info.st_uid}, not to you",
                            "choose a directory of your own")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise TargetRefused(f"refused: other users can write to {root} (mode {_mode_text(info.st_mode)})",
                            f"chmod go-w {root}, or choose another directory")


def key_file_exposure(root: str | os.PathLike) -> list[str]:
    """One warning line per key slot (and the keys/ folder) that group or others may read or write.

    For ``verify`` on a local repository; empty when every slot is owner-only (or there is none)."""
    folder = Path(root) / KEY_FOLDER
    warnings = []
    try:
        entries = [folder, *sorted(folder.iterdir())]
    except FileNotFoundError:
        return []
    except OSError as exc:
        return [f"cannot check the key slots in {folder}: {exc.strerror}"]
    for path in entries:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        who = [name for name, bits in (("group", 0o070), ("others", 0o007)) if mode & bits]
        if who:
            name = f"{KEY_FOLDER}/" if path == folder else f"{KEY_FOLDER}/{path.name}"
            warnings.append(f"{name} is open to {' and '.join(who)} (mode {_mode_text(mode)}): anyone who copies a "
                            f"key slot can try passphrases offline; chmod go= {path}")
    return warnings

"""A job's local state: ``/var/lib/imgbackup/jobs/NAME.json`` (``--state-dir``), and the job's run lock.

The state holds what the job recorded about its source at its first successful backup (the
fingerprint every later run must match), when the job was installed, and the last runs. It is
written atomically (temp file, fsync, rename, fsync folder). A damaged state file stops the job:
without it the source's identity cannot be checked, so it is never silently started afresh.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from imgbackup.errors import JobConfigError, RepositoryLocked, StorageError

DEFAULT_STATE_DIR = "/var/lib/imgbackup/jobs"
STATE_VERSION = 1
KEEP_RUNS = 30     # the last runs kept for 'job list' and 'status': a month of daily runs


@dataclass
class JobState:
    identity: dict | None = None          # the source fingerprint recorded at the first successful backup
    identity_recorded: float | None = None
    installed: float | None = None
    first_run: float | None = None
    last_success: dict | None = None      # {"time", "image", "bytes_read", "bytes_stored"}
    runs: list[dict] = field(default_factory=list)   # newest last: {"started", "duration_s", "exit_code", ...}

    @property
    def last_run(self) -> dict | None:
        return self.runs[-1] if self.runs else None

    def add_run(self, run: dict) -> None:
        self.runs = [*self.runs, run][-KEEP_RUNS:]


def state_path(state_dir: str, name: str) -> Path:
    return Path(state_dir) / f"{name}.json"


def load_state(state_dir: str, name: str) -> JobState:
    path = state_path(state_dir, name)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return JobState()
    except (OSError, ValueError) as exc:
        raise JobConfigError(f"job state {path} is unreadable: {exc}",
                             "restore it from a backup, or move it away to record the source's identity anew") from None
    if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
        raise JobConfigError(f"job state {path} has an unknown version", "it was written by another imgbackup")
    doc.pop("version")
    try:
        return JobState(**doc)
    except TypeError as exc:
        raise JobConfigError(f"job state {path} is damaged: {exc}") from None


def save_state(state_dir: str, name: str, state: JobState) -> None:
    path = state_path(state_dir, name)
    data = json.dumps({"version": STATE_VERSION, **asdict(state)}, indent=1, sort_keys=True).encode() + b"\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"cannot write job state {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def job_lock(state_dir: str, name: str) -> Iterator[None]:
    """One run of a job at a time (flock; the kernel drops it when the process dies)."""
    path = Path(state_dir) / f"{name}.lock"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot create the job lock {path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            raise RepositoryLocked(f"job {name} is already running{' (pid ' + holder + ')' if holder else ''}",
                                   "wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)

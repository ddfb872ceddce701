"""What a mount owns, on disk, and how to take it down again — even when its owner has died.

The state file is rewritten the moment a loop device or mount comes into existence, so the list
is never shorter than reality. ``teardown`` is idempotent: it checks each recorded object against
the live system (mount table, a loop's backing file, a process's start time) before touching it,
so it never unmounts, detaches or signals something that merely reuses a recorded name or PID.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

from imgbackup.device.mounts import read_mount_table
from imgbackup.device.sysfs import backing_file
from imgbackup.device.tools import detach_loop, retry, run, wait_until

log = logging.getLogger("imgbackup.mount")

SERVER_EXIT_WAIT = 5.0   # libfuse's server leaves within ~1 s of the unmount; after that it is stuck: SIGTERM


def run_dir() -> Path:
    return Path(os.environ.get("IMGBACKUP_RUN_DIR", "/run/imgbackup"))


def _key(mountpoint: str) -> str:
    return hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]


def state_path(mountpoint: str) -> Path:
    return run_dir() / f"mount-{_key(mountpoint)}.json"


def log_path(mountpoint: str) -> Path:
    return run_dir() / f"mount-{_key(mountpoint)}.log"


def mountpoints() -> dict[str, str]:
    """Mount point -> filesystem type, from this process's mount table."""
    return {line.info.mountpoint: line.info.fstype for line in read_mount_table()}


def fuse_mounted(mountpoint: str) -> bool:
    return mountpoints().get(os.path.realpath(mountpoint)) == "fuse.imgbackup"


@dataclass
class ProcessRef:
    """A PID plus its start time, so a reused PID is never mistaken for ours."""

    pid: int
    start: str

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        return cls(pid, _start_time(pid) or "")

    def alive(self) -> bool:
        return self.pid > 0 and _start_time(self.pid) == self.start and not _is_zombie(self.pid)


def _proc_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def _start_time(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def _is_zombie(pid: int) -> bool:
    fields = _proc_stat(pid)
    return fields is None or fields[0] in ("Z", "X")


@dataclass
class MountState:
    mountpoint: str
    image: str
    supervisor: ProcessRef | None = None
    server: ProcessRef | None = None
    loops: list[dict] = field(default_factory=list)     # {"device": "/dev/loopN", "file": backing file}
    mounts: list[str] = field(default_factory=list)     # mount points under mountpoint/fs

    @property
    def log(self) -> str:
        return str(log_path(self.mountpoint))

    def save(self) -> None:
        path = state_path(self.mountpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    def remove(self) -> None:
        state_path(self.mountpoint).unlink(missing_ok=True)

    @classmethod
    def load(cls, mountpoint: str) -> MountState | None:
        try:
            doc = json.loads(state_path(mountpoint).read_text())
        except (OSError, ValueError):
            return None
        for key in ("supervisor", "server"):
            if doc.get(key):
                doc[key] = ProcessRef(**doc[key])
        return cls(**doc)


def drop_log(mountpoint: str, unless_troubled: bool = True) -> None:
    """Remove a finished mount's log, but keep one that recorded warnings or errors (damaged
    chunks, a server that died) for the sysadmin, unless told otherwise."""
    path = log_path(mountpoint)
    if unless_troubled:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return
        if " WARNING " in text or " ERROR " in text:
            return
    path.unlink(missing_ok=True)


def _umount(target: str, problems: list[str]) -> None:
    if target not in mountpoints():
        return
    res = retry(["umount", target])
    if res.returncode != 0:
        problems.append(f"{target} is busy; detached lazily ({res.stderr.strip()})")
        run(["umount", "-l", target])


def _detach(loop: dict, problems: list[str]) -> None:
    dev = loop["device"]
    name = os.path.basename(dev)
    if backing_file(name) != loop["file"]:
        return   # gone already, or reused for something else
    problem = detach_loop(dev)
    if problem:
        problems.append(problem)


def _stop_server(ref: ProcessRef | None) -> None:
    if ref is None or wait_until(lambda: not ref.alive(), SERVER_EXIT_WAIT):
        return
    log.warning("FUSE server %d still running after unmount; sending SIGTERM", ref.pid)
    os.kill(ref.pid, signal.SIGTERM)


def teardown(state: MountState, fuse: bool = True) -> list[str]:
    """Unmount filesystems, detach loops, unmount FUSE, stop the server; returns problems left."""
    problems: list[str] = []
    for target in reversed(state.mounts):
        _umount(target, problems)
    for loop in reversed(state.loops):
        _detach(loop, problems)
    if not fuse:
        return problems
    if fuse_mounted(state.mountpoint):
        res = retry(["fusermount3", "-u", state.mountpoint])
        if res.returncode != 0:
            problems.append(f"{state.mountpoint} is busy; detached lazily ({res.stderr.strip()})")
            run(["fusermount3", "-u", "-z", state.mountpoint])
    _stop_server(state.server)
    return problems


def unmount(mountpoint: str, timeout: float = 60.0) -> list[str]:
    """``imgbackup umount``: ask the supervisor to tear down, then clean up whatever is left."""
    from imgbackup.errors import UsageError

    mountpoint = os.path.realpath(mountpoint)
    state = MountState.load(mountpoint)
    if state is None:
        if fuse_mounted(mountpoint):
            return teardown(MountState(mountpoint, ""))
        raise UsageError(f"no imgbackup mount at {mountpoint}")
    sup = state.supervisor
    if sup is not None and sup.alive() and sup.pid != os.getpid():
        os.kill(sup.pid, signal.SIGTERM)
        wait_until(lambda: not sup.alive(), timeout)
        state = MountState.load(mountpoint) or MountState(mountpoint, state.image)
    problems = teardown(state)
    if not problems:
        state.remove()
        drop_log(mountpoint)
    return problems


def setup_logging(mountpoint: str, to_stderr: bool) -> str:
    """Log mount events to the mount's log file (a daemon has no terminal) and optionally stderr."""
    path = log_path(mountpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("imgbackup")
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(message)s"))
    logger.addHandler(handler)
    if to_stderr:
        logger.addHandler(logging.StreamHandler())
    return str(path)

"""Outside programs: the one place imgbackup runs them.

Every tool call gets a time limit; a missing program is one line naming it and the Debian package
that provides it (``ToolMissing``, exit 12); retries are bounded and hand their last result back,
so a give-up is reported like any other failure. Loop devices are attached and detached here, and
filesystems probed with blkid, so each has one implementation.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence

from imgbackup.errors import StorageError, ToolMissing, ToolTimeout

log = logging.getLogger("imgbackup")

# Program -> the Debian 12 package that provides it (checked with ``dpkg -S``).
PACKAGES = {
    "blkid": "util-linux", "partx": "util-linux",
    "losetup": "mount", "mount": "mount", "umount": "mount",
    "fusermount3": "fuse3",
    "e2fsck": "e2fsprogs", "resize2fs": "e2fsprogs", "dumpe2fs": "e2fsprogs", "debugfs": "e2fsprogs",
    "xfs_repair": "xfsprogs", "xfs_growfs": "xfsprogs",
    "fsck.vfat": "dosfstools",
    "btrfs": "btrfs-progs",
    "ntfs-3g": "ntfs-3g",
    "sgdisk": "gdisk", "sfdisk": "fdisk",
    "mcopy": "mtools", "mdir": "mtools",
    "cp": "coreutils",
    "qemu-system-x86_64": "qemu-system-x86",
    "lvcreate": "lvm2", "lvremove": "lvm2", "lvs": "lvm2",
    "mmdebstrap": "mmdebstrap", "mksquashfs": "squashfs-tools", "grub-mkrescue": "grub-common",
    "xorriso": "xorriso", "depmod": "kmod", "apt-cache": "apt",
    "udevadm": "udev", "systemctl": "systemd", "systemd-inhibit": "systemd", "systemd-analyze": "systemd",
}

TOOL_TIMEOUT = 3600.0     # e2fsck, resize2fs or xfs_repair on a multi-TiB filesystem may run for most of an hour
PROBE_TIMEOUT = 30.0      # blkid reads a few superblocks; longer means a hung device, not a slow one
RETRY_ATTEMPTS = 50       # a loop or mount just closed is released within ~1 s; 50 x 0.1 s leaves room for udev
RETRY_DELAY = 0.1
POLL_INTERVAL = 0.05      # short enough that waiting for a process adds no noticeable latency
KILL_WAIT = 10.0          # SIGKILL cannot be caught: a group not gone by then is stuck in the kernel


def missing(program: str) -> ToolMissing:
    """The error for a program that is not installed, naming the package that provides it."""
    package = PACKAGES.get(os.path.basename(program))
    return ToolMissing(f"{program} is not installed",
                       f"apt install {package}" if package else "install it or add it to PATH")


def run(cmd: Sequence[str], *, timeout: float | None = TOOL_TIMEOUT, env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with its output captured as text and no stdin; its exit status is the caller's to judge.

    ToolMissing when the program is not installed, ToolTimeout when it runs past ``timeout`` seconds
    (it is killed); ``timeout=None`` for work whose length is the data's (copying files out).
    """
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL, env=env, cwd=cwd)
    except FileNotFoundError:
        raise missing(cmd[0]) from None
    except subprocess.TimeoutExpired:
        raise ToolTimeout(f"{cmd[0]} did not finish within {timeout:g} s") from None


def run_as_group(cmd: Sequence[str], *, timeout: float | None = TOOL_TIMEOUT,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``run``, for a program we did not write (a user's hook): it and everything it starts form one
    process group, killed as a whole when the call ends early — timeout, Ctrl-C, SIGTERM — so none of
    it outlives the run that started it (``run`` kills only the direct child)."""
    try:
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent())
    except FileNotFoundError:
        raise missing(cmd[0]) from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise ToolTimeout(f"{cmd[0]} did not finish within {timeout:g} s") from None
    except BaseException:
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def retry(cmd: Sequence[str], *, attempts: int = RETRY_ATTEMPTS, delay: float = RETRY_DELAY,
          timeout: float = TOOL_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` until it exits 0, at most ``attempts`` times; the last result either way, so the
    caller reports a give-up with the tool's own message."""
    for attempt in range(attempts):
        res = run(cmd, timeout=timeout)
        if res.returncode == 0 or attempt == attempts - 1:
            return res
        time.sleep(delay)
    raise ValueError("retry needs at least one attempt")


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = POLL_INTERVAL) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def output_tail(res: subprocess.CompletedProcess[str], chars: int = 300) -> str:
    """The end of a tool's stdout and stderr together: what an error message quotes."""
    return (res.stdout + res.stderr).strip()[-chars:]


def run_on_terminal(cmd: Sequence[str], *, env: dict[str, str] | None = None) -> int:
    """Run an interactive step (a restore showing its progress) on this process's own terminal;
    its exit status."""
    try:
        return subprocess.run(list(cmd), env=env, check=False).returncode
    except FileNotFoundError:
        raise missing(cmd[0]) from None


# ---- loop devices ----

def attach_loop(path: str, *, offset: int | None = None, size: int | None = None,
                read_only: bool = False) -> str:
    """A new loop device over ``path`` (bytes [offset, offset+size) when given); StorageError if refused."""
    cmd = ["losetup", "--find", "--show"]
    if read_only:
        cmd.append("--read-only")
    if offset is not None:
        cmd += ["--offset", str(offset)]
    if size is not None:
        cmd += ["--sizelimit", str(size)]
    res = run([*cmd, path], timeout=PROBE_TIMEOUT)
    if res.returncode != 0:
        raise StorageError(f"losetup over {path} failed: {res.stderr.strip()}")
    return res.stdout.strip()


def detach_loop(dev: str) -> str | None:
    """Detach ``dev`` (retried while the kernel still holds it); None, or what went wrong."""
    res = retry(["losetup", "-d", dev], timeout=PROBE_TIMEOUT)
    return None if res.returncode == 0 else f"cannot detach {dev}: {res.stderr.strip()}"


@contextlib.contextmanager
def loop_over(path: str, offset: int | None = None, size: int | None = None,
              read_only: bool = False) -> Iterator[str]:
    """A loop device for the body, detached by its name afterwards.

    A device that will not detach is an error when the body succeeded; when the body failed its
    error is the one raised and the stuck device is logged.
    """
    dev = attach_loop(path, offset=offset, size=size, read_only=read_only)
    body_ok = False
    try:
        yield dev
        body_ok = True
    finally:
        problem = detach_loop(dev)
        if problem and body_ok:
            raise StorageError(problem, f"detach it with 'losetup -d {dev}'")
        if problem:
            log.error("%s (detach it with 'losetup -d %s')", problem, dev)


# ---- filesystem probing ----

def blkid(path: str) -> dict[str, str]:
    """``blkid -p -o export`` of a device or image file: TYPE, LABEL, UUID… (empty if nothing found).

    Low-level probing (-p) reads the device itself, so it needs no udev and no blkid cache, but it
    needs read access (root for disks).
    """
    res = run(["blkid", "-p", "-o", "export", path], timeout=PROBE_TIMEOUT)
    if res.returncode != 0:
        return {}
    fields = {}
    for line in res.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


def probe_fstype(path: str) -> str | None:
    """The filesystem type blkid finds in a device or file, or None."""
    return blkid(path).get("TYPE") or None


# ---- long-running programs ----

Process = subprocess.Popen


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec hook making the child die with its parent (PR_SET_PDEATHSIG), where libc has prctl."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def setup() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)

    return setup


def spawn(cmd: Sequence[str], *, cwd: str | None = None) -> Process:
    """Start a long-running program (a QEMU guest) in its own session, stdout and stderr on one pipe.

    Its own process group lets ``kill_group`` stop everything it started; PR_SET_PDEATHSIG makes it
    die even when this process is killed outright. ToolMissing when it is not installed.
    """
    try:
        return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd,
                                preexec_fn=_die_with_parent())
    except FileNotFoundError:
        raise missing(cmd[0]) from None


def kill_group(proc: Process) -> None:
    """Kill a spawned program's whole process group by its own PID and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_WAIT)
    if proc.poll() is None:  # should not happen: SIGKILL cannot be caught
        proc.kill()
        proc.wait()

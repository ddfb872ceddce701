"""A disk that really fails: nbdkit's ddrescue filter over a file, exposed as a file by nbdfuse.

Reads of the byte ranges marked bad get EIO from the kernel, exactly at sector granularity for
O_DIRECT reads (through the page cache a bad sector fails its whole page). Both processes are
started and stopped by their own PIDs, and the FUSE mount is unmounted, even when the body fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support import need, need_root, need_tool, run

from imgbackup.device.tools import wait_until


def write_mapfile(path: Path, size: int, bad: list[tuple[int, int]]) -> None:
    """A GNU ddrescue mapfile: ``bad`` ranges marked '-' (bad sector), the rest '+' (finished)."""
    lines = ["# Mapfile. Created by imgbackup's tests", "# current_pos  current_status  current_pass",
             "0x00000000     +               1", "#      pos        size  status"]
    pos = 0
    for off, length in sorted(bad):
        if off > pos:
            lines.append(f"0x{pos:08X}  0x{off - pos:08X}  +")
        lines.append(f"0x{off:08X}  0x{length:08X}  -")
        pos = off + length
    if pos < size:
        lines.append(f"0x{pos:08X}  0x{size - pos:08X}  +")
    path.write_text("\n".join(lines) + "\n")


READY_WAIT = 15.0      # nbdkit and nbdfuse are ready within a second; longer means they failed
UNMOUNT_WAIT = 5.0     # a FUSE mount whose files were just closed is released within about a second


def _wait_for(check, what: str, proc: subprocess.Popen) -> None:
    ready = wait_until(lambda: check() or proc.poll() is not None, READY_WAIT)
    if proc.poll() is not None:
        raise AssertionError(f"{what}: the process exited with {proc.returncode}")
    assert ready, f"{what}: not ready after {READY_WAIT} s"


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def failing_disk(data: Path, bad: list[tuple[int, int]], work: Path) -> Iterator[Path]:
    """Serve ``data`` read-only as ``work/mnt/disk.img`` with ``bad`` (offset, length) ranges failing."""
    need_root()
    need_tool("nbdkit", "nbdfuse", "fusermount3")
    need(Path("/dev/fuse").exists(), "needs /dev/fuse")
    work.mkdir(parents=True, exist_ok=True)
    mapfile, sock, mnt = work / "disk.map", work / "nbd.sock", work / "mnt"
    write_mapfile(mapfile, data.stat().st_size, bad)
    mnt.mkdir(exist_ok=True)
    server = fuse = None
    with open(work / "nbdkit.log", "w") as kit_log, open(work / "nbdfuse.log", "w") as fuse_log:
        try:
            server = subprocess.Popen(["nbdkit", "--foreground", "--readonly", "--unix", str(sock),
                                       "--filter=ddrescue", "file", f"file={data}", f"ddrescue-mapfile={mapfile}"],
                                      stdout=subprocess.DEVNULL, stderr=kit_log)
            _wait_for(sock.exists, "nbdkit", server)
            fuse = subprocess.Popen(["nbdfuse", "--readonly", str(mnt / "disk.img"), "--unix", str(sock)],
                                    stdout=subprocess.DEVNULL, stderr=fuse_log)
            _wait_for(lambda: (mnt / "disk.img").exists(), "nbdfuse", fuse)
            yield mnt / "disk.img"
        finally:
            wait_until(lambda: f" {mnt} " not in Path("/proc/mounts").read_text()   # also after nbdfuse died
                       or run("fusermount3", "-u", mnt, check=False).returncode == 0, UNMOUNT_WAIT, 0.1)
            _stop(fuse)
            _stop(server)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)

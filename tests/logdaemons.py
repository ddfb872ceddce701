"""Real log receivers for the audit tests: a systemd-journald of its own, and a syslog socket.

journald runs as ``systemd-journald NAMESPACE`` (a journal namespace, as ``LogNamespace=`` starts it):
it listens on ``/run/systemd/journal.NAMESPACE/socket`` and writes ``/var/log/journal/<machine
id>.NAMESPACE/``, so it never touches a system journal. A random namespace per test; the process is
stopped by its PID and both directories removed afterwards, even when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imgbackup.device.tools import wait_until

JOURNALD = "/lib/systemd/systemd-journald"


@dataclass
class Journal:
    namespace: str
    directory: Path
    socket: Path

    def entries(self, *matches: str) -> list[dict]:
        """Entries written so far (``journalctl --file``), optionally filtered (``KEY=VALUE``)."""
        if not self.directory.exists():
            return []
        res = subprocess.run(["journalctl", "--file", str(self.directory / "*.journal"), "-o", "json", "--all",
                              "--no-pager",
                              *matches], capture_output=True, text=True, timeout=30)
        return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def _machine_id() -> str:
    return Path("/etc/machine-id").read_text().strip()


@contextlib.contextmanager
def running_journald() -> Iterator[Journal]:
    namespace = f"imgbt{secrets.token_hex(4)}"
    run_dir = Path(f"/run/systemd/journal.{namespace}")
    journal = Journal(namespace, Path(f"/var/log/journal/{_machine_id()}.{namespace}"), run_dir / "socket")
    Path("/var/log/journal").mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([JOURNALD, namespace], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_until(journal.socket.exists, 15), "systemd-journald did not create its socket"
        yield journal
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(journal.directory, ignore_errors=True)


class SyslogListener:
    """A unix datagram socket standing in for /dev/log: what a syslog daemon would receive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)

    def messages(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(1 << 20))
            except (TimeoutError, BlockingIOError):
                return out

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@contextlib.contextmanager
def syslog_socket(directory: Path) -> Iterator[SyslogListener]:
    listener = SyslogListener(directory / "log.sock")
    try:
        yield listener
    finally:
        listener.close()

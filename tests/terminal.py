"""A real terminal for CLI tests: ``imgbackup`` on a pseudo-terminal, as a person at a keyboard runs it.

The child gets the pty as its controlling terminal, so prompts appear, progress bars draw, and
typing Ctrl-C (``\\x03``) makes the kernel send SIGINT to it, exactly as at a real terminal.
``expect`` waits for text with a deadline (bounded polling), never a fixed sleep.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time

from tests.support import cli_env

CTRL_C = b"\x03"


class Terminal:
    def __init__(self, *args: str | os.PathLike, repo=None, passphrase: str | None = "test-pass",
                 columns: int = 120, **extra: str) -> None:
        # PYTHONFAULTHANDLER: a child that hangs can be asked for every thread's stack (SIGABRT) before
        # it is killed, so a test that times out says where it stuck
        env = cli_env(repo, passphrase, **extra) | {"COLUMNS": str(columns), "TERM": "xterm", "PYTHONFAULTHANDLER": "1"}
        argv = [sys.executable, "-m", "imgbackup", *map(str, args)]
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is already its stdin/stdout/stderr and controlling tty
            try:
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        self.output = b""
        self.returncode: int | None = None
        self._seen = 0      # expect() searches the text after its last match

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace").replace("\r\n", "\n")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal (it exited)
            return False
        if not data:
            return False
        self.output += data
        return True

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        """Wait until the output after the last match matches ``pattern`` (a regex); fail with the output."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.compile(pattern).search(self.text, self._seen)
            if found:
                self._seen = found.end()
                return found
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.2)) and not re.compile(pattern).search(self.text, self._seen):
                raise AssertionError(f"timed out waiting for {pattern!r}; output so far:\n{self.text}")

    def send(self, data: bytes | str) -> None:
        os.write(self.fd, data.encode() if isinstance(data, str) else data)

    def signal(self, signum: int = signal.SIGINT) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 120) -> int:
        """Read the rest of the output and reap the child; its exit code (128+N for signal N)."""
        deadline = time.monotonic() + timeout
        while True:
            still_open = self._read(0.1)
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self._drain()
                return self._set(status)
            if time.monotonic() > deadline:
                self._dump_stacks()
                self.kill()
                raise AssertionError(f"imgbackup did not exit within {timeout} s; output:\n{self.text}")
            if not still_open:
                time.sleep(0.05)   # the terminal is closed; poll for the exit itself

    def _dump_stacks(self) -> None:
        """SIGABRT: the child's fault handler writes every thread's traceback to the terminal."""
        try:
            os.kill(self.pid, signal.SIGABRT)
        except ProcessLookupError:
            return
        end = time.monotonic() + 3
        while time.monotonic() < end and self._read(0.2):
            pass

    def _drain(self) -> None:
        while select.select([self.fd], [], [], 0)[0] and self._read(0):
            pass

    def _set(self, status: int) -> int:
        os.close(self.fd)
        self.returncode = os.waitstatus_to_exitcode(status)
        if self.returncode < 0:
            self.returncode = 128 - self.returncode
        return self.returncode

    def kill(self) -> None:
        """Clean-up for a failed test: end the child (by its own pid) and reap it."""
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except ProcessLookupError:
                pass
            os.close(self.fd)
            self.returncode = -9

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

"""The rescue system's voice: every step on every console, in the journal, and in a log file.

Unattended restores run with nobody watching, or with someone watching a remote console that may be
the screen or the serial port, so each line goes to all active kernel consoles
(``/sys/class/tty/console/active``) and to stdout (the journal). Lines written before the log
file's device is mounted are kept and written to it first.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

ACTIVE_CONSOLES = Path("/sys/class/tty/console/active")


def boot_seconds(uptime_file: Path = Path("/proc/uptime")) -> float | None:
    """Seconds since the kernel started: where in the boot a step ran (the media's time profile)."""
    try:
        return float(uptime_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def console_devices(active_file: Path = ACTIVE_CONSOLES) -> list[str]:
    """Device nodes of the active kernel consoles (``tty0`` = the screen's current VT)."""
    try:
        names = active_file.read_text().split()
    except OSError:
        return []
    return [f"/dev/{n}" for n in names if Path(f"/dev/{n}").exists()]


class RescueLog:
    """Timestamped lines to the consoles, stdout and (once ``attach``ed) a log file, fsync'ed."""

    def __init__(self, consoles: list[str] | None = None, echo=print) -> None:
        self.consoles = console_devices() if consoles is None else consoles
        self.echo = echo
        self.lines: list[str] = []
        self.path: Path | None = None
        self._file = None

    def __call__(self, text: str) -> None:
        for raw in str(text).splitlines() or [""]:
            line = f"{time.strftime('%H:%M:%S')} imgbackup-rescue: {raw}"
            self.lines.append(line)
            self.echo(line)
            for dev in self.consoles:
                with contextlib.suppress(OSError), open(dev, "a") as tty:
                    tty.write(line + "\r\n")
            if self._file is not None:
                self._write(line)

    def _write(self, line: str) -> None:
        try:
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError:
            self._file = None    # the device went away: the consoles still have it

    def attach(self, path: Path) -> None:
        """Start writing to ``path`` (directories created), beginning with every earlier line."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open until detach()
        self.path = path
        for line in self.lines:
            self._write(line)

    def detach(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file = None

"""Keeping the machine awake while a job runs: a logind sleep inhibitor, as ``systemd-inhibit`` takes one.

``systemd-inhibit --what=sleep:idle --mode=block`` holds the lock for as long as the program it runs
lives; that program is a ``sleep`` in its own process group, killed when the job ends (and by
PR_SET_PDEATHSIG if the job dies). The lock is taken in the job rather than by wrapping ExecStart,
so the unit's ExecStart is the job itself and runs the same with or without logind: where logind
is not running (containers, rescue systems) the job runs anyway and its summary says why it could
not inhibit sleep.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Iterator

from imgbackup.device.tools import kill_group, spawn
from imgbackup.errors import ToolMissing

READY = b"imgbackup-inhibit-ready"
START_TIMEOUT = 10.0   # logind answers within milliseconds; a D-Bus that does not answer in 10 s is broken


@contextlib.contextmanager
def sleep_inhibited(why: str) -> Iterator[dict]:
    """Hold a sleep/idle inhibitor for the body; yields {"inhibited": bool, "reason": str}."""
    cmd = ["systemd-inhibit", "--what=sleep:idle", "--who=imgbackup", f"--why={why}", "--mode=block",
           "sh", "-c", f"echo {READY.decode()}; exec sleep infinity"]
    try:
        proc = spawn(cmd)
    except ToolMissing as exc:
        yield {"inhibited": False, "reason": str(exc)}
        return
    try:
        out = b""
        deadline = time.monotonic() + START_TIMEOUT
        while READY not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                out += chunk
        if READY in out:
            yield {"inhibited": True, "reason": "systemd-inhibit --what=sleep:idle"}
        else:
            text = out.decode(errors="replace").strip().splitlines()
            yield {"inhibited": False, "reason": f"systemd-inhibit: {text[-1] if text else 'no answer'}"}
    finally:
        kill_group(proc)
        proc.stdout.close()

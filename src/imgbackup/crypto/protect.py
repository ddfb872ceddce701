"""Keep key material out of core dumps: the process is made non-dumpable while it holds keys.

``prctl(PR_SET_DUMPABLE, 0)`` stops the kernel writing a core file (and ptrace by other processes of
the same user, and reading this process's memory through /proc). It lasts until the process exits
or execs another program, so it covers every key a command unwraps. Python cannot wipe its bytes
objects reliably; this keeps them from leaving the process instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def forbid_core_dumps() -> bool:
    """True when the process is now non-dumpable (False off Linux or when prctl fails)."""
    try:
        return _libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def dumpable() -> int:
    """The process's dumpable flag (0 once keys were unwrapped), -1 when it cannot be read."""
    try:
        return int(_libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
    except (OSError, AttributeError):
        return -1

"""Ctrl-C and SIGTERM: one clean unwind, and a line saying what state the run left behind.

The first SIGINT or SIGTERM raises KeyboardInterrupt in the main thread, so every ``finally`` and
``except BaseException`` clean-up runs (a half-written new file removed, the lock released).
Later signals are ignored: a second Ctrl-C must not cut that clean-up short.

While a command runs, its code keeps ``status`` current: what is true if the run stops *now*
("nothing was added to the repository", "/dev/sdb is partly written and not usable"). Set the
pessimistic status *before* a step that changes something and the reassuring one after it; the
CLI prints ``<command> interrupted: <status>`` once the unwind is over, so clean-up code may
update it too. ``deferred()`` holds a signal back over a few lines that must not be split (an
object committed and the status saying so), then raises it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Status = str | Callable[[], str]

_received: int | None = None
_pending = False
_depth = 0
_status: Status = "nothing was changed"


def install() -> None:
    """Route SIGINT and SIGTERM to the one-shot handler (main thread only, as Python requires)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)


def _handler(signum: int, frame) -> None:
    global _received, _pending
    if _received is not None:
        return
    _received = signum
    if _depth:
        _pending = True
        return
    raise KeyboardInterrupt


def received() -> int | None:
    """The signal that interrupted this run, if any."""
    return _received


def set_status(status: Status) -> None:
    """What is true if the run is interrupted from here on: text, or a callable giving it then."""
    global _status
    _status = status


def status() -> str:
    """The current status line (a callable status is evaluated now)."""
    return _status() if callable(_status) else _status


@contextmanager
def deferred() -> Iterator[None]:
    """Hold an interrupt back until the block is done, then raise it (main thread only)."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if not _depth and _pending:
        _pending = False
        raise KeyboardInterrupt

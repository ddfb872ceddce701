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

A signal that lands just before a blocking read begins would only be handled once the read
returns (Python runs handlers between bytecodes), so a Ctrl-C typed as a prompt appears could be
lost. ``wait_readable`` closes that gap with the signal module's wakeup pipe.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Status = str | Callable[[], str]

_received: int | None = None
_pending = False
_depth = 0
_status: Status = "nothing was changed"
_wakeup: int | None = None   # read end of the pipe the C-level handler writes each signal to


def install() -> None:
    """Route SIGINT and SIGTERM to the one-shot handler (main thread only, as Python requires),
    whatever was inherited: a background job of a non-interactive shell starts with SIGINT ignored,
    and a sysadmin's ``kill -INT`` must still end it (the guest lab's LVM test does exactly that)."""
    global _wakeup
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)
    if _wakeup is None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        _wakeup = r


def wait_readable(fd: int) -> None:
    """Block until ``fd`` can be read; a signal at any moment, even just before, interrupts the wait."""
    while True:
        waiting = [fd] if _wakeup is None else [fd, _wakeup]
        ready, _, _ = select.select(waiting, [], [])
        if _wakeup in ready:   # the handler runs at the next bytecode, and raises unless ignored
            while True:
                try:
                    if not os.read(_wakeup, 64):
                        break
                except BlockingIOError:
                    break
        if fd in ready:
            return


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

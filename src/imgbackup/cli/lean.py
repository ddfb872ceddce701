"""The rescue media's launcher: its own fixed commands without Typer, everything else through it.

The media start three commands themselves: ``rescue run --after-coldplug`` (imgbackup-rescue.service,
the unattended restore), ``rescue login`` (every console's login) and ``rescue menu`` (the guide).
Typer and click are ~1.3 s of a TCG guest's CPU warm and ~5 s at a boot's cold page cache, on the
path to the unattended run's first line and to every login's prompt; these commands take no other
arguments, so they are dispatched here. Any other argument list (``rescue run --help``, a typo)
goes to ``cli.main``, which parses and reports it as usual. Errors end as in ``cli.main``: one line,
the documented exit code, 130 when interrupted.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from imgbackup import audit, interrupts
from imgbackup.errors import ImgBackupError, Interrupted


def _rescue_run(after_coldplug: bool) -> Callable[[], int]:
    def run() -> int:
        from imgbackup.engine.rescue.unattended import run_from_cmdline

        return run_from_cmdline(Path("/proc/cmdline").read_text(), after_coldplug=after_coldplug)
    return run


def _rescue_login() -> int:
    from imgbackup.engine.rescue.menu import on_login

    return on_login()


def _rescue_menu() -> int:
    from imgbackup.engine.rescue.menu import guided

    return guided()


LEAN_COMMANDS: dict[tuple[str, ...], Callable[[], int]] = {
    ("rescue", "run"): _rescue_run(False),
    ("rescue", "run", "--after-coldplug"): _rescue_run(True),
    ("rescue", "login"): _rescue_login,
    ("rescue", "menu"): _rescue_menu,
}


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread its own malloc arena; with 1 MiB chunk buffers made on pool threads
    they each keep tens of MiB. Two arenas cut peak RSS without slowing the pipeline (glibc only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def run(argv: list[str] | None = None) -> None:
    """Entry point of the media's /usr/local/bin/imgbackup."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = LEAN_COMMANDS.get(tuple(args))
    if command is None:
        from imgbackup.cli.main import run as full_run

        full_run(args)
        return
    interrupts.install()
    limit_malloc_arenas()             # the unattended run restores in this process
    audit.set_command(args)
    name = " ".join(args[:2])
    try:
        code = command()
    except KeyboardInterrupt:
        code = _fail(Interrupted(f"{name} interrupted: {interrupts.status()}"))
    except ImgBackupError as exc:
        code = _fail(exc)
    sys.exit(code)


def _fail(exc: ImgBackupError) -> int:
    sys.stderr.write(f"imgbackup: error: {exc}\n")
    return exc.exit_code

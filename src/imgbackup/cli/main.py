"""The ``imgbackup`` command: the Typer app, command registration, and error-to-exit-code mapping."""

from __future__ import annotations

import importlib
import signal
import sys

import typer

from imgbackup import __version__
from imgbackup.errors import EXIT_CODES, ImgBackupError, Interrupted, StorageError

# Typer raises click's exceptions, from click itself or (typer >= 0.26) from its vendored copy.
_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

EXIT_STATUS = "\b\nExit status:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES)

app = typer.Typer(
    name="imgbackup",
    help="Block-level disk image backup: encrypted, compressed, incremental images of disks, "
         "partitions and image files.",
    epilog=EXIT_STATUS,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


# Which module defines which commands: a run imports only its command's module (and what that
# needs), so a backup does not load restore, mount and verify code; --help loads them all.
COMMAND_MODULES = {
    "repo_cmd": ("init", "list", "info", "break-lock"),
    "backup_cmd": ("backup",),
    "restore_cmd": ("restore",),
    "verify_cmd": ("verify",),
    "images_cmd": ("delete", "diff"),
    "devices_cmd": ("devices",),
    "mount_cmd": ("mount", "umount", "restore-files"),
    "rescue_cmd": ("rescue",),
    "maintain_cmd": ("repair", "compact"),
}


def _register(argv: list[str]) -> None:
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    wanted = [m for m, names in COMMAND_MODULES.items() if command in names] or list(COMMAND_MODULES)
    for module in wanted:
        importlib.import_module(f"imgbackup.cli.{module}").register(app)


@app.callback(invoke_without_command=True)
def _main(version: bool = typer.Option(False, "--version", help="Show the version and exit.")) -> None:
    if version:
        typer.echo(f"imgbackup {__version__}")
        raise typer.Exit(0)


def _on_sigterm(signum, frame):  # turn SIGTERM into the same clean unwind as Ctrl-C
    raise KeyboardInterrupt


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread its own malloc arena; with 1 MiB chunk buffers made on pool threads
    they each keep tens of MiB. Two arenas cut peak RSS without slowing the pipeline (glibc only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _log_storage_warnings() -> None:
    """Storage retries are warnings a person or a job log should see: one line each on stderr."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("imgbackup: warning: %(message)s"))
    logger = logging.getLogger("imgbackup.storage")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)


def run(argv: list[str] | None = None) -> None:
    """Entry point: runs the app and turns every expected failure into one line and an exit code."""
    _limit_malloc_arenas()
    _log_storage_warnings()
    try:
        _register(sys.argv[1:] if argv is None else argv)
    except ImportError as exc:  # a missing compiled core or dependency: one line, not a traceback
        sys.stderr.write(f"imgbackup: error: {exc}\n")
        sys.exit(1)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # typer >= 0.26 returns (not raises) a command's typer.Exit code, and turns a command's
        # KeyboardInterrupt into a returned 130
        code = app(args=argv, standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
    except ImgBackupError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _fail(Interrupted("interrupted: nothing of this run was committed to the repository "
                          "(a restore target may be partly written)"))
    except OSError as exc:
        _fail(StorageError(f"{exc.strerror or exc}{': ' + exc.filename if exc.filename else ''}"))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _fail(Interrupted("aborted"))
    except _CLICK_EXCEPTION as exc:  # usage errors: click's own message, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(exc: ImgBackupError) -> None:
    sys.stderr.write(f"imgbackup: error: {exc}\n")
    sys.exit(exc.exit_code)


if __name__ == "__main__":
    run()

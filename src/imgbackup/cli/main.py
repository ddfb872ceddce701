"""The ``imgbackup`` command: the Typer app, command registration, and error-to-exit-code mapping.

Every failure ends the same way: one line ``imgbackup: error: <what> (<what to do>)`` on stderr,
the documented exit code, and with ``--json`` one error document on stdout (``errors.error_document``)
unless the command already printed its result document. Ctrl-C and SIGTERM end a run with 130 and
``<command> interrupted: <state>`` (see ``imgbackup.interrupts``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import traceback

import typer

from imgbackup import __version__, audit, interrupts
from imgbackup.cli.lean import limit_malloc_arenas
from imgbackup.cli.output import emit_json, emitted
from imgbackup.errors import (
    EXIT_CODES,
    ImgBackupError,
    Interrupted,
    StorageError,
    UsageError,
    error_document,
)

# Typer raises click's exceptions, from click itself or (typer >= 0.26) from its vendored copy.
_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

ENVIRONMENT = ("\b\nEnvironment:\n"
               "  IMGBACKUP_REPO             the repository (instead of -r/--repo)\n"
               "  IMGBACKUP_PASSPHRASE       the repository passphrase\n"
               "  IMGBACKUP_PASSPHRASE_FILE  a file holding it (one line); without either, a prompt asks\n"
               "  IMGBACKUP_KEY_SLOT         the key slot to try first (id prefix or label; default: the last used)\n"
               "  IMGBACKUP_NEW_PASSPHRASE   a new passphrase for 'key add/passwd' (or _FILE; else a prompt)\n"
               "  IMGBACKUP_RUN_DIR          where mount state and logs live (default /run/imgbackup)\n"
               "  IMGBACKUP_AUDIT            audit event sinks (as --audit)")
EXIT_STATUS = "\b\nExit status:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES)

app = typer.Typer(
    name="imgbackup",
    help="Block-level disk image backup: encrypted, compressed, incremental images of disks, "
         "partitions and image files. 'imgbackup COMMAND -h' shows a command's options.",
    epilog=ENVIRONMENT + "\n\n" + EXIT_STATUS,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)

# What is true when a command is interrupted before its own code says more (interrupts.set_status).
INITIAL_STATUS = {"init": "no repository was created", "backup": "nothing was added to the repository",
                  "delete": "nothing was deleted", "restore": "nothing was written",
                  "restore-files": "nothing was copied"}


# Which module defines which commands: a run imports only its command's module (and what that
# needs), so a backup does not load restore, mount and verify code; --help loads them all.
COMMAND_MODULES = {
    "repo_cmd": ("init", "list", "info", "break-lock"),
    "backup_cmd": ("backup",),
    "restore_cmd": ("restore",),
    "verify_cmd": ("verify",),
    "images_cmd": ("delete", "diff"),
    "copy_cmd": ("copy",),
    "devices_cmd": ("devices",),
    "mount_cmd": ("mount", "umount", "restore-files"),
    "rescue_cmd": ("rescue",),
    "lifecycle_cmd": ("hold", "release", "append-only"),
    "prune_cmd": ("prune",),
    "maintain_cmd": ("repair", "compact"),
    "job_cmd": ("job",),
    "status_cmd": ("status",),
    "drill_cmd": ("drill",),
    "key_cmd": ("key",),
}


def _guarded(name: str, callback):
    """The command's callback, turning Ctrl-C/SIGTERM into one 'NAME interrupted: STATE' error."""
    @functools.wraps(callback)
    def run_command(*args, **kwargs):
        interrupts.set_status(INITIAL_STATUS.get(name, "nothing was changed"))
        try:
            return callback(*args, **kwargs)
        except (KeyboardInterrupt, typer.Abort) as exc:   # click's prompts turn Ctrl-C into Abort
            if isinstance(exc, typer.Abort) and interrupts.received() is None:
                raise
            raise Interrupted(f"{name} interrupted: {interrupts.status()}") from None

    run_command.guarded = True
    return run_command


def _prepare(commands: typer.Typer, prefix: str = "") -> None:
    """Whole one-line summaries in --help, and every command (in groups too) guarded once."""
    for info in commands.registered_commands:
        if getattr(info.callback, "guarded", False):
            continue
        if info.short_help is None and info.callback.__doc__:   # the whole first paragraph, never cut
            info.short_help = " ".join(inspect.cleandoc(info.callback.__doc__).split("\n\n")[0].split())
        name = info.name or info.callback.__name__.replace("_", "-")
        info.callback = _guarded(f"{prefix}{name}", info.callback)
    for group in commands.registered_groups:
        _prepare(group.typer_instance, f"{prefix}{group.name} ")


def _register(argv: list[str]) -> None:
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    wanted = [m for m, names in COMMAND_MODULES.items() if command in names] or list(COMMAND_MODULES)
    for module in wanted:
        importlib.import_module(f"imgbackup.cli.{module}").register(app)
    _prepare(app)


@app.callback(invoke_without_command=True)
def _main(version: bool = typer.Option(False, "--version", help="Show the version and exit."),
          audit_sinks: str | None = typer.Option(
              None, "--audit", metavar="SINKS",
              help="Send audit events to these sinks (journald, journald:NAMESPACE, syslog, syslog:SOCKET, "
                   "file:PATH; comma-separated), instead of those in IMGBACKUP_AUDIT.")) -> None:
    if audit_sinks is not None:
        audit.configure(audit_sinks)
    if version:
        typer.echo(f"imgbackup {__version__}")
        raise typer.Exit(0)


def _wants_json(argv: list[str]) -> bool:
    return "--json" in (argv[: argv.index("--")] if "--" in argv else argv)


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
    interrupts.install()
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = _wants_json(args)
    limit_malloc_arenas()
    _log_storage_warnings()
    try:
        _register(args)
    except ImportError as exc:  # a missing compiled core or dependency: one line, not a traceback
        _fail(ImgBackupError(str(exc)), as_json)
    audit.set_command(args)           # the catalog's entries read it from there too
    code = 0
    try:
        code = app(args=args, standalone_mode=False, prog_name="imgbackup")
    except ImgBackupError as exc:
        _fail(exc, as_json)
    except KeyboardInterrupt:  # between commands' own handling: parsing, start-up
        _fail(Interrupted(f"interrupted: {interrupts.status()}"), as_json)
    except OSError as exc:
        _fail(StorageError(f"{exc.strerror or exc}{': ' + exc.filename if exc.filename else ''}"), as_json)
    except typer.Abort:  # end of input at a prompt
        _fail(UsageError("no answer at the prompt (end of input)", "nothing was changed"), as_json)
    except _CLICK_EXCEPTION as exc:
        _fail(_usage_error(exc), as_json)
    except Exception:  # a bug: the traceback is for the report; --json still gets its document
        if as_json and not emitted():
            emit_json(error_document(ImgBackupError("unexpected internal error (a bug: please report it)")))
        traceback.print_exc()
        sys.exit(1)
    if code == 130:  # typer's own KeyboardInterrupt handling (parsing), never a command's result
        _fail(Interrupted(f"interrupted: {interrupts.status()}"), as_json)
    sys.exit(code if isinstance(code, int) else 0)


def _usage_error(exc) -> UsageError:
    """Click's usage errors in the documented one-line form, with where to look for help."""
    err = UsageError(exc.format_message().rstrip("."))
    ctx = getattr(exc, "ctx", None)
    err.hint = f"see '{ctx.command_path if ctx else 'imgbackup'} --help'"
    err.exit_code = exc.exit_code
    return err


def _fail(exc: ImgBackupError, as_json: bool = False) -> None:
    sys.stderr.write(f"imgbackup: error: {exc}\n")
    if as_json and not emitted():
        emit_json(error_document(exc))
    sys.exit(exc.exit_code)


if __name__ == "__main__":
    run()

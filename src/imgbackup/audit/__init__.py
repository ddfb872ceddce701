"""Audit events: one structured record per action an auditor asks about, to journald, syslog or a file.

Every event has the same fields (``FIELDS``): when, where, who, which command, which repository and
image, the result, bytes and duration; an event type adds a few of its own (``extra``). Engines and
the CLI call ``emit`` (or ``audited`` around a step); the sinks come from ``configure`` (a job
file's ``audit`` list, the ``--audit`` option) or else from ``IMGBACKUP_AUDIT``
(``journald,file:/var/log/imgbackup/audit.jsonl``). No secret is ever a field: names that look
like one are refused, and passphrases never reach this module.

A sink that cannot take an event (journald not running, a full disk) never fails the action
being audited: one warning goes to stderr and the failure is kept for the job summary.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pwd
import re
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from imgbackup.audit.sinks import Sink, SinkError, parse_sinks

# Event type -> journald MESSAGE_ID (fixed forever: journalctl MESSAGE_ID=… finds them) and syslog
# severity (RFC 5424: 6 informational, 4 warning, 3 error) for a successful event.
EVENT_TYPES: dict[str, tuple[str, int]] = {
    "backup": ("1adfcabf812b43289b84e91e1078f804", 6),
    "restore": ("c4ff73c7409d4556a172c48f5d66343f", 6),
    "copy": ("6a970e7d9eb242248164d00367f07044", 6),
    "delete": ("f130e8d3028047d9b4a1d6db55f8ac19", 6),
    "prune": ("a0819307c6ed4aae8199479905ae7904", 6),
    "hold": ("3388313e1e6346ce92c097430fc54bf5", 6),
    "release": ("4f8d18c8ada54c64b295679729dad1c2", 6),
    "key_change": ("527815b2226b4ffdbfdfac7e071c584b", 5),
    "passphrase_failed": ("31a4c83c4a7248129119caf4a3ec8894", 4),
    "lock_takeover": ("fe8c17ab72924406af1e43b94cb74fd6", 5),
    "verify_failed": ("9f320ec691d74adc8735caa7bf48becc", 3),
    "drill": ("caa3eaeb492d44bfa596ee3093498f70", 6),
    "source_refused": ("ad65604d4d9344f3b7498eabb01a345c", 3),
    "compact": ("073df10852174cd5bc2d75595cc7b0ef", 6),
    "repair": ("48ec391751a04b1eacef8c2a3cd97292", 5),
}
RESULTS = ("ok", "failed", "refused")
FIELDS = ("time", "event", "result", "host", "user", "uid", "pid", "command", "repository", "location",
          "image", "name", "bytes", "duration_s", "error", "exit_code")
_SECRET_WORDS = re.compile(r"pass|secret|password|token|credential|private", re.I)
ENV_VAR = "IMGBACKUP_AUDIT"


@dataclass
class AuditEvent:
    """One event: the common fields, then what this event type adds."""

    event: str
    result: str
    fields: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.fields.items() if v is not None}

    def summary(self) -> str:
        """The human line (journald MESSAGE, the syslog MSG)."""
        f = self.fields
        parts = [f"{self.event} {self.result}"]
        for key, label in (("image", "image"), ("name", "source"), ("repository", "repository")):
            if f.get(key):
                parts.append(f"{label} {str(f[key])[:12] if key != 'name' else f[key]}")
        if f.get("bytes") is not None:
            parts.append(f"{f['bytes']} bytes")
        if f.get("duration_s") is not None:
            parts.append(f"{f['duration_s']} s")
        if f.get("error"):
            parts.append(f"error: {f['error']}")
        return ", ".join(parts)

    def severity(self) -> int:
        base = EVENT_TYPES[self.event][1]
        return base if self.result == "ok" else min(base, 4 if self.result == "refused" else 3)


class _Config:
    sinks: list[Sink] | None = None      # None: read IMGBACKUP_AUDIT at the first event
    command: str = ""
    argv: list[str] | None = None        # as given: the catalog's entries name it too
    failures: list[str] = []


def configure(specs: list[str] | str | None) -> None:
    """Use these sinks (``journald``, ``journald:NAMESPACE``, ``syslog``, ``syslog:SOCKET``,
    ``file:PATH``; a list or one comma-separated string); None goes back to IMGBACKUP_AUDIT."""
    _Config.sinks = None if specs is None else parse_sinks(specs)


def set_command(argv: list[str]) -> None:
    """The command line events name (``imgbackup backup /dev/sdb --name sdb``); never holds a secret,
    since passphrases are never arguments."""
    _Config.command = shlex.join(["imgbackup", *argv])
    _Config.argv = list(argv)


def command_argv() -> list[str] | None:
    """The arguments given to ``set_command`` (None before): read by the repository's catalog, which
    so needs no call of its own at start-up (importing it imports the crypto stack, ~0.15 s here and
    seconds in a TCG guest, for commands that never open a repository)."""
    return _Config.argv


def delivery_failures() -> list[str]:
    """What could not be delivered in this process (for the job summary)."""
    return list(_Config.failures)


def _sinks() -> list[Sink]:
    if _Config.sinks is None:
        _Config.sinks = parse_sinks(os.environ.get(ENV_VAR, ""))
    return _Config.sinks


def _user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def make_event(event: str, result: str = "ok", **fields) -> AuditEvent:
    """The event with every common field filled in; ValueError for a field that could hold a secret."""
    if event not in EVENT_TYPES:
        raise ValueError(f"unknown audit event type {event!r}")
    if result not in RESULTS:
        raise ValueError(f"unknown audit result {result!r}")
    for key in fields:
        if _SECRET_WORDS.search(key) or not re.fullmatch(r"[a-z][a-z0-9_]*", key):
            raise ValueError(f"audit field {key!r} is not allowed")
    common = {"time": _now(), "event": event, "result": result, "host": socket.gethostname(), "user": _user(),
              "uid": os.getuid(), "pid": os.getpid(), "command": _Config.command or shlex.join(sys.argv)}
    if os.environ.get("SUDO_USER"):
        common["sudo_user"] = os.environ["SUDO_USER"]
    return AuditEvent(event, result, {**common, **fields})


def emit(event: str, result: str = "ok", **fields) -> AuditEvent:
    """Build one event and hand it to every configured sink (none configured: nothing to do)."""
    ev = make_event(event, result, **fields)
    for sink in _sinks():
        try:
            sink.send(ev)
        except SinkError as exc:
            message = f"audit event {event} not delivered to {sink.name}: {exc}"
            _Config.failures.append(message)
            sys.stderr.write(f"imgbackup: warning: {message}\n")
    return ev


@contextlib.contextmanager
def audited(event: str, **fields) -> Iterator[dict]:
    """Emit ``event`` when the body ends: ``ok`` with what the body put into the yielded dict, or
    ``failed`` (``refused`` for refusals) with the error's message and exit code; the error still
    propagates. The duration is measured here."""
    started = time.monotonic()
    more: dict = {}
    try:
        yield more
    except BaseException as exc:
        code = getattr(exc, "exit_code", 130 if isinstance(exc, KeyboardInterrupt) else 1)
        emit(event, "refused" if getattr(exc, "audit_refusal", False) else "failed", **fields, **more,
             duration_s=round(time.monotonic() - started, 3), error=str(exc) or type(exc).__name__,
             exit_code=code)
        raise
    emit(event, "ok", **{**fields, **more, "duration_s": more.get("duration_s",
                                                                  round(time.monotonic() - started, 3))})

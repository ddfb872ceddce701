"""Where audit events go: journald (its native protocol), RFC 5424 syslog over a unix socket, a JSON-lines file.

journald: one datagram of ``KEY=value`` lines to ``/run/systemd/journal/socket`` (or a journal
namespace's ``/run/systemd/journal.NS/socket``); values holding a newline use the binary form
(``KEY\\n`` + 64-bit little-endian length + value + ``\\n``); a datagram too large for the socket goes
as a sealed memfd passed with SCM_RIGHTS, as sd_journal_send does. No library is needed for that,
so python-systemd is not a dependency.

syslog: ``<PRI>1 TIMESTAMP HOST imgbackup PID MSGID [imgbackup@32473 k="v" …] BOM MSG`` (RFC 5424)
as one datagram to ``/dev/log`` or the given socket; facility 13 (log audit). 32473 is the private
enterprise number RFC 5612 reserves for documentation: imgbackup has none of its own.

file: one JSON object per line, appended with O_APPEND and fsynced (an audit trail must survive a
crash right after the action it records).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from imgbackup.audit import AuditEvent

from imgbackup.errors import UsageError

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_SOCKET = "/dev/log"
SYSLOG_FACILITY = 13          # RFC 5424 "log audit"
SD_ID = "imgbackup@32473"
APP_NAME = "imgbackup"
SEND_TIMEOUT = 5.0            # a wedged log daemon must not hang a backup; a healthy one answers at once


class SinkError(Exception):
    """An event could not be delivered to one sink."""


class Sink(Protocol):
    name: str

    def send(self, event: AuditEvent) -> None: ...


def parse_sinks(specs: list[str] | str) -> list[Sink]:
    """``journald[:NAMESPACE]``, ``syslog[:SOCKET]``, ``file:PATH``; UsageError naming a bad one."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    sinks: list[Sink] = []
    for raw in items:
        spec = raw.strip()
        if not spec:
            continue
        kind, _, arg = spec.partition(":")
        if kind == "journald":
            sinks.append(JournaldSink(arg or None))
        elif kind == "syslog":
            sinks.append(SyslogSink(arg or SYSLOG_SOCKET))
        elif kind == "file" and arg.startswith("/"):
            sinks.append(FileSink(arg))
        else:
            raise UsageError(f"unknown audit sink {spec!r}",
                             "use journald, journald:NAMESPACE, syslog, syslog:/SOCKET or file:/ABSOLUTE/PATH")
    return sinks


def _datagram(path: str, data: bytes, fds: list[int] | None = None) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(SEND_TIMEOUT)
        if fds:
            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))],
                         0, path)
        else:
            sock.sendto(data, path)


def _journal_field(key: str, value: str) -> bytes:
    raw = value.encode()
    if b"\n" in raw:
        return key.encode() + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"
    return key.encode() + b"=" + raw + b"\n"


class JournaldSink:
    """journald's native protocol; ``namespace`` for a journal namespace (``LogNamespace=``)."""

    def __init__(self, namespace: str | None = None) -> None:
        self.namespace = namespace
        self.name = f"journald:{namespace}" if namespace else "journald"
        self.path = f"/run/systemd/journal.{namespace}/socket" if namespace else JOURNAL_SOCKET

    def encode(self, event: AuditEvent) -> bytes:
        from imgbackup.audit import EVENT_TYPES

        fields = {"MESSAGE": event.summary(), "MESSAGE_ID": EVENT_TYPES[event.event][0],
                  "PRIORITY": str(event.severity()), "SYSLOG_IDENTIFIER": APP_NAME,
                  "SYSLOG_FACILITY": str(SYSLOG_FACILITY)}
        for key, value in event.to_dict().items():
            fields[f"IMGBACKUP_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
        return b"".join(_journal_field(k, v) for k, v in fields.items())

    def send(self, event: AuditEvent) -> None:
        data = self.encode(event)
        try:
            _datagram(self.path, data)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise SinkError(f"{self.path}: {exc.strerror or exc}") from None
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        fd = os.memfd_create("imgbackup-audit", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            import fcntl

            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                        | fcntl.F_SEAL_SEAL)
            _datagram(self.path, b"", [fd])
        except OSError as exc:
            raise SinkError(f"{self.path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)


def _sd_value(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


class SyslogSink:
    """RFC 5424 messages as datagrams to a unix socket (``/dev/log`` by default)."""

    def __init__(self, path: str = SYSLOG_SOCKET) -> None:
        self.path = path
        self.name = f"syslog:{path}"

    def encode(self, event: AuditEvent) -> bytes:
        f = event.to_dict()
        pri = SYSLOG_FACILITY * 8 + event.severity()
        params = " ".join(f'{k}="{_sd_value(v)}"' for k, v in f.items())
        header = f"<{pri}>1 {f['time']} {f['host'] or '-'} {APP_NAME} {f['pid']} {event.event} [{SD_ID} {params}] "
        return header.encode() + b"\xef\xbb\xbf" + event.summary().encode()

    def send(self, event: AuditEvent) -> None:
        try:
            _datagram(self.path, self.encode(event))
        except OSError as exc:
            raise SinkError(f"{self.path}: {exc.strerror or exc}") from None


class FileSink:
    """JSON lines appended to a file (created 0600 with its folder 0750 when missing)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = f"file:{path}"

    def send(self, event: AuditEvent) -> None:
        line = json.dumps(event.to_dict(), sort_keys=True, separators=(",", ":")).encode() + b"\n"
        try:
            Path(self.path).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise SinkError(f"{self.path}: {exc.strerror or exc}") from None

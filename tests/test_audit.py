"""Audit events reach a real systemd-journald, a syslog socket and a JSON-lines file, and read back whole."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest
from tests.logdaemons import JOURNALD, running_journald, syslog_socket
from tests.support import need, need_root, need_tool

from imgbackup import audit
from imgbackup.audit.sinks import parse_sinks
from imgbackup.device.tools import wait_until
from imgbackup.errors import TargetRefused, UsageError


@pytest.fixture(autouse=True)
def _reset_audit():
    yield
    audit.configure(None)


def test_event_has_every_common_field():
    audit.set_command(["backup", "/dev/sdb"])
    ev = audit.make_event("backup", repository="ab" * 16, image="cd" * 16, bytes=5, duration_s=1.5)
    d = ev.to_dict()
    assert d["event"] == "backup" and d["result"] == "ok"
    assert d["host"] == socket.gethostname() and d["uid"] == os.getuid() and d["user"]
    assert d["command"] == "imgbackup backup /dev/sdb"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", d["time"])
    assert d["repository"] == "ab" * 16 and d["image"] == "cd" * 16 and d["bytes"] == 5


@pytest.mark.parametrize("field", ["passphrase", "secret_key", "aws_token", "Password", "bad-name"])
def test_fields_that_could_hold_a_secret_are_refused(field):
    with pytest.raises(ValueError):
        audit.make_event("backup", **{field: "x"})


def test_unknown_event_and_sink_are_refused():
    with pytest.raises(ValueError):
        audit.make_event("frobnicate")
    for bad in ("journal", "file:relative/path", "syslog2"):
        with pytest.raises(UsageError):
            parse_sinks(bad)
    assert [s.name for s in parse_sinks("journald, syslog:/tmp/x,file:/a/b")] == ["journald", "syslog:/tmp/x",
                                                                                   "file:/a/b"]


def test_file_sink_appends_json_lines(tmp_path):
    path = tmp_path / "sub" / "audit.jsonl"
    audit.configure([f"file:{path}"])
    audit.emit("delete", image="ee" * 16, bytes=10)
    audit.emit("hold", image="ff" * 16, reason="legal")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in lines] == ["delete", "hold"]
    assert lines[1]["reason"] == "legal" and lines[0]["bytes"] == 10
    assert (path.stat().st_mode & 0o777) == 0o600


def test_audited_records_failures_and_refusals(tmp_path):
    path = tmp_path / "a.jsonl"
    audit.configure([f"file:{path}"])
    with pytest.raises(TargetRefused), audit.audited("restore", image="aa" * 16):
        raise TargetRefused("target is mounted")
    with audit.audited("backup", name="sdb") as more:
        more["bytes"] = 42
    first, second = (json.loads(x) for x in path.read_text().splitlines())
    assert first["result"] == "refused" and first["exit_code"] == 8 and "mounted" in first["error"]
    assert second["result"] == "ok" and second["bytes"] == 42 and second["duration_s"] >= 0


def test_undeliverable_event_warns_and_never_raises(tmp_path, capsys):
    audit.configure([f"syslog:{tmp_path}/nobody-listens"])
    audit.emit("backup")
    assert "not delivered to syslog" in capsys.readouterr().err
    assert any("nobody-listens" in f for f in audit.delivery_failures())


def test_syslog_sink_speaks_rfc5424(tmp_path):
    with syslog_socket(tmp_path) as listener:
        audit.configure([f"syslog:{listener.path}"])
        audit.emit("verify_failed", "failed", image="ab" * 16, error='chunk "x" ] bad')
        (raw,) = listener.messages()
    m = re.fullmatch(rb'<(\d+)>1 (\S+) (\S+) imgbackup (\d+) verify_failed \[imgbackup@32473 (.*)\] '
                     rb'\xef\xbb\xbf(.*)', raw, re.S)
    assert m, raw
    assert int(m.group(1)) == 13 * 8 + 3          # facility log audit, severity error
    assert m.group(3).decode() == socket.gethostname() and int(m.group(4)) == os.getpid()
    params = dict(re.findall(r'(\w+)="((?:[^"\\\]]|\\.)*)"', m.group(5).decode()))
    assert params["image"] == "ab" * 16 and params["result"] == "failed"
    assert params["error"] == 'chunk \\"x\\" \\] bad'
    assert b"verify_failed failed" in m.group(6)


@pytest.mark.root
def test_journald_receives_fields_and_message_ids(tmp_path):
    need_root()
    need(os.path.exists(JOURNALD), "needs systemd-journald (apt systemd)")
    need_tool("journalctl")
    with running_journald() as journal:
        audit.configure([f"journald:{journal.namespace}"])
        audit.emit("backup", repository="12" * 16, image="34" * 16, bytes=1234, duration_s=2.5,
                   note="two\nlines")
        audit.emit("lock_takeover", repository="12" * 16, holder="pid 1 on h")
        audit.emit("drill", image="56" * 16, rto_s=3.25, big="x" * 300_000)   # too large for one datagram
        assert wait_until(lambda: len(journal.entries("SYSLOG_IDENTIFIER=imgbackup")) == 3, 20)
        backup, = journal.entries(f"MESSAGE_ID={audit.EVENT_TYPES['backup'][0]}")
        takeover, = journal.entries(f"MESSAGE_ID={audit.EVENT_TYPES['lock_takeover'][0]}")
        drill, = journal.entries(f"MESSAGE_ID={audit.EVENT_TYPES['drill'][0]}")
    assert backup["IMGBACKUP_IMAGE"] == "34" * 16 and backup["IMGBACKUP_BYTES"] == "1234"
    assert backup["IMGBACKUP_REPOSITORY"] == "12" * 16 and backup["IMGBACKUP_DURATION_S"] == "2.5"
    assert backup["IMGBACKUP_NOTE"] == "two\nlines" and backup["PRIORITY"] == "6"
    assert backup["IMGBACKUP_HOST"] == socket.gethostname() and backup["IMGBACKUP_USER"]
    assert "backup ok" in backup["MESSAGE"] and backup["_NAMESPACE"] == journal.namespace
    assert takeover["IMGBACKUP_HOLDER"] == "pid 1 on h"
    assert drill["IMGBACKUP_RTO_S"] == "3.25" and len(drill["IMGBACKUP_BIG"]) == 300_000


def test_commands_leave_one_event_each_and_no_secret(tmp_path):
    from tests.disks import random_image
    from tests.support import MIB, cli, cli_json

    log = tmp_path / "audit.jsonl"
    repo = tmp_path / "repo"
    secret = "audit-test-passphrase"
    env = {"IMGBACKUP_AUDIT": f"file:{log}"}
    cli_json("init", repo=repo, passphrase=secret, **env)
    repo_id = json.loads((repo / "config").read_text())["id"]
    src = random_image(tmp_path / "src.img", 3 * MIB, seed=2)
    image = cli_json("backup", src, repo=repo, passphrase=secret, **env)
    cli_json("restore", image["id"], tmp_path / "out.img", repo=repo, passphrase=secret, **env)
    assert cli("list", repo=repo, passphrase="wrong passphrase", **env).returncode == 4
    # the exclusive lease of a process that is gone: the next command that needs it (delete; a backup
    # holds a session lease beside it) takes it over
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    (repo / "locks" / "exclusive").write_text(json.dumps(
        {"kind": "exclusive", "id": "ab" * 16, "host": socket.gethostname(), "pid": dead.pid, "command": "compact",
         "started": time.time(), "started_local": time.time(), "ttl": 300.0, "start_time": "1",
         "boot_id": boot_id, "version": 1}))
    second = cli_json("backup", src, repo=repo, passphrase=secret, **env)
    cli_json("delete", second["id"], "--yes", repo=repo, passphrase=secret, **env)
    pack = next(p for p in (repo / "packs").rglob("*") if p.is_file())
    data = bytearray(pack.read_bytes())
    data[40] ^= 0x04
    pack.write_bytes(bytes(data))
    other = tmp_path / "other.jsonl"
    assert cli("--audit", f"file:{other}", "verify", repo=repo, passphrase=secret, **env).returncode == 11
    assert cli("repair", repo=repo, passphrase=secret, **env).returncode in (0, 11)     # a dry run: no event
    cli("repair", "--yes", repo=repo, passphrase=secret, **env)
    cli_json("compact", repo=repo, passphrase=secret, **env)
    text = log.read_text()
    assert secret not in text and secret not in other.read_text()
    events = [json.loads(line) for line in text.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds == ["backup", "restore", "passphrase_failed", "backup", "lock_takeover", "delete", "repair",
                     "compact"], kinds
    for e in events:
        for key in ("time", "host", "user", "command", "result"):
            assert e[key] is not None
    backup, restore, wrong, _, takeover, delete, repair, compact = events
    assert backup["image"] == image["id"] and backup["repository"] == repo_id
    assert backup["bytes"] == image["bytes_stored"] and backup["duration_s"] > 0
    assert backup["command"].startswith("imgbackup backup ") and backup["result"] == "ok"
    assert restore["image"] == image["id"] and restore["target"] == str(tmp_path / "out.img")
    assert wrong["result"] == "failed" and wrong["repository"] == repo_id
    assert str(dead.pid) in takeover["holder"] and takeover["repository"] == repo_id
    assert delete["image"] == second["id"] and delete["bytes"] >= 0
    assert repair["repository"] == compact["repository"] == repo_id and repair["changed"] is True
    assert compact["bytes"] > 0 and compact["packs_deleted"] >= 1
    (failed,) = [json.loads(line) for line in other.read_text().splitlines()]   # --audit replaced the env's sinks
    assert failed["event"] == "verify_failed" and failed["bad_chunks"] >= 1 and failed["result"] == "failed"

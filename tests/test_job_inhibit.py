"""Sleep inhibition against a real logind: a private mount namespace with its own system D-Bus and
systemd-logind (their /run folders are tmpfs there), where the job's inhibitor must show up in
``systemd-inhibit --list`` while it runs, and be gone afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.disks import random_image
from tests.jobenv import make_env
from tests.support import MIB, cli_env, need, need_root, need_tool

LOGIND = "/lib/systemd/systemd-logind"
# Runs inside `unshare -m`: private /run/dbus and logind state, both daemons stopped by PID on exit.
WORLD = textwrap.dedent("""\
    set -e
    for d in /run/dbus /run/systemd/seats /run/systemd/sessions /run/systemd/users /run/systemd/inhibit; do
        mkdir -p $d; mount -t tmpfs -o mode=0755 tmpfs $d
    done
    dbus-daemon --system --fork --print-pid > "$WORK/dbus.pid"
    /lib/systemd/systemd-logind > "$WORK/logind.log" 2>&1 & echo $! > "$WORK/logind.pid"
    trap 'kill $(cat "$WORK/logind.pid") $(cat "$WORK/dbus.pid") 2>/dev/null || true' EXIT
    for i in $(seq 50); do busctl --system status org.freedesktop.login1 >/dev/null 2>&1 && break; sleep 0.1; done
    "$@"
""")

PROBE = textwrap.dedent("""\
    import subprocess, sys
    from imgbackup.engine.job.inhibit import sleep_inhibited
    with sleep_inhibited("imgbackup job probe") as state:
        print(state)
        print(subprocess.run(["systemd-inhibit", "--list"], capture_output=True, text=True).stdout)
    print("AFTER")
    print(subprocess.run(["systemd-inhibit", "--list"], capture_output=True, text=True).stdout)
""")


def in_world(tmp_path: Path, *cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**(env or cli_env()), "WORK": str(tmp_path)}
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", WORLD, "world", *cmd],
                          env=full, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture
def world():
    need_root()
    need_tool("dbus-daemon", "busctl", "systemd-inhibit", "unshare")
    need(Path(LOGIND).exists(), "needs systemd-logind (apt systemd)")


@pytest.mark.root
def test_inhibitor_held_while_the_body_runs(world, tmp_path):
    res = in_world(tmp_path, sys.executable, "-c", PROBE)
    assert res.returncode == 0, res.stdout + res.stderr
    during, after = res.stdout.split("AFTER")
    assert "'inhibited': True" in during
    assert "imgbackup" in during and "sleep:idle" in during and "imgbackup job probe" in during
    assert "imgbackup" not in after


@pytest.mark.root
def test_job_summary_says_sleep_was_inhibited(world, tmp_path):
    env = make_env(tmp_path)
    random_image(tmp_path / "disk.img", 2 * MIB)
    env.write_job(tmp_path / "disk.img")
    job = env.config_dir / f"{env.name}.toml"
    job.write_text(job.read_text().replace("inhibit_sleep = false\n", ""))
    res = in_world(tmp_path, sys.executable, "-m", "imgbackup", "job", "run", env.name, *env.dirs, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads(res.stdout)
    assert summary["sleep"] == {"inhibited": True, "reason": "systemd-inhibit --what=sleep:idle"}
    outside = env.summary()[1]          # no logind out here: the job runs anyway and says why
    assert outside["result"] == "ok" and outside["sleep"]["inhibited"] is False
    assert "systemd-inhibit" in outside["sleep"]["reason"]

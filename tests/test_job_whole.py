"""The whole: a host disk, a job file, ``job install``, the service's ExecStart run twice days apart (as
systemd starts it, under faketime), then status, metrics and the audit trail in a real journal."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
from pathlib import Path

import pytest
from tests.disks import loop_device, make_gpt_disk
from tests.jobenv import imgbackup, make_env, run_exec_start, unit_values
from tests.logdaemons import JOURNALD, running_journald
from tests.support import cli_json, need, need_root, need_tool

from imgbackup import audit

RUN1, RUN2 = "2026-03-02 02:31:00", "2026-03-10 02:40:00"     # Monday of ISO week 10; Tuesday of week 11


@pytest.mark.root
@pytest.mark.slow
def test_installed_job_runs_twice_and_reports(tmp_path):
    need_root()
    need_tool("systemd-analyze", "faketime", "promtool", "journalctl", "mcopy")
    need(Path(JOURNALD).exists(), "needs systemd-journald (apt systemd)")
    disk = make_gpt_disk(tmp_path / "disk.img", 64, seed=6)
    env = make_env(tmp_path, "server1")
    link = Path(f"/dev/disk/by-id/imgbackup-whole-{secrets.token_hex(4)}")    # what udev would name it
    link.parent.mkdir(parents=True, exist_ok=True)
    with running_journald() as journal, loop_device(Path(disk["path"]), read_only=True) as dev:
        try:
            link.symlink_to(dev)
            _scenario(env, journal, link, disk, tmp_path)
        finally:
            link.unlink(missing_ok=True)


def _scenario(env, journal, link: Path, disk: dict, tmp_path: Path) -> None:
    job = env.write_job(link, f'''schedule = "*-*-* 02:30"
drill = {{ every = "weekly", restore_to = "{tmp_path / 'drill' / 'scratch.img'}" }}
[verify]
sample_percent = 50
filesystems = "weekly"
''')
    job.write_text(job.read_text().replace(f'audit = ["file:{env.audit_file}"]',
                                           f'audit = ["journald:{journal.namespace}", "file:{env.audit_file}"]'))
    (tmp_path / "drill").mkdir()
    installed = cli_json("job", "install", env.name, "--unit-dir", env.unit_dir, *env.dirs, repo=None)
    service, timer = (Path(p) for p in installed["units"])
    check = subprocess.run(["systemd-analyze", "verify", str(service), str(timer)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert f"{link} r" in unit_values(service, "DeviceAllow") and f"{dev_of(link)} r" in unit_values(service,
                                                                                                      "DeviceAllow")
    first = run_exec_start(service, fake_time=RUN1)
    assert first.returncode == 0, first.stdout + first.stderr
    new_file = tmp_path / "new.bin"
    new_file.write_bytes(secrets.token_bytes(300_000))
    fat = disk["partitions"][1]
    subprocess.run(["mcopy", "-i", f"{disk['path']}@@{fat['offset']}", str(new_file), "::/new.bin"], check=True)
    second = run_exec_start(service, fake_time=RUN2)
    assert second.returncode == 0, second.stdout + second.stderr

    images = env.images()
    assert [i["type"] for i in images] == ["full", "incremental"]
    last = json.loads((env.state_dir / f"{env.name}.last.json").read_text())
    steps = {s["step"]: s for s in last["steps"]}
    assert steps["drill"]["status"] == "ok" and steps["drill"]["result"]["rto_s"] > 0     # a new ISO week
    assert steps["verify"]["result"]["filesystems"]["ok"] is True
    assert last["device"] == dev_of(link) and last["image"] == images[1]["id"]

    status = json.loads(imgbackup("status", *env.dirs, "--json", fake_time="2026-03-10 05:00:00").stdout)
    (src,) = status["sources"]
    assert src["rpo"]["state"] == "OK" and src["last_image"]["id"] == images[1]["id"]
    assert src["last_drill"]["rto_s"] == steps["drill"]["result"]["rto_s"] and src["last_verify"]["ok"]
    late = imgbackup("status", *env.dirs, "--json", fake_time="2026-03-12 05:00:00")
    assert late.returncode == 16 and json.loads(late.stdout)["sources"][0]["rpo"]["state"] == "MISSED"

    prom = env.metrics_dir / f"imgbackup-job-{env.name}.prom"
    text = prom.read_text()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    samples = dict(re.findall(r'^(imgbackup_\w+)\{job="server1",source="' + re.escape(str(link)) + r'"\} (\S+)$',
                              text, re.M))
    assert float(samples["imgbackup_last_success_timestamp_seconds"]) == pytest.approx(images[1]["created"])
    assert samples["imgbackup_last_run_exit_code"] == "0" and samples["imgbackup_rpo_seconds"] == "86400"
    assert samples["imgbackup_rpo_breached"] == "0" and float(samples["imgbackup_last_drill_rto_seconds"]) > 0
    assert float(samples["imgbackup_bytes_read"]) > 0 and float(samples["imgbackup_repository_bytes"]) > 0
    assert len([x for x in text.splitlines() if not x.startswith("#")]) == len(samples)   # every sample labelled

    backups = journal.entries(f"MESSAGE_ID={audit.EVENT_TYPES['backup'][0]}")
    drills = journal.entries(f"MESSAGE_ID={audit.EVENT_TYPES['drill'][0]}")
    assert [b["IMGBACKUP_IMAGE"] for b in backups] == [i["id"] for i in images]
    assert all(b["IMGBACKUP_JOB"] == env.name and b["IMGBACKUP_RESULT"] == "ok" for b in backups)
    assert backups[0]["IMGBACKUP_TIME"].startswith("2026-03-02T02:3")           # the job's (faked) clock
    assert len(drills) == 2 and float(drills[1]["IMGBACKUP_RTO_S"]) > 0
    in_file = [e["event"] for e in env.events()]
    assert in_file.count("backup") == 2 and in_file.count("drill") == 2 and in_file.count("restore") == 2


def dev_of(link: Path) -> str:
    return str(link.resolve())

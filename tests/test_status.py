"""``status``: RPO states at faked clocks (faketime), exit 16, the JSON fields, and status from state alone."""

from __future__ import annotations

import json

import pytest
from tests.disks import random_image
from tests.jobenv import PASSPHRASE, imgbackup, make_env
from tests.support import MIB, cli_json, need_tool

RUN_AT = "2026-06-01 02:00:00"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One job run shared by the module's tests (each test leaves the job's files as it found them)."""
    need_tool("faketime")
    tmp_path = tmp_path_factory.mktemp("status")
    e = make_env(tmp_path)
    random_image(tmp_path / "disk.img", 4 * MIB, seed=8)
    e.write_job(tmp_path / "disk.img", 'drill = "always"\n', rpo="24h")
    code, summary = e.summary(fake_time=RUN_AT)
    assert code == 0, summary
    return e


def status_at(env, when: str, *args: str) -> tuple[int, dict]:
    proc = imgbackup("status", *env.dirs, "--json", *args, fake_time=when)
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.parametrize(("when", "state", "late_s", "code"), [
    ("2026-06-01 14:00:00", "OK", 0, 0),
    ("2026-06-02 01:58:00", "OK", 0, 0),                   # just under the RPO old
    ("2026-06-02 08:00:00", "LATE", 6 * 3600, 16),
    ("2026-06-03 01:00:00", "LATE", 23 * 3600, 16),
    ("2026-06-03 03:00:00", "MISSED", 25 * 3600, 16),
    ("2026-06-10 02:00:00", "MISSED", 8 * 86400, 16),
])
def test_rpo_state_at_each_age(env, when, state, late_s, code):
    got, doc = status_at(env, when)
    (src,) = doc["sources"]
    assert got == code and src["rpo"]["state"] == state and src["rpo"]["breached"] == (code == 16)
    assert src["rpo"]["late_by_s"] == pytest.approx(late_s, abs=120)   # the run itself took a little while
    assert doc["breached"] == (1 if code else 0)


def test_status_shows_image_verify_drill_repository_and_last_run(env):
    code, doc = status_at(env, "2026-06-01 03:00:00")
    (src,) = doc["sources"]
    assert code == 0 and src["job"] == env.name and src["source"].endswith("disk.img")
    image = env.images()[-1]
    assert src["last_image"]["id"] == image["id"] and src["last_image"]["age_s"] == pytest.approx(3600, abs=120)
    assert src["last_verify"]["ok"] is True and src["last_verify"]["sample_percent"] == 5
    assert src["last_drill"]["ok"] is True and src["last_drill"]["images"] == [image["id"]]
    assert src["last_drill"]["rto_s"] is None                     # this drill did not restore: no RTO
    assert src["repository_bytes"] == sum(p.stat().st_size for p in env.repo.rglob("*") if p.is_file())
    assert src["reclaimable_bytes"] == 0
    assert src["last_run"]["exit_code"] == 0 and src["rpo"]["target_s"] == 86400


def test_text_output_and_nagios_exit(env):
    proc = imgbackup("status", *env.dirs, fake_time="2026-06-04 03:00:00")
    assert proc.returncode == 16
    assert f"{env.name}: RPO 1d MISSED (late by 2d" in proc.stdout
    assert "RPO(s) breached" in proc.stderr


def test_reclaimable_bytes_are_what_compact_would_free(env):
    """A pack no index names (left by a killed run) is reclaimable: status says so, in bytes."""
    pack = next(env.repo.glob("packs/*/*"))
    orphan = env.repo / "packs" / "00" / ("00" * 32)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(pack.read_bytes())
    try:
        src = status_at(env, "2026-06-01 03:00:00")[1]["sources"][0]
        assert src["reclaimable_bytes"] == orphan.stat().st_size and src["errors"] == []
    finally:
        orphan.unlink()


def test_unreadable_repository_falls_back_on_the_job_state(env):
    env.passphrase_file.write_text("not the passphrase\n")
    try:
        code, doc = status_at(env, "2026-06-01 12:00:00")
        (src,) = doc["sources"]
        assert code == 0 and src["rpo"]["state"] == "OK" and src["last_image"]["from"] == "job state"
        assert any("wrong passphrase" in e for e in src["errors"])
        assert src["reclaimable_bytes"] is None
        code, doc = status_at(env, "2026-06-05 12:00:00")
        assert code == 16 and doc["sources"][0]["rpo"]["state"] == "MISSED"
    finally:
        env.passphrase_file.write_text(PASSPHRASE + "\n")


def test_status_of_a_repository_without_jobs(env):
    proc = imgbackup("status", "-r", env.repo, "--rpo", "12h", "--json", fake_time="2026-06-01 20:00:00",
                     IMGBACKUP_PASSPHRASE=PASSPHRASE)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 16 and doc["sources"][0]["name"] == env.name
    assert doc["sources"][0]["rpo"]["state"] == "LATE"
    bad = imgbackup("status", "--rpo", "12h")
    assert bad.returncode == 2


def test_new_job_is_ok_until_its_rpo_passed(tmp_path):
    need_tool("faketime", "systemd-analyze")
    e = make_env(tmp_path, "fresh")
    random_image(tmp_path / "d.img", MIB)
    e.write_job(tmp_path / "d.img", rpo="2h")
    install = imgbackup("job", "install", e.name, "--unit-dir", e.unit_dir, *e.dirs, fake_time="2026-06-01 00:00:00")
    assert install.returncode == 0, install.stderr
    assert status_at(e, "2026-06-01 01:00:00")[1]["sources"][0]["rpo"]["state"] == "OK"
    assert status_at(e, "2026-06-01 03:00:00")[1]["sources"][0]["rpo"]["state"] == "LATE"
    assert status_at(e, "2026-06-01 05:00:00")[0] == 16
    listed = cli_json("job", "list", "--unit-dir", e.unit_dir, *e.dirs, repo=None)["jobs"]
    assert listed[0]["last_run"] is None

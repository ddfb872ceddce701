"""Job files, periods, RPO states and the metrics text: each rule against hand-made cases."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from tests.support import need_tool

from imgbackup.device.stable import check_stable, fingerprint_differences
from imgbackup.engine.job.config import load_job_file
from imgbackup.engine.job.metrics import METRICS, render
from imgbackup.engine.job.periods import format_duration, is_due, parse_duration
from imgbackup.engine.job.status import LATE, MISSED, OK, rpo_state
from imgbackup.errors import JobConfigError

MINIMAL = 'source = "/dev/disk/by-id/ata-DISK_SERIAL1"\nrepository = "/backup/repo"\nrpo = "24h"\n'
FULL = '''# every key
source = "UUID=0a1b2c3d-aaaa-bbbb-cccc-0123456789ab"
name = "host1-root"
repository = "s3://offsite/repo"
passphrase_file = "/etc/imgbackup/pass"
schedule = "Mon..Fri *-*-* 02:30"
randomized_delay = "15min"
rpo = "1d 12h"
timezone = "Europe/Berlin"
copy_to = ["/srv/second", {repository = "s3://b/p", passphrase_file = "/etc/imgbackup/pass2"}]
metrics_dir = "/var/lib/node_exporter/textfile"
audit = ["journald", "syslog", "file:/var/log/imgbackup/audit.jsonl"]
nice = 10
io_class = "best-effort"
inhibit_sleep = false
timeout = "12h"

[backup]
full = "monthly"
type = "differential"
all_blocks = true
allow_mounted = true
snapshot = "lvm"

[retention]
keep_last = 3
keep_daily = 7
keep_weekly = 4
keep_monthly = 12
keep_yearly = 2
keep_within = "1y2m3d4h"
keep_within_daily = "14d"

[verify]
sample_percent = 2.5
filesystems = "weekly"

[drill]
every = "monthly"
boot = true
expect = "login:"
timeout = 300
firmware = "uefi"
restore_to = "/var/tmp/drill.img"
filesystems = false
'''


def job(tmp_path: Path, text: str, name: str = "j") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_every_key_is_read(tmp_path):
    cfg = load_job_file(str(job(tmp_path, FULL, "host1")))
    assert cfg.name == "host1" and cfg.image_name == "host1-root" and cfg.rpo == 36 * 3600
    assert cfg.schedule == "Mon..Fri *-*-* 02:30" and cfg.randomized_delay == 900 and cfg.timeout == 43200
    assert [c.repository for c in cfg.copy_to] == ["/srv/second", "s3://b/p"]
    assert cfg.copy_to[1].passphrase_file == "/etc/imgbackup/pass2"
    assert cfg.full == "monthly" and cfg.backup_type == "differential" and cfg.all_blocks and cfg.allow_mounted
    assert cfg.snapshot == "lvm"
    assert cfg.retention["keep_within"] == "1y2m3d4h" and cfg.retention["keep_within_daily"] == "14d" and cfg.prune_policy()["timezone"] == "Europe/Berlin"
    assert cfg.sample_percent == 2.5 and cfg.verify_filesystems == "weekly"
    d = cfg.drill
    assert (d.every, d.boot, d.expect, d.timeout, d.firmware, d.restore_to, d.filesystems) == (
        "monthly", True, "login:", 300, "uefi", "/var/tmp/drill.img", False)
    assert (cfg.nice, cfg.io_class, cfg.inhibit_sleep) == (10, "best-effort", False)


def test_defaults(tmp_path):
    cfg = load_job_file(str(job(tmp_path, MINIMAL)))
    assert cfg.image_name == "j" and cfg.schedule == "daily" and cfg.randomized_delay == 1800
    assert cfg.full == "never" and cfg.backup_type == "incremental" and cfg.retention == {}
    assert cfg.sample_percent == 5 and cfg.drill.every == "never" and cfg.inhibit_sleep


@pytest.mark.parametrize(("extra", "line", "words"), [
    ('rpo2 = "1h"\n', 4, "rpo2: unknown key"),
    ('[retention]\nkeep_daily = 7\nkeep_dayly = 3\n', 6, "retention.keep_dayly: unknown key"),
    ('[retention]\nkeep_daily = -1\n', 5, "keep_daily: must be a whole number"),
    ('[retention]\nkeep_daily = true\n', 5, "keep_daily: must be a whole number"),
    ('[retention]\ntimezone = "UTC"\n', 4, "keeps nothing"),
    ('[retention]\nkeep_last = 1\ntimezone = "Mars/Olympus"\n', 6, "unknown time zone"),
    ('[verify]\nsample_percent = 150\n', 5, "from 0 to 100"),
    ('[verify]\nfilesystems = "fortnightly"\n', 5, "is not a period"),
    ('drill = "sometimes"\n', 4, "is not a period"),
    ('[drill]\nevery = "weekly"\nboot = true\n', 6, "needs expect"),
    ('[drill]\nboot = false\n', 4, "needs 'every'"),
    ('audit = ["journald", "kafka"]\n', 4, "unknown audit sink"),
    ('metrics_dir = "relative/dir"\n', 4, "absolute path"),
    ('copy_to = ["backup-host:/repo"]\n', 4, "copy_to.repository"),
    ('nice = 20\n', 4, "from -20 to 19"),
    ('randomized_delay = "5m"\n', 4, "write minutes as 'min'"),
    ('[backup]\ntype = "full"\n', 5, "one of incremental, differential"),
    ('[drill]\nevery = "weekly"\nrestore_to = "/dev/sdc"\n', 6, "scratch device must be named"),
])
def test_errors_name_file_line_and_key(tmp_path, extra, line, words):
    path = job(tmp_path, MINIMAL + extra)
    with pytest.raises(JobConfigError) as err:
        load_job_file(str(path))
    assert str(err.value).startswith(f"{path}:{line}: "), str(err.value)
    assert words in str(err.value)
    assert err.value.exit_code == 2


@pytest.mark.parametrize(("source", "words"), [
    ("/dev/sdb", "kernel name"), ("/dev/nvme0n1p2", "kernel name"), ("/dev/loop3", "kernel name"),
    ("sdb", "not an absolute path"), ("LABEL=root", "not unique"), ("uuid=abc", "capitals"),
    ("/dev/disk/by-diskseq/12", "by-diskseq"), ("UUID=", "needs a value"),
])
def test_unstable_source_names_are_refused(tmp_path, source, words):
    path = job(tmp_path, f'source = "{source}"\nrepository = "/r"\nrpo = "1d"\n')
    with pytest.raises(JobConfigError) as err:
        load_job_file(str(path))
    assert f"{path}:1: source:" in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("source", ["/dev/disk/by-id/nvme-Samsung_SSD_980_S64DNX0R123", "UUID=1234-ABCD",
                                    "PARTUUID=8c3d1d2e-01", "SERIAL=WD-WCC4N1234567", "WWN=0x5000c500a1b2c3d4",
                                    "/dev/mapper/vg0-root", "/dev/vg0/root", "/srv/vm/disk.img"])
def test_stable_source_names(source):
    assert check_stable(source) is None


def test_missing_required_key_and_syntax_error(tmp_path):
    with pytest.raises(JobConfigError, match=r"missing required key 'rpo'"):
        load_job_file(str(job(tmp_path, 'source = "/a.img"\nrepository = "/r"\n')))
    path = job(tmp_path, MINIMAL + 'schedule = "daily\n', "broken")
    with pytest.raises(JobConfigError, match=rf"^{path}:4: TOML syntax error"):
        load_job_file(str(path))
    with pytest.raises(JobConfigError, match="no job file"):
        load_job_file(str(tmp_path / "absent.toml"))


def test_durations():
    assert parse_duration("24h") == 86400 and parse_duration("1d12h") == 129600
    assert parse_duration("1d 12h 30min") == 131400 and parse_duration("90s") == 90
    assert parse_duration("2w") == 14 * 86400 and parse_duration("1.5h") == 5400
    for bad in ("", "24", "1m", "3 months", "h", "0h", "-1h", "1x"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert format_duration(45) == "45s" and format_duration(93784) == "1d 2h 3min"


def ts(text: str, tz: str = "UTC") -> float:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


def test_calendar_periods_follow_the_calendar_not_the_gap():
    utc = ZoneInfo("UTC")
    assert is_due("monthly", ts("2026-01-31 23:00"), ts("2026-02-01 01:00"), utc)       # 2 h, new month
    assert not is_due("monthly", ts("2026-02-01 01:00"), ts("2026-02-28 23:00"), utc)   # 28 days, same month
    # ISO weeks start on Monday; 2026-01-04 is a Sunday, 2026-01-05 a Monday
    assert is_due("weekly", ts("2026-01-04 22:00"), ts("2026-01-05 01:00"), utc)
    assert not is_due("weekly", ts("2026-01-05 01:00"), ts("2026-01-11 23:00"), utc)
    # ISO week 53 of 2026 runs into January 2027: still the same week
    assert not is_due("weekly", ts("2026-12-28 10:00"), ts("2027-01-03 10:00"), utc)
    assert is_due("daily", ts("2026-03-01 23:59"), ts("2026-03-02 00:01"), utc)
    assert is_due("quarterly", ts("2026-03-31 12:00"), ts("2026-04-01 12:00"), utc)
    assert not is_due("yearly", ts("2026-01-01 00:00"), ts("2026-12-31 23:59"), utc)
    assert is_due("always", ts("2026-01-01"), ts("2026-01-01"), utc)
    assert not is_due("never", None, ts("2026-01-01"), utc) and is_due("weekly", None, 0, utc)


def test_calendar_periods_in_the_job_time_zone():
    berlin = ZoneInfo("Europe/Berlin")
    # 23:30 UTC on Jan 31 is already February 1 in Berlin
    assert is_due("monthly", ts("2026-01-31 12:00", "Europe/Berlin"), ts("2026-01-31 23:30"), berlin)
    assert not is_due("monthly", ts("2026-01-31 12:00", "Europe/Berlin"), ts("2026-01-31 23:30"), ZoneInfo("UTC"))
    # the DST change (2026-03-29 02:00 -> 03:00 in Berlin) does not shift day boundaries
    assert not is_due("daily", ts("2026-03-29 00:30", "Europe/Berlin"), ts("2026-03-29 23:30", "Europe/Berlin"),
                      berlin)
    assert is_due("7d", ts("2026-03-01 00:00"), ts("2026-03-08 00:00"), berlin)
    assert not is_due("7d", ts("2026-03-01 00:00"), ts("2026-03-07 23:59"), berlin)


@pytest.mark.parametrize(("age_h", "state", "late_h"), [
    (0, OK, 0), (24, OK, 0), (24.01, LATE, 0.01), (48, LATE, 24), (48.5, MISSED, 24.5), (200, MISSED, 176)])
def test_rpo_states(age_h, state, late_h):
    now = 1_800_000_000.0
    st = rpo_state(24 * 3600, now - age_h * 3600, None, now)
    assert st.state == state and st.breached == (state != OK)
    assert st.late_by_s == pytest.approx(late_h * 3600)


def test_rpo_without_any_image():
    now = 1_800_000_000.0
    assert rpo_state(3600, None, now - 1800, now).state == OK       # installed half an RPO ago
    assert rpo_state(3600, None, now - 5400, now).state == LATE
    missed = rpo_state(3600, None, None, now)                        # never installed, never ran
    assert missed.state == MISSED and missed.age_s is None and missed.breached
    assert rpo_state(None, now - 10, None, now).state is None


def test_fingerprint_differences_compare_only_what_was_recorded():
    was = {"kind": "disk", "size": 100, "serial": "S1", "wwn": None, "table_id": "aa"}
    assert fingerprint_differences(was, {**was, "wwn": "5000"}) == []
    assert fingerprint_differences(was, {**was, "serial": "S2"}) == ["serial: was 'S1', now 'S2'"]
    assert len(fingerprint_differences(was, {"kind": "disk", "size": 200, "serial": "S1"})) == 2


def test_metrics_text_is_valid_for_promtool(tmp_path):
    need_tool("promtool")
    values = {name: i + 0.5 for i, name in enumerate(METRICS)}
    text = render('job-"1"', "/dev/disk/by-id/x\\y", values)
    for line in text.splitlines():
        if not line.startswith("#"):
            assert line.startswith("imgbackup_") and len(line.rsplit(" ", 1)) == 2      # no timestamps
            assert '{job="job-\\"1\\"",source="/dev/disk/by-id/x\\\\y"}' in line
    res = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run(["promtool", "check", "metrics"], input=text + "imgbackup_x 1\n", capture_output=True,
                         text=True)
    assert res.returncode != 0          # promtool does judge: a metric without HELP fails

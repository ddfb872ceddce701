"""``job install``: the units pass systemd's own checker, say what the issue asks, and their ExecStart,
started exactly as systemd starts it, runs the job."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from tests.disks import random_image
from tests.jobenv import PASSPHRASE, exec_start_argv, make_env, run_exec_start, unit_values
from tests.support import MIB, cli, cli_json, need_tool

from imgbackup.engine.job.units import systemd_quote


@pytest.fixture
def env(tmp_path):
    need_tool("systemd-analyze", "faketime")
    e = make_env(tmp_path)
    random_image(tmp_path / "disk.img", 8 * MIB, seed=3, data_fraction=0.5)
    e.write_job(tmp_path / "disk.img", 'schedule = "Mon..Fri *-*-* 02:30"\nrandomized_delay = "20min"\n'
                'nice = 15\ndrill = "never"\n[verify]\nsample_percent = 100\n')
    return e


def install(env, *extra: str) -> dict:
    return cli_json("job", "install", env.name, "--unit-dir", env.unit_dir, *env.dirs, *extra, repo=None,
                    passphrase=None)


def test_units_pass_systemd_analyze_and_say_what_they_must(env):
    result = install(env)
    service, timer = (env.unit_dir / f"imgbackup-job-{env.name}.{kind}" for kind in ("service", "timer"))
    assert result["units"] == [str(service), str(timer)] and result["next_elapse"]
    assert result["enabled"] is False and "systemd is not running" in result["notes"][0]
    check = subprocess.run(["systemd-analyze", "verify", str(service), str(timer)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert unit_values(service, "Type") == ["oneshot"]
    assert unit_values(service, "Nice") == ["15"] and unit_values(service, "IOSchedulingClass") == ["idle"]
    assert unit_values(service, "ProtectSystem") == ["strict"] and unit_values(service, "DevicePolicy") == ["closed"]
    assert f"{env.root / 'disk.img'} r" not in unit_values(service, "DeviceAllow")   # a file needs no device
    assert "block-loop rw" in unit_values(service, "DeviceAllow")
    assert any(v.startswith("block-sd r") for v in unit_values(service, "DeviceAllow"))
    assert unit_values(service, "PrivateNetwork") == ["yes"]          # nothing remote in this job
    writable = unit_values(service, "ReadWritePaths")
    assert f"-{systemd_quote(str(env.repo))}" in writable and f"-{systemd_quote(str(env.metrics_dir))}" in writable
    (exec_start,) = unit_values(service, "ExecStart")
    assert PASSPHRASE not in service.read_text() and "passphrase" not in exec_start
    argv = exec_start_argv(exec_start)
    assert argv[-7:] == ["job", "run", env.name, "--config-dir", str(env.config_dir), "--state-dir",
                         str(env.state_dir)]
    assert f'"{env.config_dir}"' in exec_start                      # the folder with a space, quoted
    assert unit_values(timer, "OnCalendar") == ["Mon..Fri *-*-* 02:30"]
    assert unit_values(timer, "Persistent") == ["true"] and unit_values(timer, "RandomizedDelaySec") == ["1200"]
    assert unit_values(timer, "FixedRandomDelay") == ["true"]
    assert unit_values(timer, "Unit") == [service.name] and unit_values(timer, "WantedBy") == ["timers.target"]
    state = json.loads((env.state_dir / f"{env.name}.json").read_text())
    assert state["installed"] > 0 and state["identity"] is None


def test_exec_start_runs_the_job_as_systemd_would(env):
    install(env)
    service = env.unit_dir / f"imgbackup-job-{env.name}.service"
    first = run_exec_start(service, fake_time="2026-03-02 02:31:00")
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"job {env.name}: ok (exit 0)" in first.stdout
    second = run_exec_start(service, fake_time="2026-03-04 02:35:00")
    assert second.returncode == 0, second.stdout + second.stderr
    images = env.images()
    assert [i["type"] for i in images] == ["full", "incremental"]
    assert images[1]["created"] - images[0]["created"] > 2 * 86400 - 3600     # the faked clock reached the job
    runs = env.state()["runs"]
    assert [r["exit_code"] for r in runs] == [0, 0]
    assert json.loads((env.state_dir / f"{env.name}.last.json").read_text())["image"] == images[1]["id"]


def test_bad_schedule_is_refused_with_its_line(env):
    path = env.config_dir / f"{env.name}.toml"
    path.write_text(path.read_text().replace('"Mon..Fri *-*-* 02:30"', '"every tuesday"'))
    res = cli("job", "install", env.name, "--unit-dir", env.unit_dir, *env.dirs, repo=None)
    assert res.returncode == 2
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("schedule"))
    assert f"{path}:{line}: schedule: 'every tuesday' is not systemd OnCalendar syntax" in res.stderr
    assert not env.unit_dir.exists() or not list(env.unit_dir.iterdir())


def test_uninstall_and_list(env):
    install(env)
    listed = cli_json("job", "list", "--unit-dir", env.unit_dir, *env.dirs, repo=None)["jobs"]
    assert [(j["job"], j["installed"], j["valid"]) for j in listed] == [(env.name, True, True)]
    removed = cli_json("job", "uninstall", env.name, "--unit-dir", env.unit_dir, repo=None)["removed"]
    assert len(removed) == 2 and not any(Path(p).exists() for p in removed)
    listed = cli_json("job", "list", "--unit-dir", env.unit_dir, *env.dirs, repo=None)["jobs"]
    assert listed[0]["installed"] is False


def test_foreign_units_are_never_overwritten_or_removed(env):
    env.unit_dir.mkdir()
    foreign = env.unit_dir / f"imgbackup-job-{env.name}.service"
    foreign.write_text("[Service]\nExecStart=/bin/true\n")
    res = cli("job", "install", env.name, "--unit-dir", env.unit_dir, *env.dirs, repo=None)
    assert res.returncode == 8 and "was not written by imgbackup" in res.stderr
    assert cli_json("job", "uninstall", env.name, "--unit-dir", env.unit_dir, repo=None)["removed"] == []
    assert foreign.read_text() == "[Service]\nExecStart=/bin/true\n"


def test_systemd_quoting_round_trips():
    words = ["/usr/bin/imgbackup", "a b", 'q"uote', "back\\slash", "100%", "$HOME", "plain-word_1.2"]
    assert exec_start_argv(" ".join(systemd_quote(w) for w in words)) == words


def test_job_into_a_bucket_runs_from_its_unit_with_the_env_file(s3_server, s3_bucket, tmp_path):
    """An S3 repository: network allowed in the unit, credentials only in CONFIG_DIR/NAME.env."""
    need_tool("systemd-analyze")
    e = make_env(tmp_path, "cloudy")
    url = f"s3://{s3_bucket}/hosts/cloudy"
    aws = s3_server.env(IMGBACKUP_S3_PROBE_CACHE="0")
    cli_json("init", repo=url, passphrase=PASSPHRASE, **aws)
    random_image(tmp_path / "disk.img", 4 * MIB, seed=12)
    job = e.write_job(tmp_path / "disk.img")
    job.write_text(job.read_text().replace(f'repository = "{e.repo}"', f'repository = "{url}"'))
    (e.config_dir / "cloudy.env").write_text("".join(f"{k}={v}\n" for k, v in aws.items()))
    (e.config_dir / "cloudy.env").chmod(0o600)
    installed = cli_json("job", "install", "cloudy", "--unit-dir", e.unit_dir, *e.dirs, repo=None)
    service = Path(installed["units"][0])
    assert unit_values(service, "PrivateNetwork") == [] and "AF_INET" in unit_values(service,
                                                                                     "RestrictAddressFamilies")[0]
    assert unit_values(service, "Wants") == ["network-online.target"]
    assert aws["AWS_SECRET_ACCESS_KEY"] not in service.read_text()
    res = run_exec_start(service)
    assert res.returncode == 0, res.stdout + res.stderr
    images = cli_json("list", repo=url, passphrase=PASSPHRASE, **aws)["images"]
    assert len(images) == 1 and images[0]["name"] == "cloudy"
    status = cli_json("status", *e.dirs, repo=None, passphrase=None, **aws)["sources"][0]
    assert status["rpo"]["state"] == "OK" and status["repository_bytes"] > 0

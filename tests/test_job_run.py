"""``job run``: the steps, the exit codes, and the refusal of a disk that is not the job's disk."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

import pytest
from tests.disks import loop_device, mounted, random_image
from tests.jobenv import PASSPHRASE, make_env
from tests.support import MIB, cli, cli_env, cli_json, need_root, need_tool, sha256_file

from imgbackup.device.tools import wait_until
from imgbackup.engine.job import steps

SMALL = 6 * MIB


def statuses(summary: dict) -> dict[str, str]:
    return {s["step"]: s["status"] for s in summary["steps"]}


def step(summary: dict, name: str) -> dict:
    return next(s for s in summary["steps"] if s["step"] == name)


@pytest.fixture
def env(tmp_path):
    e = make_env(tmp_path)
    random_image(tmp_path / "disk.img", SMALL, seed=5)
    return e


def test_first_run_records_identity_then_incremental(env, tmp_path):
    env.write_job(tmp_path / "disk.img", "[verify]\nsample_percent = 100\n")
    code, first = env.summary()
    assert code == 0 and first["result"] == "ok", first
    assert statuses(first) == {"source": "ok", "backup": "ok", "prune": "skipped", "copy": "skipped",
                               "verify": "ok", "drill": "skipped"}
    assert step(first, "verify")["result"]["chunks_checked"] > 0
    state = env.state()
    assert state["identity"]["kind"] == "file" and state["identity"]["size"] == SMALL
    with open(tmp_path / "disk.img", "r+b") as f:
        f.seek(MIB)
        f.write(os.urandom(4096))
    code, second = env.summary()
    assert code == 0 and step(second, "backup")["result"]["type"] == "incremental"
    meta = cli_json("info", second["image"], repo=env.repo, passphrase=PASSPHRASE)
    assert meta["job"] == env.name and meta["source_spec"] == str(tmp_path / "disk.img")
    assert meta["source_fingerprint"]["size"] == SMALL
    events = [e["event"] for e in env.events()]
    assert events.count("backup") == 2 and all(e["result"] == "ok" for e in env.events())


def test_repartitioned_source_is_refused_and_nothing_is_stored(env, tmp_path):
    need_tool("sgdisk")
    disk = tmp_path / "disk.img"
    subprocess.run(["sgdisk", "-o", str(disk)], check=True, capture_output=True)
    env.write_job(disk)
    assert env.summary()[0] == 0
    subprocess.run(["sgdisk", "-G", str(disk)], check=True, capture_output=True)   # new disk GUID
    code, summary = env.summary()
    assert code == 17 and summary["result"] == "failed"
    assert "partition table GUID/id: was" in step(summary, "source")["error"]
    assert statuses(summary)["backup"] == "not_run" and len(env.images()) == 1
    refused = [e for e in env.events() if e["event"] == "source_refused"]
    assert refused and refused[0]["result"] == "refused" and "GUID" in refused[0]["differences"]
    assert env.state()["runs"][-1]["exit_code"] == 17
    # on purpose: accepted once, a full backup, the new identity recorded
    code, summary = env.summary("--accept-source-change")
    assert code == 0 and step(summary, "backup")["result"]["type"] == "full"
    assert env.summary()[0] == 0


def test_lost_state_falls_back_on_the_repository_history(env, tmp_path):
    env.write_job(tmp_path / "disk.img")
    assert env.summary()[0] == 0
    for f in env.state_dir.iterdir():
        f.unlink()
    random_image(tmp_path / "disk.img", SMALL + MIB, seed=9)      # another "disk" at the same path
    code, summary = env.summary()
    assert code == 17 and "size: was" in step(summary, "backup")["error"]
    assert len(env.images()) == 1


@pytest.mark.root
def test_by_id_name_pointing_at_another_disk_is_refused(env, tmp_path):
    """A /dev/disk/by-id link (as udev makes them) that now leads to another disk."""
    need_root()
    random_image(tmp_path / "other.img", SMALL, seed=11)
    link = Path(f"/dev/disk/by-id/imgbackup-test-{secrets.token_hex(4)}")
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        with loop_device(tmp_path / "disk.img", read_only=True) as first, \
                loop_device(tmp_path / "other.img", read_only=True) as second:
            link.symlink_to(first)
            env.write_job(link)
            code, summary = env.summary()
            assert code == 0, summary
            assert summary["device"] == first and env.state()["identity"]["backing_file"].endswith("disk.img")
            link.unlink()
            link.symlink_to(second)
            code, summary = env.summary()
            assert code == 17 and "loop backing file: was" in step(summary, "source")["error"]
    finally:
        link.unlink(missing_ok=True)
    assert len(env.images()) == 1


@pytest.mark.root
def test_filesystem_uuid_source_follows_the_filesystem(env, tmp_path):
    need_root()
    need_tool("mkfs.ext4")
    fs = tmp_path / "fs.img"
    fs.write_bytes(b"")
    os.truncate(fs, 16 * MIB)
    uuid = str(uuidlib.uuid4())
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", uuid, str(fs)], check=True)
    env.write_job(f"UUID={uuid}")
    with loop_device(fs, read_only=True) as dev:
        code, summary = env.summary()
        assert code == 0, summary
        assert summary["device"] == dev and env.state()["identity"]["fs_uuid"] == uuid
    code, summary = env.summary()                                       # detached: nothing has that UUID
    assert code == 7 and f"no device has UUID={uuid}" in step(summary, "source")["error"]


def _step_not_available(env, name: str, issue: int) -> None:
    """A build without the step's engine: the step fails honestly, the stored backup makes it exit 15."""
    proc = env.run()
    code, summary = proc.returncode, json.loads(proc.stdout)
    assert code == 15 and summary["result"] == "partial" and statuses(summary)[name] == "failed"
    assert f"job host: image {summary['image'][:12]} stored, but {name}:" in proc.stderr
    assert statuses(summary) == {"source": "ok", "backup": "ok", "prune": "skipped", "copy": "skipped",
                                 "verify": "ok", "drill": "skipped"} | {name: "failed"}
    assert f"'imgbackup {name}' (issue {issue})" in step(summary, name)["error"] and len(env.images()) == 1


def test_prune_step(env, tmp_path):
    """[retention] prunes the job's source after each backup (in a build without the prune engine,
    issue 14, the step fails as "not available": this test checks whichever this build is)."""
    env.write_job(tmp_path / "disk.img", "[retention]\nkeep_last = 1\n")
    if not steps.has_engine(steps.PRUNE_ENGINE):
        return _step_not_available(env, "prune", 14)
    made = []
    for _ in range(2):
        code, summary = env.summary()
        assert code == 0 and statuses(summary)["prune"] == "ok", summary
        made.append(summary["image"])
    assert step(summary, "prune")["result"]["removed"] == [made[0]]
    assert [i["id"] for i in env.images()] == made[1:]


def test_copy_step(env, tmp_path):
    """copy_to copies the job's images to each target with the target's own passphrase_file; every
    target is tried, a failing one makes the run exit 15 (in a build without the copy engine, issue 12,
    the step fails as "not available": this test checks whichever this build is)."""
    second, missing = tmp_path / "second", tmp_path / "missing"
    other_pass = tmp_path / "pass2"
    other_pass.write_text("second-repo-passphrase\n")
    good = f'copy_to = [{{repository = "{second}", passphrase_file = "{other_pass}"}}'
    env.write_job(tmp_path / "disk.img", f'{good}, "{missing}"]\n')
    if not steps.has_engine(steps.COPY_ENGINE):
        return _step_not_available(env, "copy", 12)
    cli_json("init", repo=second, passphrase="second-repo-passphrase")
    code, summary = env.summary()                    # the missing target fails; the first still gets its copy
    copied = step(summary, "copy")
    assert code == 15 and copied["status"] == "failed" and copied["exit_code"] == 3
    first, gone = copied["result"]["targets"]
    assert first["ok"] and first["copied"] == [summary["image"]] and gone["ok"] is False and gone["exit_code"] == 3
    made = [summary["image"]]
    env.write_job(tmp_path / "disk.img", f"{good}]\n")
    code, summary = env.summary()
    assert code == 0 and statuses(summary)["copy"] == "ok", summary
    made.append(summary["image"])
    assert step(summary, "copy")["result"]["targets"][0]["copied"] == [made[1]]     # the first one is there
    there = cli_json("list", repo=second, passphrase="second-repo-passphrase")["images"]
    assert [i["id"] for i in there] == made


def test_damaged_chunk_fails_verify_after_a_stored_backup(env, tmp_path):
    env.write_job(tmp_path / "disk.img", "[verify]\nsample_percent = 100\n")
    assert env.summary()[0] == 0
    pack = next(p for p in (env.repo / "packs").rglob("*") if p.is_file())
    with open(pack, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    code, summary = env.summary()
    assert code == 15 and statuses(summary)["backup"] == "ok" and statuses(summary)["verify"] == "failed"
    assert step(summary, "verify")["exit_code"] == 11
    failed = [e for e in env.events() if e["event"] == "verify_failed"]
    assert failed and failed[-1]["bad_chunks"] >= 1
    status = cli_json("status", *env.dirs, repo=None, passphrase=None)["sources"][0]
    assert status["last_verify"]["ok"] is False
    # verify recorded the damaged copy: the next run's backup stores that chunk again from the disk, so
    # every image reads whole again and the job is back to 0 without anyone touching it
    code, summary = env.summary()
    assert code == 0 and step(summary, "verify")["result"]["bad_chunks"] == 0, summary
    assert step(summary, "backup")["result"]["chunks_new"] >= 1


def test_failed_backup_is_its_own_exit_code(env, tmp_path):
    env.write_job(tmp_path / "disk.img")
    env.passphrase_file.write_text("wrong passphrase\n")
    code, summary = env.summary()
    assert code == 4 and statuses(summary)["backup"] == "failed" and statuses(summary)["verify"] == "not_run"
    assert [e["event"] for e in env.events()] == ["passphrase_failed"]
    (env.config_dir / f"{env.name}.toml").write_text(
        (env.config_dir / f"{env.name}.toml").read_text().replace(str(env.repo), str(tmp_path / "nowhere")))
    assert env.summary()[0] == 3
    other = tmp_path / "textfile"
    assert env.run("--metrics-dir", str(other)).returncode == 3
    assert "imgbackup_last_run_exit_code" in (other / f"imgbackup-job-{env.name}.prom").read_text()
    assert (env.metrics_dir / f"imgbackup-job-{env.name}.prom").read_text().count("last_run_exit_code{") == 1
    assert 'imgbackup_last_run_exit_code{job="host"' in (env.metrics_dir / "imgbackup-job-host.prom").read_text()


def test_a_second_run_while_one_runs_is_refused(env, tmp_path):
    env.write_job(tmp_path / "disk.img")
    env.state_dir.mkdir()
    with open(env.state_dir / f"{env.name}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        res = env.run()
    assert res.returncode == 5 and "already running" in res.stderr
    assert env.images() == []


def test_full_backup_policy_follows_the_calendar(env, tmp_path):
    need_tool("faketime")
    env.write_job(tmp_path / "disk.img", '[backup]\nfull = "monthly"\n')
    types = []
    for day in ("2026-01-30 02:00:00", "2026-01-31 02:00:00", "2026-02-01 02:00:00", "2026-02-02 02:00:00"):
        code, summary = env.summary(fake_time=day)
        assert code == 0, summary
        types.append(step(summary, "backup")["result"]["type"])
    assert types == ["full", "incremental", "full", "incremental"]


def test_job_restore_only_onto_the_same_disk(env, tmp_path):
    disk = tmp_path / "disk.img"
    env.write_job(disk)
    assert env.summary()[0] == 0
    original = sha256_file(disk)
    with open(disk, "r+b") as f:                        # ransomware was here
        f.write(os.urandom(2 * MIB))
    restored = cli_json("job", "restore", env.name, *env.dirs, "--yes", repo=None, passphrase=None)
    assert restored["bytes_written"] > 0 and sha256_file(disk) == original
    os.truncate(disk, SMALL + MIB)                       # another disk now: the size differs
    res = cli("job", "restore", env.name, *env.dirs, "--yes", repo=None, passphrase=None)
    assert res.returncode == 17 and "refusing to restore over" in res.stderr
    assert os.path.getsize(disk) == SMALL + MIB


def test_sigterm_mid_backup_is_130_with_summary_metrics_and_no_image(env, tmp_path):
    random_image(tmp_path / "big.img", 768 * MIB, seed=3)
    env.write_job(tmp_path / "big.img")
    proc = subprocess.Popen([sys.executable, "-m", "imgbackup", "job", "run", env.name, *env.dirs, "--json"],
                            env=cli_env(None, None), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # the backup's session lease (locks/session-*) says it is running
        assert wait_until(lambda: any((env.repo / "locks").glob("session-*")) or proc.poll() is not None, 60)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)             # what systemctl stop sends
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "imgbackup: error: job host interrupted (backup: " in err
    summary = json.loads(out)
    assert summary["result"] == "interrupted" and step(summary, "backup")["exit_code"] == 130
    assert "interrupted" in step(summary, "backup")["error"]
    assert env.images() == [] and not [p.name for p in (env.repo / "locks").iterdir() if p.name != "reserve"]
    assert env.state()["runs"][-1]["exit_code"] == 130
    assert 'imgbackup_last_run_exit_code{job="host"' in (env.metrics_dir / "imgbackup-job-host.prom").read_text()
    assert "} 130" in (env.metrics_dir / "imgbackup-job-host.prom").read_text()
    backup = [e for e in env.events() if e["event"] == "backup"]
    assert backup and backup[-1]["result"] == "failed" and backup[-1]["exit_code"] == 130


@pytest.mark.root
def test_snapshot_job_images_a_live_file_through_a_reflink(env, tmp_path):
    need_root()
    need_tool("mkfs.xfs")
    img = tmp_path / "xfs.img"
    img.write_bytes(b"")
    os.truncate(img, 320 * MIB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(img)], check=True)
    with loop_device(img) as dev, mounted(dev, tmp_path / "mnt", "rw") as mnt:
        vm = random_image(mnt / "vm.img", SMALL, seed=21)
        env.write_job(vm, '[backup]\nsnapshot = "reflink"\n')
        code, summary = env.summary()
        assert code == 0, summary
        assert not list(mnt.glob(".vm.img.*"))                       # the clone is gone
        restored = tmp_path / "back.img"
        cli_json("restore", summary["image"], restored, repo=env.repo, passphrase=PASSPHRASE)
        assert sha256_file(restored) == sha256_file(vm)

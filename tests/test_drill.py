"""Restore drills: checks, a timed full restore read back chunk by chunk, a QEMU boot; the result kept
as an authenticated record that status shows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tests.disks import make_gpt_disk
from tests.support import cli, cli_json, need_root, need_tool

from imgbackup.engine.drill.run import compare_target
from imgbackup.repository.records import latest_record, record_ids
from imgbackup.repository.repo import Repository

PASS = "drill-test-pass"


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    need_root()
    base = tmp_path_factory.mktemp("drill")
    disk = make_gpt_disk(base / "disk.img", 64)
    repo = base / "repo"
    cli_json("init", repo=repo, passphrase=PASS)
    image = cli_json("backup", disk["path"], "--name", "gpt", repo=repo, passphrase=PASS)["id"]
    return {"base": base, "disk": disk, "repo": repo, "image": image}


def open_repo(path: Path) -> Repository:
    return Repository.open(path, lambda: PASS.encode())


@pytest.mark.root
def test_drill_checks_restores_reads_back_and_records(gpt, tmp_path):
    scratch = tmp_path / "scratch.img"
    res = cli_json("drill", gpt["image"], "--restore-to", scratch, repo=gpt["repo"], passphrase=PASS,
                   IMGBACKUP_AUDIT=f"file:{tmp_path / 'audit.jsonl'}")
    assert res["ok"] and [s["step"] for s in res["steps"]] == ["filesystems", "restore"]
    fs, restore = res["steps"]
    assert {p["fstype"] for p in fs["detail"]["partitions"]} == {"ext4", "vfat"}
    assert all(p["ok"] for p in fs["detail"]["partitions"])
    assert restore["detail"]["slots_differing"] == 0 and res["rto_s"] == restore["detail"]["rto_s"] > 0
    assert not scratch.exists()                                   # the drill's own scratch file is gone
    r = open_repo(gpt["repo"])
    record = latest_record(r, "drill", "gpt")
    assert record.id == res["record"] and record.ok and record.data["rto_s"] == res["rto_s"]
    events = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["restore", "drill"]
    assert events[1]["rto_s"] == res["rto_s"] and events[1]["image"] == gpt["image"]
    status = cli_json("status", "-r", gpt["repo"], "--rpo", "1h", repo=None, passphrase=PASS)["sources"]
    assert status[0]["last_drill"]["rto_s"] == res["rto_s"] and status[0]["rpo"]["state"] == "OK"


@pytest.mark.root
def test_read_back_sees_a_changed_byte(gpt, tmp_path):
    scratch = tmp_path / "keep.img"
    res = cli_json("drill", gpt["image"], "--restore-to", scratch, "--keep", "--no-filesystems",
                   repo=gpt["repo"], passphrase=PASS)
    assert res["ok"] and scratch.exists()
    r = open_repo(gpt["repo"])
    image = r.images.load(gpt["image"])
    assert compare_target(str(scratch), image, r.keys.id_key) == 0
    with open(scratch, "r+b") as f:
        f.seek(gpt["disk"]["partitions"][0]["offset"] + 5000)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))
    assert compare_target(str(scratch), image, r.keys.id_key) == 1


@pytest.mark.root
def test_drill_onto_an_existing_target_needs_yes(gpt, tmp_path):
    existing = tmp_path / "old.img"
    existing.write_bytes(b"precious")
    res = cli("drill", gpt["image"], "--restore-to", existing, repo=gpt["repo"], passphrase=PASS)
    assert res.returncode == 2 and existing.read_bytes() == b"precious"


@pytest.mark.root
def test_damaged_image_fails_the_drill_and_the_record_says_so(tmp_path):
    need_root()
    disk = make_gpt_disk(tmp_path / "disk.img", 64, seed=4)
    repo = tmp_path / "repo"
    cli_json("init", repo=repo, passphrase=PASS)
    image = cli_json("backup", disk["path"], "--name", "bad", repo=repo, passphrase=PASS)["id"]
    for pack in (p for p in (repo / "packs").rglob("*") if p.is_file()):
        with open(pack, "r+b") as f:                      # one flipped bit in every pack
            f.seek(64)
            b = f.read(1)
            f.seek(64)
            f.write(bytes([b[0] ^ 0x10]))
    res = cli("drill", image, "--restore-to", tmp_path / "scratch.img", "--json", repo=repo, passphrase=PASS)
    assert res.returncode == 11
    doc = json.loads(res.stdout)
    assert not doc["ok"] and doc["rto_s"] is None
    assert not (tmp_path / "scratch.img").exists()
    record = latest_record(open_repo(repo), "drill", "bad")
    assert record is not None and record.ok is False


def test_records_are_authenticated_where_they_are(tmp_path):
    repo = tmp_path / "repo"
    cli_json("init", repo=repo, passphrase=PASS)
    r = open_repo(repo)
    from imgbackup.repository.records import write_record

    first = write_record(r, "drill", "a", True, ["00" * 16], {"rto_s": 1.0}, now=1000.0)
    second = write_record(r, "drill", "a", True, ["00" * 16], {"rto_s": 2.0}, now=2000.0)
    assert record_ids(r, "drill", "a") == [first.id, second.id]
    assert latest_record(r, "drill", "a").data["rto_s"] == 2.0
    path = next(p for p in (repo / "checks").rglob(second.id))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    errors: list[str] = []
    assert latest_record(r, "drill", "a", errors).id == first.id     # the damaged newer one is skipped
    assert "failed authentication" in errors[0]
    # a record moved into another source's folder does not authenticate as that source's
    other = write_record(r, "drill", "b", True, [], {}, now=3000.0)
    target = next(p for p in (repo / "checks").rglob(other.id)).parent / first.id
    target.write_bytes(next(p for p in (repo / "checks").rglob(first.id)).read_bytes())
    errors = []
    assert latest_record(r, "drill", "b", errors).id == other.id and errors == []
    (target.parent / other.id).unlink()
    assert latest_record(r, "drill", "b", errors) is None and "does not belong" in errors[0]


@pytest.mark.root
@pytest.mark.slow
def test_boot_drill_of_the_restored_copy(tmp_path):
    from tests.bootdisk import build_boot_disk

    need_root()
    need_tool("extlinux", "qemu-system-x86_64")
    disk = build_boot_disk(tmp_path / "boot.img", "bios-mbr", size_mib=48, marker="DRILL-BOOT-OK")
    repo = tmp_path / "repo"
    cli_json("init", repo=repo, passphrase=PASS)
    image = cli_json("backup", disk, "--name", "bootable", repo=repo, passphrase=PASS)["id"]
    res = cli_json("drill", image, "--restore-to", tmp_path / "scratch.img", "--boot", "--expect", "DRILL-BOOT-OK",
                   "--timeout", "90", repo=repo, passphrase=PASS)
    boot = next(s for s in res["steps"] if s["step"] == "boot")
    assert res["ok"] and boot["detail"]["booted"] and boot["detail"]["from"] == "restored copy"
    # a boot that never prints the text fails when its timeout ends: a short one keeps this cheap
    wrong = cli("drill", image, "--boot", "--expect", "NEVER-PRINTED", "--timeout", "5", "--no-filesystems",
                "--json", repo=repo, passphrase=PASS)
    assert wrong.returncode == 11 and json.loads(wrong.stdout)["steps"][0]["detail"]["from"] == "repository"

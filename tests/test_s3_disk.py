"""Real disks through a real bucket (SeaweedFS, tests/s3server.py): a GPT disk (ext4 + FAT32) backed up
into a bucket and restored byte-exact (the filesystems' own checkers after), an incremental that stores
only the changed chunks, and mount and restore-files from a bucket copy of a directory repository.
"""

from __future__ import annotations

import os
import shutil

import pytest
from tests.disks import loop_device, make_gpt_disk, mounted
from tests.s3server import S3Server
from tests.support import cli as run_cli
from tests.support import cli_json as run_json
from tests.support import need_root, need_tool, sha256_file
from tests.test_mount_helpers import ENV, build_disk, tree_hashes
from tests.test_roundtrip_disk import _change_files, _check_filesystems

from imgbackup.repository.packs import read_pack_trailer
from imgbackup.repository.repo import Repository

pytestmark = pytest.mark.slow   # each test 20-85 s on 2 shared cores (a real server, real round trips)


def _env(server: S3Server, **extra: str) -> dict[str, str]:
    return server.env(IMGBACKUP_S3_PROBE_CACHE="0", **extra)


@pytest.fixture(scope="module")
def gpt_disk(tmp_path_factory) -> dict:
    return make_gpt_disk(tmp_path_factory.mktemp("s3gpt") / "disk.img", size_mib=64)


def _pack_keys(server: S3Server, bucket: str) -> set[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {item["Key"] for page in pages for item in page.get("Contents", ()) if "/packs/" in item["Key"]}


def test_a_gpt_disk_round_trips_through_a_bucket_and_an_incremental_stores_only_changes(
        s3_server, s3_bucket, gpt_disk, tmp_path, monkeypatch) -> None:
    need_root()
    need_tool("e2fsck", "fsck.vfat", "sgdisk", "mcopy")
    env = _env(s3_server)
    url = f"s3://{s3_bucket}/hosts/pc1"
    run_json("init", repo=url, **env)
    image = tmp_path / "disk.img"
    shutil.copyfile(gpt_disk["path"], image)
    with loop_device(image, read_only=True) as dev:
        first = run_json("backup", dev, "--name", "pc1", repo=url, **env)
    assert first["type"] == "full" and 0 < first["bytes_read"] < gpt_disk["size"]   # used blocks only
    with loop_device(image, read_only=True) as dev:
        # --all-blocks from here: the changes leave deleted data in free blocks, which used-block mode drops
        first = run_json("backup", dev, "--name", "pc1", "--all-blocks", repo=url, **env)
    before = sha256_file(image)
    packs_before = _pack_keys(s3_server, s3_bucket)
    _change_files(image, gpt_disk, tmp_path / "mnt")
    with loop_device(image, read_only=True) as dev:
        second = run_json("backup", dev, "--name", "pc1", "--all-blocks", repo=url, **env)
    assert (second["type"], second["parent"]) == ("incremental", first["id"])
    assert 0 < second["chunks_new"] <= second["chunks_changed"] < second["chunks"] // 2
    # the new packs in the bucket hold exactly the new chunks, nothing the first image stored
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    repo = Repository.open(url, lambda: b"test-pass")
    new_packs = _pack_keys(s3_server, s3_bucket) - packs_before
    stored = [cid for key in new_packs for cid, _ in read_pack_trailer(repo.storage, repo.envelope,
                                                                        bytes.fromhex(key[-64:]))]
    assert len(stored) == len(set(stored)) == second["chunks_new"]
    assert not set(stored) & repo.images.load(first["id"]).unique_ids()
    for image_id, want in ((first["id"], before), (second["id"], sha256_file(image))):
        out = tmp_path / f"{image_id}.img"
        doc = run_json("restore", image_id, out, "--yes", repo=url, **env)
        assert doc["verified"] and doc["requests"]["http"] > 0
        assert sha256_file(out) == want
        _check_filesystems(out, gpt_disk)
        out.unlink()
    assert run_cli("verify", repo=url, **env).returncode == 0


def test_mount_restore_files_and_verify_work_from_a_bucket_copy(s3_server, s3_bucket, tmp_path, no_leaks) -> None:
    need_root()
    (tmp_path / "disk").mkdir()
    disk = build_disk(tmp_path / "disk")
    with loop_device(disk.part1, read_only=True) as dev, mounted(dev, tmp_path / "orig", "ro,noload"):
        original = tree_hashes(tmp_path / "orig")
    env = _env(s3_server)
    url = f"s3://{s3_bucket}/offsite"
    pw = ENV["IMGBACKUP_PASSPHRASE"]
    run_json("init", "--related-to", disk.repo, repo=url, passphrase="bucket-pass", IMGBACKUP_PASSPHRASE2=pw, **env)
    run_json("copy", "--all", "--to", url, repo=disk.repo, passphrase=pw, IMGBACKUP_PASSPHRASE2="bucket-pass", **env)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = run_cli("mount", "latest", mnt, "--filesystems", repo=url, passphrase="bucket-pass", **env)
    assert proc.returncode == 0, proc.stderr
    try:
        with open(mnt / "disk.img", "rb") as a, open(disk.disk, "rb") as b:
            assert a.read() == b.read()
        assert tree_hashes(mnt / "fs" / "part1") == original and len(original) > 100
    finally:
        assert run_cli("umount", mnt).returncode == 0
    assert os.listdir(mnt) == []
    out = tmp_path / "out"
    proc = run_cli("restore-files", "latest", "-p", "1", "/tree", "big.bin", "--to", out, repo=url,
                   passphrase="bucket-pass", **env)
    assert proc.returncode == 0, proc.stderr
    with loop_device(disk.part1, read_only=True) as dev, mounted(dev, tmp_path / "orig", "ro,noload"):
        assert (out / "big.bin").read_bytes() == (tmp_path / "orig" / "big.bin").read_bytes()
        assert tree_hashes(out / "tree") == tree_hashes(tmp_path / "orig" / "tree")
    proc = run_cli("restore-files", "latest", "-p", "2", "/docs/hello.txt", "--to", out / "fat", repo=url,
                   passphrase="bucket-pass", **env)
    assert proc.returncode == 0, proc.stderr
    assert (out / "fat" / "docs" / "hello.txt").read_text() == "hello from FAT\n"   # keeps its place
    proc = run_cli("verify", "latest", "--filesystems", repo=url, passphrase="bucket-pass", **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""S3 Object Lock on a real SeaweedFS bucket created with Object Lock (tests/s3server.py).

One repository goes through the whole life: init runs the lock probe and records it; every object
carries a retention date; the server refuses deleting a locked version (the image still restores,
byte for byte); a hold sets the S3 legal hold; imgbackup's own delete of a locked image is
"retained, removed later"; after the lock date prune really frees the space. The lock period is
IMGBACKUP_TEST_LOCK_SECONDS seconds instead of days, so the test waits only for that short period.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from tests.disks import random_image
from tests.support import MIB, cli, cli_json, sha256_file

LOCK_SECONDS = 20   # long enough for a backup, the refused deletes and imgbackup's delete on a busy machine


def _versions(client, bucket: str) -> list[dict]:
    pages = client.get_paginator("list_object_versions").paginate(Bucket=bucket)
    return [v for page in pages for v in page.get("Versions", [])]


def _head(client, bucket: str, key: str) -> dict:
    return client.head_object(Bucket=bucket, Key=key)


@pytest.fixture
def lock_env(s3_server, s3_lock_bucket, tmp_path) -> dict[str, str]:
    return s3_server.env(IMGBACKUP_S3_PROBE_CACHE="0", IMGBACKUP_TEST_LOCK_SECONDS=str(LOCK_SECONDS),
                         XDG_STATE_HOME=str(tmp_path / "state"))


@pytest.mark.slow   # waits for the lock date: ~30 s
def test_object_lock_protects_then_prune_frees_after_the_lock_date(s3_server, s3_lock_bucket, lock_env,
                                                                     tmp_path: Path) -> None:
    bucket, client = s3_lock_bucket, s3_server.client()
    url = f"s3://{bucket}/repo"
    init = cli_json("init", "--object-lock", "compliance", "--lock-days", "1", repo=url, **lock_env)
    assert init["object_lock"] == {"mode": "compliance", "seconds": LOCK_SECONDS}
    info = cli_json("info", repo=url, **lock_env)["object_lock"]
    assert info["enforced"] and info["last_probe"]["passed"], info
    assert all(info["last_probe"]["checks"].values())

    first_src = random_image(tmp_path / "a.img", 3 * MIB, seed=41)
    second_src = random_image(tmp_path / "b.img", 3 * MIB, seed=42)
    first = cli_json("backup", first_src, "--name", "d", repo=url, **lock_env)["id"]
    first_locked_until = time.time() + LOCK_SECONDS     # its objects were written before this
    second = cli_json("backup", second_src, "--name", "d", repo=url, **lock_env)["id"]
    second_until = _head(client, bucket, f"repo/images/{second}")["ObjectLockRetainUntilDate"]

    # Every object but the lock folder carries a retention date; the server refuses deleting a version.
    keys = {v["Key"]: v["VersionId"] for v in _versions(client, bucket)}
    image_key = f"repo/images/{first}"
    pack_key = next(k for k in keys if k.startswith("repo/packs/"))
    # The retention is the policy's (from each object's own write), whatever the machine's speed; the
    # refused delete is tried on every object still locked -- on a slow machine the oldest ones (init's)
    # may be past their 20 s already -- and always on the second image's, written last.
    tried = []
    for key in (image_key, pack_key, "repo/config", "repo/catalog/0000000000000000", f"repo/images/{second}"):
        head = _head(client, bucket, key)
        until = head["ObjectLockRetainUntilDate"].timestamp()
        assert head["ObjectLockMode"] == "COMPLIANCE" and until >= head["LastModified"].timestamp() + LOCK_SECONDS - 2
        if until > time.time() + 2:
            with pytest.raises(ClientError) as refused:
                client.delete_object(Bucket=bucket, Key=key, VersionId=keys[key])
            assert refused.value.response["Error"]["Code"] == "AccessDenied", key
            tried.append(key)
    assert f"repo/images/{second}" in tried, "the newest object's lock was already over: machine far too slow"

    # imgbackup's own delete: the server keeps the locked index, which counts as removed meanwhile.
    packs_until = {k: _head(client, bucket, k)["ObjectLockRetainUntilDate"] for k in keys if k.startswith("repo/packs/")}
    deleted = cli_json("delete", first, "--yes", repo=url, **lock_env)
    assert deleted["retained"] == [first]
    # ... and what the remaining image needs had its lock extended: its index and its packs, not the
    # packs only the deleted image needed.
    assert _head(client, bucket, f"repo/images/{second}")["ObjectLockRetainUntilDate"] > second_until
    extended = {k for k, until in packs_until.items() if _head(client, bucket, k)["ObjectLockRetainUntilDate"] > until}
    assert extended and extended != set(packs_until), (extended, packs_until)
    out = tmp_path / "restored.img"            # the deleted image still restores while its lock holds
    restore = cli("restore", first, out, "--yes", repo=url, **lock_env)
    assert restore.returncode == 0, restore.stderr
    assert sha256_file(out) == sha256_file(first_src)
    out.unlink()

    # A hold sets the S3 legal hold on the image's index; delete of a held image is refused (exit 14).
    placed = cli_json("hold", second, "--reason", "case 7", repo=url, **lock_env)
    assert placed["s3_legal_holds"] >= 5       # its index, its pack(s), its catalog entries, the hold record
    assert _head(client, bucket, f"repo/images/{second}")["ObjectLockLegalHoldStatus"] == "ON"
    held = cli("delete", second, "--yes", repo=url, **lock_env)
    assert held.returncode == 14 and "legal hold" in held.stderr
    assert cli("release", second, repo=url, **lock_env).returncode == 0
    assert _head(client, bucket, f"repo/images/{second}").get("ObjectLockLegalHoldStatus") != "ON"
    report = cli_json("verify", repo=url, **lock_env)
    assert report["ok"] and report["catalog"]["ok"] and report["lock_probe"]["passed"], report

    # A policy promising to keep images longer than their objects stay locked is refused.
    too_long = cli("prune", "--keep-within", "1d", repo=url, **lock_env)
    assert too_long.returncode == 2 and "lock period" in too_long.stderr

    # After the lock date, prune deletes the retained index and the packs only it needed: space is freed.
    stored_before = sum(v["Size"] for v in _versions(client, bucket))
    time.sleep(max(0.0, first_locked_until + 1 - time.time()))
    pruned = cli_json("prune", "--keep-last", "1", repo=url, **lock_env)
    assert pruned["pending_completed"] == [first] and pruned["bytes_freed"] > 2 * MIB, pruned
    left = _versions(client, bucket)
    assert not [v for v in left if v["Key"] == image_key]               # every version of the index is gone
    assert sum(v["Size"] for v in left) < stored_before - 2 * MIB       # the bucket really holds less
    assert [row["id"] for row in cli_json("list", repo=url, **lock_env)["images"]] == [second]
    final = cli_json("verify", repo=url, **lock_env)
    assert final["ok"] and final["catalog"]["ok"] and not final["catalog"]["notes"], final["catalog"]
    restore = cli("restore", second, out, "--yes", repo=url, **lock_env)
    assert restore.returncode == 0 and sha256_file(out) == sha256_file(second_src)


def test_object_lock_needs_a_lock_enabled_bucket(s3_server, s3_bucket, tmp_path: Path) -> None:
    """A bucket without Object Lock: init refuses (nothing written) instead of claiming immutability."""
    env = s3_server.env(IMGBACKUP_S3_PROBE_CACHE="0", XDG_STATE_HOME=str(tmp_path / "state"))
    proc = cli("init", "--object-lock", "governance", "--lock-days", "30", repo=f"s3://{s3_bucket}/r", **env)
    assert proc.returncode == 2 and "Object Lock" in proc.stderr and "Traceback" not in proc.stderr
    assert not s3_server.client().list_objects_v2(Bucket=s3_bucket).get("Contents")

"""A backup-only host's bucket policy (docs/S3.md), on a real server that enforces it (SeaweedFS 4.48).

The session's SeaweedFS has a second identity, ``backup-host``, with Read, List and Write only —
and SeaweedFS's Write includes deleting. A bucket policy takes deleting away again, outside
``locks/`` (the writer lock is created and removed by every backup). What SeaweedFS enforces and
what not is asserted here exactly as docs/S3.md states it.
"""

from __future__ import annotations

import json
import secrets

import pytest
from botocore.exceptions import ClientError
from tests.s3server import BACKUP_HOST

from support import cli, sha256_file


def backup_host_policy(bucket: str, prefix: str, principal: str) -> dict:
    """docs/S3.md's policy, as SeaweedFS accepts it (no if-none-match statement: it cannot evaluate one)."""
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "BackupHostNeverDeletes", "Effect": "Deny", "Principal": {"AWS": principal},
         "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"],
         "NotResource": [f"arn:aws:s3:::{bucket}/{prefix}/locks/*"]}]}


@pytest.fixture
def policed_repo(s3_server, s3_bucket, tmp_path):
    """A repository made with full storage rights, then the bucket policy for the backup host."""
    admin = s3_server.env(IMGBACKUP_S3_PROBE_CACHE="0")
    url = f"s3://{s3_bucket}/repo"
    done = cli("init", "-r", url, **admin)
    assert done.returncode == 0, done.stderr
    principal = f"arn:aws:iam::000000000000:user/{BACKUP_HOST}"
    s3_server.client().put_bucket_policy(Bucket=s3_bucket, Policy=json.dumps(backup_host_policy(s3_bucket, "repo",
                                                                                                  principal)))
    return url, admin, s3_server.backup_host_env(IMGBACKUP_S3_PROBE_CACHE="0")


def _keys(client, bucket: str) -> dict[str, str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", ())}


def _image_ids(url: str, env: dict) -> list[str]:
    done = cli("list", "-r", url, "--json", **env)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    return [image["id"] for image in (doc["images"] if isinstance(doc, dict) else doc)]


@pytest.mark.slow  # ~18-26 s: eight CLI runs against the bucket
def test_backup_host_adds_images_but_cannot_delete_them(policed_repo, s3_server, s3_bucket, tmp_path) -> None:
    url, admin, host = policed_repo
    source = tmp_path / "disk.img"
    source.write_bytes(secrets.token_bytes(3 << 20) + bytes(1 << 20))
    done = cli("backup", "-r", url, source, **host)
    assert done.returncode == 0, done.stderr
    with open(source, "r+b") as f:              # the incremental changes one chunk
        f.seek(1 << 20)
        f.write(secrets.token_bytes(1 << 20))
    done = cli("backup", "-r", url, source, **host)
    assert done.returncode == 0, done.stderr
    first, second = _image_ids(url, host)
    stored = _keys(s3_server.client(), s3_bucket)

    refused = cli("delete", "-r", url, first, "--yes", **host)
    assert refused.returncode == 10, (refused.returncode, refused.stderr)
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "denied" in lines[0] and "permission" in lines[0], lines[0]
    after = _keys(s3_server.client(), s3_bucket)
    # nothing removed or replaced; a removal may have logged its attempt (a catalog entry) before it was refused
    assert {k: after.get(k) for k in stored if "/locks/" not in k} == {k: v for k, v in stored.items()
                                                                      if "/locks/" not in k}
    assert all("/catalog/" in k or "/locks/" in k for k in set(after) - set(stored)), sorted(set(after) - set(stored))
    assert not [k for k in after if k.endswith("/locks/exclusive")]   # the lock went: locks/ may be deleted
    assert _image_ids(url, admin) == [first, second]

    # the full storage identity restores what the backup host wrote, byte for byte
    target = tmp_path / "restored.img"
    done = cli("restore", "-r", url, second, target, "--yes", **admin)
    assert done.returncode == 0, done.stderr
    assert sha256_file(target) == sha256_file(source)
    # and may delete
    done = cli("delete", "-r", url, first, "--yes", **admin)
    assert done.returncode == 0, done.stderr
    assert _image_ids(url, admin) == [second]


def test_what_seaweedfs_enforces_request_by_request(policed_repo, s3_server, s3_bucket) -> None:
    """Deletes outside locks/ are refused, one by one or in a batch; overwrites are NOT (docs/S3.md)."""
    import boto3
    from botocore.config import Config

    _url, _admin, host = policed_repo
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                          aws_access_key_id=host["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=host["AWS_SECRET_ACCESS_KEY"],
                          config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    config_key = "repo/config"
    original = client.get_object(Bucket=s3_bucket, Key=config_key)["Body"].read()
    for key in (config_key, "repo/keys/x", "repo/packs/ab/x", "repo/images/x"):
        with pytest.raises(ClientError, match="AccessDenied"):
            client.delete_object(Bucket=s3_bucket, Key=key)
    batch = client.delete_objects(Bucket=s3_bucket, Delete={"Objects": [{"Key": config_key}]})
    assert [e["Code"] for e in batch.get("Errors", [])] == ["AccessDenied"]
    assert client.get_object(Bucket=s3_bucket, Key=config_key)["Body"].read() == original
    # locks/ stays the host's own: a backup creates and removes its lock there
    client.put_object(Bucket=s3_bucket, Key="repo/locks/probe-test", Body=b"x")
    client.delete_object(Bucket=s3_bucket, Key="repo/locks/probe-test")
    # create-if-absent is honoured for the host too (data keys, the lock)
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=s3_bucket, Key=config_key, Body=b"forged", IfNoneMatch="*")
    # NOT enforced by SeaweedFS 4.48: a plain PutObject over an existing object (a policy cannot stop it
    # here; on AWS, versioning plus the denied s3:DeleteObjectVersion keeps the old version)
    client.put_object(Bucket=s3_bucket, Key=config_key, Body=b"overwritten")
    assert client.get_object(Bucket=s3_bucket, Key=config_key)["Body"].read() == b"overwritten"

"""S3 Object Lock for a repository bucket: retention on every write, deletes that really free space,
lock extension, legal holds, and the probe that says whether the server enforces any of it.

A bucket with Object Lock is versioned. A plain DeleteObject there only hides the object behind a
delete marker (the bytes stay, and cost), so a repository with Object Lock deletes every *version*
of a key; while a version is under retention or legal hold the server refuses (AccessDenied) and the
delete raises ``ObjectRetained``: the remover leaves it, and a later one removes it.

Objects under ``locks/`` (leases, probes, the space reserve) and ``gc/`` (collection marks, replaced
by every collection) get no retention: they must be deletable, and they protect no data (deleting a
mark only delays a deletion; the packs it names keep their own locks).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from imgbackup.errors import ObjectMissing, ObjectRetained, StorageError
from imgbackup.repository.backends.s3calls import error_code

if TYPE_CHECKING:
    from imgbackup.repository.backends.s3 import S3Storage

UNLOCKED = ("locks/", "gc/")     # written without retention: they are deleted all the time
PROBE_FOLDER = "lockprobe"
PROBE_SECONDS = 120              # the canary's retention: long enough to try deleting it, short to expire
DENIED = ("AccessDenied", "403", "InvalidRequest", "MethodNotAllowed")
BATCH = 1000                     # DeleteObjects takes at most 1000 keys


def content_md5(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body).digest()).decode()   # noqa: S324 - the protocol's checksum


def utc_in(seconds: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)


@dataclass(frozen=True)
class ObjectLockSettings:
    mode: str                  # "compliance" or "governance"
    seconds: int

    @property
    def s3_mode(self) -> str:
        return self.mode.upper()

    def put_args(self, name: str, body: bytes | None) -> dict:
        """The PutObject/CreateMultipartUpload arguments that lock ``name`` (none for the lock folder)."""
        if name.startswith(UNLOCKED):
            return {}
        args: dict = {"ObjectLockMode": self.s3_mode, "ObjectLockRetainUntilDate": utc_in(self.seconds)}
        if body is not None:
            args["ContentMD5"] = content_md5(body)
        return args


def versions(storage: S3Storage, name: str) -> list[tuple[str, bool]]:
    """(version id, is a delete marker) of every version of exactly ``name``, newest first."""
    key = storage.key(name)
    out: list[tuple[str, bool]] = []
    args = {"Bucket": storage.bucket, "Prefix": key}
    while True:
        page = storage.calls.run("list versions", name, lambda a=dict(args): storage.client.list_object_versions(**a))
        out += [(v["VersionId"], False) for v in page.get("Versions", ()) if v["Key"] == key]
        out += [(m["VersionId"], True) for m in page.get("DeleteMarkers", ()) if m["Key"] == key]
        if not page.get("IsTruncated"):
            return out
        args["KeyMarker"] = page.get("NextKeyMarker", "")
        args["VersionIdMarker"] = page.get("NextVersionIdMarker", "")


def protection(storage: S3Storage, name: str, version: str | None = None) -> tuple[float | None, bool]:
    """(retain-until as Unix time or None, legal hold on) of a version (the current one for None)."""
    key = storage.key(name)
    args = {"Bucket": storage.bucket, "Key": key, **({"VersionId": version} if version else {})}
    head = storage.calls.run("size", name, lambda: storage.client.head_object(**args))
    until = head.get("ObjectLockRetainUntilDate")
    return (until.timestamp() if until else None), head.get("ObjectLockLegalHoldStatus") == "ON"


def _unless_denied(call) -> Callable[[], bool]:
    """A request for ``S3Calls.run`` that answers False when the server refuses it for permission or
    lock reasons (not retried: the answer will not change) and True when it succeeds."""
    def attempt() -> bool:
        try:
            call()
        except ClientError as exc:
            if error_code(exc) in DENIED:
                return False
            raise
        return True
    return attempt


def delete_versions(storage: S3Storage, name: str) -> None:
    """Delete every version of ``name`` (data first, delete markers last, so a refused version is never
    uncovered again); ObjectRetained when the server keeps some under retention or legal hold."""
    found = versions(storage, name)
    if not found:
        return
    ordered = [v for v, marker in found if not marker] + [v for v, marker in found if marker]
    key, client = storage.key(name), storage.client
    refused: list[str] = []
    for start in range(0, len(ordered), BATCH):
        batch = ordered[start : start + BATCH]
        if len(batch) == 1:
            if not storage.calls.run("delete", name, _unless_denied(
                    lambda v=batch[0]: client.delete_object(Bucket=storage.bucket, Key=key, VersionId=v))):
                refused.append(batch[0])
            continue
        objects = {"Objects": [{"Key": key, "VersionId": v} for v in batch], "Quiet": True}
        answer = storage.calls.run("delete", name, lambda o=objects: client.delete_objects(
            Bucket=storage.bucket, Delete=o))
        for error in answer.get("Errors", ()):
            if error.get("Code") not in DENIED:
                raise StorageError(f"S3 delete of {name} failed: {error.get('Code')} ({storage.endpoint})")
            refused.append(error.get("VersionId", ""))
    if refused:
        until, held = None, False
        with contextlib.suppress(StorageError, ObjectMissing):
            until, held = protection(storage, name, refused[0] or None)
        why = "a legal hold" if held else f"retention until {_when(until)}" if until else "Object Lock"
        raise ObjectRetained(f"{name} is retained by {why}", name, until)


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(stamp)) if stamp else "?"


def object_lock_enabled(storage: S3Storage) -> bool:
    """Whether the bucket was created with Object Lock (only such buckets accept retention dates)."""
    try:
        doc = storage.client.get_object_lock_configuration(Bucket=storage.bucket)
    except ClientError as exc:
        if error_code(exc) in ("ObjectLockConfigurationNotFoundError", "404", "NotImplemented", "501"):
            return False
        raise storage.calls.final_error(exc, "object lock check", "") from None
    return doc.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"


def extend_retention(storage: S3Storage, name: str, until: datetime.datetime) -> bool:
    """Move the current version's retention date out to ``until``; False when the server refuses
    (the object is already locked longer: shortening is what Object Lock forbids)."""
    assert storage.lock is not None
    retention = {"Mode": storage.lock.s3_mode, "RetainUntilDate": until}
    key = storage.key(name)
    return storage.calls.run("lock extension", name, _unless_denied(
        lambda: storage.client.put_object_retention(Bucket=storage.bucket, Key=key, Retention=retention)))


def set_legal_hold(storage: S3Storage, name: str, on: bool) -> None:
    """PutObjectLegalHold on the current version (ObjectMissing when there is none)."""
    key = storage.key(name)
    storage.calls.run("legal hold", name, lambda: storage.client.put_object_legal_hold(
        Bucket=storage.bucket, Key=key, LegalHold={"Status": "ON" if on else "OFF"}))


def _refused(call) -> bool:
    """True when the server refuses ``call`` with a permission/lock error, False when it succeeds."""
    try:
        call()
    except ClientError as exc:
        if error_code(exc) in DENIED:
            return True
        raise
    return False


def lock_probe(storage: S3Storage, mode: str) -> dict:
    """Write a canary under ``lockprobe/`` with a short retention in ``mode``; deleting that version
    and shortening its retention must both be refused, and the server must report the date it kept.
    A second canary without retention checks legal holds the same way. Old canaries are removed."""
    client, bucket = storage.client, storage.bucket
    stamp = f"{time.time_ns():016x}-{secrets.token_hex(4)}"
    name, held_name = f"{PROBE_FOLDER}/{stamp}", f"{PROBE_FOLDER}/{stamp}-hold"
    key, held_key, body = storage.key(name), storage.key(held_name), b"imgbackup object lock canary\n"
    until = utc_in(PROBE_SECONDS)
    checks: dict[str, bool] = {}
    try:
        put = client.put_object(Bucket=bucket, Key=key, Body=body, ContentMD5=content_md5(body),
                                ObjectLockMode=mode.upper(), ObjectLockRetainUntilDate=until)
        version = put.get("VersionId")
        checks["versioned"] = bool(version) and version != "null"
        kept = client.get_object_retention(Bucket=bucket, Key=key).get("Retention", {})
        kept_until = kept.get("RetainUntilDate")
        checks["retention_kept"] = (kept.get("Mode") == mode.upper() and kept_until is not None
                                    and kept_until.timestamp() >= until.timestamp() - 1)
        checks["delete_refused"] = _refused(lambda: client.delete_object(Bucket=bucket, Key=key, VersionId=version))
        shorter = {"Mode": mode.upper(), "RetainUntilDate": until - datetime.timedelta(seconds=PROBE_SECONDS // 2)}
        checks["shortening_refused"] = _refused(lambda: client.put_object_retention(
            Bucket=bucket, Key=key, VersionId=version, Retention=shorter))
        held = client.put_object(Bucket=bucket, Key=held_key, Body=body, ContentMD5=content_md5(body))
        held_version = held.get("VersionId")
        client.put_object_legal_hold(Bucket=bucket, Key=held_key, VersionId=held_version, LegalHold={"Status": "ON"})
        checks["legal_hold_refuses_delete"] = _refused(lambda: client.delete_object(
            Bucket=bucket, Key=held_key, VersionId=held_version))
        client.put_object_legal_hold(Bucket=bucket, Key=held_key, VersionId=held_version, LegalHold={"Status": "OFF"})
    except ClientError as exc:
        raise storage.calls.final_error(exc, "object lock probe", name) from None
    finally:
        storage.calls.requests += 8
        _remove_old_canaries(storage)
    return {"passed": all(checks.values()), "mode": mode, "checks": checks, "canary_seconds": PROBE_SECONDS}


def _remove_old_canaries(storage: S3Storage) -> None:
    """Canaries whose retention has run out (a failed delete just waits for the next probe)."""
    for name in storage.list(PROBE_FOLDER):
        try:
            delete_versions(storage, name)
        except (ObjectRetained, StorageError):
            continue

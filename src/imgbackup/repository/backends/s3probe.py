"""The create-if-absent probe: a repository is never written through a server that does not honour
``If-None-Match: *`` (the lock, and every claim on it, rely on exactly one creator winning).

Two creates of one probe object race (both released at once by a barrier); exactly one must win,
and a third, after both, must lose. A passed probe is remembered per endpoint and bucket in
``$XDG_CACHE_HOME/imgbackup/s3-probe.json`` (default ``~/.cache``) for ``PROBE_CACHE_DAYS``, so it costs
a command 5 requests (HeadBucket, 3 creates, a delete) at most once a week; ``IMGBACKUP_S3_PROBE_CACHE=0`` probes every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from imgbackup.errors import StorageError

if TYPE_CHECKING:
    from imgbackup.repository.backends.s3 import S3Storage

PROBE_CACHE_DAYS = 7  # a server upgrade that breaks conditional writes is noticed within a week
PROBE_PREFIX = "locks/probe-"


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgbackup" / "s3-probe.json"


def _cache_key(storage: S3Storage) -> str:
    return hashlib.sha256(f"{storage.endpoint}\0{storage.bucket}".encode()).hexdigest()[:32]


def _cached(storage: S3Storage) -> bool:
    if os.environ.get("IMGBACKUP_S3_PROBE_CACHE", "1") == "0":
        return False
    try:
        passed = json.loads(cache_file().read_text()).get(_cache_key(storage), 0)
    except (OSError, ValueError, AttributeError):
        return False  # no cache, or a damaged one: probe again
    return isinstance(passed, int | float) and 0 <= time.time() - passed < PROBE_CACHE_DAYS * 86400


def _remember(storage: S3Storage) -> None:
    path = cache_file()
    with contextlib.suppress(OSError, ValueError):
        try:
            doc = json.loads(path.read_text())
            doc = doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            doc = {}
        doc[_cache_key(storage)] = time.time()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)


def probe_create_if_absent(storage: S3Storage) -> tuple[int, bool]:
    """Race two creates of a fresh probe object, then try a third: (winners, third refused)."""
    name = f"{PROBE_PREFIX}{secrets.token_hex(8)}"
    barrier = threading.Barrier(2)
    won: list[bool] = []
    errors: list[BaseException] = []

    def racer(tag: bytes) -> None:
        try:
            barrier.wait(10)
            won.append(storage.create(name, tag))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=racer, args=(tag,)) for tag in (b"probe-a", b"probe-b")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        third_refused = not storage.create(name, b"probe-c")
    finally:
        storage.delete(name)
        _drop_versions(storage, name)
    return sum(won), third_refused


def _drop_versions(storage: S3Storage, name: str) -> None:
    """In a versioned bucket (Object Lock) the delete only hid the probe object: remove its versions."""
    from imgbackup.repository.backends.s3lock import delete_versions, versions

    if versions(storage, name):
        delete_versions(storage, name)


def ensure_create_if_absent(storage: S3Storage) -> None:
    """Refuse to write through a server whose conditional creates do not have exactly one winner."""
    if _cached(storage):
        return
    storage.check_bucket()
    winners, third_refused = probe_create_if_absent(storage)
    if winners != 1 or not third_refused:
        raise StorageError(
            f"the S3 server at {storage.endpoint} does not honour create-if-absent (If-None-Match: *): "
            f"{winners} of 2 racing creates won{'' if third_refused else ' and a create of an existing object succeeded'}",
            "imgbackup's repository lock needs it; nothing was written. Use a server that supports "
            "conditional writes (AWS S3, Ceph RGW, MinIO, SeaweedFS)")
    _remember(storage)

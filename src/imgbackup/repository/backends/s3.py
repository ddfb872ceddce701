"""A repository in an S3-compatible bucket (AWS, Ceph RGW, MinIO, SeaweedFS), through boto3.

Every storage operation is one whole-object request (docs/FORMAT.md §1 maps them): put = PutObject;
create = PutObject with ``If-None-Match: *`` (412 → False); the streamed writer buffers up to
``multipart_threshold`` and sends one PutObject at commit, else a multipart upload that becomes
visible only at CompleteMultipartUpload (abort = AbortMultipartUpload); get_range = ranged GetObject;
size = HeadObject; list = ListObjectsV2 page by page; delete = DeleteObject. Why boto3 (measured
against obstore): docs/S3.md. This module is imported only for s3:// repositories.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from urllib.parse import parse_qs, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from imgbackup.errors import ObjectMissing, StorageError, UsageError
from imgbackup.repository.backends import s3lock
from imgbackup.repository.backends.s3calls import S3Calls, env_float, error_code
from imgbackup.repository.backends.s3lock import ObjectLockSettings, delete_versions
from imgbackup.repository.backends.s3writer import S3ObjectWriter
from imgbackup.repository.storage import check_name

MiB = 1 << 20
MULTIPART_THRESHOLD = 32 * MiB  # a pack (16 MiB target) goes up as one PUT; bigger objects in parts
PART_SIZE = 16 * MiB  # S3 needs parts of at least 5 MiB; 16 MiB keeps a writer's memory at one part
LIST_PAGE = 1000  # keys per ListObjectsV2 page: S3's maximum (tests set a small one)
MAX_CONNECTIONS = 32  # pool size: above the writers and readers in flight, which share one client
WRITE_PARALLELISM = 2  # packs PUT at once: 2 beat 1 and 4 against SeaweedFS on 2 cores (docs/S3.md, measured)
READ_PARALLELISM = 4  # ranged GETs in flight: 2-8 restored alike against SeaweedFS, 16 slower (measured)
CONNECT_TIMEOUT = 10.0  # seconds to connect; a dead server fails fast into the retry loop
READ_TIMEOUT = 60.0  # seconds without a byte from a live connection before it counts as dead


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def parse_s3_url(url: str) -> tuple[str, str, bool | None]:
    """``s3://BUCKET/PREFIX[?path_style=1]`` → bucket, prefix (no slashes at the ends), path style."""
    parts = urlsplit(url)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if not bucket or "@" in bucket or ":" in bucket:
        raise UsageError(f"bad S3 repository URL {url!r}", "write s3://BUCKET/PREFIX (credentials go in the "
                         "environment: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    if prefix:
        check_name(prefix)
    query = parse_qs(parts.query)
    unknown = set(query) - {"path_style"}
    if unknown:
        raise UsageError(f"unknown S3 URL option {sorted(unknown)[0]!r}", "the only option is ?path_style=1")
    path_style = _truthy(query["path_style"][-1]) if "path_style" in query else None
    return bucket, prefix, path_style


class S3Storage:
    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None, region: str | None = None,
                 path_style: bool = False, list_page: int = LIST_PAGE,
                 multipart_threshold: int = MULTIPART_THRESHOLD, part_size: int = PART_SIZE) -> None:
        try:
            self.client = self._client(endpoint, region, path_style)
        except (BotoCoreError, ValueError) as exc:  # a missing AWS_PROFILE, a malformed endpoint URL
            raise StorageError(f"cannot set up the S3 client: {exc}",
                               "check AWS_PROFILE, AWS_ENDPOINT_URL and AWS_REGION") from None
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = self.client.meta.endpoint_url
        self.location = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.fills_up = False
        self.list_page = list_page
        self.multipart_threshold = max(multipart_threshold, part_size)
        self.part_size = part_size
        self.calls = S3Calls(self.endpoint, bucket)
        self.write_parallelism = max(1, int(env_float("IMGBACKUP_S3_PARALLEL_WRITES", WRITE_PARALLELISM)))
        self.read_parallelism = max(1, int(env_float("IMGBACKUP_S3_PARALLEL_READS", READ_PARALLELISM)))
        self.remote = True
        self.lock: ObjectLockSettings | None = None   # S3 Object Lock: every object written with a retention date

    @staticmethod
    def _client(endpoint: str | None, region: str | None, path_style: bool):
        session = boto3.session.Session()
        region = region or os.environ.get("AWS_REGION") or session.region_name or "us-east-1"
        config = Config(
            region_name=region,
            s3={"addressing_style": "path" if path_style else "auto"},
            retries={"total_max_attempts": 1},  # S3Calls retries, and logs each retry
            connect_timeout=env_float("IMGBACKUP_S3_CONNECT_TIMEOUT", CONNECT_TIMEOUT),
            read_timeout=env_float("IMGBACKUP_S3_READ_TIMEOUT", READ_TIMEOUT),
            max_pool_connections=MAX_CONNECTIONS,
            # every object is authenticated by its envelope; a CRC per request would only cost CPU
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
        )
        return session.client("s3", endpoint_url=endpoint or None, config=config)

    @classmethod
    def from_url(cls, url: str, for_writing: bool = False, **kw) -> S3Storage:
        bucket, prefix, path_style = parse_s3_url(url)
        if path_style is None:
            path_style = _truthy(os.environ.get("IMGBACKUP_S3_PATH_STYLE"))
        # tests and odd servers: smaller multipart uploads (S3 wants parts of at least 5 MiB)
        kw.setdefault("multipart_threshold", int(env_float("IMGBACKUP_S3_MULTIPART_THRESHOLD", MULTIPART_THRESHOLD)))
        kw.setdefault("part_size", max(5 * MiB, int(env_float("IMGBACKUP_S3_PART_SIZE", PART_SIZE))))
        storage = cls(bucket, prefix, endpoint=os.environ.get("AWS_ENDPOINT_URL") or None,
                      path_style=path_style, **kw)
        if for_writing:
            from imgbackup.repository.backends.s3probe import ensure_create_if_absent

            ensure_create_if_absent(storage)
        return storage

    def check_bucket(self) -> None:
        """A one-key listing: a missing bucket is RepositoryNotFound (some servers create one on a first
        PUT), and unlike HeadBucket the answer carries the error code (InvalidAccessKeyId, ...)."""
        self.calls.run("bucket check", "", lambda: self.client.list_objects_v2(
            Bucket=self.bucket, MaxKeys=1, Prefix=f"{self.prefix}/" if self.prefix else ""))

    def key(self, name: str) -> str:
        check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def name_of(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    # --- whole objects ----------------------------------------------------------------------

    def put(self, name: str, data) -> None:
        body = bytes(data)
        key = self.key(name)
        extra = self.lock.put_args(name, body) if self.lock else {}
        self.calls.run("put", name, lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **extra))

    def create(self, name: str, data: bytes) -> bool:
        """PutObject with If-None-Match: *; 412 (or 409, a concurrent conditional write) → False.
        After a retry a 412 may be this very request's earlier success: the bytes tell."""
        body, key = bytes(data), self.key(name)
        retried = False
        extra = self.lock.put_args(name, body) if self.lock else {}

        def attempt() -> bool:
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*", **extra)
                return True
            except ClientError as exc:
                if error_code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                    raise
            if not retried:
                return False
            try:
                return self.get(name) == body
            except ObjectMissing:
                return False

        def note_retry(_attempt: int) -> None:
            nonlocal retried
            retried = True

        return self.calls.run("create", name, attempt, attempt_hook=note_retry)

    def get(self, name: str) -> bytes:
        key = self.key(name)
        return self.calls.run("get", name,
                              lambda: self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative range")
        if length == 0:
            self.size(name)  # a missing object is still missing
            return b""
        key, wanted = self.key(name), f"bytes={offset}-{offset + length - 1}"

        def attempt() -> bytes:
            try:
                return self.client.get_object(Bucket=self.bucket, Key=key, Range=wanted)["Body"].read()
            except ClientError as exc:
                if error_code(exc) == "InvalidRange":  # the range starts at or past the end
                    return b""
                raise

        return self.calls.run("get_range", name, attempt)

    def size(self, name: str) -> int:
        key = self.key(name)
        return int(self.calls.run("size", name,
                                  lambda: self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]))

    def modified(self, name: str) -> float:
        """``Last-Modified`` of HeadObject: the server's clock (1 s resolution)."""
        key = self.key(name)
        head = self.calls.run("modified", name, lambda: self.client.head_object(Bucket=self.bucket, Key=key))
        return head["LastModified"].timestamp()

    def now(self) -> float:
        """The server's clock: the ``Date`` header of a one-key listing (1 s resolution)."""
        args = {"Bucket": self.bucket, "MaxKeys": 1, "Prefix": self.key("locks") + "/"}
        answer = self.calls.run("clock", "", lambda: self.client.list_objects_v2(**args))
        date = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if not date:
            raise StorageError(f"the S3 server at {self.endpoint} sent no Date header",
                               "leases need the server's clock; use an S3 server that sends Date")
        try:
            return parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            raise StorageError(f"the S3 server at {self.endpoint} sent a malformed Date header: {date!r}") from None

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
        except ObjectMissing:
            return False
        return True

    def list(self, prefix: str) -> Iterator[str]:
        """Every name under the folder ``prefix``, one ListObjectsV2 page (``list_page`` keys) at a time."""
        return iter([name for name, _size in self.list_sizes(prefix)])

    def list_sizes(self, prefix: str) -> list[tuple[str, int]]:
        """``list`` with each object's size, as the listing gives it (no HEAD per object); sorted."""
        folder = prefix.strip("/")
        start = self.key(folder) + "/" if folder else (f"{self.prefix}/" if self.prefix else "")
        items: list[tuple[str, int]] = []
        token: str | None = None
        while True:
            args = {"Bucket": self.bucket, "Prefix": start, "MaxKeys": self.list_page}
            if token:
                args["ContinuationToken"] = token
            page = self.calls.run("list", folder or "/", lambda a=args: self.client.list_objects_v2(**a))
            items.extend((self.name_of(item["Key"]), int(item["Size"])) for item in page.get("Contents", ()))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return sorted(items)

    def delete(self, name: str) -> None:
        """DeleteObject; in an Object-Lock bucket (versioned) every version of the key, so space is
        really freed — a version still under retention or legal hold raises ObjectRetained."""
        key = self.key(name)
        if self.lock is not None:
            delete_versions(self, name)
            return
        self.calls.run("delete", name, lambda: self.client.delete_object(Bucket=self.bucket, Key=key))

    # --- S3 Object Lock (s3lock.py) ----------------------------------------------------------

    def use_object_lock(self, mode: str, seconds: int) -> None:
        """From now on write every object (but the lock folder's) with a retention date ``seconds`` ahead."""
        self.lock = ObjectLockSettings(mode, seconds)

    def object_lock_enabled(self) -> bool:
        return s3lock.object_lock_enabled(self)

    def lock_probe(self, mode: str) -> dict:
        return s3lock.lock_probe(self, mode)

    def extend_retention(self, name: str, until: datetime.datetime) -> bool:
        return s3lock.extend_retention(self, name, until)

    def set_legal_hold(self, name: str, on: bool) -> None:
        s3lock.set_legal_hold(self, name, on)

    def protection(self, name: str) -> tuple[float | None, bool]:
        """(retain-until, legal hold on) of the current version of ``name``."""
        return s3lock.protection(self, name)

    def prepare(self, folders: tuple[str, ...]) -> None:
        pass  # prefixes are not objects: there is nothing to create

    # --- streamed objects -------------------------------------------------------------------

    def open_writer(self, name: str) -> S3ObjectWriter:
        return S3ObjectWriter(self, name)

    def pending_uploads(self, older_than: float = 0.0) -> list[tuple[str, str]]:
        """(key, upload id) of every multipart upload begun under this repository and not finished,
        with ``older_than``: only those begun that many seconds ago by the server's clock."""
        cutoff = self.now() - older_than if older_than > 0 else None
        out: list[tuple[str, str]] = []
        args = {"Bucket": self.bucket, "Prefix": f"{self.prefix}/" if self.prefix else ""}
        while True:
            page = self.calls.run("list uploads", "", lambda a=dict(args): self.client.list_multipart_uploads(**a))
            out.extend((u["Key"], u["UploadId"]) for u in page.get("Uploads", ())
                       if cutoff is None or "Initiated" not in u or u["Initiated"].timestamp() <= cutoff)
            if not page.get("IsTruncated"):
                return out
            args["KeyMarker"] = page.get("NextKeyMarker", "")
            args["UploadIdMarker"] = page.get("NextUploadIdMarker", "")

    def abort_upload(self, key: str, upload_id: str) -> None:
        def attempt() -> None:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError as exc:
                if error_code(exc) not in ("NoSuchUpload", "404"):
                    raise

        self.calls.run("abort upload", self.name_of(key), attempt)

    def incomplete_writes(self, older_than: float = 0.0) -> list[tuple[str, int]]:
        """Unfinished multipart uploads begun ``older_than`` seconds ago (their size is not counted:
        it would take a request each)."""
        return [(self.name_of(key), 0) for key, _upload in self.pending_uploads(older_than)]

    def remove_incomplete_writes(self, older_than: float = 0.0) -> int:
        """Abort the multipart uploads killed writers left (they are invisible but cost space), begun
        ``older_than`` seconds ago (a live writer's uploads are younger); under the exclusive lease."""
        pending = self.pending_uploads(older_than)
        for key, upload_id in pending:
            self.abort_upload(key, upload_id)
        return len(pending)
